//! What a key draws from: the [`BudgetId`]s of its rate limits and of its credit account,
//! and that account as read with the key.
use std::fmt;

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{CreditTerms, Period, RateLimitName, RateLimits, Refill};
use crate::domain::TenantId;

/// The credit account and key-budget subject of a key: its own id, or — for a key issued
/// by rotation — its predecessor's usage id. So a rotation shares, rather than copies, the
/// balance and the counters: nothing can be counted twice. `stored` is the key's
/// `usage_id` column (null for keys written before usage controls existed).
pub fn usage_id(key_id: Uuid, stored: Option<Uuid>) -> Uuid {
    stored.unwrap_or(key_id)
}

/// Who a rate-limit budget belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A key and its rotation family, by usage id.
    Key(Uuid),
    /// Every key of the tenant with this owner id.
    Owner(&'a str),
}

/// The name of one budget, in memory and in the database: the SHA-256 of a canonical
/// encoding of what identifies it. Fixed-width, so an owner id of up to 256 characters
/// does not become a primary key; computed once when a key is read, never per request.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetId(pub [u8; 32]);

impl fmt::Debug for BudgetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BudgetId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl BudgetId {
    /// Version tag of the encoding: changing the encoding must change every id.
    const DOMAIN: &'static [u8] = b"keyplane.usage.v1";

    /// A rate limit's budget: (tenant, subject, name, period). The period is part of it,
    /// so two periods under one name are two budgets.
    pub fn rate(
        tenant: TenantId,
        subject: Subject<'_>,
        name: &RateLimitName,
        period: Period,
    ) -> Self {
        let mut h = Sha256::new();
        h.update(Self::DOMAIN);
        h.update(tenant.as_uuid().as_bytes());
        match subject {
            Subject::Key(id) => {
                h.update([1]);
                h.update(id.as_bytes());
            }
            Subject::Owner(owner) => {
                h.update([2]);
                h.update((owner.len() as u64).to_be_bytes());
                h.update(owner.as_bytes());
            }
        }
        h.update((name.as_str().len() as u64).to_be_bytes());
        h.update(name.as_str().as_bytes());
        h.update(period.as_millis().to_be_bytes());
        Self(h.finalize().into())
    }

    /// A credit account's budget (the database names the account by its usage id; this is
    /// its name in the same in-memory map as the rate-limit budgets).
    pub fn credits(tenant: TenantId, usage_id: Uuid) -> Self {
        let mut h = Sha256::new();
        h.update(Self::DOMAIN);
        h.update(tenant.as_uuid().as_bytes());
        h.update([3]);
        h.update(usage_id.as_bytes());
        Self(h.finalize().into())
    }
}

/// The budgets a key draws from, computed once when the key is read (the hot path never
/// hashes): one per rate limit, in the key's order, and its credit account's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub rate: Vec<BudgetId>,
    pub credits: BudgetId,
}

impl Budgets {
    /// The budgets of a key of `tenant` with this usage id, owner and limits. A shared
    /// limit on a key without an owner (which writes refuse) falls back to the key's own
    /// budget rather than to none: never unmetered.
    pub fn of(tenant: TenantId, usage_id: Uuid, owner: Option<&str>, limits: &RateLimits) -> Self {
        Self {
            rate: limits
                .iter()
                .map(|l| {
                    l.budget(tenant, usage_id, owner).unwrap_or_else(|| {
                        BudgetId::rate(tenant, Subject::Key(usage_id), l.name(), l.period())
                    })
                })
                .collect(),
            credits: BudgetId::credits(tenant, usage_id),
        }
    }
}

/// A key's credit account as read with the key (never cached as an answer: verification
/// draws from leases, see [`Budget`](super::Budget)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credits {
    /// Credits no replica has reserved, as stored.
    pub balance: u64,
    pub refill: Option<Refill>,
    pub epoch: u64,
    pub version: u64,
    /// When the next refill falls due (database clock).
    pub next_refill_ms: Option<i64>,
}

impl Credits {
    /// What verification passes to the [`Budget`](super::Budget) of the account, whose id
    /// is the key's usage id.
    pub fn terms(&self, account: Uuid) -> CreditTerms {
        CreditTerms {
            account,
            balance: self.balance,
            epoch: self.epoch,
            version: self.version,
            next_refill_ms: self.next_refill_ms,
        }
    }

    /// Whether a refill fell due by `now_ms` that no reservation has applied yet (they are
    /// applied lazily, by the next take statement).
    fn refill_due(&self, now_ms: i64) -> Option<(Refill, i64)> {
        let refill = self.refill?;
        let due = self.next_refill_ms?;
        (due <= now_ms).then_some((refill, due))
    }

    /// The balance as of `now_ms`: a due refill counts even before a reservation applies
    /// it, so reads never show the balance of a period that is over.
    pub fn balance_at(&self, now_ms: i64) -> u64 {
        self.refill_due(now_ms)
            .map_or(self.balance, |(refill, _)| refill.amount())
    }

    /// The next refill after `now_ms`, likewise.
    pub fn next_refill_at(&self, now_ms: i64) -> Option<i64> {
        match self.refill_due(now_ms) {
            Some((refill, due)) => Some(refill.next_after(due, now_ms)),
            None => self.next_refill_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::RateLimit;
    use crate::domain::usage::fixtures::period;

    #[test]
    fn budget_ids_separate_what_must_not_share() {
        let tenant = TenantId::new(Uuid::now_v7());
        let other_tenant = TenantId::new(Uuid::now_v7());
        let usage = Uuid::now_v7();
        let name = RateLimitName::parse("api").unwrap();
        let shared = RateLimit::new(name.clone(), 10, period(1_000), true).unwrap();
        let own = RateLimit::new(name.clone(), 10, period(1_000), false).unwrap();
        let id = |t, s| BudgetId::rate(t, s, &name, period(1_000));
        // Two keys of one owner share; everything else separates.
        assert_eq!(
            shared.budget(tenant, Uuid::now_v7(), Some("acme")),
            shared.budget(tenant, Uuid::now_v7(), Some("acme"))
        );
        assert_ne!(
            shared.budget(tenant, usage, Some("acme")),
            shared.budget(tenant, usage, Some("acme2"))
        );
        assert_ne!(
            id(tenant, Subject::Owner("acme")),
            id(other_tenant, Subject::Owner("acme"))
        );
        assert_ne!(
            BudgetId::rate(tenant, Subject::Key(usage), &name, period(1_000)),
            BudgetId::rate(tenant, Subject::Key(usage), &name, period(2_000))
        );
        assert_eq!(
            own.budget(tenant, usage, Some("acme")),
            Some(id(tenant, Subject::Key(usage)))
        );
        // A rotated key (same usage id) draws from its predecessor's budgets.
        let successor = Uuid::now_v7();
        assert_eq!(usage_id(successor, Some(usage)), usage);
        assert_eq!(usage_id(usage, None), usage);
        assert_eq!(
            own.budget(tenant, usage_id(successor, Some(usage)), None),
            own.budget(tenant, usage, None)
        );
        // An owner id cannot pose as a key id, nor a credit account as a limit.
        let as_owner = usage.to_string();
        assert_ne!(
            BudgetId::rate(tenant, Subject::Owner(&as_owner), &name, period(1_000)),
            id(tenant, Subject::Key(usage))
        );
        assert_ne!(
            BudgetId::credits(tenant, usage),
            id(tenant, Subject::Key(usage))
        );
        assert!(format!("{:?}", BudgetId::credits(tenant, usage)).starts_with("BudgetId("));
    }
}
