//! Importing keys of another system: each is inserted under the digest it already has, in
//! one transaction for the call, item by item, so that an item refused by a rule (an
//! unknown scope, an expiry beyond the workspace's policy, a digest already held) leaves
//! the others to be created.
use std::collections::{HashMap, HashSet};

use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, EntityTrait, QueryFilter, QuerySelect,
    TryInsertResult,
};
use uuid::Uuid;

use super::{NewKeyRow, with_scopes};
use crate::domain::TenantId;
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::import::ImportedKey;
use crate::domain::key::KeyDigest;
use crate::domain::records::ApiKey;
use crate::storage::entity::{api_key, workspace};
use crate::storage::imported;
use crate::storage::invalidation::Eviction;
use crate::storage::workspaces::require_workspace;
use crate::storage::{Store, StoreError};

/// Digests per `IN (...)` lookup: well within every backend's bound on parameters.
const DIGESTS_PER_QUERY: usize = 500;

/// The answer for a digest keyplane holds already. The same whichever tenant holds it, so
/// that it tells nothing about the others.
fn already_held() -> StoreError {
    StoreError::AlreadyExists("a key with this digest exists already".into())
}

/// Whether an item's error is that item's alone (the others go on); any other error ends
/// the call.
fn refuses_item(err: &StoreError) -> bool {
    matches!(err, StoreError::UnknownScopes(_) | StoreError::Rule(_))
}

/// Which of these digests some key has, in any tenant: digests are unique across the
/// deployment, so this one query deliberately takes no tenant.
async fn held_digests(
    conn: &impl ConnectionTrait,
    items: &[ImportedKey],
) -> Result<HashSet<Vec<u8>>, StoreError> {
    let mut held = HashSet::new();
    for chunk in items.chunks(DIGESTS_PER_QUERY) {
        let wanted: Vec<Vec<u8>> = chunk.iter().map(|k| k.digest.0.to_vec()).collect();
        let found: Vec<Vec<u8>> = api_key::Entity::find()
            .select_only()
            .column(api_key::Column::KeyDigest)
            .filter(api_key::Column::KeyDigest.is_in(wanted))
            .into_tuple()
            .all(conn)
            .await?;
        held.extend(found);
    }
    Ok(held)
}

impl Store {
    /// Imports keys into a workspace of the caller's tenant; what became of each, in order.
    /// A database failure or a missing workspace fails the whole call and creates nothing.
    pub async fn import_api_keys(
        &self,
        acting: &Acting,
        workspace_id: Uuid,
        items: Vec<ImportedKey>,
    ) -> Result<Vec<Result<ApiKey, StoreError>>, StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        let workspace = require_workspace(&txn, tenant, workspace_id).await?;
        let held = held_digests(&txn, &items).await?;
        let mut seen: HashSet<KeyDigest> = HashSet::with_capacity(items.len());
        // Per item: the id of the key it created, or its error.
        let mut outcomes: Vec<Result<Uuid, StoreError>> = Vec::with_capacity(items.len());
        let mut changes = Vec::new();
        let mut digests = Vec::new();
        for item in items {
            // A digest earlier in the same call is held by then, as a retry would find it.
            if held.contains(item.digest.0.as_slice()) || !seen.insert(item.digest) {
                outcomes.push(Err(already_held()));
                continue;
            }
            let digest = item.digest;
            let fields: Vec<&'static str> = item
                .key
                .fields()
                .into_iter()
                .filter(|f| *f != "prefix")
                .collect();
            match insert_imported(&txn, tenant, &workspace, item).await {
                Ok(Some(id)) => {
                    changes.push(Change::new(AuditAction::ApiKeyImport, id, fields));
                    digests.push(digest);
                    outcomes.push(Ok(id));
                }
                // A concurrent import of the same digest got there first.
                Ok(None) => outcomes.push(Err(already_held())),
                Err(e) if refuses_item(&e) => outcomes.push(Err(e)),
                Err(e) => return Err(e),
            }
        }
        let mut created = HashMap::new();
        // Nothing created: the transaction only read, and ends with nothing to record.
        if !changes.is_empty() {
            let ids = outcomes
                .iter()
                .filter_map(|o| o.as_ref().ok().copied())
                .collect();
            created = load_keys(&txn, tenant, ids).await?;
            imported::record(&txn).await?;
            // A verification of one of these digests may have been cached as unknown.
            self.commit_all(txn, acting, &changes, Eviction::keys(digests))
                .await?;
            self.imported.set();
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.and_then(|id| {
                    created
                        .remove(&id)
                        .ok_or_else(|| StoreError::not_found("api key", id))
                })
            })
            .collect())
    }
}

/// Inserts one imported key with its grants, roles and credits; `None` when its digest was
/// taken meanwhile (by a concurrent import or create).
async fn insert_imported(
    txn: &DatabaseTransaction,
    tenant: TenantId,
    workspace: &workspace::Model,
    item: ImportedKey,
) -> Result<Option<Uuid>, StoreError> {
    let row = NewKeyRow::resolve(
        txn,
        tenant,
        workspace,
        item.key,
        item.prefix,
        &item.digest,
        item.last_four,
    )
    .await?;
    // Not an error on a taken digest: on PostgreSQL that would end the whole transaction.
    let inserted = api_key::Entity::insert(api_key::ActiveModel::from(row.model.clone()))
        .on_conflict_do_nothing_on([api_key::Column::KeyDigest])
        .exec_without_returning(txn)
        .await?;
    if !matches!(inserted, TryInsertResult::Inserted(n) if n > 0) {
        return Ok(None);
    }
    row.write_parts(txn, tenant).await?;
    Ok(Some(row.model.id))
}

/// The created keys, read back with their grants and credits in a few queries.
async fn load_keys(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    ids: Vec<Uuid>,
) -> Result<HashMap<Uuid, ApiKey>, StoreError> {
    let mut keys = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(DIGESTS_PER_QUERY) {
        let rows = api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
            .filter(api_key::Column::Id.is_in(chunk.iter().copied()))
            .all(conn)
            .await?;
        keys.extend(
            with_scopes(conn, rows)
                .await?
                .into_iter()
                .map(|k| (k.id, k)),
        );
    }
    Ok(keys)
}
