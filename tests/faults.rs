//! Faults: the database going away and coming back, SIGKILL in the middle of writes, and
//! SIGTERM under load. The server runs as it does in production: as its own process where
//! a signal is involved, behind a TCP proxy we can cut where the database must vanish
//! (with `--stale-if-error 0`, verification and Envoy's Check then answer UNAVAILABLE,
//! never from an unconfirmable cache; `tests/outage.rs` covers stale answers).
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::error::Error as _;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use keyplane::proto as pb;
use keyplane_testkit::*;
use tokio::sync::Mutex;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[test]
fn postgres_going_away_is_unavailable_and_recovers_without_restart() {
    if postgres_url().is_none() {
        announce_skip(
            "faults::postgres_going_away",
            "KEYPLANE_TEST_POSTGRES_URL is not set",
        );
        return;
    }
    run_test(postgres_going_away());
}

async fn postgres_going_away() {
    let db = fresh_database(Backend::Postgres).await;
    // Route the server's connections through the proxy.
    let url = url::Url::parse(&db.url).unwrap();
    let proxy = CuttableProxy::start(database_addr(&db.url)).await;
    let mut proxied = url.clone();
    proxied.set_port(Some(proxy.addr.port())).unwrap();
    let mut settings = test_settings(proxied.as_str());
    // Fail closed: `tests/outage.rs` covers the default, which answers stale.
    settings.stale_if_error = Duration::ZERO;
    let app = spawn_with(db, settings).await;
    let workspace = app.create_workspace("before").await;
    // A key hot in the verification cache: once the database is gone, so is the
    // invalidation feed, and with --stale-if-error 0 keyplane must not answer from memory
    // what it cannot confirm.
    let (_, secret) = app.create_key(&workspace.id, &[]).await;
    let mut envoy = app
        .client(&bearer(token(
            Some(app.tenant),
            &["keyplane.api_keys:verify"],
        )))
        .authorization();
    for _ in 0..2 {
        assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
        let allowed = envoy
            .check(envoy_check(&secret))
            .await
            .expect("check")
            .into_inner();
        assert_eq!(allowed.status.map(|s| s.code), Some(0), "allowed while up");
    }

    proxy.stop().await;
    let took = wait_for_health(&app, ServingStatus::NotServing, Duration::from_secs(5)).await;
    eprintln!("NOT_SERVING after {took:?}");
    for _ in 0..3 {
        let result = app
            .as_admin()
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest {
                id: workspace.id.clone(),
            })
            .await;
        assert_err(result, Code::Unavailable, "DATABASE_UNAVAILABLE");
        let create = app
            .as_admin()
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await;
        assert_err(create, Code::Unavailable, "DATABASE_UNAVAILABLE");
        let verify = app.as_admin().try_verify(&secret, &[]).await;
        assert_err(verify, Code::Unavailable, "DATABASE_UNAVAILABLE");
        // Envoy gets an error, which its status_on_error turns into a deny: never an allow.
        let refused = envoy.check(envoy_check(&secret)).await;
        assert_eq!(
            refused.expect_err("no answer without the database").code(),
            Code::Unavailable
        );
    }

    proxy.resume();
    wait_for_health(&app, ServingStatus::Serving, Duration::from_secs(10)).await;
    let got = app
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: workspace.id.clone(),
        })
        .await
        .expect("works again without a restart");
    assert_eq!(got.into_inner().workspace.unwrap(), workspace);
    app.create_workspace("after").await;
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
}

const BIN: &str = env!("CARGO_BIN_EXE_keyplane");

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Starts the binary at debug level, its log going to a file that [`assert_log_clean`]
/// scans for secrets afterwards.
fn start_server(db_url: &str, addr: SocketAddr) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(addr))
        .unwrap();
    Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--shutdown-grace",
            "5s",
        ])
        .env("KEYPLANE_DATABASE_URL", db_url)
        .env("KEYPLANE_JWT_SECRET", JWT_SECRET)
        .env("KEYPLANE_JWT_LEEWAY", "0s")
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap()
}

fn log_path(addr: SocketAddr) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("keyplane-faults-{}.log", addr.port()))
}

/// No key secret, JWT or configured secret in anything the server logged.
fn assert_log_clean(addr: SocketAddr) {
    let path = log_path(addr);
    let log = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    assert!(log.contains("DEBUG"), "the server logged at debug level");
    for line in log.lines() {
        assert!(
            find_secret(line).is_none(),
            "secret in the server log: {line}"
        );
    }
}

