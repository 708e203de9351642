//! Replicas and health waits: several servers on one PostgreSQL database ([`replicas`]),
//! a server's health ([`health`]), and polling it until it says what a test waits for.
use std::time::Duration;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::app::{
    Backend, TestApp, announce_skip, postgres_url, spawn_app, spawn_with, test_settings,
};

/// Whether PostgreSQL is configured; says `SKIPPED` loudly when it is not. (For the
/// multi-replica tests.)
pub fn postgres_or_skip(test: &str) -> bool {
    if postgres_url().is_none() {
        announce_skip(
            test,
            "KEYPLANE_TEST_POSTGRES_URL is not set: replicas need PostgreSQL",
        );
        return false;
    }
    true
}

/// `n` replicas on one fresh PostgreSQL database, after `settle`: time for their feeds to
/// LISTEN (and to hear each other's heartbeats, which usage controls count).
pub async fn replicas(n: usize, settle: Duration) -> Vec<TestApp> {
    let first = spawn_app(Backend::Postgres).await;
    let mut all = Vec::with_capacity(n);
    for _ in 1..n {
        all.push(spawn_with(first.db.shared(), test_settings(&first.db.url)).await);
    }
    all.insert(0, first);
    tokio::time::sleep(settle).await;
    all
}

/// The health a server reports now for `service` (`""`: overall).
pub async fn health(app: &TestApp, service: &str) -> ServingStatus {
    HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Polls the overall health (`""`) until it is `wanted`; returns how long that took. Fails
/// the test after `within`.
pub async fn wait_for_health(app: &TestApp, wanted: ServingStatus, within: Duration) -> Duration {
    wait_for_service_health(app, "", wanted, within).await
}

/// Polls one service name's health until it is `wanted`; returns how long that took. Fails
/// the test after `within`. (Used by the tests that take the database away.)
pub async fn wait_for_service_health(
    app: &TestApp,
    service: &str,
    wanted: ServingStatus,
    within: Duration,
) -> Duration {
    let started = tokio::time::Instant::now();
    loop {
        if health(app, service).await == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health of {service:?} not {wanted:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
