//! The usage-control statements (`docs/usage-controls.md`, "Storage" and "Reservations"):
//! taking credits and rate-limit units, giving them back, and the API's writes to a credit
//! account. Raw SQL per backend: the `CASE` expressions do not map onto sea-query's builder
//! usefully, and each must stay **one atomic statement** — concurrent reservations,
//! give-backs and adjustments serialise on the row (PostgreSQL re-evaluates `SET` on the
//! newest row version under READ COMMITTED; SQLite has one writer), so none is lost.
//!
//! `NOW` is the database clock in milliseconds, one value per statement, so every replica
//! agrees on windows and refills whatever its own clock says.
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;
use super::entity::usage_credit;
use crate::domain::TenantId;
use crate::domain::usage::{
    CREDITS_MAX, CreditRow, Credits, Period, RateLimit, RateLimitName, RateLimits, RateRow, Refill,
};

/// A rate limit as the `api_keys.rate_limits` JSON column holds it.
#[derive(Serialize, Deserialize)]
struct StoredLimit {
    name: String,
    limit: u64,
    period_ms: i64,
    shared_by_owner: bool,
}

pub(super) fn limits_to_json(limits: &RateLimits) -> serde_json::Value {
    let stored: Vec<StoredLimit> = limits
        .iter()
        .map(|l| StoredLimit {
            name: l.name().as_str().to_owned(),
            limit: l.limit(),
            period_ms: l.period().as_millis(),
            shared_by_owner: l.shared_by_owner(),
        })
        .collect();
    serde_json::to_value(stored).unwrap_or_else(|_| serde_json::Value::Array(Vec::new()))
}

