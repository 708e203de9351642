//! `last_used_time` follows successful verifications only.
use std::time::Duration;

use chrono::{DateTime, Utc};
use keyplane::domain::TenantId;
use keyplane::proto as pb;
use keyplane::storage::{Store, connect};
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use uuid::Uuid;

use keyplane_testkit::*;

on_both_backends!(
    last_used_time_follows_successful_verifications,
    usage_flush_only_moves_forward_within_the_tenant,
);

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
        app.get_key(&key.id).await.unwrap().last_used_time.is_none(),
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
        used = app.get_key(&key.id).await.unwrap().last_used_time;
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
    app.disable_key(&other.id).await;
    assert_eq!(
        app.verify(&other_secret, &[]).await.code(),
        pb::VerifyCode::Disabled
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        app.get_key(&other.id)
            .await
            .unwrap()
            .last_used_time
            .is_none()
    );
}

/// The flush statement itself (`Store::record_last_used`), given what the recorder never
/// sends but a statement joining on ids must still get right: a key id under another
/// tenant, a time older than the stored one, and more keys than one statement takes.
async fn usage_flush_only_moves_forward_within_the_tenant(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (a, _) = app.create_key(&w.id, &[]).await;
    let (b, _) = app.create_key(&w.id, &[]).await;
    let db = connect(&app.db.url).await.unwrap();
    if backend == Backend::Postgres {
        // The room for in-place (HOT) updates that makes the flush fast at scale.
        let options = db
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT array_to_string(reloptions, ',') FROM pg_class WHERE relname = 'api_keys'",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get_by_index::<String>(0)
            .unwrap();
        assert_eq!(options, "fillfactor=85");
    }
    let store = Store::new(db);
    let tenant = TenantId::new(app.tenant);
    let (a_id, b_id) = (
        Uuid::parse_str(&a.id).unwrap(),
        Uuid::parse_str(&b.id).unwrap(),
    );
    let at = |secs: i64| DateTime::<Utc>::from_timestamp(secs, 0).unwrap();
    let used = async |id: &str| {
        app.get_key(id)
            .await
            .unwrap()
            .last_used_time
            .map(|t| t.seconds)
    };

    // Unknown ids make the batch longer than one statement's chunk on either backend.
    let mut batch: Vec<_> = (0..10_050)
        .map(|_| (tenant, Uuid::new_v4(), at(1_900_000_000)))
        .collect();
    batch.push((tenant, a_id, at(1_900_000_200)));
    batch.push((TenantId::new(Uuid::now_v7()), b_id, at(1_900_000_300)));
    store.record_last_used(&batch).await.unwrap();
    assert_eq!(used(&a.id).await, Some(1_900_000_200));
    assert_eq!(
        used(&b.id).await,
        None,
        "another tenant's id never touches the key"
    );

    store
        .record_last_used(&[
            (tenant, b_id, at(1_900_000_100)),
            (tenant, a_id, at(1_900_000_100)),
        ])
        .await
        .unwrap();
    assert_eq!(
        used(&a.id).await,
        Some(1_900_000_200),
        "an older time is ignored"
    );
    assert_eq!(used(&b.id).await, Some(1_900_000_100));

    store
        .record_last_used(&[(tenant, a_id, at(1_900_000_400))])
        .await
        .unwrap();
    assert_eq!(used(&a.id).await, Some(1_900_000_400));
}
