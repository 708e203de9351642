//! IP allow-lists (SPEC §3.3 `allowedCidrs`, §3.3.2 `defaultAllowedCidrs`, §3.4
//! `clientIp` and IP_NOT_ALLOWED, §3.5 `attributes.source.address`, §3.8 narrowing).
use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    keys_are_used_only_from_their_networks,
    malformed_networks_name_the_entry,
    workspaces_give_new_keys_their_default,
    changes_to_a_list_are_seen_at_once,
    delegated_keys_stay_within_their_parents_networks,
    admin_keys_are_refused_from_elsewhere,
    envoy_checks_use_the_address_envoy_reports
);

async fn verify_from(
    app: &TestApp,
    secret: &str,
    client_ip: &str,
) -> Result<pb::VerifyApiKeyResponse, tonic::Status> {
    app.as_admin()
        .keys
        .verify_api_key(pb::VerifyApiKeyRequest {
            key: secret.into(),
            client_ip: client_ip.into(),
            ..Default::default()
        })
        .await
        .inner()
}

async fn code_from(app: &TestApp, secret: &str, client_ip: &str) -> pb::VerifyCode {
    verify_from(app, secret, client_ip)
        .await
        .expect("verify")
        .code()
}

async fn key_with(
    app: &TestApp,
    workspace_id: &str,
    cidrs: &[&str],
) -> Result<(pb::ApiKey, String), tonic::Status> {
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: workspace_id.into(),
            scopes: strings(&["keyplane.api_keys:delegate"]),
            allowed_cidrs: strings(cidrs),
            ..Default::default()
        })
        .await
        .inner()?;
    Ok((created.api_key.unwrap(), created.secret))
}

/// `UpdateApiKey` of the key's `allowed_cidrs` alone.
async fn set_allowed_cidrs(
    app: &TestApp,
    id: &str,
    cidrs: &[&str],
) -> Result<pb::ApiKey, tonic::Status> {
    app.as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: id.into(),
                allowed_cidrs: strings(cidrs),
                ..Default::default()
            }),
            update_mask: mask(&["allowed_cidrs"]),
            etag: String::new(),
        })
        .await
        .resource()
}

async fn keys_are_used_only_from_their_networks(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("allow-lists").await;
    let (key, secret) = key_with(&app, &ws.id, &["2001:db8::/32", "10.0.0.0/8", "192.0.2.7"])
        .await
        .unwrap();
    // Sorted, IPv4 first; a one-host network reads as its address.
    assert_eq!(
        key.allowed_cidrs,
        ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
    );
    for inside in [
        "10.1.2.3",
        "192.0.2.7",
        "2001:db8:1::9",
        "::ffff:10.200.0.1",
    ] {
        assert_eq!(
            code_from(&app, &secret, inside).await,
            pb::VerifyCode::Valid,
            "{inside}"
        );
    }
    for outside in ["11.0.0.1", "192.0.2.8", "2001:db9::1", "::ffff:11.0.0.1"] {
        let v = verify_from(&app, &secret, outside).await.unwrap();
        assert_eq!(v.code(), pb::VerifyCode::IpNotAllowed, "{outside}");
        assert!(!v.valid);
        assert_eq!(
            v.api_key.unwrap().id,
            key.id,
            "the key is found, then refused"
        );
    }
    // No address given: a key with an allow-list cannot be placed, so it is refused.
    assert_eq!(
        code_from(&app, &secret, "").await,
        pb::VerifyCode::IpNotAllowed
    );
    // The address is checked before the scopes: a wrong address is not told what it lacks.
    let far = app
        .as_admin()
        .keys
        .verify_api_key(pb::VerifyApiKeyRequest {
            key: secret.clone(),
            required_scopes: strings(&["crm:read"]),
            client_ip: "11.0.0.1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(far.code(), pb::VerifyCode::IpNotAllowed);
    assert!(far.missing_scopes.is_empty());
    assert_invalid(
        verify_from(&app, &secret, "10.0.0.1:443").await,
        &["client_ip"],
        "an address with a port",
    );
    // A key without a list is used from anywhere, with or without an address.
    let (_, open) = app.create_key(&ws.id, &[]).await;
    assert_eq!(code_from(&app, &open, "").await, pb::VerifyCode::Valid);
    assert_eq!(
        code_from(&app, &open, "198.51.100.1").await,
        pb::VerifyCode::Valid
    );
    // Rotation keeps the list.
    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: key.id.clone(),
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rotated.api_key.unwrap().allowed_cidrs, key.allowed_cidrs);
    assert_eq!(
        code_from(&app, &rotated.secret, "11.0.0.1").await,
        pb::VerifyCode::IpNotAllowed
    );
}

async fn malformed_networks_name_the_entry(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("typos").await;
    assert_invalid(
        key_with(
            &app,
            &ws.id,
            &["10.0.0.0/8", "10.0.0.0/33", "example.com", "10.1.2.3/8"],
        )
        .await,
        &["allowed_cidrs[1]", "allowed_cidrs[2]", "allowed_cidrs[3]"],
        "malformed entries",
    );
    let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_invalid(
        key_with(&app, &ws.id, &many).await,
        &["allowed_cidrs"],
        "65 entries",
    );
    assert!(
        key_with(&app, &ws.id, &many[..64]).await.is_ok(),
        "64 is the most"
    );
    assert_invalid(
        app.as_admin()
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest {
                default_allowed_cidrs: strings(&["::/129"]),
                ..Default::default()
            })
            .await
            .inner(),
        &["default_allowed_cidrs[0]"],
        "a workspace default",
    );
}

