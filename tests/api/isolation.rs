//! Tenant isolation (SPEC §2.1): no RPC reads, lists, changes or reveals anything of
//! another tenant, and another tenant's resource is answered exactly like a missing one.
use keyplane::proto as pb;
use tonic::Code;
use uuid::Uuid;

use keyplane_testkit::*;

on_both_backends!(
    another_tenant_can_neither_see_nor_change_anything,
    another_tenant_lists_none_of_it_and_cannot_use_its_scopes,
    request_ids_are_per_tenant,
    an_admin_key_of_another_tenant_sees_nothing,
    a_platform_token_acts_for_the_tenant_it_names,
);

/// What tenant A (the app's admin) owns.
struct Owned {
    workspace: pb::Workspace,
    wide: pb::Scope,
    local: pb::Scope,
    key: pb::ApiKey,
    secret: String,
}

async fn setup(app: &TestApp) -> Owned {
    let workspace = app.create_workspace("tenant A").await;
    let wide = app.create_scope("crm:read", "").await;
    let local = app.create_scope("local:read", &workspace.id).await;
    let (key, secret) = app
        .create_key(&workspace.id, &["crm:read", "local:read"])
        .await;
    Owned {
        workspace,
        wide,
        local,
        key,
        secret,
    }
}

/// Asserts that everything of A is exactly as it was, and A's key still works.
async fn assert_unchanged(app: &TestApp, owned: &Owned) {
    let a = app.admin();
    let workspace = app
        .client(&a)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: owned.workspace.id.clone(),
        })
        .await
        .expect("A still has its workspace")
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(workspace, owned.workspace);
    for scope in [&owned.wide, &owned.local] {
        let got = app
            .client(&a)
            .scopes
            .get_scope(pb::GetScopeRequest {
                id: scope.id.clone(),
            })
            .await
            .expect("A still has its scope")
            .into_inner()
            .scope
            .unwrap();
        assert_eq!(&got, scope);
    }
    let key = app
        .client(&a)
        .keys
        .get_api_key(pb::GetApiKeyRequest {
            id: owned.key.id.clone(),
        })
        .await
        .expect("A still has its key")
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(key.etag, owned.key.etag);
    assert_eq!(key.name, owned.key.name);
    assert_eq!(key.scopes, owned.key.scopes);
    assert!(!key.disabled && key.revoke_time.is_none() && key.successor_id.is_empty());
    assert_eq!(key.expire_time, owned.key.expire_time);
    let keys = app
        .client(&a)
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert_eq!(
        keys.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        [owned.key.id.as_str()],
        "no key was added to A"
    );
    let scopes = app
        .client(&a)
        .scopes
        .list_scopes(pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .scopes;
    assert_eq!(scopes, [owned.wide.clone(), owned.local.clone()]);
    let verdict = app.verify(&owned.secret, &["crm:read", "local:read"]).await;
    assert_eq!(verdict.code(), pb::VerifyCode::Valid, "{verdict:?}");
}

