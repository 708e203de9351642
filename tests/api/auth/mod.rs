//! Authentication and authorization of keyplane's own callers (SPEC §2): bearer JWTs in every
//! configuration (HS256, PEM public keys, JWKS, issuer/audience), hostile tokens, the
//! `x-tenant-id` rules, built-in scopes per RPC, admin API keys, the public health and
//! reflection services, and error messages that never echo a credential.
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use keyplane::auth::jwt::JwtSettings;
use keyplane::proto as pb;
use serde_json::{Value, json};
use sha2::Sha256;
use tonic::{Code, Status};
use uuid::Uuid;

use keyplane_testkit::*;

mod admin_keys;
mod builtin_scopes;
mod claims;
mod jwt;
mod jwt_keys;
mod no_echo;
mod public;
mod tenant_header;

pub const WS_READ: &str = "keyplane.workspaces:read";
pub const WS_WRITE: &str = "keyplane.workspaces:write";
pub const VERIFY: &str = "keyplane.api_keys:verify";

// ---------------------------------------------------------------------------------------
// Token building
// ---------------------------------------------------------------------------------------

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("read a test fixture")
}

/// The claims of a valid token: `tenant: None` makes a platform token.
pub fn claims(tenant: Option<Uuid>, scopes: &[&str]) -> Value {
    let now = unix_now();
    let mut c = json!({
        "sub": "tester",
        "iat": now,
        "exp": now + 600,
        "scope": scopes.join(" "),
    });
    if let Some(t) = tenant {
        c["tenant_id"] = json!(t.to_string());
    }
    c
}

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// A token assembled by hand from raw header and payload JSON text, with a valid HMAC-SHA256
/// signature under `key` (whatever the header claims).
pub fn raw_hs256(header_json: &str, payload_json: &str, key: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(header_json.as_bytes()),
        b64(payload_json.as_bytes())
    );
    let signature = hmac_sha256(key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64(&signature))
}

/// A hand-assembled HS256 token signed with the test secret: a valid signature, so only the
/// payload decides.
pub fn hs256_payload(payload_json: &str) -> String {
    raw_hs256(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        payload_json,
        JWT_SECRET.as_bytes(),
    )
}

/// Signs `claims` with jsonwebtoken.
pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("sign a test token")
}

pub fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
}

pub fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(&fixture_bytes("ed25519-private.pem")).unwrap()
}

pub fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&fixture_bytes("ec-private.pem")).unwrap()
}

pub fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture_bytes("rsa-private.pem")).unwrap()
}

/// Workspace ids, sorted.
pub fn ids(workspaces: &[pb::Workspace]) -> Vec<String> {
    let mut ids: Vec<String> = workspaces.iter().map(|w| w.id.clone()).collect();
    ids.sort();
    ids
}

/// Asserts that a call was refused as `UNAUTHENTICATED` / `TOKEN_INVALID`.
#[track_caller]
pub fn assert_token_invalid<T: std::fmt::Debug>(result: Result<T, Status>, what: &str) {
    refused(result, Code::Unauthenticated, "TOKEN_INVALID", what);
}

pub async fn spawn_with_jwt(backend: Backend, configure: impl FnOnce(&mut JwtSettings)) -> TestApp {
    let db = fresh_database(backend).await;
    let mut settings = test_settings(&db.url);
    configure(&mut settings.jwt);
    spawn_with(db, settings).await
}