pub(super) fn limits_from_json(
    key: Uuid,
    value: serde_json::Value,
) -> Result<RateLimits, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("key {key} rate_limits: {what}"));
    // A row written by a release without usage controls has the column's default, `[]`;
    // a NULL (hand-edited) means none too.
    if value.is_null() {
        return Ok(RateLimits::default());
    }
    let stored: Vec<StoredLimit> =
        serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
    let limits = stored
        .into_iter()
        .map(|s| {
            let name = RateLimitName::parse(&s.name).map_err(|e| corrupt(e.to_string()))?;
            let period = Period::rate_limit_ms(s.period_ms).map_err(|e| corrupt(e.to_string()))?;
            RateLimit::new(name, s.limit, period, s.shared_by_owner)
                .map_err(|e| corrupt(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    RateLimits::new(limits).map_err(|e| corrupt(e.to_string()))
}

/// The account as a key shows it; `None` when the account is unlimited (a NULL balance).
pub(super) fn credits_from_row(row: &usage_credit::Model) -> Result<Option<Credits>, StoreError> {
    let Some(balance) = row.balance else {
        return Ok(None);
    };
    let corrupt =
        |what: &str| StoreError::Corrupt(format!("credit account {}: {what}", row.account_id));
    let count = |n: i64, what: &str| u64::try_from(n).map_err(|_| corrupt(what));
    let refill = match (row.refill_amount, row.refill_interval_ms) {
        (Some(amount), Some(interval)) => Some(
            Period::refill_interval_ms(interval)
                .and_then(|i| Refill::new(count(amount, "refill_amount").unwrap_or(0), i))
                .map_err(|_| corrupt("refill"))?,
        ),
        _ => None,
    };
    Ok(Some(Credits {
        balance: count(balance, "balance")?,
        refill,
        epoch: count(row.epoch, "epoch")?,
        version: count(row.version, "version")?,
        next_refill_ms: row.next_refill_ms.filter(|_| refill.is_some()),
    }))
}

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

/// Takes up to `want` (at least `need`) credits from an account; `None` when the account
/// is unlimited now (no row, or a NULL balance).
pub async fn take_credits(
    conn: &impl ConnectionTrait,
    account: Uuid,
    need: u64,
    want: u64,
    spread: u64,
) -> Result<Option<CreditRow>, StoreError> {
    let grant = "(CASE WHEN {B} < $2 THEN 0 ELSE LEAST({B}, $3, GREATEST($2, {B} / $4)) END)";
    let template = credit_template(&format!(
        "UPDATE usage_credits AS c SET \
           last_grant = {grant}, \
           balance = {{B}} - {grant}, \
           epoch = c.epoch + CASE WHEN {{D}} THEN 1 ELSE 0 END, \
           next_refill_ms = CASE WHEN {{D}} THEN {{N}} ELSE c.next_refill_ms END \
         WHERE c.account_id = $1 AND c.balance IS NOT NULL \
         RETURNING last_grant, balance, epoch, version, next_refill_ms, {{NOW}} AS now_ms"
    ));
    let backend = conn.get_database_backend();
    let row = conn
        .query_one_raw(statement(
            backend,
            &template,
            vec![account.into(), int(need), int(want), int(spread.max(1))],
        ))
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    Ok(Some(CreditRow {
        last_grant: row.try_get("", "last_grant")?,
        balance: row.try_get("", "balance")?,
        epoch: row.try_get("", "epoch")?,
        version: row.try_get("", "version")?,
        next_refill_ms: row.try_get("", "next_refill_ms")?,
        now_ms: row.try_get("", "now_ms")?,
    }))
}

/// What a rate-limit take asks for.
#[derive(Debug, Clone, Copy)]
pub struct RateAsk {
    pub budget: [u8; 32],
    pub tenant: TenantId,
    pub period_ms: i64,
    pub limit: u64,
    pub need: u64,
    pub want: u64,
}

/// Takes up to `want` (at least `need`) units of the current window of a rate-limit budget.
pub async fn take_rate(conn: &impl ConnectionTrait, ask: RateAsk) -> Result<RateRow, StoreError> {
    const TEMPLATE: &str = "INSERT INTO usage_windows AS w \
           (budget_id, tenant_id, period_ms, window_start, taken, last_grant) \
         VALUES ($1, $2, $3, ({NOW} / $3) * $3, LEAST($4, $5), LEAST($4, $5)) \
         ON CONFLICT (budget_id) DO UPDATE SET \
           last_grant = CASE \
             WHEN w.window_start > excluded.window_start THEN 0 \
             WHEN w.window_start < excluded.window_start THEN LEAST($4, $5) \
             WHEN $4 - w.taken < $6 THEN 0 \
             ELSE LEAST($4 - w.taken, $5) END, \
           taken = CASE \
             WHEN w.window_start > excluded.window_start THEN w.taken \
             WHEN w.window_start < excluded.window_start THEN LEAST($4, $5) \
             WHEN $4 - w.taken < $6 THEN w.taken \
             ELSE w.taken + LEAST($4 - w.taken, $5) END, \
           window_start = GREATEST(w.window_start, excluded.window_start) \
         RETURNING window_start, taken, last_grant, ({NOW} / $3) * $3 AS asked_window, {NOW} AS now_ms";
    let backend = conn.get_database_backend();
    let row = conn
        .query_one_raw(statement(
            backend,
            TEMPLATE,
            vec![
                Value::Bytes(Some(ask.budget.to_vec())),
                ask.tenant.as_uuid().into(),
                Value::BigInt(Some(ask.period_ms)),
                int(ask.limit),
                int(ask.want),
                int(ask.need),
            ],
        ))
        .await?
        .ok_or_else(|| StoreError::Corrupt("the rate-limit take returned no row".into()))?;
    Ok(RateRow {
        window_start: row.try_get("", "window_start")?,
        taken: row.try_get("", "taken")?,
        last_grant: row.try_get("", "last_grant")?,
        asked_window: row.try_get("", "asked_window")?,
        now_ms: row.try_get("", "now_ms")?,
    })
}

/// Returns unspent credits, only into the epoch they were reserved in (a set, clear or
/// refill since voided them).
pub async fn give_back_credits(
    conn: &impl ConnectionTrait,
    account: Uuid,
    units: u64,
    epoch: u64,
) -> Result<(), StoreError> {
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        &format!(
            "UPDATE usage_credits SET balance = LEAST(balance + $2, {CREDITS_MAX}) \
             WHERE account_id = $1 AND epoch = $3 AND balance IS NOT NULL"
        ),
        vec![account.into(), int(units), int(epoch)],
    ))
    .await?;
    Ok(())
}

/// Returns unspent units of a rate-limit window, only into that window.
pub async fn give_back_rate(
    conn: &impl ConnectionTrait,
    budget: [u8; 32],
    units: u64,
    window_start: i64,
) -> Result<(), StoreError> {
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        "UPDATE usage_windows SET taken = taken - $2 \
         WHERE budget_id = $1 AND window_start = $3 AND taken >= $2",
        vec![
            Value::Bytes(Some(budget.to_vec())),
            int(units),
            Value::BigInt(Some(window_start)),
        ],
    ))
    .await?;
    Ok(())
}

