//! API key repository. Keys are stored as their SHA-256 digest; their scopes are rows of
//! `api_key_scopes` so that deleting a scope can find (and refuse or remove) its grants.
//! What a key's verification depends on besides its row (roles, ancestors) is read and
//! reached through [`chain`]; delegation is [`delegation`]; a key's roles, [`roles`].
mod chain;
mod credit_requests;
mod delegation;
mod import;
mod roles;

pub(super) use chain::with_descendants;
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
    sea_query::{Expr, ExprTrait},
};
use uuid::Uuid;

use super::budgets::accounts;
use super::budgets::rows::{credits_from_row, limits_from_json, limits_to_json};
use super::entity::{TenantOwned, api_key, api_key_scope, usage_credit, workspace};
use super::invalidation::Eviction;
use super::update::Stored;
use super::workspaces::{default_networks, key_policy, require_workspace};
use super::{
    Store, StoreError, db_now, is_unique_violation, map_from_json, map_to_json, networks_from_json,
    networks_to_json,
};
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::key::{ApiKeySecret, KeyDigest, KeyPrefix};
use crate::domain::network::AllowedNetworks;
use crate::domain::page::Page;
use crate::domain::records::{ApiKey, ApiKeyPatch, NewApiKey};
use crate::domain::rules::{GracePeriod, KeyTtl, Retirement, RuleViolation};
use crate::domain::standing::Standing;
use crate::domain::usage::{self, CreditChange, CreditDelta, Credits};
use crate::domain::{TenantAccess, TenantId};

/// What inserting a new key came to.
enum Inserted {
    /// The row is in; the transaction goes on.
    Fresh(DatabaseTransaction),
    /// A create with the same request id got there first: its key.
    Existing(Box<ApiKey>),
}

/// Filters of `ListApiKeys`.
#[derive(Debug, Clone, Default)]
pub struct ApiKeyFilter {
    pub workspace_id: Option<Uuid>,
    pub owner_id: Option<String>,
    /// Only the children of this key.
    pub parent_id: Option<Uuid>,
}

/// The result of a rotation: the successor and its secret.
#[derive(Debug)]
pub struct Rotated {
    pub key: ApiKey,
    pub secret: ApiKeySecret,
}

/// The key of a row, its grants and its credit account (the row of its usage id, if any).
fn from_model(
    m: api_key::Model,
    scopes: Vec<String>,
    credits: Option<&usage_credit::Model>,
) -> Result<ApiKey, StoreError> {
    let credits: Option<Credits> = match credits {
        Some(row) => credits_from_row(row)?,
        None => None,
    };
    let mut key = ApiKey {
        rate_limits: limits_from_json(m.id, m.rate_limits)?,
        credits,
        usage_id: usage::usage_id(m.id, m.usage_id),
        budgets: usage::Budgets::of(TenantId::new(m.tenant_id), m.id, None, &Default::default()),
        id: m.id,
        tenant_id: TenantId::new(m.tenant_id),
        workspace_id: m.workspace_id,
        name: m.name,
        prefix: m.prefix,
        last_four: m.last_four,
        digest: digest_of(m.id, m.key_digest)?,
        scopes,
        owner_id: m.owner_id,
        metadata: map_from_json(m.metadata)?,
        expire_time: m.expire_time,
        disabled: m.disabled,
        revoke_time: m.revoke_time,
        last_used_time: m.last_used_time,
        successor_id: m.replaced_by,
        revision: m.revision,
        create_time: m.create_time,
        update_time: m.update_time,
        roles: list_from_json(m.id, "roles", m.roles)?,
        parent_id: m.parent_id,
        delegation_depth: u8::try_from(m.delegation_depth)
            .map_err(|_| StoreError::Corrupt(format!("key {} delegation depth", m.id)))?,
        ancestry: list_from_json(m.id, "ancestry", m.ancestry)?,
        allowed_cidrs: networks_from_json(m.id, m.allowed_cidrs)?,
    };
    key.bind_budgets();
    Ok(key)
}

