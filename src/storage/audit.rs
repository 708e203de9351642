//! The audit log's storage: appending an event to a tenant's chain inside a write's
//! transaction, listing events, checking a chain, and pruning old events.
//!
//! A tenant's writers are serialized at the chain's row (`audit_chains`): each append locks
//! it (`SELECT … FOR UPDATE` on PostgreSQL; SQLite's write transactions are serial
//! already), reads the head, inserts the next event and moves the head, so concurrent
//! writes on any number of replicas keep one linear chain. The lock is taken last in a
//! write's transaction and held only until its commit.
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseTransaction, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::entity::{audit_chain, audit_event};
use super::{Store, StoreError, db_now};
use crate::domain::TenantId;
use crate::domain::audit::{
    Acting, Actor, ActorKind, AuditAction, AuditEvent, ChainAnchor, ChainBreak, ChainCheck,
    ChainHash, Change, GENESIS,
};
use crate::domain::page::Page;

/// How many events one pruning transaction deletes: small enough that a tenant's writers
/// wait on the chain's lock for a moment only.
pub const PRUNE_BATCH: u64 = 1000;
/// How many events a chain check reads at a time.
const CHECK_BATCH: u64 = 1000;
/// How often pruning looks for events past the retention (more often when the retention
/// is shorter).
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// The pause between two pruning batches, so that a large backlog (the first run after
/// enabling retention) never holds the database for long.
const PRUNE_PAUSE: Duration = Duration::from_millis(100);

/// Prunes events older than `retention` every minute, in batches, until `stop` fires.
/// Every replica may run it: the chain's lock serializes pruners with each other and with
/// writers.
pub async fn prune_forever(store: Store, retention: Duration, stop: CancellationToken) {
    let Ok(retention) = chrono::Duration::from_std(retention) else {
        tracing::warn!(?retention, "audit retention out of range; not pruning");
        return;
    };
    let interval = PRUNE_INTERVAL.min(retention.to_std().unwrap_or(PRUNE_INTERVAL));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let mut pruned = 0;
        loop {
            match store.prune_audit_events(Utc::now() - retention).await {
                Ok(0) => break,
                Ok(n) => pruned += n,
                Err(error) => {
                    tracing::warn!(%error, "audit pruning failed; retrying next round");
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PRUNE_PAUSE) => {}
                _ = stop.cancelled() => return,
            }
        }
        if pruned > 0 {
            tracing::info!(pruned, "pruned audit events past the retention");
        }
    }
}

/// The filters of `ListAuditEvents`.
#[derive(Debug, Default, Clone)]
pub struct AuditFilter {
    pub resource_id: Option<Uuid>,
    pub action: Option<AuditAction>,
    pub actor_subject: Option<String>,
    /// Inclusive.
    pub start_time: Option<DateTime<Utc>>,
    /// Exclusive.
    pub end_time: Option<DateTime<Utc>>,
}

/// The outcome of a chain check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Events checked (the retained ones).
    pub events: u64,
    /// Where the retained chain starts and ends.
    pub anchor: ChainAnchor,
    pub head: ChainAnchor,
    /// The first break, if any.
    pub broken: Option<ChainBreak>,
}

