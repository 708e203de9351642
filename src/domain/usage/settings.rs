//! A key's usage settings as requests send them and the database stores them, validated:
//! its [`RateLimits`], its [`CreditLimit`] with a [`Refill`], and what a request [`Cost`]s;
//! and the aligned [`Window`]s of a rate limit's [`Period`].
use std::collections::BTreeSet;
use std::fmt;

use chrono::TimeDelta;
use uuid::Uuid;

use super::{BudgetId, Subject, Terms};
use crate::domain::TenantId;
use crate::domain::validate::Validator;

/// Most rate limits one key may have.
pub const RATE_LIMITS_MAX: usize = 8;
/// Longest rate-limit name.
pub const NAME_MAX: usize = 64;
/// Largest rate limit, in units (request costs) per period.
pub const LIMIT_MAX: u64 = 1_000_000_000;
/// Shortest rate-limit period, in milliseconds.
pub const PERIOD_MIN_MS: i64 = 1_000;
/// Longest rate-limit period, in milliseconds.
pub const PERIOD_MAX_MS: i64 = 30 * DAY_MS;
/// Shortest refill interval, in milliseconds.
pub const REFILL_MIN_MS: i64 = 60_000;
/// Longest refill interval, in milliseconds: a year, leap or not.
pub const REFILL_MAX_MS: i64 = 366 * DAY_MS;
/// Most credits a key may hold: beyond any real use, and small enough that adding two
/// balances can never overflow.
pub const CREDITS_MAX: u64 = 1_000_000_000_000_000;
/// Highest cost of one request.
pub const COST_MAX: u64 = 1000;
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Why a usage setting or a cost was refused. Each is reported on the one field it is
/// about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("must match [a-z0-9_.-]{{1,64}}")]
    Name,
    #[error("duplicates the name of an earlier rate limit")]
    DuplicateName,
    #[error("must have at most {RATE_LIMITS_MAX} entries")]
    TooManyLimits,
    #[error("must be between 1 and {LIMIT_MAX}")]
    Limit,
    #[error("is required")]
    Required,
    #[error("must be between {min} and {max}")]
    Duration {
        min: &'static str,
        max: &'static str,
    },
    #[error("must be a whole number of milliseconds")]
    SubMillisecond,
    #[error("needs an owner_id on the key")]
    SharedWithoutOwner,
    #[error("must be between 0 and {CREDITS_MAX}")]
    Credits,
    #[error("must be between 1 and {CREDITS_MAX}")]
    RefillAmount,
    #[error("needs remaining_uses")]
    RefillWithoutCredits,
    #[error("must be between 0 and {COST_MAX}")]
    Cost,
    #[error("must not be 0, and at most {CREDITS_MAX} either way")]
    Delta,
}

/// A rate limit's name: `[a-z0-9_.-]{1,64}`, unique on its key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateLimitName(String);