async fn workspaces_give_new_keys_their_default(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app
        .as_admin()
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "office".into(),
            default_allowed_cidrs: strings(&["203.0.113.0/24"]),
            ..Default::default()
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(ws.default_allowed_cidrs, ["203.0.113.0/24"]);
    let (key, secret) = app.create_key(&ws.id, &[]).await;
    assert_eq!(key.allowed_cidrs, ["203.0.113.0/24"]);
    assert_eq!(
        code_from(&app, &secret, "203.0.113.9").await,
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code_from(&app, &secret, "198.51.100.1").await,
        pb::VerifyCode::IpNotAllowed
    );
    // A key may say otherwise: its own list, or every address.
    let (own, _) = key_with(&app, &ws.id, &["198.51.100.0/24"]).await.unwrap();
    assert_eq!(own.allowed_cidrs, ["198.51.100.0/24"]);
    let (_, anywhere) = key_with(&app, &ws.id, &["0.0.0.0/0", "::/0"])
        .await
        .unwrap();
    assert_eq!(
        code_from(&app, &anywhere, "2001:db8::1").await,
        pb::VerifyCode::Valid
    );
    // Changing the default leaves existing keys as they are.
    let updated = app
        .as_admin()
        .workspaces
        .update_workspace(pb::UpdateWorkspaceRequest {
            workspace: Some(pb::Workspace {
                id: ws.id.clone(),
                default_allowed_cidrs: Vec::new(),
                ..Default::default()
            }),
            update_mask: mask(&["default_allowed_cidrs"]),
            etag: String::new(),
        })
        .await
        .resource()
        .unwrap();
    assert!(updated.default_allowed_cidrs.is_empty());
    assert_eq!(
        app.get_key(&key.id).await.unwrap().allowed_cidrs,
        key.allowed_cidrs
    );
    let (later, _) = app.create_key(&ws.id, &[]).await;
    assert!(later.allowed_cidrs.is_empty());
}

async fn changes_to_a_list_are_seen_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("moves").await;
    let (key, secret) = app.create_key(&ws.id, &[]).await;
    // Cached as open.
    assert_eq!(
        code_from(&app, &secret, "198.51.100.1").await,
        pb::VerifyCode::Valid
    );
    let updated = set_allowed_cidrs(&app, &key.id, &["10.0.0.0/8"])
        .await
        .unwrap();
    assert_eq!(updated.allowed_cidrs, ["10.0.0.0/8"]);
    assert_eq!(
        code_from(&app, &secret, "198.51.100.1").await,
        pb::VerifyCode::IpNotAllowed,
        "the update evicted the cached answer"
    );
    // Named but empty: from anywhere again.
    set_allowed_cidrs(&app, &key.id, &[]).await.unwrap();
    assert_eq!(
        code_from(&app, &secret, "198.51.100.1").await,
        pb::VerifyCode::Valid
    );
    assert_invalid(
        set_allowed_cidrs(&app, &key.id, &["300.0.0.1"]).await,
        &["api_key.allowed_cidrs[0]"],
        "a malformed update",
    );
}

