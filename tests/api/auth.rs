//! Authentication and authorization of keyplane's own callers (SPEC §2): bearer JWTs in every
//! configuration (HS256, PEM public keys, JWKS, issuer/audience), hostile tokens, the
//! `x-tenant-id` rules, built-in scopes per RPC, admin API keys, the public health and
//! reflection services, and error messages that never echo a credential.
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use keyplane::auth::jwt::JwtSettings;
use keyplane::proto as pb;
use prost_types::{FieldMask, Timestamp};
use serde_json::{Value, json};
use sha2::Sha256;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    no_credential_is_credentials_missing,
    forged_and_malformed_tokens_are_token_invalid,
    authorization_scheme_must_be_bearer,
    tokens_longer_than_8_kib_are_refused,
    expired_and_premature_tokens,
    alg_none_is_rejected_in_every_spelling,
    token_alg_never_widens_the_configured_algorithms,
    exp_and_nbf_of_the_wrong_type_are_rejected,
    required_claims_must_be_present_and_well_typed,
    tenant_id_and_scope_claims_are_validated,
    scp_array_works_like_scope,
    issuer_and_audience_are_checked_when_configured,
    ed25519_public_key_accepts_only_eddsa,
    ec_p256_public_key_accepts_only_es256,
    rsa_public_key_accepts_only_rs256,
    jwks_kid_selects_the_key,
    tenant_token_and_tenant_header,
    platform_token_acts_for_the_named_tenant,
    every_rpc_needs_its_builtin_scope,
    wildcard_grants_every_action_of_its_resource_only,
    admin_key_acts_for_its_tenant_with_its_scopes,
    invalid_admin_keys_are_api_key_invalid,
    health_and_reflection_need_no_credential,
    errors_never_echo_the_credential,
);

const WS_READ: &str = "keyplane.workspaces:read";
const WS_WRITE: &str = "keyplane.workspaces:write";
const VERIFY: &str = "keyplane.api_keys:verify";

// ---------------------------------------------------------------------------------------
// Token building
// ---------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("read a test fixture")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The claims of a valid token: `tenant: None` makes a platform token.
fn claims(tenant: Option<Uuid>, scopes: &[&str]) -> Value {
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

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// A token assembled by hand from raw header and payload JSON text, with a valid HMAC-SHA256
/// signature under `key` (whatever the header claims).
fn raw_hs256(header_json: &str, payload_json: &str, key: &[u8]) -> String {
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
fn hs256_payload(payload_json: &str) -> String {
    raw_hs256(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        payload_json,
        JWT_SECRET.as_bytes(),
    )
}

/// Signs `claims` with jsonwebtoken.
fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("sign a test token")
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        None,
        claims,
        &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
}

fn ed_key() -> EncodingKey {
    EncodingKey::from_ed_pem(&fixture_bytes("ed25519-private.pem")).unwrap()
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_pem(&fixture_bytes("ec-private.pem")).unwrap()
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&fixture_bytes("rsa-private.pem")).unwrap()
}

fn bearer(token: impl Into<String>) -> Cred {
    Cred::Bearer(token.into())
}

// ---------------------------------------------------------------------------------------
// Calls
// ---------------------------------------------------------------------------------------

async fn list_with(
    app: &TestApp,
    request: Request<pb::ListWorkspacesRequest>,
) -> Result<pb::ListWorkspacesResponse, Status> {
    app.workspaces()
        .list_workspaces(request)
        .await
        .map(|r| r.into_inner())
}

async fn list(app: &TestApp, cred: &Cred) -> Result<pb::ListWorkspacesResponse, Status> {
    list_with(app, req(pb::ListWorkspacesRequest::default(), cred)).await
}

async fn list_for(
    app: &TestApp,
    cred: &Cred,
    tenant: &str,
) -> Result<pb::ListWorkspacesResponse, Status> {
    list_with(
        app,
        req_tenant(pb::ListWorkspacesRequest::default(), cred, tenant),
    )
    .await
}

async fn get(app: &TestApp, cred: &Cred, id: &str) -> Result<pb::Workspace, Status> {
    app.workspaces()
        .get_workspace(req(pb::GetWorkspaceRequest { id: id.into() }, cred))
        .await
        .map(|r| r.into_inner().workspace.unwrap())
}

async fn create(
    app: &TestApp,
    request: Request<pb::CreateWorkspaceRequest>,
) -> Result<pb::Workspace, Status> {
    app.workspaces()
        .create_workspace(request)
        .await
        .map(|r| r.into_inner().workspace.unwrap())
}

async fn verify_with(
    app: &TestApp,
    cred: &Cred,
    key: &str,
) -> Result<pb::VerifyApiKeyResponse, Status> {
    app.keys()
        .verify_api_key(req(
            pb::VerifyApiKeyRequest {
                key: key.into(),
                required_scopes: vec![],
            },
            cred,
        ))
        .await
        .map(|r| r.into_inner())
}

/// A request carrying this exact `authorization` header value.
fn with_authorization<T>(message: T, value: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", value.parse().unwrap());
    request
}

fn ids(workspaces: &[pb::Workspace]) -> Vec<String> {
    let mut ids: Vec<String> = workspaces.iter().map(|w| w.id.clone()).collect();
    ids.sort();
    ids
}

/// Like `assert_err`, naming the case that failed.
#[track_caller]
fn refused<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
    what: &str,
) -> Status {
    match result {
        Err(status) if status.code() == code && reason(&status) == expected_reason => {
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.domain, "keyplane.dev", "{what}");
            status
        }
        other => panic!("{what}: expected {code:?} {expected_reason}, got {other:?}"),
    }
}

/// Asserts that a call was refused as `UNAUTHENTICATED` / `TOKEN_INVALID`.
#[track_caller]
fn assert_token_invalid<T: std::fmt::Debug>(result: Result<T, Status>, what: &str) {
    refused(result, Code::Unauthenticated, "TOKEN_INVALID", what);
}

async fn spawn_with_jwt(backend: Backend, configure: impl FnOnce(&mut JwtSettings)) -> TestApp {
    let db = fresh_database(backend).await;
    let mut settings = test_settings(&db.url);
    configure(&mut settings.jwt);
    spawn_with(db, settings).await
}

// ---------------------------------------------------------------------------------------
// §2.5: failures of bearer tokens
// ---------------------------------------------------------------------------------------

