//! A flood of made-up strings once the deployment holds imported keys (SPEC §3.3.1): the
//! first sight of each is one database read, cached as a negative entry; the flood repeated
//! reaches the database not once. Shown with the verification cache's own metrics, in a
//! test binary of its own so that no other test's verifications are counted.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use keyplane::proto as pb;
use keyplane_testkit::*;

/// Made-up strings per flood.
const FLOOD: usize = 500;

/// One sample of `keyplane_verification_cache_total` (0 when not exported yet).
fn cache_total(addr: std::net::SocketAddr, result: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    let wanted = format!("keyplane_verification_cache_total{{result=\"{result}\"}}");
    body.lines()
        .find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == wanted).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

async fn flood(app: &TestApp, strings: &[String]) {
    for s in strings {
        assert_eq!(app.verify(s, &[]).await.code(), pb::VerifyCode::NotFound);
    }
}

async fn repeated_made_up_strings_never_reach_the_database(
    backend: Backend,
    metrics: std::net::SocketAddr,
) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    app.as_admin()
        .keys
        .import_api_keys(pb::ImportApiKeysRequest {
            workspace_id: ws.id.clone(),
            keys: vec![pb::ImportedApiKey {
                secret: uuid::Uuid::new_v4().to_string(),
                ..Default::default()
            }],
        })
        .await
        .unwrap();
    let strings: Vec<String> = (0..FLOOD)
        .map(|i| format!("made-up-{i}-{}", uuid::Uuid::new_v4()))
        .collect();
    // PostgreSQL: the cache answers once the replica's feed is up.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let misses = cache_total(metrics, "miss");
    flood(&app, &strings).await;
    let first = cache_total(metrics, "miss") - misses;
    assert_eq!(first, FLOOD as f64, "each new string is one database read");

    let (misses, hits) = (cache_total(metrics, "miss"), cache_total(metrics, "hit"));
    flood(&app, &strings).await;
    flood(&app, &strings).await;
    assert_eq!(
        cache_total(metrics, "miss"),
        misses,
        "no database read for a repeat"
    );
    assert_eq!(cache_total(metrics, "hit") - hits, 2.0 * FLOOD as f64);
    eprintln!("{backend:?}: {FLOOD} made-up strings, then twice again from negative entries");
}

#[test]
fn a_flood_of_made_up_strings_is_answered_from_negative_entries() {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    run_test(async move {
        // Before any server: the cache's counters bind to the recorder at construction.
        keyplane::telemetry::install_metrics(metrics).unwrap();
        repeated_made_up_strings_never_reach_the_database(Backend::Sqlite, metrics).await;
        if postgres_url().is_some() {
            repeated_made_up_strings_never_reach_the_database(Backend::Postgres, metrics).await;
        } else {
            announce_skip(
                "import_flood (PostgreSQL)",
                "KEYPLANE_TEST_POSTGRES_URL is not set",
            );
        }
    });
}