/// Appends one event per change, in order, to the tenant's chain, in the write's
/// transaction: one lock, one insert and one move of the head for the lot (an import of
/// 1,000 keys records 1,000 events).
pub(super) async fn append_all(
    txn: &DatabaseTransaction,
    acting: &Acting,
    changes: &[Change],
) -> Result<(), StoreError> {
    if changes.is_empty() {
        return Ok(());
    }
    let tenant = acting.tenant.as_uuid();
    let chain = match lock_chain(txn, acting.tenant).await? {
        Some(chain) => chain,
        None => {
            // A tenant's first event: make its row, then lock it like any other. Two first
            // writers race on the insert; the loser's insert does nothing and it waits.
            let start = audit_chain::ActiveModel {
                tenant_id: Set(tenant),
                head_sequence: Set(0),
                head_hash: Set(GENESIS.to_vec()),
                anchor_sequence: Set(0),
                anchor_hash: Set(GENESIS.to_vec()),
            };
            audit_chain::Entity::insert(start)
                .on_conflict_do_nothing_on([audit_chain::Column::TenantId])
                .exec(txn)
                .await?;
            lock_chain(txn, acting.tenant)
                .await?
                .ok_or_else(|| StoreError::Corrupt("audit chain row vanished".into()))?
        }
    };
    let mut previous = hash_of(&chain.head_hash)
        .ok_or_else(|| StoreError::Corrupt(format!("audit chain head of tenant {tenant}")))?;
    let mut sequence = chain.head_sequence;
    let now = db_now();
    let mut rows = Vec::with_capacity(changes.len());
    for change in changes {
        sequence += 1;
        let event = AuditEvent::record(acting, change, sequence, now, &previous);
        previous = event.hash;
        rows.push(to_row(&event));
    }
    // Bounded statements: each row binds 13 values, and SQLite allows 32,766.
    for chunk in rows.chunks(500) {
        audit_event::Entity::insert_many(chunk.to_vec())
            .exec_without_returning(txn)
            .await?;
    }
    audit_chain::Entity::update_many()
        .col_expr(audit_chain::Column::HeadSequence, sequence.into())
        .col_expr(audit_chain::Column::HeadHash, previous.to_vec().into())
        .filter(audit_chain::Column::TenantId.eq(tenant))
        .exec(txn)
        .await?;
    Ok(())
}

/// The tenant's chain row, locked until the transaction ends.
async fn lock_chain(
    txn: &DatabaseTransaction,
    tenant: TenantId,
) -> Result<Option<audit_chain::Model>, StoreError> {
    Ok(audit_chain::Entity::find_by_id(tenant.as_uuid())
        .lock_exclusive()
        .one(txn)
        .await?)
}

fn hash_of(bytes: &[u8]) -> Option<ChainHash> {
    bytes.try_into().ok()
}

fn anchor(sequence: i64, hash: &[u8]) -> Option<ChainAnchor> {
    Some(ChainAnchor {
        sequence,
        hash: hash_of(hash)?,
    })
}

fn to_row(event: &AuditEvent) -> audit_event::ActiveModel {
    audit_event::ActiveModel {
        id: Set(event.id),
        tenant_id: Set(event.tenant.as_uuid()),
        sequence: Set(event.sequence),
        time: Set(event.time),
        actor_kind: Set(event.actor.kind.as_str().to_owned()),
        actor_subject: Set(event.actor.subject.to_string()),
        actor_api_key_id: Set(event.actor.api_key_id),
        action: Set(event.action.clone()),
        resource_type: Set(event.resource_type.clone()),
        resource_id: Set(event.resource_id),
        request_id: Set(event.request_id.clone()),
        changed_fields: Set(serde_json::Value::from(event.changed_fields.clone())),
        hash: Set(event.hash.to_vec()),
    }
}

/// A stored event; `None` when the row cannot be one (hand-edited into an unknown actor
/// kind, a hash of the wrong length, a field list that is not a list of strings).
fn from_row(row: audit_event::Model) -> Option<AuditEvent> {
    Some(AuditEvent {
        id: row.id,
        tenant: TenantId::new(row.tenant_id),
        sequence: row.sequence,
        time: row.time,
        actor: Actor {
            subject: row.actor_subject.into(),
            kind: ActorKind::parse(&row.actor_kind)?,
            api_key_id: row.actor_api_key_id,
        },
        action: row.action,
        resource_type: row.resource_type,
        resource_id: row.resource_id,
        request_id: row.request_id,
        changed_fields: serde_json::from_value(row.changed_fields).ok()?,
        hash: hash_of(&row.hash)?,
    })
}

