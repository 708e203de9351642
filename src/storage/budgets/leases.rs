//! The lease operations: taking credits and rate-limit units for a replica to spend in
//! memory, giving unspent ones back, recalling what the other replicas hold of a budget,
//! and sweeping the windows that ended long ago.
use sea_orm::{ConnectionTrait, DbBackend, QueryResult, Statement, Value};
use uuid::Uuid;

use super::{credit_template, int, statement};
use crate::domain::TenantId;
use crate::domain::usage::{BudgetId, CREDITS_MAX, CreditRow, RateRow};
use crate::storage::feed::USAGE_CHANNEL;
use crate::storage::{Store, StoreError};

/// What a rate-limit take asks for.
#[derive(Debug, Clone, Copy)]
pub struct RateAsk {
    pub budget: BudgetId,
    pub tenant: TenantId,
    pub period_ms: i64,
    pub limit: u64,
    pub need: u64,
    pub want: u64,
}

/// The payload prefix of a recall on [`USAGE_CHANNEL`]; the budget id follows in hex.
const RECALL: &str = "recall:";

impl Store {
    /// Takes up to `want` (at least `need`) units of the current window of a rate-limit
    /// budget.
    pub async fn take_rate_lease(&self, ask: RateAsk) -> Result<RateRow, StoreError> {
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
             RETURNING window_start, taken, last_grant, ({NOW} / $3) * $3 AS asked_window, \
               {NOW} AS now_ms";
        let row = self
            .lease_statement(
                TEMPLATE,
                vec![
                    Value::Bytes(Some(ask.budget.0.to_vec())),
                    ask.tenant.as_uuid().into(),
                    Value::BigInt(Some(ask.period_ms)),
                    int(ask.limit),
                    int(ask.want),
                    int(ask.need),
                ],
            )
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

    /// Takes up to `want` (at least `need`) credits from an account, at most `1/spread` of
    /// its balance unless the need is larger; `None` when the account is unlimited now (no
    /// row, or a NULL balance).
    pub async fn take_credit_lease(
        &self,
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
        let row = self
            .lease_statement(
                &template,
                vec![account.into(), int(need), int(want), int(spread.max(1))],
            )
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

    /// Returns unspent units of a rate-limit window, only into that window.
    pub async fn give_back_rate(
        &self,
        budget: BudgetId,
        units: u64,
        window_start: i64,
    ) -> Result<(), StoreError> {
        self.lease_statement(
            "UPDATE usage_windows SET taken = taken - $2 \
             WHERE budget_id = $1 AND window_start = $3 AND taken >= $2",
            vec![
                Value::Bytes(Some(budget.0.to_vec())),
                int(units),
                Value::BigInt(Some(window_start)),
            ],
        )
        .await?;
        Ok(())
    }

    /// Returns unspent credits, only into the epoch they were reserved in (a set, clear or
    /// refill since voided them).
    pub async fn give_back_credits(
        &self,
        account: Uuid,
        units: u64,
        epoch: u64,
    ) -> Result<(), StoreError> {
        self.lease_statement(
            &format!(
                "UPDATE usage_credits SET balance = LEAST(balance + $2, {CREDITS_MAX}) \
                 WHERE account_id = $1 AND epoch = $3 AND balance IS NOT NULL"
            ),
            vec![account.into(), int(units), int(epoch)],
        )
        .await?;
        Ok(())
    }

    /// Asks every replica, this one included, to give back what it holds of a budget: a
    /// NOTIFY on [`USAGE_CHANNEL`], which each replica's feed hears (see
    /// [`recalled_budget`]). PostgreSQL only: SQLite is one process.
    pub async fn recall_budget(&self, budget: BudgetId) -> Result<(), StoreError> {
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [
                    USAGE_CHANNEL.into(),
                    format!("{RECALL}{}", budget_hex(budget)).into(),
                ],
            ))
            .await?;
        Ok(())
    }

