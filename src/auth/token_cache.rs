//! Verified bearer tokens, remembered until they expire, so that a caller sending the same
//! token on every request (Envoy, a gateway) pays for the signature check once. Keyed by
//! the token itself (hashing it with SHA-256 first cost more than the lookup), weighed by
//! its length so memory stays bounded whatever the tokens' size; only tokens that
//! verified are kept, and expiry is checked against the clock at every use.
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::Expiry;
use moka::sync::Cache;

use super::AuthError;
use super::jwt::TokenIdentity;

/// Bytes of tokens remembered (about 20,000 typical tokens); callers are services, few and
/// long-lived.
const CAPACITY_BYTES: u64 = 8 << 20;

pub struct TokenCache {
    verified: Cache<Arc<str>, Arc<TokenIdentity>>,
}

/// Entries leave the cache when their token stops being accepted.
struct UntilExpiry;

impl Expiry<Arc<str>, Arc<TokenIdentity>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
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
                .max_capacity(CAPACITY_BYTES)
                .weigher(|token: &Arc<str>, _| u32::try_from(token.len()).unwrap_or(u32::MAX))
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
        if let Some(identity) = self.verified.get(token) {
            if now_secs() <= identity.accepted_until {
                return Ok(identity);
            }
            self.verified.invalidate(token);
            return Err(AuthError::TokenExpired);
        }
        let identity = Arc::new(verify(token)?);
        self.verified.insert(token.into(), identity.clone());
        Ok(identity)
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new()
    }
}
