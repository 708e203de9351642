//! The request path: a verification's cost drawn from each of the key's budgets in turn
//! (rate limits in order, then credits) and then from each ancestor's, for a delegated key,
//! into holds, spent when every budget admits it and put back when one refuses: a child can
//! never spend more than any of its ancestors may.
use std::sync::Arc;

use super::leases::Reserved;
use super::slot::Slot;
use super::{Meter, MeterError, UsageReport};
use crate::domain::records::{ApiKey, VerifyCode};
use crate::domain::standing::Standing;
use crate::domain::usage::{BudgetId, BudgetKind, Cost, Fleet, Hold, Mono, Step, Terms};

/// A request asks again at most this often when the database answered for an older window
/// (its clock stepped back) or its holds expired while it waited: then it is UNAVAILABLE.
const ATTEMPTS: usize = 4;

/// Where a charge may take its units from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Leases held, and the database when they run out (the normal case).
    Reserve,
    /// Only what this replica already holds: the database does not answer (a stale
    /// verification). Running out is UNAVAILABLE; credits are never overspent.
    HeldOnly,
}

/// What a verification decided about usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admitted,
    /// The rate limit at this index of the key's refused.
    RateLimited(usize),
    UsageExceeded,
    /// A rate limit of an ancestor of the (delegated) key refused.
    AncestorRateLimited,
    /// An ancestor's credits are fewer than the cost.
    AncestorUsageExceeded,
}

impl Decision {
    pub fn code(self) -> VerifyCode {
        match self {
            Decision::Admitted => VerifyCode::Valid,
            Decision::RateLimited(_) | Decision::AncestorRateLimited => VerifyCode::RateLimited,
            Decision::UsageExceeded | Decision::AncestorUsageExceeded => VerifyCode::UsageExceeded,
        }
    }
}

/// What drawing a request's cost from one budget came to.
enum Drawn {
    Held,
    Unlimited,
    Refused,
}

/// Units a request holds until it is admitted; put back if it is not (refused by a later
/// budget, cancelled, failed).
struct Holds<'a> {
    meter: &'a Meter,
    /// Each hold with its budget and the budget's kind (for the spent-units counter).
    held: Vec<(Arc<Slot>, Hold, BudgetKind)>,
    /// The request's clock and replica count: read once, and again only after a wait, so
    /// a request that waits for nothing reads the clock and the peers' lock once for all
    /// its budgets.
    now: Mono,
    fleet: Fleet,
}

impl<'a> Holds<'a> {
    fn new(meter: &'a Meter) -> Self {
        let now = meter.now();
        Self {
            meter,
            held: Vec::new(),
            now,
            fleet: meter.fleet(now),
        }
    }

    /// After a wait: the time (and perhaps the fleet) has moved on.
    fn reread(&mut self) {
        self.now = self.meter.now();
        self.fleet = self.meter.fleet(self.now);
    }

    fn usable(&self) -> bool {
        self.held.iter().all(|(_, h, _)| h.usable_at(self.now))
    }

    fn spend(mut self) {
        for (_, hold, kind) in std::mem::take(&mut self.held) {
            self.meter.spent(kind, hold.units());
        }
    }
}

impl Drop for Holds<'_> {
    fn drop(&mut self) {
        let now = self.meter.now();
        for (slot, hold, _) in self.held.drain(..) {
            slot.lock().budget.put_back(hold, now);
        }
    }
}

impl Meter {
    /// Charges `cost` to the usage controls of the key and of each of its ancestors: for
    /// each, rate limits in order, then credits. A refusal spends nothing (what earlier
    /// budgets handed out goes back); a database failure while a reservation is needed is
    /// an error, never an admission.
    pub async fn charge(
        &self,
        standing: &Standing,
        cost: Cost,
        spend: Spend,
    ) -> Result<(Decision, UsageReport), MeterError> {
        let decision = self.decide(standing, cost, spend).await?;
        Ok((decision, self.report(&standing.key, decision)))
    }

    async fn decide(
        &self,
        standing: &Standing,
        cost: Cost,
        spend: Spend,
    ) -> Result<Decision, MeterError> {
        if cost.is_free() {
            return Ok(Decision::Admitted);
        }
        // A rotated key in its grace period stops spending: its successor holds the
        // account now, and the pair must never spend one balance from two secrets.
        for (depth, key) in standing.chain().enumerate() {
            if key.successor_id.is_some() && key.credits.is_some() {
                return Ok(exceeded(depth));
            }
        }
        for _ in 0..ATTEMPTS {
            let mut holds = Holds::new(self);
            for (depth, key) in standing.chain().enumerate() {
                if let Some(refused) = self.draw_key(key, depth, cost, spend, &mut holds).await? {
                    return Ok(refused);
                }
            }
            // A request that waited (for another budget's reservation) across the end of a
            // window must not spend that window's units in the next: start over.
            if holds.usable() {
                holds.spend();
                return Ok(Decision::Admitted);
            }
        }
        Err(MeterError::HoldsExpired)
    }

