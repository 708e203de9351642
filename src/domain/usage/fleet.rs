//! How many replicas share the database: what reservations are sized by, so that the
//! others together never hold more than 5% of a limit.
use std::collections::HashMap;
use std::time::Duration;

use super::Mono;

/// How long a heartbeat counts a replica as live, and how long a replica's feed must have
/// been up before it trusts its own count (by then every other replica has heard it).
pub const PEER_WINDOW: Duration = Duration::from_secs(1);
/// All other replicas together may hold at most 1/20 (5%) of a limit unspent: what keeps
/// a limit from refusing below 95% of it.
const SLACK_DIVISOR: u64 = 20;

/// How many replicas share the database, as far as this one knows: what reservations are
/// sized by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fleet {
    replicas: Option<u32>,
}

impl Fleet {
    /// Not known (the feed is down, or has not been up long enough): reserve exactly what
    /// each request needs.
    pub const UNKNOWN: Fleet = Fleet { replicas: None };

    /// One process (SQLite).
    pub const fn single() -> Self {
        Self { replicas: Some(1) }
    }

    pub fn of(replicas: u32) -> Self {
        Self {
            replicas: Some(replicas.max(1)),
        }
    }

    pub fn replicas(self) -> Option<u32> {
        self.replicas
    }

    /// The most unspent units of a rate limit one replica may hold: ⌊limit / (20·n)⌋, so
    /// that the n − 1 others together hold less than 5% of it. 0 while n is unknown.
    pub fn rate_cap(self, limit: u64) -> u64 {
        self.replicas
            .map_or(0, |n| limit / (SLACK_DIVISOR * u64::from(n)))
    }

    /// The credit statement's divisor: one reservation takes at most 1/(2n) of the balance
    /// (unless the request needs more), so little is stranded on a replica that goes
    /// quiet. 1 while n is unknown (the ask is then exactly the need anyway).
    pub fn credit_spread(self) -> u64 {
        self.replicas.map_or(1, |n| 2 * u64::from(n))
    }
}

/// Counts live replicas from the heartbeats every replica's invalidation feed sends and
/// hears. This replica is counted once; the others while heard within [`PEER_WINDOW`].
#[derive(Debug, Default)]
pub struct Peers {
    up_since: Option<Mono>,
    heard: HashMap<String, Mono>,
}

impl Peers {
    pub fn new() -> Self {
        Self::default()
    }

    /// The feed is listening (again).
    pub fn feed_up(&mut self, now: Mono) {
        self.up_since.get_or_insert(now);
    }

    /// The feed is lost: nothing heard can be trusted until it has been up a while again.
    pub fn feed_down(&mut self) {
        self.up_since = None;
        self.heard.clear();
    }

    /// Another replica's heartbeat (never this replica's own).
    pub fn heard(&mut self, replica: &str, now: Mono) {
        if self.up_since.is_some() {
            self.heard.insert(replica.to_owned(), now);
        }
    }

    /// The fleet to size reservations by: unknown until the feed has been up for
    /// [`PEER_WINDOW`] — by then every other replica has heard this one and counts it.
    pub fn fleet(&mut self, now: Mono) -> Fleet {
        self.heard.retain(|_, at| now.since(*at) < PEER_WINDOW);
        match self.up_since {
            Some(up) if now.since(up) >= PEER_WINDOW => {
                Fleet::of(u32::try_from(self.heard.len()).map_or(u32::MAX, |n| n.saturating_add(1)))
            }
            _ => Fleet::UNKNOWN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::usage::fixtures::at_ms;

    #[test]
    fn caps_leave_five_percent_to_the_others() {
        assert_eq!(Fleet::UNKNOWN.rate_cap(1_000_000), 0);
        assert_eq!(Fleet::single().rate_cap(1000), 50);
        assert_eq!(Fleet::of(3).rate_cap(1000), 16);
        assert_eq!(Fleet::of(3).rate_cap(59), 0);
        assert_eq!(Fleet::of(0), Fleet::single());
        for n in 1..=50u32 {
            for limit in [1, 19, 20, 59, 60, 999, 1000, 1_000_000_000] {
                let others = u64::from(n - 1) * Fleet::of(n).rate_cap(limit);
                assert!(others * 20 <= limit, "n={n} limit={limit}");
            }
        }
        assert_eq!(Fleet::of(3).credit_spread(), 6);
        assert_eq!(Fleet::UNKNOWN.credit_spread(), 1);
    }

    #[test]
    fn peers_count_only_after_a_full_window() {
        let mut peers = Peers::new();
        peers.heard("b", at_ms(0));
        assert_eq!(peers.fleet(at_ms(0)), Fleet::UNKNOWN);
        peers.feed_up(at_ms(0));
        peers.heard("b", at_ms(100));
        peers.heard("c", at_ms(200));
        assert_eq!(peers.fleet(at_ms(900)), Fleet::UNKNOWN);
        assert_eq!(peers.fleet(at_ms(1_000)), Fleet::of(3));
        peers.feed_up(at_ms(1_050)); // already up: keeps its start
        peers.heard("b", at_ms(1_050));
        // c fell silent a second ago.
        assert_eq!(peers.fleet(at_ms(1_200)), Fleet::of(2));
        peers.feed_down();
        assert_eq!(peers.fleet(at_ms(1_300)), Fleet::UNKNOWN);
        peers.feed_up(at_ms(1_400));
        assert_eq!(peers.fleet(at_ms(2_400)), Fleet::single());
    }
}
