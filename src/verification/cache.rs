//! The verification cache: each replica answers verifications from memory, keyed by the
//! key's SHA-256 digest, with unknown digests cached too so that a flood of made-up keys
//! cannot reach the database.
//!
//! What is cached is the stored key with its standing (its roles' scopes, its ancestors),
//! or its absence, never an answer: expiry, grace periods and the revoked / disabled state
//! are evaluated against the clock at every use, and the caller's tenant is applied per
//! call. A write to a role or an ancestor evicts every standing it changes. Entries leave when a write evicts them
//! (see `storage::invalidation`), when the bound (`--cache-capacity`) pushes them out, and
//! all at once when the invalidation feed comes back after an outage.
//!
//! A hit is a read lock on one shard and a probe (quick_cache): no bookkeeping runs on the
//! request's path. (moka, used before, logged every read for its eviction policy and
//! replayed that log inline on the request that filled it.) Eviction work happens only on
//! insert, which follows a database read anyway. While the feed is
//! down the cache does not answer normally and is not filled; it may still give stale
//! answers while the database does not answer either (`verification::outage`).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::Counter;
use quick_cache::sync::Cache;

use crate::domain::key::KeyDigest;
use crate::domain::standing::Standing;
use crate::storage::feed::FeedState;
use crate::storage::invalidation::{Eviction, EvictionSink};

/// A cached lookup: the key's standing, or `None` for a digest no key has.
pub type Entry = Option<Arc<Standing>>;

/// What the cache can say about a digest.
pub enum Lookup {
    /// The cached lookup.
    Hit(Entry),
    /// Not cached: read the database, then [`VerificationCache::fill`] with this epoch.
    Miss(u64),
    /// The cache may not answer now (turned off, or its feed is down): read the database.
    Bypass,
}

pub struct VerificationCache {
    /// `None` when turned off (`--cache-capacity 0`).
    entries: Option<Cache<KeyDigest, Entry>>,
    /// Counts evictions. A fill whose database read began before an eviction must not
    /// land: the value it read may be what the eviction was about.
    epoch: AtomicU64,
    feed: Arc<FeedState>,
    hits: Counter,
    misses: Counter,
    evicted: Counter,
}

impl VerificationCache {
    pub fn new(capacity: u64, feed: Arc<FeedState>) -> Self {
        Self {
            entries: (capacity > 0)
                .then(|| Cache::new(usize::try_from(capacity).unwrap_or(usize::MAX))),
            epoch: AtomicU64::new(0),
            feed,
            hits: metrics::counter!("keyplane_verification_cache_total", "result" => "hit"),
            misses: metrics::counter!("keyplane_verification_cache_total", "result" => "miss"),
            evicted: metrics::counter!("keyplane_verification_cache_evictions_total"),
        }
    }

    pub fn lookup(&self, digest: &KeyDigest) -> Lookup {
        let Some(entries) = &self.entries else {
            return Lookup::Bypass;
        };
        if !self.feed.is_up() {
            return Lookup::Bypass;
        }
        // Read the epoch before the entry: an eviction racing this lookup then voids the
        // fill that follows a miss.
        let epoch = self.epoch.load(Ordering::Acquire);
        match entries.get(digest) {
            Some(entry) => {
                self.hits.increment(1);
                Lookup::Hit(entry)
            }
            None => {
                self.misses.increment(1);
                Lookup::Miss(epoch)
            }
        }
    }

    /// The entry as the cache holds it, whatever the feed's state: for stale answers while
    /// the database cannot be reached (the cache is frozen while the feed is down).
    pub fn frozen(&self, digest: &KeyDigest) -> Option<Entry> {
        self.entries.as_ref()?.get(digest)
    }

    /// Caches what the database said, unless an eviction came in since `epoch` (then the
    /// read may predate the write that evicted, and the next verification reads again).
    pub fn fill(&self, digest: KeyDigest, entry: Entry, epoch: u64) {
        let Some(entries) = &self.entries else {
            return;
        };
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        entries.insert(digest, entry);
        // An eviction between the check and the insert may have missed the new entry.
        if self.epoch.load(Ordering::Acquire) != epoch {
            entries.remove(&digest);
        }
    }
}

impl EvictionSink for VerificationCache {
    fn evict(&self, eviction: &Eviction) {
        let Some(entries) = &self.entries else {
            return;
        };
        match eviction {
            Eviction::None => {}
            Eviction::Keys(digests) => {
                self.epoch.fetch_add(1, Ordering::AcqRel);
                for digest in digests {
                    entries.remove(digest);
                }
                self.evicted.increment(digests.len() as u64);
            }
            Eviction::All => {
                self.epoch.fetch_add(1, Ordering::AcqRel);
                entries.clear();
                self.evicted.increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> KeyDigest {
        KeyDigest([n; 32])
    }

    fn miss(cache: &VerificationCache, d: &KeyDigest) -> u64 {
        match cache.lookup(d) {
            Lookup::Miss(epoch) => epoch,
            Lookup::Hit(_) => panic!("unexpected hit"),
            Lookup::Bypass => panic!("unexpected bypass"),
        }
    }

    #[test]
    fn a_negative_entry_goes_with_the_eviction_of_its_digest() {
        let cache = VerificationCache::new(10, FeedState::always_up());
        let epoch = miss(&cache, &digest(1));
        cache.fill(digest(1), None, epoch);
        assert!(matches!(cache.lookup(&digest(1)), Lookup::Hit(None)));
        // What creating a key with this digest sends.
        cache.evict(&Eviction::key(digest(1)));
        miss(&cache, &digest(1));
    }

    #[test]
    fn a_fill_read_before_an_eviction_never_lands() {
        let cache = VerificationCache::new(10, FeedState::always_up());
        let epoch = miss(&cache, &digest(1));
        // A write to any key commits and evicts while this fill's read is in flight.
        cache.evict(&Eviction::key(digest(2)));
        cache.fill(digest(1), None, epoch);
        miss(&cache, &digest(1));
        cache.evict(&Eviction::All);
        let epoch = miss(&cache, &digest(1));
        cache.fill(digest(1), None, epoch);
        assert!(matches!(cache.lookup(&digest(1)), Lookup::Hit(None)));
    }

    #[test]
    fn no_answers_while_off_or_while_the_feed_is_down() {
        let off = VerificationCache::new(0, FeedState::always_up());
        assert!(matches!(off.lookup(&digest(1)), Lookup::Bypass));
        let unfed = VerificationCache::new(10, FeedState::down());
        unfed.fill(digest(1), None, 0);
        assert!(matches!(unfed.lookup(&digest(1)), Lookup::Bypass));
    }
}
