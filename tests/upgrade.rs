//! Upgrades: this release on a schema a newer release migrated (it serves without
//! migrating, on both backends), replicas starting together on a database still to migrate
//! (they take turns), and a rolling upgrade from the previous release on one
//! PostgreSQL database, each release a real process: keys written on either verify on the
//! other, revocations and disables cross versions within a second (their `NOTIFY`s agree),
//! the old replica restarts on the migrated schema, and the new one carries on alone.
//!
//! The rolling upgrade needs `KEYPLANE_TEST_POSTGRES_URL` and
//! `KEYPLANE_PREVIOUS_RELEASE_BIN` (the previous release's `keyplane`, built by
//! `.ci/build-previous-release`); without them it says `SKIPPED` on stderr.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use keyplane::proto as pb;
use keyplane::storage::schema;
use keyplane::storage::{Migrator, MigratorTrait};
use keyplane_testkit::*;
use sea_orm::ConnectionTrait;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_keyplane");
/// A migration only a newer release knows.
const FUTURE: &str = "m29991231_000001_from_a_newer_release";
/// The revocation bound every replica keeps, whatever its version.
const BOUND: Duration = Duration::from_secs(1);

async fn record_future_migration(db_url: &str) {
    let conn = sea_orm::Database::connect(db_url).await.unwrap();
    conn.execute_unprepared(&format!(
        "INSERT INTO seaql_migrations (version, applied_at) VALUES ('{FUTURE}', 0)"
    ))
    .await
    .unwrap();
    let _ = conn.close().await;
}

// ---- This release on a newer schema (in process, both backends) ----

async fn a_newer_schema_is_served_without_migrating(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let (_, before) = app.create_key(&ws.id, &[]).await;
    let tenant = app.tenant;
    let (stopped, db) = app.stop().await;
    stopped.unwrap();
    record_future_migration(&db.url).await;

    // What used to stop the start: sea-orm-migration refuses an applied migration it has
    // no file for.
    let conn = keyplane::storage::connect(&db.url).await.unwrap();
    let refused = Migrator::up(&conn, None).await.unwrap_err().to_string();
    assert!(refused.contains("is missing"), "{refused}");

    let state = schema::migrate_on_start(&conn).await.unwrap();
    assert_eq!(state.newer, vec![FUTURE.to_owned()]);
    assert!(state.pending.is_empty() && state.applied_now.is_empty());
    assert!(state.newer_warning().contains(&format!(
        "database schema is newer than this release: 1 migration(s) unknown ({FUTURE}); not migrating"
    )));
    let _ = conn.close().await;

    let url = db.url.clone();
    let mut app = spawn_with(db, test_settings(&url)).await;
    app.tenant = tenant;
    assert_eq!(app.verify(&before, &[]).await.code(), pb::VerifyCode::Valid);
    let (_, after) = app.create_key(&ws.id, &[]).await;
    assert_eq!(app.verify(&after, &[]).await.code(), pb::VerifyCode::Valid);
    let (stopped, _db) = app.stop().await;
    stopped.unwrap();
}

/// A newer release that lacks one of this release's migrations is not a successor of it:
/// neither applying that migration nor ignoring it is known to be safe, so `serve` stops.
async fn a_schema_from_another_line_of_releases_stops_the_start(backend: Backend) {
    let app = spawn_app(backend).await;
    let (stopped, db) = app.stop().await;
    stopped.unwrap();
    record_future_migration(&db.url).await;
    let conn = sea_orm::Database::connect(&db.url).await.unwrap();
    conn.execute_unprepared(&format!(
        "DELETE FROM seaql_migrations WHERE version <> '{FUTURE}'"
    ))
    .await
    .unwrap();
    let _ = conn.close().await;
    let Err(e) = keyplane::Application::build(test_settings(&db.url)).await else {
        panic!("started on a schema from another line of releases");
    };
    let message = format!("{e:#}");
    assert!(
        message.contains("not a successor of this one") && message.contains(FUTURE),
        "{message}"
    );
}

