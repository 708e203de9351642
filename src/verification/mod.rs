//! Key verification, shared by `VerifyApiKey`, Envoy's `Check` and admin-key
//! authentication. Everything that verifies a key goes through [`KeyVerifier::verify`],
//! which answers from this replica's [`cache`] when it can and from one database query
//! when it cannot, and from the cache as it stood before an outage when neither the feed
//! nor the database can be trusted ([`outage`]).
pub mod cache;
pub mod meter;
pub mod outage;
pub mod queries;

use std::sync::Arc;

use chrono::Utc;

use crate::domain::key::{ApiKeySecret, ImportedSecret, KeyDigest};
use crate::domain::network::ClientAddress;
use crate::domain::permission::PermissionQuery;
use crate::domain::records::{ApiKey, VerifyCode};
use crate::domain::scope::ScopeString;
use crate::domain::standing::Standing;
use crate::domain::usage::Cost;
use crate::domain::{TenantAccess, TenantId};
use crate::storage::imported::ImportedKeys;
use crate::storage::last_used::LastUsedRecorder;
use crate::storage::{Store, StoreError};
use cache::{Entry, Lookup, VerificationCache};
use meter::{Meter, Spend, UsageReport};
use outage::Outage;

/// The answer to "may this key do that?".
#[derive(Debug, Clone)]
pub struct Verification {
    pub code: VerifyCode,
    /// The key with its standing, when it was found (shared with the cache: never copied
    /// on the hot path).
    pub standing: Option<Arc<Standing>>,
    /// Required scopes the key does not hold.
    pub missing: Vec<String>,
    /// The key's rate limits and credits after this request, when the key has any and
    /// passed the checks before them (this replica's estimate).
    pub usage: Option<UsageReport>,
    /// Answered from the cache as it stood before the database stopped answering.
    pub stale: bool,
}

impl Verification {
    fn without_key(code: VerifyCode) -> Self {
        Self {
            code,
            standing: None,
            missing: Vec::new(),
            usage: None,
            stale: false,
        }
    }
}

#[derive(Clone)]
pub struct KeyVerifier {
    store: Store,
    cache: Arc<VerificationCache>,
    usage: Arc<LastUsedRecorder>,
    meter: Arc<Meter>,
    outage: Arc<Outage>,
    /// Read only when a presented string is not of keyplane's format.
    imported: Arc<ImportedKeys>,
}

impl KeyVerifier {
    pub fn new(
        store: Store,
        cache: Arc<VerificationCache>,
        usage: Arc<LastUsedRecorder>,
        meter: Arc<Meter>,
        outage: Arc<Outage>,
    ) -> Self {
        Self {
            imported: store.imported_keys(),
            store,
            cache,
            usage,
            meter,
            outage,
        }
    }

