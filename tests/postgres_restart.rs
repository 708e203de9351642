//! The real PostgreSQL server stopped mid-run and started again: a cached key answers,
//! flagged stale, everything else is UNAVAILABLE, and all recovers without a restart
//! (`outage.rs` and `faults.rs` cover the same behind a proxy on any machine). It stops the whole cluster, so it lives in
//! its own test binary, which `cargo test` runs alone, and only runs where it may:
//! `KEYPLANE_TEST_PG_CONTROL=1` (set by `.ci/run`, which runs as root beside the cluster).
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;
use std::time::Duration;

use keyplane::proto as pb;
use keyplane_testkit::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

fn cluster(action: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .expect("a cluster version");
    let mut cmd = Command::new("pg_ctlcluster");
    cmd.args(["--skip-systemctl-redirect", &version, "main", action]);
    if action == "stop" {
        cmd.args(["-m", "fast"]);
    }
    assert!(
        cmd.status().expect("pg_ctlcluster").success(),
        "pg_ctlcluster {action}"
    );
}

/// Starts the cluster again however the test ends.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        cluster("start");
    }
}

#[test]
fn postgres_stopped_mid_run_is_unavailable_and_recovers_without_restart() {
    if postgres_url().is_none() || std::env::var("KEYPLANE_TEST_PG_CONTROL").as_deref() != Ok("1") {
        announce_skip(
            "postgres_restart",
            "needs KEYPLANE_TEST_POSTGRES_URL and KEYPLANE_TEST_PG_CONTROL=1 (may stop the cluster)",
        );
        return;
    }
    run_test(postgres_stopped_mid_run());
}

async fn postgres_stopped_mid_run() {
    let app = spawn_app(Backend::Postgres).await;
    let workspace = app.create_workspace("before").await;
    let (_, hot) = app.create_key(&workspace.id, &[]).await;
    // Cached, with the feed known good: it answers through the stop, flagged stale.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(app.verify(&hot, &[]).await.code(), pb::VerifyCode::Valid);

    let restart = Restart;
    cluster("stop");
    let took = wait_for_service_health(
        &app,
        "keyplane.v1.WorkspaceService",
        ServingStatus::NotServing,
        Duration::from_secs(5),
    )
    .await;
    eprintln!("the write services NOT_SERVING {took:?} after the stop");
    wait_for_health(&app, ServingStatus::Serving, Duration::ZERO).await;
    let stale = app.verify(&hot, &[]).await;
    assert!(stale.valid && stale.stale, "{stale:?}");
    for _ in 0..3 {
        let get = app
            .as_admin()
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest {
                id: workspace.id.clone(),
            })
            .await;
        assert_err(get, Code::Unavailable, "DATABASE_UNAVAILABLE");
        let verify = app
            .as_admin()
            .try_verify("kp_0oKuAEFsoLCI87Y4g2KCZxUgWNEG5Ce34LHSU1e7AS31U8go5", &[])
            .await;
        assert_err(verify, Code::Unavailable, "DATABASE_UNAVAILABLE");
    }
    drop(restart);

    wait_for_service_health(
        &app,
        "keyplane.v1.WorkspaceService",
        ServingStatus::Serving,
        Duration::from_secs(20),
    )
    .await;
    let fresh = app.verify(&hot, &[]).await;
    assert!(fresh.valid && !fresh.stale, "{fresh:?}");
    let got = app
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: workspace.id.clone(),
        })
        .await
        .expect("works again without restarting keyplane");
    assert_eq!(got.into_inner().workspace.unwrap(), workspace);
    app.create_workspace("after").await;
}
