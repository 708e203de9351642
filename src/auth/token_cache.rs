//! Verified bearer tokens, remembered until they expire, so that a caller sending the same
//! token on every request (Envoy, a gateway) pays for the signature check once. Keyed by
//! the token's SHA-256, so memory stays bounded whatever the tokens' size; only tokens
//! that verified are kept, and expiry is checked against the clock at every use.
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::sync::Cache;
use sha2::{Digest, Sha256};

use super::AuthError;
use super::jwt::TokenIdentity;

/// Distinct tokens remembered; callers are services, few and long-lived.
const CAPACITY: u64 = 10_000;

pub struct TokenCache {
    verified: Cache<[u8; 32], Arc<TokenIdentity>>,
}

/// Entries leave the cache when their token stops being accepted.
struct UntilExpiry;

impl Expiry<[u8; 32], Arc<TokenIdentity>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        identity: &Arc<TokenIdentity>,
        _: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            identity.accepted_until.saturating_sub(now_secs()) + 1,
        ))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenCache {
    pub fn new() -> Self {
        Self {
            verified: Cache::builder()
                .max_capacity(CAPACITY)
                .expire_after(UntilExpiry)
                .build(),
        }
    }

    /// The identity of `token`: remembered, or verified by `verify` and remembered.
    pub fn identity(
        &self,
        token: &str,
        verify: impl FnOnce(&str) -> Result<TokenIdentity, AuthError>,
    ) -> Result<Arc<TokenIdentity>, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.verified.get(&key) {
            if now_secs() <= identity.accepted_until {
                return Ok(identity);
            }
            self.verified.invalidate(&key);
            return Err(AuthError::TokenExpired);
        }
        let identity = Arc::new(verify(token)?);
        self.verified.insert(key, identity.clone());
        Ok(identity)
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}
