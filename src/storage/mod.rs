//! Storage: sea-orm entities and the repositories over them. Every repository method takes
//! the tenant it acts for, so a query without a tenant filter cannot be written by accident.
pub mod entity;

mod api_keys;
pub mod audit;
pub mod budgets;
pub mod database;
pub mod feed;
pub mod imported;
pub mod invalidation;
pub mod last_used;
mod roles;
pub mod schema;
mod scopes;
mod update;
mod workspaces;

use std::sync::Arc;

use sea_orm::{
    DatabaseConnection, DatabaseTransaction, DbErr, EntityTrait, RuntimeErr, SqlErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};

pub use api_keys::{ApiKeyFilter, Rotated};
pub use audit::{AuditFilter, ChainReport};
pub use database::connect;
pub use migration::{Migrator, sea_orm_migration::MigratorTrait};

use crate::domain::audit::{Acting, Change};
use crate::domain::rules::RuleViolation;
use invalidation::{Eviction, EvictionSink};

/// Why a storage call failed. Keeps the database error as the source for the logs; the
/// transport layer decides what the client sees.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("the etag does not match the current revision")]
    StaleEtag,
    /// A domain rule refused the change (decided inside the write's transaction).
    #[error(transparent)]
    Rule(#[from] RuleViolation),
    /// Scopes named on a key that do not exist for it.
    #[error("unknown scopes: {0:?}")]
    UnknownScopes(Vec<String>),
    #[error("database unavailable")]
    Unavailable(#[source] DbErr),
    /// The database did not answer in time, or is being let rest after failing to.
    #[error("the database does not answer: {0}")]
    NotAnswering(&'static str),
    /// The usage meter could not decide a charge (a reservation timed out, or kept being
    /// answered for an older window, ...): never an admission, answered as a database
    /// that cannot be reached is.
    #[error("usage could not be charged: {0}")]
    Metering(String),
    #[error("database error")]
    Database(#[source] DbErr),
    /// A stored value that the domain refuses: a bug or a hand-edited row.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        StoreError::NotFound {
            kind,
            id: id.to_string(),
        }
    }
}

impl From<DbErr> for StoreError {
    fn from(err: DbErr) -> Self {
        if is_unavailable(&err) {
            StoreError::Unavailable(err)
        } else {
            StoreError::Database(err)
        }
    }
}

/// Whether an error means "the database cannot be reached right now" (worth a retry by
/// the client) rather than a bug.
fn is_unavailable(err: &DbErr) -> bool {
    let runtime = match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => return true,
        DbErr::Exec(r) | DbErr::Query(r) => r,
        _ => return false,
    };
    let RuntimeErr::SqlxError(sqlx_err) = runtime else {
        return false;
    };
    match sqlx_err.as_ref() {
        sea_orm::sqlx::Error::Io(_)
        | sea_orm::sqlx::Error::PoolTimedOut
        | sea_orm::sqlx::Error::PoolClosed
        | sea_orm::sqlx::Error::WorkerCrashed
        | sea_orm::sqlx::Error::Tls(_)
        | sea_orm::sqlx::Error::Protocol(_) => true,
        sea_orm::sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // PostgreSQL: 08xxx connection exceptions, 57P0x shutdown / cannot connect now,
            // 25006 a read-only transaction (a primary demoted under us: a failover);
            // SQLite: 5 = SQLITE_BUSY, 6 = SQLITE_LOCKED, and their extended codes (the low
            // byte is the primary code: 517 is SQLITE_BUSY_SNAPSHOT). PostgreSQL's codes are
            // five characters, SQLite's numbers fewer digits.
            let sqlite_primary = (code.len() < 5)
                .then(|| code.parse::<u32>().ok())
                .flatten()
                .map(|c| c & 0xff);
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "25006"
                || matches!(sqlite_primary, Some(5 | 6))
        }),
        _ => false,
    }
}

