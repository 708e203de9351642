//! Following the primary of a multi-host PostgreSQL URL through a failover, without a
//! restart: what libpq does for `target_session_attrs=read-write`, for a pool.
//!
//! The pool has one set of connect options at a time, pointing at the host believed to be
//! the primary. A watcher asks the pool's host every [`WATCH_EVERY`] whether it still takes
//! writes (`pg_is_in_recovery()`); when it does not answer, or answers as a standby, the
//! watcher tries the hosts in the URL's order until one takes writes, then points the pool's
//! new connections at it and has every connection opened before the switch dropped when next
//! handed out. A connection opened while the options still point at a demoted primary is
//! refused as it opens (it would only fail writes with SQLSTATE 25006), and the pool opens
//! another, which reads the options again. The `LISTEN` feed reconnects through
//! [`Primary::options`], so it follows the same host.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sea_orm::DatabaseConnection;
use sea_orm::sqlx::Connection as _;
use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use super::url::{PostgresUrl, SessionAttrs};

/// How often the watcher checks the pool's host, and retries while no host takes writes.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long one host may take to accept a connection and answer, in a search.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Primary {
    url: PostgresUrl,
    /// The host the pool's new connections go to.
    current: AtomicUsize,
    /// When the pool last changed hosts, in milliseconds since `origin` (0: never):
    /// connections older than that go to the old host.
    switched_ms: AtomicU64,
    origin: Instant,
}

impl Primary {
    /// Finds the first host that takes writes (or, for `target_session_attrs=any`, accepts
    /// a connection), trying every host in order for at most `patience`. The error lists
    /// every host's reason, without the password.
    pub async fn find(url: PostgresUrl, patience: Duration) -> Result<Arc<Self>, String> {
        let deadline = Instant::now() + patience;
        loop {
            let found = search(&url).await;
            match found {
                Ok(index) => {
                    return Ok(Arc::new(Self {
                        url,
                        current: AtomicUsize::new(index),
                        switched_ms: AtomicU64::new(0),
                        origin: Instant::now(),
                    }));
                }
                Err(reasons) if Instant::now() + WATCH_EVERY >= deadline => return Err(reasons),
                Err(_) => tokio::time::sleep(WATCH_EVERY).await,
            }
        }
    }

    /// The connect options of the host the pool uses now.
    pub fn options(&self) -> PgConnectOptions {
        self.url.hosts()[self.current.load(Ordering::Acquire)]
            .options
            .clone()
    }

    /// The single-host URL of the host the pool uses now (it holds the password).
    pub fn url(&self) -> &str {
        self.url.hosts()[self.current.load(Ordering::Acquire)].url()
    }

    /// The driver's error text without the password.
    pub fn scrub(&self, text: &str) -> String {
        self.url.scrub(text)
    }

    /// The `host:port` the pool uses now, for logs.
    pub fn host(&self) -> &str {
        &self.url.hosts()[self.current.load(Ordering::Acquire)].name
    }

    pub fn attrs(&self) -> SessionAttrs {
        self.url.attrs
    }

    /// Whether a pooled connection of this age was opened before the last switch.
    pub fn predates_switch(&self, age: Duration) -> bool {
        let switched = self.switched_ms.load(Ordering::Acquire);
        switched != 0 && {
            let opened = self.origin.elapsed().saturating_sub(age);
            opened.as_millis() < u128::from(switched)
        }
    }

    /// Keeps the pool on the primary until `stop`. The watcher asks over a connection of
    /// its own, so a busy pool is never mistaken for a lost primary.
    pub async fn follow(self: Arc<Self>, db: DatabaseConnection, stop: CancellationToken) {
        let pool = db.get_postgres_connection_pool().clone();
        let mut ticker = tokio::time::interval(WATCH_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watching: Option<PgConnection> = None;
        let mut lost_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            let answered = tokio::time::timeout(PROBE_TIMEOUT, async {
                let conn = match &mut watching {
                    Some(conn) => conn,
                    None => watching.insert(
                        PgConnection::connect_with(&self.options())
                            .await
                            .map_err(|e| e.to_string())?,
                    ),
                };
                check(conn, self.attrs()).await
            })
            .await
            .unwrap_or_else(|_| Err("no answer".to_owned()));
            let why = match answered {
                Ok(()) => {
                    if let Some(since) = lost_since.take() {
                        tracing::info!(host = self.host(), after = ?since.elapsed(), "the PostgreSQL primary answers again");
                    }
                    continue;
                }
                Err(why) => why,
            };
            watching = None;
            if lost_since.is_none() {
                lost_since = Some(Instant::now());
                tracing::warn!(host = self.host(), reason = %self.url.scrub(&why), "the PostgreSQL primary does not take writes; looking for one among the URL's hosts");
            }
            let Ok(index) = search(&self.url).await else {
                continue;
            };
            if index != self.current.load(Ordering::Acquire) {
                self.switch_to(index, &pool);
            }
        }
    }

    fn switch_to(&self, index: usize, pool: &PgPool) {
        let from = self.host().to_owned();
        self.current.store(index, Ordering::Release);
        pool.set_connect_options(self.options());
        let now = u64::try_from(self.origin.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.switched_ms.store(now, Ordering::Release);
        metrics::counter!("keyplane_database_primary_switches_total").increment(1);
        tracing::warn!(from = %from, to = self.host(), "PostgreSQL primary switched: new connections go to the new primary");
    }
}

/// The index of the first host that will do, or every host's reason.
async fn search(url: &PostgresUrl) -> Result<usize, String> {
    let mut reasons = Vec::new();
    for (i, host) in url.hosts().iter().enumerate() {
        match tokio::time::timeout(PROBE_TIMEOUT, probe(&host.options, url.attrs)).await {
            Ok(Ok(())) => return Ok(i),
            Ok(Err(why)) => reasons.push(format!("{}: {}", host.name, url.scrub(&why))),
            Err(_) => reasons.push(format!("{}: no answer within {PROBE_TIMEOUT:?}", host.name)),
        }
    }
    Err(reasons.join("; "))
}

/// Connects to one host and checks that it will do.
async fn probe(options: &PgConnectOptions, attrs: SessionAttrs) -> Result<(), String> {
    let mut conn = PgConnection::connect_with(options)
        .await
        .map_err(|e| e.to_string())?;
    let checked = check(&mut conn, attrs).await;
    let _ = conn.close().await;
    checked
}

/// Whether a connection's server answers, and takes writes when that is what the URL asks
/// for.
pub async fn check(conn: &mut PgConnection, attrs: SessionAttrs) -> Result<(), String> {
    if attrs == SessionAttrs::Any {
        return conn.ping().await.map_err(|e| e.to_string());
    }
    let in_recovery: bool = sea_orm::sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    if in_recovery {
        Err("a standby (read-only)".into())
    } else {
        Ok(())
    }
}
