//! PostgreSQL unreachable (SPEC §3.4.2, §5.4): cached keys keep answering from the cache as
//! it stood when the invalidation feed was last good, flagged `stale`, for at most
//! `--stale-if-error`; uncached keys are UNAVAILABLE; health keeps the verification names
//! SERVING and the write services NOT_SERVING; a partitioned replica honours a revocation
//! within its bound and within a second of healing. Also: a multi-host URL whose first host
//! dies moves the pool to the next (§5.3). The database "goes away" behind a TCP proxy we
//! cut, so these run on any machine with PostgreSQL; `tests/failover.rs` runs a real HA
//! pair.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::google::protobuf::value::Kind;
use keyplane::proto as pb;
use keyplane_testkit::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

/// How long the database stays away in the long outage test: 60 s, as the quality bar
/// says; `KEYPLANE_TEST_OUTAGE_SECS` shortens it for a quick local run.
fn outage_length() -> Duration {
    let secs = std::env::var("KEYPLANE_TEST_OUTAGE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// `db_url` with its host and port replaced by these hosts (libpq's multi-host form when
/// there are several), and `query` appended.
fn through(db_url: &str, hosts: &[SocketAddr], query: &str) -> String {
    let url = url::Url::parse(db_url).unwrap();
    let hosts: Vec<String> = hosts.iter().map(ToString::to_string).collect();
    let auth = match url.password() {
        Some(pw) => format!("{}:{pw}@", url.username()),
        None if url.username().is_empty() => String::new(),
        None => format!("{}@", url.username()),
    };
    format!("postgres://{auth}{}{}{query}", hosts.join(","), url.path())
}

/// A replica whose every database connection goes through its own proxy.
async fn proxied_replica(db: TestDb, stale_if_error: Duration) -> (TestApp, CuttableProxy) {
    let proxy = CuttableProxy::start(database_addr(&db.url)).await;
    let mut settings = test_settings(&through(&db.url, &[proxy.addr], ""));
    settings.stale_if_error = stale_if_error;
    let app = spawn_with(db, settings).await;
    // The feed must have been good once for the cache to be trusted through an outage: it
    // listens within milliseconds, and its first heartbeat comes back within 250 ms.
    tokio::time::sleep(Duration::from_secs(1)).await;
    (app, proxy)
}

/// Waits until a write service's health (which follows the database) is `wanted`.
async fn wait_for_writes(app: &TestApp, wanted: ServingStatus, within: Duration) {
    wait_for_service_health(app, "keyplane.v1.ApiKeyService", wanted, within).await;
}
const ENVOY_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// Polls until a verification of `key` is a normal (not stale) answer with `code`; returns
/// how long that took. Fails after `within`.
async fn wait_for_fresh(
    app: &TestApp,
    key: &str,
    code: pb::VerifyCode,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(r) = app.as_admin().try_verify(key, &[]).await
            && !r.stale
            && r.code() == code
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "no fresh {code:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn cached_keys_answer_stale_through_a_database_outage() {
    if !postgres_or_skip("outage::cached_keys_answer_stale_through_a_database_outage") {
        return;
    }
    run_test(async {
        let db = fresh_database(Backend::Postgres).await;
        let (app, proxy) = proxied_replica(db, Duration::from_secs(120)).await;
        let ws = app.create_workspace("outage").await;
        let (_, hot) = app.create_key(&ws.id, &[]).await;
        let (revoked, revoked_secret) = app.create_key(&ws.id, &[]).await;
        let (_, cold) = app.create_key(&ws.id, &[]).await;
        let (_, metered) = app.create_metered_key("", Vec::new(), Some(5), None).await;
        let expiring = app
            .as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: ws.id.clone(),
                name: "expiring".into(),
                expire_time: Some(in_secs(4)),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .secret;
        app.revoke_key(&revoked.id).await;
        // Each write's NOTIFY comes back to this replica too and evicts its keys again: let
        // those arrive, then cache the keys (the revoked one as revoked).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.verify(&hot, &[]).await.code(), pb::VerifyCode::Valid);
        assert_eq!(
            app.verify(&expiring, &[]).await.code(),
            pb::VerifyCode::Valid
        );
        assert_eq!(
            app.verify(&revoked_secret, &[]).await.code(),
            pb::VerifyCode::Revoked
        );
        assert_eq!(
            app.verify(&metered, &[]).await.code(),
            pb::VerifyCode::Valid
        );
        let mut metered_admitted = 1;

        proxy.stop().await;
        let stopped = Instant::now();
        wait_for_writes(&app, ServingStatus::NotServing, Duration::from_secs(5)).await;
        assert_eq!(
            health(&app, "").await,
            ServingStatus::Serving,
            "\"\" follows verifications"
        );
        assert_eq!(health(&app, ENVOY_SERVICE).await, ServingStatus::Serving);
        let create = app
            .as_admin()
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await;
        assert_err(create, Code::Unavailable, "DATABASE_UNAVAILABLE");

        // Steady load on the hot key from 8 one-at-a-time clients for the whole outage.
        let length = outage_length();
        let load: Vec<_> = (0..8)
            .map(|_| {
                let (client, hot) = (app.as_admin(), hot.clone());
                tokio::spawn(async move {
                    let mut keys = client.keys;
                    let (mut latencies, mut failures) = (Vec::new(), Vec::new());
                    while stopped.elapsed() < length {
                        let started = Instant::now();
                        let answer = keys
                            .verify_api_key(pb::VerifyApiKeyRequest {
                                key: hot.clone(),
                                required_scopes: vec![],
                                cost: None,
                                ..Default::default()
                            })
                            .await;
                        latencies.push(started.elapsed());
                        match answer {
                            Ok(r) if r.get_ref().code() == pb::VerifyCode::Valid => {}
                            other => failures.push(format!("{other:?}")),
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    (latencies, failures)
                })
            })
            .collect();

        // Meanwhile: answers say stale, revoked stays revoked, expiry is still evaluated,
        // an uncached key cannot be answered, a metered key spends only what it holds.
        let stale = app.verify(&hot, &[]).await;
        assert!(stale.stale && stale.valid, "{stale:?}");
        let still_revoked = app.verify(&revoked_secret, &[]).await;
        assert_eq!(still_revoked.code(), pb::VerifyCode::Revoked);
        assert!(still_revoked.stale);
        let err = app
            .as_admin()
            .try_verify(&cold, &[])
            .await
            .expect_err("an uncached key");
        assert_eq!(err.code(), Code::Unavailable);
        for _ in 0..10 {
            match app.as_admin().try_verify(&metered, &[]).await {
                Ok(r) if r.code() == pb::VerifyCode::Valid => metered_admitted += 1,
                Ok(r) => assert_eq!(r.code(), pb::VerifyCode::UsageExceeded),
                Err(e) => assert_eq!(e.code(), Code::Unavailable),
            }
        }
        assert!(
            metered_admitted <= 5,
            "{metered_admitted} uses of 5 credits"
        );
        let mut envoy = app
            .client(&bearer(token(
                Some(app.tenant),
                &["keyplane.api_keys:verify"],
            )))
            .authorization();
        let allowed = envoy.check(envoy_check(&hot)).await.unwrap().into_inner();
        assert_eq!(allowed.status.map(|s| s.code), Some(0), "allowed, stale");
        let meta = &allowed.dynamic_metadata.unwrap().fields["keyplane"];
        let Some(Kind::StructValue(meta)) = &meta.kind else {
            panic!("{meta:?}")
        };
        assert_eq!(meta.fields["stale"].kind, Some(Kind::BoolValue(true)));
        let refused = envoy.check(envoy_check(&cold)).await;
        assert_eq!(
            refused.unwrap_err().code(),
            Code::Unavailable,
            "never allow unknown"
        );
        tokio::time::sleep(Duration::from_secs(4).saturating_sub(stopped.elapsed())).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            app.verify(&expiring, &[]).await.code(),
            pb::VerifyCode::Expired
        );

        let (mut latencies, mut failures) = (Vec::new(), Vec::new());
        for task in load {
            let (l, f) = task.await.unwrap();
            latencies.extend(l);
            failures.extend(f);
        }
        latencies.sort();
        let p99 = latencies[latencies.len() * 99 / 100];
        eprintln!(
            "outage of {length:?}: {} verifications of a cached key, {} failed, p99 {p99:?}",
            latencies.len(),
            failures.len()
        );
        assert!(
            failures.is_empty(),
            "{:?}",
            &failures[..failures.len().min(5)]
        );
        // Not a speed bar (that is bench/outage.sh): proof that no verification waited for
        // the dead database (a connection attempt, a 500 ms timeout).
        assert!(p99 < Duration::from_millis(100), "p99 {p99:?}");
        assert_eq!(health(&app, "").await, ServingStatus::Serving);

        proxy.resume();
        let back = wait_for_fresh(&app, &hot, pb::VerifyCode::Valid, Duration::from_secs(5)).await;
        eprintln!("normal answers {back:?} after the database came back");
        assert!(back < Duration::from_secs(1), "{back:?}");
        wait_for_writes(&app, ServingStatus::Serving, Duration::from_secs(2)).await;
        app.create_workspace("after").await;
    });
}

/// A stale verification that runs out of held credits must not leave the key's budget
/// waiting for a reservation it never sent: once the database is back, the key answers at
/// once (it used to hang until the request timeout).
#[test]
fn a_metered_key_that_ran_dry_while_stale_answers_when_the_database_returns() {
    if !postgres_or_skip("outage::a_metered_key_that_ran_dry_while_stale") {
        return;
    }
    run_test(async {
        let db = fresh_database(Backend::Postgres).await;
        let (app, proxy) = proxied_replica(db, Duration::from_secs(120)).await;
        let (_, secret) = app
            .create_metered_key("", Vec::new(), Some(1_000_000), None)
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);

        proxy.stop().await;
        // Stale answers spend what this replica holds, then are UNAVAILABLE.
        let mut unavailable = 0;
        for _ in 0..100_000 {
            match app.as_admin().try_verify(&secret, &[]).await {
                Ok(v) if v.code() == pb::VerifyCode::Valid => {}
                Err(s) if s.code() == Code::Unavailable => {
                    unavailable += 1;
                    if unavailable == 3 {
                        break;
                    }
                }
                other => panic!("during the outage: {other:?}"),
            }
        }
        assert_eq!(unavailable, 3, "the held credits never ran out");

        proxy.resume();
        wait_for_writes(&app, ServingStatus::Serving, Duration::from_secs(10)).await;
        let answered = tokio::time::timeout(
            Duration::from_secs(5),
            wait_for_fresh(&app, &secret, pb::VerifyCode::Valid, Duration::from_secs(5)),
        )
        .await;
        assert!(answered.is_ok(), "the key's verification did not come back");
    });
}

#[test]
fn stale_answers_end_when_the_bound_runs_out_and_normal_ones_resume_on_return() {
    if !postgres_or_skip("outage::stale_answers_end_when_the_bound_runs_out") {
        return;
    }
    run_test(async {
        let db = fresh_database(Backend::Postgres).await;
        let bound = Duration::from_secs(5);
        let (app, proxy) = proxied_replica(db, bound).await;
        let ws = app.create_workspace("bound").await;
        let (_, hot) = app.create_key(&ws.id, &[]).await;
        // The create's own NOTIFY evicts the key's digest when it comes back: cache after it.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(app.verify(&hot, &[]).await.code(), pb::VerifyCode::Valid);

        proxy.stop().await;
        let stopped = Instant::now();
        let turned = loop {
            match app.as_admin().try_verify(&hot, &[]).await {
                Ok(r) => assert!(r.valid, "{r:?}"),
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable);
                    break stopped.elapsed();
                }
            }
            assert!(
                stopped.elapsed() < bound * 2,
                "still answering after {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("UNAVAILABLE {turned:?} after the database went away (bound {bound:?})");
        // The bound counts from the last heartbeat the feed heard (every 250 ms).
        assert!(
            turned > bound - Duration::from_millis(600)
                && turned < bound + Duration::from_millis(300),
            "{turned:?}"
        );
        wait_for_health(&app, ServingStatus::NotServing, Duration::from_secs(2)).await;

        proxy.resume();
        let back = wait_for_fresh(&app, &hot, pb::VerifyCode::Valid, Duration::from_secs(5)).await;
        eprintln!("normal answers {back:?} after the database came back");
        assert!(back < Duration::from_secs(1), "{back:?}");
        wait_for_health(&app, ServingStatus::Serving, Duration::from_secs(2)).await;
    });
}

#[test]
fn a_partitioned_replica_refuses_a_revocation_within_its_bound_and_on_healing() {
    if !postgres_or_skip("outage::a_partitioned_replica_refuses_a_revocation") {
        return;
    }
    run_test(async {
        let writer = spawn_app(Backend::Postgres).await;
        // Two replicas cut off from the database: one with a short bound, one with a long one.
        let (short, short_proxy) =
            proxied_replica(writer.db.shared(), Duration::from_secs(3)).await;
        let (long, long_proxy) = proxied_replica(writer.db.shared(), Duration::from_secs(60)).await;
        let ws = writer.create_workspace("partition").await;
        let (key, secret) = writer.create_key(&ws.id, &[]).await;
        // The create's NOTIFY evicts the key's digest everywhere: cache it after that.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for replica in [&short, &long] {
            let r = replica.client(&writer.admin()).verify(&secret, &[]).await;
            assert_eq!(r.code(), pb::VerifyCode::Valid);
        }
        short_proxy.stop().await;
        long_proxy.stop().await;
        let cut = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        writer.revoke_key(&key.id).await;
        let verify_on = |app: &TestApp| {
            let as_writer = app.client(&writer.admin());
            let secret = secret.clone();
            async move { as_writer.try_verify(&secret, &[]).await }
        };
        // The short-bound replica stops saying VALID within its bound of the cut.
        let refused = loop {
            match verify_on(&short).await {
                Ok(r) if r.valid => assert!(r.stale, "a VALID answer while cut off is stale"),
                Ok(r) => panic!("nothing can tell it the key was revoked: {r:?}"),
                Err(e) => {
                    assert_eq!(e.code(), Code::Unavailable);
                    break cut.elapsed();
                }
            }
            assert!(cut.elapsed() < Duration::from_secs(6), "still VALID");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("the replica with a 3 s bound refused {refused:?} after the cut");
        assert!(refused < Duration::from_millis(3300), "{refused:?}");
        // The long-bound replica still answers stale; once healed, both refuse within 1 s.
        let r = verify_on(&long).await.unwrap();
        assert!(r.valid && r.stale, "{r:?}");
        long_proxy.resume();
        short_proxy.resume();
        for (name, app) in [("long", &long), ("short", &short)] {
            let healed = Instant::now();
            loop {
                if let Ok(r) = verify_on(app).await
                    && r.code() == pb::VerifyCode::Revoked
                {
                    break;
                }
                assert!(
                    healed.elapsed() < Duration::from_secs(1),
                    "the {name} replica did not refuse within 1 s of healing"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            eprintln!(
                "the {name} replica refused {:?} after healing",
                healed.elapsed()
            );
        }
    });
}

#[test]
fn a_multi_host_url_moves_to_the_next_host_that_takes_writes() {
    if !postgres_or_skip("outage::a_multi_host_url_moves_to_the_next_host") {
        return;
    }
    run_test(async {
        let db = fresh_database(Backend::Postgres).await;
        let real = database_addr(&db.url);
        // Nothing listens on the first host; the second and third lead to the same server.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let first = CuttableProxy::start(real).await;
        let second = CuttableProxy::start(real).await;
        let url = through(
            &db.url,
            &[dead, first.addr, second.addr],
            "?target_session_attrs=read-write&sslmode=prefer",
        );
        let app = spawn_with(db, test_settings(&url)).await;
        app.create_workspace("on the first live host").await;

        first.stop().await;
        let lost = Instant::now();
        let moved = loop {
            let create = app
                .as_admin()
                .workspaces
                .create_workspace(pb::CreateWorkspaceRequest::default())
                .await;
            match create {
                Ok(_) => break lost.elapsed(),
                Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
            }
            assert!(
                lost.elapsed() < Duration::from_secs(10),
                "no write after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        eprintln!("writes went to the next host {moved:?} after the first was lost");
        assert!(moved < Duration::from_secs(3), "{moved:?}");
        // A revocation through another replica is refused here within the usual second.
        wait_for_writes(&app, ServingStatus::Serving, Duration::from_secs(2)).await;
        let other = spawn_with(app.db.shared(), test_settings(&app.db.url)).await;
        let ws = app.create_workspace("keys").await;
        let (key, secret) = app.create_key(&ws.id, &[]).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
        let revoked = Instant::now();
        other.client(&app.admin()).revoke_key(&key.id).await;
        wait_for_fresh(
            &app,
            &secret,
            pb::VerifyCode::Revoked,
            Duration::from_secs(1),
        )
        .await;
        eprintln!("revocation seen {:?} after it returned", revoked.elapsed());
    });
}