impl RateLimitName {
    pub fn parse(text: &str) -> Result<Self, UsageError> {
        let ok = (1..=NAME_MAX).contains(&text.len())
            && text.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(UsageError::Name)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RateLimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A positive span of whole milliseconds: a rate limit's period or a refill's interval.
/// Whole milliseconds because that is what the database's clock is read in; finer would
/// promise a precision nothing delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Period(i64);

impl Period {
    /// A rate limit's period: 1 s to 30 days.
    pub fn rate_limit(span: TimeDelta) -> Result<Self, UsageError> {
        Self::within(span, PERIOD_MIN_MS, PERIOD_MAX_MS, "1s", "30 days")
    }

    /// A refill's interval: 1 minute to 366 days.
    pub fn refill_interval(span: TimeDelta) -> Result<Self, UsageError> {
        Self::within(span, REFILL_MIN_MS, REFILL_MAX_MS, "1 minute", "366 days")
    }

    /// A rate limit's period as stored (milliseconds).
    pub fn rate_limit_ms(ms: i64) -> Result<Self, UsageError> {
        Self::within_ms(ms, PERIOD_MIN_MS, PERIOD_MAX_MS, "1s", "30 days")
    }

    /// A refill's interval as stored (milliseconds).
    pub fn refill_interval_ms(ms: i64) -> Result<Self, UsageError> {
        Self::within_ms(ms, REFILL_MIN_MS, REFILL_MAX_MS, "1 minute", "366 days")
    }

    fn within(
        span: TimeDelta,
        min: i64,
        max: i64,
        min_text: &'static str,
        max_text: &'static str,
    ) -> Result<Self, UsageError> {
        if span < TimeDelta::zero() {
            return Self::within_ms(-1, min, max, min_text, max_text);
        }
        let period = Self::within_ms(span.num_milliseconds(), min, max, min_text, max_text)?;
        if span.subsec_nanos() % 1_000_000 != 0 {
            return Err(UsageError::SubMillisecond);
        }
        Ok(period)
    }

    fn within_ms(
        ms: i64,
        min: i64,
        max: i64,
        min_text: &'static str,
        max_text: &'static str,
    ) -> Result<Self, UsageError> {
        if !(min..=max).contains(&ms) {
            return Err(UsageError::Duration {
                min: min_text,
                max: max_text,
            });
        }
        Ok(Self(ms))
    }

    pub fn as_millis(self) -> i64 {
        self.0
    }

    pub fn as_time_delta(self) -> TimeDelta {
        TimeDelta::try_milliseconds(self.0).unwrap_or(TimeDelta::MAX)
    }

    /// The window of this period that holds `at_ms` (database clock). Windows are aligned
    /// to multiples of the period since the Unix epoch, so every replica computes the same
    /// window without any stored anchor.
    pub fn window(self, at_ms: i64) -> Window {
        // A period is at least 1 s, so the remainder is defined and non-negative.
        let start = at_ms - at_ms.rem_euclid(self.0);
        Window {
            start_ms: start,
            end_ms: start.saturating_add(self.0),
        }
    }
}

/// A window of a rate limit: `[start_ms, end_ms)` on the database's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub start_ms: i64,
    pub end_ms: i64,
}

/// One rate limit of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    name: RateLimitName,
    limit: u64,
    period: Period,
    shared_by_owner: bool,
}

impl RateLimit {
    pub fn new(
        name: RateLimitName,
        limit: u64,
        period: Period,
        shared_by_owner: bool,
    ) -> Result<Self, UsageError> {
        if !(1..=LIMIT_MAX).contains(&limit) {
            return Err(UsageError::Limit);
        }
        Ok(Self {
            name,
            limit,
            period,
            shared_by_owner,
        })
    }

