//! The per-replica meter of usage controls: the budgets (rate limits, credit accounts) this
//! replica has seen, each a [`Budget`](crate::domain::usage::Budget) state machine
//! (`domain::usage`) behind its own mutex, in a sharded map keyed by budget id.
//! Verifications spend from the leases in memory; the database is asked only to reserve
//! more (one reservation in flight per budget, the other requests wait for it) or to take
//! units back. The design, and why the bounds hold, is `docs/usage-controls.md`.
//!
//! By job:
//! - `charge`: the request path: a verification's cost drawn from each budget in turn
//!   into holds, spent when all of them admit it, put back when one refuses;
//! - `report`: what a response says about the key's usage (this replica's estimate);
//! - `leases`: taking a lease and giving units back, on tasks of their own;
//! - `recall`: asking the other replicas for the credits they hold when the database
//!   refuses, and giving back when they ask;
//! - `upkeep`: the background task (prefetch busy budgets, give idle leases back, retire
//!   unused budgets, sweep ended windows) and the give-back on shutdown;
//! - `slot`: one budget's state in the map.
//!
//! This file holds the meter itself, its errors, and what the feed tells it.
//!
//! A mutex is held for a few arithmetic operations, never across an `await`: statements run
//! in tasks of their own, which report to the budget when they end, so a request that is
//! cancelled mid-reservation cannot leave its budget waiting forever.
mod charge;
mod leases;
mod recall;
mod report;
mod slot;
mod upkeep;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use dashmap::DashMap;
use metrics::Counter;

use crate::domain::usage::{BudgetId, BudgetKind, Fleet, Mono, Peers, Terms};
use crate::storage::feed::Heartbeats;
use crate::storage::{Store, StoreError};
pub use charge::{Decision, Spend};
pub use report::{CreditReport, LimitReport, UsageReport};
use slot::Slot;

/// Why a charge could not be decided: never an admission. Verification answers it
/// UNAVAILABLE, as it answers a database that cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// A statement failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a reservation timed out")]
    TimedOut,
    #[error("the reservation task ended early")]
    TaskEnded,
    #[error("the database keeps answering for an older window")]
    OlderWindows,
    #[error("usage holds kept expiring")]
    HoldsExpired,
    /// A stale verification ([`Spend::HeldOnly`]) needed more than this replica holds.
    #[error("{NOTHING_HELD}")]
    NothingHeld,
}

const NOTHING_HELD: &str = "no usage budget held, and the database does not answer";

impl From<MeterError> for StoreError {
    fn from(err: MeterError) -> Self {
        match err {
            MeterError::Store(err) => err,
            // Met only while the database already does not answer: said as its reads say it.
            MeterError::NothingHeld => StoreError::NotAnswering(NOTHING_HELD),
            other => StoreError::Metering(other.to_string()),
        }
    }
}

/// The meter of one replica.
pub struct Meter {
    store: Store,
    budgets: DashMap<BudgetId, Arc<Slot>>,
    /// Replicas counted from the feed's heartbeats (PostgreSQL).
    peers: Mutex<Peers>,
    /// Whether other replicas may share the database; SQLite is one process (n = 1).
    shared: bool,
    origin: Instant,
    spent_rate: Counter,
    spent_credits: Counter,
}

impl Meter {
    pub fn new(store: Store) -> Self {
        let shared = store.is_shared();
        Self {
            store,
            budgets: DashMap::new(),
            peers: Mutex::new(Peers::new()),
            shared,
            origin: Instant::now(),
            spent_rate: metrics::counter!("keyplane_usage_units_total", "kind" => BudgetKind::Rate.as_str(), "fate" => "spent"),
            spent_credits: metrics::counter!("keyplane_usage_units_total", "kind" => BudgetKind::Credits.as_str(), "fate" => "spent"),
        }
    }

    fn now(&self) -> Mono {
        mono(self.origin)
    }

    fn peers(&self) -> MutexGuard<'_, Peers> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The replica count reservations are sized by.
    fn fleet(&self, now: Mono) -> Fleet {
        if self.shared {
            self.peers().fleet(now)
        } else {
            Fleet::single()
        }
    }

    fn spent(&self, kind: BudgetKind, units: u64) {
        match kind {
            BudgetKind::Rate => self.spent_rate.increment(units),
            BudgetKind::Credits => self.spent_credits.increment(units),
        }
    }

    fn slot(&self, id: BudgetId, terms: Terms) -> Arc<Slot> {
        if let Some(slot) = self.budgets.get(&id) {
            return slot.clone();
        }
        self.budgets
            .entry(id)
            .or_insert_with(|| Arc::new(Slot::new(id, terms)))
            .clone()
    }
}

impl Heartbeats for Meter {
    fn feed_up(&self) {
        let now = self.now();
        self.peers().feed_up(now);
    }

    fn feed_down(&self) {
        self.peers().feed_down();
    }

    fn heard(&self, replica: &str) {
        let now = self.now();
        self.peers().heard(replica, now);
    }

    fn recalled(&self, id: BudgetId) {
        self.answer_recall(id);
    }
}

fn mono(origin: Instant) -> Mono {
    Mono::from_micros(u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meter_errors_are_answered_as_an_unavailable_database() {
        let store = |err: MeterError| StoreError::from(err);
        assert!(matches!(
            store(MeterError::TimedOut),
            StoreError::Metering(why) if why == "a reservation timed out"
        ));
        assert!(matches!(
            store(MeterError::NothingHeld),
            StoreError::NotAnswering(NOTHING_HELD)
        ));
        assert!(matches!(
            store(MeterError::Store(StoreError::StaleEtag)),
            StoreError::StaleEtag
        ));
    }
}
