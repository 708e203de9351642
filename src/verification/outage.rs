//! Verification while PostgreSQL cannot be reached: stale-if-error.
//!
//! A replica whose invalidation feed is down normally bypasses its cache and reads the
//! database, which is the truth (see `storage::feed`). When the database does not answer
//! either (a read fails, or takes longer than `--database-timeout`), a verification of a key
//! in the cache is answered from the cache as it stood when the feed was last known good,
//! for at most `--stale-if-error` counted from that moment, and says so (`stale`). A key
//! not in the cache has no stale answer to give: its verification waits for the database
//! (UNAVAILABLE when that fails, and at once while verifications are resting, below). Expiry and grace periods are evaluated against the
//! clock as always; a key with usage controls spends only budget this replica already
//! holds.
//!
//! # What the bound promises
//!
//! "Known good" is the send time of the last heartbeat the feed heard back: every write
//! committed before it had been applied to this cache (NOTIFY is delivered in commit order,
//! the heartbeat included). After that moment the cache is frozen: verifications that
//! bypass it do not fill it, and it is flushed before it answers normally again.
//!
//! - **The database is down for every replica.** No write can commit, so nothing can be
//!   revoked, disabled or re-scoped: the frozen cache is exactly what the database holds,
//!   and a stale answer is the answer the database would give. It is given for
//!   `--stale-if-error` after the feed was last good; then UNAVAILABLE.
//! - **One replica is cut off from the database, the others are not** (a partition). A
//!   write through another replica is not seen here until the cut heals. A key revoked at
//!   time `t` is refused by this replica from `last_good + stale-if-error` at the latest,
//!   and `last_good < t` (else the revocation would have arrived), so within
//!   `--stale-if-error` of the revocation; and within 1 s of the connection coming back,
//!   because the first read that succeeds ends stale answers (the cache is bypassed until
//!   the feed is back and has flushed it).
//! - **The feed is lost but the database answers.** No stale answer at all: the cache is
//!   bypassed and every verification reads the database, as it always has, so the 1-second
//!   bound holds unchanged.
//!
//! With `--stale-if-error 0` every verification the cache cannot answer while its feed is
//! down goes to the database, and is UNAVAILABLE when that fails: fail closed.
//!
//! # Not hammering a dead database
//!
//! After a failed read, verifications stop reading the database for a backoff that grows
//! from [`BACKOFF`]`.0` to [`BACKOFF`]`.1`; one verification per backoff tries again (the
//! others keep answering stale), and the health probe's first successful ping reopens the
//! way at once. So stale answers cost a cache lookup, not a connection attempt. On the hot
//! path (feed up, key cached) none of this runs: the cache's feed check is the one atomic
//! load it always was.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metrics::Counter;

use crate::storage::feed::FeedState;

/// The backoff after failed reads: from the first value, doubling, up to the second (short,
/// so that normal answers resume well within a second of the database's return).
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(500));

pub struct Outage {
    feed: Arc<FeedState>,
    /// `--stale-if-error`; zero: fail closed.
    bound: Duration,
    /// `--database-timeout`.
    timeout: Duration,
    /// When verifications may read the database again, in milliseconds since `origin`;
    /// 0: no failure since the last success.
    retry_at_ms: AtomicU64,
    /// Failed reads in a row, which the backoff grows with.
    failures: AtomicU32,
    origin: Instant,
    /// Whether this replica is in a stale period (for one log line at each end).
    serving_stale: AtomicBool,
    /// Stale answers given in the current period.
    stale_in_period: AtomicU64,
    stale_total: Counter,
}

impl Outage {
    pub fn new(feed: Arc<FeedState>, bound: Duration, timeout: Duration) -> Self {
        Self {
            feed,
            bound,
            timeout,
            retry_at_ms: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            origin: Instant::now(),
            serving_stale: AtomicBool::new(false),
            stale_in_period: AtomicU64::new(0),
            stale_total: metrics::counter!("keyplane_verifications_stale_total"),
        }
    }

    /// Whether stale answers are configured at all (`--stale-if-error` above zero).
    pub fn enabled(&self) -> bool {
        !self.bound.is_zero()
    }

    /// How long a verification's database read may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether the cache as it stood when the feed was last known good may still answer.
    pub fn window_open(&self) -> bool {
        self.enabled()
            && self
                .feed
                .since_last_good()
                .is_some_and(|since| since < self.bound)
    }

