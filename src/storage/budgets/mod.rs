//! The usage-control statements (`docs/usage-controls.md`, "Storage" and "Reservations"),
//! by job: `leases` takes credits and rate-limit units and gives them back, `accounts`
//! holds the API's writes to a credit account, and `rows` reads and writes the columns
//! keys carry. Raw SQL per backend: the `CASE` expressions do not map onto sea-query's
//! builder usefully, and each must stay **one atomic statement** — concurrent
//! reservations, give-backs and adjustments serialise on the row (PostgreSQL re-evaluates
//! `SET` on the newest row version under READ COMMITTED; SQLite has one writer), so none
//! is lost.
//!
//! `NOW` is the database clock in milliseconds, one value per statement, so every replica
//! agrees on windows and refills whatever its own clock says.
pub(super) mod accounts;
pub mod leases;
pub(super) mod rows;

use sea_orm::{DbBackend, Statement, Value};

/// The database clock in milliseconds, for the backend's dialect.
fn now(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => "floor(extract(epoch FROM statement_timestamp()) * 1000)::bigint",
        // unixepoch('subsec') needs SQLite 3.42; the bundled one is newer. SQLite keeps
        // 'now' fixed for the whole statement.
        _ => "CAST(unixepoch('subsec') * 1000 AS INTEGER)",
    }
}

/// Writes a statement template in the backend's dialect: `{NOW}`, and `LEAST` /
/// `GREATEST` as SQLite's multi-argument `MIN` / `MAX`. `$n` parameters work on both.
fn dialect(backend: DbBackend, template: &str) -> String {
    let sql = template.replace("{NOW}", now(backend));
    match backend {
        DbBackend::Postgres => sql,
        _ => sql.replace("LEAST(", "MIN(").replace("GREATEST(", "MAX("),
    }
}

fn statement(backend: DbBackend, template: &str, values: Vec<Value>) -> Statement {
    Statement::from_sql_and_values(backend, dialect(backend, template), values)
}

fn int(n: u64) -> Value {
    Value::BigInt(Some(i64::try_from(n).unwrap_or(i64::MAX)))
}

/// The pieces of the credit statements, written out in place of their letters (see the
/// design): `D` a refill is due, `B` the balance after it, `N` the refill after it.
const DUE: &str = "(c.next_refill_ms IS NOT NULL AND c.next_refill_ms <= {NOW})";
const BALANCE: &str = "(CASE WHEN {D} THEN c.refill_amount ELSE c.balance END)";
const NEXT: &str = "(c.next_refill_ms + (({NOW} - c.next_refill_ms) / c.refill_interval_ms + 1) * c.refill_interval_ms)";

fn credit_template(template: &str) -> String {
    template
        .replace("{B}", BALANCE)
        .replace("{N}", NEXT)
        .replace("{D}", DUE)
}

#[cfg(test)]
pub(crate) mod tests {
    use sea_orm::{ConnectionTrait, EntityTrait};
    use uuid::Uuid;

    use crate::domain::TenantId;
    use crate::storage::entity::usage_credit;
    use crate::storage::{Migrator, MigratorTrait, Store, connect};

    /// A store on a migrated database: a temporary SQLite file, or a fresh PostgreSQL
    /// database when `KEYPLANE_TEST_POSTGRES_URL` is set and `postgres` is asked for.
    pub(crate) async fn store(postgres: bool) -> Option<(Store, Option<tempfile::TempDir>)> {
        let (db, dir) = if postgres {
            let admin_url = std::env::var("KEYPLANE_TEST_POSTGRES_URL")
                .ok()
                .filter(|u| !u.is_empty())?;
            let admin = connect(&admin_url).await.unwrap();
            // kp_test_: CI drops leftover test databases by that prefix.
            let name = format!("kp_test_unit_{}", Uuid::now_v7().simple());
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await
                .unwrap();
            let _ = admin.close().await;
            let base = admin_url.split('?').next().unwrap();
            let base = &base[..base.rfind('/').unwrap()];
            (connect(&format!("{base}/{name}")).await.unwrap(), None)
        } else {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/keyplane.db?mode=rwc", dir.path().display());
            (connect(&url).await.unwrap(), Some(dir))
        };
        Migrator::up(&db, None).await.unwrap();
        Some((Store::new(db), dir))
    }

    /// Gives an account a balance, as `UpdateApiKey` setting `remaining_uses` does.
    pub(crate) async fn credit_account(
        store: &Store,
        tenant: TenantId,
        account: Uuid,
        balance: u64,
    ) {
        super::accounts::set_credits(store.connection(), tenant, account, balance, None, true)
            .await
            .unwrap();
    }

    /// An account's stored balance (`None`: unlimited).
    pub(crate) async fn balance(store: &Store, account: Uuid) -> Option<i64> {
        usage_credit::Entity::find_by_id(account)
            .one(store.connection())
            .await
            .unwrap()
            .unwrap()
            .balance
    }

    /// A test run once per backend: `$name(postgres)` as `$name::sqlite` and
    /// `$name::postgres`.
    macro_rules! on_both {
        ($($name:ident),+) => {$(
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    super::$name(false).await
                }

                #[tokio::test]
                async fn postgres() {
                    super::$name(true).await
                }
            }
        )+};
    }

    pub(crate) use on_both;
}
