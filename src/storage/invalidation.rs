//! Which cached verification answers a write makes stale, and how every replica learns it.
//!
//! A write that can change a verification answer names the affected key digests in an
//! [`Eviction`]. [`Store::commit`](super::Store::commit) sends it with PostgreSQL `NOTIFY`
//! inside the write's own transaction (so it is delivered exactly when the write becomes
//! visible, and never for a rolled-back write), commits, and then evicts on this replica
//! before the RPC returns. Other replicas receive the notification on their
//! [feed](super::feed).
use std::collections::HashSet;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sea_orm::{ConnectionTrait, DatabaseTransaction, DbBackend, Statement};

use super::StoreError;
use crate::domain::key::KeyDigest;

/// The notification channel every replica listens on.
pub const CHANNEL: &str = "keyplane_evict";
/// Payload meaning "drop every entry": cheaper than naming thousands of keys.
const ALL: &str = "*";
/// Digests per notification: each is 43 characters plus a separator, and PostgreSQL caps a
/// payload at 8000 bytes.
const DIGESTS_PER_NOTIFY: usize = 150;
/// Above this many keys one write evicts everything instead (a forced delete of a large
/// workspace); a cache refills in moments, a flood of notifications would not help.
pub(super) const MAX_NAMED: usize = 1000;

/// The verification answers one write makes stale.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Nothing cached can change (a workspace renamed, a scope described).
    #[default]
    None,
    /// The answers for these keys.
    Keys(Vec<KeyDigest>),
    /// Every answer.
    All,
}

impl Eviction {
    pub fn key(digest: KeyDigest) -> Self {
        Self::Keys(vec![digest])
    }

    pub fn keys(digests: Vec<KeyDigest>) -> Self {
        match digests.len() {
            0 => Self::None,
            n if n > MAX_NAMED => Self::All,
            _ => Self::Keys(digests),
        }
    }

    /// What one write evicts when it makes both stale.
    pub fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::None, other) | (other, Self::None) => other,
            (Self::All, _) | (_, Self::All) => Self::All,
            (Self::Keys(mut digests), Self::Keys(more)) => {
                let mut seen: HashSet<KeyDigest> = digests.iter().copied().collect();
                digests.extend(more.into_iter().filter(|d| seen.insert(*d)));
                Self::keys(digests)
            }
        }
    }

    /// The NOTIFY payloads that carry this eviction.
    fn payloads(&self) -> Vec<String> {
        match self {
            Self::None => Vec::new(),
            Self::All => vec![ALL.to_owned()],
            Self::Keys(digests) => digests
                .chunks(DIGESTS_PER_NOTIFY)
                .map(|chunk| {
                    chunk
                        .iter()
                        .map(|d| URL_SAFE_NO_PAD.encode(d.0))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .collect(),
        }
    }

    /// Reads a payload written by [`Eviction::payloads`] on any replica. A payload this
    /// version cannot read evicts everything: wrong that way is only slower.
    pub fn from_payload(payload: &str) -> Self {
        if payload == ALL {
            return Self::All;
        }
        let digests: Option<Vec<KeyDigest>> = payload
            .split(',')
            .map(|part| {
                let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
                Some(KeyDigest(bytes.try_into().ok()?))
            })
            .collect();
        digests.map_or(Self::All, Self::Keys)
    }
}

/// What a replica evicts from: the verification cache implements it.
pub trait EvictionSink: Send + Sync {
    fn evict(&self, eviction: &Eviction);
}

/// Sends the eviction to every replica, inside `txn`. SQLite is one process: nothing to
/// send.
pub(super) async fn notify(
    txn: &DatabaseTransaction,
    eviction: &Eviction,
) -> Result<(), StoreError> {
    if txn.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    for payload in eviction.payloads() {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [CHANNEL.into(), payload.into()],
        ))
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        let digests: Vec<KeyDigest> = (0..=DIGESTS_PER_NOTIFY as u8)
            .map(|i| KeyDigest([i; 32]))
            .collect();
        let eviction = Eviction::keys(digests.clone());
        let payloads = eviction.payloads();
        assert_eq!(payloads.len(), 2);
        assert!(payloads.iter().all(|p| p.len() < 8000));
        let back: Vec<KeyDigest> = payloads
            .iter()
            .flat_map(|p| match Eviction::from_payload(p) {
                Eviction::Keys(d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(back, digests);
        assert_eq!(Eviction::from_payload(ALL), Eviction::All);
        assert_eq!(Eviction::from_payload("not base64!"), Eviction::All);
        assert_eq!(Eviction::keys(Vec::new()), Eviction::None);
        assert_eq!(
            Eviction::keys(vec![KeyDigest([0; 32]); MAX_NAMED + 1]),
            Eviction::All
        );
    }

    #[test]
    fn evictions_add_up() {
        let a = Eviction::key(KeyDigest([1; 32]));
        let b = Eviction::keys(vec![KeyDigest([2; 32]), KeyDigest([1; 32])]);
        assert_eq!(
            a.clone().and(b),
            Eviction::Keys(vec![KeyDigest([1; 32]), KeyDigest([2; 32])])
        );
        assert_eq!(Eviction::None.and(a.clone()), a);
        assert_eq!(a.clone().and(Eviction::None), a);
        assert_eq!(a.clone().and(Eviction::All), Eviction::All);
        assert_eq!(Eviction::All.and(Eviction::None), Eviction::All);
        let many: Vec<KeyDigest> = (0..=MAX_NAMED as u64)
            .map(|i| {
                let mut digest = [0; 32];
                digest[..8].copy_from_slice(&i.to_be_bytes());
                KeyDigest(digest)
            })
            .collect();
        let (first, rest) = many.split_at(MAX_NAMED / 2);
        assert_eq!(
            Eviction::keys(first.to_vec()).and(Eviction::keys(rest.to_vec())),
            Eviction::All,
            "past the limit, together"
        );
    }
}