    pub fn name(&self) -> &RateLimitName {
        &self.name
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn period(&self) -> Period {
        self.period
    }

    pub fn shared_by_owner(&self) -> bool {
        self.shared_by_owner
    }

    /// What a verification of a key of `tenant` passes to this limit's
    /// [`Budget`](super::Budget).
    pub fn terms(&self, tenant: TenantId) -> Terms {
        Terms::Rate {
            tenant,
            limit: self.limit,
            period: self.period,
        }
    }

    /// The budget this limit draws from for a key of `tenant` with this usage id and owner:
    /// the owner's when shared, the key's (and its rotation family's) otherwise. `None` for
    /// a shared limit on a key without an owner, which writes refuse
    /// ([`RateLimits::check_owner`]).
    pub fn budget(
        &self,
        tenant: TenantId,
        usage_id: Uuid,
        owner: Option<&str>,
    ) -> Option<BudgetId> {
        let subject = if self.shared_by_owner {
            Subject::Owner(owner.filter(|o| !o.is_empty())?)
        } else {
            Subject::Key(usage_id)
        };
        Some(BudgetId::rate(tenant, subject, &self.name, self.period))
    }
}

/// A key's rate limits, in the order they are checked: at most [`RATE_LIMITS_MAX`], names
/// unique.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimits(Vec<RateLimit>);

impl RateLimits {
    pub fn new(limits: Vec<RateLimit>) -> Result<Self, UsageError> {
        if limits.len() > RATE_LIMITS_MAX {
            return Err(UsageError::TooManyLimits);
        }
        let mut names = BTreeSet::new();
        if !limits.iter().all(|l| names.insert(l.name.as_str())) {
            return Err(UsageError::DuplicateName);
        }
        Ok(Self(limits))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, RateLimit> {
        self.0.iter()
    }

    /// A shared limit needs an owner to share it with: one violation per such limit when
    /// the key has none. Checked on every write that sets limits or the owner, against the
    /// key as it will be.
    pub fn check_owner(&self, v: &mut Validator, field: &str, owner: Option<&str>) {
        if owner.is_some_and(|o| !o.is_empty()) {
            return;
        }
        for (i, limit) in self.0.iter().enumerate() {
            if limit.shared_by_owner {
                v.add(
                    format!("{field}[{i}].shared_by_owner"),
                    UsageError::SharedWithoutOwner.to_string(),
                );
            }
        }
    }
}

impl<'a> IntoIterator for &'a RateLimits {
    type Item = &'a RateLimit;
    type IntoIter = std::slice::Iter<'a, RateLimit>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A rate limit as a request sends it, before validation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RateLimitInput {
    pub name: String,
    pub limit: i64,
    /// `None` when the request left it out.
    pub period: Option<TimeDelta>,
    pub shared_by_owner: bool,
}

/// A shared limit needs an owner: one violation per shared entry of a request (whatever
/// else is wrong with it) when the key will have none.
pub fn check_shared_owner(
    v: &mut Validator,
    field: &str,
    inputs: &[RateLimitInput],
    owner: Option<&str>,
) {
    if owner.is_some_and(|o| !o.is_empty()) {
        return;
    }
    for (i, input) in inputs.iter().enumerate() {
        if input.shared_by_owner {
            v.add(
                format!("{field}[{i}].shared_by_owner"),
                UsageError::SharedWithoutOwner.to_string(),
            );
        }
    }
}

/// Validates a request's rate limits: one violation per bad field, named like
/// `api_key.rate_limits[2].period`; a repeated name is reported on the later entry.
pub fn rate_limits(
    v: &mut Validator,
    field: &str,
    inputs: &[RateLimitInput],
) -> Option<RateLimits> {
    let mut ok = true;
    let mut report = |v: &mut Validator, at: String, error: UsageError| {
        v.add(at, error.to_string());
        ok = false;
    };
    if inputs.len() > RATE_LIMITS_MAX {
        report(v, field.to_owned(), UsageError::TooManyLimits);
    }
    let mut names = BTreeSet::new();
    let mut limits = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let at = |sub: &str| format!("{field}[{i}].{sub}");
        let name = match RateLimitName::parse(&input.name) {
            Ok(name) if names.insert(name.clone()) => Some(name),
            Ok(_) => {
                report(v, at("name"), UsageError::DuplicateName);
                None
            }
            Err(e) => {
                report(v, at("name"), e);
                None
            }
        };
        let limit = u64::try_from(input.limit)
            .ok()
            .filter(|l| (1..=LIMIT_MAX).contains(l));
        if limit.is_none() {
            report(v, at("limit"), UsageError::Limit);
        }
        let period = match input.period.map(Period::rate_limit) {
            Some(Ok(period)) => Some(period),
            Some(Err(e)) => {
                report(v, at("period"), e);
                None
            }
            None => {
                report(v, at("period"), UsageError::Required);
                None
            }
        };
        if let (Some(name), Some(limit), Some(period)) = (name, limit, period) {
            limits.push(RateLimit {
                name,
                limit,
                period,
                shared_by_owner: input.shared_by_owner,
            });
        }
    }
    if !ok {
        return None;
    }
    RateLimits::new(limits).ok()
}

/// `remaining_uses` as a request sends it: 0 to [`CREDITS_MAX`].
pub fn remaining_uses(raw: i64) -> Result<u64, UsageError> {
    u64::try_from(raw)
        .ok()
        .filter(|n| *n <= CREDITS_MAX)
        .ok_or(UsageError::Credits)
}

/// At every interval, the credit balance is *set* to `amount` (unused credits do not carry
/// over). Intervals are counted from when the refill was set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refill {
    amount: u64,
    interval: Period,
}

impl Refill {
    pub fn new(amount: u64, interval: Period) -> Result<Self, UsageError> {
        if !(1..=CREDITS_MAX).contains(&amount) {
            return Err(UsageError::RefillAmount);
        }
        Ok(Self { amount, interval })
    }

    pub fn amount(&self) -> u64 {
        self.amount
    }

    pub fn interval(&self) -> Period {
        self.interval
    }

    /// The first refill after the one due at `due_ms`, seen at `now_ms` (database clock):
    /// refills missed while nobody asked are not replayed, the schedule just moves on. The
    /// take statement computes the same.
    pub fn next_after(&self, due_ms: i64, now_ms: i64) -> i64 {
        if now_ms < due_ms {
            return due_ms;
        }
        let step = self.interval.0;
        due_ms.saturating_add(((now_ms - due_ms) / step + 1).saturating_mul(step))
    }
}

