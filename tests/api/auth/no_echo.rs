//! Error statuses never echo the credential that failed.

use jsonwebtoken::{Algorithm, EncodingKey};
use keyplane::proto as pb;
use serde_json::json;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use super::*;

on_both_backends!(errors_never_echo_the_credential,);

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

    let token_cases: Vec<(&str, String, Client, Code)> = vec![
        (
            "expired",
            hs256(&expired),
            app.client(&bearer(hs256(&expired))),
            Code::Unauthenticated,
        ),
        (
            "premature",
            hs256(&premature),
            app.client(&bearer(hs256(&premature))),
            Code::Unauthenticated,
        ),
        (
            "forged",
            forged.clone(),
            app.client(&bearer(&forged)),
            Code::Unauthenticated,
        ),
        (
            "alg none",
            none.clone(),
            app.client(&bearer(&none)),
            Code::Unauthenticated,
        ),
        (
            "string exp",
            string_exp.clone(),
            app.client(&bearer(&string_exp)),
            Code::Unauthenticated,
        ),
        (
            "bad tenant claim",
            bad_tenant_claim.clone(),
            app.client(&bearer(&bad_tenant_claim)),
            Code::Unauthenticated,
        ),
        (
            "garbage",
            garbage.clone(),
            app.client(&bearer(&garbage)),
            Code::Unauthenticated,
        ),
        (
            "basic scheme",
            garbage.clone(),
            app.client(&Cred::Authorization(format!("Basic {garbage}"))),
            Code::Unauthenticated,
        ),
        (
            "tenant mismatch",
            valid.clone(),
            app.client(&bearer(&valid)).tenant(&other),
            Code::PermissionDenied,
        ),
        (
            "missing scope",
            no_scope.clone(),
            app.client(&bearer(&no_scope)),
            Code::PermissionDenied,
        ),
    ];
    for (what, secret, mut client, code) in token_cases {
        let status = client
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert_not_echoed(&status, &secret, what);
    }

    // Admin keys.
    let (revoked, revoked_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    app.revoke_key(&revoked.id).await;
    let (_, reader_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let mut mistyped = reader_secret.clone();
    let last = mistyped.pop().unwrap();
    mistyped.push(if last == 'a' { 'b' } else { 'a' });
    let key_cases: Vec<(&str, String, Client)> = vec![
        (
            "revoked key",
            revoked_secret.clone(),
            app.client(&Cred::ApiKey(revoked_secret.clone())),
        ),
        (
            "mistyped key",
            mistyped.clone(),
            app.client(&Cred::ApiKey(mistyped.clone())),
        ),
        (
            "garbage key",
            garbage.clone(),
            app.client(&Cred::ApiKey(garbage.clone())),
        ),
        (
            "key with a foreign tenant",
            reader_secret.clone(),
            app.client(&Cred::ApiKey(reader_secret.clone()))
                .tenant(&other),
        ),
    ];
    for (what, secret, mut client) in key_cases {
        let status = client
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .expect_err(what);
        assert_not_echoed(&status, &secret, what);
    }
    let status = app
        .client(&Cred::ApiKey(reader_secret.clone()))
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .resource()
        .expect_err("a read key cannot create");
    assert_eq!(reason(&status), "MISSING_SCOPE");
    assert_not_echoed(&status, &reader_secret, "key missing a scope");
    // Nor does a failed bearer check echo a key sent alongside (or vice versa).
    let status = app
        .client(&bearer(&forged))
        .try_verify(&reader_secret, &[])
        .await
        .expect_err("forged token");
    assert_not_echoed(&status, &forged, "verify with a forged token");
    assert_not_echoed(&status, &reader_secret, "verify with a forged token");
}
