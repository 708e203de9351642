//! What the tests of the usage files share.
use uuid::Uuid;

use super::{Cost, Mono, Period, Terms};
use crate::domain::TenantId;

/// A database-clock origin on a 10-second boundary (and a minute's).
pub(super) const T0_MS: i64 = 1_800_000_000_000;

pub(super) fn at_ms(ms: u64) -> Mono {
    Mono::from_micros(ms * 1000)
}

pub(super) fn period(ms: i64) -> Period {
    Period::rate_limit_ms(ms).unwrap()
}

pub(super) fn rate(limit: u64, period_ms: i64) -> Terms {
    Terms::Rate {
        tenant: TenantId::new(Uuid::nil()),
        limit,
        period: period(period_ms),
    }
}

pub(super) fn cost(n: u64) -> Cost {
    Cost::new(n).unwrap()
}
