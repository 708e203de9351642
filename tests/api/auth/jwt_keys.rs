//! Apps configured with a PEM public key or a JWKS instead of an HS256 secret.

use jsonwebtoken::{Algorithm, EncodingKey};
use keyplane::proto as pb;
use serde_json::json;
use tonic::Code;
use uuid::Uuid;

use super::*;

on_both_backends!(
    ed25519_public_key_accepts_only_eddsa,
    ec_p256_public_key_accepts_only_es256,
    rsa_public_key_accepts_only_rs256,
    jwks_kid_selects_the_key,
);

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
    let made = app
        .client(&good)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .resource()
        .unwrap_or_else(|s| panic!("{alg:?} token on a {public} app: {s:?}"));
    assert_eq!(made.tenant_id, app.tenant.to_string());
    assert_eq!(made.owner_id, "tester");
    let seen = app
        .client(&good)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .unwrap();
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
            assert_token_invalid(
                app.client(&t)
                    .workspaces
                    .list_workspaces(pb::ListWorkspacesRequest::default())
                    .await
                    .inner(),
                &what,
            );
            assert_token_invalid(
                app.client(&t)
                    .workspaces
                    .get_workspace(pb::GetWorkspaceRequest {
                        id: made.id.clone(),
                    })
                    .await
                    .resource(),
                &what,
            );
        }
    }
    // Hand-built HS256 keyed with the PEM, for good measure (no jsonwebtoken on this side).
    let confused = raw_hs256(r#"{"alg":"HS256","typ":"JWT"}"#, &c.to_string(), &pem);
    assert_token_invalid(
        app.client(&bearer(confused))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
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
            app.client(&bearer(sign(other_alg, None, &c, &other_key)))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
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
    assert_token_invalid(
        app.client(&bearer(altered))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        "altered payload",
    );
    // Expiry still applies to asymmetric tokens.
    let mut expired = claims(Some(app.tenant), &[WS_READ]);
    expired["exp"] = json!(unix_now() - 10);
    assert_err(
        app.client(&bearer(sign(alg, None, &expired, &key)))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
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
    app.client(&good)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("kid test-ed");
    app.client(&good)
        .try_verify("kp_x", &[])
        .await
        .expect("kid test-ed");

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
        assert_token_invalid(
            app.client(&bearer(token))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            what,
        );
        assert_token_invalid(
            app.client(&bearer(token)).try_verify("kp_x", &[]).await,
            what,
        );
    }
}
