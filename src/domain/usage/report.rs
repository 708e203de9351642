//! What a response says about a key's limits.
/// One rate limit's state in a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitState {
    pub limit: u64,
    pub remaining: u64,
    pub reset_ms: i64,
    /// This limit refused the request.
    pub exceeded: bool,
}

/// Which limit the `x-ratelimit-*` headers describe: the one that refused, else the one
/// with the fewest remaining (ties: the earliest reset, then the first).
pub fn headline(states: &[LimitState]) -> Option<usize> {
    if let Some(i) = states.iter().position(|s| s.exceeded) {
        return Some(i);
    }
    states
        .iter()
        .enumerate()
        .min_by_key(|(i, s)| (s.remaining, s.reset_ms, *i))
        .map(|(i, _)| i)
}

/// Whole seconds from `db_now_ms` to `reset_ms`, rounded up and at least 1: the value of
/// `retry-after` and `x-ratelimit-reset` (delta seconds, immune to the client's clock).
pub fn seconds_until(reset_ms: i64, db_now_ms: i64) -> u64 {
    u64::try_from(reset_ms.saturating_sub(db_now_ms))
        .unwrap_or(0)
        .div_ceil(1000)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::fixtures::T0_MS;

    #[test]
    fn the_headline_is_the_refusing_or_the_tightest_limit() {
        let s = |remaining, reset_ms, exceeded| LimitState {
            limit: 100,
            remaining,
            reset_ms,
            exceeded,
        };
        assert_eq!(headline(&[]), None);
        assert_eq!(
            headline(&[s(5, 10, false), s(3, 20, false), s(3, 15, false)]),
            Some(2)
        );
        assert_eq!(
            headline(&[s(5, 10, false), s(9, 20, true), s(0, 15, false)]),
            Some(1)
        );
        assert_eq!(headline(&[s(1, 10, false), s(1, 10, false)]), Some(0));
        assert_eq!(seconds_until(T0_MS + 1_001, T0_MS), 2);
        assert_eq!(seconds_until(T0_MS + 1_000, T0_MS), 1);
        assert_eq!(seconds_until(T0_MS, T0_MS), 1);
        assert_eq!(seconds_until(T0_MS - 5, T0_MS), 1);
    }
}
