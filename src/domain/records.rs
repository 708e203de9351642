//! The resources as the service sees them, and the validated inputs that create or change
//! them. Storage maps rows to these; the gRPC layer maps these to messages.
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::TenantId;
use super::key::{KeyDigest, KeyPrefix, masked_key};
use super::network::AllowedNetworks;
use super::role::RoleName;
use super::rules::{GracePeriod, KeyTtl, Retirement, RuleViolation};
use super::scope::{BuiltinScope, ScopeString};
use super::update::{Patch, Revisioned, named, set};
use super::usage::{Budgets, CreditLimit, CreditPatch, Credits, RateLimits};
use super::validate::Validator;

/// Labels or metadata, kept sorted so responses and etags are stable.
pub type StringMap = BTreeMap<String, String>;

/// An entity tag derived from the row's revision counter, which every update increments.
pub fn etag(revision: i64) -> String {
    format!("r{revision}")
}

/// Parses an etag sent back by a client; an unparseable one can only be stale.
pub fn revision_of(etag: &str) -> Option<i64> {
    etag.strip_prefix('r')?.parse().ok()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Workspace {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    pub company: Option<String>,
    pub is_private: bool,
    pub is_personal: bool,
    pub owner_id: String,
    pub source: String,
    pub default_key_prefix: String,
    pub labels: StringMap,
    /// The longest a key of the workspace may live; `None`: no limit.
    pub max_key_ttl: Option<KeyTtl>,
    /// The allow-list a key created in the workspace gets when its request names none.
    pub default_allowed_cidrs: AllowedNetworks,
    pub revision: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

impl Workspace {
    /// A workspace holding non-revoked keys is deleted only when forced (which takes the
    /// keys with it).
    pub fn ensure_deletable(live_keys: u64, force: bool) -> Result<(), RuleViolation> {
        if live_keys > 0 && !force {
            return Err(RuleViolation::WorkspaceHasKeys(live_keys));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct NewWorkspace {
    pub name: String,
    pub description: String,
    pub company: Option<String>,
    pub is_private: bool,
    pub is_personal: bool,
    pub owner_id: String,
    pub default_key_prefix: KeyPrefix,
    pub labels: StringMap,
    pub max_key_ttl: Option<KeyTtl>,
    pub default_allowed_cidrs: AllowedNetworks,
    pub request_id: Option<Uuid>,
}

impl NewWorkspace {
    /// The fields the request set, for the audit log (the name always: it has a default).
    pub fn fields(&self) -> Vec<&'static str> {
        named([
            ("name", true),
            ("description", !self.description.is_empty()),
            ("company", self.company.is_some()),
            ("is_private", self.is_private),
            ("is_personal", self.is_personal),
            ("owner_id", true),
            ("default_key_prefix", true),
            ("labels", !self.labels.is_empty()),
            ("max_key_ttl", self.max_key_ttl.is_some()),
            (
                "default_allowed_cidrs",
                !self.default_allowed_cidrs.is_empty(),
            ),
        ])
    }
}

/// The fields an update changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WorkspacePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub company: Option<Option<String>>,
    pub is_private: Option<bool>,
    pub is_personal: Option<bool>,
    pub owner_id: Option<String>,
    pub default_key_prefix: Option<KeyPrefix>,
    pub labels: Option<StringMap>,
    pub max_key_ttl: Option<Option<KeyTtl>>,
    pub default_allowed_cidrs: Option<AllowedNetworks>,
}

impl Patch for WorkspacePatch {
    type Target = Workspace;

    fn apply(&self, w: &mut Workspace) -> Result<(), RuleViolation> {
        set(&mut w.name, &self.name);
        set(&mut w.description, &self.description);
        set(&mut w.company, &self.company);
        set(&mut w.is_private, &self.is_private);
        set(&mut w.is_personal, &self.is_personal);
        set(&mut w.owner_id, &self.owner_id);
        if let Some(prefix) = &self.default_key_prefix {
            w.default_key_prefix = prefix.as_str().to_owned();
        }
        set(&mut w.labels, &self.labels);
        set(&mut w.max_key_ttl, &self.max_key_ttl);
        set(&mut w.default_allowed_cidrs, &self.default_allowed_cidrs);
        Ok(())
    }

    fn fields(&self) -> Vec<&'static str> {
        named([
            ("name", self.name.is_some()),
            ("description", self.description.is_some()),
            ("company", self.company.is_some()),
            ("is_private", self.is_private.is_some()),
            ("is_personal", self.is_personal.is_some()),
            ("owner_id", self.owner_id.is_some()),
            ("default_key_prefix", self.default_key_prefix.is_some()),
            ("labels", self.labels.is_some()),
            ("max_key_ttl", self.max_key_ttl.is_some()),
            (
                "default_allowed_cidrs",
                self.default_allowed_cidrs.is_some(),
            ),
        ])
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scope {
    pub id: Uuid,
    /// `None` for the built-in scopes, which belong to every tenant.
    pub tenant_id: Option<TenantId>,
    pub workspace_id: Option<Uuid>,
    pub scope: ScopeString,
    pub name: String,
    pub description: String,
    pub category: String,
    pub builtin: bool,
    pub revision: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

impl Scope {
    /// The record of a built-in scope: the same on every deployment.
    pub fn builtin(b: BuiltinScope) -> Self {
        Self {
            id: b.id(),
            tenant_id: None,
            workspace_id: None,
            scope: b.scope(),
            name: b.as_str().to_owned(),
            description: b.description().to_owned(),
            category: "keyplane".to_owned(),
            builtin: true,
            revision: 1,
            create_time: DateTime::UNIX_EPOCH,
            update_time: DateTime::UNIX_EPOCH,
        }
    }

    /// Built-in scopes are the same on every deployment: never changed, never deleted.
    pub fn ensure_mutable(&self) -> Result<(), RuleViolation> {
        if self.builtin {
            return Err(RuleViolation::BuiltinReadOnly);
        }
        Ok(())
    }

    /// A scope granted to keys is deleted only when forced (which removes the grants).
    pub fn ensure_deletable(&self, grants: u64, force: bool) -> Result<(), RuleViolation> {
        self.ensure_mutable()?;
        if grants > 0 && !force {
            return Err(RuleViolation::ScopeInUse(grants));
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct NewScope {
    pub workspace_id: Option<Uuid>,
    pub scope: ScopeString,
    pub name: String,
    pub description: String,
    pub category: String,
    pub request_id: Option<Uuid>,
}

impl NewScope {
    /// The fields the request set, for the audit log.
    pub fn fields(&self) -> Vec<&'static str> {
        named([
            ("workspace_id", self.workspace_id.is_some()),
            ("resource", true),
            ("action", true),
            ("name", true),
            ("description", !self.description.is_empty()),
            ("category", true),
        ])
    }
}

#[derive(Debug, Clone, Default)]
pub struct ScopePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub category: Option<String>,
}

impl Patch for ScopePatch {
    type Target = Scope;

    fn apply(&self, s: &mut Scope) -> Result<(), RuleViolation> {
        s.ensure_mutable()?;
        if let Some(name) = &self.name {
            // An emptied name falls back to the scope string, as on create.
            s.name = if name.is_empty() {
                s.scope.to_string()
            } else {
                name.clone()
            };
        }
        set(&mut s.description, &self.description);
        set(&mut s.category, &self.category);
        Ok(())
    }

    fn fields(&self) -> Vec<&'static str> {
        named([
            ("name", self.name.is_some()),
            ("description", self.description.is_some()),
            ("category", self.category.is_some()),
        ])
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKey {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub workspace_id: Uuid,
    pub name: String,
    pub prefix: String,
    pub last_four: String,
    /// What the key is stored and cached under; never shown to anyone.
    pub digest: KeyDigest,
    pub scopes: Vec<String>,
    pub owner_id: Option<String>,
    pub metadata: StringMap,
    pub expire_time: Option<DateTime<Utc>>,
    pub disabled: bool,
    pub revoke_time: Option<DateTime<Utc>>,
    pub last_used_time: Option<DateTime<Utc>>,
    pub successor_id: Option<Uuid>,
    pub revision: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    /// Checked in this order, before credits.
    pub rate_limits: RateLimits,
    /// The credit account; `None`: unlimited.
    pub credits: Option<Credits>,
    /// The credit account and key-budget subject: the key's own id, or its rotation
    /// predecessor's usage id (see `domain::usage::usage_id`).
    pub usage_id: Uuid,
    /// The budgets the key draws from; [`ApiKey::bind_budgets`] keeps them in step with
    /// the fields they derive from.
    pub budgets: Budgets,
    /// Names of the roles the key holds, sorted.
    pub roles: Vec<String>,
    /// The key that minted this one through delegation (after its rotation, the
    /// successor).
    pub parent_id: Option<Uuid>,
    /// 0 for a key not minted by delegation; otherwise 1 + its parent's.
    pub delegation_depth: u8,
    /// The ids of its ancestors, root first; empty for a key not minted by delegation.
    pub ancestry: Vec<Uuid>,
    /// The networks the key may be used from; empty: from anywhere.
    pub allowed_cidrs: AllowedNetworks,
}

/// The outcome of checking a key, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyCode {
    Valid,
    Malformed,
    NotFound,
    Revoked,
    Expired,
    Disabled,
    /// The key has an allow-list and the client's address is unknown or outside it.
    IpNotAllowed,
    InsufficientScopes,
    /// A rate limit has no room for the request's cost.
    RateLimited,
    /// The credits are fewer than the request's cost.
    UsageExceeded,
}

impl VerifyCode {
    /// Every code, in declaration order (`code as usize` indexes it).
    pub const ALL: [VerifyCode; 10] = [
        VerifyCode::Valid,
        VerifyCode::Malformed,
        VerifyCode::NotFound,
        VerifyCode::Revoked,
        VerifyCode::Expired,
        VerifyCode::Disabled,
        VerifyCode::IpNotAllowed,
        VerifyCode::InsufficientScopes,
        VerifyCode::RateLimited,
        VerifyCode::UsageExceeded,
    ];
}

impl ApiKey {
    pub fn masked_key(&self) -> String {
        masked_key(&self.prefix, &self.last_four)
    }

    /// Revoked, expired or disabled, checked in that order; `None` when the key is usable.
    pub fn unusable(&self, now: DateTime<Utc>) -> Option<VerifyCode> {
        if self.revoke_time.is_some_and(|t| t <= now) {
            Some(VerifyCode::Revoked)
        } else if self.expire_time.is_some_and(|t| t <= now) {
            Some(VerifyCode::Expired)
        } else if self.disabled {
            Some(VerifyCode::Disabled)
        } else {
            None
        }
    }

    /// Whether this key may be rotated now, and what becomes of it: revoked at once without
    /// a grace period, otherwise expiring after it (but never later than it would anyway).
    /// A key has at most one successor.
    pub fn rotation(
        &self,
        now: DateTime<Utc>,
        grace: GracePeriod,
    ) -> Result<Retirement, RuleViolation> {
        if self.successor_id.is_some() {
            return Err(RuleViolation::AlreadyRotated);
        }
        if self.revoke_time.is_some() {
            return Err(RuleViolation::KeyRevoked);
        }
        if self.expire_time.is_some_and(|t| t <= now) {
            return Err(RuleViolation::KeyExpired);
        }
        let grace = grace.get();
        if grace.is_zero() {
            return Ok(Retirement::RevokeNow);
        }
        let end = now + grace;
        Ok(Retirement::ExpireAt(
            self.expire_time.map_or(end, |t| Ord::min(t, end)),
        ))
    }

    /// Whether verifying this key spends anything: rate limits or credits.
    pub fn has_usage_controls(&self) -> bool {
        !self.rate_limits.is_empty() || self.credits.is_some()
    }

    /// Recomputes the budget ids from the fields they derive from (tenant, usage id, owner,
    /// limits): after a read, and after a patch.
    pub fn bind_budgets(&mut self) {
        self.budgets = Budgets::of(
            self.tenant_id,
            self.usage_id,
            self.owner_id.as_deref(),
            &self.rate_limits,
        );
    }
}

#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub workspace_id: Uuid,
    pub name: String,
    /// `None`: the workspace's default prefix.
    pub prefix: Option<KeyPrefix>,
    pub scopes: Vec<ScopeString>,
    pub roles: Vec<RoleName>,
    pub owner_id: Option<String>,
    pub metadata: StringMap,
    pub expire_time: Option<DateTime<Utc>>,
    pub request_id: Option<Uuid>,
    pub rate_limits: RateLimits,
    /// `None`: unlimited.
    pub credits: Option<CreditLimit>,
    /// `None`: the workspace's `default_allowed_cidrs`.
    pub allowed_cidrs: Option<AllowedNetworks>,
}

impl NewApiKey {
    /// The fields the request set, for the audit log (never the secret: it has no name
    /// here).
    pub fn fields(&self) -> Vec<&'static str> {
        named([
            ("workspace_id", true),
            ("name", !self.name.is_empty()),
            ("prefix", true),
            ("scopes", !self.scopes.is_empty()),
            ("roles", !self.roles.is_empty()),
            ("owner_id", self.owner_id.is_some()),
            ("metadata", !self.metadata.is_empty()),
            ("expire_time", self.expire_time.is_some()),
            ("rate_limits", !self.rate_limits.is_empty()),
            ("remaining_uses", self.credits.is_some()),
            ("refill", self.credits.is_some_and(|c| c.refill.is_some())),
            ("allowed_cidrs", self.allowed_cidrs.is_some()),
        ])
    }
}

#[derive(Debug, Clone, Default)]
pub struct ApiKeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<ScopeString>>,
    /// Written to the key's role rows by storage (which resolves the names).
    pub roles: Option<Vec<RoleName>>,
    pub owner_id: Option<Option<String>>,
    pub metadata: Option<StringMap>,
    pub expire_time: Option<Option<DateTime<Utc>>>,
    pub disabled: Option<bool>,
    pub rate_limits: Option<RateLimits>,
    /// `remaining_uses` and `refill`, written to the credit account by storage (which
    /// knows the database clock the refill is scheduled on).
    pub credits: CreditPatch,
    pub allowed_cidrs: Option<AllowedNetworks>,
}

impl Patch for ApiKeyPatch {
    type Target = ApiKey;

    /// Everything but the credit account, which storage writes (and reads back) in the
    /// same transaction; the rules about it are checked here, against the key as it is.
    fn apply(&self, k: &mut ApiKey) -> Result<(), RuleViolation> {
        set(&mut k.name, &self.name);
        if let Some(scopes) = &self.scopes {
            k.scopes = scopes.iter().map(ToString::to_string).collect();
            k.scopes.sort();
        }
        if let Some(roles) = &self.roles {
            k.roles = roles.iter().map(|r| r.as_str().to_owned()).collect();
            k.roles.sort();
            k.roles.dedup();
        }
        set(&mut k.owner_id, &self.owner_id);
        set(&mut k.metadata, &self.metadata);
        set(&mut k.expire_time, &self.expire_time);
        set(&mut k.disabled, &self.disabled);
        set(&mut k.rate_limits, &self.rate_limits);
        set(&mut k.allowed_cidrs, &self.allowed_cidrs);
        let mut v = Validator::new();
        // A shared limit needs an owner on the key as it will be.
        if self.rate_limits.is_some() || self.owner_id.is_some() {
            k.rate_limits
                .check_owner(&mut v, "api_key.rate_limits", k.owner_id.as_deref());
        }
        let refill = k.credits.and_then(|c| c.refill);
        v.check(
            "api_key.refill",
            self.credits.apply(k.credits.is_some(), refill),
        );
        v.finish(|| ()).map_err(RuleViolation::Invalid)?;
        k.bind_budgets();
        Ok(())
    }

    fn fields(&self) -> Vec<&'static str> {
        named([
            ("name", self.name.is_some()),
            ("scopes", self.scopes.is_some()),
            ("roles", self.roles.is_some()),
            ("owner_id", self.owner_id.is_some()),
            ("metadata", self.metadata.is_some()),
            ("expire_time", self.expire_time.is_some()),
            ("disabled", self.disabled.is_some()),
            ("rate_limits", self.rate_limits.is_some()),
            ("remaining_uses", self.credits.remaining.is_some()),
            ("refill", self.credits.refill.is_some()),
            ("allowed_cidrs", self.allowed_cidrs.is_some()),
        ])
    }
}

/// The three resources share the revision rule: every write is the next revision.
macro_rules! revisioned {
    ($($record:ty),+) => {$(
        impl Revisioned for $record {
            fn id(&self) -> Uuid {
                self.id
            }

            fn revision(&self) -> i64 {
                self.revision
            }

            fn touch(&mut self, now: DateTime<Utc>) {
                self.revision += 1;
                self.update_time = now;
            }
        }
    )+};
}
revisioned!(Workspace, Scope, ApiKey);

/// One key for the unit tests of every layer: valid, unlimited, holding no scope, of a
/// fresh tenant. Change fields with struct update syntax; call [`ApiKey::bind_budgets`]
/// after changing the tenant, owner, usage id or rate limits.
#[cfg(test)]
impl ApiKey {
    pub fn fixture() -> ApiKey {
        let now = Utc::now();
        let id = Uuid::now_v7();
        let mut key = ApiKey {
            id,
            tenant_id: TenantId::new(Uuid::now_v7()),
            workspace_id: Uuid::now_v7(),
            name: String::new(),
            prefix: "kp".into(),
            last_four: "abcd".into(),
            digest: KeyDigest([0; 32]),
            scopes: Vec::new(),
            owner_id: None,
            metadata: StringMap::new(),
            expire_time: None,
            disabled: false,
            revoke_time: None,
            last_used_time: None,
            successor_id: None,
            revision: 1,
            create_time: now,
            update_time: now,
            rate_limits: RateLimits::default(),
            credits: None,
            usage_id: id,
            budgets: Budgets::of(
                TenantId::new(Uuid::nil()),
                Uuid::nil(),
                None,
                &RateLimits::default(),
            ),
            roles: Vec::new(),
            parent_id: None,
            delegation_depth: 0,
            ancestry: Vec::new(),
            allowed_cidrs: AllowedNetworks::default(),
        };
        key.bind_budgets();
        key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_keys_show_the_prefix_and_the_last_four() {
        assert_eq!(ApiKey::fixture().masked_key(), "kp_****abcd");
    }

    #[test]
    fn every_code_indexes_its_place() {
        for (i, code) in VerifyCode::ALL.into_iter().enumerate() {
            assert_eq!(code as usize, i);
        }
    }

    #[test]
    fn etags_round_trip() {
        assert_eq!(revision_of(&etag(42)), Some(42));
        assert_eq!(revision_of("42"), None);
    }
}
