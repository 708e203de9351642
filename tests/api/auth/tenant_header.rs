//! `x-tenant-id` (§2.3): optional for tenant tokens and naming their own tenant, required
//! for platform tokens, which act for the tenant it names.

use keyplane::proto as pb;
use tonic::Code;
use uuid::Uuid;

use super::*;

on_both_backends!(
    tenant_token_and_tenant_header,
    platform_token_acts_for_the_named_tenant,
);

async fn tenant_token_and_tenant_header(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("mine").await;
    let cred = bearer(token(Some(app.tenant), &[WS_READ, WS_WRITE]));
    let own = app.tenant.to_string();
    let other = Uuid::now_v7().to_string();

    // Header optional, and accepted when it names the claim's tenant.
    assert_eq!(
        ids(&app
            .client(&cred)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        vec![ws.id.clone()]
    );
    assert_eq!(
        ids(&app
            .client(&cred)
            .tenant(&own)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        vec![ws.id.clone()]
    );

    // Another tenant: refused, on reads and writes alike, and nothing is created.
    assert_err(
        app.client(&cred)
            .tenant(&other)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    assert_err(
        app.client(&cred)
            .tenant(&other)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest { id: ws.id.clone() })
            .await,
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    assert_err(
        app.client(&cred)
            .tenant(&other)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .resource(),
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    let platform = bearer(token(None, &[WS_READ]));
    assert!(
        app.client(&platform)
            .tenant(&other)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces
            .is_empty()
    );

    // Not a UUID.
    for bad in ["acme", "", "12345", &format!("{own}x")] {
        refused(
            app.client(&cred)
                .tenant(bad)
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
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

    let made = app
        .client(&platform)
        .tenant(&tenant_a)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "for a".into(),
            ..Default::default()
        })
        .await
        .resource()
        .expect("a platform token with x-tenant-id creates");
    assert_eq!(made.tenant_id, tenant_a);
    assert_eq!(
        ids(&app
            .client(&platform)
            .tenant(&tenant_a)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        vec![made.id.clone()]
    );
    // The tenant itself sees it through a tenant token; tenant B does not.
    let a_token = bearer(token(Some(tenant_a.parse().unwrap()), &[WS_READ]));
    assert_eq!(
        ids(&app
            .client(&a_token)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        vec![made.id.clone()]
    );
    assert!(
        app.client(&platform)
            .tenant(&tenant_b)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces
            .is_empty()
    );
    assert_err(
        app.client(&platform)
            .tenant(&tenant_b)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest {
                id: made.id.clone(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // Without the header every tenant-scoped RPC is refused.
    assert_err(
        app.client(&platform)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        app.client(&platform)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest {
                id: made.id.clone(),
            })
            .await
            .resource(),
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        app.client(&platform)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .resource(),
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        app.client(&platform)
            .scopes
            .list_scopes(pb::ListScopesRequest::default())
            .await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    assert_err(
        app.client(&platform)
            .keys
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await,
        Code::InvalidArgument,
        "TENANT_ID_REQUIRED",
    );
    // A header that is not a UUID.
    assert_err(
        app.client(&platform)
            .tenant("tenant-a")
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::InvalidArgument,
        "TENANT_ID_INVALID",
    );
    // Nothing was created without a tenant.
    assert_eq!(
        ids(&app
            .client(&platform)
            .tenant(&tenant_a)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        vec![made.id.clone()]
    );

    // VerifyApiKey (§3.4): a platform token without x-tenant-id may verify any tenant's key.
    let ws = app.create_workspace("keys").await;
    let (_, secret) = app.create_key(&ws.id, &[]).await;
    let verifier = bearer(token(None, &[VERIFY]));
    let r = app.client(&verifier).verify(&secret, &[]).await;
    assert!(r.valid, "{r:?}");
    assert_eq!(r.tenant_id, app.tenant.to_string());
    // With another tenant named, the key is not that tenant's.
    let r = app
        .client(&verifier)
        .tenant(&tenant_b)
        .verify(&secret, &[])
        .await;
    assert!(!r.valid);
    assert_eq!(r.code(), pb::VerifyCode::NotFound);
}
