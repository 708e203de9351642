//! `keyplane.v1.ApiKeyService`.
use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{self, Patchable, RequestCheck};
use super::prepared::{Answer, AnswerKind};
use super::{KeyplaneApi, acting, caller};
use crate::auth::Caller;
use crate::domain::audit::ActorKind;
use crate::domain::delegation::{Lifetime, NewDelegation};
use crate::domain::import::{IMPORT_MAX, ImportedCredential, ImportedKey};
use crate::domain::key::{ImportedSecret, KeyDigest, KeyHint, KeyPrefix, PREFIX_RULE};
use crate::domain::network::{AllowedNetworks, ClientAddress, allowed_networks};
use crate::domain::page::{ListFingerprint, ListKind};
use crate::domain::permission::PermissionQuery;
use crate::domain::records::{ApiKey, ApiKeyPatch, NewApiKey, VerifyCode};
use crate::domain::role::RoleName;
use crate::domain::rules::RuleViolation;
use crate::domain::rules::{GraceOutOfRange, GracePeriod};
use crate::domain::scope::ScopeString;
use crate::domain::standing::Standing;
use crate::domain::update::Update;
use crate::domain::usage::{self, Cost, CreditDelta, CreditLimit};
use crate::domain::validate::{self, NAME_MAX, OWNER_MAX, ValidationError, Validator};
use crate::proto::{self as pb, api_key_service_server::ApiKeyService};
use crate::storage::{ApiKeyFilter, StoreError};
use crate::verification::Verification;
use crate::verification::meter::UsageReport;

fn owner(v: &mut Validator, field: &str, text: &str) -> Option<String> {
    (!text.is_empty()).then(|| v.max_len(field, text, OWNER_MAX))
}

/// Parses and validates a create request; `now` bounds `expire_time`.
pub fn parse_create(
    r: pb::CreateApiKeyRequest,
    now: DateTime<Utc>,
) -> Result<NewApiKey, ValidationError> {
    let mut v = Validator::new();
    let workspace_id = v.id("workspace_id", &r.workspace_id);
    let name = v.max_len("name", r.name.trim(), NAME_MAX);
    let prefix = if r.prefix.is_empty() {
        None
    } else {
        let parsed = KeyPrefix::parse(&r.prefix);
        if parsed.is_none() {
            v.add("prefix", format!("must be {PREFIX_RULE}"));
        }
        parsed
    };
    let scopes = v.scopes("scopes", &r.scopes);
    let roles = v.roles("roles", &r.roles);
    let owner_id = owner(&mut v, "owner_id", &r.owner_id);
    let metadata = convert::sorted(r.metadata);
    validate::metadata(&mut v, "metadata", &metadata);
    let expire_time = r
        .expire_time
        .as_ref()
        .and_then(|t| v.future_time("expire_time", t, now));
    let request_id = convert::request_id(&mut v, &r.request_id);
    let limit_inputs = convert::rate_limit_inputs(&r.rate_limits);
    let rate_limits = usage::rate_limits(&mut v, "rate_limits", &limit_inputs);
    usage::check_shared_owner(&mut v, "rate_limits", &limit_inputs, owner_id.as_deref());
    let remaining = r
        .remaining_uses
        .and_then(|n| v.check("remaining_uses", usage::remaining_uses(n)));
    let refill = r
        .refill
        .as_ref()
        .and_then(|f| convert::refill(&mut v, "refill", f));
    let allowed_cidrs = requested_networks(&mut v, "allowed_cidrs", &r.allowed_cidrs);
    v.finish(|| NewApiKey {
        allowed_cidrs,
        workspace_id: workspace_id.unwrap_or_default(),
        name,
        prefix,
        scopes,
        roles,
        owner_id,
        metadata,
        expire_time,
        request_id,
        rate_limits: rate_limits.unwrap_or_default(),
        credits: CreditLimit::on_create(remaining, refill),
    })
}

