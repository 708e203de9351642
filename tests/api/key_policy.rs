//! A workspace's key lifetime policy (SPEC §3.3.2, `maxKeyTtl`): keys created, rotated and
//! delegated in it expire within it.
use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(keys_live_no_longer_than_their_workspace_allows);

fn expiry_in(key: &pb::ApiKey) -> i64 {
    key.expire_time.as_ref().expect("an expiry").seconds - unix_now()
}

async fn keys_live_no_longer_than_their_workspace_allows(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.as_admin();
    let ws = admin
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "short-lived".into(),
            max_key_ttl: seconds(3600),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(ws.max_key_ttl, seconds(3600));
    let create = |expire_time| pb::CreateApiKeyRequest {
        workspace_id: ws.id.clone(),
        scopes: strings(&["keyplane.api_keys:delegate"]),
        expire_time,
        ..Default::default()
    };
    // No expiry asked: the policy's.
    let key = admin
        .keys
        .create_api_key(create(None))
        .await
        .unwrap()
        .into_inner();
    let (key, secret) = (key.api_key.unwrap(), key.secret);
    assert!((3590..=3600).contains(&expiry_in(&key)), "{key:?}");
    // Within it: as asked; beyond it: refused, naming the field.
    let within = admin
        .keys
        .create_api_key(create(Some(in_secs(600))))
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!((590..=600).contains(&expiry_in(&within)));
    assert_invalid(
        admin
            .keys
            .create_api_key(create(Some(in_secs(7200))))
            .await
            .inner(),
        &["expire_time"],
        "beyond max_key_ttl",
    );
    // Delegation: the policy is a ceiling under the server's.
    let refused = app
        .client(&Cred::ApiKey(secret))
        .keys
        .delegate_api_key(pb::DelegateApiKeyRequest {
            ttl: seconds(3 * 3600),
            ..Default::default()
        })
        .await
        .inner();
    assert_err(refused, Code::PermissionDenied, "DELEGATION_EXCEEDS_PARENT");

    // A policy set later holds for rotations: the successor of a key without expiry gets one.
    let open = app.create_workspace("open").await;
    let (forever, _) = app.create_key(&open.id, &[]).await;
    assert!(forever.expire_time.is_none());
    admin
        .workspaces
        .update_workspace(pb::UpdateWorkspaceRequest {
            workspace: Some(pb::Workspace {
                id: open.id.clone(),
                max_key_ttl: seconds(86_400),
                ..Default::default()
            }),
            update_mask: mask(&["max_key_ttl"]),
            etag: String::new(),
        })
        .await
        .expect("set the policy");
    let successor = admin
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: forever.id,
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner()
        .api_key
        .unwrap();
    assert!((86_390..=86_400).contains(&expiry_in(&successor)));
    // Named in the mask without a value: no limit any more.
    let cleared = admin
        .workspaces
        .update_workspace(pb::UpdateWorkspaceRequest {
            workspace: Some(pb::Workspace {
                id: open.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["max_key_ttl"]),
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert!(cleared.max_key_ttl.is_none());
    assert_invalid(
        admin
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest {
                max_key_ttl: seconds(30),
                ..Default::default()
            })
            .await
            .inner(),
        &["max_key_ttl"],
        "under a minute",
    );
}
