//! The verification cache seen from outside: every answer a write changes is changed on
//! the replica that wrote before the RPC returns, time is never cached, and tenants never
//! see each other's cached keys. (Several replicas on one PostgreSQL: `tests/replicas.rs`.)
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    every_write_is_seen_by_the_next_verification,
    expiry_is_evaluated_at_every_verification,
    forced_deletes_evict_every_affected_key,
    a_tenant_never_sees_another_tenants_cached_key,
    an_admin_key_is_refused_as_soon_as_it_is_revoked,
    a_prepared_answer_follows_every_write_to_its_key,
);

/// Verifies until the key is cached (the first call fills), then asserts the code.
async fn cached(app: &TestApp, secret: &str, required: &[&str], code: pb::VerifyCode) {
    for _ in 0..2 {
        assert_eq!(app.verify(secret, required).await.code(), code);
    }
}

async fn every_write_is_seen_by_the_next_verification(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let mut admin = app.as_admin();

    let (key, secret) = app.create_key(&ws.id, &["crm:read"]).await;
    cached(&app, &secret, &["crm:read"], pb::VerifyCode::Valid).await;
    let update = |patch: pb::ApiKey, paths: &[&str]| {
        let mut keys = admin.keys.clone();
        let request = pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: key.id.clone(),
                ..patch
            }),
            update_mask: mask(paths),
            etag: String::new(),
        };
        async move { keys.update_api_key(request).await.expect("update") }
    };

    update(
        pb::ApiKey {
            disabled: true,
            ..Default::default()
        },
        &["disabled"],
    )
    .await;
    cached(&app, &secret, &["crm:read"], pb::VerifyCode::Disabled).await;
    update(pb::ApiKey::default(), &["disabled"]).await;
    cached(&app, &secret, &["crm:read"], pb::VerifyCode::Valid).await;

    update(
        pb::ApiKey {
            scopes: strings(&["crm:write"]),
            ..Default::default()
        },
        &["scopes"],
    )
    .await;
    cached(
        &app,
        &secret,
        &["crm:read"],
        pb::VerifyCode::InsufficientScopes,
    )
    .await;
    update(
        pb::ApiKey {
            expire_time: Some(in_secs(3600)),
            owner_id: "o-1".into(),
            ..Default::default()
        },
        &["expire_time", "owner_id"],
    )
    .await;
    let seen = app.verify(&secret, &["crm:write"]).await;
    assert_eq!(seen.code(), pb::VerifyCode::Valid);
    assert_eq!(
        seen.api_key.unwrap().owner_id,
        "o-1",
        "the cached key was replaced"
    );

    let rotated = admin
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: key.id.clone(),
            grace_period: None,
        })
        .await
        .expect("rotate")
        .into_inner();
    cached(&app, &secret, &[], pb::VerifyCode::Revoked).await;
    cached(&app, &rotated.secret, &["crm:write"], pb::VerifyCode::Valid).await;

    let successor = rotated.api_key.unwrap().id;
    admin.revoke_key(&successor).await;
    cached(&app, &rotated.secret, &[], pb::VerifyCode::Revoked).await;
    admin
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest { id: successor })
        .await
        .expect("delete");
    cached(&app, &rotated.secret, &[], pb::VerifyCode::NotFound).await;
}

async fn expiry_is_evaluated_at_every_verification(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.id.clone(),
            expire_time: Some(in_secs(2)),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    cached(&app, &created.secret, &[], pb::VerifyCode::Valid).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match app.verify(&created.secret, &[]).await.code() {
            pb::VerifyCode::Valid => {
                assert!(std::time::Instant::now() < deadline, "never expired");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            code => {
                assert_eq!(code, pb::VerifyCode::Expired);
                break;
            }
        }
    }
}

async fn forced_deletes_evict_every_affected_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.as_admin();
    let scope = app.create_scope("crm:read", "").await;
    let doomed = app.create_workspace("doomed").await;
    let other = app.create_workspace("other").await;
    let (_, in_doomed) = app.create_key(&doomed.id, &["crm:read"]).await;
    let (_, elsewhere) = app.create_key(&other.id, &["crm:read"]).await;
    cached(&app, &in_doomed, &[], pb::VerifyCode::Valid).await;
    cached(&app, &elsewhere, &["crm:read"], pb::VerifyCode::Valid).await;

    admin
        .workspaces
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: doomed.id,
            force: true,
        })
        .await
        .expect("forced workspace delete");
    cached(&app, &in_doomed, &[], pb::VerifyCode::NotFound).await;

    admin
        .scopes
        .delete_scope(pb::DeleteScopeRequest {
            id: scope.id,
            force: true,
        })
        .await
        .expect("forced scope delete");
    cached(
        &app,
        &elsewhere,
        &["crm:read"],
        pb::VerifyCode::InsufficientScopes,
    )
    .await;
}