impl Patchable for pb::ApiKey {
    type Patch = ApiKeyPatch;
    const FIELD: &'static str = "api_key";
    const MUTABLE: &'static [&'static str] = &[
        "name",
        "scopes",
        "roles",
        "owner_id",
        "metadata",
        "expire_time",
        "disabled",
        "rate_limits",
        "remaining_uses",
        "refill",
        "allowed_cidrs",
    ];
    const OUTPUT_ONLY: &'static [&'static str] = &[
        "id",
        "tenant_id",
        "workspace_id",
        "prefix",
        "masked_key",
        "revoke_time",
        "last_used_time",
        "create_time",
        "update_time",
        "etag",
        "successor_id",
        "parent_id",
        "delegation_depth",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn sets(&self, path: &str) -> bool {
        match path {
            "name" => !self.name.is_empty(),
            "scopes" => !self.scopes.is_empty(),
            "roles" => !self.roles.is_empty(),
            "owner_id" => !self.owner_id.is_empty(),
            "metadata" => !self.metadata.is_empty(),
            "expire_time" => self.expire_time.is_some(),
            "disabled" => self.disabled,
            "rate_limits" => !self.rate_limits.is_empty(),
            "remaining_uses" => self.remaining_uses.is_some(),
            "refill" => self.refill.is_some(),
            "allowed_cidrs" => !self.allowed_cidrs.is_empty(),
            _ => false,
        }
    }

    fn patch(&self, v: &mut Validator, path: &str, now: DateTime<Utc>, patch: &mut ApiKeyPatch) {
        match path {
            "name" => patch.name = Some(v.max_len("api_key.name", self.name.trim(), NAME_MAX)),
            "scopes" => patch.scopes = Some(v.scopes("api_key.scopes", &self.scopes)),
            "roles" => patch.roles = Some(v.roles("api_key.roles", &self.roles)),
            "owner_id" => patch.owner_id = Some(owner(v, "api_key.owner_id", &self.owner_id)),
            "metadata" => {
                let metadata = convert::sorted(self.metadata.clone());
                validate::metadata(v, "api_key.metadata", &metadata);
                patch.metadata = Some(metadata);
            }
            "expire_time" => {
                patch.expire_time = Some(
                    self.expire_time
                        .as_ref()
                        .and_then(|t| v.future_time("api_key.expire_time", t, now)),
                )
            }
            "disabled" => patch.disabled = Some(self.disabled),
            // Empty: no rate limits. Invalid: the violations end the request.
            "rate_limits" => {
                patch.rate_limits = usage::rate_limits(
                    v,
                    "api_key.rate_limits",
                    &convert::rate_limit_inputs(&self.rate_limits),
                )
            }
            // Named in the mask but absent: unlimited.
            "remaining_uses" => {
                patch.credits.remaining = Some(
                    self.remaining_uses
                        .and_then(|n| v.check("api_key.remaining_uses", usage::remaining_uses(n))),
                )
            }
            "refill" => {
                patch.credits.refill = Some(
                    self.refill
                        .as_ref()
                        .and_then(|f| convert::refill(v, "api_key.refill", f)),
                )
            }
            // Named but empty: from anywhere.
            "allowed_cidrs" => {
                patch.allowed_cidrs = Some(allowed_networks(
                    v,
                    "api_key.allowed_cidrs",
                    &self.allowed_cidrs,
                ))
            }
            _ => {}
        }
    }
}

/// Parses and validates a delegation; `now` bounds `expire_time`. What the parent may give
/// is decided later, against the parent as stored.
pub fn parse_delegate(
    r: pb::DelegateApiKeyRequest,
    now: DateTime<Utc>,
) -> Result<NewDelegation, ValidationError> {
    let mut v = Validator::new();
    let name = v.max_len("name", r.name.trim(), NAME_MAX);
    let scopes = v.scopes("scopes", &r.scopes);
    let roles = v.roles("roles", &r.roles);
    let lifetime = match (&r.expire_time, &r.ttl) {
        (Some(_), Some(_)) => {
            v.add("ttl", "give expire_time or ttl, not both");
            None
        }
        (Some(t), None) => v.future_time("expire_time", t, now).map(Lifetime::Until),
        (None, Some(ttl)) => {
            let ttl = convert::span(Some(ttl)).filter(|t| *t > chrono::TimeDelta::zero());
            if ttl.is_none() {
                v.add("ttl", "must be a positive duration");
            }
            ttl.map(Lifetime::For)
        }
        (None, None) => None,
    };
    let owner_id = owner(&mut v, "owner_id", &r.owner_id);
    let metadata = convert::sorted(r.metadata);
    validate::metadata(&mut v, "metadata", &metadata);
    let request_id = convert::request_id(&mut v, &r.request_id);
    let limit_inputs = convert::rate_limit_inputs(&r.rate_limits);
    let rate_limits = usage::rate_limits(&mut v, "rate_limits", &limit_inputs);
    usage::check_shared_owner(&mut v, "rate_limits", &limit_inputs, owner_id.as_deref());
    let remaining = r
        .remaining_uses
        .and_then(|n| v.check("remaining_uses", usage::remaining_uses(n)));
    let allowed_cidrs = requested_networks(&mut v, "allowed_cidrs", &r.allowed_cidrs);
    v.finish(|| NewDelegation {
        allowed_cidrs,
        name,
        scopes,
        roles,
        lifetime,
        metadata,
        owner_id,
        credits: CreditLimit::on_create(remaining, None),
        rate_limits: rate_limits.unwrap_or_default(),
        delegable: r.delegable,
        request_id,
    })
}

