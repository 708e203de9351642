//! Recalls: credits the database refused may sit unspent on other replicas, so before a
//! request is answered USAGE_EXCEEDED the replicas are asked to give back what they hold of
//! the account; a replica that hears a recall gives its lease back.
use std::sync::Arc;
use std::time::Duration;

use super::Meter;
use super::leases::give_back;
use super::slot::Slot;
use crate::domain::usage::{BudgetId, CREDIT_REFUSAL_TTL, Fleet, IDLE, Mono, Refused, Terms};
use crate::storage::Store;

/// How long a request the database refused credits waits for the other replicas to return
/// theirs (a recall) before asking again: a NOTIFY's delivery and a give-back statement.
const RECALL_WAIT: Duration = Duration::from_millis(50);

impl Meter {
    /// Credits the database refused may sit unspent on other replicas (a lease taken for
    /// traffic that then stopped). Before a request is answered USAGE_EXCEEDED, the other
    /// replicas are asked to return what they hold of the account (a NOTIFY), and the
    /// request waits [`RECALL_WAIT`] and asks the database again. At most one recall per
    /// budget per [`CREDIT_REFUSAL_TTL`]; refused requests wait for the one that is out.
    /// `None`: answer the refusal now.
    pub(super) fn recall(
        &self,
        slot: &Arc<Slot>,
        terms: Terms,
        why: Refused,
        fleet: Fleet,
        now: Mono,
    ) -> Option<Duration> {
        let alone = !self.shared || fleet.replicas() == Some(1);
        if alone || why != Refused::Remembered || !matches!(terms, Terms::Credits(_)) {
            return None;
        }
        let mut state = slot.lock();
        if let Some(until) = state.recall {
            return Some(until.since(now));
        }
        if state
            .last_recall
            .is_some_and(|t| now.since(t) < CREDIT_REFUSAL_TTL)
        {
            return None;
        }
        state.recall = Some(now.after(RECALL_WAIT));
        state.last_recall = Some(now);
        drop(state);
        tokio::spawn(send_recall(self.store.clone(), slot.id));
        Some(RECALL_WAIT)
    }

    /// Another replica (or this one) recalls a budget: return what this replica holds of
    /// it, so that the database can grant it to whoever was refused.
    pub(super) fn answer_recall(&self, id: BudgetId) {
        let Some(slot) = self.budgets.get(&id).map(|s| s.clone()) else {
            return;
        };
        let now = self.now();
        let fleet = self.fleet(now);
        let (terms, back) = {
            let mut state = slot.lock();
            state.frugal_until = Some(now.after(IDLE));
            (state.terms, state.budget.give_back(now, fleet, true))
        };
        if let Some(back) = back {
            metrics::counter!("keyplane_usage_recalls_total", "side" => "returned").increment(1);
            tokio::spawn(give_back(self.store.clone(), id, terms, back));
        }
    }
}

/// Asks every replica to return what it holds of a budget (PostgreSQL only: SQLite is one
/// process). Best effort: a recall that is lost only means a refusal stands.
async fn send_recall(store: Store, id: BudgetId) {
    metrics::counter!("keyplane_usage_recalls_total", "side" => "sent").increment(1);
    if let Err(err) = store.recall_budget(id).await {
        tracing::debug!(error = %err, "could not recall a usage budget");
    }
}
