//! What a response says about a key's usage controls: this replica's estimates.
use chrono::Utc;

use super::{Decision, Meter};
use crate::domain::records::ApiKey;
use crate::domain::usage::{Budget, BudgetId, LimitState, Tag, Terms};

/// One rate limit's state after a verification (this replica's estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitReport {
    pub state: LimitState,
    /// The database clock now, as low as it can be: what `reset_ms` is counted from.
    pub db_now_ms: i64,
}

/// The credits after a verification (this replica's estimate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditReport {
    pub remaining: u64,
    /// The next refill (database clock); `None` without one.
    pub reset_ms: Option<i64>,
    pub refill_amount: Option<u64>,
    pub db_now_ms: i64,
}

/// What verification reports about a key's usage controls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageReport {
    /// One per rate limit, in the key's order.
    pub limits: Vec<LimitReport>,
    /// `None`: unlimited credits.
    pub credits: Option<CreditReport>,
}

impl Meter {
    /// The credits of the key's account this replica holds, of the epoch the key was read
    /// with, that may still be spent.
    pub fn held_credits(&self, key: &ApiKey) -> u64 {
        let Some(credits) = key.credits else {
            return 0;
        };
        self.budgets.get(&key.budgets.credits).map_or(0, |slot| {
            slot.lock()
                .budget
                .held_in(Tag::epoch(credits.epoch), self.now())
        })
    }

    /// This replica's estimates after the decision, for the response.
    pub(super) fn report(&self, key: &ApiKey, decision: Decision) -> UsageReport {
        let now = self.now();
        let wall_ms = Utc::now().timestamp_millis();
        let estimate = |id: &BudgetId, terms: &Terms| match self.budgets.get(id) {
            Some(slot) => {
                let state = slot.lock();
                (
                    state.budget.estimate(terms, now, wall_ms),
                    state.budget.db_now(now, wall_ms),
                )
            }
            None => {
                let fresh = Budget::new();
                (fresh.estimate(terms, now, wall_ms), wall_ms)
            }
        };
        let limits = key
            .rate_limits
            .iter()
            .zip(&key.budgets.rate)
            .enumerate()
            .map(|(i, (limit, id))| {
                let (estimate, db_now_ms) = estimate(id, &limit.terms(key.tenant_id));
                LimitReport {
                    state: LimitState {
                        limit: limit.limit(),
                        remaining: estimate.remaining,
                        reset_ms: estimate.reset_ms.unwrap_or(db_now_ms),
                        exceeded: decision == Decision::RateLimited(i),
                    },
                    db_now_ms,
                }
            })
            .collect();
        let credits = key.credits.map(|credits| {
            let terms = Terms::Credits(credits.terms(key.usage_id));
            let (estimate, db_now_ms) = estimate(&key.budgets.credits, &terms);
            CreditReport {
                remaining: estimate.remaining,
                reset_ms: estimate.reset_ms.filter(|_| credits.refill.is_some()),
                refill_amount: credits.refill.map(|r| r.amount()),
                db_now_ms,
            }
        });
        UsageReport { limits, credits }
    }
}
