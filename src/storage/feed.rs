//! The invalidation feed: a dedicated PostgreSQL connection that `LISTEN`s for the
//! evictions every replica sends (see [`invalidation`](super::invalidation)) and applies
//! them to this replica's cache.
//!
//! # Why the 1-second bound holds
//!
//! A write's `NOTIFY` is sent in the write's transaction, so PostgreSQL delivers it to every
//! listening connection when (and only when) the write commits. Each case:
//!
//! - **Feed up.** The notification reaches this replica within the network's latency
//!   (milliseconds) of the commit; the eviction happens as it arrives. A verification that
//!   filled the cache from a read taken before the commit cannot re-insert the stale
//!   answer after the eviction: the cache checks its eviction epoch around every fill.
//! - **Feed known down** (the connection closed, a query failed, PostgreSQL restarted): the
//!   state is [`FeedState::is_up`] = false from the moment the loss is seen, and the cache
//!   is bypassed: every verification reads the database, which is the truth.
//! - **Feed silently dead** (a connection that stopped delivering without closing): every
//!   [`HEARTBEAT`] the feed sends itself a notification through the ordinary pool, and
//!   marks itself down when none has come back within [`HEARTBEAT_TIMEOUT`]. So the cache
//!   can serve stale answers for at most `HEARTBEAT + HEARTBEAT_TIMEOUT` (750 ms) after a
//!   silent failure, inside the 1-second bound.
//! - **Feed back.** After reconnecting, the feed `LISTEN`s first, then flushes the whole
//!   cache, and only then marks itself up: whatever changed while it was down is read
//!   fresh from the database, and nothing sent after the `LISTEN` can be missed.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sea_orm::sqlx::postgres::{PgListener, PgPoolOptions};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::budgets::leases::recalled_budget;
use super::imported::{self, ImportedKeys};
use super::invalidation::{CHANNEL, Eviction, EvictionSink};
use crate::domain::usage::BudgetId;

/// The channel of usage-control messages between replicas (a recall of unspent credits).
/// Apart from the evictions' so that a release that does not know them never hears them
/// (it would read an unknown eviction payload as "evict everything").
pub const USAGE_CHANNEL: &str = "keyplane_usage";

/// How often the feed proves to itself that it still delivers.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// How long a heartbeat may take to come back before the feed counts as down.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(500);
/// Reconnection backoff: doubles from the first value up to the second, which is short so
/// that the cache answers again soon after the database returns.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(1));
/// How long connecting the feed may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the cache may answer, and since when it holds what it held when the feed was
/// last known good. Shared by the feed and the cache.
#[derive(Debug)]
pub struct FeedState {
    up: AtomicBool,
    /// When the feed last proved that it delivered everything committed before (a
    /// heartbeat came back, or it started listening after a flush), in milliseconds since
    /// `origin`; 0: never.
    last_good_ms: AtomicU64,
    origin: std::time::Instant,
}

impl FeedState {
    fn new(up: bool) -> Arc<Self> {
        Arc::new(Self {
            up: AtomicBool::new(up),
            last_good_ms: AtomicU64::new(0),
            origin: std::time::Instant::now(),
        })
    }

    /// A replica without a feed to wait for (SQLite: one process, local eviction only).
    pub fn always_up() -> Arc<Self> {
        Self::new(true)
    }

    /// A replica whose cache stays off until its feed is listening.
    pub fn down() -> Arc<Self> {
        Self::new(false)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// How long ago the feed was last known good: `None` if it never was. Every write
    /// committed before that moment had reached this replica's cache.
    pub fn since_last_good(&self) -> Option<Duration> {
        match self.last_good_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms)),
            ),
        }
    }

    /// Marks `moment` as known good: everything committed before it has been applied.
    fn good_at(&self, moment: std::time::Instant) {
        let ms = u64::try_from(moment.saturating_duration_since(self.origin).as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.last_good_ms.fetch_max(ms, Ordering::AcqRel);
    }

    fn set(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            metrics::gauge!("keyplane_invalidation_feed_up").set(if up { 1.0 } else { 0.0 });
            metrics::counter!(
                "keyplane_invalidation_feed_transitions_total",
                "to" => if up { "up" } else { "down" }
            )
            .increment(1);
            if up {
                tracing::info!("invalidation feed up: the verification cache answers again");
            } else {
                tracing::warn!("invalidation feed down: verifications read the database");
            }
        }
    }
}

/// Told about the feed's life, the other replicas' heartbeats it hears (how usage controls
/// count the replicas sharing the database) and the recalls on [`USAGE_CHANNEL`].
pub trait Heartbeats: Send + Sync {
    /// The feed is listening: heartbeats heard from now on are real.
    fn feed_up(&self);
    /// The feed is lost: nothing heard before can be trusted.
    fn feed_down(&self);
    /// Another replica's heartbeat, by its replica id.
    fn heard(&self, replica: &str);
    /// A recall of a budget ([`Store::recall_budget`](super::Store::recall_budget)), from
    /// any replica (this one included).
    fn recalled(&self, budget: BudgetId);
}