/// An allow-list a new key asks for; `None` when it names none (and gets its default).
fn requested_networks(
    v: &mut Validator,
    field: &str,
    entries: &[String],
) -> Option<AllowedNetworks> {
    (!entries.is_empty()).then(|| allowed_networks(v, field, entries))
}

/// The client address a verification names, if any.
pub fn parse_client_ip(text: &str) -> Result<Option<ClientAddress>, ValidationError> {
    if text.is_empty() {
        return Ok(None);
    }
    let mut v = Validator::new();
    let client = v.check("client_ip", ClientAddress::parse(text));
    v.finish(|| client)
}

/// Parses an import: the request's own fields, whose faults fail the call, and each item,
/// whose faults are that item's result (fields named `keys[i].field`).
#[allow(clippy::type_complexity)]
pub fn parse_import(
    r: pb::ImportApiKeysRequest,
    now: DateTime<Utc>,
) -> Result<(Uuid, Vec<Result<ImportedKey, ValidationError>>), ValidationError> {
    let mut v = Validator::new();
    let workspace_id = v.id("workspace_id", &r.workspace_id);
    if r.keys.is_empty() || r.keys.len() > IMPORT_MAX {
        v.add("keys", format!("must hold 1 to {IMPORT_MAX} keys per call"));
    }
    let workspace_id = v.finish(|| workspace_id.unwrap_or_default())?;
    let items = r
        .keys
        .into_iter()
        .enumerate()
        .map(|(i, key)| parse_imported(&format!("keys[{i}]"), key, workspace_id, now))
        .collect();
    Ok((workspace_id, items))
}

/// One item of an import, its fields named under `at` (`keys[3]`).
fn parse_imported(
    at: &str,
    k: pb::ImportedApiKey,
    workspace_id: Uuid,
    now: DateTime<Utc>,
) -> Result<ImportedKey, ValidationError> {
    let f = |name: &str| format!("{at}.{name}");
    let mut v = Validator::new();
    let credential = match (k.secret.is_empty(), k.sha256.is_empty()) {
        (false, true) => v
            .check(&f("secret"), ImportedSecret::parse(&k.secret))
            .map(ImportedCredential::Secret),
        (true, false) => v
            .check(&f("sha256"), KeyDigest::from_hex(k.sha256.trim()))
            .map(ImportedCredential::Digest),
        (false, false) => {
            v.add(f("sha256"), "give secret or sha256, not both");
            None
        }
        (true, true) => {
            v.add(f("secret"), "give the secret or its sha256");
            None
        }
    };
    let hint = (!k.hint.is_empty())
        .then(|| v.check(&f("hint"), KeyHint::parse(&k.hint)))
        .flatten();
    let name = v.max_len(&f("name"), k.name.trim(), NAME_MAX);
    let scopes = v.scopes(&f("scopes"), &k.scopes);
    let roles = v.roles(&f("roles"), &k.roles);
    let owner_id = owner(&mut v, &f("owner_id"), &k.owner_id);
    let metadata = convert::sorted(k.metadata);
    validate::metadata(&mut v, &f("metadata"), &metadata);
    let expire_time = k
        .expire_time
        .as_ref()
        .and_then(|t| v.future_time(&f("expire_time"), t, now));
    let limit_inputs = convert::rate_limit_inputs(&k.rate_limits);
    let rate_limits = usage::rate_limits(&mut v, &f("rate_limits"), &limit_inputs);
    usage::check_shared_owner(
        &mut v,
        &f("rate_limits"),
        &limit_inputs,
        owner_id.as_deref(),
    );
    let remaining = k
        .remaining_uses
        .and_then(|n| v.check(&f("remaining_uses"), usage::remaining_uses(n)));
    let refill = k
        .refill
        .as_ref()
        .and_then(|r| convert::refill(&mut v, &f("refill"), r));
    let allowed_cidrs = requested_networks(&mut v, &f("allowed_cidrs"), &k.allowed_cidrs);
    let (credential, hint, key) = v.finish(|| {
        let key = NewApiKey {
            workspace_id,
            name,
            prefix: None,
            scopes,
            roles,
            owner_id,
            metadata,
            expire_time,
            request_id: None,
            rate_limits: rate_limits.unwrap_or_default(),
            credits: CreditLimit::on_create(remaining, refill),
            allowed_cidrs,
        };
        (credential, hint, key)
    })?;
    let credential = credential
        .ok_or_else(|| ValidationError::single(f("secret"), "give the secret or its sha256"))?;
    ImportedKey::new(credential, hint, key)
        .map_err(|e| ValidationError::single(f("hint"), e.to_string()))
}

