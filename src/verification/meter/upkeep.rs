//! The background task: prefetch for busy budgets, give back what is idle or above its
//! cap, retire budgets nobody uses, sweep ended windows; and the give-back on shutdown.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Meter;
use super::leases::give_back;
use super::slot::Slot;
use crate::domain::usage::{BudgetId, GiveBack, Terms};

/// How often the background task prefetches, gives back and retires.
const TICK: Duration = Duration::from_millis(100);
/// How often windows that ended long ago are swept from the database.
const SWEEP_EVERY: Duration = Duration::from_secs(600);

impl Meter {
    /// Runs until `stop`: prefetches, gives back what is idle or above its cap, drops
    /// budgets nobody uses, and sweeps ended windows from the database now and then.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_sweep: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
            }
            self.tick();
            if last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY) {
                last_sweep = Some(Instant::now());
                if let Err(err) = self.store.sweep_windows().await {
                    tracing::debug!(error = %err, "could not sweep ended rate-limit windows");
                }
            }
        }
    }

    fn tick(&self) {
        let now = self.now();
        let fleet = self.fleet(now);
        let slots: Vec<(BudgetId, Arc<Slot>)> = self
            .budgets
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        for (id, slot) in slots {
            let (terms, prefetch, back, lost, retire) = {
                let mut state = slot.lock();
                let terms = state.terms;
                let sizing = state.sizing(fleet, now);
                let prefetch = state.budget.prefetch(&terms, sizing, now);
                let back = state.budget.give_back(now, fleet, false);
                let lost = state.budget.take_lost();
                (terms, prefetch, back, lost, state.budget.is_retirable(now))
            };
            if lost > 0 {
                metrics::counter!("keyplane_usage_units_total", "kind" => terms.kind().as_str(), "fate" => "expired")
                    .increment(lost);
            }
            if let Some(ask) = prefetch {
                self.start_reservation(&slot, terms, ask, fleet);
            }
            if let Some(back) = back {
                tokio::spawn(give_back(self.store.clone(), id, terms, back));
            }
            if retire {
                self.budgets
                    .remove_if(&id, |_, slot| slot.lock().budget.is_retirable(now));
            }
        }
        metrics::gauge!("keyplane_usage_budgets").set(self.budgets.len() as f64);
        metrics::gauge!("keyplane_usage_replicas").set(fleet.replicas().map_or(0.0, f64::from));
    }

    /// Gives every lease back (on shutdown, after in-flight calls finished). What does not
    /// make it in time is lost, as with a crash: never created.
    pub async fn give_back_all(&self) {
        let now = self.now();
        let fleet = self.fleet(now);
        let backs: Vec<(BudgetId, Terms, GiveBack)> = self
            .budgets
            .iter()
            .filter_map(|e| {
                let mut state = e.value().lock();
                let terms = state.terms;
                let back = state.budget.give_back(now, fleet, true)?;
                Some((*e.key(), terms, back))
            })
            .collect();
        let count = backs.len();
        futures::future::join_all(
            backs
                .into_iter()
                .map(|(id, terms, back)| give_back(self.store.clone(), id, terms, back)),
        )
        .await;
        if count > 0 {
            tracing::info!(leases = count, "gave usage leases back");
        }
    }
}
