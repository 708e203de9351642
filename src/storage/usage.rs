//! `last_used_time` without one database write per verification: verifications note the
//! time in memory, and a background task writes the latest value per key in batches.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Store;
use crate::domain::TenantId;

/// Pending usage, keyed by key id.
#[derive(Debug, Default)]
pub struct UsageRecorder {
    pending: Mutex<HashMap<Uuid, (TenantId, DateTime<Utc>)>>,
}

impl UsageRecorder {
    /// Notes a successful verification; cheap enough for the hot path.
    pub fn record(&self, tenant: TenantId, key_id: Uuid, at: DateTime<Utc>) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        pending
            .entry(key_id)
            .and_modify(|(_, t)| *t = (*t).max(at))
            .or_insert((tenant, at));
    }

    /// Writes what is pending. On failure the batch goes back into the queue for the next
    /// attempt, so a database outage delays `last_used_time` but loses nothing.
    pub async fn flush(&self, store: &Store) {
        let batch: Vec<(TenantId, Uuid, DateTime<Utc>)> = {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            pending
                .drain()
                .map(|(id, (tenant, at))| (tenant, id, at))
                .collect()
        };
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
