//! Which migrations the database has applied, against the ones this release knows.
//!
//! During a rolling upgrade, replicas of two adjacent releases share one database, and the
//! newer one migrates it first. sea-orm-migration's `Migrator::up` (and its status) refuses
//! any applied migration it has no file for, so an older replica that restarts then would
//! fail to start. [`migrate_on_start`] looks first: a schema newer than this release is
//! served as it is (the newer release's migrations only add), and this release's own
//! pending migrations are applied otherwise.
use migration::Migrator;
use migration::sea_orm_migration::{MigratorTrait, SchemaManager, seaql_migrations};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityName, EntityTrait, QueryOrder,
    TransactionTrait,
};

/// PostgreSQL advisory lock taken while migrating ("keyplane" in ASCII): replicas that start
/// together migrate one after the other instead of racing on the same `CREATE TABLE`.
const MIGRATION_LOCK: i64 = 0x6b65_7970_6c61_6e65;

/// The database's migrations as this release sees them, each list in version order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchemaState {
    /// This release's migrations that the database has applied.
    pub applied: Vec<String>,
    /// This release's migrations that the database has not applied.
    pub pending: Vec<String>,
    /// Migrations the database has applied that this release does not know: a newer
    /// release applied them.
    pub newer: Vec<String>,
    /// The migrations [`migrate_on_start`] applied just now (also in `applied`).
    pub applied_now: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// A newer release migrated the database without this release's own migrations: the
    /// two are not releases of one line, and neither order of applying is known to be safe.
    #[error(
        "the database has {} migration(s) this release does not know ({}) but lacks {} of its own ({}): \
         it was migrated by a release that is not a successor of this one; not migrating",
        newer.len(), newer.join(", "), pending.len(), pending.join(", ")
    )]
    Diverged {
        newer: Vec<String>,
        pending: Vec<String>,
    },
    #[error(transparent)]
    Database(#[from] DbErr),
}

impl SchemaState {
    /// Sorts the recorded migrations into this release's applied and pending ones, and the
    /// ones only a newer release knows. `known` is in this release's order.
    pub fn classify(known: &[String], recorded: &[String]) -> Self {
        let (applied, pending) = known
            .iter()
            .cloned()
            .partition(|name| recorded.contains(name));
        let mut newer: Vec<String> = recorded
            .iter()
            .filter(|name| !known.contains(name))
            .cloned()
            .collect();
        newer.sort();
        Self {
            applied,
            pending,
            newer,
            applied_now: Vec::new(),
        }
    }

    /// Whether a newer release has migrated the database.
    pub fn is_newer(&self) -> bool {
        !self.newer.is_empty()
    }

    /// What `serve` logs when the schema is newer than this release.
    pub fn newer_warning(&self) -> String {
        format!(
            "database schema is newer than this release: {} migration(s) unknown ({}); \
             not migrating — expected during a rolling upgrade",
            self.newer.len(),
            self.newer.join(", ")
        )
    }

    /// `keyplane migrate status`: one line per migration, in version order.
    pub fn status_lines(&self) -> Vec<String> {
        let mut rows: Vec<(&String, String)> = self
            .applied
            .iter()
            .map(|name| (name, format!("applied  {name}")))
            .chain(
                self.pending
                    .iter()
                    .map(|name| (name, format!("pending  {name}"))),
            )
            .chain(self.newer.iter().map(|name| {
                (
                    name,
                    format!("newer    {name}  (applied by a newer release)"),
                )
            }))
            .collect();
        rows.sort();
        rows.into_iter().map(|(_, line)| line).collect()
    }

    /// Logs what `serve` found (and did) at start; `migrated` is false under `--no-migrate`.
    pub fn log_on_start(&self, migrated: bool) {
        if self.is_newer() {
            tracing::warn!(
                unknown = self.newer.len(),
                migrations = %self.newer.join(","),
                "{}",
                self.newer_warning()
            );
        }
        if !self.applied_now.is_empty() {
            tracing::info!(migrations = %self.applied_now.join(","), "migrations applied");
        }
        if !migrated && !self.pending.is_empty() {
            tracing::warn!(
                migrations = %self.pending.join(","),
                "{} migration(s) pending and --no-migrate is set: run `keyplane migrate up` \
                 before this release serves traffic",
                self.pending.len()
            );
        }
    }
}

/// The names of this release's migrations, in order.
fn known() -> Vec<String> {
    Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

/// Reads the applied migrations without creating anything: a database nothing has migrated
/// yet has applied none, and `--no-migrate` must not write.
pub async fn inspect(db: &DatabaseConnection) -> Result<SchemaState, DbErr> {
    let table = seaql_migrations::Entity.table_name();
    let recorded: Vec<String> = if SchemaManager::new(db).has_table(table).await? {
        seaql_migrations::Entity::find()
            .order_by_asc(seaql_migrations::Column::Version)
            .all(db)
            .await?
            .into_iter()
            .map(|row| row.version)
            .collect()
    } else {
        Vec::new()
    };
    Ok(SchemaState::classify(&known(), &recorded))
}

/// What `serve` (and `keyplane migrate up`) does at start: applies this release's pending
/// migrations, unless a newer release has already migrated the database; then it changes
/// nothing and reports the newer migrations (the caller warns). On PostgreSQL it holds an
/// advisory lock throughout, so replicas starting together take turns.
pub async fn migrate_on_start(db: &DatabaseConnection) -> Result<SchemaState, SchemaError> {
    let lock = if db.get_database_backend() == DbBackend::Postgres {
        // A transaction-scoped lock: released by the commit below, or by the rollback when
        // this future is dropped or the connection dies, so it can never outlive the call.
        let txn = db.begin().await?;
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            .await?;
        Some(txn)
    } else {
        None
    };
    let state = migrate_locked(db).await;
    if let Some(txn) = lock {
        txn.commit().await?;
    }
    state
}

async fn migrate_locked(db: &DatabaseConnection) -> Result<SchemaState, SchemaError> {
    let before = inspect(db).await?;
    if before.is_newer() {
        if before.pending.is_empty() {
            return Ok(before);
        }
        return Err(SchemaError::Diverged {
            newer: before.newer,
            pending: before.pending,
        });
    }
    if before.pending.is_empty() {
        return Ok(before);
    }
    Migrator::up(db, None).await?;
    let mut after = inspect(db).await?;
    after.applied_now = before
        .pending
        .into_iter()
        .filter(|name| after.applied.contains(name))
        .collect();
    Ok(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn classify_sorts_applied_pending_and_newer() {
        let known = names(&["m1", "m2", "m3"]);
        let fresh = SchemaState::classify(&known, &[]);
        assert_eq!(fresh.pending, known);
        assert!(fresh.applied.is_empty() && !fresh.is_newer());

        let behind = SchemaState::classify(&known, &names(&["m1"]));
        assert_eq!(behind.applied, names(&["m1"]));
        assert_eq!(behind.pending, names(&["m2", "m3"]));

        let ahead = SchemaState::classify(&known, &names(&["m1", "m2", "m3", "m5", "m4"]));
        assert_eq!(ahead.applied, known);
        assert!(ahead.pending.is_empty());
        assert_eq!(ahead.newer, names(&["m4", "m5"]));
        assert!(
            ahead
                .newer_warning()
                .contains("2 migration(s) unknown (m4, m5)")
        );
        assert_eq!(
            ahead.status_lines(),
            vec![
                "applied  m1",
                "applied  m2",
                "applied  m3",
                "newer    m4  (applied by a newer release)",
                "newer    m5  (applied by a newer release)",
            ]
        );
    }
}