    /// Deletes windows that ended more than an hour ago, at most 1000 a call: no
    /// reservation of an ended window can still be spent. Returns how many went.
    pub async fn sweep_windows(&self) -> Result<u64, StoreError> {
        let result = self
            .db
            .execute_raw(statement(
                self.db.get_database_backend(),
                "DELETE FROM usage_windows WHERE budget_id IN (\
                   SELECT budget_id FROM usage_windows \
                   WHERE window_start + period_ms < {NOW} - 3600000 LIMIT 1000)",
                Vec::new(),
            ))
            .await?;
        Ok(result.rows_affected())
    }

    /// Runs one take or give-back statement, and returns its row if it has one (a
    /// give-back has none). On PostgreSQL straight on the pool: each is one atomic
    /// statement. On SQLite in a transaction that takes the write lock up front
    /// (`BEGIN IMMEDIATE`), so that the statement waits its turn instead of failing when
    /// another writer committed since its read began.
    async fn lease_statement(
        &self,
        template: &str,
        values: Vec<Value>,
    ) -> Result<Option<QueryResult>, StoreError> {
        let statement = statement(self.db.get_database_backend(), template, values);
        if self.is_shared() {
            return Ok(self.db.query_one_raw(statement).await?);
        }
        let txn = self.begin_write().await?;
        let row = txn.query_one_raw(statement).await?;
        txn.commit().await?;
        Ok(row)
    }
}

/// The budget a message on [`USAGE_CHANNEL`] recalls; `None` when it is no recall.
pub fn recalled_budget(payload: &str) -> Option<BudgetId> {
    let hex = payload.strip_prefix(RECALL)?;
    if hex.len() != 64 {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(BudgetId(id))
}

fn budget_hex(id: BudgetId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::budgets::tests::{on_both, store};

    async fn rate_statements(postgres: bool) {
        let Some((store, _dir)) = store(postgres).await else {
            return;
        };
        let db = store.connection();
        let budget = BudgetId([7; 32]);
        let ask = |need: u64, want: u64| RateAsk {
            budget,
            tenant: TenantId::new(Uuid::nil()),
            period_ms: 3_600_000,
            limit: 10,
            need,
            want,
        };
        let row = store.take_rate_lease(ask(1, 4)).await.unwrap();
        assert_eq!((row.last_grant, row.taken), (4, 4));
        assert_eq!(row.window_start, row.asked_window);
        assert_eq!(row.window_start % 3_600_000, 0);
        let row = store.take_rate_lease(ask(1, 100)).await.unwrap();
        assert_eq!(
            (row.last_grant, row.taken),
            (6, 10),
            "only the room below the limit"
        );
        let row = store.take_rate_lease(ask(1, 1)).await.unwrap();
        assert_eq!((row.last_grant, row.taken), (0, 10), "refused");
        store
            .give_back_rate(budget, 3, row.window_start - 3_600_000)
            .await
            .unwrap();
        assert_eq!(
            store.take_rate_lease(ask(4, 4)).await.unwrap().last_grant,
            0,
            "older window: no-op"
        );
        store
            .give_back_rate(budget, 3, row.window_start)
            .await
            .unwrap();
        let row = store.take_rate_lease(ask(3, 5)).await.unwrap();
        assert_eq!((row.last_grant, row.taken), (3, 10));
        // A row ahead of the statement's clock (it stepped back): nothing taken.
        db.execute_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "UPDATE usage_windows SET window_start = window_start + 3600000",
            vec![],
        ))
        .await
        .unwrap();
        let row = store.take_rate_lease(ask(1, 1)).await.unwrap();
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
        assert_eq!(store.sweep_windows().await.unwrap(), 1);
    }

    #[test]
    fn recalls_name_budgets_in_hex() {
        let id = BudgetId::credits(TenantId::new(Uuid::now_v7()), Uuid::now_v7());
        assert_eq!(
            recalled_budget(&format!("{RECALL}{}", budget_hex(id))),
            Some(id)
        );
        assert_eq!(recalled_budget(&budget_hex(id)), None, "no prefix");
        assert_eq!(recalled_budget(&format!("{RECALL}xy")), None);
        assert_eq!(
            recalled_budget(&format!("{RECALL}{}", "g".repeat(64))),
            None
        );
    }

    on_both!(rate_statements);
}