async fn connect_when_ready(addr: SocketAddr) -> tonic::transport::Channel {
    for _ in 0..100 {
        if let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            let mut health = HealthClient::new(channel.clone());
            if let Ok(r) = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status() == ServingStatus::Serving
            {
                return channel;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server at {addr} did not become ready");
}

/// Creates workspaces from several tasks until the calls fail; returns the ids of every
/// create that was acknowledged.
async fn burst(
    channel: tonic::transport::Channel,
    cred: Cred,
    acknowledged: Arc<Mutex<Vec<String>>>,
) -> Vec<tonic::Status> {
    let mut workers = Vec::new();
    for w in 0..8 {
        let channel = channel.clone();
        let cred = cred.clone();
        let acknowledged = acknowledged.clone();
        workers.push(tokio::spawn(async move {
            let mut workspaces = Client::new(channel, &cred).workspaces;
            for i in 0.. {
                let request = pb::CreateWorkspaceRequest {
                    name: format!("w{w}-{i}"),
                    ..Default::default()
                };
                match workspaces.create_workspace(request).await {
                    Ok(r) => acknowledged
                        .lock()
                        .await
                        .push(r.into_inner().workspace.unwrap().id),
                    Err(status) => return status,
                }
            }
            unreachable!()
        }));
    }
    let mut codes = Vec::new();
    for worker in workers {
        codes.push(worker.await.unwrap());
    }
    codes
}

async fn all_workspace_ids(channel: tonic::transport::Channel, cred: &Cred) -> Vec<String> {
    let mut workspaces = Client::new(channel, cred).workspaces;
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = workspaces
            .list_workspaces(pb::ListWorkspacesRequest {
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.workspaces.into_iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}

async fn sigkill_keeps_every_acknowledged_write(backend: Backend) {
    let db = fresh_database(backend).await;
    let addr = free_port();
    let mut server = start_server(&db.url, addr);
    let channel = connect_when_ready(addr).await;
    let cred = stranger();
    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let load = tokio::spawn(burst(channel, cred.clone(), acknowledged.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kill().unwrap(); // SIGKILL
    server.wait().unwrap();
    load.await.unwrap();
    let acknowledged = acknowledged.lock().await.clone();
    assert!(
        acknowledged.len() > 10,
        "the burst wrote something before the kill"
    );

    let mut again = start_server(&db.url, addr);
    let channel = connect_when_ready(addr).await;
    let stored = all_workspace_ids(channel, &cred).await;
    let _ = again.kill();
    let _ = again.wait();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert_log_clean(addr);
}

async fn sigterm_under_load_drains_and_exits_zero(backend: Backend) {
    let db = fresh_database(backend).await;
    let addr = free_port();
    let mut server = start_server(&db.url, addr);
    let channel = connect_when_ready(addr).await;
    let cred = stranger();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let acknowledged: Arc<Mutex<Vec<String>>> = Arc::default();
    let load = tokio::spawn(burst(channel, cred.clone(), acknowledged.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = tokio::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &server.id().to_string()])
            .status()
            .unwrap()
            .success()
    );

    let mut statuses = Vec::new();
    while let Ok(Some(message)) = watch.message().await {
        statuses.push(message.status());
    }
    assert_eq!(
        statuses.last(),
        Some(&ServingStatus::NotServing),
        "NOT_SERVING before the stream ends"
    );
    let exit = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "exit status {exit:?}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "exited within the grace period"
    );
    for status in load.await.unwrap() {
        // Calls made once the drain began are refused by the transport: the client reports
        // the GOAWAY or the closed connection in its own words (UNAVAILABLE, CANCELLED,
        // UNKNOWN or INTERNAL "h2 protocol error"). None is failed by a handler: every
        // status keyplane sends carries an ErrorInfo.
        assert!(
            status.source().is_some() && reason(&status).is_empty(),
            "a call ended with {status:?}"
        );
    }

    let acknowledged = acknowledged.lock().await.clone();
    let mut again = start_server(&db.url, addr);
    let stored = all_workspace_ids(connect_when_ready(addr).await, &cred).await;
    let _ = again.kill();
    let _ = again.wait();
    assert!(
        acknowledged.iter().all(|id| stored.contains(id)),
        "an acknowledged create was lost"
    );
    assert_log_clean(addr);
}

on_both_backends!(
    sigkill_keeps_every_acknowledged_write,
    sigterm_under_load_drains_and_exits_zero
);