/// What the listening task reports.
enum Heard {
    Payload(String),
    Usage(String),
    Lost(String),
}

/// Keeps the feed up until `stop`: listens, applies evictions, learns of imported keys,
/// reconnects with backoff.
pub async fn run(
    db: DatabaseConnection,
    sink: Arc<dyn EvictionSink>,
    state: Arc<FeedState>,
    heartbeats: Arc<dyn Heartbeats>,
    imported: Arc<ImportedKeys>,
    stop: CancellationToken,
) {
    // Tells this replica's heartbeats from the others'.
    let me = uuid::Uuid::now_v7().simple().to_string();
    let mut backoff = BACKOFF.0;
    loop {
        let ended = tokio::select! {
            ended = listen_once(&db, sink.as_ref(), &state, heartbeats.as_ref(), &imported, &me) => ended,
            _ = stop.cancelled() => return,
        };
        state.set(false);
        // A feed that was up starts retrying quickly again; one that cannot come up backs off.
        let reason = match ended {
            Ok(lost) => {
                backoff = BACKOFF.0;
                lost
            }
            Err(failed) => failed,
        };
        tracing::warn!(%reason, retry_in = ?backoff, "invalidation feed lost");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection's life: `Ok` with why it was lost after it was up, `Err` when it never
/// came up.
async fn listen_once(
    db: &DatabaseConnection,
    sink: &dyn EvictionSink,
    state: &FeedState,
    heartbeats: &dyn Heartbeats,
    imported: &ImportedKeys,
    me: &str,
) -> Result<String, String> {
    // A connection of its own, to the host the pool uses now (which follows a failover).
    let options = db.get_postgres_connection_pool().connect_options();
    let own = PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with((*options).clone())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut listener = PgListener::connect_with(&own)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    // Losing the connection ends this listener's life; `run` makes a new one.
    listener.eager_reconnect(false);
    listener
        .listen_all([CHANNEL, USAGE_CHANNEL])
        .await
        .map_err(|e| format!("LISTEN failed: {e}"))?;
    // Listening from here on: an import's notice may have been missed while down.
    imported
        .refresh(db)
        .await
        .map_err(|e| format!("cannot read whether keys were imported: {e}"))?;
    // Flush what may have changed unseen, then answer again.
    sink.evict(&Eviction::All);
    state.good_at(std::time::Instant::now());
    state.set(true);
    heartbeats.feed_up();

    let (tx, mut heard) = mpsc::channel(1024);
    let listening = tokio::spawn(async move {
        loop {
            let message = match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == USAGE_CHANNEL => Heard::Usage(n.payload().to_owned()),
                Ok(Some(n)) => Heard::Payload(n.payload().to_owned()),
                Ok(None) => Heard::Lost("connection closed".into()),
                Err(e) => Heard::Lost(format!("{e}")),
            };
            let lost = matches!(message, Heard::Lost(_));
            if tx.send(message).await.is_err() || lost {
                return;
            }
        }
    });
    let ping = format!("ping:{me}");
    let mut ticker = tokio::time::interval(HEARTBEAT);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard_self = Instant::now();
    let mut in_flight = std::collections::VecDeque::new();
    let reason = loop {
        tokio::select! {
            message = heard.recv() => match message {
                Some(Heard::Payload(payload)) if payload == ping => {
                    last_heard_self = Instant::now();
                    // Our heartbeats come back in the order sent. Everything committed
                    // before this one was sent has been delivered before it: that moment
                    // (not this one) is known good.
                    if let Some(sent) = in_flight.pop_front() {
                        state.good_at(sent);
                    }
                }
                Some(Heard::Payload(payload)) if payload.starts_with("ping:") => {
                    heartbeats.heard(payload.trim_start_matches("ping:"));
                }
                Some(Heard::Payload(payload)) if payload == imported::PAYLOAD => imported.set(),
                Some(Heard::Payload(payload)) => {
                    metrics::counter!("keyplane_invalidations_received_total").increment(1);
                    sink.evict(&Eviction::from_payload(&payload));
                }
                Some(Heard::Usage(payload)) => {
                    if let Some(budget) = recalled_budget(&payload) {
                        heartbeats.recalled(budget);
                    }
                }
                Some(Heard::Lost(why)) => break format!("connection lost: {why}"),
                None => break "listener stopped".to_owned(),
            },
            _ = ticker.tick() => {
                if last_heard_self.elapsed() > HEARTBEAT + HEARTBEAT_TIMEOUT {
                    break "no heartbeat came back".to_owned();
                }
                // Sent through the pool, as writes are: an echo proves the whole path.
                in_flight.push_back(std::time::Instant::now());
                let sent = tokio::time::timeout(HEARTBEAT_TIMEOUT, db.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT pg_notify($1, $2)",
                    [CHANNEL.into(), ping.clone().into()],
                )))
                .await;
                if !matches!(sent, Ok(Ok(_))) {
                    break "cannot send a heartbeat".to_owned();
                }
            }
        }
    };
    // Down before anything else: from here on the cache must not answer.
    state.set(false);
    heartbeats.feed_down();
    listening.abort();
    Ok(reason)
}
