//! One budget of this replica, as the meter's map holds it.
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::domain::usage::{Budget, BudgetId, Fleet, Mono, Terms};

pub(super) struct SlotState {
    pub(super) budget: Budget,
    /// As last seen with a key: the background task has no request to take them from.
    pub(super) terms: Terms,
    /// A recall is out: refused requests wait until then, and the first to wake asks the
    /// database again.
    pub(super) recall: Option<Mono>,
    /// When the last recall went out: at most one per
    /// [`CREDIT_REFUSAL_TTL`](crate::domain::usage::CREDIT_REFUSAL_TTL).
    pub(super) last_recall: Option<Mono>,
    /// Since a recall was heard, the account is nearly spent: reserve exactly what each
    /// request needs until then, so that no replica strands credits again.
    pub(super) frugal_until: Option<Mono>,
}

impl SlotState {
    /// The fleet to size this budget's reservations by: unknown (exactly the need, no
    /// prefetch) while frugal.
    pub(super) fn sizing(&self, fleet: Fleet, now: Mono) -> Fleet {
        if self.frugal_until.is_some_and(|until| now < until) {
            Fleet::UNKNOWN
        } else {
            fleet
        }
    }
}

/// One budget of this replica.
pub(super) struct Slot {
    pub(super) id: BudgetId,
    pub(super) state: Mutex<SlotState>,
    /// Woken when a reservation ends, for the requests that waited for it.
    pub(super) reserved: Notify,
}

impl Slot {
    pub(super) fn new(id: BudgetId, terms: Terms) -> Self {
        Self {
            id,
            state: Mutex::new(SlotState {
                budget: Budget::new(),
                terms,
                recall: None,
                last_recall: None,
                frugal_until: None,
            }),
            reserved: Notify::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state stays consistent between statements: a panic elsewhere cannot have left
        // it half-written, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}