/// Parses and validates an update request; `now` bounds `expire_time`.
pub fn parse_update(
    r: pb::UpdateApiKeyRequest,
    now: DateTime<Utc>,
) -> Result<Update<ApiKeyPatch>, ValidationError> {
    convert::parse_update(r.api_key, r.update_mask.as_ref(), &r.etag, now)
}

/// Parses and validates a rotate request: the id and the grace period.
pub fn parse_rotate(r: pb::RotateApiKeyRequest) -> Result<(Uuid, GracePeriod), ValidationError> {
    let mut v = Validator::new();
    let id = v.id("id", &r.id);
    let grace = r.grace_period.unwrap_or_default();
    let grace = chrono::Duration::try_seconds(grace.seconds)
        .filter(|_| (0..1_000_000_000).contains(&grace.nanos))
        .map(|secs| secs + chrono::Duration::nanoseconds(grace.nanos.into()))
        .ok_or(GraceOutOfRange)
        .and_then(GracePeriod::new);
    let grace = v.check("grace_period", grace);
    v.finish(|| (id.unwrap_or_default(), grace.unwrap_or(GracePeriod::NONE)))
}

/// Parses and validates an adjustment: the id and a delta that is not 0 and at most 10^15
/// either way.
pub fn parse_adjust(
    r: &pb::AdjustApiKeyCreditsRequest,
) -> Result<(Uuid, CreditDelta, Option<Uuid>), ValidationError> {
    let mut v = Validator::new();
    let id = v.id("id", &r.id);
    let delta = v.check("delta", CreditDelta::parse(r.delta));
    let request_id = convert::request_id(&mut v, &r.request_id);
    v.finish(|| {
        (
            id.unwrap_or_default(),
            delta.unwrap_or(CreditDelta::ONE),
            request_id,
        )
    })
}

/// A verification's cost: absent is 1; 0 to 1000.
pub fn parse_cost(cost: Option<i32>) -> Result<Cost, ValidationError> {
    let mut v = Validator::new();
    let cost = v.check("cost", Cost::parse(cost.map(i64::from)));
    v.finish(|| cost.unwrap_or_default())
}

/// The scopes a verification requires.
pub fn parse_required_scopes(scopes: &[String]) -> Result<Vec<ScopeString>, ValidationError> {
    let mut v = Validator::new();
    let required = v.scopes("required_scopes", scopes);
    v.finish(|| required)
}

/// Whether a storage error is one item's (a rule, an unknown scope or role) rather than
/// the whole call's (the database, a missing workspace).
fn refuses_item(err: &StoreError) -> bool {
    matches!(err, StoreError::UnknownScopes(_) | StoreError::Rule(_))
}

