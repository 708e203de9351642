//! Writing delegated keys: minting a child within its parent (the rules are
//! `domain::delegation`'s), and handing a rotated key's children to its successor.
use chrono::Duration;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
    sea_query::Expr,
};
use uuid::Uuid;

use super::{Inserted, chain, find_key, insert_grants, roles};
use crate::domain::TenantId;
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::delegation::{self, NewDelegation};
use crate::domain::key::{ApiKeySecret, KeyPrefix};
use crate::domain::records::ApiKey;
use crate::domain::rules::RuleViolation;
use crate::storage::budgets::accounts;
use crate::storage::budgets::rows::limits_to_json;
use crate::storage::entity::{TenantOwned, api_key, api_key_ancestor, api_key_role};
use crate::storage::invalidation::Eviction;
use crate::storage::workspaces::{key_policy, require_workspace};
use crate::storage::{Store, StoreError, db_now, map_to_json};

impl Store {
    /// Mints a child of `parent_id` (the calling key) if the rules admit it: in the parent's
    /// tenant and workspace, with the parent's prefix, charged to the parent's budgets by
    /// verification, revoked with it. Returns the secret only when this call created the
    /// key; a retry with the same request id returns the first key without it.
    pub async fn delegate_api_key(
        &self,
        acting: &Acting,
        parent_id: Uuid,
        new: NewDelegation,
        max_ttl: Duration,
    ) -> Result<(ApiKey, Option<ApiKeySecret>), StoreError> {
        let tenant = acting.tenant;
        if let Some(request_id) = new.request_id
            && let Some(existing) = self.api_key_by_request(tenant, request_id).await?
        {
            return Ok((existing, None));
        }
        let fields = new.fields();
        let txn = self.begin_write().await?;
        let parent = find_key(&txn, tenant, parent_id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", parent_id))?;
        // Read in the transaction: a parent revoked since the call was authenticated mints
        // nothing.
        let parent = chain::standing_by_digest(&txn, Some(tenant), &parent.digest)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", parent_id))?;
        let now = db_now();
        if let Some(code) = parent.unusable(now) {
            return Err(RuleViolation::ParentUnusable(format!("{code:?}").to_lowercase()).into());
        }
        let workspace = parent.key.workspace_id;
        // The workspace's lifetime policy is a ceiling too.
        let policy = key_policy(&require_workspace(&txn, tenant, workspace).await?);
        let max_ttl = policy.map_or(max_ttl, |p| p.get().min(max_ttl));
        let held = roles::resolve_roles(&txn, tenant, workspace, &new.roles, "roles").await?;
        let role_scopes = roles::scopes_of(&txn, &held).await?;
        let child = delegation::admit(&parent, &new, &role_scopes, now, max_ttl)?;
        let scopes = child
            .scopes
            .iter()
            .map(|s| crate::domain::scope::ScopeString::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("delegated scope: {e}")))?;
        let grants = Self::resolve_grants(&txn, tenant, workspace, &scopes).await?;
        let prefix = KeyPrefix::parse(&parent.key.prefix)
            .ok_or_else(|| StoreError::Corrupt(format!("key {parent_id} prefix")))?;
        let secret = ApiKeySecret::generate(&prefix)
            .map_err(|e| StoreError::Corrupt(format!("CSPRNG: {e}")))?;
        let id = Uuid::now_v7();
        let model = api_key::Model {
            id,
            tenant_id: tenant.as_uuid(),
            workspace_id: workspace,
            name: new.name,
            prefix: prefix.as_str().to_owned(),
            key_digest: secret.digest().0.to_vec(),
            last_four: secret.last_four().to_owned(),
            owner_id: new.owner_id,
            metadata: map_to_json(&new.metadata),
            expire_time: Some(child.expire_time),
            disabled: false,
            revoke_time: None,
            last_used_time: None,
            replaced_by: None,
            revision: 1,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
            rate_limits: limits_to_json(&new.rate_limits),
            usage_id: Some(id),
            parent_id: Some(parent_id),
            delegation_depth: i16::from(child.depth),
            ancestry: serde_json::json!(child.ancestry),
            roles: roles::names_json(&held),
            allowed_cidrs: crate::storage::networks_to_json(&child.allowed_cidrs),
        };
        let txn = match self.insert_key(txn, tenant, model).await? {
            Inserted::Fresh(txn) => txn,
            Inserted::Existing(key) => return Ok((*key, None)),
        };
        insert_grants(&txn, id, &grants).await?;
        roles::write_roles(&txn, id, &held).await?;
        write_ancestors(&txn, id, &child.ancestry).await?;
        if let Some(credits) = new.credits {
            accounts::set_credits(&txn, tenant, id, credits.remaining, credits.refill, true)
                .await?;
        }
        let key = find_key(&txn, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("api key", id))?;
        let change = Change::new(AuditAction::ApiKeyDelegate, id, fields);
        // A verification of this secret may have been cached as unknown.
        self.commit(txn, acting, change, Eviction::key(secret.digest()))
            .await?;
        Ok((key, Some(secret)))
    }
}