async fn no_credential_is_credentials_missing(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;

    assert_err(
        list(&app, &Cred::None).await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    assert_err(
        get(&app, &Cred::None, &ws.id).await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    assert_err(
        verify_with(&app, &Cred::None, "kp_whatever").await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    assert_err(
        create(
            &app,
            req(pb::CreateWorkspaceRequest::default(), &Cred::None),
        )
        .await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    // A tenant header is not a credential.
    assert_err(
        list_for(&app, &Cred::None, &app.tenant.to_string()).await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    // Nothing was created by the refused CreateWorkspace.
    let seen = list(&app, &app.admin()).await.unwrap();
    assert_eq!(ids(&seen.workspaces), vec![ws.id]);
}

async fn forged_and_malformed_tokens_are_token_invalid(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = hs256(&claims(Some(app.tenant), &[WS_READ, VERIFY]));
    list(&app, &bearer(&good))
        .await
        .expect("the unmodified token works");

    let parts: Vec<&str> = good.split('.').collect();
    assert_eq!(parts.len(), 3);

    // Signed with another secret of a valid length.
    let other_secret = sign(
        Algorithm::HS256,
        None,
        &claims(Some(app.tenant), &[WS_READ, VERIFY]),
        &EncodingKey::from_secret(b"another-secret-0123456789abcdefghijkl"),
    );
    // Signature cut short, or removed.
    let truncated = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        &parts[2][..parts[2].len() - 4]
    );
    let unsigned = format!("{}.{}.", parts[0], parts[1]);
    let no_signature_part = format!("{}.{}", parts[0], parts[1]);
    // The payload changed (another tenant, more scopes), the original signature kept.
    let mut altered_claims = claims(Some(Uuid::now_v7()), &all_builtin());
    altered_claims["iat"] = json!(unix_now());
    let altered = format!(
        "{}.{}.{}",
        parts[0],
        b64(altered_claims.to_string().as_bytes()),
        parts[2]
    );
    // One character of the signature flipped.
    let mut sig: Vec<u8> = parts[2].bytes().collect();
    sig[5] = if sig[5] == b'A' { b'B' } else { b'A' };
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        String::from_utf8(sig).unwrap()
    );

    let cases: Vec<(&str, String)> = vec![
        ("signed with another secret", other_secret),
        ("truncated signature", truncated),
        ("empty signature", unsigned),
        ("two segments", no_signature_part),
        ("altered payload", altered),
        ("flipped signature byte", flipped),
        ("garbage", "garbage".into()),
        ("three dots of garbage", "a.b.c".into()),
        ("non-base64 segments", "!!!.???.***".into()),
        ("four segments", format!("{good}.{}", parts[2])),
        (
            "JSON that is not a JWT header",
            format!("{}.{}.{}", b64(b"[1,2,3]"), parts[1], parts[2]),
        ),
        (
            "header that is not JSON",
            format!("{}.{}.{}", b64(b"not json"), parts[1], parts[2]),
        ),
        ("empty token", String::new()),
    ];
    for (what, token) in &cases {
        let value = format!("Bearer {token}");
        assert_token_invalid(
            list_with(
                &app,
                with_authorization(pb::ListWorkspacesRequest::default(), value.trim_end()),
            )
            .await,
            what,
        );
    }
    // The same refusals on GetWorkspace and VerifyApiKey.
    for (what, token) in cases.iter().take(6) {
        assert_token_invalid(
            get(&app, &bearer(token), &Uuid::now_v7().to_string()).await,
            what,
        );
        assert_token_invalid(verify_with(&app, &bearer(token), "kp_x").await, what);
    }
}

async fn authorization_scheme_must_be_bearer(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = token(Some(app.tenant), &[WS_READ]);
    for value in [
        "Basic xyz".to_string(),
        "Basic dGVzdGVyOnNlY3JldA==".to_string(),
        format!("Token {good}"),
        format!("Basic {good}"),
        "Bearer".to_string(),
        good.clone(),
    ] {
        assert_token_invalid(
            list_with(
                &app,
                with_authorization(pb::ListWorkspacesRequest::default(), &value),
            )
            .await,
            &value[..value.len().min(20)],
        );
    }
    // RFC 7235: the scheme name is case-insensitive.
    list_with(
        &app,
        with_authorization(
            pb::ListWorkspacesRequest::default(),
            &format!("bearer {good}"),
        ),
    )
    .await
    .expect("a lower-case scheme is accepted");
}

async fn tokens_longer_than_8_kib_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    const LIMIT: usize = 8 * 1024;
    // The longest token of at most 8 KiB, and the same token one character of padding longer.
    let padded = |n: usize| {
        let mut c = claims(Some(app.tenant), &[WS_READ]);
        c["pad"] = json!("x".repeat(n));
        hs256(&c)
    };
    let mut n = 5000;
    while padded(n + 1).len() <= LIMIT {
        n += 1;
    }
    let at_limit = padded(n);
    let mut over = padded(n + 1);
    if over.len() == at_limit.len() {
        over = padded(n + 2);
    }
    assert!(at_limit.len() <= LIMIT && over.len() > LIMIT);

    list(&app, &bearer(&at_limit))
        .await
        .expect("a valid token of at most 8 KiB is accepted");
    assert_err(
        list(&app, &bearer(&over)).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );
    let mut c = claims(Some(app.tenant), &[WS_READ]);
    c["pad"] = json!("y".repeat(11_000));
    assert_err(
        list(&app, &bearer(hs256(&c))).await,
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );
}

async fn expired_and_premature_tokens(backend: Backend) {
    let app = spawn_app(backend).await;
    let now = unix_now();
    let with = |patch: Value| {
        let mut c = claims(Some(app.tenant), &[WS_READ, VERIFY]);
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        hs256(&c)
    };

    for exp in [now - 5, now - 3600, 1] {
        let expired = bearer(with(json!({"exp": exp, "iat": exp - 60})));
        assert_err(
            list(&app, &expired).await,
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        );
        assert_err(
            verify_with(&app, &expired, "kp_x").await,
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        );
    }
    for nbf in [now + 30, now + 86_400] {
        let premature = bearer(with(json!({"nbf": nbf})));
        assert_err(
            list(&app, &premature).await,
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        );
        assert_err(
            get(&app, &premature, &Uuid::now_v7().to_string()).await,
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        );
    }
    // An nbf in the past is fine.
    list(&app, &bearer(with(json!({"nbf": now - 10}))))
        .await
        .expect("nbf in the past");
}

async fn alg_none_is_rejected_in_every_spelling(backend: Backend) {
    let app = spawn_app(backend).await;
    let payload = claims(Some(app.tenant), &[WS_READ]).to_string();
    let body = b64(payload.as_bytes());
    let real_signature = hs256(&claims(Some(app.tenant), &[WS_READ]))
        .rsplit('.')
        .next()
        .unwrap()
        .to_owned();
    for alg in ["none", "None", "NONE", "nOnE"] {
        for header in [
            format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#),
            format!(r#"{{"alg":"{alg}"}}"#),
        ] {
            let head = b64(header.as_bytes());
            for token in [
                format!("{head}.{body}."),
                format!("{head}.{body}"),
                format!("{head}.{body}.{real_signature}"),
            ] {
                assert_token_invalid(list(&app, &bearer(&token)).await, &header);
            }
        }
    }
    // A header with no alg at all, and one with an alg of the wrong type.
    for header in [r#"{"typ":"JWT"}"#, r#"{"alg":null}"#, r#"{"alg":256}"#] {
        assert_token_invalid(
            list(
                &app,
                &bearer(raw_hs256(header, &payload, JWT_SECRET.as_bytes())),
            )
            .await,
            header,
        );
    }
}

async fn token_alg_never_widens_the_configured_algorithms(backend: Backend) {
    // The test app is configured with an HS256 secret only.
    let app = spawn_app(backend).await;
    let c = claims(Some(app.tenant), &[WS_READ]);
    let secret = EncodingKey::from_secret(JWT_SECRET.as_bytes());
    list(&app, &bearer(sign(Algorithm::HS256, None, &c, &secret)))
        .await
        .expect("HS256 is configured");
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        assert_token_invalid(
            list(&app, &bearer(sign(alg, None, &c, &secret))).await,
            &format!("{alg:?} with the right secret"),
        );
    }
    for (alg, key) in [
        (Algorithm::RS256, rsa_key()),
        (Algorithm::ES256, ec_key()),
        (Algorithm::EdDSA, ed_key()),
    ] {
        let t = bearer(sign(alg, None, &c, &key));
        assert_token_invalid(list(&app, &t).await, &format!("{alg:?} on an HS256 app"));
        assert_token_invalid(
            get(&app, &t, &Uuid::now_v7().to_string()).await,
            &format!("{alg:?} on an HS256 app"),
        );
    }
}

async fn exp_and_nbf_of_the_wrong_type_are_rejected(backend: Backend) {
    let app = spawn_app(backend).await;
    let tenant = app.tenant;
    let far = unix_now() + 3600;
    let scope = WS_READ;
    let payload = |exp: &str, extra: &str| {
        format!(r#"{{"sub":"tester","exp":{exp},"tenant_id":"{tenant}","scope":"{scope}"{extra}}}"#)
    };
    // The builder makes good tokens: an integer exp is accepted.
    list(&app, &bearer(hs256_payload(&payload(&far.to_string(), ""))))
        .await
        .expect("a well-formed hand-built token");

    let bad_exps = [
        format!("\"{far}\""),
        "\"9999999999\"".to_string(),
        "1e12".to_string(),
        "99999999999.5".to_string(),
        format!("{far}.0"),
        "184467440737095516160".to_string(),
        "1e400".to_string(),
        "true".to_string(),
        "null".to_string(),
        "[9999999999]".to_string(),
        "{}".to_string(),
    ];
    for exp in &bad_exps {
        assert_token_invalid(
            list(&app, &bearer(hs256_payload(&payload(exp, "")))).await,
            &format!("exp = {exp}"),
        );
    }
    // nbf is checked when present: a wrong type is a rejection, never a skipped check.
    for nbf in [
        format!("\"{far}\""),
        "\"0\"".to_string(),
        "1.5".to_string(),
        "true".to_string(),
        "184467440737095516160".to_string(),
    ] {
        assert_token_invalid(
            list(
                &app,
                &bearer(hs256_payload(&payload(
                    &far.to_string(),
                    &format!(r#","nbf":{nbf}"#),
                ))),
            )
            .await,
            &format!("nbf = {nbf}"),
        );
    }
}

async fn required_claims_must_be_present_and_well_typed(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = claims(Some(app.tenant), &[WS_READ]);
    let without = |name: &str| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(name);
        hs256(&c)
    };
    let replaced = |name: &str, value: Value| {
        let mut c = base.clone();
        c[name] = value;
        hs256(&c)
    };
    list(&app, &bearer(hs256(&base))).await.expect("control");
    let cases = [
        ("missing sub", without("sub")),
        ("missing exp", without("exp")),
        ("sub null", replaced("sub", Value::Null)),
        ("sub a number", replaced("sub", json!(42))),
        ("sub an object", replaced("sub", json!({"id": "tester"}))),
        ("exp null", replaced("exp", Value::Null)),
        ("payload an array", hs256(&json!([base.clone()]))),
        ("payload a string", hs256(&json!("tester"))),
    ];
    for (what, token) in cases {
        assert_token_invalid(list(&app, &bearer(&token)).await, what);
        assert_token_invalid(verify_with(&app, &bearer(&token), "kp_x").await, what);
    }
}

async fn tenant_id_and_scope_claims_are_validated(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = claims(Some(app.tenant), &[WS_READ]);
    let replaced = |name: &str, value: Value| {
        let mut c = base.clone();
        c[name] = value;
        hs256(&c)
    };
    let cases = [
        ("tenant_id not a UUID", replaced("tenant_id", json!("acme"))),
        ("tenant_id empty", replaced("tenant_id", json!(""))),
        (
            "tenant_id a UUID with junk",
            replaced("tenant_id", json!(format!("{}x", app.tenant))),
        ),
        ("tenant_id a number", replaced("tenant_id", json!(12345))),
        (
            "tenant_id an array",
            replaced("tenant_id", json!([app.tenant.to_string()])),
        ),
        ("scope a number", replaced("scope", json!(42))),
        ("scope an array", replaced("scope", json!([WS_READ]))),
        ("scope an object", replaced("scope", json!({"s": WS_READ}))),
        ("scp a number", replaced("scp", json!(7))),
        ("scp an array of numbers", replaced("scp", json!([1, 2]))),
    ];
    for (what, token) in cases {
        assert_token_invalid(list(&app, &bearer(&token)).await, what);
        assert_token_invalid(
            get(&app, &bearer(&token), &Uuid::now_v7().to_string()).await,
            what,
        );
    }
    // A tenant_id of the wrong type never falls back to a platform token.
    let mut c = claims(None, &[WS_READ]);
    c["tenant_id"] = json!(12345);
    assert_token_invalid(
        list_for(&app, &bearer(hs256(&c)), &Uuid::now_v7().to_string()).await,
        "tenant_id a number, with x-tenant-id",
    );
}

async fn scp_array_works_like_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let scp = |scopes: &[&str]| {
        let mut c = claims(Some(app.tenant), &[]);
        c.as_object_mut().unwrap().remove("scope");
        c["scp"] = json!(scopes);
        bearer(hs256(&c))
    };

    let reader = scp(&[WS_READ]);
    let seen = list(&app, &reader).await.expect("scp grants read");
    assert_eq!(ids(&seen.workspaces), vec![ws.id.clone()]);
    get(&app, &reader, &ws.id).await.expect("scp grants read");
    let status = assert_err(
        create(&app, req(pb::CreateWorkspaceRequest::default(), &reader)).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        WS_WRITE
    );

    let writer = scp(&[WS_READ, WS_WRITE]);
    let made = create(&app, req(pb::CreateWorkspaceRequest::default(), &writer))
        .await
        .expect("scp grants write");
    assert_eq!(made.tenant_id, app.tenant.to_string());

    // An empty scp grants nothing.
    assert_err(
        list(&app, &scp(&[])).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    // scope and scp together: each contributes.
    let mut both = claims(Some(app.tenant), &[WS_READ]);
    both["scp"] = json!([VERIFY]);
    let both = bearer(hs256(&both));
    list(&app, &both).await.expect("read from scope");
    verify_with(&app, &both, "kp_x")
        .await
        .expect("verify from scp");
}

async fn issuer_and_audience_are_checked_when_configured(backend: Backend) {
    let app = spawn_with_jwt(backend, |jwt| {
        jwt.issuer = Some("https://issuer.test".into());
        jwt.audience = Some("keyplane".into());
    })
    .await;
    let with = |iss: Option<Value>, aud: Option<Value>| {
        let mut c = claims(Some(app.tenant), &[WS_READ]);
        if let Some(iss) = iss {
            c["iss"] = iss;
        }
        if let Some(aud) = aud {
            c["aud"] = aud;
        }
        bearer(hs256(&c))
    };
    let iss = || Some(json!("https://issuer.test"));
    let aud = || Some(json!("keyplane"));

    list(&app, &with(iss(), aud()))
        .await
        .expect("the configured issuer and audience");
    list(&app, &with(iss(), Some(json!(["other", "keyplane"]))))
        .await
        .expect("an audience array naming keyplane");

    let cases = [
        (
            "wrong issuer",
            with(Some(json!("https://evil.test")), aud()),
        ),
        (
            "issuer with a trailing slash",
            with(Some(json!("https://issuer.test/")), aud()),
        ),
        (
            "wrong audience",
            with(iss(), Some(json!("keyplane-staging"))),
        ),
        (
            "audience array without keyplane",
            with(iss(), Some(json!(["a", "b"]))),
        ),
        ("missing issuer", with(None, aud())),
        ("missing audience", with(iss(), None)),
        ("missing both", with(None, None)),
        ("issuer a number", with(Some(json!(1)), aud())),
        ("audience a number", with(iss(), Some(json!(1)))),
        ("issuer null", with(Some(Value::Null), aud())),
    ];
    for (what, cred) in &cases {
        assert_token_invalid(list(&app, cred).await, what);
        assert_token_invalid(verify_with(&app, cred, "kp_x").await, what);
    }
}

/// An app configured with only a PEM public key: tokens of its algorithm signed with the
/// matching private key work, anything HMAC (even keyed with the public PEM) does not.
async fn public_key_only(backend: Backend, public: &str, alg: Algorithm, key: EncodingKey) {
    let app = spawn_with_jwt(backend, |jwt| {
        jwt.secret = None;
        jwt.public_key_file = Some(fixture(public));
    })
    .await;
    let c = claims(Some(app.tenant), &[WS_READ, WS_WRITE]);
    let good = bearer(sign(alg, None, &c, &key));
    let made = create(&app, req(pb::CreateWorkspaceRequest::default(), &good))
        .await
        .unwrap_or_else(|s| panic!("{alg:?} token on a {public} app: {s:?}"));
    assert_eq!(made.tenant_id, app.tenant.to_string());
    assert_eq!(made.owner_id, "tester");
    let seen = list(&app, &good).await.unwrap();
    assert_eq!(ids(&seen.workspaces), vec![made.id.clone()]);

    // HMAC tokens: with the usual test secret, and keyed with the public key itself
    // (algorithm confusion).
    let pem = fixture_bytes(public);
    let pem_trimmed = String::from_utf8(pem.clone()).unwrap().trim().to_owned();
    for hmac_alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        for (what, secret) in [
            ("the test secret", JWT_SECRET.as_bytes().to_vec()),
            ("the public PEM", pem.clone()),
            ("the trimmed public PEM", pem_trimmed.clone().into_bytes()),
        ] {
            let t = bearer(sign(hmac_alg, None, &c, &EncodingKey::from_secret(&secret)));
            let what = format!("{hmac_alg:?} keyed with {what} on a {public} app");
            assert_token_invalid(list(&app, &t).await, &what);
            assert_token_invalid(get(&app, &t, &made.id).await, &what);
        }
    }
    // Hand-built HS256 keyed with the PEM, for good measure (no jsonwebtoken on this side).
    let confused = raw_hs256(r#"{"alg":"HS256","typ":"JWT"}"#, &c.to_string(), &pem);
    assert_token_invalid(
        list(&app, &bearer(confused)).await,
        "hand-built HS256 with the PEM",
    );

    // The other asymmetric algorithms are not configured.
    for (other_alg, other_key) in [
        (Algorithm::RS256, rsa_key()),
        (Algorithm::ES256, ec_key()),
        (Algorithm::EdDSA, ed_key()),
    ] {
        if other_alg == alg {
            continue;
        }
        assert_token_invalid(
            list(&app, &bearer(sign(other_alg, None, &c, &other_key))).await,
            &format!("{other_alg:?} on a {public} app"),
        );
    }
    // A token of the right algorithm whose payload was changed after signing.
    let Cred::Bearer(good_token) = &good else {
        unreachable!()
    };
    let parts: Vec<&str> = good_token.split('.').collect();
    let altered = format!(
        "{}.{}.{}",
        parts[0],
        b64(claims(Some(Uuid::now_v7()), &all_builtin())
            .to_string()
            .as_bytes()),
        parts[2]
    );
    assert_token_invalid(list(&app, &bearer(altered)).await, "altered payload");
    // Expiry still applies to asymmetric tokens.
    let mut expired = claims(Some(app.tenant), &[WS_READ]);
    expired["exp"] = json!(unix_now() - 10);
    assert_err(
        list(&app, &bearer(sign(alg, None, &expired, &key))).await,
        Code::Unauthenticated,
        "TOKEN_EXPIRED",
    );
}

async fn ed25519_public_key_accepts_only_eddsa(backend: Backend) {
    public_key_only(backend, "ed25519-public.pem", Algorithm::EdDSA, ed_key()).await;
}

async fn ec_p256_public_key_accepts_only_es256(backend: Backend) {
    public_key_only(backend, "ec-public.pem", Algorithm::ES256, ec_key()).await;
}

async fn rsa_public_key_accepts_only_rs256(backend: Backend) {
    public_key_only(backend, "rsa-public.pem", Algorithm::RS256, rsa_key()).await;
}

async fn jwks_kid_selects_the_key(backend: Backend) {
    let app = spawn_with_jwt(backend, |jwt| {
        jwt.secret = None;
        jwt.jwks_file = Some(fixture("jwks.json"));
    })
    .await;
    let c = claims(Some(app.tenant), &[WS_READ, VERIFY]);
    let good = bearer(sign(Algorithm::EdDSA, Some("test-ed"), &c, &ed_key()));
    list(&app, &good).await.expect("kid test-ed");
    verify_with(&app, &good, "kp_x").await.expect("kid test-ed");

    let jwks = fixture_bytes("jwks.json");
    let cases = [
        (
            "unknown kid",
            sign(Algorithm::EdDSA, Some("other"), &c, &ed_key()),
        ),
        (
            "kid differing in case",
            sign(Algorithm::EdDSA, Some("TEST-ED"), &c, &ed_key()),
        ),
        ("no kid", sign(Algorithm::EdDSA, None, &c, &ed_key())),
        ("empty kid", sign(Algorithm::EdDSA, Some(""), &c, &ed_key())),
        (
            "HS256 with kid test-ed and the test secret",
            sign(
                Algorithm::HS256,
                Some("test-ed"),
                &c,
                &EncodingKey::from_secret(JWT_SECRET.as_bytes()),
            ),
        ),
        (
            "HS256 with kid test-ed keyed with the JWKS file",
            sign(
                Algorithm::HS256,
                Some("test-ed"),
                &c,
                &EncodingKey::from_secret(&jwks),
            ),
        ),
        (
            "HS256 with kid test-ed keyed with the public key x",
            sign(
                Algorithm::HS256,
                Some("test-ed"),
                &c,
                &EncodingKey::from_secret(b"pzaOcs9J6w07c5YVD_buXYffPlTE6JucWKUjUrJSCkw"),
            ),
        ),
        (
            "ES256 with kid test-ed",
            sign(Algorithm::ES256, Some("test-ed"), &c, &ec_key()),
        ),
        (
            "RS256 with kid test-ed",
            sign(Algorithm::RS256, Some("test-ed"), &c, &rsa_key()),
        ),
    ];
    for (what, token) in &cases {
        assert_token_invalid(list(&app, &bearer(token)).await, what);
        assert_token_invalid(verify_with(&app, &bearer(token), "kp_x").await, what);
    }
}

// ---------------------------------------------------------------------------------------
// §2.3: x-tenant-id
// ---------------------------------------------------------------------------------------

async fn tenant_token_and_tenant_header(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("mine").await;
    let cred = bearer(token(Some(app.tenant), &[WS_READ, WS_WRITE]));
    let own = app.tenant.to_string();
    let other = Uuid::now_v7().to_string();

    // Header optional, and accepted when it names the claim's tenant.
    assert_eq!(
        ids(&list(&app, &cred).await.unwrap().workspaces),
        vec![ws.id.clone()]
    );
    assert_eq!(
        ids(&list_for(&app, &cred, &own).await.unwrap().workspaces),
        vec![ws.id.clone()]
    );

    // Another tenant: refused, on reads and writes alike, and nothing is created.
    assert_err(
        list_for(&app, &cred, &other).await,
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    assert_err(
        app.workspaces()
            .get_workspace(req_tenant(
                pb::GetWorkspaceRequest { id: ws.id.clone() },
                &cred,
                &other,
            ))
            .await,
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    assert_err(
        create(
            &app,
            req_tenant(pb::CreateWorkspaceRequest::default(), &cred, &other),
        )
        .await,
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    let platform = bearer(token(None, &[WS_READ]));
    assert!(
        list_for(&app, &platform, &other)
            .await
            .unwrap()
            .workspaces
            .is_empty()
    );

    // Not a UUID.
    for bad in ["acme", "", "12345", &format!("{own}x")] {
        refused(
            list_for(&app, &cred, bad).await,
            Code::InvalidArgument,
            "TENANT_ID_INVALID",
            bad,
        );
    }
}

async fn platform_token_acts_for_the_named_tenant(backend: Backend) {
    let app = spawn_app(backend).await;
    let platform = bearer(token(None, &all_builtin()));
    let tenant_a = Uuid::now_v7().to_string();
    let tenant_b = Uuid::now_v7().to_string();

    let made = create(
        &app,
        req_tenant(
            pb::CreateWorkspaceRequest {
                name: "for a".into(),
                ..Default::default()
            },
            &platform,
            &tenant_a,
        ),
    )
    .await
    .expect("a platform token with x-tenant-id creates");
    assert_eq!(made.tenant_id, tenant_a);
    assert_eq!(
        ids(&list_for(&app, &platform, &tenant_a)
            .await
            .unwrap()
            .workspaces),
        vec![made.id.clone()]
    );
    // The tenant itself sees it through a tenant token; tenant B does not.
    let a_token = bearer(token(Some(tenant_a.parse().unwrap()), &[WS_READ]));
    assert_eq!(
        ids(&list(&app, &a_token).await.unwrap().workspaces),
        vec![made.id.clone()]
    );
    assert!(
        list_for(&app, &platform, &tenant_b)
            .await
            .unwrap()
            .workspaces
            .is_empty()
    );
    assert_err(
        app.workspaces()
            .get_workspace(req_tenant(
                pb::GetWorkspaceRequest {
                    id: made.id.clone(),
                },
                &platform,
                &tenant_b,
            ))
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // Without the header every tenant-scoped RPC is refused.
    assert_err(
        list(&app, &platform).await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        get(&app, &platform, &made.id).await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        create(&app, req(pb::CreateWorkspaceRequest::default(), &platform)).await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        app.scopes()
            .list_scopes(req(pb::ListScopesRequest::default(), &platform))
            .await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        app.keys()
            .list_api_keys(req(pb::ListApiKeysRequest::default(), &platform))
            .await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    // A header that is not a UUID.
    assert_err(
        list_for(&app, &platform, "tenant-a").await,
        Code::InvalidArgument,
        "TENANT_ID_INVALID",
    );
    // Nothing was created without a tenant.
    assert_eq!(
        ids(&list_for(&app, &platform, &tenant_a)
            .await
            .unwrap()
            .workspaces),
        vec![made.id.clone()]
    );

    // VerifyApiKey (§3.4): a platform token without x-tenant-id may verify any tenant's key.
    let ws = app.create_workspace("keys").await;
    let (_, secret) = app.create_key(&ws.id, &[]).await;
    let verifier = bearer(token(None, &[VERIFY]));
    let r = verify_with(&app, &verifier, &secret).await.unwrap();
    assert!(r.valid, "{r:?}");
    assert_eq!(r.tenant_id, app.tenant.to_string());
    // With another tenant named, the key is not that tenant's.
    let r = app
        .keys()
        .verify_api_key(req_tenant(
            pb::VerifyApiKeyRequest {
                key: secret.clone(),
                required_scopes: vec![],
            },
            &verifier,
            &tenant_b,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.valid);
    assert_eq!(r.code(), pb::VerifyCode::NotFound);
}

// ---------------------------------------------------------------------------------------
// §2.4: built-in scopes
// ---------------------------------------------------------------------------------------

/// Every keyplane RPC and the one built-in scope it needs (§4).
const RPCS: [(&str, &str); 18] = [
    ("CreateWorkspace", WS_WRITE),
    ("GetWorkspace", WS_READ),
    ("ListWorkspaces", WS_READ),
    ("UpdateWorkspace", WS_WRITE),
    ("DeleteWorkspace", WS_WRITE),
    ("CreateScope", "keyplane.scopes:write"),
    ("GetScope", "keyplane.scopes:read"),
    ("ListScopes", "keyplane.scopes:read"),
    ("UpdateScope", "keyplane.scopes:write"),
    ("DeleteScope", "keyplane.scopes:write"),
    ("CreateApiKey", "keyplane.api_keys:write"),
    ("GetApiKey", "keyplane.api_keys:read"),
    ("ListApiKeys", "keyplane.api_keys:read"),
    ("UpdateApiKey", "keyplane.api_keys:write"),
    ("RevokeApiKey", "keyplane.api_keys:write"),
    ("RotateApiKey", "keyplane.api_keys:write"),
    ("DeleteApiKey", "keyplane.api_keys:write"),
    ("VerifyApiKey", VERIFY),
];

/// Calls one RPC with a minimal request (authorization happens before the request is read).
async fn call(app: &TestApp, rpc: &str, cred: &Cred) -> Result<(), Status> {
    let id = Uuid::now_v7().to_string();
    let (mut w, mut s, mut k) = (app.workspaces(), app.scopes(), app.keys());
    match rpc {
        "CreateWorkspace" => w
            .create_workspace(req(pb::CreateWorkspaceRequest::default(), cred))
            .await
            .map(drop),
        "GetWorkspace" => w
            .get_workspace(req(pb::GetWorkspaceRequest { id }, cred))
            .await
            .map(drop),
        "ListWorkspaces" => w
            .list_workspaces(req(pb::ListWorkspacesRequest::default(), cred))
            .await
            .map(drop),
        "UpdateWorkspace" => w
            .update_workspace(req(pb::UpdateWorkspaceRequest::default(), cred))
            .await
            .map(drop),
        "DeleteWorkspace" => w
            .delete_workspace(req(
                pb::DeleteWorkspaceRequest {
                    id,
                    ..Default::default()
                },
                cred,
            ))
            .await
            .map(drop),
        "CreateScope" => s
            .create_scope(req(pb::CreateScopeRequest::default(), cred))
            .await
            .map(drop),
        "GetScope" => s
            .get_scope(req(pb::GetScopeRequest { id }, cred))
            .await
            .map(drop),
        "ListScopes" => s
            .list_scopes(req(pb::ListScopesRequest::default(), cred))
            .await
            .map(drop),
        "UpdateScope" => s
            .update_scope(req(pb::UpdateScopeRequest::default(), cred))
            .await
            .map(drop),
        "DeleteScope" => s
            .delete_scope(req(
                pb::DeleteScopeRequest {
                    id,
                    ..Default::default()
                },
                cred,
            ))
            .await
            .map(drop),
        "CreateApiKey" => k
            .create_api_key(req(pb::CreateApiKeyRequest::default(), cred))
            .await
            .map(drop),
        "GetApiKey" => k
            .get_api_key(req(pb::GetApiKeyRequest { id }, cred))
            .await
            .map(drop),
        "ListApiKeys" => k
            .list_api_keys(req(pb::ListApiKeysRequest::default(), cred))
            .await
            .map(drop),
        "UpdateApiKey" => k
            .update_api_key(req(pb::UpdateApiKeyRequest::default(), cred))
            .await
            .map(drop),
        "RevokeApiKey" => k
            .revoke_api_key(req(pb::RevokeApiKeyRequest { id }, cred))
            .await
            .map(drop),
        "RotateApiKey" => k
            .rotate_api_key(req(
                pb::RotateApiKeyRequest {
                    id,
                    ..Default::default()
                },
                cred,
            ))
            .await
            .map(drop),
        "DeleteApiKey" => k
            .delete_api_key(req(pb::DeleteApiKeyRequest { id }, cred))
            .await
            .map(drop),
        "VerifyApiKey" => k
            .verify_api_key(req(pb::VerifyApiKeyRequest::default(), cred))
            .await
            .map(drop),
        other => panic!("unknown RPC {other}"),
    }
}

#[track_caller]
fn assert_missing_scope(result: Result<(), Status>, needed: &str, what: &str) {
    let status = match result {
        Err(s) if s.code() == Code::PermissionDenied && reason(&s) == "MISSING_SCOPE" => s,
        other => panic!("{what}: expected PERMISSION_DENIED MISSING_SCOPE, got {other:?}"),
    };
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.domain, "keyplane.dev");
    assert_eq!(
        info.metadata.get("scope").map(String::as_str),
        Some(needed),
        "{what}: {status:?}"
    );
}

#[track_caller]
fn assert_authorized(result: Result<(), Status>, what: &str) {
    if let Err(status) = result {
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            "{what}: the credential should have been accepted: {status:?}"
        );
    }
}

async fn every_rpc_needs_its_builtin_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let all = all_builtin();
    for (rpc, needed) in RPCS {
        // Every built-in scope but the needed one.
        let others: Vec<&str> = all.iter().copied().filter(|s| *s != needed).collect();
        assert_eq!(others.len(), all.len() - 1, "{needed} is a built-in scope");
        let without = bearer(token(Some(app.tenant), &others));
        assert_missing_scope(
            call(&app, rpc, &without).await,
            needed,
            &format!("{rpc} without {needed}"),
        );

        // A custom scope of the same name outside the keyplane namespace is not it.
        let lookalike = needed.trim_start_matches("keyplane.");
        let fake = bearer(token(
            Some(app.tenant),
            &[lookalike, &needed.to_uppercase()],
        ));
        assert_missing_scope(
            call(&app, rpc, &fake).await,
            needed,
            &format!("{rpc} with lookalikes"),
        );

        // A token holding only the needed scope gets past authorization.
        let only = bearer(token(Some(app.tenant), &[needed]));
        assert_authorized(
            call(&app, rpc, &only).await,
            &format!("{rpc} with {needed}"),
        );
    }
    // A token without any scope at all.
    let none = bearer(token(Some(app.tenant), &[]));
    for (rpc, needed) in RPCS {
        assert_missing_scope(
            call(&app, rpc, &none).await,
            needed,
            &format!("{rpc} with no scope"),
        );
    }
    // An admin key works the same way.
    let ws = app.create_workspace("keys").await;
    let (_, reader_key) = app
        .create_key(&ws.id, &[WS_READ, "keyplane.scopes:read"])
        .await;
    let reader_key = Cred::ApiKey(reader_key);
    for (rpc, needed) in RPCS {
        let result = call(&app, rpc, &reader_key).await;
        if needed == WS_READ || needed == "keyplane.scopes:read" {
            assert_authorized(result, &format!("{rpc} with a reader key"));
        } else {
            assert_missing_scope(result, needed, &format!("{rpc} with a reader key"));
        }
    }
}

async fn wildcard_grants_every_action_of_its_resource_only(backend: Backend) {
    let app = spawn_app(backend).await;
    let star = bearer(token(Some(app.tenant), &["keyplane.workspaces:*"]));
    let made = create(&app, req(pb::CreateWorkspaceRequest::default(), &star))
        .await
        .expect(":* grants write");
    assert_eq!(
        ids(&list(&app, &star).await.unwrap().workspaces),
        vec![made.id.clone()]
    );
    get(&app, &star, &made.id).await.expect(":* grants read");

    // It does not reach the other resources.
    for (rpc, needed) in RPCS {
        if needed.starts_with("keyplane.workspaces:") {
            assert_authorized(call(&app, rpc, &star).await, rpc);
        } else {
            assert_missing_scope(call(&app, rpc, &star).await, needed, rpc);
        }
    }
    // Only the resource's own wildcard counts.
    for scopes in [
        vec!["keyplane.scopes:*", "keyplane.api_keys:*"],
        vec!["keyplane.workspace:*"],
        vec!["keyplane.workspaces*"],
        vec!["workspaces:*"],
    ] {
        let cred = bearer(token(Some(app.tenant), &scopes));
        assert_missing_scope(
            list(&app, &cred).await.map(drop),
            WS_READ,
            &format!("{scopes:?}"),
        );
        assert_missing_scope(
            create(&app, req(pb::CreateWorkspaceRequest::default(), &cred))
                .await
                .map(drop),
            WS_WRITE,
            &format!("{scopes:?}"),
        );
    }
    // api_keys:* grants verify too.
    let keys_star = bearer(token(Some(app.tenant), &["keyplane.api_keys:*"]));
    verify_with(&app, &keys_star, "kp_x")
        .await
        .expect("api_keys:* grants verify");
    // Reading does not grant writing, and vice versa.
    let reader = bearer(token(Some(app.tenant), &[WS_READ]));
    assert_missing_scope(
        create(&app, req(pb::CreateWorkspaceRequest::default(), &reader))
            .await
            .map(drop),
        WS_WRITE,
        "workspaces:read creating",
    );
    let writer = bearer(token(Some(app.tenant), &[WS_WRITE]));
    assert_missing_scope(
        list(&app, &writer).await.map(drop),
        WS_READ,
        "workspaces:write listing",
    );
    assert_missing_scope(
        get(&app, &writer, &made.id).await.map(drop),
        WS_READ,
        "workspaces:write getting",
    );
}

// ---------------------------------------------------------------------------------------
// §2.2: admin keys
// ---------------------------------------------------------------------------------------

async fn admin_key_acts_for_its_tenant_with_its_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws1 = app.create_workspace("one").await;
    let ws2 = app.create_workspace("two").await;
    let other_tenant = Uuid::now_v7().to_string();
    let platform = bearer(token(None, &all_builtin()));
    let foreign = create(
        &app,
        req_tenant(
            pb::CreateWorkspaceRequest::default(),
            &platform,
            &other_tenant,
        ),
    )
    .await
    .unwrap();

    let (key, secret) = app.create_key(&ws1.id, &[WS_READ]).await;
    let cred = Cred::ApiKey(secret.clone());

    let seen = list(&app, &cred).await.expect("an admin key lists");
    let mut expected = vec![ws1.id.clone(), ws2.id.clone()];
    expected.sort();
    assert_eq!(ids(&seen.workspaces), expected);
    assert!(
        seen.workspaces
            .iter()
            .all(|w| w.tenant_id == app.tenant.to_string())
    );
    assert_eq!(get(&app, &cred, &ws2.id).await.unwrap().id, ws2.id);
    assert_err(
        get(&app, &cred, &foreign.id).await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // Its scopes only.
    let status = assert_err(
        create(&app, req(pb::CreateWorkspaceRequest::default(), &cred)).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        WS_WRITE
    );
    let status = assert_err(
        verify_with(&app, &cred, &secret).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        VERIFY
    );

    // x-tenant-id: optional, must name the key's tenant.
    assert_eq!(
        ids(&list_for(&app, &cred, &app.tenant.to_string())
            .await
            .unwrap()
            .workspaces),
        expected
    );
    assert_err(
        list_for(&app, &cred, &other_tenant).await,
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    assert_err(
        list_for(&app, &cred, "not-a-uuid").await,
        Code::InvalidArgument,
        "TENANT_ID_INVALID",
    );

    // A write key creates in its own tenant, owned by the key.
    let (writer_key, writer_secret) = app.create_key(&ws1.id, &[WS_WRITE, WS_READ]).await;
    let made = create(
        &app,
        req(
            pb::CreateWorkspaceRequest::default(),
            &Cred::ApiKey(writer_secret),
        ),
    )
    .await
    .expect("a write key creates");
    assert_eq!(made.tenant_id, app.tenant.to_string());
    assert_eq!(
        made.owner_id, writer_key.id,
        "owner defaults to the admin key's id"
    );
    assert_ne!(key.id, writer_key.id);
}

async fn invalid_admin_keys_are_api_key_invalid(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;

    // Malformed: wrong shape, alphabet or checksum.
    let (_, good) = app.create_key(&ws.id, &[WS_READ]).await;
    list(&app, &Cred::ApiKey(good.clone()))
        .await
        .expect("a valid admin key");
    let mut mistyped: Vec<char> = good.chars().collect();
    let last = mistyped.len() - 1;
    mistyped[last] = if mistyped[last] == 'a' { 'b' } else { 'a' };
    let mistyped: String = mistyped.into_iter().collect();
    let mut swapped: Vec<char> = good.chars().collect();
    let mid = swapped.len() / 2;
    swapped[mid] = if swapped[mid] == 'Z' { 'Y' } else { 'Z' };
    let swapped: String = swapped.into_iter().collect();
    for (what, key) in [
        ("garbage", "not-a-key".to_string()),
        ("empty", String::new()),
        ("prefix only", "kp_".to_string()),
        ("too short", "kp_abc123".to_string()),
        ("bad checksum", mistyped),
        ("a changed body character", swapped),
        ("an extra character", format!("{good}x")),
        ("a missing character", good[..good.len() - 1].to_string()),
        ("a JWT in x-api-key", token(Some(app.tenant), &[WS_READ])),
    ] {
        refused(
            list(&app, &Cred::ApiKey(key)).await,
            Code::Unauthenticated,
            "API_KEY_INVALID",
            what,
        );
    }

    // Unknown: well formed, but deleted.
    let (gone, gone_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let gone_cred = Cred::ApiKey(gone_secret);
    list(&app, &gone_cred).await.expect("before delete");
    app.keys()
        .delete_api_key(req(pb::DeleteApiKeyRequest { id: gone.id }, &app.admin()))
        .await
        .unwrap();
    assert_err(
        list(&app, &gone_cred).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // Revoked.
    let (revoked, revoked_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let revoked_cred = Cred::ApiKey(revoked_secret);
    list(&app, &revoked_cred).await.expect("before revoke");
    app.keys()
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest { id: revoked.id },
            &app.admin(),
        ))
        .await
        .unwrap();
    assert_err(
        list(&app, &revoked_cred).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    assert_err(
        get(&app, &revoked_cred, &ws.id).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // Rotated without grace: the old secret is dead, the new one works.
    let (rotated, rotated_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    list(&app, &Cred::ApiKey(rotated_secret.clone()))
        .await
        .expect("before rotate");
    let successor = app
        .keys()
        .rotate_api_key(req(
            pb::RotateApiKeyRequest {
                id: rotated.id,
                grace_period: None,
            },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_err(
        list(&app, &Cred::ApiKey(rotated_secret)).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    list(&app, &Cred::ApiKey(successor.secret))
        .await
        .expect("the successor works");

    // Disabled, and enabled again.
    let (disabled, disabled_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let disabled_cred = Cred::ApiKey(disabled_secret);
    list(&app, &disabled_cred).await.expect("before disable");
    let set_disabled = |flag: bool| pb::UpdateApiKeyRequest {
        api_key: Some(pb::ApiKey {
            id: disabled.id.clone(),
            disabled: flag,
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["disabled".into()],
        }),
        etag: String::new(),
    };
    app.keys()
        .update_api_key(req(set_disabled(true), &app.admin()))
        .await
        .unwrap();
    assert_err(
        list(&app, &disabled_cred).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    app.keys()
        .update_api_key(req(set_disabled(false), &app.admin()))
        .await
        .unwrap();
    list(&app, &disabled_cred).await.expect("enabled again");

    // Expired.
    let expiry = SystemTime::now() + Duration::from_secs(2);
    let since_epoch = expiry.duration_since(UNIX_EPOCH).unwrap();
    let created = app
        .keys()
        .create_api_key(req(
            pb::CreateApiKeyRequest {
                workspace_id: ws.id.clone(),
                scopes: vec![WS_READ.into()],
                expire_time: Some(Timestamp {
                    seconds: since_epoch.as_secs() as i64,
                    nanos: since_epoch.subsec_nanos() as i32,
                }),
                ..Default::default()
            },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    let expiring = Cred::ApiKey(created.secret);
    list(&app, &expiring).await.expect("before expiry");
    let wait =
        expiry.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(1100);
    tokio::time::sleep(wait).await;
    assert_err(
        list(&app, &expiring).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // The valid key still works after all that.
    list(&app, &Cred::ApiKey(good))
        .await
        .expect("the valid key");
}

// ---------------------------------------------------------------------------------------
// Public services
// ---------------------------------------------------------------------------------------

async fn health_and_reflection_need_no_credential(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "keyplane.v1.WorkspaceService"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let response = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|s| panic!("Health/Check({service:?}) without credential: {s:?}"))
                .into_inner();
            if response.status() == ServingStatus::Serving {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{service:?} never became SERVING: {response:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection without credential")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("a reflection answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(services)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "keyplane.v1.WorkspaceService"),
        "{names:?}"
    );
    // The API itself still needs one.
    assert_err(
        list(&app, &Cred::None).await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
}

// ---------------------------------------------------------------------------------------
// Messages never echo the credential
// ---------------------------------------------------------------------------------------

/// Asserts that no part of an error status (message, details, metadata) contains `secret`
/// or any of its longer pieces.
#[track_caller]
fn assert_not_echoed(status: &Status, secret: &str, what: &str) {
    let mut needles: Vec<&str> = vec![secret];
    needles.extend(secret.split(['.', '_']).filter(|piece| piece.len() >= 12));
    let details = String::from_utf8_lossy(status.details()).into_owned();
    let info_values: Vec<String> = status
        .get_details_error_info()
        .map(|i| i.metadata.into_values().collect())
        .unwrap_or_default();
    let headers = status.metadata().clone().into_headers();
    for needle in needles {
        assert!(
            !status.message().contains(needle),
            "{what}: the message echoes the credential: {:?}",
            status.message()
        );
        assert!(
            !details.contains(needle),
            "{what}: the details echo the credential"
        );
        assert!(
            info_values.iter().all(|v| !v.contains(needle)),
            "{what}: ErrorInfo metadata echoes the credential: {info_values:?}"
        );
        for (name, value) in &headers {
            assert!(
                !String::from_utf8_lossy(value.as_bytes()).contains(needle),
                "{what}: response metadata {name} echoes the credential"
            );
        }
    }
}

async fn errors_never_echo_the_credential(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let tenant = app.tenant;
    let other = Uuid::now_v7().to_string();

    let mut expired = claims(Some(tenant), &[WS_READ]);
    expired["exp"] = json!(unix_now() - 100);
    let mut premature = claims(Some(tenant), &[WS_READ]);
    premature["nbf"] = json!(unix_now() + 3600);
    let forged = sign(
        Algorithm::HS256,
        None,
        &claims(Some(tenant), &[WS_READ]),
        &EncodingKey::from_secret(b"another-secret-0123456789abcdefghijkl"),
    );
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(Some(tenant), &[WS_READ]).to_string().as_bytes())
    );
    let string_exp = hs256_payload(&format!(
        r#"{{"sub":"tester","exp":"{}","tenant_id":"{tenant}"}}"#,
        unix_now() + 600
    ));
    let bad_tenant_claim = hs256(&{
        let mut c = claims(None, &[WS_READ]);
        c["tenant_id"] = json!("acme-corp-tenant-identifier");
        c
    });
    let valid = token(Some(tenant), &[WS_READ]);
    let no_scope = token(Some(tenant), &[]);
    let garbage = "this-is-not-a-jwt-but-a-long-secret-looking-string".to_string();

    let token_cases: Vec<(&str, String, Request<pb::ListWorkspacesRequest>, Code)> = vec![
        (
            "expired",
            hs256(&expired),
            req(Default::default(), &bearer(hs256(&expired))),
            Code::Unauthenticated,
        ),
        (
            "premature",
            hs256(&premature),
            req(Default::default(), &bearer(hs256(&premature))),
            Code::Unauthenticated,
        ),
        (
            "forged",
            forged.clone(),
            req(Default::default(), &bearer(&forged)),
            Code::Unauthenticated,
        ),
        (
            "alg none",
            none.clone(),
            req(Default::default(), &bearer(&none)),
            Code::Unauthenticated,
        ),
        (
            "string exp",
            string_exp.clone(),
            req(Default::default(), &bearer(&string_exp)),
            Code::Unauthenticated,
        ),
        (
            "bad tenant claim",
            bad_tenant_claim.clone(),
            req(Default::default(), &bearer(&bad_tenant_claim)),
            Code::Unauthenticated,
        ),
        (
            "garbage",
            garbage.clone(),
            req(Default::default(), &bearer(&garbage)),
            Code::Unauthenticated,
        ),
        (
            "basic scheme",
            garbage.clone(),
            with_authorization(Default::default(), &format!("Basic {garbage}")),
            Code::Unauthenticated,
        ),
        (
            "tenant mismatch",
            valid.clone(),
            req_tenant(Default::default(), &bearer(&valid), &other),
            Code::PermissionDenied,
        ),
        (
            "missing scope",
            no_scope.clone(),
            req(Default::default(), &bearer(&no_scope)),
            Code::PermissionDenied,
        ),
    ];
    for (what, secret, request, code) in token_cases {
        let status = list_with(&app, request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert_not_echoed(&status, &secret, what);
    }

    // Admin keys.
    let (revoked, revoked_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    app.keys()
        .revoke_api_key(req(
            pb::RevokeApiKeyRequest { id: revoked.id },
            &app.admin(),
        ))
        .await
        .unwrap();
    let (_, reader_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let mut mistyped = reader_secret.clone();
    let last = mistyped.pop().unwrap();
    mistyped.push(if last == 'a' { 'b' } else { 'a' });
    let key_cases: Vec<(&str, String, Request<pb::ListWorkspacesRequest>)> = vec![
        (
            "revoked key",
            revoked_secret.clone(),
            req(Default::default(), &Cred::ApiKey(revoked_secret.clone())),
        ),
        (
            "mistyped key",
            mistyped.clone(),
            req(Default::default(), &Cred::ApiKey(mistyped.clone())),
        ),
        (
            "garbage key",
            garbage.clone(),
            req(Default::default(), &Cred::ApiKey(garbage.clone())),
        ),
        (
            "key with a foreign tenant",
            reader_secret.clone(),
            req_tenant(
                Default::default(),
                &Cred::ApiKey(reader_secret.clone()),
                &other,
            ),
        ),
    ];
    for (what, secret, request) in key_cases {
        let status = list_with(&app, request).await.expect_err(what);
        assert_not_echoed(&status, &secret, what);
    }
    let status = create(
        &app,
        req(
            pb::CreateWorkspaceRequest::default(),
            &Cred::ApiKey(reader_secret.clone()),
        ),
    )
    .await
    .expect_err("a read key cannot create");
    assert_eq!(reason(&status), "MISSING_SCOPE");
    assert_not_echoed(&status, &reader_secret, "key missing a scope");
    // Nor does a failed bearer check echo a key sent alongside (or vice versa).
    let status = verify_with(&app, &bearer(&forged), &reader_secret)
        .await
        .expect_err("forged token");
    assert_not_echoed(&status, &forged, "verify with a forged token");
    assert_not_echoed(&status, &reader_secret, "verify with a forged token");
}
