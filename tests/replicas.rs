//! Several replicas on one PostgreSQL database: a key hot in one replica's verification
//! cache is refused there within a second of being revoked, disabled, re-scoped or deleted
//! through another, also while the replicas' invalidation feeds are being cut
//! (`pg_terminate_backend`), and the feeds recover.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use keyplane::proto as pb;
use keyplane_testkit::*;
use sea_orm::ConnectionTrait;

/// The bound every replica must keep.
const BOUND: Duration = Duration::from_secs(1);

/// What `writer`'s credential sees on `replica`.
async fn verify_on(
    replica: &TestApp,
    writer: &TestApp,
    secret: &str,
    required: &[&str],
) -> pb::VerifyCode {
    replica
        .client(&writer.admin())
        .verify(secret, required)
        .await
        .code()
}

/// Polls every replica until it answers `expected`; returns the slowest time taken.
async fn until_everywhere(
    replicas: &[&TestApp],
    writer: &TestApp,
    secret: &str,
    required: &[&str],
    expected: pb::VerifyCode,
    since: Instant,
) -> Duration {
    let mut slowest = Duration::ZERO;
    for replica in replicas {
        loop {
            let code = verify_on(replica, writer, secret, required).await;
            if code == expected {
                slowest = slowest.max(since.elapsed());
                break;
            }
            assert_eq!(code, pb::VerifyCode::Valid, "an unexpected answer");
            assert!(
                since.elapsed() < BOUND,
                "replica {} still answers VALID {:?} after the write",
                replica.addr,
                since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    slowest
}

/// Applies one kind of write through `writer` to a fresh key that every other replica has
/// cached, and checks they all refuse it within the bound.
async fn honoured_everywhere(all: &[TestApp], change: &str) -> Duration {
    let writer = &all[0];
    let others: Vec<&TestApp> = all[1..].iter().collect();
    let ws = writer.create_workspace("w").await;
    let (key, secret) = writer.create_key(&ws.id, &["crm:read"]).await;
    for replica in &others {
        for _ in 0..2 {
            assert_eq!(
                verify_on(replica, writer, &secret, &["crm:read"]).await,
                pb::VerifyCode::Valid
            );
        }
    }
    let mut keys = writer.as_admin().keys;
    let expected = match change {
        "revoke" => {
            writer.revoke_key(&key.id).await;
            pb::VerifyCode::Revoked
        }
        "disable" => {
            writer.disable_key(&key.id).await;
            pb::VerifyCode::Disabled
        }
        "rescope" => {
            keys.update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    id: key.id,
                    ..Default::default()
                }),
                update_mask: mask(&["scopes"]),
                etag: String::new(),
            })
            .await
            .expect("rescope");
            pb::VerifyCode::InsufficientScopes
        }
        _ => {
            keys.delete_api_key(pb::DeleteApiKeyRequest { id: key.id })
                .await
                .expect("delete");
            pb::VerifyCode::NotFound
        }
    };
    let since = Instant::now();
    until_everywhere(&others, writer, &secret, &["crm:read"], expected, since).await
}

#[test]
fn writes_on_one_replica_are_honoured_by_the_others_within_a_second() {
    if !postgres_or_skip("replicas::writes_on_one_replica_are_honoured") {
        return;
    }
    run_test(async {
        let all = replicas(3, Duration::from_millis(300)).await;
        all[0].create_scope("crm:read", "").await;
        for change in ["revoke", "disable", "rescope", "delete"] {
            let took = honoured_everywhere(&all, change).await;
            eprintln!("{change}: honoured by every replica after {took:?}");
        }
    });
}

/// Ends every invalidation feed of this database (each replica's LISTEN connection).
async fn cut_feeds(db_url: &str) -> u64 {
    let conn = sea_orm::Database::connect(db_url).await.expect("connect");
    let cut = conn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        ))
        .await
        .expect("terminate the feeds")
        .len() as u64;
    let _ = conn.close().await;
    cut
}

#[test]
fn revocations_are_honoured_while_the_feeds_are_cut_and_after_they_recover() {
    if !postgres_or_skip("replicas::revocations_are_honoured_while_the_feeds_are_cut") {
        return;
    }
    run_test(async {
        let all = replicas(3, Duration::from_millis(300)).await;
        all[0].create_scope("crm:read", "").await;
        for round in 0..3 {
            let writer = &all[0];
            let ws = writer.create_workspace("w").await;
            let (key, secret) = writer.create_key(&ws.id, &["crm:read"]).await;
            for replica in &all[1..] {
                for _ in 0..2 {
                    assert_eq!(
                        verify_on(replica, writer, &secret, &[]).await,
                        pb::VerifyCode::Valid
                    );
                }
            }
            let cut = cut_feeds(&writer.db.url).await;
            assert!(cut >= 3, "round {round}: only {cut} feeds to cut");
            writer.revoke_key(&key.id).await;
            let since = Instant::now();
            let others: Vec<&TestApp> = all[1..].iter().collect();
            let took = until_everywhere(
                &others,
                writer,
                &secret,
                &[],
                pb::VerifyCode::Revoked,
                since,
            )
            .await;
            eprintln!("round {round}, feeds cut: revocation honoured after {took:?}");

            // Recovered: the feeds come back, caches answer again and stay correct.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let took = honoured_everywhere(&all, "revoke").await;
            eprintln!("round {round}, feeds back: revocation honoured after {took:?}");
        }
        // Back for good: every replica listens again.
        let listening = cut_feeds(&all[0].db.url).await;
        assert!(
            listening >= 3,
            "only {listening} replicas listen after the cuts"
        );
    });
}

/// A key of another shape imported through one replica verifies on the others within the
/// bound: the import's notification tells them the deployment now holds imported keys
/// (before it, such strings are MALFORMED without a lookup).
#[test]
fn a_key_imported_on_one_replica_verifies_on_the_others() {
    if !postgres_or_skip("replicas::a_key_imported_on_one_replica_verifies_on_the_others") {
        return;
    }
    run_test(async {
        let all = replicas(3, Duration::from_millis(300)).await;
        let writer = &all[0];
        let ws = writer.create_workspace("migrated").await;
        let secret = format!("legacy-{}", uuid::Uuid::new_v4());
        for replica in &all {
            assert_eq!(
                verify_on(replica, writer, &secret, &[]).await,
                pb::VerifyCode::Malformed
            );
        }
        let results = writer
            .as_admin()
            .keys
            .import_api_keys(pb::ImportApiKeysRequest {
                workspace_id: ws.id.clone(),
                keys: vec![pb::ImportedApiKey {
                    secret: secret.clone(),
                    ..Default::default()
                }],
            })
            .await
            .expect("import")
            .into_inner()
            .results;
        assert!(matches!(
            results[0].result,
            Some(pb::import_api_key_result::Result::ApiKey(_))
        ));
        let since = Instant::now();
        for replica in &all[1..] {
            loop {
                let code = verify_on(replica, writer, &secret, &[]).await;
                if code == pb::VerifyCode::Valid {
                    break;
                }
                assert_eq!(code, pb::VerifyCode::Malformed, "an unexpected answer");
                assert!(
                    since.elapsed() < BOUND,
                    "replica {} still answers MALFORMED {:?} after the import",
                    replica.addr,
                    since.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        eprintln!(
            "imported key verified everywhere after {:?}",
            since.elapsed()
        );
    });
}
