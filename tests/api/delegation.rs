//! DelegateApiKey (SPEC §3.8): a key mints narrower keys for sub-agents, authenticated as
//! itself; every widening is refused naming the field; a child is live, not copied — its
//! ancestors' state, scopes and budgets are its own — and dies with them.
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    a_chain_is_built_and_every_widening_is_refused,
    only_a_delegating_key_of_the_tenant_may_delegate,
    an_ancestors_change_reaches_every_descendant,
    revoking_or_deleting_a_key_revokes_its_subtree,
    rotation_hands_the_children_to_the_successor,
    a_child_spends_from_every_ancestors_credits,
    delegation_is_idempotent_listed_and_audited,
);

const DELEGATE: &str = "keyplane.api_keys:delegate";

/// `ttl` in seconds, as a request field.
fn ttl(secs: i64) -> Option<prost_types::Duration> {
    seconds(secs)
}

async fn delegate(
    app: &TestApp,
    parent_secret: &str,
    request: pb::DelegateApiKeyRequest,
) -> Result<pb::DelegateApiKeyResponse, tonic::Status> {
    app.client(&Cred::ApiKey(parent_secret.to_owned()))
        .keys
        .delegate_api_key(request)
        .await
        .inner()
}

fn ask(scopes: &[&str], delegable: bool) -> pb::DelegateApiKeyRequest {
    pb::DelegateApiKeyRequest {
        name: "sub-agent".into(),
        scopes: strings(scopes),
        delegable,
        ..Default::default()
    }
}

/// A root key holding `scopes` and the delegate scope, expiring in two hours.
async fn root(app: &TestApp, ws: &str, scopes: &[&str]) -> (pb::ApiKey, String) {
    let mut all = scopes.to_vec();
    all.push(DELEGATE);
    let r = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.into(),
            name: "agent".into(),
            scopes: strings(&all),
            expire_time: Some(in_secs(7200)),
            ..Default::default()
        })
        .await
        .expect("root key")
        .into_inner();
    (r.api_key.unwrap(), r.secret)
}

/// Verifies twice (the first fills the cache), returning the second answer.
async fn cached(app: &TestApp, secret: &str, required: &[&str]) -> pb::VerifyApiKeyResponse {
    app.verify(secret, required).await;
    app.verify(secret, required).await
}

/// Root → child → grandchild, each able to delegate but the last; with their secrets.
struct Chain {
    root: (pb::ApiKey, String),
    child: (pb::ApiKey, String),
    grandchild: (pb::ApiKey, String),
}

async fn chain(app: &TestApp) -> Chain {
    let ws = app.create_workspace("agents").await;
    for s in ["crm:read", "crm:write", "erp:read"] {
        app.create_scope(s, &ws.id).await;
    }
    let root = root(app, &ws.id, &["crm:read", "crm:write", "erp:read"]).await;
    let c = delegate(app, &root.1, ask(&["crm:read", "crm:write"], true))
        .await
        .expect("child");
    let child = (c.api_key.unwrap(), c.secret);
    let g = delegate(app, &child.1, ask(&["crm:read", "crm:write"], false))
        .await
        .expect("grandchild");
    let grandchild = (g.api_key.unwrap(), g.secret);
    // Let the writes' own notifications come back before anything is cached.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Chain {
        root,
        child,
        grandchild,
    }
}

#[track_caller]
fn assert_exceeds(result: Result<pb::DelegateApiKeyResponse, tonic::Status>, field: &str) {
    let status = refused(
        result,
        Code::PermissionDenied,
        "DELEGATION_EXCEEDS_PARENT",
        field,
    );
    assert_eq!(reason_metadata(&status, "field"), field, "{status:?}");
}