impl KeyplaneApi {
    /// Whether the caller may give an item what it asks for: the built-in scopes on it and
    /// those of its roles, as at create. `Ok(Err)` refuses the item; `Err` fails the call.
    async fn may_import(
        &self,
        caller: &Caller,
        tenant: crate::domain::TenantId,
        key: &ImportedKey,
        at: &str,
    ) -> Result<Result<(), Status>, Status> {
        if let Err(e) = caller.may_grant(key.key.scopes.iter().map(|s| s.as_str())) {
            return Ok(Err(e.into()));
        }
        if key.key.roles.is_empty() {
            return Ok(Ok(()));
        }
        let field = format!("{at}.roles");
        match self
            .store
            .scopes_of_roles(tenant, key.key.workspace_id, &key.key.roles, &field)
            .await
        {
            Ok(granted) => Ok(caller
                .may_grant(granted.iter().map(String::as_str))
                .map_err(Status::from)),
            Err(e) if refuses_item(&e) => Ok(Err(e.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// A request's permission query: none when empty; parsed once per distinct text.
    fn permission_query(
        &self,
        text: &str,
    ) -> Result<Option<std::sync::Arc<PermissionQuery>>, ValidationError> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        self.queries
            .get(text)
            .map(Some)
            .map_err(|e| ValidationError::single("permission_query", e.to_string()))
    }

    /// A key read from the database as a message. Its `remaining_uses` is the stored
    /// balance no replica has reserved, plus what this replica holds and may still spend:
    /// exact on one replica, and never above the truth with several (the others' leases are
    /// not counted).
    fn api_key(&self, key: ApiKey) -> pb::ApiKey {
        let held = self.verifier.held_credits(&key);
        let mut message = pb::ApiKey::from(key);
        if held > 0 {
            message.remaining_uses = message.remaining_uses.map(|r| {
                r.saturating_add(i64::try_from(held).unwrap_or(i64::MAX))
                    .min(i64::try_from(usage::CREDITS_MAX).unwrap_or(i64::MAX))
            });
        }
        message
    }
}

#[tonic::async_trait]
impl ApiKeyService for KeyplaneApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let new = parse_create(request.into_inner(), Utc::now())?;
        caller.may_grant(new.scopes.iter().map(|s| s.as_str()))?;
        if !new.roles.is_empty() {
            // No escalation through roles: what they grant, the caller must hold.
            let granted = self
                .store
                .scopes_of_roles(acting.tenant, new.workspace_id, &new.roles, "roles")
                .await?;
            caller.may_grant(granted.iter().map(String::as_str))?;
        }
        let (key, secret) = self.store.create_api_key(&acting, new).await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(self.api_key(key)),
            secret: secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
        }))
    }

    async fn get_api_key(
        &self,
        request: Request<pb::GetApiKeyRequest>,
    ) -> Result<Response<pb::GetApiKeyResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let key = self.store.get_api_key(tenant, id).await?;
        Ok(Response::new(pb::GetApiKeyResponse {
            api_key: Some(self.api_key(key)),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let r = request.into_inner();
        let mut v = Validator::new();
        let filter = ApiKeyFilter {
            workspace_id: v.optional_id("workspace_id", &r.workspace_id),
            owner_id: owner(&mut v, "owner_id", &r.owner_id),
            parent_id: v.optional_id("parent_id", &r.parent_id),
        };
        let list = ListFingerprint::new(ListKind::ApiKeys, tenant)
            .filter(
                filter
                    .workspace_id
                    .as_ref()
                    .map(|w| w.as_bytes().as_slice()),
            )
            .filter(filter.owner_id.as_deref().map(str::as_bytes))
            .filter(filter.parent_id.as_ref().map(|p| p.as_bytes().as_slice()));
        let (size, after) = convert::page(&mut v, &self.pages, r.page_size, &r.page_token, &list);
        v.finish(|| ())?;
        let page = self
            .store
            .list_api_keys(tenant, &filter, after, size)
            .await?;
        let next_page_token = self.next_token(&page, |k| k.id, &list);
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: page.items.into_iter().map(|k| self.api_key(k)).collect(),
            next_page_token,
        }))
    }

    async fn update_api_key(
        &self,
        request: Request<pb::UpdateApiKeyRequest>,
    ) -> Result<Response<pb::UpdateApiKeyResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let update = parse_update(request.into_inner(), Utc::now())?;
        if let Some(scopes) = &update.patch.scopes {
            caller.may_grant(scopes.iter().map(|s| s.as_str()))?;
        }
        if let Some(roles) = update.patch.roles.as_ref().filter(|r| !r.is_empty()) {
            let current = self.store.get_api_key(acting.tenant, update.id).await?;
            let granted = self
                .store
                .scopes_of_roles(acting.tenant, current.workspace_id, roles, "api_key.roles")
                .await?;
            caller.may_grant(granted.iter().map(String::as_str))?;
        }
        let key = self.store.update(&acting, update).await?;
        Ok(Response::new(pb::UpdateApiKeyResponse {
            api_key: Some(self.api_key(key)),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let key = self.store.revoke_api_key(&acting, id).await?;
        Ok(Response::new(pb::RevokeApiKeyResponse {
            api_key: Some(self.api_key(key)),
        }))
    }

    async fn rotate_api_key(
        &self,
        request: Request<pb::RotateApiKeyRequest>,
    ) -> Result<Response<pb::RotateApiKeyResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let (id, grace) = parse_rotate(request.into_inner())?;
        // Rotation hands out a fresh secret with the same scopes: the caller must be able to
        // grant them.
        let current = self.store.get_api_key(acting.tenant, id).await?;
        caller.may_grant(current.scopes.iter().map(String::as_str))?;
        // And its roles: the successor holds them too.
        let roles: Vec<RoleName> = current
            .roles
            .iter()
            .filter_map(|r| RoleName::parse(r))
            .collect();
        if !roles.is_empty() {
            let granted = self
                .store
                .scopes_of_roles(acting.tenant, current.workspace_id, &roles, "roles")
                .await?;
            caller.may_grant(granted.iter().map(String::as_str))?;
        }
        let rotated = self.store.rotate_api_key(&acting, id, grace).await?;
        Ok(Response::new(pb::RotateApiKeyResponse {
            api_key: Some(self.api_key(rotated.key)),
            secret: rotated.secret.expose().to_owned(),
        }))
    }

    async fn delete_api_key(
        &self,
        request: Request<pb::DeleteApiKeyRequest>,
    ) -> Result<Response<pb::DeleteApiKeyResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        self.store.delete_api_key(&acting, id).await?;
        Ok(Response::new(pb::DeleteApiKeyResponse {}))
    }

    async fn adjust_api_key_credits(
        &self,
        request: Request<pb::AdjustApiKeyCreditsRequest>,
    ) -> Result<Response<pb::AdjustApiKeyCreditsResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let (id, delta, request_id) = parse_adjust(request.get_ref())?;
        // The balance shown counts what this replica holds, as any read of the key does.
        let key = self
            .store
            .adjust_api_key_credits(&acting, id, delta, request_id, |key| {
                self.verifier.held_credits(key)
            })
            .await?;
        Ok(Response::new(pb::AdjustApiKeyCreditsResponse {
            api_key: Some(key.into()),
        }))
    }

    async fn delegate_api_key(
        &self,
        request: Request<pb::DelegateApiKeyRequest>,
    ) -> Result<Response<pb::DelegateApiKeyResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        // The parent is the calling key: a token holding the scope has no key to narrow.
        let parent = match caller.kind {
            ActorKind::ApiKey => caller.subject.parse::<Uuid>().ok(),
            ActorKind::TenantToken | ActorKind::PlatformToken => None,
        }
        .ok_or(RuleViolation::DelegationNeedsKey)
        .map_err(Status::from)?;
        let new = parse_delegate(request.into_inner(), Utc::now())?;
        let (key, secret) = self
            .store
            .delegate_api_key(&acting, parent, new, self.max_delegation_ttl)
            .await?;
        Ok(Response::new(pb::DelegateApiKeyResponse {
            api_key: Some(self.api_key(key)),
            secret: secret.map(|s| s.expose().to_owned()).unwrap_or_default(),
        }))
    }

    async fn import_api_keys(
        &self,
        request: Request<pb::ImportApiKeysRequest>,
    ) -> Result<Response<pb::ImportApiKeysResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let (workspace_id, items) = parse_import(request.into_inner(), Utc::now())?;
        // Each item's result; the accepted ones are filled in by the store.
        let mut results: Vec<Option<Result<pb::ApiKey, Status>>> = Vec::with_capacity(items.len());
        let mut accepted = Vec::new();
        let mut positions = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            let checked = match item {
                Err(invalid) => Err(Status::from(invalid)),
                Ok(key) => self
                    .may_import(&caller, acting.tenant, &key, &format!("keys[{i}]"))
                    .await?
                    .map(|()| key),
            };
            match checked {
                Ok(key) => {
                    accepted.push(key);
                    positions.push(i);
                    results.push(None);
                }
                Err(status) => results.push(Some(Err(status))),
            }
        }
        if !accepted.is_empty() {
            let outcomes = self
                .store
                .import_api_keys(&acting, workspace_id, accepted)
                .await?;
            for (i, outcome) in positions.into_iter().zip(outcomes) {
                results[i] = Some(outcome.map(|k| self.api_key(k)).map_err(Status::from));
            }
        }
        let results = results
            .into_iter()
            .enumerate()
            .map(|(i, result)| pb::ImportApiKeyResult {
                result: Some(match result {
                    Some(Ok(key)) => pb::import_api_key_result::Result::ApiKey(key),
                    Some(Err(status)) => pb::import_api_key_result::Result::Error(
                        super::error::item_status(&status, &format!("keys[{i}]")),
                    ),
                    // Every position was filled above: a store answering fewer items than
                    // it was given is a bug, logged as one.
                    None => pb::import_api_key_result::Result::Error(super::error::item_status(
                        &Status::from(StoreError::Corrupt("an import item had no result".into())),
                        &format!("keys[{i}]"),
                    )),
                }),
            })
            .collect();
        Ok(Response::new(pb::ImportApiKeysResponse { results }))
    }

    async fn verify_api_key(
        &self,
        request: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyResponse>, Status> {
        let outcome = self.verify_outcome(request).await?;
        Ok(Response::new(verify_response(&outcome)))
    }
}

