//! ApiKeyService (everything but VerifyApiKey, see `verify.rs`): the secret and its shape,
//! field rules, idempotency, pagination, updates, revocation, rotation, deletion, the
//! no-escalation rule of SPEC §2.4 and `last_used_time`.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyplane::proto as pb;
use prost_types::{FieldMask, Timestamp};
use tonic::{Code, Response, Status};

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    create_returns_the_secret_once_and_never_again,
    create_uses_the_workspace_default_prefix,
    create_validates_every_field,
    create_rejects_unknown_scopes_and_workspaces,
    create_is_idempotent_by_request_id,
    list_pages_through_keys_with_filters,
    update_follows_the_mask_and_the_etag,
    update_rejects_bad_masks_and_values,
    disabling_is_reversible,
    revoke_is_final_and_idempotent,
    rotate_issues_a_successor_and_revokes_at_once,
    rotate_with_grace_keeps_the_old_key_until_it_expires,
    rotate_refuses_revoked_keys_and_bad_grace_periods,
    delete_forgets_the_key,
    no_escalation_through_keys,
    last_used_time_follows_successful_verifications,
    concurrent_idempotent_creates_make_one_key,
    concurrent_rotations_make_one_successor,
);

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A whole-second timestamp `secs` from now (whole seconds survive every backend exactly).
fn in_secs(secs: i64) -> Timestamp {
    Timestamp {
        seconds: unix_now() + secs,
        nanos: 0,
    }
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: strings(paths),
    })
}

fn new_key(workspace_id: &str) -> pb::CreateApiKeyRequest {
    pb::CreateApiKeyRequest {
        workspace_id: workspace_id.into(),
        name: "k".into(),
        ..Default::default()
    }
}

async fn create_as(
    app: &TestApp,
    request: pb::CreateApiKeyRequest,
    cred: &Cred,
) -> Result<pb::CreateApiKeyResponse, Status> {
    app.keys()
        .create_api_key(req(request, cred))
        .await
        .map(Response::into_inner)
}

async fn create(
    app: &TestApp,
    request: pb::CreateApiKeyRequest,
) -> Result<pb::CreateApiKeyResponse, Status> {
    create_as(app, request, &app.admin()).await
}

async fn get(app: &TestApp, id: &str) -> Result<pb::ApiKey, Status> {
    app.keys()
        .get_api_key(req(pb::GetApiKeyRequest { id: id.into() }, &app.admin()))
        .await
        .map(|r| {
            r.into_inner()
                .api_key
                .expect("api_key in GetApiKeyResponse")
        })
}

async fn list(
    app: &TestApp,
    request: pb::ListApiKeysRequest,
) -> Result<pb::ListApiKeysResponse, Status> {
    app.keys()
        .list_api_keys(req(request, &app.admin()))
        .await
        .map(Response::into_inner)
}

async fn update_as(
    app: &TestApp,
    key: pb::ApiKey,
    paths: &[&str],
    etag: &str,
    cred: &Cred,
) -> Result<pb::ApiKey, Status> {
    let request = pb::UpdateApiKeyRequest {
        api_key: Some(key),
        update_mask: mask(paths),
        etag: etag.into(),
    };
    app.keys()
        .update_api_key(req(request, cred))
        .await
        .map(|r| {
            r.into_inner()
                .api_key
                .expect("api_key in UpdateApiKeyResponse")
        })
}

async fn update(
    app: &TestApp,
    key: pb::ApiKey,
    paths: &[&str],
    etag: &str,
) -> Result<pb::ApiKey, Status> {
    update_as(app, key, paths, etag, &app.admin()).await
}

async fn revoke(app: &TestApp, id: &str) -> Result<pb::ApiKey, Status> {
    app.keys()
        .revoke_api_key(req(pb::RevokeApiKeyRequest { id: id.into() }, &app.admin()))
        .await
        .map(|r| {
            r.into_inner()
                .api_key
                .expect("api_key in RevokeApiKeyResponse")
        })
}

async fn rotate_as(
    app: &TestApp,
    id: &str,
    grace: Option<prost_types::Duration>,
    cred: &Cred,
) -> Result<pb::RotateApiKeyResponse, Status> {
    app.keys()
        .rotate_api_key(req(
            pb::RotateApiKeyRequest {
                id: id.into(),
                grace_period: grace,
            },
            cred,
        ))
        .await
        .map(Response::into_inner)
}

async fn rotate(
    app: &TestApp,
    id: &str,
    grace: Option<prost_types::Duration>,
) -> Result<pb::RotateApiKeyResponse, Status> {
    rotate_as(app, id, grace, &app.admin()).await
}

fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

async fn delete(app: &TestApp, id: &str) -> Result<pb::DeleteApiKeyResponse, Status> {
    app.keys()
        .delete_api_key(req(pb::DeleteApiKeyRequest { id: id.into() }, &app.admin()))
        .await
        .map(Response::into_inner)
}

/// Asserts the documented shape of a fresh secret: `{prefix}_` and 49 base62 characters.
#[track_caller]
fn assert_secret_shape(secret: &str, prefix: &str) {
    let body = secret
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .unwrap_or_else(|| panic!("{secret:?} does not start with {prefix}_"));
    assert_eq!(body.len(), 49, "body of {secret:?}");
    assert!(
        body.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret:?} is not base62"
    );
}

