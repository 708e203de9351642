//! Hostile connections at the gRPC level: silent sockets, stream floods, client deadlines.
//! (Oversized messages: `lifecycle::requests_over_one_mebibyte_are_resource_exhausted`.)
use std::time::{Duration, Instant};

use futures::future::join_all;
use keyplane::proto as pb;
use sea_orm::{ConnectionTrait, TransactionTrait};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use keyplane_testkit::*;

on_both_backends!(
    silent_connections_are_closed,
    slow_prefaces_are_closed,
    trickled_requests_are_cut_off,
    concurrent_streams_per_connection_are_bounded,
    client_deadlines_are_honoured,
);

async fn spawn_with_idle_timeout(backend: Backend, idle: Duration) -> TestApp {
    let db = fresh_database(backend).await;
    let mut settings = test_settings(&db.url);
    settings.idle_timeout = idle;
    spawn_with(db, settings).await
}

async fn silent_connections_are_closed(backend: Backend) {
    let app = spawn_with_idle_timeout(backend, Duration::from_millis(500)).await;
    // A peer that never even sends the HTTP/2 preface.
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // the server's SETTINGS frame
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(400));

    // A client that answers keepalive pings keeps its connection through several timeouts.
    let mut health = HealthClient::new(app.channel.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
}

async fn slow_prefaces_are_closed(backend: Backend) {
    let app = spawn_with_idle_timeout(backend, Duration::from_millis(600)).await;
    // One byte of the preface every 200 ms: never idle, never done.
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut closed = false;
    for byte in preface.iter().cycle().take(50) {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(1), slow.read(&mut buf)).await
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "a connection trickling its preface stayed open");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

async fn trickled_requests_are_cut_off(backend: Backend) {
    let db = fresh_database(backend).await;
    let mut settings = test_settings(&db.url);
    settings.request_timeout = Duration::from_millis(500);
    let app = spawn_with(db, settings).await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{}/grpc.health.v1.Health/Check", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    // Two bytes of the five-byte message header, then nothing more.
    body.send_data(bytes::Bytes::from_static(&[0, 0]), false)
        .unwrap();
    let started = Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("the server answers a stalled request")
        .unwrap();
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    let status = match status {
        Some(s) => s,
        None => {
            let mut rest = response.into_body();
            let trailers = tokio::time::timeout(Duration::from_secs(5), rest.trailers())
                .await
                .unwrap()
                .unwrap()
                .unwrap_or_default();
            trailers
                .get("grpc-status")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_ne!(status, "0", "a stalled request must not succeed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

async fn concurrent_streams_per_connection_are_bounded(backend: Backend) {
    let app = spawn_app(backend).await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // The server's SETTINGS arrive with the handshake; give them a moment to apply.
    let mut advertised = client.current_max_send_streams();
    for _ in 0..50 {
        if advertised != usize::MAX {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        client = client.ready().await.unwrap();
        advertised = client.current_max_send_streams();
    }
    assert_eq!(advertised, 256, "SETTINGS_MAX_CONCURRENT_STREAMS");

    // Thousands of calls on one connection queue behind that bound and all succeed.
    let calls = (0..2000).map(|_| {
        let mut health = HealthClient::new(app.channel.clone());
        async move {
            health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
        }
    });
    let results = join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
}

async fn client_deadlines_are_honoured(backend: Backend) {
    let app = spawn_app(backend).await;
    let workspace = app.create_workspace("locked").await;
    // Hold the row (PostgreSQL) or the database's write lock (SQLite) from outside, so the
    // update below has to wait.
    // (One transaction, so every statement runs on the same connection.)
    let outside = sea_orm::Database::connect(app.db.url.as_str())
        .await
        .unwrap();
    let lock = outside.begin().await.unwrap();
    let holding = match backend {
        Backend::Sqlite => "UPDATE settings SET value = value".to_owned(),
        Backend::Postgres => format!(
            "SELECT 1 FROM workspaces WHERE id = '{}' FOR UPDATE",
            workspace.id
        ),
    };
    lock.execute_unprepared(&holding).await.unwrap();
    let mut request = Request::new(pb::UpdateWorkspaceRequest {
        workspace: Some(pb::Workspace {
            id: workspace.id.clone(),
            name: "late".into(),
            ..Default::default()
        }),
        update_mask: mask(&["name"]),
        etag: String::new(),
    });
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let result = app.as_admin().workspaces.update_workspace(request).await;
    let status = result.expect_err("the update cannot finish while the row is locked");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the deadline ended the call"
    );
    lock.rollback().await.unwrap();

    // As gRPC has it, a call past its deadline may or may not have taken effect (on
    // PostgreSQL the statement already sent completes once the lock goes); either way the
    // row is whole and the server answers.
    let got = app
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: workspace.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert!(
        (got.name == "locked" && got.etag == workspace.etag)
            || (got.name == "late" && got.etag != workspace.etag),
        "{got:?}"
    );
}
