//! ImportApiKeys (keys of another system, brought in unchanged): by secret or by SHA-256
//! digest, item by item, idempotent by digest, audited; imported keys of any shape verify
//! with their original secret, and strings of other shapes are looked up only once the
//! deployment holds imported keys.
use futures::StreamExt;
use keyplane::proto as pb;
use sha2::{Digest, Sha256};
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    imported_keys_get_allow_lists_as_created_keys_do,
    keys_imported_by_secret_or_digest_verify_with_their_secret,
    a_mixed_batch_answers_each_item,
    a_call_holds_at_most_1000_keys,
    other_shapes_are_malformed_until_keys_are_imported,
    a_bearer_of_another_shape_is_checked_once_keys_are_imported,
    a_home_grown_table_of_10000_hashed_keys_migrates,
);

type Outcome = pb::import_api_key_result::Result;

fn sha256_hex(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A random secret of another system: 32 random bytes as hex.
fn random_hex() -> String {
    let bytes: [u8; 32] = rand_bytes();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn rand_bytes() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).unwrap();
    bytes
}

fn by_secret(secret: &str, scopes: &[&str]) -> pb::ImportedApiKey {
    pb::ImportedApiKey {
        secret: secret.into(),
        name: "imported".into(),
        scopes: strings(scopes),
        ..Default::default()
    }
}

fn by_digest(secret: &str, hint: &str) -> pb::ImportedApiKey {
    pb::ImportedApiKey {
        sha256: sha256_hex(secret),
        hint: hint.into(),
        ..Default::default()
    }
}

async fn import(
    client: &Client,
    workspace_id: &str,
    keys: Vec<pb::ImportedApiKey>,
) -> Result<Vec<Outcome>, tonic::Status> {
    client
        .keys
        .clone()
        .import_api_keys(pb::ImportApiKeysRequest {
            workspace_id: workspace_id.into(),
            keys,
        })
        .await
        .inner()
        .map(|r| r.results.into_iter().map(|r| r.result.unwrap()).collect())
}

fn created(outcome: &Outcome) -> &pb::ApiKey {
    match outcome {
        Outcome::ApiKey(key) => key,
        Outcome::Error(e) => panic!("item refused: {e:?}"),
    }
}

/// The item's error: its code, `ErrorInfo` reason and the fields it names.
fn refusal(outcome: &Outcome) -> (Code, String, Vec<String>) {
    let Outcome::Error(e) = outcome else {
        panic!("item created: {outcome:?}");
    };
    let status = tonic::Status::with_details(
        Code::from_i32(e.code),
        e.message.clone(),
        prost::Message::encode_to_vec(e).into(),
    );
    (status.code(), reason(&status), violated_fields(&status))
}