impl KeyplaneApi {
    /// `VerifyApiKey` up to its answer: the request read, the key verified, the code
    /// counted.
    pub(super) async fn verify_outcome(
        &self,
        request: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Verification, Status> {
        let caller = caller(&request)?;
        let r = request.into_inner();
        let required = parse_required_scopes(&r.required_scopes)?;
        let query = self.permission_query(&r.permission_query)?;
        let cost = parse_cost(r.cost)?;
        let client = parse_client_ip(&r.client_ip)?;
        let outcome = self
            .verifier
            .verify(
                caller.access,
                &r.key,
                client,
                &required,
                query.as_deref(),
                cost,
            )
            .await?;
        self.verifications.count(outcome.code);
        Ok(outcome)
    }

    /// The answer to `outcome`. A VALID answer is the same on every call for the same
    /// standing but for a metered key's usage, so it is prepared once, and the usage
    /// appended per call.
    pub(super) fn verify_answer(&self, outcome: &Verification) -> Answer<pb::VerifyApiKeyResponse> {
        match &outcome.standing {
            Some(standing)
                if outcome.code == VerifyCode::Valid
                    && !outcome.stale
                    && outcome.missing.is_empty() =>
            {
                let prepared = self
                    .prepared
                    .get_or_prepare(standing, AnswerKind::Verify, || {
                        key_answer(outcome.code, Some(standing), &[], false)
                    });
                let usage = outcome
                    .usage
                    .as_ref()
                    .map(|usage| usage_answer(standing, usage));
                Answer::Prepared(prepared, usage)
            }
            _ => Answer::Built(verify_response(outcome)),
        }
    }
}

/// `VerifyApiKey`'s response to a verification.
fn verify_response(outcome: &Verification) -> pb::VerifyApiKeyResponse {
    let standing = outcome.standing.as_deref();
    let mut response = key_answer(outcome.code, standing, &outcome.missing, outcome.stale);
    if let (Some(standing), Some(usage)) = (standing, &outcome.usage) {
        // As a decoder merges the usage into a prepared answer.
        let usage = usage_answer(standing, usage);
        if let (Some(key), Some(remaining)) = (response.api_key.as_mut(), usage.remaining_uses) {
            key.remaining_uses = Some(remaining);
        }
        response.remaining_uses = usage.remaining_uses;
        response.rate_limits = usage.rate_limits;
    }
    response
}

/// The answer without this call's usage: the code and the key as cached.
fn key_answer(
    code: VerifyCode,
    standing: Option<&Standing>,
    missing: &[String],
    stale: bool,
) -> pb::VerifyApiKeyResponse {
    let api_key: Option<pb::ApiKey> = standing.map(|s| (&s.key).into());
    pb::VerifyApiKeyResponse {
        valid: code == VerifyCode::Valid,
        code: pb::VerifyCode::from(code).into(),
        tenant_id: api_key
            .as_ref()
            .map(|k| k.tenant_id.clone())
            .unwrap_or_default(),
        workspace_id: api_key
            .as_ref()
            .map(|k| k.workspace_id.clone())
            .unwrap_or_default(),
        api_key,
        missing_scopes: missing.to_vec(),
        rate_limits: Vec::new(),
        remaining_uses: None,
        stale,
        effective_scopes: standing.map(|s| s.effective.clone()).unwrap_or_default(),
        delegation_chain: standing
            .map(|s| {
                s.delegation_chain()
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// What this call's usage adds to the answer: the rate limits' states and the remaining
/// credits, on the response and on its key (the cached key's balance is as old as the
/// cache entry: this replica's estimate is fresher). Only these fields are set.
fn usage_answer(standing: &Standing, usage: &UsageReport) -> pb::VerifyApiKeyResponse {
    let remaining = usage
        .credits
        .map(|c| i64::try_from(c.remaining).unwrap_or(i64::MAX));
    pb::VerifyApiKeyResponse {
        api_key: remaining.map(|remaining| pb::ApiKey {
            remaining_uses: Some(remaining),
            ..Default::default()
        }),
        rate_limits: convert::limit_states(&standing.key, usage),
        remaining_uses: remaining,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::domain::usage::{Credits, LimitState, Period, RateLimit, RateLimitName, RateLimits};
    use crate::verification::meter::{CreditReport, LimitReport};

    /// A metered key's VALID verification: 7 credits left of the cached 50, one limit.
    fn metered() -> Verification {
        let db_now_ms = 1_800_000_000_000;
        let mut key = ApiKey {
            scopes: vec!["crm:read".into()],
            credits: Some(Credits {
                balance: 50,
                refill: None,
                epoch: 0,
                version: 0,
                next_refill_ms: None,
            }),
            rate_limits: RateLimits::new(vec![
                RateLimit::new(
                    RateLimitName::parse("burst").unwrap(),
                    100,
                    Period::rate_limit_ms(1_000).unwrap(),
                    false,
                )
                .unwrap(),
            ])
            .unwrap(),
            ..ApiKey::fixture()
        };
        key.bind_budgets();
        Verification {
            code: VerifyCode::Valid,
            standing: Some(std::sync::Arc::new(Standing::plain(key))),
            missing: Vec::new(),
            usage: Some(UsageReport {
                limits: vec![LimitReport {
                    state: LimitState {
                        limit: 100,
                        remaining: 42,
                        reset_ms: db_now_ms + 500,
                        exceeded: false,
                    },
                    db_now_ms,
                }],
                credits: Some(CreditReport {
                    remaining: 7,
                    reset_ms: None,
                    refill_amount: None,
                    db_now_ms,
                }),
            }),
            stale: false,
        }
    }

    #[test]
    fn a_prepared_answer_with_the_usage_after_it_decodes_as_the_built_one() {
        let outcome = metered();
        let standing = outcome.standing.as_deref().unwrap();
        let built = verify_response(&outcome);
        assert_eq!(built.remaining_uses, Some(7));
        assert_eq!(built.api_key.as_ref().unwrap().remaining_uses, Some(7));
        assert_eq!(built.rate_limits.len(), 1);

        // What the encoder writes: the bytes prepared without usage, then the usage.
        let mut wire = key_answer(VerifyCode::Valid, Some(standing), &[], false).encode_to_vec();
        usage_answer(standing, outcome.usage.as_ref().unwrap())
            .encode(&mut wire)
            .unwrap();
        assert_eq!(
            pb::VerifyApiKeyResponse::decode(wire.as_slice()).unwrap(),
            built
        );
    }
}
