//! `last_used_time` without one database write per verification: verifications note the
//! time in memory, and a background task writes the latest value per key in batches.
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Store;
use crate::domain::TenantId;

/// Pending usage, keyed by key id. A sharded map: verifications of different keys do not
/// contend, and none waits for a flush.
#[derive(Debug, Default)]
pub struct UsageRecorder {
    pending: DashMap<Uuid, (TenantId, DateTime<Utc>)>,
}

impl UsageRecorder {
    /// Notes a successful verification; cheap enough for the hot path.
    pub fn record(&self, tenant: TenantId, key_id: Uuid, at: DateTime<Utc>) {
        self.pending
            .entry(key_id)
            .and_modify(|(_, t)| *t = (*t).max(at))
            .or_insert((tenant, at));
    }

    /// Writes what is pending. On failure the batch goes back into the queue for the next
    /// attempt, so a database outage delays `last_used_time` but loses nothing.
    pub async fn flush(&self, store: &Store) {
        let batch: Vec<(TenantId, Uuid, DateTime<Utc>)> = self
            .pending
            .iter()
            .map(|e| (e.value().0, *e.key(), e.value().1))
            .collect();
        // Taken out unless a newer use came in meanwhile (that one waits for the next flush).
        for (_, id, at) in &batch {
            self.pending.remove_if(id, |_, (_, t)| t <= at);
        }
        if batch.is_empty() {
            return;
        }
        if let Err(err) = store.record_key_usage(&batch).await {
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