async fn a_chain_is_built_and_every_widening_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let c = chain(&app).await;
    let (root, child, grandchild) = (&c.root.0, &c.child.0, &c.grandchild.0);
    assert_eq!(
        (child.parent_id.as_str(), child.delegation_depth),
        (root.id.as_str(), 1)
    );
    assert_eq!(
        (grandchild.parent_id.as_str(), grandchild.delegation_depth),
        (child.id.as_str(), 2)
    );
    assert_eq!(child.workspace_id, root.workspace_id);
    assert!(child.scopes.contains(&DELEGATE.to_owned()), "{child:?}");
    assert_eq!(grandchild.scopes, strings(&["crm:read", "crm:write"]));
    // The default lifetime is an hour, cut to the parent's.
    let expiry = child.expire_time.as_ref().unwrap().seconds - unix_now();
    assert!((3500..=3600).contains(&expiry), "{expiry}");
    let end = |k: &pb::ApiKey| k.expire_time.as_ref().map(|t| (t.seconds, t.nanos));
    assert!(end(grandchild) <= end(child));

    let v = cached(&app, &c.grandchild.1, &["crm:write"]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid, "{v:?}");
    assert_eq!(
        v.delegation_chain,
        [root.id.clone(), child.id.clone(), grandchild.id.clone()]
    );
    assert_eq!(v.effective_scopes, strings(&["crm:read", "crm:write"]));
    assert_eq!(
        cached(&app, &c.grandchild.1, &["erp:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Every widening, from the child (crm:read, crm:write, delegate; depth 1).
    let from_child = |request| delegate(&app, &c.child.1, request);
    assert_exceeds(from_child(ask(&["erp:read"], false)).await, "scopes");
    assert_exceeds(from_child(ask(&["crm:*"], false)).await, "scopes");
    assert_exceeds(
        from_child(pb::DelegateApiKeyRequest {
            ttl: ttl(3 * 3600),
            ..ask(&["crm:read"], false)
        })
        .await,
        "ttl",
    );
    assert_exceeds(
        from_child(pb::DelegateApiKeyRequest {
            expire_time: Some(in_secs(3 * 3600)),
            ..ask(&["crm:read"], false)
        })
        .await,
        "expire_time",
    );
    // The depth bound: depth 3 may exist, but not delegate.
    let g = delegate(&app, &c.grandchild.1, ask(&["crm:read"], false)).await;
    assert_err(g, Code::PermissionDenied, "MISSING_SCOPE");
    let deep = delegate(&app, &c.child.1, ask(&["crm:read"], true))
        .await
        .unwrap();
    let third = delegate(&app, &deep.secret, ask(&["crm:read"], false))
        .await
        .expect("depth 3");
    assert_eq!(third.api_key.unwrap().delegation_depth, 3);
    assert_exceeds(
        delegate(&app, &deep.secret, ask(&["crm:read"], true)).await,
        "delegable",
    );
    // The server's ceiling (24 h by default) even under a long-lived root.
    let forever = app
        .create_key(&root.workspace_id, &["crm:read", DELEGATE])
        .await;
    assert_exceeds(
        delegate(
            &app,
            &forever.1,
            pb::DelegateApiKeyRequest {
                ttl: ttl(25 * 3600),
                ..ask(&["crm:read"], false)
            },
        )
        .await,
        "ttl",
    );
    // Bad input is INVALID_ARGUMENT naming the field, before any rule.
    assert_invalid(
        delegate(
            &app,
            &forever.1,
            pb::DelegateApiKeyRequest {
                ttl: ttl(60),
                expire_time: Some(in_secs(60)),
                ..ask(&["crm:read"], false)
            },
        )
        .await,
        &["ttl"],
        "both lifetimes",
    );
    assert_invalid(
        delegate(&app, &forever.1, ask(&["not a scope"], false)).await,
        &["scopes"],
        "a malformed scope",
    );
}

async fn only_a_delegating_key_of_the_tenant_may_delegate(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let (_, plain) = app.create_key(&ws.id, &["crm:read"]).await;
    assert_err(
        delegate(&app, &plain, ask(&["crm:read"], false)).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    // A token holding the scope has no key to narrow.
    let tenant = uuid::Uuid::parse_str(&ws.tenant_id).unwrap();
    let token = app.client(&bearer(token(Some(tenant), &[DELEGATE])));
    assert_err(
        token
            .keys
            .clone()
            .delegate_api_key(ask(&[], false))
            .await
            .inner(),
        Code::PermissionDenied,
        "DELEGATION_NEEDS_API_KEY",
    );
    let (parent, secret) = root(&app, &ws.id, &["crm:read"]).await;
    let other = uuid::Uuid::now_v7();
    let as_other = app.client(&Cred::ApiKey(secret.clone())).tenant(other);
    assert_err(
        as_other
            .keys
            .clone()
            .delegate_api_key(ask(&[], false))
            .await
            .inner(),
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
    app.revoke_key(&parent.id).await;
    assert_err(
        delegate(&app, &secret, ask(&[], false)).await,
        Code::Unauthenticated,
        "API_KEY_INVALID",
    );
}

async fn update_key(app: &TestApp, id: &str, patch: pb::ApiKey, paths: &[&str]) {
    app.as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: id.into(),
                ..patch
            }),
            update_mask: mask(paths),
            etag: String::new(),
        })
        .await
        .expect("update");
}