    /// Whether this verification may read the database. After a failure only one caller
    /// per backoff is let through; the others are told no at once.
    pub fn may_read(&self) -> bool {
        let at = self.retry_at_ms.load(Ordering::Acquire);
        if at == 0 {
            return true;
        }
        let now = self.now_ms();
        // Claim the retry, pushing the next one out so that the others keep off meanwhile.
        now >= at
            && self
                .retry_at_ms
                .compare_exchange(
                    at,
                    now + self.backoff_ms(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// A read failed or timed out: back off.
    pub fn read_failed(&self) {
        self.failures.fetch_add(1, Ordering::AcqRel);
        let at = self.now_ms() + self.backoff_ms();
        self.retry_at_ms.store(at.max(1), Ordering::Release);
    }

    /// The database answered (a verification's read, or the health probe): reads may go
    /// to it again, and a stale period ends.
    pub fn database_answered(&self) {
        if self.retry_at_ms.load(Ordering::Acquire) != 0 {
            self.failures.store(0, Ordering::Release);
            self.retry_at_ms.store(0, Ordering::Release);
        }
        self.end_stale_period();
    }

    /// Counts a stale answer, and logs the start of a stale period.
    pub fn served_stale(&self) {
        self.stale_total.increment(1);
        self.stale_in_period.fetch_add(1, Ordering::Relaxed);
        if !self.serving_stale.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                feed_last_good_ago = ?self.feed.since_last_good(),
                bound = ?self.bound,
                "the database does not answer: verifying cached keys from the cache as it stood when the invalidation feed was last good (answers say stale)"
            );
        }
    }

    /// Ends a stale period whose window has run out, with its log line: from now on the
    /// cached keys are UNAVAILABLE too, until the database answers.
    pub fn end_stale_period_if_over(&self) {
        if self.window_open() {
            return;
        }
        if let Some(answers) = self.close_stale_period() {
            tracing::warn!(
                stale_answers = answers,
                bound = ?self.bound,
                "the stale window is over: verifications are UNAVAILABLE until the database answers"
            );
        }
    }

    /// Ends the database's absence for verifications: the stale period, if one is
    /// running, with its log line.
    fn end_stale_period(&self) {
        if let Some(answers) = self.close_stale_period() {
            tracing::info!(
                stale_answers = answers,
                "the database answers again: no more stale answers"
            );
        }
    }

    /// Closes the stale period if one is running (one caller wins); its answer count.
    fn close_stale_period(&self) -> Option<u64> {
        (self.serving_stale.load(Ordering::Acquire)
            && self.serving_stale.swap(false, Ordering::AcqRel))
        .then(|| self.stale_in_period.swap(0, Ordering::AcqRel))
    }

    /// Whether this replica can answer verifications: the database answers, or the stale
    /// window is open. What health reports for `""` and Envoy's authorization service.
    pub fn can_answer(&self, database_answers: bool) -> bool {
        database_answers || self.window_open()
    }

    fn backoff_ms(&self) -> u64 {
        let doublings = self
            .failures
            .load(Ordering::Acquire)
            .saturating_sub(1)
            .min(16);
        let wait = BACKOFF.0.saturating_mul(1 << doublings).min(BACKOFF.1);
        u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failure_one_caller_per_backoff_reads() {
        let outage = Outage::new(
            FeedState::down(),
            Duration::from_secs(60),
            Duration::from_millis(500),
        );
        assert!(
            outage.may_read() && outage.may_read(),
            "no failure yet: everyone reads"
        );
        outage.read_failed();
        assert!(!outage.may_read(), "inside the backoff nobody reads");
        std::thread::sleep(BACKOFF.0 + Duration::from_millis(20));
        assert!(
            outage.may_read(),
            "the first caller after the backoff reads"
        );
        assert!(!outage.may_read(), "and only that one");
        outage.database_answered();
        assert!(outage.may_read() && outage.may_read());
    }

    #[test]
    fn the_backoff_grows_to_its_cap() {
        let outage = Outage::new(
            FeedState::down(),
            Duration::from_secs(60),
            Duration::from_millis(500),
        );
        let mut waits = Vec::new();
        for _ in 0..8 {
            outage.read_failed();
            waits.push(outage.backoff_ms());
        }
        assert_eq!(waits[0], 50);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap_or(&0), 500);
    }

    #[test]
    fn no_window_without_a_good_feed_or_with_a_zero_bound() {
        let never_good = Outage::new(
            FeedState::down(),
            Duration::from_secs(60),
            Duration::from_millis(500),
        );
        assert!(!never_good.window_open());
        assert!(never_good.can_answer(true) && !never_good.can_answer(false));
        let closed = Outage::new(
            FeedState::always_up(),
            Duration::ZERO,
            Duration::from_millis(500),
        );
        assert!(!closed.enabled() && !closed.window_open());
    }
}