/// Deletes windows that ended more than an hour ago, at most 1000 a call: no reservation
/// of an ended window can still be spent. Returns how many went.
pub async fn sweep_windows(conn: &impl ConnectionTrait) -> Result<u64, StoreError> {
    let backend = conn.get_database_backend();
    let result = conn
        .execute_raw(statement(
            backend,
            "DELETE FROM usage_windows WHERE budget_id IN (\
               SELECT budget_id FROM usage_windows \
               WHERE window_start + period_ms < {NOW} - 3600000 LIMIT 1000)",
            Vec::new(),
        ))
        .await?;
    Ok(result.rows_affected())
}

fn refill_values(refill: Option<Refill>) -> (Value, Value) {
    match refill {
        Some(r) => (
            int(r.amount()),
            Value::BigInt(Some(r.interval().as_millis())),
        ),
        None => (Value::BigInt(None), Value::BigInt(None)),
    }
}

/// Sets an account's balance (creating the account if needed) and its refill. A new
/// epoch: reservations made before can no longer be spent. With `reschedule`, the refill
/// counts from now; otherwise a kept refill keeps its schedule.
pub async fn set_credits(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    account: Uuid,
    balance: u64,
    refill: Option<Refill>,
    reschedule: bool,
) -> Result<(), StoreError> {
    let (amount, interval) = refill_values(refill);
    let template = credit_template(
        "INSERT INTO usage_credits AS c \
           (account_id, tenant_id, balance, epoch, version, refill_amount, refill_interval_ms, \
            next_refill_ms, last_grant) \
         VALUES ($1, $2, $3, 1, 1, $4, $5, {NOW} + $5, 0) \
         ON CONFLICT (account_id) DO UPDATE SET \
           balance = excluded.balance, \
           epoch = c.epoch + 1, \
           version = c.version + 1, \
           refill_amount = excluded.refill_amount, \
           refill_interval_ms = excluded.refill_interval_ms, \
           next_refill_ms = CASE \
             WHEN $6 OR excluded.refill_interval_ms IS NULL OR c.next_refill_ms IS NULL \
               THEN excluded.next_refill_ms \
             WHEN {D} THEN {N} \
             ELSE c.next_refill_ms END",
    );
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        &template,
        vec![
            account.into(),
            tenant.as_uuid().into(),
            int(balance),
            amount,
            interval,
            Value::Bool(Some(reschedule)),
        ],
    ))
    .await?;
    Ok(())
}

/// Replaces (or removes) an account's refill, counted from now; the balance stays (after
/// a refill that fell due before the change). A new epoch.
pub async fn reschedule_credits(
    conn: &impl ConnectionTrait,
    account: Uuid,
    refill: Option<Refill>,
) -> Result<(), StoreError> {
    let (amount, interval) = refill_values(refill);
    let template = credit_template(
        "UPDATE usage_credits AS c SET \
           balance = {B}, \
           refill_amount = $2, \
           refill_interval_ms = $3, \
           next_refill_ms = {NOW} + $3, \
           epoch = c.epoch + 1, \
           version = c.version + 1 \
         WHERE c.account_id = $1 AND c.balance IS NOT NULL",
    );
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        &template,
        vec![account.into(), amount, interval],
    ))
    .await?;
    Ok(())
}

/// Makes an account unlimited. The row stays, so that its epoch never restarts (a lease
/// of an older epoch must never become spendable again).
pub async fn clear_credits(conn: &impl ConnectionTrait, account: Uuid) -> Result<(), StoreError> {
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        "UPDATE usage_credits SET balance = NULL, refill_amount = NULL, \
           refill_interval_ms = NULL, next_refill_ms = NULL, \
           epoch = epoch + 1, version = version + 1 \
         WHERE account_id = $1",
        vec![account.into()],
    ))
    .await?;
    Ok(())
}

/// Adds `delta` to an account's unreserved balance, kept within 0 and the maximum (after
/// a refill that fell due). Outstanding leases stay valid: they are already debited.
/// `false` when the account is unlimited (or gone).
pub async fn adjust_credits(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    account: Uuid,
    delta: i64,
) -> Result<bool, StoreError> {
    let template = credit_template(&format!(
        "UPDATE usage_credits AS c SET \
           balance = LEAST(GREATEST({{B}} + $2, 0), {CREDITS_MAX}), \
           epoch = c.epoch + CASE WHEN {{D}} THEN 1 ELSE 0 END, \
           next_refill_ms = CASE WHEN {{D}} THEN {{N}} ELSE c.next_refill_ms END, \
           version = c.version + 1 \
         WHERE c.account_id = $1 AND c.tenant_id = $3 AND c.balance IS NOT NULL"
    ));
    let backend = conn.get_database_backend();
    let result = conn
        .execute_raw(statement(
            backend,
            &template,
            vec![
                account.into(),
                Value::BigInt(Some(delta)),
                tenant.as_uuid().into(),
            ],
        ))
        .await?;
    Ok(result.rows_affected() == 1)
}

