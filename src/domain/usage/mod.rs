//! Usage controls: per-key rate limits and credits, decided in memory.
//!
//! The design — the storage, the SQL, and why the bounds hold — is
//! `docs/usage-controls.md`. This module is its pure part, free of gRPC and SQL so that
//! every rule can be tested alone:
//!
//! - `settings`: a key's settings, validated: [`RateLimits`], [`CreditLimit`] with its
//!   [`Refill`], and a request's [`Cost`]; the aligned [`Window`] arithmetic;
//! - `budget_id`: what draws from what: [`BudgetId`];
//! - `clock`: the two clocks, [`Mono`] and the database's, and the [`Reading`] that
//!   converts between them;
//! - `fleet`: how many replicas share a limit ([`Fleet`], counted by [`Peers`]);
//! - `budget`: [`Budget`], the per-replica state machine of one budget, which spends in
//!   memory what it reserved from the database in batches (a *lease*);
//! - `report`: which limit a response describes, and in what units.
//!
//! `sim` (tests only) runs several replicas' budgets against one simulated database and
//! checks the bounds of the design hold.
mod budget;
mod budget_id;
mod clock;
#[cfg(test)]
mod fixtures;
mod fleet;
mod report;
mod settings;
#[cfg(test)]
mod sim;

pub use budget::{
    Answer, Ask, Budget, BudgetKind, CREDIT_REFUSAL_TTL, CreditRow, CreditTerms, Estimate,
    GiveBack, Grant, HORIZON, Hold, IDLE, PREFETCH_BELOW, RETIRE_AFTER, RateRow, Refused, Step,
    Tag, Terms,
};
pub use budget_id::{BudgetId, Budgets, Credits, Subject, usage_id};
pub use clock::{Mono, Reading};
pub use fleet::{Fleet, PEER_WINDOW, Peers};
pub use report::{LimitState, headline, seconds_until};
pub use settings::{
    COST_MAX, CREDITS_MAX, Cost, CreditChange, CreditDelta, CreditLimit, CreditPatch, LIMIT_MAX,
    NAME_MAX, PERIOD_MAX_MS, PERIOD_MIN_MS, Period, RATE_LIMITS_MAX, REFILL_MAX_MS, REFILL_MIN_MS,
    RateLimit, RateLimitInput, RateLimitName, RateLimits, Refill, UsageError, Window,
    check_shared_owner, rate_limits, refill, remaining_uses,
};
