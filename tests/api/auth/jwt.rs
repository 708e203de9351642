//! Bearer tokens that fail (§2.5): missing, forged, malformed, oversized, expired or
//! premature, `alg: none` and algorithms the app is not configured for.

use jsonwebtoken::{Algorithm, EncodingKey};
use keyplane::proto as pb;
use serde_json::{Value, json};
use tonic::Code;
use uuid::Uuid;

use super::*;

on_both_backends!(
    no_credential_is_credentials_missing,
    forged_and_malformed_tokens_are_token_invalid,
    authorization_scheme_must_be_bearer,
    tokens_longer_than_8_kib_are_refused,
    expired_and_premature_tokens,
    alg_none_is_rejected_in_every_spelling,
    token_alg_never_widens_the_configured_algorithms,
);

async fn no_credential_is_credentials_missing(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;

    assert_err(
        app.client(&Cred::None)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    assert_err(
        app.client(&Cred::None)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest { id: ws.id.clone() })
            .await
            .resource(),
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    assert_err(
        app.client(&Cred::None).try_verify("kp_whatever", &[]).await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    assert_err(
        app.client(&Cred::None)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .resource(),
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    // A tenant header is not a credential.
    assert_err(
        app.client(&Cred::None)
            .tenant(app.tenant.to_string())
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
    // Nothing was created by the refused CreateWorkspace.
    let seen = app
        .as_admin()
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(ids(&seen.workspaces), vec![ws.id]);
}

async fn forged_and_malformed_tokens_are_token_invalid(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = hs256(&claims(Some(app.tenant), &[WS_READ, VERIFY]));
    app.client(&bearer(&good))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
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
            app.client(&Cred::Authorization(value.trim_end().to_string()))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            what,
        );
    }
    // The same refusals on GetWorkspace and VerifyApiKey.
    for (what, token) in cases.iter().take(6) {
        assert_token_invalid(
            app.client(&bearer(token))
                .workspaces
                .get_workspace(pb::GetWorkspaceRequest {
                    id: Uuid::now_v7().to_string(),
                })
                .await
                .resource(),
            what,
        );
        assert_token_invalid(
            app.client(&bearer(token)).try_verify("kp_x", &[]).await,
            what,
        );
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
            app.client(&Cred::Authorization(value.clone()))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            &value[..value.len().min(20)],
        );
    }
    // RFC 7235: the scheme name is case-insensitive.
    app.client(&Cred::Authorization(format!("bearer {good}")))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
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

    app.client(&bearer(&at_limit))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("a valid token of at most 8 KiB is accepted");
    assert_err(
        app.client(&bearer(&over))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "TOKEN_INVALID",
    );
    let mut c = claims(Some(app.tenant), &[WS_READ]);
    c["pad"] = json!("y".repeat(11_000));
    assert_err(
        app.client(&bearer(hs256(&c)))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
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
            app.client(&expired)
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        );
        assert_err(
            app.client(&expired).try_verify("kp_x", &[]).await,
            Code::Unauthenticated,
            "TOKEN_EXPIRED",
        );
    }
    for nbf in [now + 30, now + 86_400] {
        let premature = bearer(with(json!({"nbf": nbf})));
        assert_err(
            app.client(&premature)
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        );
        assert_err(
            app.client(&premature)
                .workspaces
                .get_workspace(pb::GetWorkspaceRequest {
                    id: Uuid::now_v7().to_string(),
                })
                .await
                .resource(),
            Code::Unauthenticated,
            "TOKEN_NOT_YET_VALID",
        );
    }
    // An nbf in the past is fine.
    app.client(&bearer(with(json!({"nbf": now - 10}))))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
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
                assert_token_invalid(
                    app.client(&bearer(&token))
                        .workspaces
                        .list_workspaces(pb::ListWorkspacesRequest::default())
                        .await
                        .inner(),
                    &header,
                );
            }
        }
    }
    // A header with no alg at all, and one with an alg of the wrong type.
    for header in [r#"{"typ":"JWT"}"#, r#"{"alg":null}"#, r#"{"alg":256}"#] {
        assert_token_invalid(
            app.client(&bearer(raw_hs256(header, &payload, JWT_SECRET.as_bytes())))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            header,
        );
    }
}

async fn token_alg_never_widens_the_configured_algorithms(backend: Backend) {
    // The test app is configured with an HS256 secret only.
    let app = spawn_app(backend).await;
    let c = claims(Some(app.tenant), &[WS_READ]);
    let secret = EncodingKey::from_secret(JWT_SECRET.as_bytes());
    app.client(&bearer(sign(Algorithm::HS256, None, &c, &secret)))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("HS256 is configured");
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        assert_token_invalid(
            app.client(&bearer(sign(alg, None, &c, &secret)))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            &format!("{alg:?} with the right secret"),
        );
    }
    for (alg, key) in [
        (Algorithm::RS256, rsa_key()),
        (Algorithm::ES256, ec_key()),
        (Algorithm::EdDSA, ed_key()),
    ] {
        let t = bearer(sign(alg, None, &c, &key));
        assert_token_invalid(
            app.client(&t)
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            &format!("{alg:?} on an HS256 app"),
        );
        assert_token_invalid(
            app.client(&t)
                .workspaces
                .get_workspace(pb::GetWorkspaceRequest {
                    id: Uuid::now_v7().to_string(),
                })
                .await
                .resource(),
            &format!("{alg:?} on an HS256 app"),
        );
    }
}