impl Store {
    /// A page of a tenant's events, newest first, after the event with sequence `before`.
    pub async fn list_audit_events(
        &self,
        tenant: TenantId,
        filter: &AuditFilter,
        before: Option<i64>,
        limit: u64,
    ) -> Result<Page<AuditEvent>, StoreError> {
        use audit_event::Column;
        let mut query = audit_event::Entity::find().filter(Column::TenantId.eq(tenant.as_uuid()));
        if let Some(before) = before {
            query = query.filter(Column::Sequence.lt(before));
        }
        if let Some(id) = filter.resource_id {
            query = query.filter(Column::ResourceId.eq(id));
        }
        if let Some(action) = filter.action {
            query = query.filter(Column::Action.eq(action.as_str()));
        }
        if let Some(subject) = &filter.actor_subject {
            query = query.filter(Column::ActorSubject.eq(subject.as_str()));
        }
        if let Some(start) = filter.start_time {
            query = query.filter(Column::Time.gte(start));
        }
        if let Some(end) = filter.end_time {
            query = query.filter(Column::Time.lt(end));
        }
        let rows = query
            .order_by_desc(Column::Sequence)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        let items = rows
            .into_iter()
            .map(|row| {
                let id = row.id;
                from_row(row).ok_or_else(|| StoreError::Corrupt(format!("audit event {id}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::from_rows(items, limit))
    }

    /// Checks a tenant's chain from its anchor to its head, reading it in batches.
    pub async fn check_audit_chain(&self, tenant: TenantId) -> Result<ChainReport, StoreError> {
        use audit_event::Column;
        let corrupt_chain = || StoreError::Corrupt(format!("audit chain row of tenant {tenant}"));
        let (anchor, head) = match audit_chain::Entity::find_by_id(tenant.as_uuid())
            .one(&self.db)
            .await?
        {
            None => (ChainAnchor::START, ChainAnchor::START),
            Some(chain) => (
                anchor(chain.anchor_sequence, &chain.anchor_hash).ok_or_else(corrupt_chain)?,
                anchor(chain.head_sequence, &chain.head_hash).ok_or_else(corrupt_chain)?,
            ),
        };
        let report = |events, broken| ChainReport {
            events,
            anchor,
            head,
            broken,
        };
        let mut check = ChainCheck::new(anchor, head);
        let mut checked = 0;
        let mut after = i64::MIN;
        loop {
            let rows = audit_event::Entity::find()
                .filter(Column::TenantId.eq(tenant.as_uuid()))
                .filter(Column::Sequence.gt(after))
                .order_by_asc(Column::Sequence)
                .limit(CHECK_BATCH)
                .all(&self.db)
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.sequence;
            for row in rows {
                let (id, sequence) = (row.id, row.sequence);
                let pushed = match from_row(row) {
                    Some(event) => check.push(&event),
                    None => Err(ChainBreak::HashMismatch { id, sequence }),
                };
                if let Err(broken) = pushed {
                    return Ok(report(checked, Some(broken)));
                }
                checked += 1;
            }
        }
        Ok(match check.finish() {
            Ok(events) => report(events, None),
            Err(broken) => report(checked, Some(broken)),
        })
    }

    /// Deletes up to [`PRUNE_BATCH`] events older than `cutoff` of one tenant that has
    /// some, oldest first, and moves that tenant's anchor past them. Returns how many it
    /// deleted: 0 means nothing is left to prune.
    pub async fn prune_audit_events(&self, cutoff: DateTime<Utc>) -> Result<u64, StoreError> {
        use audit_event::Column;
        let Some(oldest) = audit_event::Entity::find()
            .filter(Column::Time.lt(cutoff))
            .one(&self.db)
            .await?
        else {
            return Ok(0);
        };
        let tenant = TenantId::new(oldest.tenant_id);
        let txn = self.begin_write().await?;
        // The chain's lock first: no append or other pruner moves it meanwhile.
        if lock_chain(&txn, tenant).await?.is_none() {
            return Err(StoreError::Corrupt(format!(
                "audit events without a chain row, tenant {tenant}"
            )));
        }
        // Events are pruned in chain order, so the anchor is always the last one deleted.
        let doomed = audit_event::Entity::find()
            .filter(Column::TenantId.eq(tenant.as_uuid()))
            .filter(Column::Time.lt(cutoff))
            .order_by_asc(Column::Sequence)
            .limit(PRUNE_BATCH)
            .all(&txn)
            .await?;
        let Some(last) = doomed.last() else {
            return Ok(0);
        };
        let (last_sequence, last_hash) = (last.sequence, last.hash.clone());
        let deleted = audit_event::Entity::delete_many()
            .filter(Column::TenantId.eq(tenant.as_uuid()))
            .filter(Column::Sequence.lte(last_sequence))
            .exec(&txn)
            .await?
            .rows_affected;
        audit_chain::Entity::update_many()
            .col_expr(audit_chain::Column::AnchorSequence, last_sequence.into())
            .col_expr(audit_chain::Column::AnchorHash, last_hash.into())
            .filter(audit_chain::Column::TenantId.eq(tenant.as_uuid()))
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(deleted)
    }
}