    /// Checks a presented key, used from `client` (when known), in the documented order,
    /// then charges `cost` to its rate limits and credits (a key failing an earlier check
    /// spends nothing). A malformed key
    /// reaches neither the cache nor the database; only database trouble is an error —
    /// including when a reservation is needed and cannot be made: never an admission
    /// keyplane cannot account for.
    pub async fn verify(
        &self,
        access: TenantAccess,
        presented: &str,
        client: Option<ClientAddress>,
        required: &[ScopeString],
        query: Option<&PermissionQuery>,
        cost: Cost,
    ) -> Result<Verification, StoreError> {
        let digest = match ApiKeySecret::parse(presented) {
            Ok(secret) => secret.digest(),
            // Not keyplane's format: only an imported key can be such a string, so it is
            // looked up (through the cache, which keeps a flood of made-up strings as
            // negative entries) only once the deployment holds some.
            Err(_) => match self.imported_digest(presented) {
                Some(digest) => digest,
                None => return Ok(Verification::without_key(VerifyCode::Malformed)),
            },
        };
        // The cache holds every tenant's keys; who may see which is decided below, per call.
        let (found, stale) = match self.cache.lookup(&digest) {
            Lookup::Hit(entry) => (entry, false),
            // The feed is up, so the database answers: a slow read is waited for.
            Lookup::Miss(epoch) => {
                let entry = self.find(&digest).await?;
                self.cache.fill(digest, entry.clone(), epoch);
                (entry, false)
            }
            Lookup::Bypass => self.read_through(&digest).await?,
        };
        let Some(standing) = found.filter(|s| visible(access, s.key.tenant_id)) else {
            return Ok(Verification::without_key(VerifyCode::NotFound));
        };
        let now = Utc::now();
        let (mut code, missing) = standing.check(now, client, required, query);
        let mut usage = None;
        if code == VerifyCode::Valid && standing.has_usage_controls() {
            // Stale: the database cannot reserve more, so only what is held may be spent.
            let spend = if stale {
                Spend::HeldOnly
            } else {
                Spend::Reserve
            };
            let (decision, report) = self.meter.charge(&standing, cost, spend).await?;
            code = decision.code();
            usage = Some(report);
        }
        if code == VerifyCode::Valid {
            self.usage
                .record(standing.key.tenant_id, standing.key.id, now);
        }
        Ok(Verification {
            code,
            standing: Some(standing),
            missing,
            usage,
            stale,
        })
    }

    /// A verification the cache may not answer normally (turned off, or its feed is down):
    /// the database's answer; or, when the database fails or takes longer than
    /// `--database-timeout`, the frozen cache's (`stale`) while the stale window is open.
    /// A key with no stale answer to fall back on waits for the database as long as it
    /// takes (UNAVAILABLE if it fails). See [`outage`].
    async fn read_through(&self, digest: &KeyDigest) -> Result<(Entry, bool), StoreError> {
        let frozen = self
            .outage
            .window_open()
            .then(|| self.cache.frozen(digest))
            .flatten();
        let Some(frozen) = frozen else {
            if self.outage.enabled() && !self.outage.may_read() {
                return Err(StoreError::NotAnswering("resting after failed reads"));
            }
            return match self.find(digest).await {
                Ok(entry) => {
                    self.outage.database_answered();
                    Ok((entry, false))
                }
                Err(err) => {
                    if matches!(err, StoreError::Unavailable(_)) {
                        self.outage.read_failed();
                    }
                    Err(err)
                }
            };
        };
        if self.outage.may_read() {
            match tokio::time::timeout(self.outage.timeout(), self.find(digest)).await {
                Ok(Ok(entry)) => {
                    self.outage.database_answered();
                    return Ok((entry, false));
                }
                Ok(Err(StoreError::Unavailable(_))) | Err(_) => self.outage.read_failed(),
                Ok(Err(other)) => return Err(other),
            }
        }
        self.outage.served_stale();
        Ok((frozen, true))
    }

    /// The digest under which a string of another format would be held, when the
    /// deployment holds imported keys and the string could be one.
    fn imported_digest(&self, presented: &str) -> Option<KeyDigest> {
        if !self.imported.held() {
            return None;
        }
        ImportedSecret::digest_of(presented).ok()
    }

    /// Whether the deployment holds imported keys: then a credential of any shape may be a
    /// key (Envoy's `Check` reads a bearer value of another shape too).
    pub fn holds_imported_keys(&self) -> bool {
        self.imported.held()
    }

    /// The credits of this key's account that this replica holds and may still spend.
    pub fn held_credits(&self, key: &ApiKey) -> u64 {
        self.meter.held_credits(key)
    }

    async fn find(&self, digest: &KeyDigest) -> Result<Entry, StoreError> {
        let standing = self
            .store
            .find_standing_by_digest(TenantAccess::Any, digest)
            .await?;
        Ok(standing.map(Arc::new))
    }
}

/// Whether a caller with this access may see a key of `tenant`; a key it may not see is
/// answered as unknown.
fn visible(access: TenantAccess, tenant: TenantId) -> bool {
    match access {
        TenantAccess::Any => true,
        TenantAccess::One(own) => own == tenant,
    }
}