/// Whether the error is a unique-constraint violation (a concurrent or repeated insert).
pub(crate) fn is_unique_violation(err: &DbErr) -> bool {
    matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// Claims a SQLite database for this process: SQLite is one process, and the verification
/// cache relies on it (another process's writes would never evict this one's entries). The
/// claim is an advisory lock on `<file>.lock`, held as long as the returned file is open.
/// `None` for PostgreSQL and in-memory databases.
pub fn claim_sqlite(url: &str) -> std::io::Result<Option<std::fs::File>> {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Ok(None);
    };
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path.starts_with(":memory:") {
        return Ok(None);
    }
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(format!("{path}.lock"))?;
    match lock.try_lock() {
        Ok(()) => Ok(Some(lock)),
        Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::other(format!(
            "another keyplane process serves {path}: one process per SQLite database \
             (run replicas on PostgreSQL)"
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// The handle every repository method hangs off.
#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    /// This replica's verification cache, told about every write that changes an answer.
    evictions: Option<Arc<dyn EvictionSink>>,
    /// Whether the deployment holds imported keys (shared by every clone).
    imported: Arc<imported::ImportedKeys>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(db: DatabaseConnection) -> Self {
        Self {
            db,
            evictions: None,
            imported: Arc::default(),
        }
    }

    /// This replica's knowledge of whether the deployment holds imported keys, for the
    /// verifier and the invalidation feed.
    pub fn imported_keys(&self) -> Arc<imported::ImportedKeys> {
        self.imported.clone()
    }

    /// Reads whether the deployment holds imported keys (at start).
    pub async fn refresh_imported_keys(&self) -> Result<(), StoreError> {
        self.imported.refresh(&self.db).await
    }

    /// Has every write that changes a verification answer evict it from `sink`.
    pub fn with_evictions(self, sink: Arc<dyn EvictionSink>) -> Self {
        Self {
            evictions: Some(sink),
            ..self
        }
    }

    /// The connection pool, for the invalidation feed's heartbeats.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Ends every write: its audit event joins the tenant's chain in the same transaction,
    /// and the eviction goes to the other replicas with the commit (NOTIFY in the
    /// transaction) and to this replica's cache before the caller can answer. This replica
    /// evicts even when the commit reports an error: the write may have landed, and
    /// evicting too much is only slower.
    pub(crate) async fn commit(
        &self,
        txn: DatabaseTransaction,
        acting: &Acting,
        change: Change,
        eviction: Eviction,
    ) -> Result<(), StoreError> {
        self.commit_all(txn, acting, std::slice::from_ref(&change), eviction)
            .await
    }

    /// [`Store::commit`] for a write that makes several changes (an import): one audit
    /// event each.
    pub(crate) async fn commit_all(
        &self,
        txn: DatabaseTransaction,
        acting: &Acting,
        changes: &[Change],
        eviction: Eviction,
    ) -> Result<(), StoreError> {
        audit::append_all(&txn, acting, changes).await?;
        invalidation::notify(&txn, &eviction).await?;
        let committed = txn.commit().await;
        if let Some(sink) = &self.evictions {
            sink.evict(&eviction);
        }
        committed.map_err(StoreError::from)
    }

    /// A transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`): upgrading a read transaction later fails at once with
    /// SQLITE_BUSY when another writer got there first, where waiting is what we want.
    pub(crate) async fn begin_write(&self) -> Result<DatabaseTransaction, DbErr> {
        self.db
            .begin_with_options(TransactionOptions {
                isolation_level: None,
                access_mode: None,
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            })
            .await
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.db.ping().await.map_err(StoreError::from)
    }

    /// A setting shared by every replica: the stored value, or `initial` stored first by
    /// whichever replica got there first.
    pub async fn shared_setting(&self, name: &str, initial: String) -> Result<String, StoreError> {
        use entity::setting;
        if let Some(row) = setting::Entity::find_by_id(name.to_owned())
            .one(&self.db)
            .await?
        {
            return Ok(row.value);
        }
        let row = setting::ActiveModel {
            name: sea_orm::Set(name.to_owned()),
            value: sea_orm::Set(initial),
        };
        setting::Entity::insert(row)
            .on_conflict_do_nothing_on([setting::Column::Name])
            .exec(&self.db)
            .await?;
        setting::Entity::find_by_id(name.to_owned())
            .one(&self.db)
            .await?
            .map(|row| row.value)
            .ok_or_else(|| StoreError::Corrupt(format!("setting {name} vanished")))
    }

    /// Whether other replicas may share this database (PostgreSQL); SQLite is one process.
    pub fn is_shared(&self) -> bool {
        self.db.get_database_backend() == sea_orm::DbBackend::Postgres
    }

    /// The database backend's name, for logs.
    pub fn backend(&self) -> &'static str {
        match self.db.get_database_backend() {
            sea_orm::DbBackend::Postgres => "postgres",
            sea_orm::DbBackend::Sqlite => "sqlite",
            _ => "other",
        }
    }
}

/// Parses a JSON string map column.
fn map_from_json(
    value: serde_json::Value,
) -> Result<std::collections::BTreeMap<String, String>, StoreError> {
    serde_json::from_value(value).map_err(|e| StoreError::Corrupt(format!("map column: {e}")))
}

fn map_to_json(map: &std::collections::BTreeMap<String, String>) -> serde_json::Value {
    serde_json::Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

/// An allow-list column (`["10.0.0.0/8", ...]`) of the row `owner`.
fn networks_from_json(
    owner: uuid::Uuid,
    value: serde_json::Value,
) -> Result<crate::domain::network::AllowedNetworks, StoreError> {
    let entries: Vec<String> = serde_json::from_value(value)
        .map_err(|e| StoreError::Corrupt(format!("{owner} allow-list: {e}")))?;
    crate::domain::network::AllowedNetworks::from_stored(&entries)
        .map_err(|e| StoreError::Corrupt(format!("{owner} allow-list: {e}")))
}

fn networks_to_json(networks: &crate::domain::network::AllowedNetworks) -> serde_json::Value {
    serde_json::json!(networks.to_strings())
}

fn db_now() -> chrono::DateTime<chrono::Utc> {
    // Microseconds: what PostgreSQL keeps, so a value read back equals the value written.
    let now = chrono::Utc::now();
    chrono::DurationRound::duration_trunc(now, chrono::TimeDelta::microseconds(1)).unwrap_or(now)
}
