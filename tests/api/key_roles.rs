//! Keys holding roles (SPEC §3.9): a key holds its scopes and its roles'; a change to a role
//! reaches every holder's next verification (and its delegated children's); no escalation
//! through roles; a role keys hold is deleted only when forced, and leaves them.
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    a_key_holds_its_roles_scopes_as_they_are_now,
    roles_cannot_escalate_and_must_exist,
    a_forced_role_delete_leaves_its_holders,
    a_role_can_make_an_admin_key,
);

async fn create_role(app: &TestApp, workspace: &str, name: &str, scopes: &[&str]) -> pb::Role {
    app.as_admin()
        .roles
        .create_role(pb::CreateRoleRequest {
            workspace_id: workspace.into(),
            name: name.into(),
            scopes: strings(scopes),
            ..Default::default()
        })
        .await
        .expect("create role")
        .into_inner()
        .role
        .unwrap()
}

async fn set_role_scopes(app: &TestApp, id: &str, scopes: &[&str]) {
    app.as_admin()
        .roles
        .update_role(pb::UpdateRoleRequest {
            role: Some(pb::Role {
                id: id.into(),
                scopes: strings(scopes),
                ..Default::default()
            }),
            update_mask: mask(&["scopes"]),
            etag: String::new(),
        })
        .await
        .expect("update role");
}

async fn key_with_roles(
    app: &TestApp,
    workspace: &str,
    scopes: &[&str],
    roles: &[&str],
) -> Result<(pb::ApiKey, String), tonic::Status> {
    app.as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: workspace.into(),
            scopes: strings(scopes),
            roles: strings(roles),
            ..Default::default()
        })
        .await
        .inner()
        .map(|r| (r.api_key.unwrap(), r.secret))
}

/// Verifies twice (the first fills the cache), returning the second answer.
async fn cached(app: &TestApp, secret: &str, required: &[&str]) -> pb::VerifyApiKeyResponse {
    app.verify(secret, required).await;
    app.verify(secret, required).await
}

async fn a_key_holds_its_roles_scopes_as_they_are_now(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("support").await.id;
    for s in ["crm:read", "crm:write", "tickets:read"] {
        app.create_scope(s, &ws).await;
    }
    let role = create_role(&app, &ws, "support-agent", &["crm:read"]).await;
    let (key, secret) = key_with_roles(&app, &ws, &["tickets:read"], &["support-agent"])
        .await
        .unwrap();
    assert_eq!(key.roles, ["support-agent"]);
    assert_eq!(key.scopes, ["tickets:read"], "own scopes stay apart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = cached(&app, &secret, &["crm:read", "tickets:read"]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid, "{v:?}");
    assert_eq!(v.effective_scopes, strings(&["crm:read", "tickets:read"]));

    // A delegated child may take what the parent holds through its role.
    let (_, parent) = key_with_roles(
        &app,
        &ws,
        &["keyplane.api_keys:delegate"],
        &["support-agent"],
    )
    .await
    .unwrap();
    let child = app
        .client(&Cred::ApiKey(parent))
        .keys
        .delegate_api_key(pb::DelegateApiKeyRequest {
            scopes: strings(&["crm:read"]),
            ..Default::default()
        })
        .await
        .expect("delegate what a role grants")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cached(&app, &child.secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    // One write to the role: every holder's next answer, and the child's.
    set_role_scopes(&app, &role.id, &["crm:write"]).await;
    let v = app.verify(&secret, &["crm:read"]).await;
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes, "{v:?}");
    assert_eq!(v.effective_scopes, strings(&["crm:write", "tickets:read"]));
    assert_eq!(
        app.verify(&child.secret, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Roles are set through UpdateApiKey like any field.
    app.as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: key.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["roles"]),
            etag: String::new(),
        })
        .await
        .expect("clear roles");
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.effective_scopes, strings(&["tickets:read"]));
    assert!(app.get_key(&key.id).await.unwrap().roles.is_empty());
}

async fn roles_cannot_escalate_and_must_exist(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await.id;
    create_role(&app, &ws, "admin", &["keyplane.workspaces:write"]).await;
    assert_invalid(
        key_with_roles(&app, &ws, &[], &["nobody"]).await,
        &["roles"],
        "an unknown role",
    );
    assert_invalid(
        key_with_roles(&app, &ws, &[], &["Not A Name"]).await,
        &["roles"],
        "a malformed role name",
    );
    // A caller that may manage keys but not workspaces cannot hand out the admin role.
    let limited = app.client(&bearer(token(
        Some(app.tenant),
        &["keyplane.api_keys:write"],
    )));
    let result = limited
        .keys
        .clone()
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.clone(),
            roles: strings(&["admin"]),
            ..Default::default()
        })
        .await
        .inner();
    assert_err(result, Code::PermissionDenied, "SCOPE_ESCALATION");
    // Nor rotate a key holding it: the successor would hold the role too.
    let (admin_key, _) = key_with_roles(&app, &ws, &[], &["admin"]).await.unwrap();
    let rotated = limited
        .keys
        .clone()
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: admin_key.id,
            grace_period: None,
        })
        .await
        .inner();
    assert_err(rotated, Code::PermissionDenied, "SCOPE_ESCALATION");
    // A workspace role is not another workspace's.
    let other = app.create_workspace("other").await.id;
    create_role(&app, &ws, "local", &[]).await;
    assert_invalid(
        key_with_roles(&app, &other, &[], &["local"]).await,
        &["roles"],
        "another workspace's role",
    );
}

async fn a_forced_role_delete_leaves_its_holders(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await.id;
    app.create_scope("crm:read", &ws).await;
    let role = create_role(&app, &ws, "reader", &["crm:read"]).await;
    let (key, secret) = key_with_roles(&app, &ws, &[], &["reader"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        cached(&app, &secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    let delete = |force| {
        let mut roles = app.as_admin().roles;
        let id = role.id.clone();
        async move {
            roles
                .delete_role(pb::DeleteRoleRequest { id, force })
                .await
                .inner()
        }
    };
    assert_err(delete(false).await, Code::FailedPrecondition, "ROLE_IN_USE");
    assert_eq!(delete(true).await.unwrap().removed_holder_count, 1);
    assert_eq!(
        app.verify(&secret, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );
    assert!(app.get_key(&key.id).await.unwrap().roles.is_empty());
}

async fn a_role_can_make_an_admin_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await.id;
    let role = create_role(&app, &ws, "auditor", &["keyplane.workspaces:read"]).await;
    let (_, secret) = key_with_roles(&app, &ws, &[], &["auditor"]).await.unwrap();
    let admin = app.client(&Cred::ApiKey(secret));
    let list = || {
        let mut workspaces = admin.workspaces.clone();
        async move {
            workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner()
        }
    };
    assert!(list().await.is_ok());
    set_role_scopes(&app, &role.id, &[]).await;
    assert_err(list().await, Code::PermissionDenied, "MISSING_SCOPE");
}
