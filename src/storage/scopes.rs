//! Scope repository: custom scopes live in the database; built-in scopes are constants
//! listed in front of them.
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
    sea_query::{Expr, ExprTrait, Query},
};
use uuid::Uuid;

use super::api_keys::{touched_keys, with_descendants};
use super::entity::{TenantOwned, api_key, api_key_scope, role, role_scope, scope};
use super::invalidation::Eviction;
use super::roles::holders_eviction;
use super::update::Stored;
use super::workspaces::require_workspace;
use super::{Store, StoreError, db_now, is_unique_violation};
use crate::domain::TenantId;
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::page::Page;
use crate::domain::records::{NewScope, Scope, ScopePatch};
use crate::domain::scope::{BuiltinScope, ScopeString};

fn from_model(m: scope::Model) -> Result<Scope, StoreError> {
    let parsed = ScopeString::parse(&m.scope)
        .map_err(|e| StoreError::Corrupt(format!("scope {}: {e}", m.id)))?;
    Ok(Scope {
        id: m.id,
        tenant_id: Some(TenantId::new(m.tenant_id)),
        workspace_id: m.workspace_id,
        scope: parsed,
        name: m.name,
        description: m.description,
        category: m.category,
        builtin: false,
        revision: m.revision,
        create_time: m.create_time,
        update_time: m.update_time,
    })
}

