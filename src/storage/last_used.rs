//! `last_used_time` without one database write per verification: verifications note the
//! time in memory, and a background task writes the latest value per key in batches.
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use sea_orm::sea_query::{CaseStatement, Expr};
use sea_orm::{ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, Statement};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::entity::api_key;
use super::{Store, StoreError};
use crate::domain::TenantId;

/// Pending `last_used_time` values (microseconds since the epoch, the database's
/// precision), keyed by key id. A sharded map: verifications of different keys do not
/// contend, and none waits for a flush.
#[derive(Debug, Default)]
pub struct LastUsedRecorder {
    pending: DashMap<Uuid, (TenantId, AtomicI64)>,
}

impl LastUsedRecorder {
    /// Notes a successful verification; cheap enough for the hot path. A key already
    /// pending (the usual case: a busy key is verified thousands of times per flush) costs
    /// a shared lock on its shard and an atomic maximum, so concurrent verifications of
    /// the same key do not queue behind each other.
    pub fn record(&self, tenant: TenantId, key_id: Uuid, at: DateTime<Utc>) {
        let micros = at.timestamp_micros();
        if let Some(pending) = self.pending.get(&key_id) {
            pending.1.fetch_max(micros, Ordering::Relaxed);
            return;
        }
        self.pending
            .entry(key_id)
            .or_insert_with(|| (tenant, AtomicI64::new(micros)))
            .1
            .fetch_max(micros, Ordering::Relaxed);
    }

    /// Writes what is pending. On failure the batch goes back into the queue for the next
    /// attempt, so a database outage delays `last_used_time` but loses nothing.
    pub async fn flush(&self, store: &Store) {
        let batch: Vec<(TenantId, Uuid, DateTime<Utc>)> = self
            .pending
            .iter()
            .filter_map(|e| {
                let micros = e.value().1.load(Ordering::Relaxed);
                let at = DateTime::from_timestamp_micros(micros)?;
                Some((e.value().0, *e.key(), at))
            })
            .collect();
        // Taken out unless a newer use came in meanwhile (that one waits for the next flush).
        for (_, id, at) in &batch {
            let micros = at.timestamp_micros();
            self.pending
                .remove_if(id, |_, (_, t)| t.load(Ordering::Relaxed) <= micros);
        }
        if batch.is_empty() {
            return;
        }
        if let Err(err) = store.record_last_used(&batch).await {
            tracing::warn!(error = %err, keys = batch.len(), "could not record key usage; will retry");
            for (tenant, id, at) in batch {
                self.record(tenant, id, at);
            }
        }
    }

    /// Flushes every `interval` until `stop` fires, then once more.
    pub async fn run(&self, store: Store, interval: Duration, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => self.flush(&store).await,
                _ = stop.cancelled() => break,
            }
        }
        self.flush(&store).await;
    }
}

impl Store {
    /// Writes coalesced `last_used_time` values, one statement per chunk of keys. A value
    /// only moves forward, so batches from several replicas may land in any order.
    pub async fn record_last_used(
        &self,
        batch: &[(TenantId, Uuid, DateTime<Utc>)],
    ) -> Result<(), StoreError> {
        // Here only: its `max` would hide `Ord::max` in `LastUsedRecorder::record`.
        use sea_orm::sea_query::ExprTrait;
        if self.db.get_database_backend() == DbBackend::Postgres {
            // The keys as three arrays joined through UNNEST: three bind parameters instead
            // of 30,000, and one statement text whatever the chunk's length.
            // Sorted by id, the nested loop over the arrays walks the `(tenant_id, id)`
            // indexes in order and locks rows in the same order on every replica. Chunks
            // bound how long one statement holds its row locks. Each row update stays
            // cheap (HOT, no index writes) thanks to the fill factor the migration
            // `m20261125_000003_api_keys_fillfactor` leaves free.
            let mut sorted: Vec<_> = batch.iter().collect();
            sorted.sort_unstable_by_key(|(_, id, _)| *id);
            for chunk in sorted.chunks(10_000) {
                let tenants: Vec<Uuid> = chunk.iter().map(|(t, _, _)| t.as_uuid()).collect();
                let ids: Vec<Uuid> = chunk.iter().map(|(_, id, _)| *id).collect();
                let used: Vec<DateTime<Utc>> = chunk.iter().map(|(_, _, at)| *at).collect();
                self.db
                    .execute_raw(Statement::from_sql_and_values(
                        DbBackend::Postgres,
                        "UPDATE api_keys AS k SET last_used_time = u.used \
                         FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[]) \
                         AS u(tenant_id, id, used) \
                         WHERE k.tenant_id = u.tenant_id AND k.id = u.id \
                         AND (k.last_used_time IS NULL OR k.last_used_time < u.used)",
                        [tenants.into(), ids.into(), used.into()],
                    ))
                    .await?;
            }
            return Ok(());
        }
        // SQLite (one process, modest batches): a CASE per key, whose cost grows with the
        // square of the chunk, so chunks stay small.
        for chunk in batch.chunks(200) {
            let newer = |tenant: &TenantId, id: &Uuid, used: &DateTime<Utc>| {
                api_key::Column::TenantId
                    .eq(tenant.as_uuid())
                    .and(api_key::Column::Id.eq(*id))
                    .and(
                        api_key::Column::LastUsedTime
                            .is_null()
                            .or(api_key::Column::LastUsedTime.lt(*used)),
                    )
            };
            let case = chunk
                .iter()
                .fold(CaseStatement::new(), |case, (t, id, used)| {
                    case.case(newer(t, id, used), Expr::value(*used))
                });
            api_key::Entity::update_many()
                .col_expr(
                    api_key::Column::LastUsedTime,
                    case.finally(Expr::col(api_key::Column::LastUsedTime))
                        .into(),
                )
                .filter(api_key::Column::Id.is_in(chunk.iter().map(|(_, id, _)| *id)))
                .exec(&self.db)
                .await?;
        }
        Ok(())
    }
}