    /// Draws `cost` from each of one key's budgets into `holds`; the refusal, if one
    /// refuses. `depth` 0 is the key verified, above it its ancestors.
    async fn draw_key(
        &self,
        key: &ApiKey,
        depth: usize,
        cost: Cost,
        spend: Spend,
        holds: &mut Holds<'_>,
    ) -> Result<Option<Decision>, MeterError> {
        for (i, (limit, id)) in key.rate_limits.iter().zip(&key.budgets.rate).enumerate() {
            let terms = limit.terms(key.tenant_id);
            if let Drawn::Refused = self.draw(*id, terms, cost, spend, holds).await? {
                return Ok(Some(if depth == 0 {
                    Decision::RateLimited(i)
                } else {
                    Decision::AncestorRateLimited
                }));
            }
        }
        if let Some(credits) = key.credits {
            let terms = Terms::Credits(credits.terms(key.usage_id));
            if let Drawn::Refused = self
                .draw(key.budgets.credits, terms, cost, spend, holds)
                .await?
            {
                return Ok(Some(exceeded(depth)));
            }
        }
        Ok(None)
    }

    /// Draws `cost` from one budget into `holds`.
    async fn draw(
        &self,
        id: BudgetId,
        terms: Terms,
        cost: Cost,
        spend: Spend,
        holds: &mut Holds<'_>,
    ) -> Result<Drawn, MeterError> {
        let slot = self.slot(id, terms);
        let kind = terms.kind();
        let mut agains = 0;
        let mut waited_for_recall = false;
        loop {
            let (now, fleet) = (holds.now, holds.fleet);
            let (step, reserved, prefetch) = {
                let mut state = slot.lock();
                state.terms = terms;
                // A recall's wait is over: what the other replicas returned is in the
                // database now, so its earlier refusal is not its word any more.
                if state.recall.is_some_and(|until| now >= until) {
                    state.recall = None;
                    state.budget.forget_refusal();
                }
                let sizing = state.sizing(fleet, now);
                let step = state.budget.step(cost, &terms, sizing, now);
                // Registered under the lock, which a reservation's end takes before it
                // wakes the waiters: that end cannot slip between this step and the wait.
                // Only a request that will wait pays for it.
                let reserved = matches!(step, Step::AwaitReservation).then(|| {
                    let mut reserved = Box::pin(slot.reserved.notified());
                    reserved.as_mut().enable();
                    reserved
                });
                // A busy budget tops its lease up as soon as it runs low rather than at the
                // next tick: at tens of thousands of requests a second a lease can run dry
                // between ticks, and then every request waits a database round trip.
                // A stale verification may not ask the database: no prefetch, and a
                // reservation `step` handed it is never sent, so the budget must not wait
                // for it (under this lock, nobody has started waiting yet).
                let prefetch = match step {
                    Step::Held(_) if spend == Spend::Reserve => {
                        state.budget.prefetch(&terms, sizing, now)
                    }
                    _ => None,
                };
                if spend == Spend::HeldOnly && matches!(step, Step::Reserve(_)) {
                    state.budget.not_asked();
                }
                (step, reserved, prefetch)
            };
            if let Some(ask) = prefetch {
                self.start_reservation(&slot, terms, ask, fleet);
            }
            let needs_database = matches!(step, Step::Reserve(_) | Step::AwaitReservation);
            if needs_database && spend == Spend::HeldOnly {
                return Err(MeterError::NothingHeld);
            }
            match step {
                Step::Held(hold) => {
                    holds.held.push((slot.clone(), hold, kind));
                    return Ok(Drawn::Held);
                }
                Step::Refused(why) => {
                    if !waited_for_recall
                        && spend == Spend::Reserve
                        && let Some(wait) = self.recall(&slot, terms, why, fleet, now)
                    {
                        waited_for_recall = true;
                        tokio::time::sleep(wait).await;
                        holds.reread();
                        continue;
                    }
                    metrics::counter!("keyplane_usage_local_refusals_total", "kind" => kind.as_str())
                        .increment(1);
                    return Ok(Drawn::Refused);
                }
                Step::Reserve(ask) => {
                    let reserved = self
                        .start_reservation(&slot, terms, ask, fleet)
                        .await
                        .map_err(|_| MeterError::TaskEnded)??;
                    holds.reread();
                    match reserved {
                        Reserved::Answered => {}
                        Reserved::Unlimited => return Ok(Drawn::Unlimited),
                        Reserved::Again => {
                            agains += 1;
                            if agains >= ATTEMPTS {
                                return Err(MeterError::OlderWindows);
                            }
                        }
                    }
                }
                Step::AwaitReservation => {
                    metrics::counter!("keyplane_usage_waits_total", "reason" => "reservation")
                        .increment(1);
                    if let Some(reserved) = reserved {
                        reserved.await;
                    }
                    holds.reread();
                }
                Step::WaitUntil(until) => {
                    metrics::counter!("keyplane_usage_waits_total", "reason" => "turn")
                        .increment(1);
                    tokio::time::sleep(until.since(now)).await;
                    holds.reread();
                }
            }
        }
    }
}