/// A scope by id: a built-in one (the same for every tenant) or one of the tenant's own.
async fn find_scope(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<Scope>, StoreError> {
    if let Some(b) = BuiltinScope::from_id(id) {
        return Ok(Some(Scope::builtin(b)));
    }
    scope::Entity::by_id(tenant, id)
        .one(conn)
        .await?
        .map(from_model)
        .transpose()
}

/// The scopes a key or role of `workspace_id` may hold: tenant-wide ones and the
/// workspace's own; a tenant-wide role (`None`) only tenant-wide ones.
fn usable_in(workspace_id: Option<Uuid>) -> Condition {
    let tenant_wide = Condition::any().add(scope::Column::WorkspaceId.is_null());
    match workspace_id {
        Some(ws) => tenant_wide.add(scope::Column::WorkspaceId.eq(ws)),
        None => tenant_wide,
    }
}

impl Store {
    pub async fn create_scope(&self, acting: &Acting, new: NewScope) -> Result<Scope, StoreError> {
        let tenant = acting.tenant;
        if let Some(request_id) = new.request_id
            && let Some(existing) = self.scope_by_request(tenant, request_id).await?
        {
            return Ok(existing);
        }
        let txn = self.begin_write().await?;
        if let Some(ws) = new.workspace_id {
            require_workspace(&txn, tenant, ws).await?;
        }
        let fields = new.fields();
        let now = db_now();
        let model = scope::Model {
            id: Uuid::now_v7(),
            tenant_id: tenant.as_uuid(),
            workspace_id: new.workspace_id,
            resource: new.scope.resource().to_owned(),
            action: new.scope.action().to_owned(),
            scope: new.scope.as_str().to_owned(),
            name: new.name,
            description: new.description,
            category: new.category,
            revision: 1,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
        };
        let active: scope::ActiveModel = model.clone().into();
        match scope::Entity::insert(active)
            .exec_without_returning(&txn)
            .await
        {
            Ok(_) => {
                let change = Change::new(AuditAction::ScopeCreate, model.id, fields);
                self.commit(txn, acting, change, Eviction::None).await?;
                from_model(model)
            }
            Err(e) if is_unique_violation(&e) => {
                drop(txn);
                if let Some(request_id) = new.request_id
                    && let Some(existing) = self.scope_by_request(tenant, request_id).await?
                {
                    return Ok(existing);
                }
                Err(StoreError::AlreadyExists(format!(
                    "scope {} already exists",
                    new.scope
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn scope_by_request(
        &self,
        tenant: TenantId,
        request_id: Uuid,
    ) -> Result<Option<Scope>, StoreError> {
        scope::Entity::by_request(tenant, request_id)
            .one(&self.db)
            .await?
            .map(from_model)
            .transpose()
    }

    pub async fn get_scope(&self, tenant: TenantId, id: Uuid) -> Result<Scope, StoreError> {
        find_scope(&self.db, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("scope", id))
    }

    /// Built-in scopes first (their ids sort before every generated id), then custom
    /// scopes in creation order. With a workspace: only what a key there may hold.
    pub async fn list_scopes(
        &self,
        tenant: TenantId,
        workspace_id: Option<Uuid>,
        include_builtin: bool,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Page<Scope>, StoreError> {
        if let Some(ws) = workspace_id {
            require_workspace(&self.db, tenant, ws).await?;
        }
        let mut items: Vec<Scope> = if include_builtin {
            BuiltinScope::ALL
                .into_iter()
                .filter(|b| after.is_none_or(|a| b.id() > a))
                .map(Scope::builtin)
                .collect()
        } else {
            Vec::new()
        };
        let wanted = (limit + 1).saturating_sub(items.len() as u64);
        if wanted > 0 {
            let mut query =
                scope::Entity::find().filter(scope::Column::TenantId.eq(tenant.as_uuid()));
            if let Some(ws) = workspace_id {
                query = query.filter(usable_in(Some(ws)));
            }
            if let Some(after) = after {
                query = query.filter(scope::Column::Id.gt(after));
            }
            let rows = query
                .order_by_asc(scope::Column::Id)
                .limit(wanted)
                .all(&self.db)
                .await?;
            for row in rows {
                items.push(from_model(row)?);
            }
        }
        Ok(Page::from_rows(items, limit))
    }

    /// Deletes a custom scope. Refused while keys or roles hold it, unless forced: then it
    /// is taken from them. Returns how many keys lost it (only with `force`).
    pub async fn delete_scope(
        &self,
        acting: &Acting,
        id: Uuid,
        force: bool,
    ) -> Result<u64, StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        let found = find_scope(&txn, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("scope", id))?;
        let holding = Condition::all().add(
            api_key::Column::Id.in_subquery(
                Query::select()
                    .column(api_key_scope::Column::ApiKeyId)
                    .from(api_key_scope::Entity)
                    .and_where(api_key_scope::Column::ScopeId.eq(id))
                    .to_owned(),
            ),
        );
        let keys = touched_keys(&txn, tenant, holding.clone()).await?;
        let grants = keys.len() as u64;
        let roles: Vec<Uuid> = role_scope::Entity::find()
            .select_only()
            .column(role_scope::Column::RoleId)
            .filter(role_scope::Column::ScopeId.eq(id))
            .into_tuple()
            .all(&txn)
            .await?;
        found.ensure_deletable(grants + roles.len() as u64, force)?;
        if grants > 0 {
            // The keys' scope lists change, so their etags must too.
            api_key::Entity::update_many()
                .col_expr(
                    api_key::Column::Revision,
                    Expr::col(api_key::Column::Revision).add(1),
                )
                .col_expr(api_key::Column::UpdateTime, Expr::value(db_now()))
                .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
                .filter(holding)
                .exec(&txn)
                .await?;
        }
        // The keys delegated from them hold narrowed copies of their scopes.
        let ids: Vec<Uuid> = keys.iter().map(|k| k.id).collect();
        let digests = keys.into_iter().map(|k| k.digest).collect();
        // The roles' scope lists change too; so do their holders' effective scopes.
        let mut eviction = Eviction::keys(with_descendants(&txn, tenant, &ids, digests).await?);
        if !roles.is_empty() {
            role::Entity::update_many()
                .col_expr(
                    role::Column::Revision,
                    Expr::col(role::Column::Revision).add(1),
                )
                .col_expr(role::Column::UpdateTime, Expr::value(db_now()))
                .filter(role::Column::TenantId.eq(tenant.as_uuid()))
                .filter(role::Column::Id.is_in(roles.iter().copied()))
                .exec(&txn)
                .await?;
            eviction = eviction.and(holders_eviction(&txn, tenant, &roles).await?);
        }
        // Grants and the roles' entries go with the scope (ON DELETE CASCADE).
        scope::Entity::delete_many()
            .filter(scope::Column::TenantId.eq(tenant.as_uuid()))
            .filter(scope::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        let change = Change::new(AuditAction::ScopeDelete, id, Vec::new());
        self.commit(txn, acting, change, eviction).await?;
        Ok(grants)
    }

    /// Resolves the scopes requested for a key of `workspace_id` into grant rows
    /// ([`Store::resolve_scopes`]).
    pub(super) async fn resolve_grants(
        conn: &impl ConnectionTrait,
        tenant: TenantId,
        workspace_id: Uuid,
        wanted: &[ScopeString],
    ) -> Result<Vec<(String, Option<Uuid>)>, StoreError> {
        Self::resolve_scopes(conn, tenant, Some(workspace_id), wanted).await
    }

    /// Resolves the scopes requested for a key or role of `workspace_id` (`None`: a
    /// tenant-wide role) into rows naming them: built-ins have no scope row, custom scopes
    /// prefer the workspace's own over a tenant-wide one.
    pub(super) async fn resolve_scopes(
        conn: &impl ConnectionTrait,
        tenant: TenantId,
        workspace_id: Option<Uuid>,
        wanted: &[ScopeString],
    ) -> Result<Vec<(String, Option<Uuid>)>, StoreError> {
        let custom: Vec<&str> = wanted
            .iter()
            .filter(|s| BuiltinScope::parse(s.as_str()).is_none())
            .map(|s| s.as_str())
            .collect();
        let rows = if custom.is_empty() {
            Vec::new()
        } else {
            scope::Entity::find()
                .filter(scope::Column::TenantId.eq(tenant.as_uuid()))
                .filter(usable_in(workspace_id))
                .filter(scope::Column::Scope.is_in(custom))
                .all(conn)
                .await?
        };
        let mut grants = Vec::with_capacity(wanted.len());
        let mut unknown = Vec::new();
        for s in wanted {
            if BuiltinScope::parse(s.as_str()).is_some() {
                grants.push((s.to_string(), None));
                continue;
            }
            let best = rows
                .iter()
                .filter(|r| r.scope == s.as_str())
                .max_by_key(|r| r.workspace_id.is_some());
            match best {
                Some(row) => grants.push((s.to_string(), Some(row.id))),
                None => unknown.push(s.to_string()),
            }
        }
        if unknown.is_empty() {
            Ok(grants)
        } else {
            Err(StoreError::UnknownScopes(unknown))
        }
    }
}

impl Stored for Scope {
    type Patch = ScopePatch;
    type Table = scope::Entity;
    const KIND: &'static str = "scope";
    const UPDATED: AuditAction = AuditAction::ScopeUpdate;

    async fn load(
        txn: &DatabaseTransaction,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<Self>, StoreError> {
        find_scope(txn, tenant, id).await
    }

    fn changes(&self) -> scope::ActiveModel {
        scope::ActiveModel {
            name: Set(self.name.clone()),
            description: Set(self.description.clone()),
            category: Set(self.category.clone()),
            revision: Set(self.revision),
            update_time: Set(self.update_time),
            ..Default::default()
        }
    }
}
