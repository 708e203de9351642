//! The one write path of every update: read the current state inside a write
//! transaction, let the domain apply the patch (and its rules), check the client's etag,
//! and write with a compare-and-set on the revision. Anything that must happen with every
//! update belongs in [`Store::update`]; what must happen with every write (the cache
//! eviction, the audit event) belongs in [`Store::commit`], which ends them all.
use std::future::Future;

use sea_orm::{ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter};
use uuid::Uuid;

use super::entity::TenantOwned;
use super::invalidation::Eviction;
use super::{Store, StoreError, db_now};
use crate::domain::TenantId;
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::update::{Patch, Revisioned, Update};

/// How often an update without an etag retries when a concurrent update won the race.
const UPDATE_ATTEMPTS: usize = 3;

/// A resource the update path can read and write.
pub trait Stored: Revisioned + Send + Sync + Sized {
    /// The patch that changes it.
    type Patch: Patch<Target = Self> + Sync;
    /// Its table.
    type Table: TenantOwned<ActiveModel: Send>;
    /// Its name in NOT_FOUND errors.
    const KIND: &'static str;
    /// What the audit log calls an update of it.
    const UPDATED: AuditAction;

    /// The current state, read inside the update's transaction.
    fn load(
        txn: &DatabaseTransaction,
        tenant: TenantId,
        id: Uuid,
    ) -> impl Future<Output = Result<Option<Self>, StoreError>> + Send;

    /// The row's columns an update may change, revision and update time included.
    fn changes(&self) -> <Self::Table as EntityTrait>::ActiveModel;

    /// The cached verification answers an update of it makes stale; none by default.
    fn eviction(&self) -> Eviction {
        Eviction::None
    }

    /// Writes that go with the row's, in the same transaction (a key's grants, its credit
    /// account), which may complete the record from what they wrote. Returns what the
    /// update evicts: [`Stored::eviction`] unless the related writes reach further.
    fn save_related(
        &mut self,
        _txn: &DatabaseTransaction,
        _tenant: TenantId,
        _patch: &Self::Patch,
    ) -> impl Future<Output = Result<Eviction, StoreError>> + Send {
        let eviction = self.eviction();
        async move { Ok(eviction) }
    }
}

/// Writes the patched state unless the row has moved past `read_revision`. Returns
/// whether it wrote; `false` means a concurrent update won the compare-and-set.
async fn compare_and_set<R: Stored>(
    txn: &DatabaseTransaction,
    tenant: TenantId,
    current: &R,
    read_revision: i64,
) -> Result<bool, StoreError> {
    let result = R::Table::update_many()
        .set(current.changes())
        .filter(R::Table::TENANT_ID.eq(tenant.as_uuid()))
        .filter(R::Table::ID.eq(current.id()))
        .filter(R::Table::REVISION.eq(read_revision))
        .exec(txn)
        .await?;
    Ok(result.rows_affected == 1)
}

impl Store {
    /// Applies an update. With an etag, losing the race means the etag is stale; without
    /// one the update is retried on a fresh read, a few times.
    pub async fn update<P>(
        &self,
        acting: &Acting,
        update: Update<P>,
    ) -> Result<P::Target, StoreError>
    where
        P: Patch + Sync,
        P::Target: Stored<Patch = P>,
    {
        let tenant = acting.tenant;
        for _ in 0..UPDATE_ATTEMPTS {
            let txn = self.begin_write().await?;
            let mut current = P::Target::load(&txn, tenant, update.id)
                .await?
                .ok_or_else(|| StoreError::not_found(P::Target::KIND, update.id))?;
            update.patch.apply(&mut current)?;
            let read_revision = current.revision();
            if update.expected_revision.is_some_and(|r| r != read_revision) {
                return Err(StoreError::StaleEtag);
            }
            current.touch(db_now());
            if compare_and_set(&txn, tenant, &current, read_revision).await? {
                let eviction = current.save_related(&txn, tenant, &update.patch).await?;
                let change = Change::new(P::Target::UPDATED, current.id(), update.patch.fields());
                self.commit(txn, acting, change, eviction).await?;
                return Ok(current);
            }
            if update.expected_revision.is_some() {
                break;
            }
        }
        Err(StoreError::StaleEtag)
    }
}