async fn write_ancestors(
    conn: &impl ConnectionTrait,
    key: Uuid,
    ancestry: &[Uuid],
) -> Result<(), StoreError> {
    if ancestry.is_empty() {
        return Ok(());
    }
    let rows = ancestry.iter().map(|a| api_key_ancestor::ActiveModel {
        api_key_id: Set(key),
        ancestor_id: Set(*a),
    });
    api_key_ancestor::Entity::insert_many(rows)
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

/// A rotation's successor takes the old key's place in its tree: its own ancestors and
/// roles (its row copied the names), and the old key's children and their subtrees, whose
/// chains now name the successor.
pub(super) async fn hand_over(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    old: Uuid,
    successor: Uuid,
) -> Result<(), StoreError> {
    let own_ancestors: Vec<Uuid> = api_key_ancestor::Entity::find()
        .select_only()
        .column(api_key_ancestor::Column::AncestorId)
        .filter(api_key_ancestor::Column::ApiKeyId.eq(old))
        .into_tuple()
        .all(conn)
        .await?;
    write_ancestors(conn, successor, &own_ancestors).await?;
    let held: Vec<Uuid> = api_key_role::Entity::find()
        .select_only()
        .column(api_key_role::Column::RoleId)
        .filter(api_key_role::Column::ApiKeyId.eq(old))
        .into_tuple()
        .all(conn)
        .await?;
    if !held.is_empty() {
        let rows = held.into_iter().map(|role| api_key_role::ActiveModel {
            api_key_id: Set(successor),
            role_id: Set(role),
        });
        api_key_role::Entity::insert_many(rows)
            .exec_without_returning(conn)
            .await?;
    }

    let below = chain::descendants(conn, tenant, &[old]).await?;
    if below.is_empty() {
        return Ok(());
    }
    api_key::Entity::update_many()
        .col_expr(api_key::Column::ParentId, Expr::value(successor))
        .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
        .filter(api_key::Column::ParentId.eq(old))
        .exec(conn)
        .await?;
    api_key_ancestor::Entity::update_many()
        .col_expr(api_key_ancestor::Column::AncestorId, Expr::value(successor))
        .filter(api_key_ancestor::Column::AncestorId.eq(old))
        .exec(conn)
        .await?;
    // Each descendant's stored chain names the old key once; a handful of rows per
    // rotation, rewritten one by one (JSON has no portable in-place edit).
    for key in below {
        let Some(row) = api_key::Entity::by_id(tenant, key.id).one(conn).await? else {
            continue;
        };
        let ancestry: Vec<Uuid> = serde_json::from_value(row.ancestry)
            .map_err(|e| StoreError::Corrupt(format!("key {} ancestry: {e}", key.id)))?;
        let ancestry: Vec<Uuid> = ancestry
            .into_iter()
            .map(|a| if a == old { successor } else { a })
            .collect();
        api_key::Entity::update_many()
            .col_expr(
                api_key::Column::Ancestry,
                Expr::value(serde_json::json!(ancestry)),
            )
            .filter(api_key::Column::Id.eq(key.id))
            .exec(conn)
            .await?;
    }
    Ok(())
}
