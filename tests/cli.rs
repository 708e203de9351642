//! The `keyplane` binary itself: `serve --dev`, refusing to start unconfigured, SIGTERM
//! handling, `token` and `migrate`.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const BIN: &str = env!("CARGO_BIN_EXE_keyplane");

fn keyplane(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env_remove("KEYPLANE_JWT_SECRET")
        .env_remove("KEYPLANE_DATABASE_URL")
        .env_remove("KEYPLANE_LISTEN");
    cmd
}

#[test]
fn serve_refuses_to_start_without_authentication_and_says_how() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyplane(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--jwt-secret") && stderr.contains("--dev"),
        "{stderr}"
    );
}

#[test]
fn help_never_prints_secret_values() {
    let dir = tempfile::tempdir().unwrap();
    let out = keyplane(dir.path())
        .args(["serve", "--help"])
        .env(
            "KEYPLANE_JWT_SECRET",
            "super-secret-value-that-must-not-show",
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("KEYPLANE_JWT_SECRET"), "{help}");
    assert!(!help.contains("super-secret-value"), "{help}");
}

#[test]
fn a_bad_database_url_is_refused_naming_its_part_and_never_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "postgres://kpuser:hunter2secret@127.0.0.1:notaport/db",
            "port \"notaport\"",
        ),
        ("postgres://kpuser:hunter2secret@/db", "no host"),
        (
            "postgres://kpuser:hunter2secret@h1:5432,postgresql://h2/db",
            "mixed schemes",
        ),
        (
            "postgres://kpuser:hunter2secret@h1,h2/db?target_session_attrs=readwrite",
            "target_session_attrs",
        ),
    ];
    for (url, names) in cases {
        let out = keyplane(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--database-url", url])
            .env(
                "KEYPLANE_JWT_SECRET",
                "a-test-secret-of-at-least-32-bytes!!",
            )
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url} was accepted");
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(printed.contains(names), "{url}: {printed}");
        assert!(
            printed.contains("kpuser:***@"),
            "the redacted URL: {printed}"
        );
        assert!(
            !printed.contains("hunter2secret"),
            "the password leaked: {printed}"
        );
    }
}

#[test]
fn migrate_applies_and_reports_status() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/m.db?mode=rwc", dir.path().display());
    let up = keyplane(dir.path())
        .args(["migrate", "up", "--database-url", &url])
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let status = keyplane(dir.path())
        .args(["migrate", "status", "--database-url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("applied  m20261123_000001_init"), "{text}");
    assert!(!text.contains("pending"), "{text}");
}

#[tokio::test]
async fn dev_server_prints_a_working_token_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = keyplane(dir.path())
        .args([
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            &metrics_addr.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (addr, token) = tokio::task::spawn_blocking(move || {
        let mut addr = None;
        let mut token = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.split("dev mode on ").nth(1) {
                addr = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(t) = line.trim().strip_prefix("export KEYPLANE_TOKEN=") {
                token = Some(t.to_owned());
                break;
            }
        }
        (
            addr.expect("address in the banner"),
            token.expect("token in the banner"),
        )
    })
    .await
    .unwrap();
    assert!(dir.path().join("keyplane.dev-secret").exists());

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut workspaces =
        keyplane::proto::workspace_service_client::WorkspaceServiceClient::new(channel.clone());
    let mut request = tonic::Request::new(keyplane::proto::ListWorkspacesRequest::default());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    workspaces
        .list_workspaces(request)
        .await
        .expect("the printed token works");

    // `keyplane token --dev` signs with the same persisted secret.
    let minted = keyplane(dir.path())
        .args(["token", "--dev"])
        .output()
        .unwrap();
    assert!(minted.status.success());
    let minted = String::from_utf8(minted.stdout).unwrap();
    let mut request = tonic::Request::new(keyplane::proto::ListWorkspacesRequest::default());
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", minted.trim()).parse().unwrap(),
    );
    workspaces
        .list_workspaces(request)
        .await
        .expect("the minted token works");

    let metrics = http_get(metrics_addr, "/metrics");
    assert!(
        metrics.contains("keyplane_rpc_duration_seconds") && metrics.contains("ListWorkspaces"),
        "{metrics}"
    );
    assert!(!metrics.contains(&token), "metrics never hold a token");

    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut last = None;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), watch.next()).await {
        last = Some(m.status());
    }
    assert_eq!(last, Some(ServingStatus::NotServing));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}
