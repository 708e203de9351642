//! Admin API keys (§2.2): they act for their tenant with their scopes, and every way a key
//! can be invalid is API_KEY_INVALID.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyplane::proto as pb;
use prost_types::Timestamp;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use super::*;

on_both_backends!(
    admin_key_acts_for_its_tenant_with_its_scopes,
    invalid_admin_keys_are_api_key_invalid,
);

async fn admin_key_acts_for_its_tenant_with_its_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws1 = app.create_workspace("one").await;
    let ws2 = app.create_workspace("two").await;
    let other_tenant = Uuid::now_v7().to_string();
    let platform = bearer(token(None, &all_builtin()));
    let foreign = app
        .client(&platform)
        .tenant(&other_tenant)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .resource()
        .unwrap();

    let (key, secret) = app.create_key(&ws1.id, &[WS_READ]).await;
    let cred = Cred::ApiKey(secret.clone());

    let seen = app
        .client(&cred)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("an admin key lists");
    let mut expected = vec![ws1.id.clone(), ws2.id.clone()];
    expected.sort();
    assert_eq!(ids(&seen.workspaces), expected);
    assert!(
        seen.workspaces
            .iter()
            .all(|w| w.tenant_id == app.tenant.to_string())
    );
    assert_eq!(
        app.client(&cred)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest { id: ws2.id.clone() })
            .await
            .resource()
            .unwrap()
            .id,
        ws2.id
    );
    assert_err(
        app.client(&cred)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest {
                id: foreign.id.clone(),
            })
            .await
            .resource(),
        Code::NotFound,
        "NOT_FOUND",
    );

    // Its scopes only.
    let status = assert_err(
        app.client(&cred)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .resource(),
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        WS_WRITE
    );
    let status = assert_err(
        app.client(&cred).try_verify(&secret, &[]).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        VERIFY
    );

    // x-tenant-id: optional, must name the key's tenant.
    assert_eq!(
        ids(&app
            .client(&cred)
            .tenant(app.tenant.to_string())
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        expected
    );
    assert_err(
        app.client(&cred)
            .tenant(&other_tenant)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    assert_err(
        app.client(&cred)
            .tenant("not-a-uuid")
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::InvalidArgument,
        "TENANT_ID_INVALID",
    );

    // A write key creates in its own tenant, owned by the key.
    let (writer_key, writer_secret) = app.create_key(&ws1.id, &[WS_WRITE, WS_READ]).await;
    let made = app
        .client(&Cred::ApiKey(writer_secret))
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .resource()
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
    app.client(&Cred::ApiKey(good.clone()))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
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
            app.client(&Cred::ApiKey(key))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            Code::Unauthenticated,
            "API_KEY_INVALID",
            what,
        );
    }

    // Unknown: well formed, but deleted.
    let (gone, gone_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let gone_cred = Cred::ApiKey(gone_secret);
    app.client(&gone_cred)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("before delete");
    app.as_admin()
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest { id: gone.id })
        .await
        .unwrap();
    assert_err(
        app.client(&gone_cred)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // Revoked.
    let (revoked, revoked_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let revoked_cred = Cred::ApiKey(revoked_secret);
    app.client(&revoked_cred)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("before revoke");
    app.revoke_key(&revoked.id).await;
    assert_err(
        app.client(&revoked_cred)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    assert_err(
        app.client(&revoked_cred)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest { id: ws.id.clone() })
            .await
            .resource(),
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // Rotated without grace: the old secret is dead, the new one works.
    let (rotated, rotated_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    app.client(&Cred::ApiKey(rotated_secret.clone()))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("before rotate");
    let successor = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: rotated.id,
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_err(
        app.client(&Cred::ApiKey(rotated_secret))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    app.client(&Cred::ApiKey(successor.secret))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("the successor works");

    // Disabled, and enabled again.
    let (disabled, disabled_secret) = app.create_key(&ws.id, &[WS_READ]).await;
    let disabled_cred = Cred::ApiKey(disabled_secret);
    app.client(&disabled_cred)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("before disable");
    let set_disabled = |flag: bool| pb::UpdateApiKeyRequest {
        api_key: Some(pb::ApiKey {
            id: disabled.id.clone(),
            disabled: flag,
            ..Default::default()
        }),
        update_mask: mask(&["disabled"]),
        etag: String::new(),
    };
    app.as_admin()
        .keys
        .update_api_key(set_disabled(true))
        .await
        .unwrap();
    assert_err(
        app.client(&disabled_cred)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
    app.as_admin()
        .keys
        .update_api_key(set_disabled(false))
        .await
        .unwrap();
    app.client(&disabled_cred)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("enabled again");

    // Expired.
    let expiry = SystemTime::now() + Duration::from_secs(2);
    let since_epoch = expiry.duration_since(UNIX_EPOCH).unwrap();
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.id.clone(),
            scopes: vec![WS_READ.into()],
            expire_time: Some(Timestamp {
                seconds: since_epoch.as_secs() as i64,
                nanos: since_epoch.subsec_nanos() as i32,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let expiring = Cred::ApiKey(created.secret);
    app.client(&expiring)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("before expiry");
    let wait =
        expiry.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(1100);
    tokio::time::sleep(wait).await;
    assert_err(
        app.client(&expiring)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );

    // The valid key still works after all that.
    app.client(&Cred::ApiKey(good))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("the valid key");
}
