//! Taking a lease and giving units back, each on a task of its own that reports to the
//! budget and the metrics whatever happens.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::slot::Slot;
use super::{Meter, MeterError, mono};
use crate::domain::usage::{Answer, Ask, BudgetId, Fleet, GiveBack, Mono, Terms};
use crate::storage::budgets::leases::RateAsk;
use crate::storage::{Store, StoreError};

/// A reservation that takes longer is written off (its outcome is unknown) and the request
/// that needed it is answered UNAVAILABLE.
const RESERVE_TIMEOUT: Duration = Duration::from_secs(2);

/// How a reservation ended, for the request that waited for it.
pub(super) enum Reserved {
    /// The budget has the database's answer (granted or refused): step again.
    Answered,
    /// The credit account is unlimited now (cleared concurrently): nothing to draw.
    Unlimited,
    /// Nothing was taken and nothing learnt (an older window): ask again.
    Again,
}

impl Meter {
    /// Starts a reservation on a task of its own, so that a request giving up on it (a
    /// cancelled call) cannot leave it half done; a prefetch drops the handle, and its
    /// answer reaches the budget like any other.
    pub(super) fn start_reservation(
        &self,
        slot: &Arc<Slot>,
        terms: Terms,
        ask: Ask,
        fleet: Fleet,
    ) -> JoinHandle<Result<Reserved, MeterError>> {
        tokio::spawn(reserve(
            self.store.clone(),
            slot.clone(),
            terms,
            ask,
            fleet,
            self.origin,
        ))
    }
}

/// The take statement for one ask, reported to the budget whatever happens (so its
/// reservation is never left in flight), and then to whoever waits.
async fn reserve(
    store: Store,
    slot: Arc<Slot>,
    terms: Terms,
    ask: Ask,
    fleet: Fleet,
    origin: Instant,
) -> Result<Reserved, MeterError> {
    let sent = mono(origin);
    let started = Instant::now();
    // Each kind's row is read in the arm that took it, against the terms it was taken with.
    let (answer, received) = match terms {
        Terms::Rate {
            tenant,
            limit,
            period,
        } => {
            let take = store.take_rate_lease(RateAsk {
                budget: slot.id,
                tenant,
                period_ms: period.as_millis(),
                limit,
                need: ask.need,
                want: ask.want,
            });
            let (row, received) = within_timeout(take, origin).await;
            let answer = row.map(|row| Some(row.answer(limit, period, sent, received)));
            (answer, received)
        }
        Terms::Credits(credits) => {
            let spread = fleet.credit_spread();
            let take = store.take_credit_lease(credits.account, ask.need, ask.want, spread);
            let (row, received) = within_timeout(take, origin).await;
            // No row: the account is unlimited now.
            let answer = row.map(|row| row.map(|row| row.answer(sent, received)));
            (answer, received)
        }
    };
    let kind = terms.kind().as_str();
    metrics::histogram!("keyplane_usage_reservation_seconds", "kind" => kind)
        .record(started.elapsed().as_secs_f64());
    let result = {
        let mut state = slot.lock();
        match answer {
            Ok(Some(Answer::Granted(grant))) => {
                metrics::counter!("keyplane_usage_reservations_total", "kind" => kind, "result" => "granted").increment(1);
                metrics::counter!("keyplane_usage_units_total", "kind" => kind, "fate" => "reserved").increment(grant.units);
                state.budget.granted(grant, received);
                Ok(Reserved::Answered)
            }
            Ok(Some(Answer::Refused(grant))) => {
                metrics::counter!("keyplane_usage_reservations_total", "kind" => kind, "result" => "refused").increment(1);
                state.budget.refused(ask, grant, &terms, received);
                Ok(Reserved::Answered)
            }
            Ok(Some(Answer::Again)) => {
                state.budget.failed();
                Ok(Reserved::Again)
            }
            Ok(None) => {
                state.budget.failed();
                Ok(Reserved::Unlimited)
            }
            Err(err) => {
                metrics::counter!("keyplane_usage_reservations_total", "kind" => kind, "result" => "error").increment(1);
                // Whatever the statement may have taken is lost, never assumed.
                state.budget.failed();
                Err(err)
            }
        }
    };
    slot.reserved.notify_waiters();
    result
}

/// A take statement given at most [`RESERVE_TIMEOUT`], with the local time it ended at.
async fn within_timeout<T>(
    take: impl Future<Output = Result<T, StoreError>>,
    origin: Instant,
) -> (Result<T, MeterError>, Mono) {
    let taken = tokio::time::timeout(RESERVE_TIMEOUT, take).await;
    let received = mono(origin);
    let taken = match taken {
        Ok(taken) => taken.map_err(MeterError::from),
        Err(_) => Err(MeterError::TimedOut),
    };
    (taken, received)
}

/// Returns units to the database. The units already left the lease; a statement whose
/// outcome is unknown is never retried (returning twice would create units).
pub(super) async fn give_back(store: Store, id: BudgetId, terms: Terms, back: GiveBack) {
    let result = match terms {
        Terms::Rate { .. } => {
            let window_start = back.tag.window_start();
            store.give_back_rate(id, back.units, window_start).await
        }
        Terms::Credits(credits) => {
            let epoch = back.tag.epoch_number();
            store
                .give_back_credits(credits.account, back.units, epoch)
                .await
        }
    };
    let fate = if result.is_ok() { "given_back" } else { "lost" };
    metrics::counter!("keyplane_usage_units_total", "kind" => terms.kind().as_str(), "fate" => fate)
        .increment(back.units);
}
