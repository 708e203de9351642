//! Scopes that keys hold: deleting them, and where a workspace's scopes may be granted.
use keyplane::proto as pb;
use tonic::Code;
use tonic_types::StatusExt;

use super::*;

on_both_backends!(
    delete_refuses_scopes_in_use_unless_forced,
    workspace_scopes_are_grantable_only_in_their_workspace,
);

async fn delete_refuses_scopes_in_use_unless_forced(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let read = app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let (k1, s1) = app.create_key(&w.id, &["crm:read", "crm:write"]).await;
    let (k2, s2) = app.create_key(&w.id, &["crm:read"]).await;
    assert_eq!(k1.scopes, ["crm:read", "crm:write"]);
    assert_eq!(
        app.verify(&s1, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    let status = assert_err(
        app.as_admin()
            .scopes
            .delete_scope(pb::DeleteScopeRequest {
                id: read.id.clone(),
                force: false,
            })
            .await
            .inner()
            .map(|r| r.removed_grant_count),
        Code::FailedPrecondition,
        "SCOPE_IN_USE",
    );
    assert!(!status.message().is_empty());
    // Refused means untouched.
    assert_eq!(app.get_scope(&read.id).await.unwrap(), read);
    assert_eq!(app.get_key(&k1.id).await.expect("get key").etag, k1.etag);
    assert_eq!(
        app.verify(&s2, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    let removed = app
        .as_admin()
        .scopes
        .delete_scope(pb::DeleteScopeRequest {
            id: read.id.clone(),
            force: true,
        })
        .await
        .inner()
        .map(|r| r.removed_grant_count)
        .unwrap();
    assert_eq!(removed, 2, "two keys held the scope");
    assert_err(app.get_scope(&read.id).await, Code::NotFound, "NOT_FOUND");

    let k1_after = app.get_key(&k1.id).await.expect("get key");
    assert_eq!(k1_after.scopes, ["crm:write"], "the grant is gone");
    assert_ne!(k1_after.etag, k1.etag, "the key changed, so its etag did");
    let k2_after = app.get_key(&k2.id).await.expect("get key");
    assert!(k2_after.scopes.is_empty(), "{:?}", k2_after.scopes);
    assert_ne!(k2_after.etag, k2.etag);
    // The old etag of the key is stale now.
    let stale = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: k1.id.clone(),
                name: "renamed".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
            etag: k1.etag.clone(),
        })
        .await;
    assert_err(stale, Code::Aborted, "ETAG_MISMATCH");

    let verdict = app.verify(&s1, &["crm:read"]).await;
    assert_eq!(verdict.code(), pb::VerifyCode::InsufficientScopes);
    assert!(!verdict.valid);
    assert_eq!(verdict.missing_scopes, ["crm:read"]);
    assert_eq!(
        app.verify(&s1, &["crm:write"]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        app.verify(&s2, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Creating the scope again grants it to nobody.
    let reborn = app.create_scope("crm:read", "").await;
    assert_ne!(reborn.id, read.id);
    assert_eq!(
        app.verify(&s1, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );
    assert_eq!(
        app.get_key(&k1.id).await.expect("get key").scopes,
        ["crm:write"]
    );

    // An unused scope goes without force; with force it reports no grants.
    assert_eq!(
        app.as_admin()
            .scopes
            .delete_scope(pb::DeleteScopeRequest {
                id: reborn.id.clone(),
                force: false
            })
            .await
            .inner()
            .map(|r| r.removed_grant_count)
            .unwrap(),
        0
    );
    let unused = app.create_scope("unused:read", &w.id).await;
    assert_eq!(
        app.as_admin()
            .scopes
            .delete_scope(pb::DeleteScopeRequest {
                id: unused.id.clone(),
                force: true
            })
            .await
            .inner()
            .map(|r| r.removed_grant_count)
            .unwrap(),
        0
    );
    assert_err(
        app.as_admin()
            .scopes
            .delete_scope(pb::DeleteScopeRequest {
                id: read.id.clone(),
                force: true,
            })
            .await
            .inner()
            .map(|r| r.removed_grant_count),
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn workspace_scopes_are_grantable_only_in_their_workspace(backend: Backend) {
    let app = spawn_app(backend).await;
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;
    app.create_scope("local:read", &w1.id).await;
    app.create_scope("shared:read", "").await;

    let (k1, s1) = app.create_key(&w1.id, &["local:read", "shared:read"]).await;
    assert_eq!(k1.scopes, ["local:read", "shared:read"]);
    assert_eq!(
        app.verify(&s1, &["local:read", "shared:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    let status = assert_err(
        app.as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: w2.id.clone(),
                name: "k".into(),
                scopes: strings(&["shared:read", "local:read"]),
                ..Default::default()
            })
            .await
            .inner()
            .map(|r| r.api_key.unwrap()),
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert_eq!(violated_fields(&status), ["scopes"]);
    let info = status.get_details_error_info().unwrap();
    assert!(
        info.metadata.values().any(|v| v.contains("local:read"))
            && !info.metadata.values().any(|v| v.contains("shared:read")),
        "names the unknown scope only: {info:?}"
    );
    // A tenant-wide scope is fine there.
    let (k2, s2) = app.create_key(&w2.id, &["shared:read"]).await;
    assert_eq!(
        app.verify(&s2, &["local:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Nor can an update put it on a key of the other workspace.
    let added = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: k2.id.clone(),
                scopes: vec!["shared:read".into(), "local:read".into()],
                ..Default::default()
            }),
            update_mask: mask(&["scopes"]),
            etag: String::new(),
        })
        .await;
    assert_err(added, Code::InvalidArgument, "UNKNOWN_SCOPE");
    assert_eq!(
        app.get_key(&k2.id).await.expect("get key").scopes,
        ["shared:read"]
    );

    // A scope that exists nowhere is unknown everywhere.
    assert_err(
        app.as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: w1.id.clone(),
                name: "k".into(),
                scopes: strings(&["nowhere:read"]),
                ..Default::default()
            })
            .await
            .inner()
            .map(|r| r.api_key.unwrap()),
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );

    // Once w2 has its own scope of that name, its keys may hold it.
    app.create_scope("local:read", &w2.id).await;
    let k3 = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: w2.id.clone(),
            name: "k".into(),
            scopes: strings(&["local:read"]),
            ..Default::default()
        })
        .await
        .inner()
        .map(|r| r.api_key.unwrap())
        .unwrap();
    assert_eq!(k3.scopes, ["local:read"]);
}
