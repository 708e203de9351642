//! Key verification, shared by `VerifyApiKey` and admin-key authentication.
//! Everything that verifies a key goes through [`KeyVerifier::verify`], the one place a
//! cache can wrap later.
use std::sync::Arc;

use chrono::Utc;

use crate::domain::TenantAccess;
use crate::domain::key::ApiKeySecret;
use crate::domain::records::{ApiKey, VerifyCode};
use crate::domain::scope::ScopeString;
use crate::storage::usage::UsageRecorder;
use crate::storage::{Store, StoreError};

/// The answer to "may this key do that?".
#[derive(Debug, Clone)]
pub struct Verification {
    pub code: VerifyCode,
    /// The key, when it was found.
    pub key: Option<ApiKey>,
    /// Required scopes the key does not hold.
    pub missing: Vec<String>,
}

impl Verification {
    fn without_key(code: VerifyCode) -> Self {
        Self {
            code,
            key: None,
            missing: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct KeyVerifier {
    store: Store,
    usage: Arc<UsageRecorder>,
}

impl KeyVerifier {
    pub fn new(store: Store, usage: Arc<UsageRecorder>) -> Self {
        Self { store, usage }
    }

    /// Checks a presented key in the documented order. A malformed key never reaches the
    /// database; only database trouble is an error.
    pub async fn verify(
        &self,
        access: TenantAccess,
        presented: &str,
        required: &[ScopeString],
    ) -> Result<Verification, StoreError> {
        let Ok(secret) = ApiKeySecret::parse(presented) else {
            return Ok(Verification::without_key(VerifyCode::Malformed));
        };
        let Some(key) = self
            .store
            .find_api_key_by_digest(access, &secret.digest())
            .await?
        else {
            return Ok(Verification::without_key(VerifyCode::NotFound));
        };
        let now = Utc::now();
        let (code, missing) = key.check(now, required);
        if code == VerifyCode::Valid {
            self.usage.record(key.tenant_id, key.id, now);
        }
        Ok(Verification {
            code,
            key: Some(key),
            missing,
        })
    }
}
