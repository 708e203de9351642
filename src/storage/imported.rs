//! Whether this deployment holds imported keys (`ImportApiKeys`): only then can a presented
//! string that is not of keyplane's format be a key, and be worth a lookup. Every replica
//! must know it without a query per verification, so each keeps it in memory: read at
//! start, set by a local import, set on the other replicas by a notification the import
//! sends in its transaction, and read again whenever the feed reconnects (it may have
//! missed one). It never goes back to false: keys once imported may be imported again, and
//! a lookup too many costs only a cache entry.
use std::sync::atomic::{AtomicBool, Ordering};

use sea_orm::{
    ActiveValue::Set, ConnectionTrait, DatabaseTransaction, DbBackend, EntityTrait, Statement,
};

use super::StoreError;
use super::entity::setting;
use super::invalidation::CHANNEL;

/// The row of `settings` that says so (its presence is what counts).
const SETTING: &str = "imported_keys";
/// What an import sends on the invalidation channel. A release that does not know it reads
/// it as "evict everything": only slower.
pub const PAYLOAD: &str = "imported";

/// This replica's knowledge of it.
#[derive(Debug, Default)]
pub struct ImportedKeys(AtomicBool);

impl ImportedKeys {
    /// Whether non-keyplane strings are looked up. One relaxed load: nothing else is
    /// published through it (a string looked up a moment late is answered MALFORMED, as it
    /// would have been a moment earlier).
    pub fn held(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn set(&self) {
        if !self.0.swap(true, Ordering::Relaxed) {
            tracing::info!(
                "this deployment holds imported keys: strings of other formats are looked up"
            );
        }
    }

    /// Reads the stored flag (at start, and when the feed reconnects).
    pub async fn refresh(&self, conn: &impl ConnectionTrait) -> Result<(), StoreError> {
        if setting::Entity::find_by_id(SETTING.to_owned())
            .one(conn)
            .await?
            .is_some()
        {
            self.set();
        }
        Ok(())
    }
}

/// Records, in an import's transaction, that the deployment holds imported keys, and tells
/// the other replicas when it commits.
pub(super) async fn record(txn: &DatabaseTransaction) -> Result<(), StoreError> {
    let row = setting::ActiveModel {
        name: Set(SETTING.to_owned()),
        value: Set("true".to_owned()),
    };
    setting::Entity::insert(row)
        .on_conflict_do_nothing_on([setting::Column::Name])
        .exec_without_returning(txn)
        .await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        txn.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [CHANNEL.into(), PAYLOAD.into()],
        ))
        .await?;
    }
    Ok(())
}