async fn an_ancestors_change_reaches_every_descendant(backend: Backend) {
    let app = spawn_app(backend).await;
    let c = chain(&app).await;
    let g = &c.grandchild.1;
    assert_eq!(
        cached(&app, g, &["crm:write"]).await.code(),
        pb::VerifyCode::Valid
    );

    app.disable_key(&c.child.0.id).await;
    assert_eq!(app.verify(g, &[]).await.code(), pb::VerifyCode::Disabled);
    update_key(&app, &c.child.0.id, pb::ApiKey::default(), &["disabled"]).await;
    assert_eq!(
        cached(&app, g, &["crm:write"]).await.code(),
        pb::VerifyCode::Valid
    );

    // The root loses crm:write: so does the grandchild, whose own scopes are unchanged.
    update_key(
        &app,
        &c.root.0.id,
        pb::ApiKey {
            scopes: strings(&["crm:read", DELEGATE]),
            ..Default::default()
        },
        &["scopes"],
    )
    .await;
    let v = app.verify(g, &["crm:write"]).await;
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes, "{v:?}");
    assert_eq!(v.effective_scopes, strings(&["crm:read"]));
    assert_eq!(v.missing_scopes, strings(&["crm:write"]));

    // The root's expiry is the grandchild's.
    update_key(
        &app,
        &c.root.0.id,
        pb::ApiKey {
            expire_time: Some(in_secs(1)),
            ..Default::default()
        },
        &["expire_time"],
    )
    .await;
    assert_eq!(
        cached(&app, g, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(app.verify(g, &[]).await.code(), pb::VerifyCode::Expired);
}

async fn revoking_or_deleting_a_key_revokes_its_subtree(backend: Backend) {
    let app = spawn_app(backend).await;
    let c = chain(&app).await;
    for secret in [&c.child.1, &c.grandchild.1] {
        assert_eq!(
            cached(&app, secret, &[]).await.code(),
            pb::VerifyCode::Valid
        );
    }
    app.revoke_key(&c.root.0.id).await;
    for (key, secret) in [&c.child, &c.grandchild] {
        assert_eq!(
            app.verify(secret, &[]).await.code(),
            pb::VerifyCode::Revoked
        );
        // Revoked in the same transaction, not merely answered so.
        assert!(app.get_key(&key.id).await.unwrap().revoke_time.is_some());
    }

    let c = chain(&app).await;
    assert_eq!(
        cached(&app, &c.grandchild.1, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    app.as_admin()
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest {
            id: c.child.0.id.clone(),
        })
        .await
        .expect("delete");
    assert_eq!(
        app.verify(&c.grandchild.1, &[]).await.code(),
        pb::VerifyCode::Revoked
    );
    assert_eq!(
        cached(&app, &c.root.1, &[]).await.code(),
        pb::VerifyCode::Valid
    );
}

async fn rotation_hands_the_children_to_the_successor(backend: Backend) {
    let app = spawn_app(backend).await;
    let c = chain(&app).await;
    assert_eq!(
        cached(&app, &c.grandchild.1, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: c.child.0.id.clone(),
            grace_period: None,
        })
        .await
        .expect("rotate")
        .into_inner();
    let successor = rotated.api_key.unwrap();
    assert_eq!(successor.parent_id, c.root.0.id);
    assert_eq!(successor.delegation_depth, 1);
    let grandchild = app.get_key(&c.grandchild.0.id).await.unwrap();
    assert_eq!(grandchild.parent_id, successor.id);
    let v = cached(&app, &c.grandchild.1, &["crm:read"]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid, "{v:?}");
    assert_eq!(
        v.delegation_chain,
        [
            c.root.0.id.clone(),
            successor.id.clone(),
            grandchild.id.clone()
        ]
    );
    // The successor delegates as the old key did, and its revoke takes the subtree.
    delegate(&app, &rotated.secret, ask(&["crm:read"], false))
        .await
        .expect("the successor delegates");
    app.revoke_key(&successor.id).await;
    assert_eq!(
        app.verify(&c.grandchild.1, &[]).await.code(),
        pb::VerifyCode::Revoked
    );
}

async fn a_child_spends_from_every_ancestors_credits(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let parent = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.id.clone(),
            scopes: strings(&[DELEGATE]),
            remaining_uses: Some(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let a = delegate(&app, &parent.secret, ask(&[], false))
        .await
        .unwrap();
    let b = delegate(
        &app,
        &parent.secret,
        pb::DelegateApiKeyRequest {
            remaining_uses: Some(100),
            ..ask(&[], false)
        },
    )
    .await
    .unwrap();
    let mut admitted = 0;
    for i in 0..10 {
        let secret = if i % 2 == 0 { &a.secret } else { &b.secret };
        match app.verify(secret, &[]).await.code() {
            pb::VerifyCode::Valid => admitted += 1,
            pb::VerifyCode::UsageExceeded => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(admitted, 5, "the children together spend the parent's 5");
    // The child's own credits were spent only for what was admitted.
    let b_left = app.get_key(&b.api_key.unwrap().id).await.unwrap();
    assert!(b_left.remaining_uses.unwrap() >= 97, "{b_left:?}");
}

async fn delegation_is_idempotent_listed_and_audited(backend: Backend) {
    let app = spawn_app(backend).await;
    let c = chain(&app).await;
    let request_id = uuid::Uuid::now_v7().to_string();
    let first = delegate(
        &app,
        &c.root.1,
        pb::DelegateApiKeyRequest {
            request_id: request_id.clone(),
            ..ask(&["crm:read"], false)
        },
    )
    .await
    .unwrap();
    assert!(!first.secret.is_empty());
    let again = delegate(
        &app,
        &c.root.1,
        pb::DelegateApiKeyRequest {
            request_id,
            ..ask(&["crm:read"], false)
        },
    )
    .await
    .unwrap();
    assert!(
        again.secret.is_empty(),
        "a retry never shows the secret again"
    );
    assert_eq!(
        again.api_key.unwrap().id,
        first.api_key.as_ref().unwrap().id
    );

    let children = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest {
            parent_id: c.root.0.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    let ids: Vec<&str> = children.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            c.child.0.id.as_str(),
            first.api_key.as_ref().unwrap().id.as_str()
        ]
    );

    let events = app
        .as_admin()
        .audit
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "api_key.delegate".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    assert_eq!(events.len(), 3, "{events:?}");
    let newest = &events[0];
    assert_eq!(newest.resource_id, first.api_key.unwrap().id);
    let actor = newest.actor.as_ref().unwrap();
    assert_eq!(actor.api_key_id, c.root.0.id, "the parent key acted");
}
