//! The two clocks, which are never compared directly. Times on the **database's clock** are
//! `i64` milliseconds since the Unix epoch: windows and refills are defined on it, so that
//! every replica agrees on them. Times on **this replica** are [`Mono`], microseconds of
//! its monotonic clock. A [`Reading`] (the database's clock as returned by a statement,
//! with the local times the statement was sent and answered) converts between the two,
//! always erring on the safe side.
use std::time::Duration;

/// Bound on how much faster or slower the database's clock runs than this replica's
/// monotonic clock: 1/1000 (NTP slews each by at most 0.05%).
const DRIFT_DIVISOR: u64 = 1000;

/// A time on this replica's monotonic clock, in microseconds from an arbitrary origin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(u64);

impl Mono {
    pub const fn from_micros(us: u64) -> Self {
        Self(us)
    }

    pub fn as_micros(self) -> u64 {
        self.0
    }

    pub fn after(self, span: Duration) -> Self {
        Self(self.0.saturating_add(micros(span)))
    }

    /// The time from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: Mono) -> Duration {
        Duration::from_micros(self.0.saturating_sub(earlier.0))
    }

    fn plus_micros(self, us: u64) -> Self {
        Self(self.0.saturating_add(us))
    }
}

fn micros(span: Duration) -> u64 {
    u64::try_from(span.as_micros()).unwrap_or(u64::MAX)
}

/// The database's clock as one statement read it (`now_ms`), with this replica's monotonic
/// times just before the statement was sent and just after its answer arrived: the
/// database read its clock somewhere in between, and read it in whole milliseconds (its
/// clock was somewhere in `[now_ms, now_ms + 1)`). Everything derived from a reading errs
/// on the safe side, by that round trip, that millisecond, and the clocks' possible rate
/// difference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub sent: Mono,
    pub received: Mono,
    pub db_now_ms: i64,
}

impl Reading {
    /// How far `db_ms` was ahead of the database's clock when it was read, at least
    /// (`from` = 1: the clock may have been up to a millisecond past `now_ms`) or at most
    /// (`from` = 0).
    fn ahead_micros(&self, db_ms: i64, from: i64) -> u64 {
        u64::try_from(db_ms.saturating_sub(self.db_now_ms.saturating_add(from)))
            .unwrap_or(0)
            .saturating_mul(1000)
    }

    /// The earliest local time at which the database's clock can read `db_ms`. Units of a
    /// window are spent, and a refusal stands, only before it.
    pub fn earliest(&self, db_ms: i64) -> Mono {
        let ahead = self.ahead_micros(db_ms, 1);
        self.sent
            .plus_micros(ahead.saturating_sub(ahead.div_ceil(DRIFT_DIVISOR)))
    }

    /// The latest local time at which the database's clock can read `db_ms`: after it, the
    /// database is surely past `db_ms`.
    pub fn latest(&self, db_ms: i64) -> Mono {
        let ahead = self.ahead_micros(db_ms, 0);
        self.received
            .plus_micros(ahead.saturating_add(ahead.div_ceil(DRIFT_DIVISOR - 1)))
    }

    /// The lowest the database's clock can read at local time `now`.
    pub fn db_floor(&self, now: Mono) -> i64 {
        let elapsed = now.0.saturating_sub(self.received.0);
        let advanced = elapsed.saturating_sub(elapsed.div_ceil(DRIFT_DIVISOR)) / 1000;
        self.db_now_ms
            .saturating_add(i64::try_from(advanced).unwrap_or(i64::MAX))
    }

    /// The highest the database's clock can read at local time `now`.
    pub fn db_ceil(&self, now: Mono) -> i64 {
        let elapsed = now.0.saturating_sub(self.sent.0);
        let advanced = elapsed
            .saturating_add(elapsed.div_ceil(DRIFT_DIVISOR - 1))
            .div_ceil(1000);
        self.db_now_ms
            .saturating_add(1)
            .saturating_add(i64::try_from(advanced).unwrap_or(i64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::fixtures::{T0_MS, at_ms};

    #[test]
    fn a_reading_errs_on_the_safe_side() {
        // Sent at 1.000 s, answered at 1.002 s; the database read T0.
        let r = Reading {
            sent: at_ms(1_000),
            received: at_ms(1_002),
            db_now_ms: T0_MS,
        };
        // The database (at T0 + 0 to 1 ms then) reaches T0 + 10 s between 10.989 s and
        // 11.012 s of local time.
        assert_eq!(r.earliest(T0_MS + 10_000), Mono::from_micros(10_989_001));
        assert_eq!(r.latest(T0_MS + 10_000), Mono::from_micros(11_012_011));
        // A time already passed: the earliest is no later than the sending.
        assert_eq!(r.earliest(T0_MS - 5), at_ms(1_000));
        // The database clock at local 11.002 s: at least T0 + 9.99 s, at most T0 + 10.014 s.
        assert_eq!(r.db_floor(at_ms(11_002)), T0_MS + 9_990);
        assert_eq!(r.db_ceil(at_ms(11_002)), T0_MS + 10_014);
        assert!(r.db_floor(at_ms(500)) == T0_MS && r.db_ceil(at_ms(500)) == T0_MS + 1);
        assert_eq!(at_ms(5).since(at_ms(7)), Duration::ZERO);
    }
}