/// Validates a request's refill: one violation per bad field (`{field}.amount`,
/// `{field}.interval`).
pub fn refill(
    v: &mut Validator,
    field: &str,
    amount: i64,
    interval: Option<TimeDelta>,
) -> Option<Refill> {
    let amount = u64::try_from(amount)
        .ok()
        .filter(|a| (1..=CREDITS_MAX).contains(a));
    if amount.is_none() {
        v.add(
            format!("{field}.amount"),
            UsageError::RefillAmount.to_string(),
        );
    }
    let interval = v.check(
        &format!("{field}.interval"),
        interval
            .ok_or(UsageError::Required)
            .and_then(Period::refill_interval),
    );
    Refill::new(amount?, interval?).ok()
}

/// A key's credits: what is left, and how they are refilled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditLimit {
    pub remaining: u64,
    pub refill: Option<Refill>,
}

impl CreditLimit {
    /// The credits of a new key. A refill without `remaining_uses` starts full, at the
    /// refill's amount: what someone who asks for "100 a day" expects on day one.
    pub fn on_create(remaining: Option<u64>, refill: Option<Refill>) -> Option<Self> {
        let remaining = remaining.or(refill.map(|r| r.amount))?;
        Some(Self { remaining, refill })
    }
}

/// The credit fields an update names in its mask: `None` = not in the mask, `Some(None)` =
/// cleared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreditPatch {
    pub remaining: Option<Option<u64>>,
    pub refill: Option<Option<Refill>>,
}

/// What an update does to a key's credit account. Every change except `Unchanged` starts
/// a new epoch: reservations made before it can no longer be spent (see the design).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreditChange {
    Unchanged,
    /// The balance is set (and the refill, kept or replaced).
    Set(CreditLimit),
    /// The balance stays; the refill is replaced (or removed), counted from now.
    Reschedule(Option<Refill>),
    /// Unlimited from now on (the refill goes too).
    Clear,
}

impl CreditPatch {
    /// What the patch does to an account that is `limited` now with `refill`. A refill
    /// needs credits to refill: refused on a key that would end up unlimited.
    pub fn apply(&self, limited: bool, refill: Option<Refill>) -> Result<CreditChange, UsageError> {
        match (self.remaining, self.refill) {
            (Some(Some(remaining)), new_refill) => Ok(CreditChange::Set(CreditLimit {
                remaining,
                refill: match new_refill {
                    Some(r) => r,
                    None => refill.filter(|_| limited),
                },
            })),
            (Some(None), Some(Some(_))) => Err(UsageError::RefillWithoutCredits),
            (Some(None), _) => Ok(if limited {
                CreditChange::Clear
            } else {
                CreditChange::Unchanged
            }),
            (None, None) => Ok(CreditChange::Unchanged),
            (None, Some(new_refill)) if limited => Ok(CreditChange::Reschedule(new_refill)),
            (None, Some(Some(_))) => Err(UsageError::RefillWithoutCredits),
            (None, Some(None)) => Ok(CreditChange::Unchanged),
        }
    }
}

/// What `AdjustApiKeyCredits` adds (or, negative, removes): not 0, at most
/// [`CREDITS_MAX`] either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditDelta(i64);

impl CreditDelta {
    pub const ONE: CreditDelta = CreditDelta(1);

    pub fn parse(raw: i64) -> Result<Self, UsageError> {
        if raw == 0 || raw.unsigned_abs() > CREDITS_MAX {
            return Err(UsageError::Delta);
        }
        Ok(Self(raw))
    }

    pub fn get(self) -> i64 {
        self.0
    }

    /// The stored balance after the adjustment, kept within 0 and [`CREDITS_MAX`] (what the
    /// adjust statement computes). A removal takes only what no replica has reserved:
    /// reserved credits are, in the ledger, already spent.
    pub fn apply(self, balance: u64) -> u64 {
        if self.0 >= 0 {
            balance
                .saturating_add(self.0.unsigned_abs())
                .min(CREDITS_MAX)
        } else {
            balance.saturating_sub(self.0.unsigned_abs())
        }
    }
}

/// What one request costs: 0 to [`COST_MAX`], 1 when not given. Cost 0 checks the key and
/// reports its usage without spending, and is never refused for usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cost(u64);