/// Deletes an account no key draws from any more (its last key was deleted).
pub async fn drop_orphaned_account(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    account: Uuid,
) -> Result<(), StoreError> {
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        "DELETE FROM usage_credits WHERE account_id = $1 AND tenant_id = $2 \
         AND NOT EXISTS (SELECT 1 FROM api_keys \
           WHERE tenant_id = $2 AND (usage_id = $1 OR id = $1))",
        vec![account.into(), tenant.as_uuid().into()],
    ))
    .await?;
    Ok(())
}

/// Deletes every account of a tenant that no key draws from (after a forced workspace
/// delete took keys with it).
pub async fn drop_orphaned_accounts(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
) -> Result<(), StoreError> {
    let backend = conn.get_database_backend();
    conn.execute_raw(statement(
        backend,
        "DELETE FROM usage_credits WHERE tenant_id = $1 \
         AND NOT EXISTS (SELECT 1 FROM api_keys k \
           WHERE k.tenant_id = $1 \
             AND (k.usage_id = usage_credits.account_id OR k.id = usage_credits.account_id))",
        vec![tenant.as_uuid().into()],
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use sea_orm::DatabaseConnection;

    use super::*;
    use crate::storage::{Migrator, MigratorTrait, connect};

    /// A migrated database: a temporary SQLite file, or a fresh PostgreSQL database when
    /// `KEYPLANE_TEST_POSTGRES_URL` is set and `postgres` is asked for.
    pub(crate) async fn database(
        postgres: bool,
    ) -> Option<(DatabaseConnection, Option<tempfile::TempDir>)> {
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
        Some((db, dir))
    }

    async fn account(db: &DatabaseConnection, id: Uuid) -> usage_credit::Model {
        use sea_orm::EntityTrait;
        usage_credit::Entity::find_by_id(id)
            .one(db)
            .await
            .unwrap()
            .unwrap()
    }

    fn tenant() -> TenantId {
        TenantId::new(Uuid::now_v7())
    }

    async fn credits_statements(postgres: bool) {
        let Some((db, _dir)) = database(postgres).await else {
            return;
        };
        let (t, a) = (tenant(), Uuid::now_v7());
        set_credits(&db, t, a, 10, None, true).await.unwrap();
        // At most 1/spread of the balance unless the need is larger.
        let row = take_credits(&db, a, 3, 8, 2).await.unwrap().unwrap();
        assert_eq!((row.last_grant, row.balance, row.epoch), (5, 5, 1));
        let row = take_credits(&db, a, 6, 6, 2).await.unwrap().unwrap();
        assert_eq!(
            (row.last_grant, row.balance),
            (0, 5),
            "refused: the need is above it"
        );
        let row = take_credits(&db, a, 5, 5, 2).await.unwrap().unwrap();
        assert_eq!(
            (row.last_grant, row.balance),
            (5, 0),
            "the need, even above 1/spread"
        );
        // Units go back only into their epoch.
        give_back_credits(&db, a, 4, 0).await.unwrap();
        assert_eq!(account(&db, a).await.balance, Some(0));
        give_back_credits(&db, a, 4, 1).await.unwrap();
        assert_eq!(account(&db, a).await.balance, Some(4));
        // Adjustments clamp at 0 and keep the epoch; they bump the version.
        assert!(adjust_credits(&db, t, a, -100).await.unwrap());
        assert!(adjust_credits(&db, t, a, 7).await.unwrap());
        let row = account(&db, a).await;
        assert_eq!((row.balance, row.epoch, row.version), (Some(7), 1, 3));
        assert!(
            !adjust_credits(&db, tenant(), a, 1).await.unwrap(),
            "another tenant's"
        );
        // A set starts a new epoch; a clear makes the account unlimited.
        set_credits(&db, t, a, 2, None, false).await.unwrap();
        let row = account(&db, a).await;
        assert_eq!((row.balance, row.epoch, row.version), (Some(2), 2, 4));
        clear_credits(&db, a).await.unwrap();
        assert!(take_credits(&db, a, 1, 1, 1).await.unwrap().is_none());
        assert!(!adjust_credits(&db, t, a, 1).await.unwrap());
        assert_eq!(account(&db, a).await.epoch, 3);
    }

    async fn refills_apply_lazily(postgres: bool) {
        let Some((db, _dir)) = database(postgres).await else {
            return;
        };
        let (t, a) = (tenant(), Uuid::now_v7());
        let daily = Refill::new(100, Period::refill_interval_ms(86_400_000).unwrap()).unwrap();
        set_credits(&db, t, a, 5, Some(daily), true).await.unwrap();
        let next = account(&db, a).await.next_refill_ms.unwrap();
        let row = take_credits(&db, a, 1, 1, 1).await.unwrap().unwrap();
        assert!(next - row.now_ms > 86_000_000 && next - row.now_ms <= 86_400_000);
        assert_eq!((row.balance, row.epoch), (4, 1));
        // Three and a half intervals ago: due, and missed refills are not replayed.
        let due = row.now_ms - 3 * 86_400_000 - 43_200_000;
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE usage_credits SET next_refill_ms = $1 WHERE account_id = $2",
            vec![Value::BigInt(Some(due)), a.into()],
        ))
        .await
        .unwrap();
        let row = take_credits(&db, a, 1, 1, 1).await.unwrap().unwrap();
        assert_eq!((row.last_grant, row.balance, row.epoch), (1, 99, 2));
        assert_eq!(row.next_refill_ms, Some(due + 4 * 86_400_000));
        // An adjustment while a refill is due applies to the refilled balance.
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE usage_credits SET next_refill_ms = $1 WHERE account_id = $2",
            vec![Value::BigInt(Some(due)), a.into()],
        ))
        .await
        .unwrap();
        assert!(adjust_credits(&db, t, a, 5).await.unwrap());
        let row = account(&db, a).await;
        assert_eq!((row.balance, row.epoch), (Some(105), 3));
    }

    async fn rate_statements(postgres: bool) {
        let Some((db, _dir)) = database(postgres).await else {
            return;
        };
        let ask = |need: u64, want: u64| RateAsk {
            budget: [7; 32],
            tenant: TenantId::new(Uuid::nil()),
            period_ms: 3_600_000,
            limit: 10,
            need,
            want,
        };
        let row = take_rate(&db, ask(1, 4)).await.unwrap();
        assert_eq!((row.last_grant, row.taken), (4, 4));
        assert_eq!(row.window_start, row.asked_window);
        assert_eq!(row.window_start % 3_600_000, 0);
        let row = take_rate(&db, ask(1, 100)).await.unwrap();
        assert_eq!(
            (row.last_grant, row.taken),
            (6, 10),
            "only the room below the limit"
        );
        let row = take_rate(&db, ask(1, 1)).await.unwrap();
        assert_eq!((row.last_grant, row.taken), (0, 10), "refused");
        give_back_rate(&db, [7; 32], 3, row.window_start - 3_600_000)
            .await
            .unwrap();
        assert_eq!(
            take_rate(&db, ask(4, 4)).await.unwrap().last_grant,
            0,
            "older window: no-op"
        );
        give_back_rate(&db, [7; 32], 3, row.window_start)
            .await
            .unwrap();
        let row = take_rate(&db, ask(3, 5)).await.unwrap();
        assert_eq!((row.last_grant, row.taken), (3, 10));
        // A row ahead of the statement's clock (it stepped back): nothing taken.
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE usage_windows SET window_start = window_start + 3600000",
            vec![],
        ))
        .await
        .unwrap();
        let row = take_rate(&db, ask(1, 1)).await.unwrap();
        assert!(row.window_start > row.asked_window);
        assert_eq!((row.last_grant, row.taken), (0, 10));
        // Windows that ended over an hour ago are swept.
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE usage_windows SET window_start = window_start - 4 * 3600000",
            vec![],
        ))
        .await
        .unwrap();
        assert_eq!(sweep_windows(&db).await.unwrap(), 1);
    }

    #[test]
    fn limits_round_trip_through_json() {
        let limits = RateLimits::new(vec![
            RateLimit::new(
                RateLimitName::parse("api").unwrap(),
                100,
                Period::rate_limit_ms(10_000).unwrap(),
                true,
            )
            .unwrap(),
        ])
        .unwrap();
        let id = Uuid::nil();
        assert_eq!(
            limits_from_json(id, limits_to_json(&limits)).unwrap(),
            limits
        );
        assert_eq!(
            limits_from_json(id, serde_json::json!([])).unwrap(),
            RateLimits::default()
        );
        assert!(limits_from_json(id, serde_json::json!([{"name": "x"}])).is_err());
    }

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
    on_both!(credits_statements, refills_apply_lazily, rate_statements);
}
