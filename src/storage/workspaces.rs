//! Workspace repository.
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use super::entity::{api_key, workspace};
use super::{Store, StoreError, db_now, is_unique_violation, map_from_json, map_to_json};
use crate::domain::TenantId;
use crate::domain::records::{NewWorkspace, Workspace, WorkspacePatch};

/// One page of a keyset-paginated list; `more` says whether another page follows.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only proves there is more.
    pub fn from_rows(mut items: Vec<T>, limit: u64) -> Self {
        let more = items.len() as u64 > limit;
        items.truncate(limit as usize);
        Self { items, more }
    }
}

/// How often an update without an etag retries when a concurrent update won the race.
const UPDATE_ATTEMPTS: usize = 3;

/// One read-modify-write attempt: written, or lost to a concurrent update (its
/// compare-and-set on `revision` matched no row).
pub(super) enum Cas<T> {
    Written(T),
    Lost,
}

/// Runs `attempt` until its compare-and-set wins. With an etag a lost race means the etag
/// is stale; without one the update is retried on a fresh read, a few times.
pub(super) async fn until_written<T, Attempt>(
    expected_revision: Option<i64>,
    mut attempt: impl FnMut() -> Attempt,
) -> Result<T, StoreError>
where
    Attempt: Future<Output = Result<Cas<T>, StoreError>>,
{
    for _ in 0..UPDATE_ATTEMPTS {
        match attempt().await? {
            Cas::Written(value) => return Ok(value),
            Cas::Lost if expected_revision.is_some() => break,
            Cas::Lost => {}
        }
    }
    Err(StoreError::StaleEtag)
}

fn from_model(m: workspace::Model) -> Result<Workspace, StoreError> {
    Ok(Workspace {
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
        revision: m.revision,
        create_time: m.create_time,
        update_time: m.update_time,
    })
}

impl Store {
    pub async fn create_workspace(
        &self,
        tenant: TenantId,
        new: NewWorkspace,
    ) -> Result<Workspace, StoreError> {
        if let Some(request_id) = new.request_id
            && let Some(existing) = self.workspace_by_request(tenant, request_id).await?
        {
            return Ok(existing);
        }
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
            revision: 1,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
        };
        let active: workspace::ActiveModel = model.clone().into();
        match workspace::Entity::insert(active)
            .exec_without_returning(&self.db)
            .await
        {
            Ok(_) => from_model(model),
            // A concurrent retry with the same request id inserted first: return its result.
            Err(e) if is_unique_violation(&e) && new.request_id.is_some() => {
                let request_id = new.request_id.unwrap_or_default();
                self.workspace_by_request(tenant, request_id)
                    .await?
                    .ok_or(StoreError::Database(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn workspace_by_request(
        &self,
        tenant: TenantId,
        request_id: Uuid,
    ) -> Result<Option<Workspace>, StoreError> {
        workspace::Entity::find()
            .filter(workspace::Column::TenantId.eq(tenant.as_uuid()))
            .filter(workspace::Column::RequestId.eq(request_id))
            .one(&self.db)
            .await?
            .map(from_model)
            .transpose()
    }

    pub async fn get_workspace(&self, tenant: TenantId, id: Uuid) -> Result<Workspace, StoreError> {
        workspace::Entity::find()
            .filter(workspace::Column::TenantId.eq(tenant.as_uuid()))
            .filter(workspace::Column::Id.eq(id))
            .one(&self.db)
            .await?
            .map(from_model)
            .transpose()?
            .ok_or_else(|| StoreError::not_found("workspace", id))
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

    pub async fn update_workspace(
        &self,
        tenant: TenantId,
        id: Uuid,
        patch: WorkspacePatch,
        expected_revision: Option<i64>,
    ) -> Result<Workspace, StoreError> {
        let patch = &patch;
        until_written(expected_revision, move || async move {
            let mut current = self.get_workspace(tenant, id).await?;
            if expected_revision.is_some_and(|r| r != current.revision) {
                return Err(StoreError::StaleEtag);
            }
            let read_revision = current.revision;
            let p = patch.clone();
            if let Some(v) = p.name {
                current.name = v;
            }
            if let Some(v) = p.description {
                current.description = v;
            }
            if let Some(v) = p.company {
                current.company = v;
            }
            if let Some(v) = p.is_private {
                current.is_private = v;
            }
            if let Some(v) = p.is_personal {
                current.is_personal = v;
            }
            if let Some(v) = p.owner_id {
                current.owner_id = v;
            }
            if let Some(v) = p.default_key_prefix {
                current.default_key_prefix = v.as_str().to_owned();
            }
            if let Some(v) = p.labels {
                current.labels = v;
            }
            current.revision = read_revision + 1;
            current.update_time = db_now();
            let changes = workspace::ActiveModel {
                name: Set(current.name.clone()),
                description: Set(current.description.clone()),
                company: Set(current.company.clone()),
                is_private: Set(current.is_private),
                is_personal: Set(current.is_personal),
                owner_id: Set(current.owner_id.clone()),
                default_key_prefix: Set(current.default_key_prefix.clone()),
                labels: Set(map_to_json(&current.labels)),
                revision: Set(current.revision),
                update_time: Set(current.update_time),
                ..Default::default()
            };
            // Compare-and-set on the revision: of two concurrent updates only one can match.
            let result = workspace::Entity::update_many()
                .set(changes)
                .filter(workspace::Column::TenantId.eq(tenant.as_uuid()))
                .filter(workspace::Column::Id.eq(id))
                .filter(workspace::Column::Revision.eq(read_revision))
                .exec(&self.db)
                .await?;
            Ok(if result.rows_affected == 1 {
                Cas::Written(current)
            } else {
                Cas::Lost
            })
        })
        .await
    }

    /// Deletes a workspace with its scopes and keys, in one transaction. Returns how many
    /// non-revoked keys `force` took with it.
    pub async fn delete_workspace(
        &self,
        tenant: TenantId,
        id: Uuid,
        force: bool,
    ) -> Result<u64, StoreError> {
        let txn = self.begin_write().await?;
        let exists = workspace::Entity::find()
            .filter(workspace::Column::TenantId.eq(tenant.as_uuid()))
            .filter(workspace::Column::Id.eq(id))
            .count(&txn)
            .await?;
        if exists == 0 {
            return Err(StoreError::not_found("workspace", id));
        }
        let live_keys = api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
            .filter(api_key::Column::WorkspaceId.eq(id))
            .filter(api_key::Column::RevokeTime.is_null())
            .count(&txn)
            .await?;
        if live_keys > 0 && !force {
            return Err(StoreError::FailedPrecondition {
                reason: "WORKSPACE_HAS_KEYS",
                message: format!(
                    "the workspace holds {live_keys} non-revoked keys; revoke them or set force"
                ),
            });
        }
        // The keys go with the workspace (ON DELETE CASCADE): gone is stronger than revoked.
        workspace::Entity::delete_many()
            .filter(workspace::Column::TenantId.eq(tenant.as_uuid()))
            .filter(workspace::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(live_keys)
    }
}