/// The credit accounts of these usage ids that exist.
async fn load_credits(
    conn: &impl ConnectionTrait,
    accounts: &[Uuid],
) -> Result<HashMap<Uuid, usage_credit::Model>, StoreError> {
    if accounts.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = usage_credit::Entity::find()
        .filter(usage_credit::Column::AccountId.is_in(accounts.iter().copied()))
        .all(conn)
        .await?;
    Ok(rows.into_iter().map(|r| (r.account_id, r)).collect())
}

/// The granted scope strings of each key, sorted.
async fn load_scopes(
    conn: &impl ConnectionTrait,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<String>>, StoreError> {
    let mut by_key: HashMap<Uuid, Vec<String>> = HashMap::new();
    if ids.is_empty() {
        return Ok(by_key);
    }
    let rows = api_key_scope::Entity::find()
        .filter(api_key_scope::Column::ApiKeyId.is_in(ids.iter().copied()))
        .order_by_asc(api_key_scope::Column::Scope)
        .all(conn)
        .await?;
    for row in rows {
        by_key.entry(row.api_key_id).or_default().push(row.scope);
    }
    Ok(by_key)
}

/// Keys of these rows, with their grants and credit accounts (two more queries for the
/// lot).
async fn with_scopes(
    conn: &impl ConnectionTrait,
    models: Vec<api_key::Model>,
) -> Result<Vec<ApiKey>, StoreError> {
    let ids: Vec<Uuid> = models.iter().map(|m| m.id).collect();
    let mut scopes = load_scopes(conn, &ids).await?;
    let accounts: Vec<Uuid> = models
        .iter()
        .map(|m| usage::usage_id(m.id, m.usage_id))
        .collect();
    let credits = load_credits(conn, &accounts).await?;
    models
        .into_iter()
        .map(|m| {
            let s = scopes.remove(&m.id).unwrap_or_default();
            let account = credits.get(&usage::usage_id(m.id, m.usage_id));
            from_model(m, s, account)
        })
        .collect()
}

/// Every key drawing from a credit account and every key delegated from them: each one's
/// standing holds the account as it was.
async fn family_eviction(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    account: Uuid,
) -> Result<Eviction, StoreError> {
    let condition = sea_orm::Condition::any()
        .add(api_key::Column::UsageId.eq(account))
        .add(api_key::Column::Id.eq(account));
    let family = touched_keys(conn, tenant, condition).await?;
    let ids: Vec<Uuid> = family.iter().map(|k| k.id).collect();
    let digests = family.into_iter().map(|k| k.digest).collect();
    Ok(Eviction::keys(
        chain::with_descendants(conn, tenant, &ids, digests).await?,
    ))
}

/// Writes what an update does to the key's credit account; `true` when it changed it.
async fn write_credit_change(
    conn: &impl ConnectionTrait,
    key: &ApiKey,
    change: CreditChange,
    reschedule: bool,
) -> Result<bool, StoreError> {
    match change {
        CreditChange::Unchanged => return Ok(false),
        CreditChange::Set(limit) => {
            accounts::set_credits(
                conn,
                key.tenant_id,
                key.usage_id,
                limit.remaining,
                limit.refill,
                reschedule,
            )
            .await?
        }
        CreditChange::Reschedule(refill) => {
            accounts::reschedule_credits(conn, key.usage_id, refill).await?
        }
        CreditChange::Clear => accounts::clear_credits(conn, key.usage_id).await?,
    }
    Ok(true)
}

async fn insert_grants(
    conn: &impl ConnectionTrait,
    key_id: Uuid,
    grants: &[(String, Option<Uuid>)],
) -> Result<(), StoreError> {
    if grants.is_empty() {
        return Ok(());
    }
    let rows = grants
        .iter()
        .map(|(scope, scope_id)| api_key_scope::ActiveModel {
            api_key_id: Set(key_id),
            scope: Set(scope.clone()),
            scope_id: Set(*scope_id),
        });
    api_key_scope::Entity::insert_many(rows)
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

/// A JSON array column of the key's row (its role names, its ancestors' ids).
fn list_from_json<T: serde::de::DeserializeOwned>(
    id: Uuid,
    column: &str,
    value: serde_json::Value,
) -> Result<Vec<T>, StoreError> {
    serde_json::from_value(value)
        .map_err(|e| StoreError::Corrupt(format!("key {id} {column}: {e}")))
}

fn digest_of(id: Uuid, bytes: Vec<u8>) -> Result<KeyDigest, StoreError> {
    bytes
        .try_into()
        .map(KeyDigest)
        .map_err(|_| StoreError::Corrupt(format!("key {id} digest")))
}

/// A key some write touches as a side effect: what its cache eviction and the write's
/// rules need to know.
pub(super) struct Touched {
    pub id: Uuid,
    pub digest: KeyDigest,
    pub live: bool,
}

/// The keys of this tenant matching `condition`, for a write that affects them all (a
/// forced delete of their workspace or of a scope they hold).
pub(super) async fn touched_keys(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    condition: sea_orm::Condition,
) -> Result<Vec<Touched>, StoreError> {
    let rows: Vec<(Uuid, Vec<u8>, Option<DateTime<Utc>>)> = api_key::Entity::find()
        .select_only()
        .columns([
            api_key::Column::Id,
            api_key::Column::KeyDigest,
            api_key::Column::RevokeTime,
        ])
        .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
        .filter(condition)
        .into_tuple()
        .all(conn)
        .await?;
    rows.into_iter()
        .map(|(id, digest, revoked)| {
            Ok(Touched {
                id,
                digest: digest_of(id, digest)?,
                live: revoked.is_none(),
            })
        })
        .collect()
}

/// Revokes this tenant's non-revoked keys matching `condition`; how many it revoked.
async fn revoke_where(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    condition: impl sea_orm::sea_query::IntoCondition,
) -> Result<u64, StoreError> {
    let now = db_now();
    Ok(api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokeTime, Expr::value(now))
        .col_expr(api_key::Column::UpdateTime, Expr::value(now))
        .col_expr(
            api_key::Column::Revision,
            Expr::col(api_key::Column::Revision).add(1),
        )
        .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
        .filter(condition)
        .filter(api_key::Column::RevokeTime.is_null())
        .exec(conn)
        .await?
        .rows_affected)
}

/// Revokes every key delegated from `id` (a key that is revoked or deleted takes its
/// subtree with it); the eviction of them all, with `digests`.
async fn revoke_descendants(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: Uuid,
    digests: Vec<KeyDigest>,
) -> Result<Eviction, StoreError> {
    let below = chain::descendants(conn, tenant, &[id]).await?;
    if !below.is_empty() {
        let ids: Vec<Uuid> = below.iter().map(|k| k.id).collect();
        revoke_where(conn, tenant, api_key::Column::Id.is_in(ids)).await?;
    }
    let mut digests = digests;
    digests.extend(below.into_iter().map(|k| k.digest));
    Ok(Eviction::keys(digests))
}

/// The stored allow-list of a new key: the one it asks for, or its workspace's default.
fn allow_list(
    asked: Option<&AllowedNetworks>,
    workspace: &workspace::Model,
) -> Result<serde_json::Value, StoreError> {
    Ok(match asked {
        Some(networks) => networks_to_json(networks),
        None => networks_to_json(&default_networks(workspace)?),
    })
}

/// A new key not minted by delegation (created or imported), as it is stored: its row, and
/// what is written beside it once the row is in.
struct NewKeyRow {
    model: api_key::Model,
    grants: Vec<(String, Option<Uuid>)>,
    held: Vec<roles::HeldRole>,
    credits: Option<usage::CreditLimit>,
}

impl NewKeyRow {
    /// Resolves `new` in `workspace` (its scopes, its roles, the workspace's lifetime policy
    /// and default allow-list) into the row of a key stored under `digest`.
    async fn resolve(
        txn: &DatabaseTransaction,
        tenant: TenantId,
        workspace: &workspace::Model,
        new: NewApiKey,
        prefix: String,
        digest: &KeyDigest,
        last_four: String,
    ) -> Result<Self, StoreError> {
        let grants = Store::resolve_grants(txn, tenant, workspace.id, &new.scopes).await?;
        let held = roles::resolve_roles(txn, tenant, workspace.id, &new.roles, "roles").await?;
        let now = db_now();
        let expire_time =
            KeyTtl::expiry(key_policy(workspace), new.expire_time, now, "expire_time")?;
        let id = Uuid::now_v7();
        let model = api_key::Model {
            id,
            tenant_id: tenant.as_uuid(),
            workspace_id: workspace.id,
            name: new.name,
            prefix,
            key_digest: digest.0.to_vec(),
            last_four,
            owner_id: new.owner_id,
            metadata: map_to_json(&new.metadata),
            expire_time,
            disabled: false,
            revoke_time: None,
            last_used_time: None,
            replaced_by: None,
            revision: 1,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
            rate_limits: limits_to_json(&new.rate_limits),
            // Its own credit account (rotation successors share their predecessor's).
            usage_id: Some(id),
            parent_id: None,
            delegation_depth: 0,
            ancestry: serde_json::json!([]),
            roles: roles::names_json(&held),
            allowed_cidrs: allow_list(new.allowed_cidrs.as_ref(), workspace)?,
        };
        Ok(Self {
            model,
            grants,
            held,
            credits: new.credits,
        })
    }

    /// Writes the key's grants, roles and credit account, after its row.
    async fn write_parts(
        &self,
        txn: &DatabaseTransaction,
        tenant: TenantId,
    ) -> Result<(), StoreError> {
        let id = self.model.id;
        insert_grants(txn, id, &self.grants).await?;
        roles::write_roles(txn, id, &self.held).await?;
        if let Some(credits) = self.credits {
            accounts::set_credits(txn, tenant, id, credits.remaining, credits.refill, true).await?;
        }
        Ok(())
    }
}

async fn find_key(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<ApiKey>, StoreError> {
    let found = api_key::Entity::by_id(tenant, id).one(conn).await?;
    Ok(with_scopes(conn, found.into_iter().collect()).await?.pop())
}

impl Store {
    /// Issues a key. Returns the secret only when this call created the key; a retry with
    /// the same request id returns the first key without it.
    pub async fn create_api_key(
        &self,
        acting: &Acting,
        new: NewApiKey,
    ) -> Result<(ApiKey, Option<ApiKeySecret>), StoreError> {
        let tenant = acting.tenant;
        if let Some(request_id) = new.request_id
            && let Some(existing) = self.api_key_by_request(tenant, request_id).await?
        {
            return Ok((existing, None));
        }
        let fields = new.fields();
        let txn = self.begin_write().await?;
        let workspace = require_workspace(&txn, tenant, new.workspace_id).await?;
        let prefix = match new.prefix.clone() {
            Some(p) => p,
            None => KeyPrefix::parse(&workspace.default_key_prefix)
                .ok_or_else(|| StoreError::Corrupt(format!("workspace {} prefix", workspace.id)))?,
        };
        let secret = ApiKeySecret::generate(&prefix)
            .map_err(|e| StoreError::Corrupt(format!("CSPRNG: {e}")))?;
        let row = NewKeyRow::resolve(
            &txn,
            tenant,
            &workspace,
            new,
            prefix.as_str().to_owned(),
            &secret.digest(),
            secret.last_four().to_owned(),
        )
        .await?;
        let model = row.model.clone();
        let txn = match self.insert_key(txn, tenant, model.clone()).await? {
            Inserted::Fresh(txn) => txn,
            Inserted::Existing(key) => return Ok((*key, None)),
        };
        row.write_parts(&txn, tenant).await?;
        let key = find_key(&txn, tenant, model.id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", model.id))?;
        // A verification of this secret may have been cached as unknown (negative entry).
        let change = Change::new(AuditAction::ApiKeyCreate, model.id, fields);
        self.commit(txn, acting, change, Eviction::key(secret.digest()))
            .await?;
        Ok((key, Some(secret)))
    }

    /// Inserts a new key's row; a concurrent create with the same request id may have won,
    /// and then its key is the answer.
    async fn insert_key(
        &self,
        txn: DatabaseTransaction,
        tenant: TenantId,
        model: api_key::Model,
    ) -> Result<Inserted, StoreError> {
        let request_id = model.request_id;
        let inserted = api_key::Entity::insert(api_key::ActiveModel::from(model))
            .exec_without_returning(&txn)
            .await;
        match (inserted, request_id) {
            (Ok(_), _) => Ok(Inserted::Fresh(txn)),
            (Err(e), Some(request_id)) if is_unique_violation(&e) => {
                drop(txn);
                let existing = self.api_key_by_request(tenant, request_id).await?;
                existing
                    .map(|k| Inserted::Existing(Box::new(k)))
                    .ok_or(StoreError::Database(e))
            }
            (Err(e), _) => Err(e.into()),
        }
    }

    async fn api_key_by_request(
        &self,
        tenant: TenantId,
        request_id: Uuid,
    ) -> Result<Option<ApiKey>, StoreError> {
        let found = api_key::Entity::by_request(tenant, request_id)
            .one(&self.db)
            .await?;
        Ok(with_scopes(&self.db, found.into_iter().collect())
            .await?
            .pop())
    }

    pub async fn get_api_key(&self, tenant: TenantId, id: Uuid) -> Result<ApiKey, StoreError> {
        find_key(&self.db, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))
    }

    pub async fn list_api_keys(
        &self,
        tenant: TenantId,
        filter: &ApiKeyFilter,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Page<ApiKey>, StoreError> {
        let mut query =
            api_key::Entity::find().filter(api_key::Column::TenantId.eq(tenant.as_uuid()));
        if let Some(ws) = filter.workspace_id {
            require_workspace(&self.db, tenant, ws).await?;
            query = query.filter(api_key::Column::WorkspaceId.eq(ws));
        }
        if let Some(owner) = &filter.owner_id {
            query = query.filter(api_key::Column::OwnerId.eq(owner.as_str()));
        }
        if let Some(parent) = filter.parent_id {
            query = query.filter(api_key::Column::ParentId.eq(parent));
        }
        if let Some(after) = after {
            query = query.filter(api_key::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(api_key::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        Ok(Page::from_rows(with_scopes(&self.db, rows).await?, limit))
    }

    /// Revokes a key and, in the same transaction, every key delegated from it; revoking a
    /// revoked key changes nothing.
    pub async fn revoke_api_key(&self, acting: &Acting, id: Uuid) -> Result<ApiKey, StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        let revoked = revoke_where(&txn, tenant, api_key::Column::Id.eq(id)).await?;
        let key = find_key(&txn, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))?;
        if revoked == 0 {
            // Already revoked (and its descendants with it): nothing to log or evict.
            return Ok(key);
        }
        let eviction = revoke_descendants(&txn, tenant, id, vec![key.digest]).await?;
        let change = Change::new(AuditAction::ApiKeyRevoke, id, vec!["revoke_time"]);
        self.commit(txn, acting, change, eviction).await?;
        Ok(key)
    }

    /// Replaces a key by a successor with a new secret; [`ApiKey::rotation`] decides whether
    /// it may and what becomes of the old key.
    pub async fn rotate_api_key(
        &self,
        acting: &Acting,
        id: Uuid,
        grace: GracePeriod,
    ) -> Result<Rotated, StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        let model = api_key::Entity::by_id(tenant, id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))?;
        let now = db_now();
        let old = with_scopes(&txn, vec![model.clone()]).await?.remove(0);
        let retirement = old.rotation(now, grace)?;
        let workspace = require_workspace(&txn, tenant, old.workspace_id).await?;
        // An imported key of another format has no prefix: its successor gets the
        // workspace's, like a new key.
        let prefix = match old.prefix.as_str() {
            "" => KeyPrefix::parse(&workspace.default_key_prefix),
            own => KeyPrefix::parse(own),
        }
        .ok_or_else(|| StoreError::Corrupt(format!("key {id} prefix")))?;
        let secret = ApiKeySecret::generate(&prefix)
            .map_err(|e| StoreError::Corrupt(format!("CSPRNG: {e}")))?;
        let successor_id = Uuid::now_v7();

        let retire = api_key::Entity::update_many()
            .col_expr(api_key::Column::ReplacedBy, Expr::value(successor_id))
            // Written out for keys that predate usage controls (NULL meant their own id),
            // so that the account's keys are found by this column alone.
            .col_expr(api_key::Column::UsageId, Expr::value(old.usage_id))
            .col_expr(api_key::Column::UpdateTime, Expr::value(now))
            .col_expr(
                api_key::Column::Revision,
                Expr::col(api_key::Column::Revision).add(1),
            );
        let (retire, retired_field) = match retirement {
            Retirement::RevokeNow => (
                retire.col_expr(api_key::Column::RevokeTime, Expr::value(now)),
                "revoke_time",
            ),
            Retirement::ExpireAt(until) => (
                retire.col_expr(api_key::Column::ExpireTime, Expr::value(until)),
                "expire_time",
            ),
        };
        // The compare-and-set on `replaced_by`: of concurrent rotations, one wins.
        let result = retire
            .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
            .filter(api_key::Column::Id.eq(id))
            .filter(api_key::Column::ReplacedBy.is_null())
            .filter(api_key::Column::RevokeTime.is_null())
            .exec(&txn)
            .await?;
        if result.rows_affected != 1 {
            return Err(RuleViolation::AlreadyRotated.into());
        }

        // The workspace's lifetime policy holds for the successor as for a new key.
        let policy = key_policy(&workspace);
        let successor = api_key::Model {
            id: successor_id,
            prefix: prefix.as_str().to_owned(),
            expire_time: KeyTtl::cut(policy, model.expire_time, now),
            key_digest: secret.digest().0.to_vec(),
            last_four: secret.last_four().to_owned(),
            revoke_time: None,
            last_used_time: None,
            replaced_by: None,
            revision: 1,
            request_id: None,
            create_time: now,
            update_time: now,
            // The same credit account and rate-limit counters: shared, not copied, so
            // nothing is counted twice (the limits' settings are copied with the row).
            usage_id: Some(old.usage_id),
            ..model
        };
        api_key::Entity::insert(api_key::ActiveModel::from(successor.clone()))
            .exec_without_returning(&txn)
            .await?;
        let grants: Vec<(String, Option<Uuid>)> = api_key_scope::Entity::find()
            .filter(api_key_scope::Column::ApiKeyId.eq(id))
            .all(&txn)
            .await?
            .into_iter()
            .map(|g| (g.scope, g.scope_id))
            .collect();
        insert_grants(&txn, successor_id, &grants).await?;
        delegation::hand_over(&txn, tenant, id, successor_id).await?;
        let key = find_key(&txn, tenant, successor.id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", successor.id))?;
        let change = Change::new(
            AuditAction::ApiKeyRotate,
            id,
            vec!["successor_id", retired_field],
        );
        // The children now hang from the successor: their standings name it.
        let digests = vec![old.digest, secret.digest()];
        let digests = chain::with_descendants(&txn, tenant, &[successor_id], digests).await?;
        self.commit(txn, acting, change, Eviction::keys(digests))
            .await?;
        Ok(Rotated { key, secret })
    }

    pub async fn delete_api_key(&self, acting: &Acting, id: Uuid) -> Result<(), StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        let key = api_key::Entity::by_id(tenant, id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))?;
        api_key::Entity::delete_many()
            .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
            .filter(api_key::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        accounts::drop_orphaned_account(&txn, tenant, usage::usage_id(key.id, key.usage_id))
            .await?;
        let digest = digest_of(key.id, key.key_digest)?;
        let eviction = revoke_descendants(&txn, tenant, id, vec![digest]).await?;
        let change = Change::new(AuditAction::ApiKeyDelete, id, Vec::new());
        self.commit(txn, acting, change, eviction).await
    }

    /// Adds `delta` to a key's remaining uses (removes, when negative; never below 0),
    /// atomically with respect to concurrent reservations: one statement on the account's
    /// row. A key without `remaining_uses` has nothing to add to.
    ///
    /// With a `request_id`, an adjustment applies once: a retry answers with the balance the
    /// first call left (see [`credit_requests`]).
    /// Adjusts a key's credits. The answer's balance is what no replica has reserved plus
    /// `held(key)`, what the answering replica holds; it is recorded with the request id, so
    /// that a retry answers exactly what the first call did, on whichever replica it lands.
    pub async fn adjust_api_key_credits(
        &self,
        acting: &Acting,
        id: Uuid,
        delta: CreditDelta,
        request_id: Option<Uuid>,
        held: impl Fn(&ApiKey) -> u64,
    ) -> Result<ApiKey, StoreError> {
        let tenant = acting.tenant;
        if let Some(request_id) = request_id
            && let Some(first) = self.first_adjustment(tenant, request_id, id, delta).await?
        {
            return Ok(first);
        }
        let txn = self.begin_write().await?;
        if let Some(request_id) = request_id {
            match credit_requests::claim(&txn, tenant, request_id, id, delta, db_now()).await {
                Ok(()) => {}
                // Another call holds the claim (it waited for that call to commit).
                Err(e) if is_unique_violation(&e) => {
                    drop(txn);
                    return self
                        .first_adjustment(tenant, request_id, id, delta)
                        .await?
                        .ok_or(StoreError::Database(e));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let key = find_key(&txn, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))?;
        // Also refused when the account was cleared since the read above.
        if key.credits.is_none()
            || !accounts::adjust_credits(&txn, tenant, key.usage_id, delta.get()).await?
        {
            return Err(RuleViolation::CreditsUnlimited.into());
        }
        // The key's etag moves with its remaining_uses, as with any other change.
        api_key::Entity::update_many()
            .col_expr(api_key::Column::UpdateTime, Expr::value(db_now()))
            .col_expr(
                api_key::Column::Revision,
                Expr::col(api_key::Column::Revision).add(1),
            )
            .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
            .filter(api_key::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        let mut key = find_key(&txn, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))?;
        let held = held(&key);
        if let Some(credits) = key.credits.as_mut() {
            credits.balance = Ord::min(credits.balance.saturating_add(held), usage::CREDITS_MAX);
            if let Some(request_id) = request_id {
                credit_requests::record(&txn, tenant, request_id, credits.balance).await?;
            }
        }
        // Every key of the account: a remembered refusal must yield to the new version.
        let eviction = family_eviction(&txn, tenant, key.usage_id).await?;
        let change = Change::new(AuditAction::ApiKeyAdjustCredits, id, vec!["remaining_uses"]);
        self.commit(txn, acting, change, eviction).await?;
        Ok(key)
    }

    /// The answer to a retried adjustment: the key as it is, with the balance the first call
    /// left. A request id reused for another key or delta is refused.
    async fn first_adjustment(
        &self,
        tenant: TenantId,
        request_id: Uuid,
        id: Uuid,
        delta: CreditDelta,
    ) -> Result<Option<ApiKey>, StoreError> {
        let Some(first) = credit_requests::earlier(&self.db, tenant, request_id).await? else {
            return Ok(None);
        };
        if first.api_key_id != id || first.delta != delta.get() {
            return Err(
                RuleViolation::Invalid(crate::domain::validate::ValidationError::single(
                    "request_id",
                    "was used for another adjustment",
                ))
                .into(),
            );
        }
        let mut key = self.get_api_key(tenant, id).await?;
        if let Some(credits) = key.credits.as_mut() {
            credits.balance = u64::try_from(first.remaining).unwrap_or(0);
        }
        Ok(Some(key))
    }

    /// The standing of the key with this digest, if the caller may see its tenant: one
    /// statement (see [`chain`]), the whole cost of a verification the cache cannot answer.
    pub async fn find_standing_by_digest(
        &self,
        access: TenantAccess,
        digest: &KeyDigest,
    ) -> Result<Option<Standing>, StoreError> {
        let tenant = match access {
            TenantAccess::One(tenant) => Some(tenant),
            TenantAccess::Any => None,
        };
        chain::standing_by_digest(&self.db, tenant, digest).await
    }
}

impl Stored for ApiKey {
    type Patch = ApiKeyPatch;
    type Table = api_key::Entity;
    const KIND: &'static str = "api key";
    const UPDATED: AuditAction = AuditAction::ApiKeyUpdate;

    async fn load(
        txn: &DatabaseTransaction,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<Self>, StoreError> {
        find_key(txn, tenant, id).await
    }

    fn eviction(&self) -> Eviction {
        Eviction::key(self.digest)
    }

    fn changes(&self) -> api_key::ActiveModel {
        api_key::ActiveModel {
            name: Set(self.name.clone()),
            roles: Set(serde_json::json!(self.roles)),
            allowed_cidrs: Set(networks_to_json(&self.allowed_cidrs)),
            owner_id: Set(self.owner_id.clone()),
            metadata: Set(map_to_json(&self.metadata)),
            expire_time: Set(self.expire_time),
            disabled: Set(self.disabled),
            revision: Set(self.revision),
            update_time: Set(self.update_time),
            rate_limits: Set(limits_to_json(&self.rate_limits)),
            // Written out for keys that predate usage controls (NULL meant their own id),
            // so that a credit account's keys are found, and joined, by this column alone.
            usage_id: Set(Some(self.usage_id)),
            ..Default::default()
        }
    }

    /// A new scope list replaces the key's grant rows; `remaining_uses` and `refill` go to
    /// the credit account, and the key is read back with it. A credit change evicts every
    /// key of the account (a rotated predecessor in its grace period draws from it too).
    async fn save_related(
        &mut self,
        txn: &DatabaseTransaction,
        tenant: TenantId,
        patch: &ApiKeyPatch,
    ) -> Result<Eviction, StoreError> {
        if let Some(scopes) = &patch.scopes {
            let grants = Store::resolve_grants(txn, tenant, self.workspace_id, scopes).await?;
            api_key_scope::Entity::delete_many()
                .filter(api_key_scope::Column::ApiKeyId.eq(self.id))
                .exec(txn)
                .await?;
            insert_grants(txn, self.id, &grants).await?;
        }
        if let Some(names) = &patch.roles {
            let held = roles::resolve_roles(txn, tenant, self.workspace_id, names, "api_key.roles")
                .await?;
            roles::write_roles(txn, self.id, &held).await?;
        }
        // `apply` left the account as read and checked the rules against it.
        let refill = self.credits.and_then(|c| c.refill);
        let change = patch
            .credits
            .apply(self.credits.is_some(), refill)
            .map_err(|e| {
                RuleViolation::Invalid(crate::domain::validate::ValidationError::single(
                    "api_key.refill",
                    e.to_string(),
                ))
            })?;
        let reschedule = patch.credits.refill.is_some();
        if !write_credit_change(txn, self, change, reschedule).await? {
            // The key's descendants hold its state in their standings.
            let digests =
                chain::with_descendants(txn, tenant, &[self.id], vec![self.digest]).await?;
            return Ok(Eviction::keys(digests));
        }
        self.credits = match load_credits(txn, &[self.usage_id])
            .await?
            .get(&self.usage_id)
        {
            Some(row) => credits_from_row(row)?,
            None => None,
        };
        let eviction = family_eviction(txn, tenant, self.usage_id).await?;
        Ok(eviction.and(Eviction::key(self.digest)))
    }
}