#[track_caller]
fn assert_no_secret(what: &impl std::fmt::Debug, secret: &str) {
    let shown = format!("{what:?}");
    // The body alone (without the prefix) is what must never travel again.
    assert!(
        !shown.contains(&secret[secret.len() - 49..]),
        "the secret leaked into {shown}"
    );
}

async fn create_returns_the_secret_once_and_never_again(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", &w.id).await;
    let expire = in_secs(3600);
    let created = create(
        &app,
        pb::CreateApiKeyRequest {
            workspace_id: w.id.clone(),
            name: "  ci  ".into(),
            prefix: String::new(),
            scopes: strings(&["crm:write", "crm:read", "keyplane.api_keys:read"]),
            owner_id: "cust_42".into(),
            metadata: [("plan".to_string(), "pro".to_string())].into(),
            expire_time: Some(expire),
            request_id: String::new(),
        },
    )
    .await
    .unwrap();
    let secret = created.secret.clone();
    assert_secret_shape(&secret, "kp");
    let key = created.api_key.clone().unwrap();
    assert_eq!(
        key.masked_key,
        format!("kp_****{}", &secret[secret.len() - 4..])
    );
    assert_eq!(key.prefix, "kp");
    assert_eq!(key.name, "ci");
    assert_eq!(key.tenant_id, app.tenant.to_string());
    assert_eq!(key.workspace_id, w.id);
    let mut scopes = key.scopes.clone();
    scopes.sort();
    assert_eq!(
        scopes,
        ["crm:read", "crm:write", "keyplane.api_keys:read"],
        "every requested scope is granted"
    );
    assert_eq!(key.owner_id, "cust_42");
    assert_eq!(key.metadata.get("plan").map(String::as_str), Some("pro"));
    assert_eq!(key.expire_time, Some(expire));
    assert!(!key.disabled);
    assert!(key.revoke_time.is_none() && key.last_used_time.is_none());
    assert!(key.successor_id.is_empty());
    assert!(!key.etag.is_empty());
    assert!(key.create_time.is_some() && key.update_time.is_some());
    assert_eq!(uuid::Uuid::parse_str(&key.id).unwrap().get_version_num(), 7);
    assert_no_secret(&key, &secret);

    let got = get(&app, &key.id).await.unwrap();
    assert_eq!(got, key, "GetApiKey returns what CreateApiKey returned");
    assert_no_secret(&got, &secret);
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys, std::slice::from_ref(&key));
    assert_no_secret(&listed, &secret);

    // The secret works, and two keys never share one.
    assert_eq!(
        app.verify(&secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    let other = create(&app, new_key(&w.id)).await.unwrap();
    assert_secret_shape(&other.secret, "kp");
    assert_ne!(other.secret, secret);
    assert_ne!(other.api_key.unwrap().id, key.id);

    // A prefix from the request wins over the workspace's default.
    let custom = create(
        &app,
        pb::CreateApiKeyRequest {
            prefix: "sk9".into(),
            ..new_key(&w.id)
        },
    )
    .await
    .unwrap();
    assert_secret_shape(&custom.secret, "sk9");
    let custom_key = custom.api_key.unwrap();
    assert_eq!(custom_key.prefix, "sk9");
    assert_eq!(
        custom_key.masked_key,
        format!("sk9_****{}", &custom.secret[custom.secret.len() - 4..])
    );
    assert_eq!(
        app.verify(&custom.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );

    // Missing keys and bad ids.
    assert_err(
        get(&app, &uuid::Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let status = assert_err(
        get(&app, "nope").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
}

async fn create_uses_the_workspace_default_prefix(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app
        .workspaces()
        .create_workspace(req(
            pb::CreateWorkspaceRequest {
                name: "atlas".into(),
                default_key_prefix: "atlas".into(),
                ..Default::default()
            },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let created = create(&app, new_key(&w.id)).await.unwrap();
    assert_secret_shape(&created.secret, "atlas");
    let key = created.api_key.unwrap();
    assert_eq!(key.prefix, "atlas");
    assert_eq!(
        key.masked_key,
        format!("atlas_****{}", &created.secret[created.secret.len() - 4..])
    );
    let overridden = create(
        &app,
        pb::CreateApiKeyRequest {
            prefix: "x".into(),
            ..new_key(&w.id)
        },
    )
    .await
    .unwrap();
    assert_secret_shape(&overridden.secret, "x");
}

async fn create_validates_every_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;

    let everything_wrong = pb::CreateApiKeyRequest {
        workspace_id: "not-a-uuid".into(),
        name: "n".repeat(121),
        prefix: "Bad_Prefix".into(),
        scopes: strings(&["no-colon"]),
        owner_id: String::new(),
        metadata: (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect(),
        expire_time: Some(in_secs(-60)),
        request_id: "not-a-uuid".into(),
    };
    let status = assert_err(
        create(&app, everything_wrong).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let fields = violated_fields(&status);
    for f in [
        "workspace_id",
        "name",
        "prefix",
        "scopes",
        "metadata",
        "expire_time",
        "request_id",
    ] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }

    // One bad field at a time names exactly that field.
    let one_field_cases: Vec<(pb::CreateApiKeyRequest, &str)> = vec![
        (new_key("nope"), "workspace_id"),
        (new_key(""), "workspace_id"),
        (
            pb::CreateApiKeyRequest {
                name: "n".repeat(121),
                ..new_key(&w.id)
            },
            "name",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "Kp".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "1kp".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "k_p".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "a2345678901234567".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "kp-".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&["crm"]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&["crm:"]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&["c*m:read"]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&[""]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: vec!["keyplane.api_keys:read".to_string(); 65],
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                metadata: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..new_key(&w.id)
            },
            "metadata",
        ),
        (
            pb::CreateApiKeyRequest {
                metadata: [("big".to_string(), "v".repeat(257))].into(),
                ..new_key(&w.id)
            },
            "metadata",
        ),
        (
            pb::CreateApiKeyRequest {
                expire_time: Some(in_secs(-1)),
                ..new_key(&w.id)
            },
            "expire_time",
        ),
        (
            pb::CreateApiKeyRequest {
                request_id: "not-a-uuid".into(),
                ..new_key(&w.id)
            },
            "request_id",
        ),
    ];
    for (request, field) in one_field_cases {
        let shown = format!("{request:?}");
        let status = assert_err(
            create(&app, request).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), [field], "{shown}");
    }
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert!(
        listed.api_keys.is_empty(),
        "no invalid request created a key"
    );

    // The limits themselves are accepted.
    let edge = create(
        &app,
        pb::CreateApiKeyRequest {
            workspace_id: w.id.clone(),
            name: "é".repeat(120),
            prefix: "a234567890123456".into(),
            scopes: vec!["keyplane.api_keys:read".to_string(); 64],
            metadata: (0..64)
                .map(|i| (format!("k{i}"), "v".repeat(256)))
                .collect(),
            expire_time: Some(in_secs(60)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_secret_shape(&edge.secret, "a234567890123456");
    let key = edge.api_key.unwrap();
    assert_eq!(key.metadata.len(), 64);
    assert_eq!(
        key.scopes,
        ["keyplane.api_keys:read"],
        "duplicates collapse"
    );
}

async fn create_rejects_unknown_scopes_and_workspaces(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let other_ws = app.create_workspace("other").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("erp:read", &other_ws.id).await;

    let status = assert_err(
        create(
            &app,
            pb::CreateApiKeyRequest {
                scopes: strings(&["crm:read", "hr:read"]),
                ..new_key(&w.id)
            },
        )
        .await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(status.message().contains("hr:read"), "{status:?}");
    let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
    let named = info.metadata.get("scopes").cloned().unwrap_or_default();
    assert!(named.contains("hr:read"), "{info:?}");
    assert!(
        !named.contains("crm:read"),
        "only unknown scopes are named: {info:?}"
    );
    assert_eq!(violated_fields(&status), ["scopes"]);

    // Another workspace's scope does not exist for a key of this workspace.
    let status = assert_err(
        create(
            &app,
            pb::CreateApiKeyRequest {
                scopes: strings(&["erp:read"]),
                ..new_key(&w.id)
            },
        )
        .await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(status.message().contains("erp:read"), "{status:?}");
    // ... but does for a key of its own workspace.
    create(
        &app,
        pb::CreateApiKeyRequest {
            scopes: strings(&["erp:read", "crm:read"]),
            ..new_key(&other_ws.id)
        },
    )
    .await
    .unwrap();

    // A workspace that does not exist, or of another tenant.
    assert_err(
        create(&app, new_key(&uuid::Uuid::now_v7().to_string())).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let stranger = Cred::Bearer(token(Some(uuid::Uuid::now_v7()), &all_builtin()));
    assert_err(
        create_as(&app, new_key(&w.id), &stranger).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(
        listed.api_keys.len(),
        1,
        "only the valid request created a key"
    );
}

async fn create_is_idempotent_by_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let request = pb::CreateApiKeyRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        ..new_key(&w.id)
    };
    let first = create(&app, request.clone()).await.unwrap();
    assert!(!first.secret.is_empty());
    let retry = create(&app, request.clone()).await.unwrap();
    assert_eq!(
        retry.api_key, first.api_key,
        "the retry returns the same key"
    );
    assert!(retry.secret.is_empty(), "the retry carries no secret");
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys.len(), 1, "the retry created nothing");
    // The first secret still works.
    assert_eq!(
        app.verify(&first.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    // Another request id creates another key.
    let second = create(
        &app,
        pb::CreateApiKeyRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            ..request.clone()
        },
    )
    .await
    .unwrap();
    assert!(!second.secret.is_empty());
    assert_ne!(
        second.api_key.unwrap().id,
        first.api_key.clone().unwrap().id
    );

    // Request ids are per tenant: another tenant reusing one gets its own key.
    let stranger = Cred::Bearer(token_for_new_tenant());
    let their_ws = app
        .workspaces()
        .create_workspace(req(pb::CreateWorkspaceRequest::default(), &stranger))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let theirs = create_as(
        &app,
        pb::CreateApiKeyRequest {
            workspace_id: their_ws.id.clone(),
            ..request
        },
        &stranger,
    )
    .await
    .unwrap();
    assert!(!theirs.secret.is_empty(), "a new key, with its secret");
    let their_key = theirs.api_key.unwrap();
    assert_ne!(their_key.id, first.api_key.unwrap().id);
    assert_eq!(their_key.workspace_id, their_ws.id);
}

async fn list_pages_through_keys_with_filters(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.create_workspace("a").await;
    let b = app.create_workspace("b").await;
    let mut all = Vec::new();
    // Five keys in `a` (alice, bob, alice, bob, alice), two in `b` (alice).
    for (i, (ws, owner)) in [
        (&a, "alice"),
        (&a, "bob"),
        (&a, "alice"),
        (&a, "bob"),
        (&a, "alice"),
        (&b, "alice"),
        (&b, "alice"),
    ]
    .into_iter()
    .enumerate()
    {
        let key = create(
            &app,
            pb::CreateApiKeyRequest {
                name: format!("k{i}"),
                owner_id: owner.into(),
                ..new_key(&ws.id)
            },
        )
        .await
        .unwrap()
        .api_key
        .unwrap();
        all.push(key);
    }

    // Pages of two until the token runs out; returns the ids and the number of pages.
    let page_through = |workspace_id: String, owner_id: String| {
        let app = &app;
        async move {
            let mut ids = Vec::new();
            let mut pages = 0;
            let mut token = String::new();
            loop {
                let page = list(
                    app,
                    pb::ListApiKeysRequest {
                        page_size: 2,
                        page_token: token,
                        workspace_id: workspace_id.clone(),
                        owner_id: owner_id.clone(),
                    },
                )
                .await
                .unwrap();
                pages += 1;
                assert!(page.api_keys.len() <= 2);
                assert!(pages < 20, "the listing never ends");
                ids.extend(page.api_keys.into_iter().map(|k| k.id));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            (ids, pages)
        }
    };
    let ids_of = |pick: &dyn Fn(&pb::ApiKey) -> bool| -> Vec<String> {
        all.iter()
            .filter(|k| pick(k))
            .map(|k| k.id.clone())
            .collect()
    };

    let (ids, pages) = page_through(String::new(), String::new()).await;
    assert_eq!(ids, ids_of(&|_| true), "every key once, in creation order");
    assert_eq!(pages, 4);

    let (ids, pages) = page_through(a.id.clone(), String::new()).await;
    assert_eq!(ids, ids_of(&|k| k.workspace_id == a.id));
    assert_eq!(ids.len(), 5);
    assert_eq!(pages, 3);

    let (ids, _) = page_through(String::new(), "alice".into()).await;
    assert_eq!(ids, ids_of(&|k| k.owner_id == "alice"));
    assert_eq!(ids.len(), 5);

    let (ids, pages) = page_through(a.id.clone(), "alice".into()).await;
    assert_eq!(
        ids,
        ids_of(&|k| k.workspace_id == a.id && k.owner_id == "alice")
    );
    assert_eq!(ids.len(), 3);
    assert_eq!(pages, 2);

    let (ids, _) = page_through(b.id.clone(), "bob".into()).await;
    assert!(ids.is_empty());

    // Tokens are tamper-evident and bound to their filters.
    let first = list(
        &app,
        pb::ListApiKeysRequest {
            page_size: 2,
            workspace_id: a.id.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let mut edited = token.clone().into_bytes();
    let i = edited.len() / 2;
    edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
    for bad in [
        String::from_utf8(edited).unwrap(),
        "garbage".to_string(),
        format!("{token}x"),
    ] {
        let status = assert_err(
            list(
                &app,
                pb::ListApiKeysRequest {
                    page_size: 2,
                    page_token: bad,
                    workspace_id: a.id.clone(),
                    ..Default::default()
                },
            )
            .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["page_token"]);
    }
    for (workspace_id, owner_id) in [
        (b.id.clone(), String::new()),
        (String::new(), String::new()),
        (a.id.clone(), "alice".to_string()),
    ] {
        let status = assert_err(
            list(
                &app,
                pb::ListApiKeysRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    workspace_id,
                    owner_id,
                },
            )
            .await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["page_token"]);
    }

    // Bad filters and sizes.
    let status = assert_err(
        list(
            &app,
            pb::ListApiKeysRequest {
                workspace_id: "nope".into(),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["workspace_id"]);
    let status = assert_err(
        list(
            &app,
            pb::ListApiKeysRequest {
                page_size: -1,
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["page_size"]);
    let everything = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(everything.api_keys.len(), 7);
    assert!(everything.next_page_token.is_empty());

    // Another tenant sees none of them.
    let stranger = Cred::Bearer(token_for_new_tenant());
    let theirs = app
        .keys()
        .list_api_keys(req(pb::ListApiKeysRequest::default(), &stranger))
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.api_keys.is_empty());
}

fn token_for_new_tenant() -> String {
    token(Some(uuid::Uuid::now_v7()), &all_builtin())
}

async fn update_follows_the_mask_and_the_etag(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let created = create(
        &app,
        pb::CreateApiKeyRequest {
            scopes: strings(&["crm:read"]),
            owner_id: "alice".into(),
            metadata: [("a".to_string(), "1".to_string())].into(),
            ..new_key(&w.id)
        },
    )
    .await
    .unwrap();
    let original = created.api_key.unwrap();
    let secret = created.secret;

    let new_expiry = in_secs(7200);
    let changed = pb::ApiKey {
        id: original.id.clone(),
        name: "renamed".into(),
        scopes: strings(&["crm:write"]),
        owner_id: "bob".into(),
        metadata: [("b".to_string(), "2".to_string())].into(),
        expire_time: Some(new_expiry),
        // Not in the mask: ignored.
        disabled: true,
        ..Default::default()
    };
    let updated = update(
        &app,
        changed,
        &["name", "scopes", "owner_id", "metadata", "expire_time"],
        &original.etag,
    )
    .await
    .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.scopes, ["crm:write"]);
    assert_eq!(updated.owner_id, "bob");
    assert_eq!(
        updated.metadata,
        [("b".to_string(), "2".to_string())].into()
    );
    assert_eq!(updated.expire_time, Some(new_expiry));
    assert!(!updated.disabled, "disabled was not in the mask");
    assert_ne!(
        updated.etag, original.etag,
        "the etag changes on every update"
    );
    assert_eq!(updated.create_time, original.create_time);
    assert_ne!(updated.update_time, original.update_time);
    assert_eq!(updated.masked_key, original.masked_key);
    assert_eq!(updated.prefix, original.prefix);
    assert_eq!(get(&app, &original.id).await.unwrap(), updated);
    assert_no_secret(&updated, &secret);

    // The new scopes are what verification sees, at once.
    let v = app.verify(&secret, &["crm:read"]).await;
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes);
    assert_eq!(v.missing_scopes, ["crm:read"]);
    assert_eq!(
        app.verify(&secret, &["crm:write"]).await.code(),
        pb::VerifyCode::Valid
    );

    // The original etag is stale now.
    let stale = pb::ApiKey {
        id: original.id.clone(),
        name: "lost update".into(),
        ..Default::default()
    };
    assert_err(
        update(&app, stale.clone(), &["name"], &original.etag).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_err(
        update(&app, stale, &["name"], "garbage").await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(get(&app, &original.id).await.unwrap().name, "renamed");

    // An empty mask updates every field the request sets, and nothing else.
    let set_some = pb::ApiKey {
        id: original.id.clone(),
        owner_id: "carol".into(),
        disabled: true,
        ..Default::default()
    };
    let after = update(&app, set_some, &[], &updated.etag).await.unwrap();
    assert_eq!(after.owner_id, "carol");
    assert!(after.disabled);
    assert_eq!(after.name, "renamed", "unset fields keep their value");
    assert_eq!(after.scopes, ["crm:write"]);
    assert_eq!(after.metadata.len(), 1);
    assert_eq!(after.expire_time, Some(new_expiry));

    // Naming a field with its default value clears it.
    let clear = pb::ApiKey {
        id: original.id.clone(),
        ..Default::default()
    };
    let cleared = update(
        &app,
        clear,
        &["scopes", "owner_id", "metadata", "expire_time", "disabled"],
        "",
    )
    .await
    .unwrap();
    assert!(cleared.scopes.is_empty());
    assert!(cleared.owner_id.is_empty());
    assert!(cleared.metadata.is_empty());
    assert!(cleared.expire_time.is_none());
    assert!(!cleared.disabled);
    assert_eq!(
        app.verify(&secret, &["crm:write"]).await.missing_scopes,
        ["crm:write"]
    );

    // A key that does not exist.
    let missing = pb::ApiKey {
        id: uuid::Uuid::now_v7().to_string(),
        name: "x".into(),
        ..Default::default()
    };
    assert_err(
        update(&app, missing, &["name"], "").await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn update_rejects_bad_masks_and_values(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, _) = app.create_key(&w.id, &[]).await;
    let named = |name: &str| pb::ApiKey {
        id: key.id.clone(),
        name: name.into(),
        ..Default::default()
    };
    for paths in [
        vec!["prefix"],
        vec!["masked_key"],
        vec!["revoke_time"],
        vec!["id"],
        vec!["tenant_id"],
        vec!["workspace_id"],
        vec!["last_used_time"],
        vec!["successor_id"],
        vec!["etag"],
        vec!["create_time"],
        vec!["no_such_field"],
        vec!["name", "update_time"],
    ] {
        let status = assert_err(
            update(&app, named("x"), &paths, "").await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["update_mask"], "{paths:?}");
    }
    assert_eq!(get(&app, &key.id).await.unwrap(), key, "nothing changed");

    let cases: Vec<(pb::ApiKey, &[&str], &str)> = vec![
        (named(&"n".repeat(121)), &["name"], "api_key.name"),
        (
            pb::ApiKey {
                id: key.id.clone(),
                scopes: strings(&["bad scope"]),
                ..Default::default()
            },
            &["scopes"],
            "api_key.scopes",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                scopes: vec!["keyplane.api_keys:read".to_string(); 65],
                ..Default::default()
            },
            &["scopes"],
            "api_key.scopes",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                metadata: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..Default::default()
            },
            &["metadata"],
            "api_key.metadata",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                metadata: [("k".to_string(), "v".repeat(257))].into(),
                ..Default::default()
            },
            &["metadata"],
            "api_key.metadata",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                expire_time: Some(in_secs(-60)),
                ..Default::default()
            },
            &["expire_time"],
            "api_key.expire_time",
        ),
        (
            pb::ApiKey {
                id: "nope".into(),
                name: "x".into(),
                ..Default::default()
            },
            &["name"],
            "api_key.id",
        ),
    ];
    for (k, paths, field) in cases {
        let status = assert_err(
            update(&app, k, paths, "").await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), [field]);
    }
    let unknown = pb::ApiKey {
        id: key.id.clone(),
        scopes: strings(&["hr:read"]),
        ..Default::default()
    };
    let status = assert_err(
        update(&app, unknown, &["scopes"], "").await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(status.message().contains("hr:read"), "{status:?}");
    assert_eq!(get(&app, &key.id).await.unwrap(), key, "nothing changed");
}

async fn disabling_is_reversible(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let disable = pb::ApiKey {
        id: key.id.clone(),
        disabled: true,
        ..Default::default()
    };
    let disabled = update(&app, disable, &["disabled"], &key.etag)
        .await
        .unwrap();
    assert!(disabled.disabled);
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Disabled);
    assert!(!v.valid);

    // `disabled: false` is the default value: without a mask it is not "set".
    let rename = pb::ApiKey {
        id: key.id.clone(),
        name: "still off".into(),
        disabled: false,
        ..Default::default()
    };
    let renamed = update(&app, rename, &[], "").await.unwrap();
    assert!(
        renamed.disabled,
        "an empty mask does not touch unset fields"
    );
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::Disabled
    );

    let enable = pb::ApiKey {
        id: key.id.clone(),
        disabled: false,
        ..Default::default()
    };
    let enabled = update(&app, enable, &["disabled"], &renamed.etag)
        .await
        .unwrap();
    assert!(!enabled.disabled);
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid);
    assert!(v.valid);
}

async fn revoke_is_final_and_idempotent(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let revoked = revoke(&app, &key.id).await.unwrap();
    let revoke_time = revoked.revoke_time.expect("revoke_time set");
    assert_ne!(revoked.etag, key.etag);
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Revoked);
    assert!(!v.valid);
    assert_eq!(get(&app, &key.id).await.unwrap(), revoked);

    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = revoke(&app, &key.id).await.unwrap();
    assert_eq!(
        again.revoke_time,
        Some(revoke_time),
        "revoking twice keeps the first revoke_time"
    );
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );

    // Revocation is irreversible: re-enabling does not bring the key back.
    let enable = pb::ApiKey {
        id: key.id.clone(),
        disabled: false,
        ..Default::default()
    };
    update(&app, enable, &["disabled"], "").await.unwrap();
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );

    assert_err(
        revoke(&app, &uuid::Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let status = assert_err(
        revoke(&app, "nope").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
}

async fn rotate_issues_a_successor_and_revokes_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let expire = in_secs(3600);
    let created = create(
        &app,
        pb::CreateApiKeyRequest {
            name: "ci".into(),
            scopes: strings(&["crm:read", "keyplane.api_keys:read"]),
            owner_id: "alice".into(),
            metadata: [("env".to_string(), "prod".to_string())].into(),
            expire_time: Some(expire),
            ..new_key(&w.id)
        },
    )
    .await
    .unwrap();
    let old = created.api_key.unwrap();

    let rotated = rotate(&app, &old.id, seconds(0)).await.unwrap();
    let new = rotated.api_key.clone().unwrap();
    assert_secret_shape(&rotated.secret, "kp");
    assert_ne!(rotated.secret, created.secret);
    assert_ne!(new.id, old.id);
    assert!(new.id > old.id, "UUIDv7: the successor is newer");
    assert_eq!(
        new.masked_key,
        format!("kp_****{}", &rotated.secret[rotated.secret.len() - 4..])
    );
    assert_eq!(new.workspace_id, old.workspace_id);
    assert_eq!(new.tenant_id, old.tenant_id);
    assert_eq!(new.name, old.name);
    assert_eq!(new.prefix, old.prefix);
    assert_eq!(new.scopes, old.scopes);
    assert_eq!(new.owner_id, old.owner_id);
    assert_eq!(new.metadata, old.metadata);
    assert_eq!(new.expire_time, Some(expire));
    assert!(new.revoke_time.is_none() && !new.disabled && new.successor_id.is_empty());
    assert_no_secret(&new, &rotated.secret);
    assert_eq!(get(&app, &new.id).await.unwrap(), new);

    let old_now = get(&app, &old.id).await.unwrap();
    assert_eq!(old_now.successor_id, new.id);
    assert!(old_now.revoke_time.is_some(), "grace 0 revokes at once");
    assert_eq!(
        app.verify(&created.secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );
    assert_eq!(
        app.verify(&rotated.secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    // The successor can be rotated in turn; without a grace period the default is 0:
    // revoked at once.
    let third = rotate(&app, &new.id, None).await.unwrap();
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );
    assert_eq!(
        app.verify(&third.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        get(&app, &new.id).await.unwrap().successor_id,
        third.api_key.unwrap().id
    );
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys.len(), 3);

    assert_err(
        rotate(&app, &uuid::Uuid::now_v7().to_string(), None).await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // A key is rotated once: rotating it again says so (rotate its successor instead),
    // even though a rotation without grace also revoked it.
    assert_err(
        rotate(&app, &old.id, seconds(0)).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_ROTATED",
    );
    assert_eq!(
        list(&app, pb::ListApiKeysRequest::default())
            .await
            .unwrap()
            .api_keys
            .len(),
        3,
        "the refused rotation created nothing"
    );
}

async fn rotate_with_grace_keeps_the_old_key_until_it_expires(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (old, old_secret) = app.create_key(&w.id, &[]).await;
    let rotated = rotate(&app, &old.id, seconds(2)).await.unwrap();
    let new = rotated.api_key.unwrap();
    assert!(
        new.expire_time.is_none(),
        "the successor keeps the old key's (absent) expiry"
    );
    let old_now = get(&app, &old.id).await.unwrap();
    assert_eq!(old_now.successor_id, new.id);
    assert!(
        old_now.revoke_time.is_none(),
        "not revoked during the grace period"
    );
    assert_eq!(
        app.verify(&old_secret, &[]).await.code(),
        pb::VerifyCode::Valid,
        "the old key works during the grace period"
    );
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    // A key is rotated once, even while its grace period runs.
    assert_err(
        rotate(&app, &old.id, seconds(2)).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_ROTATED",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let v = app.verify(&old_secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Expired, "past the grace period");
    assert!(!v.valid);
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_err(
        rotate(&app, &old.id, seconds(2)).await,
        Code::FailedPrecondition,
        "KEY_ALREADY_ROTATED",
    );

    // The successor keeps the old key's expiry; the old key ends at the sooner of its own
    // expiry and the end of the grace period.
    let expire = in_secs(3600);
    let dated = create(
        &app,
        pb::CreateApiKeyRequest {
            expire_time: Some(expire),
            ..new_key(&w.id)
        },
    )
    .await
    .unwrap()
    .api_key
    .unwrap();
    let before = unix_now();
    let successor = rotate(&app, &dated.id, seconds(60))
        .await
        .unwrap()
        .api_key
        .unwrap();
    assert_eq!(successor.expire_time, Some(expire));
    let retired = get(&app, &dated.id).await.unwrap().expire_time.unwrap();
    assert!(
        retired.seconds >= before + 59 && retired.seconds <= unix_now() + 61,
        "the old key expires when the grace period ends: {retired:?}"
    );
    let short = create(
        &app,
        pb::CreateApiKeyRequest {
            expire_time: Some(expire),
            ..new_key(&w.id)
        },
    )
    .await
    .unwrap()
    .api_key
    .unwrap();
    let successor = rotate(&app, &short.id, seconds(7 * 24 * 3600))
        .await
        .unwrap()
        .api_key
        .unwrap();
    assert_eq!(successor.expire_time, Some(expire));
    assert_eq!(
        get(&app, &short.id).await.unwrap().expire_time,
        Some(expire),
        "a grace period never extends a key's life"
    );
}

async fn rotate_refuses_revoked_keys_and_bad_grace_periods(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (revoked, _) = app.create_key(&w.id, &[]).await;
    revoke(&app, &revoked.id).await.unwrap();
    let status = rotate(&app, &revoked.id, None)
        .await
        .expect_err("a revoked key cannot be rotated");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(!reason(&status).is_empty(), "ErrorInfo with a reason");

    let (key, secret) = app.create_key(&w.id, &[]).await;
    for grace in [
        prost_types::Duration {
            seconds: -1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 0,
            nanos: -1,
        },
        prost_types::Duration {
            seconds: 30 * 24 * 3600 + 1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 365 * 24 * 3600,
            nanos: 0,
        },
    ] {
        let status = assert_err(
            rotate(&app, &key.id, Some(grace)).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["grace_period"], "{grace:?}");
    }
    let status = assert_err(
        rotate(&app, "nope", None).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
    // None of that touched the key.
    let untouched = get(&app, &key.id).await.unwrap();
    assert!(untouched.successor_id.is_empty());
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);

    // Exactly 30 days is allowed.
    let rotated = rotate(&app, &key.id, seconds(30 * 24 * 3600))
        .await
        .unwrap();
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
    assert_eq!(
        get(&app, &key.id).await.unwrap().successor_id,
        rotated.api_key.unwrap().id
    );
}

async fn delete_forgets_the_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let (kept, kept_secret) = app.create_key(&w.id, &[]).await;
    delete(&app, &key.id).await.unwrap();
    assert_err(get(&app, &key.id).await, Code::NotFound, "NOT_FOUND");
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::NotFound);
    assert!(v.api_key.is_none());
    assert_err(delete(&app, &key.id).await, Code::NotFound, "NOT_FOUND");
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys, std::slice::from_ref(&kept));
    assert_eq!(
        app.verify(&kept_secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );

    // Another tenant cannot delete this tenant's key.
    let stranger = Cred::Bearer(token_for_new_tenant());
    let status = app
        .keys()
        .delete_api_key(req(
            pb::DeleteApiKeyRequest {
                id: kept.id.clone(),
            },
            &stranger,
        ))
        .await;
    assert_err(status, Code::NotFound, "NOT_FOUND");
    let still = get(&app, &kept.id).await.unwrap();
    assert_eq!((still.id, still.etag), (kept.id, kept.etag), "untouched");
    let status = assert_err(
        delete(&app, "nope").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
}

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
        create_as(&app, with_scopes(&["keyplane.workspaces:write"]), &limited).await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert!(
        reason_metadata(&status, "scopes").contains("keyplane.workspaces:write"),
        "{status:?}"
    );
    assert_err(
        create_as(
            &app,
            with_scopes(&["keyplane.api_keys:read", "keyplane.api_keys:verify"]),
            &limited,
        )
        .await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    let ordinary = create_as(
        &app,
        with_scopes(&["keyplane.api_keys:read", "crm:read"]),
        &limited,
    )
    .await
    .expect("a held built-in scope and custom scopes may be granted");
    let ordinary_key = ordinary.api_key.unwrap();
    // A wildcard over built-in scopes is never a way around the rule.
    let status = create_as(&app, with_scopes(&["keyplane.api_keys:*"]), &limited)
        .await
        .expect_err("keyplane.api_keys:* would be stronger than the caller");
    assert!(
        matches!(
            status.code(),
            Code::PermissionDenied | Code::InvalidArgument
        ),
        "{status:?}"
    );
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys.len(), 1, "refused requests created nothing");

    // Update: adding a built-in scope the caller lacks.
    let escalate = pb::ApiKey {
        id: ordinary_key.id.clone(),
        scopes: strings(&["keyplane.api_keys:read", "keyplane.scopes:write"]),
        ..Default::default()
    };
    assert_err(
        update_as(&app, escalate, &["scopes"], "", &limited).await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert_eq!(
        get(&app, &ordinary_key.id).await.unwrap().scopes,
        ordinary_key.scopes,
        "the refused update changed nothing"
    );
    // ... while other fields of such a key may still be updated.
    let rename = pb::ApiKey {
        id: ordinary_key.id.clone(),
        name: "renamed".into(),
        ..Default::default()
    };
    update_as(&app, rename, &["name"], "", &limited)
        .await
        .unwrap();

    // Rotate: a key holding a built-in scope the caller lacks (issued by the full admin).
    let (strong, strong_secret) = app.create_key(&w.id, &["keyplane.workspaces:read"]).await;
    assert_err(
        rotate_as(&app, &strong.id, None, &limited).await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert!(get(&app, &strong.id).await.unwrap().successor_id.is_empty());
    assert_eq!(
        app.verify(&strong_secret, &[]).await.code(),
        pb::VerifyCode::Valid,
        "the refused rotation did not revoke the key"
    );
    // A key with scopes the caller holds can be rotated by it.
    rotate_as(&app, &ordinary_key.id, None, &limited)
        .await
        .unwrap();

    // An admin key with `keyplane.api_keys:write` alone cannot mint a stronger key.
    let (_, admin_secret) = app.create_key(&w.id, &["keyplane.api_keys:write"]).await;
    let admin_key = Cred::ApiKey(admin_secret);
    assert_err(
        create_as(&app, with_scopes(&["keyplane.api_keys:verify"]), &admin_key).await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    assert_err(
        create_as(&app, with_scopes(&["keyplane.api_keys:read"]), &admin_key).await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    let same = create_as(
        &app,
        with_scopes(&["keyplane.api_keys:write", "crm:read"]),
        &admin_key,
    )
    .await
    .expect("an admin key may grant what it holds");
    assert_secret_shape(&same.secret, "kp");
}

/// A value of the `ErrorInfo.metadata` of a status.
fn reason_metadata(status: &Status, key: &str) -> String {
    tonic_types::StatusExt::get_details_error_info(status)
        .and_then(|info| info.metadata.get(key).cloned())
        .unwrap_or_default()
}

async fn last_used_time_follows_successful_verifications(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let (key, secret) = app.create_key(&w.id, &["crm:read"]).await;
    assert!(key.last_used_time.is_none());

    // Failed verifications do not count as use.
    assert_eq!(
        app.verify(&secret, &["keyplane.scopes:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        get(&app, &key.id).await.unwrap().last_used_time.is_none(),
        "an INSUFFICIENT_SCOPES verification is not a use"
    );

    let before = unix_now();
    assert_eq!(
        app.verify(&secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    let mut used = None;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = get(&app, &key.id).await.unwrap().last_used_time;
        if used.is_some() {
            break;
        }
    }
    let used = used.expect("last_used_time set within ~1 s of a VALID verification");
    assert!(
        used.seconds >= before - 1 && used.seconds <= unix_now() + 1,
        "{used:?} is not about now"
    );

    // A disabled key's failed verification leaves another key's state alone, and does not
    // set its own.
    let (other, other_secret) = app.create_key(&w.id, &[]).await;
    update(
        &app,
        pb::ApiKey {
            id: other.id.clone(),
            disabled: true,
            ..Default::default()
        },
        &["disabled"],
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        app.verify(&other_secret, &[]).await.code(),
        pb::VerifyCode::Disabled
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(get(&app, &other.id).await.unwrap().last_used_time.is_none());
}

async fn concurrent_idempotent_creates_make_one_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let request = pb::CreateApiKeyRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        ..new_key(&w.id)
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.keys();
            let request = req(request.clone(), &app.admin());
            tokio::spawn(async move { client.create_api_key(request).await })
        })
        .collect();
    let mut ids = Vec::new();
    let mut secrets = 0;
    for task in tasks {
        let response = task
            .await
            .unwrap()
            .expect("every retry succeeds")
            .into_inner();
        ids.push(response.api_key.unwrap().id);
        if !response.secret.is_empty() {
            secrets += 1;
        }
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every call returned the same key: {ids:?}");
    assert_eq!(secrets, 1, "exactly one call handed out the secret");
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys.len(), 1);
}

async fn concurrent_rotations_make_one_successor(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut client = app.keys();
            let request = req(
                pb::RotateApiKeyRequest {
                    id: key.id.clone(),
                    grace_period: seconds(600),
                },
                &app.admin(),
            );
            tokio::spawn(async move { client.rotate_api_key(request).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => winners.push(response.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(reason(&status), "KEY_ALREADY_ROTATED", "{status:?}");
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rotation wins");
    let successor = winners.pop().unwrap();
    let successor_id = successor.api_key.unwrap().id;
    assert_eq!(get(&app, &key.id).await.unwrap().successor_id, successor_id);
    let listed = list(&app, pb::ListApiKeysRequest::default()).await.unwrap();
    assert_eq!(listed.api_keys.len(), 2, "one key and one successor");
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
    assert_eq!(
        app.verify(&successor.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
}
