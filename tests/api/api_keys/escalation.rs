//! The no-escalation rule of SPEC §2.4 on create, update and rotate.

use keyplane::proto as pb;
use tonic::Code;

use super::new_key;
use keyplane_testkit::*;

on_both_backends!(no_escalation_through_keys,);

async fn no_escalation_through_keys(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let limited = Cred::Bearer(token(
        Some(app.tenant),
        &["keyplane.api_keys:write", "keyplane.api_keys:read"],
    ));
    let with_scopes = |scopes: &[&str]| pb::CreateApiKeyRequest {
        scopes: strings(scopes),
        ..new_key(&w.id)
    };

    // Create: only built-in scopes the caller holds.
    let status = assert_err(
        app.client(&limited)
            .keys
            .create_api_key(with_scopes(&["keyplane.workspaces:write"]))
            .await
            .inner(),
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert!(
        reason_metadata(&status, "scopes").contains("keyplane.workspaces:write"),
        "{status:?}"
    );
    assert_err(
        app.client(&limited)
            .keys
            .create_api_key(with_scopes(&[
                "keyplane.api_keys:read",
                "keyplane.api_keys:verify",
            ]))
            .await
            .inner(),
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    let ordinary = app
        .client(&limited)
        .keys
        .create_api_key(with_scopes(&["keyplane.api_keys:read", "crm:read"]))
        .await
        .inner()
        .expect("a held built-in scope and custom scopes may be granted");
    let ordinary_key = ordinary.api_key.unwrap();
    // A wildcard over built-in scopes is never a way around the rule.
    let status = app
        .client(&limited)
        .keys
        .create_api_key(with_scopes(&["keyplane.api_keys:*"]))
        .await
        .inner()
        .expect_err("keyplane.api_keys:* would be stronger than the caller");
    assert!(
        matches!(
            status.code(),
            Code::PermissionDenied | Code::InvalidArgument
        ),
        "{status:?}"
    );
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(listed.api_keys.len(), 1, "refused requests created nothing");

    // Update: adding a built-in scope the caller lacks.
    let escalate = pb::ApiKey {
        id: ordinary_key.id.clone(),
        scopes: strings(&["keyplane.api_keys:read", "keyplane.scopes:write"]),
        ..Default::default()
    };
    assert_err(
        app.client(&limited)
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(escalate),
                update_mask: mask(&["scopes"]),
                etag: "".into(),
            })
            .await
            .resource(),
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert_eq!(
        app.get_key(&ordinary_key.id).await.unwrap().scopes,
        ordinary_key.scopes,
        "the refused update changed nothing"
    );
    // ... while other fields of such a key may still be updated.
    let rename = pb::ApiKey {
        id: ordinary_key.id.clone(),
        name: "renamed".into(),
        ..Default::default()
    };
    app.client(&limited)
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(rename),
            update_mask: mask(&["name"]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();

    // Rotate: a key holding a built-in scope the caller lacks (issued by the full admin).
    let (strong, strong_secret) = app.create_key(&w.id, &["keyplane.workspaces:read"]).await;
    assert_err(
        app.client(&limited)
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: strong.id.clone(),
                grace_period: None,
            })
            .await
            .inner(),
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert!(
        app.get_key(&strong.id)
            .await
            .unwrap()
            .successor_id
            .is_empty()
    );
    assert_eq!(
        app.verify(&strong_secret, &[]).await.code(),
        pb::VerifyCode::Valid,
        "the refused rotation did not revoke the key"
    );
    // A key with scopes the caller holds can be rotated by it.
    app.client(&limited)
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: ordinary_key.id.clone(),
            grace_period: None,
        })
        .await
        .inner()
        .unwrap();

    // An admin key with `keyplane.api_keys:write` alone cannot mint a stronger key.
    let (_, admin_secret) = app.create_key(&w.id, &["keyplane.api_keys:write"]).await;
    let admin_key = Cred::ApiKey(admin_secret);
    assert_err(
        app.client(&admin_key)
            .keys
            .create_api_key(with_scopes(&["keyplane.api_keys:verify"]))
            .await
            .inner(),
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert_err(
        app.client(&admin_key)
            .keys
            .create_api_key(with_scopes(&["keyplane.api_keys:read"]))
            .await
            .inner(),
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    let same = app
        .client(&admin_key)
        .keys
        .create_api_key(with_scopes(&["keyplane.api_keys:write", "crm:read"]))
        .await
        .inner()
        .expect("an admin key may grant what it holds");
    assert_secret_shape(&same.secret, "kp");
}
