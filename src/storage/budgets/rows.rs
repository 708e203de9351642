//! The usage columns a key is read and written with: its rate limits as the
//! `api_keys.rate_limits` JSON column holds them, and its credit account's row as the key
//! shows it.
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::usage::{Credits, Period, RateLimit, RateLimitName, RateLimits, Refill};
use crate::storage::StoreError;
use crate::storage::entity::usage_credit;

/// A rate limit as the `api_keys.rate_limits` JSON column holds it.
#[derive(Serialize, Deserialize)]
struct StoredLimit {
    name: String,
    limit: u64,
    period_ms: i64,
    shared_by_owner: bool,
}

pub fn limits_to_json(limits: &RateLimits) -> serde_json::Value {
    let stored: Vec<StoredLimit> = limits
        .iter()
        .map(|l| StoredLimit {
            name: l.name().as_str().to_owned(),
            limit: l.limit(),
            period_ms: l.period().as_millis(),
            shared_by_owner: l.shared_by_owner(),
        })
        .collect();
    serde_json::to_value(stored).unwrap_or_else(|_| serde_json::Value::Array(Vec::new()))
}

pub fn limits_from_json(key: Uuid, value: serde_json::Value) -> Result<RateLimits, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("key {key} rate_limits: {what}"));
    // A row written by a release without usage controls has the column's default, `[]`;
    // a NULL (hand-edited) means none too.
    if value.is_null() {
        return Ok(RateLimits::default());
    }
    let stored: Vec<StoredLimit> =
        serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    let limits = stored
        .into_iter()
        .map(|s| {
            let name = RateLimitName::parse(&s.name).map_err(|e| corrupt(e.to_string()))?;
            let period = Period::rate_limit_ms(s.period_ms).map_err(|e| corrupt(e.to_string()))?;
            RateLimit::new(name, s.limit, period, s.shared_by_owner)
                .map_err(|e| corrupt(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RateLimits::new(limits).map_err(|e| corrupt(e.to_string()))
}

/// The account as a key shows it; `None` when the account is unlimited (a NULL balance).
pub fn credits_from_row(row: &usage_credit::Model) -> Result<Option<Credits>, StoreError> {
    let Some(balance) = row.balance else {
        return Ok(None);
    };
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("credit account {}: {what}", row.account_id));
    let count = |n: i64, what: &str| u64::try_from(n).map_err(|_| corrupt(what));
    let refill = match (row.refill_amount, row.refill_interval_ms) {
        (Some(amount), Some(interval)) => Some(
            Period::refill_interval_ms(interval)
                .and_then(|i| Refill::new(count(amount, "refill_amount").unwrap_or(0), i))
                .map_err(|_| corrupt("refill"))?,
        ),
        _ => None,
    };
    Ok(Some(Credits {
        balance: count(balance, "balance")?,
        refill,
        epoch: count(row.epoch, "epoch")?,
        version: count(row.version, "version")?,
        next_refill_ms: row.next_refill_ms.filter(|_| refill.is_some()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_trip_through_json() {
        let limits = RateLimits::new(vec![
            RateLimit::new(
                RateLimitName::parse("api").unwrap(),
                100,
                Period::rate_limit_ms(10_000).unwrap(),
                true,
            )
            .unwrap(),
        ])
        .unwrap();
        let id = Uuid::nil();
        assert_eq!(
            limits_from_json(id, limits_to_json(&limits)).unwrap(),
            limits
        );
        assert_eq!(
            limits_from_json(id, serde_json::json!([])).unwrap(),
            RateLimits::default()
        );
        assert!(limits_from_json(id, serde_json::json!([{"name": "x"}])).is_err());
    }
}
