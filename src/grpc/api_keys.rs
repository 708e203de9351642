//! `keyplane.v1.ApiKeyService`.
use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{self, Patchable, RequestCheck};
use super::{KeyplaneApi, acting, caller};
use crate::domain::audit::ActorKind;
use crate::domain::delegation::{Lifetime, NewDelegation};
use crate::domain::key::{KeyPrefix, PREFIX_RULE};
use crate::domain::network::{AllowedNetworks, ClientAddress, allowed_networks};
use crate::domain::page::{ListFingerprint, ListKind};
use crate::domain::permission::PermissionQuery;
use crate::domain::records::{ApiKey, ApiKeyPatch, NewApiKey, VerifyCode};
use crate::domain::role::RoleName;
use crate::domain::rules::RuleViolation;
use crate::domain::rules::{GraceOutOfRange, GracePeriod};
use crate::domain::scope::ScopeString;
use crate::domain::update::Update;
use crate::domain::usage::{self, Cost, CreditDelta, CreditLimit};
use crate::domain::validate::{self, NAME_MAX, OWNER_MAX, ValidationError, Validator};
use crate::proto::{self as pb, api_key_service_server::ApiKeyService};
use crate::storage::ApiKeyFilter;

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

impl KeyplaneApi {
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
        let key = self
            .store
            .adjust_api_key_credits(&acting, id, delta, request_id)
            .await?;
        Ok(Response::new(pb::AdjustApiKeyCreditsResponse {
            api_key: Some(self.api_key(key)),
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

    async fn verify_api_key(
        &self,
        request: Request<pb::VerifyApiKeyRequest>,
    ) -> Result<Response<pb::VerifyApiKeyResponse>, Status> {
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
        let code: pb::VerifyCode = outcome.code.into();
        let mut api_key: Option<pb::ApiKey> = outcome.standing.as_deref().map(|s| (&s.key).into());
        // The cached key's balance is as old as the cache entry: the estimate is fresher.
        if let (Some(key), Some(credits)) = (
            api_key.as_mut(),
            outcome.usage.as_ref().and_then(|u| u.credits),
        ) {
            key.remaining_uses = Some(i64::try_from(credits.remaining).unwrap_or(i64::MAX));
        }
        Ok(Response::new(pb::VerifyApiKeyResponse {
            valid: outcome.code == VerifyCode::Valid,
            code: code.into(),
            tenant_id: api_key
                .as_ref()
                .map(|k| k.tenant_id.clone())
                .unwrap_or_default(),
            workspace_id: api_key
                .as_ref()
                .map(|k| k.workspace_id.clone())
                .unwrap_or_default(),
            api_key,
            missing_scopes: outcome.missing,
            rate_limits: outcome
                .standing
                .as_deref()
                .zip(outcome.usage.as_ref())
                .map(|(standing, usage)| convert::limit_states(&standing.key, usage))
                .unwrap_or_default(),
            remaining_uses: outcome
                .usage
                .as_ref()
                .and_then(|u| u.credits)
                .map(|c| i64::try_from(c.remaining).unwrap_or(i64::MAX)),
            stale: outcome.stale,
            effective_scopes: outcome
                .standing
                .as_deref()
                .map(|s| s.effective.clone())
                .unwrap_or_default(),
            delegation_chain: outcome
                .standing
                .as_deref()
                .map(|s| {
                    s.delegation_chain()
                        .iter()
                        .map(ToString::to_string)
                        .collect()
                })
                .unwrap_or_default(),
        }))
    }
}