async fn another_tenant_can_neither_see_nor_change_anything(backend: Backend) {
    let app = spawn_app(backend).await;
    let owned = setup(&app).await;
    let b = stranger();
    let ws = || owned.workspace.id.clone();

    // WorkspaceService.
    let r = app
        .client(&b)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest { id: ws() })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    for etag in [String::new(), owned.workspace.etag.clone()] {
        let r = app
            .client(&b)
            .workspaces
            .update_workspace(pb::UpdateWorkspaceRequest {
                workspace: Some(pb::Workspace {
                    id: ws(),
                    name: "hijacked".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                etag,
            })
            .await;
        assert_err(r, Code::NotFound, "NOT_FOUND");
    }
    for force in [false, true] {
        let r = app
            .client(&b)
            .workspaces
            .delete_workspace(pb::DeleteWorkspaceRequest { id: ws(), force })
            .await;
        assert_err(r, Code::NotFound, "NOT_FOUND");
    }

    // ScopeService.
    for scope in [&owned.wide, &owned.local] {
        let r = app
            .client(&b)
            .scopes
            .get_scope(pb::GetScopeRequest {
                id: scope.id.clone(),
            })
            .await;
        assert_err(r, Code::NotFound, "NOT_FOUND");
        for etag in [String::new(), scope.etag.clone()] {
            let r = app
                .client(&b)
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(pb::Scope {
                        id: scope.id.clone(),
                        name: "hijacked".into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["name"]),
                    etag,
                })
                .await;
            assert_err(r, Code::NotFound, "NOT_FOUND");
        }
        for force in [false, true] {
            let r = app
                .client(&b)
                .scopes
                .delete_scope(pb::DeleteScopeRequest {
                    id: scope.id.clone(),
                    force,
                })
                .await;
            assert_err(r, Code::NotFound, "NOT_FOUND");
        }
    }
    let r = app
        .client(&b)
        .scopes
        .create_scope(pb::CreateScopeRequest {
            workspace_id: ws(),
            representation: "sneaky:read".into(),
            ..Default::default()
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let r = app
        .client(&b)
        .scopes
        .list_scopes(pb::ListScopesRequest {
            workspace_id: ws(),
            ..Default::default()
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");

    // ApiKeyService.
    let key_id = || owned.key.id.clone();
    let r = app
        .client(&b)
        .keys
        .get_api_key(pb::GetApiKeyRequest { id: key_id() })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    for etag in [String::new(), owned.key.etag.clone()] {
        let r = app
            .client(&b)
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    id: key_id(),
                    disabled: true,
                    ..Default::default()
                }),
                update_mask: mask(&["disabled"]),
                etag,
            })
            .await;
        assert_err(r, Code::NotFound, "NOT_FOUND");
    }
    let r = app
        .client(&b)
        .keys
        .revoke_api_key(pb::RevokeApiKeyRequest { id: key_id() })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    for grace_period in [
        None,
        Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
    ] {
        let r = app
            .client(&b)
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: key_id(),
                grace_period,
            })
            .await;
        assert_err(r, Code::NotFound, "NOT_FOUND");
    }
    let r = app
        .client(&b)
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest { id: key_id() })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let r = app
        .client(&b)
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws(),
            name: "planted".into(),
            ..Default::default()
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let r = app
        .client(&b)
        .keys
        .list_api_keys(pb::ListApiKeysRequest {
            workspace_id: ws(),
            ..Default::default()
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");

    // Answered exactly like a resource that does not exist: same code, reason and details.
    let foreign = app
        .client(&b)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest { id: ws() })
        .await
        .unwrap_err();
    let missing = app
        .client(&b)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        foreign.message().replace(&ws(), "ID"),
        missing
            .message()
            .replace(&missing_id(&missing).unwrap_or_default(), "ID"),
        "no hint that the resource exists elsewhere"
    );
    assert!(
        !foreign.message().contains(&app.tenant.to_string()),
        "never names A's tenant: {foreign:?}"
    );

    // Verification: a key of another tenant is not found, and nothing of it is revealed.
    for required in [vec![], vec!["crm:read".to_string()]] {
        let verdict = app
            .client(&b)
            .keys
            .verify_api_key(pb::VerifyApiKeyRequest {
                key: owned.secret.clone(),
                required_scopes: required,
                cost: None,
                ..Default::default()
            })
            .await
            .expect("verification answers with a code")
            .into_inner();
        assert_eq!(verdict.code(), pb::VerifyCode::NotFound, "{verdict:?}");
        assert!(!verdict.valid);
        assert!(verdict.api_key.is_none(), "{verdict:?}");
        assert_eq!(verdict.tenant_id, "");
        assert_eq!(verdict.workspace_id, "");
        assert!(verdict.missing_scopes.is_empty());
    }

    assert_unchanged(&app, &owned).await;
}

/// The id named in a NOT_FOUND status's ErrorInfo metadata, if any.
fn missing_id(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|i| i.metadata.get("id").cloned())
}

