//! PostgreSQL high availability for real (SPEC §5.5, §6 "Database failover"): a
//! pg_auto_failover formation on loopback (a monitor, a primary and a synchronous
//! secondary, built by `bench/pgaf.sh`), three keyplane replicas on the multi-host URL that
//! `pg_autoctl show uri` prints, steady verification and write load, then (a) a planned
//! failover (`pg_autoctl perform failover`) and (b) the primary node lost (its keeper and
//! PostgreSQL SIGKILLed, the monitor promoting the secondary). For each it reports, and
//! holds to the bars: failed verifications of cached keys (0), the write outage against the
//! engine's own switch-over time (at most 2 s more), acknowledged writes lost (0), and a
//! revocation after the switch refused by every replica within 1 s.
//!
//! Needs root and `pg_autoctl` (Debian `postgresql-15-auto-failover`): `.ci/run` installs it
//! and sets `KEYPLANE_TEST_PGAF=1`, which turns a missing tool into a failure; elsewhere the
//! test says SKIPPED. `bench/failover.sh` runs it for BENCHMARKS.md.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyplane::proto as pb;
use keyplane_testkit::*;
use tokio::sync::Mutex;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_keyplane");
/// Where the formation lives, and its ports (apart from bench/pgaf.sh's defaults, so that a
/// formation left by a benchmark run does not collide).
const PGAF_DIR: &str = "/tmp/keyplane-pgaf-test";
const PGAF_PORT_BASE: &str = "5590";
/// Bound on one call, so that the load loops notice failures promptly.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs `bench/pgaf.sh <command>`; its stdout, trimmed.
fn pgaf(command: &str) -> String {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pgaf.sh"))
        .arg(command)
        .env("PGAF_DIR", PGAF_DIR)
        .env("PGAF_PORT_BASE", PGAF_PORT_BASE)
        .stderr(Stdio::inherit())
        .output()
        .expect("run bench/pgaf.sh");
    assert!(out.status.success(), "bench/pgaf.sh {command} failed");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The `switchover_ms=<n>` that `failover` and `kill-primary` print.
fn switchover(printed: &str) -> Duration {
    let ms = printed
        .lines()
        .find_map(|l| l.strip_prefix("switchover_ms="))
        .unwrap_or_else(|| panic!("no switchover_ms in {printed:?}"));
    Duration::from_millis(ms.trim().parse().unwrap())
}

/// Stops the formation however the test ends.
struct Formation;

impl Drop for Formation {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/pgaf.sh"))
            .arg("down")
            .env("PGAF_DIR", PGAF_DIR)
            .env("PGAF_PORT_BASE", PGAF_PORT_BASE)
            .status();
    }
}

fn runnable() -> bool {
    let required = std::env::var("KEYPLANE_TEST_PGAF").as_deref() == Ok("1");
    let tool = Command::new("sh")
        .args([
            "-c",
            "command -v pg_autoctl || test -x /usr/lib/postgresql/15/bin/pg_autoctl",
        ])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if tool && root {
        return true;
    }
    assert!(
        !required,
        "KEYPLANE_TEST_PGAF=1 but pg_autoctl (Debian postgresql-15-auto-failover) or root is missing"
    );
    announce_skip(
        "failover",
        "needs root and pg_autoctl (apt-get install postgresql-15-auto-failover); .ci/run installs it",
    );
    false
}

/// One keyplane process on the formation's multi-host URL.
struct Replica {
    child: Child,
    channel: Channel,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_replica(url: &str, migrate: bool) -> Replica {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let log = std::fs::File::create(format!("{PGAF_DIR}-keyplane-{}.log", addr.port())).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "serve",
        "--listen",
        &addr.to_string(),
        "--database-url",
        url,
    ])
    .args(["--health-interval", "200ms"])
    .env("KEYPLANE_JWT_SECRET", JWT_SECRET)
    .env("PGUSER", "postgres")
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(log);
    if !migrate {
        cmd.arg("--no-migrate");
    }
    let child = cmd.spawn().expect("start keyplane");
    let started = Instant::now();
    let channel = loop {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            break channel;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "keyplane on {addr} did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Replica { child, channel }
}

/// What the load saw in one phase.
#[derive(Default)]
struct Seen {
    verifications: u64,
    failed_verifications: Vec<String>,
    /// Each write's outcome, in order: when it was answered, and whether it succeeded.
    writes: Vec<(Instant, bool)>,
    /// Workspaces whose creation was acknowledged.
    created: Vec<String>,
    /// Keys whose revocation was acknowledged.
    revoked: Vec<String>,
}