async fn a_tenant_never_sees_another_tenants_cached_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&ws.id, &[]).await;
    // Cached by its own tenant, and by a platform token that may see every tenant.
    cached(&app, &secret, &[], pb::VerifyCode::Valid).await;
    let platform = app.client(&bearer(token(None, &["keyplane.api_keys:verify"])));
    let seen = platform
        .try_verify(&secret, &[])
        .await
        .expect("platform verify");
    assert_eq!(seen.tenant_id, key.tenant_id);

    let stranger = app.client(&bearer(token(
        Some(uuid::Uuid::now_v7()),
        &["keyplane.api_keys:verify"],
    )));
    for _ in 0..2 {
        let seen = stranger.verify(&secret, &[]).await;
        assert_eq!(seen.code(), pb::VerifyCode::NotFound);
        assert!(seen.api_key.is_none() && seen.tenant_id.is_empty());
    }
}

async fn an_admin_key_is_refused_as_soon_as_it_is_revoked(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&ws.id, &["keyplane.workspaces:read"]).await;
    let as_key = app.client(&Cred::ApiKey(secret));
    for _ in 0..2 {
        as_key
            .workspaces
            .clone()
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .expect("the admin key works");
    }
    app.revoke_key(&key.id).await;
    let refused = as_key
        .workspaces
        .clone()
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await;
    assert_err(refused, Code::Unauthenticated, "API_KEY_INVALID");
}

/// Envoy's allow for `secret` on a route needing `crm:read`, presented in `x-api-key` or
/// as a bearer: the identity headers it sets and the headers it removes.
async fn allow(
    app: &TestApp,
    secret: &str,
    bearer: bool,
) -> (std::collections::HashMap<String, String>, Vec<String>) {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    let mut request = crate::matrix::check_request(secret, "crm:read");
    if bearer {
        let http = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .expect("an HTTP check");
        http.headers.remove("x-api-key");
        http.headers
            .insert("authorization".into(), format!("Bearer {secret}"));
    }
    let response = app
        .as_admin()
        .authorization()
        .check(request)
        .await
        .expect("Check")
        .into_inner();
    let Some(HttpResponse::OkResponse(ok)) = response.http_response else {
        panic!("not an allow: {response:?}");
    };
    let set = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    (set, ok.headers_to_remove)
}

/// VerifyApiKey's and Check's answers about a cached key are encoded once and written as
/// they are on later calls: each write to the key is in the very next answer, and a key
/// presented in another header gets its own removals.
async fn a_prepared_answer_follows_every_write_to_its_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let (key, secret) = app.create_key(&ws.id, &["crm:read"]).await;
    let mut keys = app.as_admin().keys;

    for round in 0..3 {
        let name = format!("name {round}");
        let owner = format!("owner-{round}");
        let scopes: &[&str] = if round % 2 == 0 {
            &["crm:read"]
        } else {
            &["crm:read", "crm:write"]
        };
        keys.update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: key.id.clone(),
                name: name.clone(),
                owner_id: owner.clone(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
            update_mask: mask(&["name", "owner_id", "scopes"]),
            etag: String::new(),
        })
        .await
        .expect("update");
        // Twice each: the first fills the cache and prepares, the second is prepared.
        for _ in 0..2 {
            let verified = app.verify(&secret, &["crm:read"]).await;
            assert_eq!(verified.code(), pb::VerifyCode::Valid);
            let answered = verified.api_key.expect("the key");
            assert_eq!(answered.name, name);
            assert_eq!(answered.owner_id, owner);
            assert_eq!(verified.effective_scopes, scopes);

            let (set, removed) = allow(&app, &secret, false).await;
            assert_eq!(set["x-keyplane-owner-id"], owner);
            assert_eq!(set["x-keyplane-scopes"], scopes.join(" "));
            assert_eq!(removed, ["x-api-key"]);
            let (set, removed) = allow(&app, &secret, true).await;
            assert_eq!(set["x-keyplane-owner-id"], owner);
            assert_eq!(removed, ["authorization"]);
        }
    }
}