async fn another_tenant_lists_none_of_it_and_cannot_use_its_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    let owned = setup(&app).await;
    let b = stranger();

    let workspaces = app
        .client(&b)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(workspaces.workspaces.is_empty(), "{workspaces:?}");
    let keys = app
        .client(&b)
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(keys.api_keys.is_empty(), "{keys:?}");
    let scopes = app
        .client(&b)
        .scopes
        .list_scopes(pb::ListScopesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        scopes.scopes.len(),
        BUILTINS,
        "the built-ins only: {scopes:?}"
    );
    assert!(scopes.scopes.iter().all(|s| s.builtin));
    let customs = app
        .client(&b)
        .scopes
        .list_scopes(pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(customs.scopes.is_empty(), "{customs:?}");

    // B's own workspace cannot hold A's scopes, tenant-wide or not.
    let theirs = app.client(&b).create_workspace("tenant B").await;
    for scope in ["crm:read", "local:read"] {
        let r = app
            .client(&b)
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: theirs.id.clone(),
                scopes: vec![scope.into()],
                ..Default::default()
            })
            .await;
        let status = assert_err(r, Code::InvalidArgument, "UNKNOWN_SCOPE");
        assert_eq!(violated_fields(&status), ["scopes"], "{scope}");
    }
    // B's workspace listing shows its own workspace only; its scope listing for it shows
    // the built-ins only.
    let in_theirs = app
        .client(&b)
        .scopes
        .list_scopes(pb::ListScopesRequest {
            workspace_id: theirs.id.clone(),
            exclude_builtin: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(in_theirs.scopes.is_empty(), "{in_theirs:?}");

    // The same scope string is free in B (an ALREADY_EXISTS would reveal A's scope), and
    // B's own scope then works for B only.
    let b_scope = app
        .client(&b)
        .scopes
        .create_scope(pb::CreateScopeRequest {
            representation: "crm:read".into(),
            ..Default::default()
        })
        .await
        .expect("B may create a scope string that A also has")
        .into_inner()
        .scope
        .unwrap();
    assert_ne!(b_scope.id, owned.wide.id);
    assert_ne!(b_scope.tenant_id, app.tenant.to_string());
    let b_key = app
        .client(&b)
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: theirs.id.clone(),
            scopes: vec!["crm:read".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b_key.api_key.unwrap().scopes, ["crm:read"]);
    // A cannot see B's key either.
    let verdict = app.verify(&b_key.secret, &[]).await;
    assert_eq!(verdict.code(), pb::VerifyCode::NotFound);
    assert!(verdict.api_key.is_none());

    // Deleting B's scope with force touches B's key only.
    let removed = app
        .client(&b)
        .scopes
        .delete_scope(pb::DeleteScopeRequest {
            id: b_scope.id,
            force: true,
        })
        .await
        .unwrap()
        .into_inner()
        .removed_grant_count;
    assert_eq!(removed, 1);

    assert_unchanged(&app, &owned).await;
}

async fn request_ids_are_per_tenant(backend: Backend) {
    let app = spawn_app(backend).await;
    let b = stranger();
    let request_id = Uuid::now_v7().to_string();

    let create_ws = |cred: Cred| {
        let mut client = app.client(&cred).workspaces;
        let request = pb::CreateWorkspaceRequest {
            name: "same request".into(),
            request_id: request_id.clone(),
            ..Default::default()
        };
        async move {
            client
                .create_workspace(request)
                .await
                .unwrap()
                .into_inner()
                .workspace
                .unwrap()
        }
    };
    let a_ws = create_ws(app.admin()).await;
    let b_ws = create_ws(b.clone()).await;
    assert_ne!(b_ws.id, a_ws.id, "B's request never returns A's workspace");
    assert_ne!(b_ws.tenant_id, a_ws.tenant_id);

    let create_scope = |cred: Cred| {
        let mut client = app.client(&cred).scopes;
        let request = pb::CreateScopeRequest {
            representation: "crm:read".into(),
            request_id: request_id.clone(),
            ..Default::default()
        };
        async move {
            client
                .create_scope(request)
                .await
                .unwrap()
                .into_inner()
                .scope
                .unwrap()
        }
    };
    let a_scope = create_scope(app.admin()).await;
    let b_scope = create_scope(b.clone()).await;
    assert_ne!(
        b_scope.id, a_scope.id,
        "B's request never returns A's scope"
    );
    assert_eq!(b_scope.tenant_id, b_ws.tenant_id);

    let create_key = |cred: Cred, workspace_id: String| {
        let mut client = app.client(&cred).keys;
        let request = pb::CreateApiKeyRequest {
            workspace_id,
            scopes: vec!["crm:read".into()],
            request_id: request_id.clone(),
            ..Default::default()
        };
        async move { client.create_api_key(request).await.unwrap().into_inner() }
    };
    let a_key = create_key(app.admin(), a_ws.id.clone()).await;
    let b_key = create_key(b.clone(), b_ws.id.clone()).await;
    let (a_key_msg, b_key_msg) = (a_key.api_key.unwrap(), b_key.api_key.unwrap());
    assert_ne!(
        b_key_msg.id, a_key_msg.id,
        "B's request never returns A's key"
    );
    assert!(
        !b_key.secret.is_empty(),
        "B's key is new, so it comes with its secret"
    );
    assert_eq!(b_key_msg.tenant_id, b_ws.tenant_id);
    // B retrying its own request gets its own key back (without the secret).
    let retry = create_key(b, b_ws.id.clone()).await;
    assert_eq!(retry.api_key.unwrap().id, b_key_msg.id);
    assert!(retry.secret.is_empty());
}

async fn an_admin_key_of_another_tenant_sees_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let owned = setup(&app).await;
    let b = stranger();
    // B's admin key: a keyplane key of tenant B holding every built-in scope.
    let b_ws = app
        .client(&b)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let admin_key = app
        .client(&b)
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: b_ws.id.clone(),
            scopes: all_builtin().iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let b_key = Cred::ApiKey(admin_key);

    let own = app
        .client(&b_key)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: b_ws.id.clone(),
        })
        .await
        .expect("the admin key works for its own tenant");
    assert_eq!(own.into_inner().workspace.unwrap().id, b_ws.id);

    let r = app
        .client(&b_key)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: owned.workspace.id.clone(),
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let r = app
        .client(&b_key)
        .scopes
        .get_scope(pb::GetScopeRequest {
            id: owned.wide.id.clone(),
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let r = app
        .client(&b_key)
        .keys
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: owned.key.id.clone(),
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let listed = app
        .client(&b_key)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .workspaces
            .iter()
            .map(|w| w.id.as_str())
            .collect::<Vec<_>>(),
        [b_ws.id.as_str()]
    );
    let verdict = app.client(&b_key).verify(&owned.secret, &[]).await;
    assert_eq!(verdict.code(), pb::VerifyCode::NotFound);
    assert!(verdict.api_key.is_none() && verdict.tenant_id.is_empty());

    // Naming A in x-tenant-id does not widen an admin key.
    let r = app
        .client(&b_key)
        .tenant(app.tenant.to_string())
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: owned.workspace.id.clone(),
        })
        .await;
    assert_err(r, Code::PermissionDenied, "TENANT_MISMATCH");

    assert_unchanged(&app, &owned).await;
}

