//! Verified bearer tokens, remembered until they expire, so that a caller sending the same
//! token on every request (Envoy, a gateway) pays for the signature check once. Keyed by
//! the token itself (hashing it with SHA-256 first cost more than the lookup), weighed by
//! its length so memory stays bounded whatever the tokens' size; only tokens that
//! verified are kept, and expiry is checked against the clock at every use (an expired
//! entry is dropped when next seen, or pushed out by newer ones).
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use quick_cache::Weighter;
use quick_cache::sync::Cache;

use super::AuthError;
use super::jwt::TokenIdentity;

/// Bytes of tokens remembered; callers are services, few and long-lived.
const CAPACITY_BYTES: u64 = 8 << 20;
/// About 20,000 typical tokens fill [`CAPACITY_BYTES`].
const TYPICAL_TOKENS: usize = 20_000;

pub struct TokenCache {
    verified: Cache<Arc<str>, Arc<TokenIdentity>, ByLength>,
}

/// Weighs an entry by its token's length, so memory stays bounded whatever the tokens' size.
#[derive(Clone)]
struct ByLength;

impl Weighter<Arc<str>, Arc<TokenIdentity>> for ByLength {
    fn weight(&self, token: &Arc<str>, _: &Arc<TokenIdentity>) -> u64 {
        // Never 0: a weightless entry would never be evicted.
        token.len().max(1) as u64
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
            verified: Cache::with_weighter(TYPICAL_TOKENS, CAPACITY_BYTES, ByLength),
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
            self.verified.remove(token);
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