async fn delegated_keys_stay_within_their_parents_networks(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("agents").await;
    // The parent is the credential of DelegateApiKey, called from loopback.
    let (parent, secret) = key_with(&app, &ws.id, &["10.0.0.0/8", "127.0.0.0/8"])
        .await
        .unwrap();
    let delegate = |cidrs: &[&str]| {
        let request = pb::DelegateApiKeyRequest {
            allowed_cidrs: strings(cidrs),
            ..Default::default()
        };
        let client = app.client(&Cred::ApiKey(secret.clone()));
        async move { client.keys.clone().delegate_api_key(request).await.inner() }
    };
    let inherited = delegate(&[]).await.unwrap();
    assert_eq!(
        inherited.api_key.unwrap().allowed_cidrs,
        parent.allowed_cidrs,
        "unasked: the parent's list"
    );
    let narrower = delegate(&["10.1.0.0/16"]).await.unwrap();
    assert_eq!(
        code_from(&app, &narrower.secret, "10.1.0.1").await,
        pb::VerifyCode::Valid
    );
    assert_eq!(
        code_from(&app, &narrower.secret, "10.2.0.1").await,
        pb::VerifyCode::IpNotAllowed
    );
    let wider = delegate(&["0.0.0.0/0"]).await;
    assert_err(wider, Code::PermissionDenied, "DELEGATION_EXCEEDS_PARENT");
    let outside = delegate(&["192.0.2.0/24"]).await;
    assert_err(outside, Code::PermissionDenied, "DELEGATION_EXCEEDS_PARENT");
    // The parent narrows later: its children follow at once.
    set_allowed_cidrs(&app, &parent.id, &["10.9.0.0/16"])
        .await
        .unwrap();
    assert_eq!(
        code_from(&app, &narrower.secret, "10.1.0.1").await,
        pb::VerifyCode::IpNotAllowed
    );
}

async fn admin_keys_are_refused_from_elsewhere(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("admins").await;
    let create = |cidrs: &[&str]| pb::CreateApiKeyRequest {
        workspace_id: ws.id.clone(),
        scopes: strings(&["keyplane.workspaces:read"]),
        allowed_cidrs: strings(cidrs),
        ..Default::default()
    };
    let as_key = |secret: String| {
        let client = app.client(&Cred::ApiKey(secret));
        async move {
            client
                .workspaces
                .clone()
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner()
        }
    };
    let here = app
        .as_admin()
        .keys
        .create_api_key(create(&["127.0.0.1"]))
        .await
        .unwrap()
        .into_inner();
    assert!(as_key(here.secret).await.is_ok(), "used from loopback");
    let there = app
        .as_admin()
        .keys
        .create_api_key(create(&["192.0.2.0/24"]))
        .await
        .unwrap()
        .into_inner();
    assert_err(
        as_key(there.secret).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
}

fn check_from(secret: &str, source: &str, forwarded_for: &str) -> CheckRequest {
    let mut check = envoy_check(secret);
    let attributes = check.attributes.as_mut().unwrap();
    attributes.source = Some(Peer {
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: source.into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    });
    let http = attributes.request.as_mut().unwrap().http.as_mut().unwrap();
    http.headers
        .insert("x-forwarded-for".into(), forwarded_for.into());
    check
}

async fn envoy_checks_use_the_address_envoy_reports(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("sidecar").await;
    let (_, secret) = key_with(&app, &ws.id, &["10.0.0.0/8"]).await.unwrap();
    let mut envoy = app.as_admin().authorization();
    let allowed = envoy
        .check(check_from(&secret, "10.1.2.3", "192.0.2.1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(allowed.status.unwrap().code, Code::Ok as i32);
    // A client-sent x-forwarded-for naming an allowed address changes nothing.
    let denied = envoy
        .check(check_from(&secret, "192.0.2.1", "10.1.2.3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(denied.status.unwrap().code, Code::PermissionDenied as i32);
    let Some(envoy_types::ext_authz::v3::pb::HttpResponse::DeniedResponse(deny)) =
        denied.http_response
    else {
        panic!("a denied response");
    };
    assert_eq!(deny.status.unwrap().code, 403);
    let body: serde_json::Value = serde_json::from_str(&deny.body).unwrap();
    assert_eq!(body["code"], "VERIFY_CODE_IP_NOT_ALLOWED");
    // No source address at all: refused too.
    let unplaced = envoy
        .check(envoy_check(&secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unplaced.status.unwrap().code, Code::PermissionDenied as i32);
}
