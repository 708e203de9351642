//! The API's writes to a credit account: set, reschedule, clear and adjust its balance and
//! refill, and drop the accounts no key draws from any more. Each also applies a refill
//! that fell due, so a write is never undone by a refill that was already owed.
use sea_orm::{ConnectionTrait, Value};
use uuid::Uuid;

use super::{credit_template, int, statement};
use crate::domain::TenantId;
use crate::domain::usage::{CREDITS_MAX, Refill};
use crate::storage::StoreError;

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
mod tests {
    use sea_orm::{DatabaseConnection, Statement};

    use super::*;
    use crate::domain::usage::Period;
    use crate::storage::budgets::tests::{on_both, store};
    use crate::storage::entity::usage_credit;

    async fn account(db: &DatabaseConnection, id: Uuid) -> usage_credit::Model {
        use sea_orm::EntityTrait;
        usage_credit::Entity::find_by_id(id)
            .one(db)
            .await
            .unwrap()
            .unwrap()
    }

    /// Moves an account's next refill to `ms` (database clock).
    async fn refill_due_at(db: &DatabaseConnection, account: Uuid, ms: i64) {
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE usage_credits SET next_refill_ms = $1 WHERE account_id = $2",
            vec![Value::BigInt(Some(ms)), account.into()],
        ))
        .await
        .unwrap();
    }

    fn tenant() -> TenantId {
        TenantId::new(Uuid::now_v7())
    }

    async fn credits_statements(postgres: bool) {
        let Some((store, _dir)) = store(postgres).await else {
            return;
        };
        let db = store.connection();
        let (t, a) = (tenant(), Uuid::now_v7());
        set_credits(db, t, a, 10, None, true).await.unwrap();
        // At most 1/spread of the balance unless the need is larger.
        let row = store.take_credit_lease(a, 3, 8, 2).await.unwrap().unwrap();
        assert_eq!((row.last_grant, row.balance, row.epoch), (5, 5, 1));
        let row = store.take_credit_lease(a, 6, 6, 2).await.unwrap().unwrap();
        assert_eq!(
            (row.last_grant, row.balance),
            (0, 5),
            "refused: the need is above it"
        );
        let row = store.take_credit_lease(a, 5, 5, 2).await.unwrap().unwrap();
        assert_eq!(
            (row.last_grant, row.balance),
            (5, 0),
            "the need, even above 1/spread"
        );
        // Units go back only into their epoch.
        store.give_back_credits(a, 4, 0).await.unwrap();
        assert_eq!(account(db, a).await.balance, Some(0));
        store.give_back_credits(a, 4, 1).await.unwrap();
        assert_eq!(account(db, a).await.balance, Some(4));
        // Adjustments clamp at 0 and keep the epoch; they bump the version.
        assert!(adjust_credits(db, t, a, -100).await.unwrap());
        assert!(adjust_credits(db, t, a, 7).await.unwrap());
        let row = account(db, a).await;
        assert_eq!((row.balance, row.epoch, row.version), (Some(7), 1, 3));
        assert!(
            !adjust_credits(db, tenant(), a, 1).await.unwrap(),
            "another tenant's"
        );
        // A set starts a new epoch; a clear makes the account unlimited.
        set_credits(db, t, a, 2, None, false).await.unwrap();
        let row = account(db, a).await;
        assert_eq!((row.balance, row.epoch, row.version), (Some(2), 2, 4));
        clear_credits(db, a).await.unwrap();
        assert!(store.take_credit_lease(a, 1, 1, 1).await.unwrap().is_none());
        assert!(!adjust_credits(db, t, a, 1).await.unwrap());
        assert_eq!(account(db, a).await.epoch, 3);
    }

    async fn refills_apply_lazily(postgres: bool) {
        let Some((store, _dir)) = store(postgres).await else {
            return;
        };
        let db = store.connection();
        let (t, a) = (tenant(), Uuid::now_v7());
        let daily = Refill::new(100, Period::refill_interval_ms(86_400_000).unwrap()).unwrap();
        set_credits(db, t, a, 5, Some(daily), true).await.unwrap();
        let next = account(db, a).await.next_refill_ms.unwrap();
        let row = store.take_credit_lease(a, 1, 1, 1).await.unwrap().unwrap();
        assert!(next - row.now_ms > 86_000_000 && next - row.now_ms <= 86_400_000);
        assert_eq!((row.balance, row.epoch), (4, 1));
        // Three and a half intervals ago: due, and missed refills are not replayed.
        let due = row.now_ms - 3 * 86_400_000 - 43_200_000;
        refill_due_at(db, a, due).await;
        let row = store.take_credit_lease(a, 1, 1, 1).await.unwrap().unwrap();
        assert_eq!((row.last_grant, row.balance, row.epoch), (1, 99, 2));
        assert_eq!(row.next_refill_ms, Some(due + 4 * 86_400_000));
        // An adjustment while a refill is due applies to the refilled balance.
        refill_due_at(db, a, due).await;
        assert!(adjust_credits(db, t, a, 5).await.unwrap());
        let row = account(db, a).await;
        assert_eq!((row.balance, row.epoch), (Some(105), 3));
    }

    on_both!(credits_statements, refills_apply_lazily);
}