impl Cost {
    pub const DEFAULT: Cost = Cost(1);
    pub const FREE: Cost = Cost(0);
    pub const MAX: Cost = Cost(COST_MAX);

    pub fn new(units: u64) -> Result<Self, UsageError> {
        if units > COST_MAX {
            return Err(UsageError::Cost);
        }
        Ok(Self(units))
    }

    /// A request's optional cost: absent means [`Cost::DEFAULT`].
    pub fn parse(raw: Option<i64>) -> Result<Self, UsageError> {
        match raw {
            None => Ok(Self::DEFAULT),
            Some(n) => u64::try_from(n)
                .map_err(|_| UsageError::Cost)
                .and_then(Self::new),
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn is_free(self) -> bool {
        self.0 == 0
    }
}

impl Default for Cost {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::fixtures::{T0_MS, period};

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    // --- validation -------------------------------------------------------------------

    #[test]
    fn names_follow_their_alphabet() {
        for ok in ["a", "api", "per_minute", "v1.read-all", &"x".repeat(64)] {
            assert!(RateLimitName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "API", "a b", "a/b", "é", &"x".repeat(65)] {
            assert_eq!(RateLimitName::parse(bad), Err(UsageError::Name), "{bad}");
        }
    }

    #[test]
    fn periods_and_intervals_are_bounded_and_whole_milliseconds() {
        assert_eq!(Period::rate_limit(secs(1)).unwrap().as_millis(), 1_000);
        assert!(Period::rate_limit(TimeDelta::days(30)).is_ok());
        assert!(matches!(
            Period::rate_limit(TimeDelta::days(30) + TimeDelta::milliseconds(1)),
            Err(UsageError::Duration { .. })
        ));
        assert!(matches!(
            Period::rate_limit(TimeDelta::milliseconds(999)),
            Err(UsageError::Duration { .. })
        ));
        assert!(matches!(
            Period::rate_limit(secs(-5)),
            Err(UsageError::Duration { .. })
        ));
        assert_eq!(
            Period::rate_limit(TimeDelta::microseconds(1_500_500)),
            Err(UsageError::SubMillisecond)
        );
        assert_eq!(
            Period::rate_limit(TimeDelta::milliseconds(1_500))
                .unwrap()
                .as_millis(),
            1_500
        );
        assert!(Period::refill_interval(secs(60)).is_ok());
        assert!(Period::refill_interval(secs(59)).is_err());
        assert!(Period::refill_interval(TimeDelta::days(366)).is_ok());
        assert!(Period::refill_interval(TimeDelta::days(367)).is_err());
        // Stored values never panic, whatever a hand-edited row holds.
        assert!(Period::rate_limit_ms(i64::MIN).is_err());
        assert!(Period::refill_interval_ms(i64::MAX).is_err());
        assert_eq!(period(2_000).as_time_delta(), secs(2));
    }

    fn input(name: &str, limit: i64, period: Option<TimeDelta>) -> RateLimitInput {
        RateLimitInput {
            name: name.into(),
            limit,
            period,
            shared_by_owner: false,
        }
    }

    #[test]
    fn rate_limits_report_one_violation_per_bad_field() {
        let mut v = Validator::new();
        let got = rate_limits(
            &mut v,
            "api_key.rate_limits",
            &[
                input("ok", 10, Some(secs(1))),
                input("Bad", 0, None),
                input("ok", 1_000_000_001, Some(TimeDelta::milliseconds(10))),
            ],
        );
        assert!(got.is_none());
        let err = v.finish(|| ()).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "api_key.rate_limits[1].name",
                "api_key.rate_limits[1].limit",
                "api_key.rate_limits[1].period",
                "api_key.rate_limits[2].name",
                "api_key.rate_limits[2].limit",
                "api_key.rate_limits[2].period",
            ]
        );
        assert_eq!(
            err.violations[3].description,
            UsageError::DuplicateName.to_string()
        );
        assert_eq!(err.violations[2].description, "is required");
    }

    #[test]
    fn rate_limits_are_at_most_eight_with_unique_names() {
        let many: Vec<_> = (0..9)
            .map(|i| input(&format!("l{i}"), 1, Some(secs(1))))
            .collect();
        let mut v = Validator::new();
        assert!(rate_limits(&mut v, "rate_limits", &many).is_none());
        let err = v.finish(|| ()).unwrap_err();
        assert_eq!(err.violations.len(), 1);
        assert_eq!(err.violations[0].field, "rate_limits");

        let mut v = Validator::new();
        let eight = rate_limits(&mut v, "rate_limits", &many[..8]).unwrap();
        assert_eq!(eight.len(), 8);
        assert_eq!(
            eight.iter().map(|l| l.name().as_str()).collect::<Vec<_>>()[..2],
            ["l0", "l1"]
        );
        // Another field's violation does not hide valid limits.
        let mut v = Validator::new();
        v.add("name", "bad");
        assert!(rate_limits(&mut v, "rate_limits", &many[..1]).is_some());

        let one = |name: &str| {
            RateLimit::new(RateLimitName::parse(name).unwrap(), 1, period(1_000), false).unwrap()
        };
        assert_eq!(
            RateLimits::new(vec![one("a"), one("a")]),
            Err(UsageError::DuplicateName)
        );
        assert_eq!(
            RateLimit::new(RateLimitName::parse("a").unwrap(), 0, period(1_000), false),
            Err(UsageError::Limit)
        );
        assert!(RateLimits::default().is_empty());
    }

    #[test]
    fn shared_limits_need_an_owner() {
        let mut inputs = vec![input("a", 5, Some(secs(1))), input("b", 5, Some(secs(1)))];
        inputs[1].shared_by_owner = true;
        let mut v = Validator::new();
        let limits = rate_limits(&mut v, "rate_limits", &inputs).unwrap();
        limits.check_owner(&mut v, "rate_limits", Some("customer-42"));
        assert!(v.is_ok());
        for owner in [None, Some("")] {
            let mut v = Validator::new();
            limits.check_owner(&mut v, "rate_limits", owner);
            let err = v.finish(|| ()).unwrap_err();
            assert_eq!(err.violations.len(), 1);
            assert_eq!(err.violations[0].field, "rate_limits[1].shared_by_owner");
        }
        let tenant = TenantId::new(Uuid::now_v7());
        assert!(
            limits
                .iter()
                .nth(1)
                .unwrap()
                .budget(tenant, Uuid::now_v7(), None)
                .is_none()
        );
    }

    #[test]
    fn credits_and_refills_are_bounded() {
        assert_eq!(remaining_uses(0), Ok(0));
        assert_eq!(remaining_uses(CREDITS_MAX as i64), Ok(CREDITS_MAX));
        assert_eq!(remaining_uses(-1), Err(UsageError::Credits));
        assert_eq!(
            remaining_uses(CREDITS_MAX as i64 + 1),
            Err(UsageError::Credits)
        );

        let mut v = Validator::new();
        let r = refill(&mut v, "api_key.refill", 100, Some(TimeDelta::days(1))).unwrap();
        assert_eq!((r.amount(), r.interval().as_millis()), (100, DAY_MS));
        assert!(v.is_ok());
        let mut v = Validator::new();
        assert!(refill(&mut v, "api_key.refill", 0, Some(secs(30))).is_none());
        let err = v.finish(|| ()).unwrap_err();
        let fields: Vec<_> = err.violations.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["api_key.refill.amount", "api_key.refill.interval"]);
        let mut v = Validator::new();
        assert!(refill(&mut v, "refill", 1, None).is_none());
        assert_eq!(
            v.finish(|| ()).unwrap_err().violations[0].description,
            "is required"
        );
    }