async fn keys_imported_by_secret_or_digest_verify_with_their_secret(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("migrated").await;
    app.create_scope("crm:read", "").await;
    let admin = app.as_admin();
    let stripe_like = format!("sk_test_51Hx{}", &random_hex()[..40]);
    let uuid = uuid::Uuid::new_v4().to_string();
    let hex = random_hex();
    let hashed = random_hex();
    // A key of another keyplane: it keeps its prefix in masked_key.
    let other = spawn_app(Backend::Sqlite).await;
    let other_ws = other.create_workspace("old").await;
    let (_, keyplane_secret) = other.create_key(&other_ws.id, &[]).await;

    let results = import(
        &admin,
        &ws.id,
        vec![
            by_secret(&stripe_like, &["crm:read"]),
            by_secret(&uuid, &["crm:read"]),
            by_secret(&hex, &[]),
            by_digest(&hashed, "x9Z"),
            by_secret(&keyplane_secret, &[]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(results.len(), 5);
    let keys: Vec<&pb::ApiKey> = results.iter().map(created).collect();
    assert_eq!(
        keys[0].masked_key,
        format!("****{}", &stripe_like[stripe_like.len() - 4..])
    );
    assert_eq!(keys[0].prefix, "");
    assert_eq!(
        keys[1].masked_key,
        format!("****{}", &uuid[uuid.len() - 4..])
    );
    assert_eq!(keys[3].masked_key, "****x9Z");
    assert_eq!(keys[4].prefix, "kp");
    assert!(
        keys[4].masked_key.starts_with("kp_****"),
        "{}",
        keys[4].masked_key
    );
    for key in &keys {
        assert_eq!(key.workspace_id, ws.id);
        // Nothing of a secret but its last 4 characters travels back.
        let shown = format!("{key:?}");
        for secret in [&stripe_like, &uuid, &hex] {
            assert!(!shown.contains(&secret[..secret.len() - 4]), "{shown}");
        }
    }

    for (secret, key) in [
        (&stripe_like, keys[0]),
        (&uuid, keys[1]),
        (&hex, keys[2]),
        (&hashed, keys[3]),
        (&keyplane_secret, keys[4]),
    ] {
        let v = app.verify(secret, &[]).await;
        assert_eq!(v.code(), pb::VerifyCode::Valid, "{}", key.masked_key);
        assert_eq!(v.api_key.unwrap().id, key.id);
    }
    let v = app.verify(&stripe_like, &["crm:read"]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid);
    assert_eq!(
        app.verify(&hex, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Ordinary keys from here on: revocation, and rotation to a keyplane-format secret.
    app.revoke_key(&keys[2].id).await;
    assert_eq!(app.verify(&hex, &[]).await.code(), pb::VerifyCode::Revoked);
    let rotated = admin
        .keys
        .clone()
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: keys[1].id.clone(),
            grace_period: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_secret_shape(&rotated.secret, "kp");
    assert_eq!(rotated.api_key.as_ref().unwrap().prefix, "kp");
    assert_eq!(rotated.api_key.unwrap().scopes, ["crm:read"]);
    assert_eq!(
        app.verify(&rotated.secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(app.verify(&uuid, &[]).await.code(), pb::VerifyCode::Revoked);

    // One audit event per created key, the caller as its actor.
    let events = admin
        .audit
        .clone()
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "api_key.import".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .audit_events;
    assert_eq!(events.len(), 5, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e.actor.as_ref().unwrap().subject == "tester")
    );
}

async fn a_mixed_batch_answers_each_item(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut admin = app.as_admin();
    let ws = admin
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "policy".into(),
            max_key_ttl: seconds(3600),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    app.create_scope("crm:read", "").await;
    let good = random_hex();
    let taken = random_hex();
    import(&admin, &ws.id, vec![by_secret(&taken, &[])])
        .await
        .unwrap();
    let items = vec![
        /* 0 */ by_secret(&good, &["crm:read"]),
        /* 1 */
        pb::ImportedApiKey {
            sha256: "zz".repeat(32),
            ..Default::default()
        },
        /* 2 */
        pb::ImportedApiKey {
            secret: random_hex(),
            sha256: sha256_hex("x"),
            ..Default::default()
        },
        /* 3 */ pb::ImportedApiKey::default(),
        /* 4 */ by_secret(&random_hex(), &["crm:nope"]),
        /* 5 */
        pb::ImportedApiKey {
            expire_time: Some(in_secs(7200)),
            ..by_secret(&random_hex(), &[])
        },
        /* 6 */ by_secret(&good, &[]),
        /* 7 */ by_secret(&taken, &[]),
        /* 8 */
        pb::ImportedApiKey {
            hint: "nope".into(),
            ..by_secret(&random_hex(), &[])
        },
        /* 9 */ by_secret("too short", &[]),
        /* 10 */ by_secret(&random_hex(), &["keyplane.audit:read"]),
        /* 11 */
        pb::ImportedApiKey {
            roles: strings(&["ghost"]),
            ..by_secret(&random_hex(), &[])
        },
    ];
    // A caller that may write keys but holds no other built-in scope.
    let writer = app.client(&bearer(token(
        Some(app.tenant),
        &["keyplane.api_keys:write"],
    )));
    let results = import(&writer, &ws.id, items).await.unwrap();
    assert_eq!(results.len(), 12);
    let key = created(&results[0]);
    // No expiry asked: the workspace policy's.
    let expiry = key.expire_time.as_ref().unwrap().seconds - unix_now();
    assert!((3500..=3600).contains(&expiry), "{expiry}");
    let expect = [
        (
            1,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "keys[1].sha256",
        ),
        (
            2,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "keys[2].sha256",
        ),
        (
            3,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "keys[3].secret",
        ),
        (4, Code::InvalidArgument, "UNKNOWN_SCOPE", "keys[4].scopes"),
        (
            5,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "keys[5].expire_time",
        ),
        (8, Code::InvalidArgument, "INVALID_ARGUMENT", "keys[8].hint"),
        (
            9,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "keys[9].secret",
        ),
        (
            11,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
            "keys[11].roles",
        ),
    ];
    for (i, code, why, field) in expect {
        let (got_code, got_reason, fields) = refusal(&results[i]);
        assert_eq!((got_code, got_reason.as_str()), (code, why), "item {i}");
        assert_eq!(fields, [field], "item {i}");
    }
    for i in [6, 7] {
        let (code, why, _) = refusal(&results[i]);
        assert_eq!(
            (code, why.as_str()),
            (Code::AlreadyExists, "ALREADY_EXISTS"),
            "item {i}"
        );
    }
    let (code, why, _) = refusal(&results[10]);
    assert_eq!(
        (code, why.as_str()),
        (Code::PermissionDenied, "SCOPE_ESCALATION")
    );
    // Only the good item was created.
    assert_eq!(
        app.verify(&good, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    let listed = admin
        .keys
        .list_api_keys(pb::ListApiKeysRequest {
            workspace_id: ws.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert_eq!(listed.len(), 2, "the earlier key and the good item");
}

async fn a_call_holds_at_most_1000_keys(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let admin = app.as_admin();
    let many: Vec<pb::ImportedApiKey> = (0..1001)
        .map(|i| by_digest(&format!("secret-{i}"), ""))
        .collect();
    assert_invalid(import(&admin, &ws.id, many).await, &["keys"], "1001 keys");
    assert_invalid(
        import(&admin, &ws.id, Vec::new()).await,
        &["keys"],
        "no keys",
    );
    // Another tenant's workspace, or none: the whole call fails.
    let missing = uuid::Uuid::now_v7().to_string();
    assert_err(
        import(&admin, &missing, vec![by_digest("x", "")]).await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn other_shapes_are_malformed_until_keys_are_imported(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let made_up = format!("legacy-{}", random_hex());
    assert_eq!(
        app.verify(&made_up, &[]).await.code(),
        pb::VerifyCode::Malformed
    );
    let secret = random_hex();
    import(&app.as_admin(), &ws.id, vec![by_secret(&secret, &[])])
        .await
        .unwrap();
    // Now a string of another shape may be a key: looked up, and unknown.
    for _ in 0..3 {
        assert_eq!(
            app.verify(&made_up, &[]).await.code(),
            pb::VerifyCode::NotFound
        );
    }
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
    // Still malformed: too short, too long, not printable ASCII.
    for bad in [
        "short".to_owned(),
        "x".repeat(513),
        "has a space in it".to_owned(),
    ] {
        assert_eq!(
            app.verify(&bad, &[]).await.code(),
            pb::VerifyCode::Malformed,
            "{bad}"
        );
    }
    // A made-up string cached as unknown, then imported: the import evicts the entry.
    let later = random_hex();
    assert_eq!(
        app.verify(&later, &[]).await.code(),
        pb::VerifyCode::NotFound
    );
    import(&app.as_admin(), &ws.id, vec![by_digest(&later, "")])
        .await
        .unwrap();
    assert_eq!(app.verify(&later, &[]).await.code(), pb::VerifyCode::Valid);
}

async fn a_bearer_of_another_shape_is_checked_once_keys_are_imported(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let secret = format!("sk_live_{}", random_hex());
    let check = |value: &str| {
        let mut request = envoy_check("unused");
        let headers = &mut request
            .attributes
            .as_mut()
            .unwrap()
            .request
            .as_mut()
            .unwrap()
            .http
            .as_mut()
            .unwrap()
            .headers;
        headers.clear();
        headers.insert("authorization".into(), format!("Bearer {value}"));
        request
    };
    let status = |response: envoy_types::pb::envoy::service::auth::v3::CheckResponse| {
        response.status.map(|s| s.code).unwrap_or_default()
    };
    let mut authz = app.as_admin().authorization();
    // Before any import, such a bearer is not a key at all: denied as missing.
    let denied = authz.check(check(&secret)).await.unwrap().into_inner();
    assert_ne!(status(denied), 0);
    import(&app.as_admin(), &ws.id, vec![by_secret(&secret, &[])])
        .await
        .unwrap();
    let allowed = authz.check(check(&secret)).await.unwrap().into_inner();
    assert_eq!(status(allowed), 0, "allowed");
    // x-api-key takes any shape too.
    let allowed = authz
        .check(envoy_check(&secret))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(allowed), 0, "allowed");
}

/// A home-grown table: 10,000 keys kept as SHA-256 hex; imported in batches of 1,000;
/// every key then verifies with its original secret, and a retried batch creates nothing.
async fn a_home_grown_table_of_10000_hashed_keys_migrates(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("legacy").await;
    let admin = app.as_admin();
    let secrets: Vec<String> = (0..10_000).map(|_| random_hex()).collect();
    let table: Vec<String> = secrets.iter().map(|s| sha256_hex(s)).collect();
    let batch = |rows: &[String]| -> Vec<pb::ImportedApiKey> {
        rows.iter()
            .map(|digest| pb::ImportedApiKey {
                sha256: digest.clone(),
                name: "legacy".into(),
                ..Default::default()
            })
            .collect()
    };
    for rows in table.chunks(1000) {
        let results = import(&admin, &ws.id, batch(rows)).await.unwrap();
        assert_eq!(results.len(), rows.len());
        for r in &results {
            created(r);
        }
    }
    let codes: Vec<pb::VerifyCode> = futures::stream::iter(secrets.iter())
        .map(|s| {
            let app = &app;
            async move { app.verify(s, &[]).await.code() }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(codes.iter().all(|c| *c == pb::VerifyCode::Valid));

    let retried = import(&admin, &ws.id, batch(&table[3000..4000]))
        .await
        .unwrap();
    for r in &retried {
        let (code, _, _) = refusal(r);
        assert_eq!(code, Code::AlreadyExists);
    }
    let mut count = 0;
    let mut page_token = String::new();
    loop {
        let page = admin
            .keys
            .clone()
            .list_api_keys(pb::ListApiKeysRequest {
                workspace_id: ws.id.clone(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        count += page.api_keys.len();
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(count, 10_000);
}

async fn imported_keys_get_allow_lists_as_created_keys_do(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let ws = admin
        .workspaces
        .clone()
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "migrated".into(),
            default_allowed_cidrs: strings(&["203.0.113.0/24"]),
            ..Default::default()
        })
        .await
        .resource()
        .unwrap();
    let item = |secret: &str, cidrs: &[&str]| pb::ImportedApiKey {
        allowed_cidrs: strings(cidrs),
        ..by_secret(secret, &[])
    };
    let outcomes = import(
        &admin,
        &ws.id,
        vec![
            item("legacy-office-0001", &[]),
            item("legacy-lab-0002", &["10.0.0.0/8"]),
            item("legacy-typo-0003", &["10.0.0.0/40"]),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        created(&outcomes[0]).allowed_cidrs,
        ["203.0.113.0/24"],
        "the workspace's default"
    );
    assert_eq!(created(&outcomes[1]).allowed_cidrs, ["10.0.0.0/8"]);
    let (code, _, fields) = refusal(&outcomes[2]);
    assert_eq!(
        (code, fields),
        (
            Code::InvalidArgument,
            vec!["keys[2].allowed_cidrs[0]".to_owned()]
        )
    );
    let from = |secret: &str| {
        let request = pb::VerifyApiKeyRequest {
            key: secret.into(),
            client_ip: "10.1.1.1".into(),
            ..Default::default()
        };
        let mut keys = admin.keys.clone();
        async move {
            keys.verify_api_key(request)
                .await
                .unwrap()
                .into_inner()
                .code()
        }
    };
    assert_eq!(from("legacy-lab-0002").await, pb::VerifyCode::Valid);
    assert_eq!(
        from("legacy-office-0001").await,
        pb::VerifyCode::IpNotAllowed
    );
}