async fn a_platform_token_acts_for_the_tenant_it_names(backend: Backend) {
    let app = spawn_app(backend).await;
    let owned = setup(&app).await;
    let platform = Cred::Bearer(token(None, &all_builtin()));
    let a = app.tenant.to_string();
    let b = Uuid::now_v7().to_string();
    let get_ws = || pb::GetWorkspaceRequest {
        id: owned.workspace.id.clone(),
    };

    let seen = app
        .client(&platform)
        .tenant(&a)
        .workspaces
        .get_workspace(get_ws())
        .await
        .expect("the platform token acts for A")
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(seen, owned.workspace);
    let key = app
        .client(&platform)
        .tenant(&a)
        .keys
        .get_api_key(pb::GetApiKeyRequest {
            id: owned.key.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert_eq!(key.id, owned.key.id);

    let r = app
        .client(&platform)
        .tenant(&b)
        .workspaces
        .get_workspace(get_ws())
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let r = app
        .client(&platform)
        .tenant(&b)
        .scopes
        .get_scope(pb::GetScopeRequest {
            id: owned.wide.id.clone(),
        })
        .await;
    assert_err(r, Code::NotFound, "NOT_FOUND");
    let listed = app
        .client(&platform)
        .tenant(&b)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.workspaces.is_empty());

    // Without x-tenant-id, a platform token has no tenant to act for.
    let r = app
        .client(&platform)
        .workspaces
        .get_workspace(get_ws())
        .await;
    assert_err(r, Code::InvalidArgument, "TENANT_ID_REQUIRED");
    let r = app
        .client(&platform)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await;
    assert_err(r, Code::InvalidArgument, "TENANT_ID_REQUIRED");
    let r = app
        .client(&platform)
        .scopes
        .create_scope(pb::CreateScopeRequest {
            representation: "x:y".into(),
            ..Default::default()
        })
        .await;
    assert_err(r, Code::InvalidArgument, "TENANT_ID_REQUIRED");

    // ... but it may verify any tenant's key.
    let verify = |client: Client, request: pb::VerifyApiKeyRequest| {
        let mut client = client.keys;
        async move {
            client
                .verify_api_key(request)
                .await
                .expect("verification answers with a code")
                .into_inner()
        }
    };
    let message = || pb::VerifyApiKeyRequest {
        key: owned.secret.clone(),
        required_scopes: vec!["crm:read".into()],
        cost: None,
        ..Default::default()
    };
    let any = verify(app.client(&platform), message()).await;
    assert_eq!(any.code(), pb::VerifyCode::Valid, "{any:?}");
    assert!(any.valid);
    assert_eq!(any.tenant_id, a);
    assert_eq!(any.workspace_id, owned.workspace.id);
    assert_eq!(any.api_key.unwrap().id, owned.key.id);
    let as_a = verify(app.client(&platform).tenant(&a), message()).await;
    assert_eq!(as_a.code(), pb::VerifyCode::Valid);
    let as_b = verify(app.client(&platform).tenant(&b), message()).await;
    assert_eq!(as_b.code(), pb::VerifyCode::NotFound);
    assert!(as_b.api_key.is_none() && as_b.tenant_id.is_empty() && as_b.workspace_id.is_empty());
}