impl Seen {
    /// The longest stretch writes failed: from the first failure to the next success.
    fn write_outage(&self) -> Duration {
        let (mut longest, mut failing_since) = (Duration::ZERO, None);
        for &(at, ok) in &self.writes {
            match (ok, failing_since) {
                (false, None) => failing_since = Some(at),
                (true, Some(since)) => {
                    longest = longest.max(at - since);
                    failing_since = None;
                }
                _ => {}
            }
        }
        assert!(failing_since.is_none(), "writes still failing at the end");
        longest
    }
}

async fn timed<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("timed out".into()),
    }
}

/// Runs verification load (every replica, cached keys) and write load (creates with a
/// request id, revocations of spare keys) until `stop`.
async fn load(
    clients: Vec<Client>,
    cached: Vec<String>,
    spare: Vec<String>,
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
) {
    let mut tasks = Vec::new();
    for client in clients.clone() {
        let (cached, seen, stop) = (cached.clone(), seen.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut keys = client.keys;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = cached[i % cached.len()].clone();
                i += 1;
                let answer = timed(keys.verify_api_key(pb::VerifyApiKeyRequest {
                    key,
                    required_scopes: vec![],
                    cost: None,
                    ..Default::default()
                }))
                .await;
                let mut seen = seen.lock().await;
                seen.verifications += 1;
                match answer {
                    Ok(r) if r.code() == pb::VerifyCode::Valid => {}
                    other => seen.failed_verifications.push(format!("{other:?}")),
                }
                drop(seen);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tasks.push(tokio::spawn(async move {
        let mut spare = spare.into_iter();
        let mut n = 0usize;
        let mut pending_create: Option<String> = None;
        let mut pending_revoke: Option<String> = None;
        while !stop.load(Ordering::Relaxed) {
            let client = &clients[n % clients.len()];
            n += 1;
            let ok = if n.is_multiple_of(2) {
                // A retried create reuses its request id: it is created once.
                let request_id = pending_create
                    .take()
                    .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
                let created = timed(client.workspaces.clone().create_workspace(
                    pb::CreateWorkspaceRequest {
                        name: format!("w{n}"),
                        request_id: request_id.clone(),
                        ..Default::default()
                    },
                ))
                .await;
                match created {
                    Ok(r) => {
                        seen.lock().await.created.push(r.workspace.unwrap().id);
                        true
                    }
                    Err(_) => {
                        pending_create = Some(request_id);
                        false
                    }
                }
            } else {
                let Some(id) = pending_revoke.take().or_else(|| spare.next()) else {
                    continue;
                };
                let revoked = timed(
                    client
                        .keys
                        .clone()
                        .revoke_api_key(pb::RevokeApiKeyRequest { id: id.clone() }),
                )
                .await;
                match revoked {
                    Ok(_) => {
                        seen.lock().await.revoked.push(id);
                        true
                    }
                    Err(_) => {
                        pending_revoke = Some(id);
                        false
                    }
                }
            };
            seen.lock().await.writes.push((Instant::now(), ok));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }));
    for task in tasks {
        task.await.unwrap();
    }
}

/// Creates a key through the first replica, has every replica cache it, revokes it through
/// the second; how long until every replica refuses it.
async fn revocation_after_switch(clients: &[Client], ws: &str) -> Duration {
    let mut keys = clients[0].keys.clone();
    let created = keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.into(),
            name: "after the switch".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let secret = created.secret;
    for client in clients {
        assert_eq!(
            client.verify(&secret, &[]).await.code(),
            pb::VerifyCode::Valid
        );
    }
    clients[1].revoke_key(&created.api_key.unwrap().id).await;
    let revoked = Instant::now();
    let mut slowest = Duration::ZERO;
    for client in clients {
        loop {
            if client.verify(&secret, &[]).await.code() == pb::VerifyCode::Revoked {
                slowest = slowest.max(revoked.elapsed());
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "a replica still says VALID after 1 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    slowest
}

/// One switch under load: the figures, checked against the bars.
async fn phase(
    name: &str,
    command: &str,
    clients: &[Client],
    cached: &[String],
    spare: Vec<String>,
    ws: &str,
) -> Seen {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(
        clients.to_vec(),
        cached.to_vec(),
        spare,
        seen.clone(),
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let engine = switchover(
        &tokio::task::spawn_blocking({
            let command = command.to_owned();
            move || pgaf(&command)
        })
        .await
        .unwrap(),
    );
    // Load goes on until writes have succeeded for a while after the switch.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    running.await.unwrap();
    let revocation = revocation_after_switch(clients, ws).await;
    let seen = Arc::into_inner(seen).unwrap().into_inner();
    let outage = seen.write_outage();
    eprintln!(
        "FAILOVER {name}: engine switch-over {} ms; write outage {} ms; {} verifications of cached keys, {} failed; {} writes acknowledged; revocation after the switch refused everywhere in {} ms",
        engine.as_millis(),
        outage.as_millis(),
        seen.verifications,
        seen.failed_verifications.len(),
        seen.created.len() + seen.revoked.len(),
        revocation.as_millis(),
    );
    assert!(
        seen.failed_verifications.is_empty(),
        "{name}: failed verifications: {:?}",
        &seen.failed_verifications[..seen.failed_verifications.len().min(5)]
    );
    assert!(
        outage <= engine + Duration::from_secs(2),
        "{name}: writes failed for {outage:?}, the engine switched in {engine:?}"
    );
    seen
}

#[test]
fn keyplane_rides_through_a_planned_and_an_unplanned_postgres_failover() {
    if !runnable() {
        return;
    }
    let _formation = Formation;
    // bench/pgaf.sh names the user for libpq clients; keyplane gets the URL exactly as
    // `pg_autoctl show uri` prints it, the user coming from PGUSER, as libpq's would.
    let uri = pgaf("up").replacen("postgres://postgres@", "postgres://", 1);
    eprintln!("formation up: {uri}");
    run_test(async move {
        let first = start_replica(&uri, true).await;
        let others = [
            start_replica(&uri, false).await,
            start_replica(&uri, false).await,
        ];
        let replicas: Vec<&Replica> = std::iter::once(&first).chain(&others).collect();
        let admin = Cred::Bearer(token(Some(uuid::Uuid::now_v7()), &all_builtin()));
        let clients: Vec<Client> = replicas
            .iter()
            .map(|r| Client::new(r.channel.clone(), &admin))
            .collect();
        let ws = clients[0].create_workspace("failover").await.id;
        let mut cached = Vec::new();
        let mut spare = Vec::new();
        for i in 0..60 {
            let created = clients[0]
                .keys
                .clone()
                .create_api_key(pb::CreateApiKeyRequest {
                    workspace_id: ws.clone(),
                    name: format!("k{i}"),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            if i < 20 {
                cached.push(created.secret);
            } else {
                spare.push(created.api_key.unwrap().id);
            }
        }
        // Every replica's feed up, and every cached key in every replica's cache.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for client in &clients {
            for key in &cached {
                let r = client.verify(key, &[]).await;
                assert_eq!(r.code(), pb::VerifyCode::Valid);
            }
        }

        let spare_b = spare.split_off(spare.len() / 2);
        let planned = phase(
            "planned (pg_autoctl perform failover)",
            "failover",
            &clients,
            &cached,
            spare,
            &ws,
        )
        .await;
        let unplanned = phase(
            "unplanned (primary node SIGKILLed)",
            "kill-primary",
            &clients,
            &cached,
            spare_b,
            &ws,
        )
        .await;

        // Every acknowledged write is there, read through every replica.
        let mut lost = Vec::new();
        for seen in [&planned, &unplanned] {
            for id in &seen.created {
                let got = clients[2]
                    .workspaces
                    .clone()
                    .get_workspace(pb::GetWorkspaceRequest { id: id.clone() })
                    .await;
                if got.is_err() {
                    lost.push(format!("workspace {id}"));
                }
            }
            for id in &seen.revoked {
                let key = clients[1]
                    .keys
                    .clone()
                    .get_api_key(pb::GetApiKeyRequest { id: id.clone() })
                    .await
                    .unwrap()
                    .into_inner();
                if key.api_key.unwrap().revoke_time.is_none() {
                    lost.push(format!("revocation of {id}"));
                }
            }
        }
        eprintln!(
            "FAILOVER acknowledged writes lost: {} of {}",
            lost.len(),
            planned.created.len()
                + planned.revoked.len()
                + unplanned.created.len()
                + unplanned.revoked.len()
        );
        assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    });
}