/// Credits refused at this depth of the chain.
fn exceeded(depth: usize) -> Decision {
    if depth == 0 {
        Decision::UsageExceeded
    } else {
        Decision::AncestorUsageExceeded
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::domain::usage::{Credits, Period, RateLimit, RateLimitName, RateLimits};
    use crate::storage::budgets::tests::{balance, credit_account, store};

    fn key(limits: &[(u64, i64)], credits: Option<u64>) -> ApiKey {
        let rate_limits = RateLimits::new(
            limits
                .iter()
                .enumerate()
                .map(|(i, (limit, period_ms))| {
                    RateLimit::new(
                        RateLimitName::parse(&format!("l{i}")).unwrap(),
                        *limit,
                        Period::rate_limit_ms(*period_ms).unwrap(),
                        false,
                    )
                    .unwrap()
                })
                .collect(),
        )
        .unwrap();
        let mut key = ApiKey {
            rate_limits,
            credits: credits.map(|balance| Credits {
                balance,
                refill: None,
                epoch: 1,
                version: 1,
                next_refill_ms: None,
            }),
            ..ApiKey::fixture()
        };
        key.bind_budgets();
        key
    }

    async fn meter() -> Option<(Meter, Option<tempfile::TempDir>)> {
        let (store, dir) = store(false).await?;
        Some((Meter::new(store), dir))
    }

    async fn decisions(meter: &Meter, key: &ApiKey, cost: u64, n: usize) -> Vec<Decision> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(
                meter
                    .charge(
                        &Standing::plain(key.clone()),
                        Cost::new(cost).unwrap(),
                        Spend::Reserve,
                    )
                    .await
                    .unwrap()
                    .0,
            );
        }
        out
    }

    #[tokio::test]
    async fn a_rate_limit_admits_exactly_its_limit_on_one_replica() {
        let (meter, _dir) = meter().await.unwrap();
        let k = key(&[(3, 3_600_000)], None);
        use Decision::*;
        assert_eq!(
            decisions(&meter, &k, 1, 4).await,
            [Admitted, Admitted, Admitted, RateLimited(0)]
        );
        let (decision, report) = meter
            .charge(&Standing::plain(k.clone()), Cost::DEFAULT, Spend::Reserve)
            .await
            .unwrap();
        assert_eq!(decision, RateLimited(0));
        let state = report.limits[0].state;
        assert_eq!((state.limit, state.remaining, state.exceeded), (3, 0, true));
        assert!(state.reset_ms > report.limits[0].db_now_ms);
        // Cost 0 checks without spending, and is never refused.
        assert_eq!(
            meter
                .charge(&Standing::plain(k.clone()), Cost::FREE, Spend::Reserve)
                .await
                .unwrap()
                .0,
            Admitted
        );
        assert_eq!(decisions(&meter, &k, 4, 1).await, [RateLimited(0)]);
    }

    #[tokio::test]
    async fn credits_are_spent_exactly_and_a_rate_limited_request_spends_none() {
        let (meter, _dir) = meter().await.unwrap();
        let k = key(&[(2, 3_600_000)], Some(5));
        credit_account(&meter.store, k.tenant_id, k.usage_id, 5).await;
        use Decision::*;
        assert_eq!(
            decisions(&meter, &k, 1, 3).await,
            [Admitted, Admitted, RateLimited(0)]
        );
        let report = meter
            .charge(&Standing::plain(k.clone()), Cost::FREE, Spend::Reserve)
            .await
            .unwrap()
            .1;
        assert_eq!(report.credits.unwrap().remaining, 3);
        meter.give_back_all().await;
        assert_eq!(balance(&meter.store, k.usage_id).await, Some(3));

        let k = key(&[], Some(5));
        credit_account(&meter.store, k.tenant_id, k.usage_id, 5).await;
        assert_eq!(
            decisions(&meter, &k, 2, 3).await,
            [Admitted, Admitted, UsageExceeded]
        );
        assert_eq!(decisions(&meter, &k, 1, 2).await, [Admitted, UsageExceeded]);
        meter.give_back_all().await;
        assert_eq!(balance(&meter.store, k.usage_id).await, Some(0));
    }

    #[tokio::test]
    async fn a_rotated_key_stops_spending_credits() {
        let (meter, _dir) = meter().await.unwrap();
        let mut k = key(&[], Some(5));
        k.successor_id = Some(Uuid::now_v7());
        use Decision::*;
        assert_eq!(decisions(&meter, &k, 1, 1).await, [UsageExceeded]);
        assert_eq!(decisions(&meter, &k, 0, 1).await, [Admitted]);
        // With rate limits only, it draws from the family's counters as before.
        let mut k = key(&[(1, 3_600_000)], None);
        k.successor_id = Some(Uuid::now_v7());
        assert_eq!(
            decisions(&meter, &k, 1, 2).await,
            [Admitted, RateLimited(0)]
        );
    }

    #[tokio::test]
    async fn an_unlimited_account_admits() {
        let (meter, _dir) = meter().await.unwrap();
        // The key was read limited, the account was cleared since: no row to draw from.
        let k = key(&[], Some(5));
        assert_eq!(decisions(&meter, &k, 1, 2).await, [Decision::Admitted; 2]);
    }
}
