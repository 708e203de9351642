//! Workspace repository.
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, EntityTrait,
    QueryFilter, QueryOrder, QuerySelect,
};
use uuid::Uuid;

use super::api_keys::touched_keys;
use super::entity::{TenantOwned, api_key, workspace};
use super::invalidation::Eviction;
use super::update::Stored;
use super::{
    Store, StoreError, db_now, is_unique_violation, map_from_json, map_to_json, networks_from_json,
    networks_to_json,
};
use crate::domain::TenantId;
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::network::AllowedNetworks;
use crate::domain::page::Page;
use crate::domain::records::{NewWorkspace, Workspace, WorkspacePatch};
use crate::domain::rules::KeyTtl;

/// Fails with NOT_FOUND unless the workspace exists for this tenant; scopes and keys that
/// name a workspace go through here.
pub(super) async fn require_workspace(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: Uuid,
) -> Result<workspace::Model, StoreError> {
    workspace::Entity::by_id(tenant, id)
        .one(conn)
        .await?
        .ok_or_else(|| StoreError::not_found("workspace", id))
}

/// The workspace's key lifetime policy, as stored.
pub(super) fn key_policy(w: &workspace::Model) -> Option<KeyTtl> {
    w.max_key_ttl_ms.and_then(KeyTtl::from_millis)
}

/// The allow-list of the workspace's keys created without one.
pub(super) fn default_networks(w: &workspace::Model) -> Result<AllowedNetworks, StoreError> {
    networks_from_json(w.id, w.default_allowed_cidrs.clone())
}

fn from_model(m: workspace::Model) -> Result<Workspace, StoreError> {
    Ok(Workspace {
        default_allowed_cidrs: default_networks(&m)?,
        id: m.id,
        tenant_id: TenantId::new(m.tenant_id),
        name: m.name,
        description: m.description,
        company: m.company,
        is_private: m.is_private,
        is_personal: m.is_personal,
        owner_id: m.owner_id,
        source: m.source,
        default_key_prefix: m.default_key_prefix,
        labels: map_from_json(m.labels)?,
        max_key_ttl: m.max_key_ttl_ms.and_then(KeyTtl::from_millis),
        revision: m.revision,
        create_time: m.create_time,
        update_time: m.update_time,
    })
}

impl Store {
    pub async fn create_workspace(
        &self,
        acting: &Acting,
        new: NewWorkspace,
    ) -> Result<Workspace, StoreError> {
        let tenant = acting.tenant;
        if let Some(request_id) = new.request_id
            && let Some(existing) = self.workspace_by_request(tenant, request_id).await?
        {
            return Ok(existing);
        }
        let fields = new.fields();
        let now = db_now();
        let model = workspace::Model {
            id: Uuid::now_v7(),
            tenant_id: tenant.as_uuid(),
            name: new.name,
            description: new.description,
            company: new.company,
            is_private: new.is_private,
            is_personal: new.is_personal,
            owner_id: new.owner_id,
            source: "api".to_owned(),
            default_key_prefix: new.default_key_prefix.as_str().to_owned(),
            labels: map_to_json(&new.labels),
            max_key_ttl_ms: new.max_key_ttl.map(KeyTtl::millis),
            default_allowed_cidrs: networks_to_json(&new.default_allowed_cidrs),
            revision: 1,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
        };
        let txn = self.begin_write().await?;
        let active: workspace::ActiveModel = model.clone().into();
        match workspace::Entity::insert(active)
            .exec_without_returning(&txn)
            .await
        {
            Ok(_) => {}
            // A concurrent retry with the same request id inserted first: return its result.
            Err(e) if is_unique_violation(&e) && new.request_id.is_some() => {
                drop(txn);
                let request_id = new.request_id.unwrap_or_default();
                return self
                    .workspace_by_request(tenant, request_id)
                    .await?
                    .ok_or(StoreError::Database(e));
            }
            Err(e) => return Err(e.into()),
        }
        let change = Change::new(AuditAction::WorkspaceCreate, model.id, fields);
        self.commit(txn, acting, change, Eviction::None).await?;
        from_model(model)
    }

    async fn workspace_by_request(
        &self,
        tenant: TenantId,
        request_id: Uuid,
    ) -> Result<Option<Workspace>, StoreError> {
        workspace::Entity::by_request(tenant, request_id)
            .one(&self.db)
            .await?
            .map(from_model)
            .transpose()
    }

    pub async fn get_workspace(&self, tenant: TenantId, id: Uuid) -> Result<Workspace, StoreError> {
        from_model(require_workspace(&self.db, tenant, id).await?)
    }

    pub async fn list_workspaces(
        &self,
        tenant: TenantId,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Page<Workspace>, StoreError> {
        let mut query =
            workspace::Entity::find().filter(workspace::Column::TenantId.eq(tenant.as_uuid()));
        if let Some(after) = after {
            query = query.filter(workspace::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(workspace::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let items = rows.into_iter().map(from_model).collect::<Result<_, _>>()?;
        Ok(Page::from_rows(items, limit))
    }

    /// Deletes a workspace with its scopes and keys, in one transaction. Returns how many
    /// non-revoked keys `force` took with it.
    pub async fn delete_workspace(
        &self,
        acting: &Acting,
        id: Uuid,
        force: bool,
    ) -> Result<u64, StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        require_workspace(&txn, tenant, id).await?;
        let keys = touched_keys(
            &txn,
            tenant,
            Condition::all().add(api_key::Column::WorkspaceId.eq(id)),
        )
        .await?;
        let live_keys = keys.iter().filter(|k| k.live).count() as u64;
        Workspace::ensure_deletable(live_keys, force)?;
        // The keys go with the workspace (ON DELETE CASCADE): gone is stronger than revoked.
        workspace::Entity::delete_many()
            .filter(workspace::Column::TenantId.eq(tenant.as_uuid()))
            .filter(workspace::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        if !keys.is_empty() {
            super::budgets::accounts::drop_orphaned_accounts(&txn, tenant).await?;
        }
        let eviction = Eviction::keys(keys.into_iter().map(|k| k.digest).collect());
        let change = Change::new(AuditAction::WorkspaceDelete, id, Vec::new());
        self.commit(txn, acting, change, eviction).await?;
        Ok(live_keys)
    }
}

impl Stored for Workspace {
    type Patch = WorkspacePatch;
    type Table = workspace::Entity;
    const KIND: &'static str = "workspace";
    const UPDATED: AuditAction = AuditAction::WorkspaceUpdate;

    async fn load(
        txn: &DatabaseTransaction,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<Self>, StoreError> {
        workspace::Entity::by_id(tenant, id)
            .one(txn)
            .await?
            .map(from_model)
            .transpose()
    }

    fn changes(&self) -> workspace::ActiveModel {
        workspace::ActiveModel {
            name: Set(self.name.clone()),
            description: Set(self.description.clone()),
            company: Set(self.company.clone()),
            is_private: Set(self.is_private),
            is_personal: Set(self.is_personal),
            owner_id: Set(self.owner_id.clone()),
            default_key_prefix: Set(self.default_key_prefix.clone()),
            labels: Set(map_to_json(&self.labels)),
            max_key_ttl_ms: Set(self.max_key_ttl.map(KeyTtl::millis)),
            default_allowed_cidrs: Set(networks_to_json(&self.default_allowed_cidrs)),
            revision: Set(self.revision),
            update_time: Set(self.update_time),
            ..Default::default()
        }
    }
}