on_both_backends!(
    a_newer_schema_is_served_without_migrating,
    a_schema_from_another_line_of_releases_stops_the_start,
);

/// Several replicas of a new release may start at once on a database still to migrate:
/// they take turns (an advisory lock) instead of racing on the same `CREATE TABLE`.
#[test]
fn replicas_starting_together_on_postgres_migrate_once() {
    if postgres_url().is_none() {
        announce_skip(
            "upgrade::replicas_starting_together_on_postgres_migrate_once",
            "KEYPLANE_TEST_POSTGRES_URL is not set: replicas share PostgreSQL",
        );
        return;
    }
    run_test(async {
        let db = fresh_database(Backend::Postgres).await;
        let starts = (0..4).map(|_| keyplane::Application::build(test_settings(&db.url)));
        for started in futures::future::join_all(starts).await {
            started.expect("every replica starts");
        }
        let conn = keyplane::storage::connect(&db.url).await.unwrap();
        let state = schema::inspect(&conn).await.unwrap();
        assert!(state.pending.is_empty() && !state.is_newer(), "{state:?}");
        let _ = conn.close().await;
    });
}

#[test]
fn migrate_status_and_up_and_serve_on_a_newer_schema() {
    run_test(async {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/k.db?mode=rwc", dir.path().display());
        let up = Command::new(BIN)
            .args(["migrate", "up", "--database-url", &url])
            .output()
            .unwrap();
        assert!(up.status.success(), "{up:?}");
        record_future_migration(&url).await;

        let status = Command::new(BIN)
            .args(["migrate", "status", "--database-url", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(status.status.success(), "{status:?}");
        assert!(text.contains("applied  m20261123_000001_init"), "{text}");
        assert!(
            text.contains(&format!("newer    {FUTURE}  (applied by a newer release)")),
            "{text}"
        );
        assert!(!text.contains("pending"), "{text}");

        // Nothing of this release is missing: `up` succeeds, and says why it did nothing.
        let up = Command::new(BIN)
            .args(["migrate", "up", "--database-url", &url])
            .output()
            .unwrap();
        assert!(up.status.success(), "{up:?}");
        assert!(
            String::from_utf8_lossy(&up.stderr)
                .contains("database schema is newer than this release"),
            "{up:?}"
        );

        let logs = tempfile::tempdir().unwrap();
        let mut server = Replica::start(BIN, "newer-schema", &url, logs.path(), &[]);
        server
            .ready()
            .await
            .expect("serve starts on a newer schema");
        let log = server.log();
        assert!(
            log.contains(&format!(
                "database schema is newer than this release: 1 migration(s) unknown ({FUTURE}); \
                 not migrating — expected during a rolling upgrade"
            )),
            "{log}"
        );
        server.stop().await;
    });
}

// ---- A rolling upgrade from the previous release (processes, PostgreSQL) ----

/// The previous release's binary, or why the rolling upgrade cannot run here.
fn previous_release() -> Result<PathBuf, &'static str> {
    if postgres_url().is_none() {
        return Err("KEYPLANE_TEST_POSTGRES_URL is not set: replicas share PostgreSQL");
    }
    let Some(bin) = std::env::var_os("KEYPLANE_PREVIOUS_RELEASE_BIN").filter(|b| !b.is_empty())
    else {
        return Err(
            "KEYPLANE_PREVIOUS_RELEASE_BIN is not set: build the previous release with \
             `export KEYPLANE_PREVIOUS_RELEASE_BIN=$(.ci/build-previous-release)` (as .ci/run does)",
        );
    };
    let bin = PathBuf::from(bin);
    // Set but wrong is a broken setup, not a reason to skip.
    assert!(
        bin.is_file(),
        "KEYPLANE_PREVIOUS_RELEASE_BIN={} is not a file",
        bin.display()
    );
    Ok(bin)
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// One `keyplane serve` process, its log in a file.
struct Replica {
    name: String,
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    log_path: PathBuf,
    channel: Option<tonic::transport::Channel>,
}

impl Replica {
    fn start(
        bin: impl AsRef<Path>,
        name: &str,
        db_url: &str,
        logs: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let (addr, metrics) = (free_port(), free_port());
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(bin.as_ref());
        command
            .args(["serve", "--listen", &addr.to_string()])
            .args(["--metrics-listen", &metrics.to_string()])
            .args(["--shutdown-grace", "5s", "--log-format", "text"])
            .env("KEYPLANE_DATABASE_URL", db_url)
            .env("KEYPLANE_JWT_SECRET", JWT_SECRET)
            .env("KEYPLANE_JWT_LEEWAY", "0s")
            .env_remove("KEYPLANE_NO_MIGRATE")
            .env("RUST_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        for (key, value) in env {
            command.env(key, value);
        }
        Self {
            name: name.to_owned(),
            child: command.spawn().unwrap(),
            addr,
            metrics,
            log_path,
            channel: None,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the replica reports SERVING, or returns how it exited.
    async fn ready(&mut self) -> Result<(), ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            if let Ok(channel) =
                tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
                    .unwrap()
                    .connect()
                    .await
            {
                let serving = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving);
                if serving {
                    self.channel = Some(channel);
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} did not become ready:\n{}", self.name, self.log());
    }

    fn client(&self, cred: &Cred) -> Client {
        Client::new(self.channel.clone().expect("a ready replica"), cred)
    }

    /// SIGTERM, then a clean exit within the grace period.
    async fn stop(mut self) -> String {
        let term = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{} did not stop",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = self.log();
        assert!(
            status.success(),
            "{} exited with {status}:\n{log}",
            self.name
        );
        log
    }

    /// One Prometheus sample (0 when not exported yet).
    fn metric(&self, name: &str) -> f64 {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n",
            self.metrics
        )
        .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|line| {
                let (key, value) = line.rsplit_once(' ')?;
                (key == name).then(|| value.parse().ok())?
            })
            .unwrap_or(0.0)
    }

    /// Waits until this replica's invalidation feed is up: until then its cache does not
    /// answer, and the cross-version checks would prove nothing about `NOTIFY`.
    async fn feed_up(&self) {
        let started = Instant::now();
        while self.metric("keyplane_invalidation_feed_up") != 1.0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{}'s invalidation feed is not up:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // A failed test must not leave servers behind; after `stop` this is a no-op.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `cred` sees of `secret` on `replica`.
async fn verify_on(replica: &Replica, cred: &Cred, secret: &str) -> pb::VerifyCode {
    replica
        .client(cred)
        .verify(secret, &["crm:read"])
        .await
        .code()
}

/// The keys made during the test and what every replica must answer for them.
#[derive(Default)]
struct Ledger {
    keys: Vec<(String, String, pb::VerifyCode)>,
}

impl Ledger {
    async fn create(&mut self, on: &Replica, cred: &Cred, workspace: &str) -> (String, String) {
        let created = on
            .client(cred)
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: workspace.into(),
                name: format!("made on {}", on.name),
                scopes: strings(&["crm:read"]),
                ..Default::default()
            })
            .await
            .expect("create key")
            .into_inner();
        let id = created.api_key.unwrap().id;
        self.keys
            .push((id.clone(), created.secret.clone(), pb::VerifyCode::Valid));
        (id, created.secret)
    }

    fn expect(&mut self, id: &str, code: pb::VerifyCode) {
        for key in &mut self.keys {
            if key.0 == id {
                key.2 = code;
            }
        }
    }

    /// Every key answers as expected on `replica`.
    async fn check_all(&self, replica: &Replica, cred: &Cred) {
        for (id, secret, expected) in &self.keys {
            assert_eq!(
                verify_on(replica, cred, secret).await,
                *expected,
                "key {id} on {}",
                replica.name
            );
        }
    }
}

/// A key made on `writer`, hot in `other`'s cache, revoked or disabled through `writer`:
/// `other` refuses it within the bound, told by `writer`'s `NOTIFY`.
async fn crosses_versions(
    ledger: &mut Ledger,
    writer: &Replica,
    other: &Replica,
    cred: &Cred,
    workspace: &str,
    change: &str,
) {
    let (id, secret) = ledger.create(writer, cred, workspace).await;
    let hits = other.metric("keyplane_verification_cache_total{result=\"hit\"}");
    for _ in 0..3 {
        assert_eq!(verify_on(other, cred, &secret).await, pb::VerifyCode::Valid);
    }
    assert!(
        other.metric("keyplane_verification_cache_total{result=\"hit\"}") > hits,
        "{} answered from its cache",
        other.name
    );
    let heard = other.metric("keyplane_invalidations_received_total");
    let as_writer = writer.client(cred);
    let expected = if change == "revoke" {
        as_writer.revoke_key(&id).await;
        pb::VerifyCode::Revoked
    } else {
        as_writer.disable_key(&id).await;
        pb::VerifyCode::Disabled
    };
    ledger.expect(&id, expected);
    let since = Instant::now();
    loop {
        let code = verify_on(other, cred, &secret).await;
        if code == expected {
            break;
        }
        assert_eq!(code, pb::VerifyCode::Valid, "an unexpected answer");
        assert!(
            since.elapsed() < BOUND,
            "{} still answers VALID {:?} after a {change} on {}",
            other.name,
            since.elapsed(),
            writer.name
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        other.metric("keyplane_invalidations_received_total") > heard,
        "{} heard {}'s NOTIFY",
        other.name,
        writer.name
    );
    eprintln!(
        "{change} on {} refused by {} after {:?}",
        writer.name,
        other.name,
        since.elapsed()
    );
}

/// The migrations a binary lists in `keyplane migrate status` (applied or pending).
fn migrations_known_to(bin: &Path, db_url: &str) -> BTreeSet<String> {
    let out = Command::new(bin)
        .args(["migrate", "status", "--database-url", db_url])
        .output()
        .unwrap();
    assert!(out.status.success(), "migrate status: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["applied" | "pending", name, ..] => Some(name.to_owned()),
                _ => None,
            },
        )
        .collect()
}

#[test]
fn rolling_upgrade_from_the_previous_release() {
    let previous = match previous_release() {
        Ok(bin) => bin,
        Err(why) => {
            announce_skip("upgrade::rolling_upgrade_from_the_previous_release", why);
            return;
        }
    };
    run_test(async move {
        let db = fresh_database(Backend::Postgres).await;
        let logs = tempfile::tempdir().unwrap();
        let cred = Cred::Bearer(token(Some(Uuid::now_v7()), &all_builtin()));
        let mut ledger = Ledger::default();

        // The previous release alone: it migrates the fresh database to its schema.
        let old_known = migrations_known_to(&previous, &db.url);
        let mut old = Replica::start(&previous, "old", &db.url, logs.path(), &[]);
        old.ready().await.expect("the previous release starts");
        old.client(&cred)
            .scopes
            .create_scope(pb::CreateScopeRequest {
                representation: "crm:read".into(),
                ..Default::default()
            })
            .await
            .expect("create scope");
        let workspace = old
            .client(&cred)
            .create_workspace("made on the previous release")
            .await
            .id;
        let (_, made_on_old) = ledger.create(&old, &cred, &workspace).await;

        // This release joins and migrates forward, while the previous one serves.
        let mut new = Replica::start(BIN, "new", &db.url, logs.path(), &[]);
        new.ready().await.expect("this release starts");
        let conn = keyplane::storage::connect(&db.url).await.unwrap();
        let migrated = schema::inspect(&conn).await.unwrap();
        let _ = conn.close().await;
        assert!(
            migrated.pending.is_empty() && !migrated.is_newer(),
            "{migrated:?}"
        );
        let added: Vec<&String> = migrated
            .applied
            .iter()
            .filter(|name| !old_known.contains(*name))
            .collect();
        eprintln!("this release adds {} migration(s): {added:?}", added.len());

        old.feed_up().await;
        new.feed_up().await;
        let (_, made_on_new) = ledger.create(&new, &cred, &workspace).await;
        assert_eq!(
            verify_on(&new, &cred, &made_on_old).await,
            pb::VerifyCode::Valid
        );
        assert_eq!(
            verify_on(&old, &cred, &made_on_new).await,
            pb::VerifyCode::Valid
        );
        for (writer, other) in [(&old, &new), (&new, &old)] {
            for change in ["revoke", "disable"] {
                crosses_versions(&mut ledger, writer, other, &cred, &workspace, change).await;
            }
        }
        ledger.check_all(&old, &cred).await;
        ledger.check_all(&new, &cred).await;

        // The old replica restarts on the migrated schema. A release that cannot tolerate
        // a newer schema must be started with --no-migrate (docs/operations.md, Upgrades).
        old.stop().await;
        let mut old = Replica::start(&previous, "old-restarted", &db.url, logs.path(), &[]);
        let restarted = old.ready().await;
        if restarted.is_ok() && !added.is_empty() {
            // A previous release that tolerates a newer schema says so, and serves.
            let log = old.log();
            assert!(
                log.contains("database schema is newer than this release"),
                "{log}"
            );
        }
        if let Err(status) = restarted {
            let log = old.log();
            assert!(
                !added.is_empty(),
                "the previous release failed to restart ({status}) though this release \
                 added no migration:\n{log}"
            );
            assert!(log.contains("is missing"), "{log}");
            eprintln!(
                "the previous release refuses to start on the newer schema ({status}); \
                 restarting it with KEYPLANE_NO_MIGRATE=true"
            );
            drop(old);
            old = Replica::start(
                &previous,
                "old-restarted-no-migrate",
                &db.url,
                logs.path(),
                &[("KEYPLANE_NO_MIGRATE", "true")],
            );
            old.ready()
                .await
                .expect("the previous release starts with --no-migrate");
        }
        old.feed_up().await;
        ledger.check_all(&old, &cred).await;
        let (_, made_on_restarted) = ledger.create(&old, &cred, &workspace).await;
        assert_eq!(
            verify_on(&new, &cred, &made_on_restarted).await,
            pb::VerifyCode::Valid
        );
        crosses_versions(&mut ledger, &new, &old, &cred, &workspace, "revoke").await;
        crosses_versions(&mut ledger, &old, &new, &cred, &workspace, "disable").await;

        // The old replica leaves; the new one serves everything made during the overlap.
        old.stop().await;
        ledger.check_all(&new, &cred).await;
        let listed: BTreeSet<String> = new
            .client(&cred)
            .keys
            .list_api_keys(pb::ListApiKeysRequest {
                workspace_id: workspace.clone(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .expect("list keys")
            .into_inner()
            .api_keys
            .into_iter()
            .map(|key| key.id)
            .collect();
        let made: BTreeSet<String> = ledger.keys.iter().map(|key| key.0.clone()).collect();
        assert_eq!(listed, made);
        let (_, made_at_the_end) = ledger.create(&new, &cred, &workspace).await;
        assert_eq!(
            verify_on(&new, &cred, &made_at_the_end).await,
            pb::VerifyCode::Valid
        );
        new.stop().await;

        // Every process of both versions logged at debug level: none wrote a secret.
        let mut logged = String::new();
        for entry in std::fs::read_dir(logs.path()).unwrap() {
            logged.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
        }
        assert!(
            logged.contains("DEBUG"),
            "the servers logged at debug level"
        );
        for line in logged.lines() {
            assert!(
                find_secret(line).is_none(),
                "secret in a server log: {line}"
            );
        }
    });
}