    fn daily(amount: u64) -> Refill {
        Refill::new(amount, Period::refill_interval(TimeDelta::days(1)).unwrap()).unwrap()
    }

    #[test]
    fn a_refill_alone_starts_full() {
        assert_eq!(CreditLimit::on_create(None, None), None);
        assert_eq!(
            CreditLimit::on_create(None, Some(daily(100))),
            Some(CreditLimit {
                remaining: 100,
                refill: Some(daily(100))
            })
        );
        assert_eq!(
            CreditLimit::on_create(Some(5), Some(daily(100)))
                .unwrap()
                .remaining,
            5
        );
        assert_eq!(CreditLimit::on_create(Some(0), None).unwrap().remaining, 0);
    }

    #[test]
    fn credit_patches_keep_a_refill_only_with_credits() {
        let set = |remaining, refill| CreditPatch { remaining, refill };
        let r = Some(daily(10));
        // Setting the balance keeps the current refill unless the patch names one.
        assert_eq!(
            set(Some(Some(7)), None).apply(true, r),
            Ok(CreditChange::Set(CreditLimit {
                remaining: 7,
                refill: r
            }))
        );
        assert_eq!(
            set(Some(Some(7)), Some(None)).apply(true, r),
            Ok(CreditChange::Set(CreditLimit {
                remaining: 7,
                refill: None
            }))
        );
        assert_eq!(
            set(Some(Some(7)), None).apply(false, None),
            Ok(CreditChange::Set(CreditLimit {
                remaining: 7,
                refill: None
            }))
        );
        // Clearing the balance takes the refill with it; a refill cannot stay alone.
        assert_eq!(
            set(Some(None), None).apply(true, r),
            Ok(CreditChange::Clear)
        );
        assert_eq!(
            set(Some(None), None).apply(false, None),
            Ok(CreditChange::Unchanged)
        );
        assert_eq!(
            set(Some(None), Some(r)).apply(true, r),
            Err(UsageError::RefillWithoutCredits)
        );
        assert_eq!(
            set(None, Some(r)).apply(true, None),
            Ok(CreditChange::Reschedule(r))
        );
        assert_eq!(
            set(None, Some(None)).apply(true, r),
            Ok(CreditChange::Reschedule(None))
        );
        assert_eq!(
            set(None, Some(r)).apply(false, None),
            Err(UsageError::RefillWithoutCredits)
        );
        assert_eq!(
            set(None, Some(None)).apply(false, None),
            Ok(CreditChange::Unchanged)
        );
        assert_eq!(
            CreditPatch::default().apply(true, r),
            Ok(CreditChange::Unchanged)
        );
    }

    #[test]
    fn costs_default_to_one_and_stop_at_a_thousand() {
        assert_eq!(Cost::parse(None), Ok(Cost::DEFAULT));
        assert_eq!(Cost::default().get(), 1);
        assert!(Cost::parse(Some(0)).unwrap().is_free());
        assert_eq!(Cost::parse(Some(1000)).unwrap().get(), 1000);
        assert_eq!(Cost::parse(Some(1001)), Err(UsageError::Cost));
        assert_eq!(Cost::parse(Some(-1)), Err(UsageError::Cost));
    }

    #[test]
    fn adjustments_clamp_at_zero_and_the_maximum() {
        assert_eq!(CreditDelta::parse(0), Err(UsageError::Delta));
        assert_eq!(
            CreditDelta::parse(CREDITS_MAX as i64 + 1),
            Err(UsageError::Delta)
        );
        assert_eq!(CreditDelta::parse(i64::MIN), Err(UsageError::Delta));
        let d = |n| CreditDelta::parse(n).unwrap();
        assert_eq!(d(5).apply(10), 15);
        assert_eq!(d(-5).apply(10), 5);
        assert_eq!(d(-50).apply(10), 0);
        assert_eq!(d(CREDITS_MAX as i64).apply(CREDITS_MAX), CREDITS_MAX);
        assert_eq!(d(-7).get(), -7);
    }

    // --- windows, refills ------------------------------------------------------------

    #[test]
    fn windows_are_aligned_to_the_period() {
        let p = period(10_000);
        let w = p.window(T0_MS);
        assert_eq!((w.start_ms, w.end_ms), (T0_MS, T0_MS + 10_000));
        assert_eq!(p.window(T0_MS + 9_999), w);
        assert_eq!(p.window(T0_MS + 10_000).start_ms, T0_MS + 10_000);
        assert_eq!(p.window(T0_MS - 1).end_ms, T0_MS);
        // Before the epoch too (a clock gone badly wrong must not panic or misalign).
        assert_eq!(p.window(-1).start_ms, -10_000);
        assert_eq!(p.window(0).start_ms, 0);
        // A period that does not divide a minute still aligns to the epoch.
        assert_eq!(period(7_000).window(T0_MS).start_ms % 7_000, 0);
    }

    #[test]
    fn missed_refills_are_not_replayed() {
        let r = Refill::new(5, Period::refill_interval_ms(60_000).unwrap()).unwrap();
        let due = T0_MS + 60_000;
        assert_eq!(r.next_after(due, T0_MS), due);
        assert_eq!(r.next_after(due, due), due + 60_000);
        assert_eq!(r.next_after(due, due + 150_000), due + 180_000);
        assert_eq!(Refill::new(0, r.interval()), Err(UsageError::RefillAmount));
    }
}
