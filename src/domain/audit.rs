//! The audit log: who changed what, as a per-tenant hash chain.
//!
//! Every successful write records one [`AuditEvent`] in its own transaction. A tenant's
//! events are numbered 1, 2, 3, … (`sequence`), and each carries
//! `hash = SHA-256(previous event's hash ‖ this event's canonical bytes)`, the first one
//! chained to 32 zero bytes. Editing, deleting or inserting a row breaks the chain at that
//! row, and [`check_chain`] names it. The chain's head (last sequence and hash) is stored
//! apart from the events, so deleting the newest events is caught too; pruning old events
//! moves the chain's start forward and keeps the hash it started from (the [`ChainAnchor`]),
//! so what is retained stays checkable.
//!
//! The canonical bytes are written out field by field (never a derived or serde format,
//! which could change under a refactor and silently break every stored chain).
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::TenantId;

/// A SHA-256 link of the chain.
pub type ChainHash = [u8; 32];

/// The hash the first event of a tenant chains to.
pub const GENESIS: ChainHash = [0; 32];

/// How the actor authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorKind {
    /// A JWT with a `tenant_id` claim.
    TenantToken,
    /// A JWT without one, acting for the tenant named in `x-tenant-id`.
    PlatformToken,
    /// One of keyplane's own keys (an admin key).
    ApiKey,
}

impl ActorKind {
    pub const ALL: [ActorKind; 3] = [
        ActorKind::TenantToken,
        ActorKind::PlatformToken,
        ActorKind::ApiKey,
    ];

    /// The stored name; part of the canonical bytes, so never change one.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::TenantToken => "tenant_token",
            ActorKind::PlatformToken => "platform_token",
            ActorKind::ApiKey => "api_key",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// Who made a change: the credential's subject (a token's `sub`, an admin key's id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub subject: Arc<str>,
    pub kind: ActorKind,
    /// The admin key that acted, when one did.
    pub api_key_id: Option<Uuid>,
}

/// A write's context: the tenant it changes, who asks, and the request id that ties the
/// audit event to the call's log lines. Every repository write requires one, so a write
/// without an actor cannot be written by accident.
#[derive(Debug, Clone)]
pub struct Acting {
    pub tenant: TenantId,
    pub actor: Actor,
    pub request_id: Arc<str>,
}

/// The kinds of resource a change is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceType {
    Workspace,
    Scope,
    ApiKey,
    Role,
}

impl ResourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Workspace => "workspace",
            ResourceType::Scope => "scope",
            ResourceType::ApiKey => "api_key",
            ResourceType::Role => "role",
        }
    }
}

/// Every action the log records: `{resource_type}.{verb}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditAction {
    WorkspaceCreate,
    WorkspaceUpdate,
    WorkspaceDelete,
    ScopeCreate,
    ScopeUpdate,
    ScopeDelete,
    ApiKeyCreate,
    ApiKeyUpdate,
    ApiKeyRevoke,
    ApiKeyRotate,
    ApiKeyDelete,
    ApiKeyAdjustCredits,
    ApiKeyDelegate,
    ApiKeyImport,
    RoleCreate,
    RoleUpdate,
    RoleDelete,
}

impl AuditAction {
    pub const ALL: [AuditAction; 17] = [
        AuditAction::WorkspaceCreate,
        AuditAction::WorkspaceUpdate,
        AuditAction::WorkspaceDelete,
        AuditAction::ScopeCreate,
        AuditAction::ScopeUpdate,
        AuditAction::ScopeDelete,
        AuditAction::ApiKeyCreate,
        AuditAction::ApiKeyUpdate,
        AuditAction::ApiKeyRevoke,
        AuditAction::ApiKeyRotate,
        AuditAction::ApiKeyDelete,
        AuditAction::ApiKeyAdjustCredits,
        AuditAction::ApiKeyDelegate,
        AuditAction::ApiKeyImport,
        AuditAction::RoleCreate,
        AuditAction::RoleUpdate,
        AuditAction::RoleDelete,
    ];

    /// The stored name; part of the canonical bytes, so never change one.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::WorkspaceCreate => "workspace.create",
            AuditAction::WorkspaceUpdate => "workspace.update",
            AuditAction::WorkspaceDelete => "workspace.delete",
            AuditAction::ScopeCreate => "scope.create",
            AuditAction::ScopeUpdate => "scope.update",
            AuditAction::ScopeDelete => "scope.delete",
            AuditAction::ApiKeyCreate => "api_key.create",
            AuditAction::ApiKeyUpdate => "api_key.update",
            AuditAction::ApiKeyRevoke => "api_key.revoke",
            AuditAction::ApiKeyRotate => "api_key.rotate",
            AuditAction::ApiKeyDelete => "api_key.delete",
            AuditAction::ApiKeyAdjustCredits => "api_key.adjust_credits",
            AuditAction::ApiKeyDelegate => "api_key.delegate",
            AuditAction::ApiKeyImport => "api_key.import",
            AuditAction::RoleCreate => "role.create",
            AuditAction::RoleUpdate => "role.update",
            AuditAction::RoleDelete => "role.delete",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == text)
    }

    pub fn resource_type(self) -> ResourceType {
        use AuditAction::*;
        match self {
            WorkspaceCreate | WorkspaceUpdate | WorkspaceDelete => ResourceType::Workspace,
            ScopeCreate | ScopeUpdate | ScopeDelete => ResourceType::Scope,
            ApiKeyCreate | ApiKeyUpdate | ApiKeyRevoke | ApiKeyRotate | ApiKeyDelete
            | ApiKeyAdjustCredits | ApiKeyDelegate | ApiKeyImport => ResourceType::ApiKey,
            RoleCreate | RoleUpdate | RoleDelete => ResourceType::Role,
        }
    }
}

/// What one write changed, as its repository reports it: the event minus who, when and
/// where in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub action: AuditAction,
    pub resource_id: Uuid,
    /// Field names only: a value (a secret, a digest, a label) never enters the log.
    pub changed_fields: Vec<&'static str>,
}

impl Change {
    pub fn new(action: AuditAction, resource_id: Uuid, changed_fields: Vec<&'static str>) -> Self {
        Self {
            action,
            resource_id,
            changed_fields,
        }
    }
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: Uuid,
    pub tenant: TenantId,
    /// The event's place in its tenant's chain, from 1.
    pub sequence: i64,
    pub time: DateTime<Utc>,
    pub actor: Actor,
    /// Stored as text and kept as read: a row edited to an unknown action must still hash
    /// (and fail), not fail to load.
    pub action: String,
    pub resource_type: String,
    pub resource_id: Uuid,
    pub request_id: String,
    pub changed_fields: Vec<String>,
    pub hash: ChainHash,
}

impl AuditEvent {
    /// The event a write records, linked to `previous` (the chain's head before it).
    pub fn record(
        acting: &Acting,
        change: &Change,
        sequence: i64,
        time: DateTime<Utc>,
        previous: &ChainHash,
    ) -> Self {
        let mut event = AuditEvent {
            id: Uuid::now_v7(),
            tenant: acting.tenant,
            sequence,
            time,
            actor: acting.actor.clone(),
            action: change.action.as_str().to_owned(),
            resource_type: change.action.resource_type().as_str().to_owned(),
            resource_id: change.resource_id,
            request_id: acting.request_id.to_string(),
            changed_fields: change
                .changed_fields
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
            hash: GENESIS,
        };
        event.hash = event.chained_to(previous);
        event
    }

    /// `SHA-256(previous ‖ canonical bytes)`: what `hash` must be.
    pub fn chained_to(&self, previous: &ChainHash) -> ChainHash {
        let mut hasher = Sha256::new();
        hasher.update(previous);
        hasher.update(self.canonical_bytes());
        hasher.finalize().into()
    }

    /// Version 1: a version byte, then every field but the hash in a fixed order; strings
    /// and lists length-prefixed (u32, big-endian), so no two events share bytes.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        const VERSION: u8 = 1;
        let mut out = Vec::with_capacity(256);
        out.push(VERSION);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.tenant.as_uuid().as_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.time.timestamp_micros().to_be_bytes());
        text(&mut out, self.actor.kind.as_str());
        text(&mut out, &self.actor.subject);
        match self.actor.api_key_id {
            None => out.push(0),
            Some(id) => {
                out.push(1);
                out.extend_from_slice(id.as_bytes());
            }
        }
        text(&mut out, &self.action);
        text(&mut out, &self.resource_type);
        out.extend_from_slice(self.resource_id.as_bytes());
        text(&mut out, &self.request_id);
        out.extend_from_slice(&(self.changed_fields.len() as u32).to_be_bytes());
        for field in &self.changed_fields {
            text(&mut out, field);
        }
        out
    }
}

fn text(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// Where a tenant's retained chain starts: the sequence and hash of the last pruned event
/// (`0` and [`GENESIS`] while nothing was pruned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainAnchor {
    pub sequence: i64,
    pub hash: ChainHash,
}

impl ChainAnchor {
    pub const START: ChainAnchor = ChainAnchor {
        sequence: 0,
        hash: GENESIS,
    };
}

/// Why a chain does not check out, naming the first event that breaks it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainBreak {
    #[error("event {id} (sequence {sequence}) does not match its hash: edited, or inserted")]
    HashMismatch { id: Uuid, sequence: i64 },
    #[error(
        "event {id} has sequence {found} where {expected} was expected: events are missing before it, or it was inserted"
    )]
    Gap { id: Uuid, expected: i64, found: i64 },
    #[error(
        "the chain ends at sequence {last} but its head is at {head}: the newest events were deleted"
    )]
    Truncated { last: i64, head: i64 },
    #[error("event {id} (sequence {sequence}) lies past the chain's head: inserted")]
    PastHead { id: Uuid, sequence: i64 },
    #[error("the chain's last event does not match its stored head")]
    HeadMismatch,
}

/// Checks a tenant's chain incrementally, one event at a time in sequence order (so a
/// million events need not be in memory at once).
#[derive(Debug)]
pub struct ChainCheck {
    next_sequence: i64,
    previous: ChainHash,
    head: ChainAnchor,
    checked: u64,
}

impl ChainCheck {
    /// A check of the chain from `anchor` (where pruning left it) to `head` (its newest link).
    pub fn new(anchor: ChainAnchor, head: ChainAnchor) -> Self {
        Self {
            next_sequence: anchor.sequence + 1,
            previous: anchor.hash,
            head,
            checked: 0,
        }
    }

    /// Checks the next event.
    pub fn push(&mut self, event: &AuditEvent) -> Result<(), ChainBreak> {
        if event.sequence > self.head.sequence {
            return Err(ChainBreak::PastHead {
                id: event.id,
                sequence: event.sequence,
            });
        }
        if event.sequence != self.next_sequence {
            return Err(ChainBreak::Gap {
                id: event.id,
                expected: self.next_sequence,
                found: event.sequence,
            });
        }
        if event.chained_to(&self.previous) != event.hash {
            return Err(ChainBreak::HashMismatch {
                id: event.id,
                sequence: event.sequence,
            });
        }
        self.previous = event.hash;
        self.next_sequence += 1;
        self.checked += 1;
        Ok(())
    }

    /// Ends the check: every event up to the head was seen. Returns how many were checked.
    pub fn finish(self) -> Result<u64, ChainBreak> {
        let last = self.next_sequence - 1;
        if last != self.head.sequence {
            return Err(ChainBreak::Truncated {
                last,
                head: self.head.sequence,
            });
        }
        if self.previous != self.head.hash {
            return Err(ChainBreak::HeadMismatch);
        }
        Ok(self.checked)
    }
}

impl fmt::Display for AuditAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acting() -> Acting {
        Acting {
            tenant: TenantId::new(Uuid::from_u128(7)),
            actor: Actor {
                subject: "ops@example.com".into(),
                kind: ActorKind::PlatformToken,
                api_key_id: None,
            },
            request_id: "req-1".into(),
        }
    }

    fn chain(n: i64) -> Vec<AuditEvent> {
        let mut previous = GENESIS;
        (1..=n)
            .map(|sequence| {
                let change = Change::new(
                    AuditAction::ApiKeyUpdate,
                    Uuid::from_u128(sequence as u128),
                    vec!["name", "disabled"],
                );
                let event = AuditEvent::record(
                    &acting(),
                    &change,
                    sequence,
                    DateTime::from_timestamp_micros(1_700_000_000_000_000 + sequence).unwrap(),
                    &previous,
                );
                previous = event.hash;
                event
            })
            .collect()
    }

    fn head(events: &[AuditEvent]) -> ChainAnchor {
        events.last().map_or(ChainAnchor::START, |e| ChainAnchor {
            sequence: e.sequence,
            hash: e.hash,
        })
    }

    fn check(
        anchor: ChainAnchor,
        head: ChainAnchor,
        events: &[AuditEvent],
    ) -> Result<u64, ChainBreak> {
        let mut check = ChainCheck::new(anchor, head);
        for e in events {
            check.push(e)?;
        }
        check.finish()
    }

    #[test]
    fn an_untouched_chain_checks_out() {
        let events = chain(5);
        assert_eq!(check(ChainAnchor::START, head(&events), &events), Ok(5));
        assert_eq!(check(ChainAnchor::START, ChainAnchor::START, &[]), Ok(0));
    }

    #[test]
    fn an_edited_event_is_named() {
        let mut events = chain(5);
        events[2].changed_fields.push("secret".into());
        let head = head(&events);
        assert_eq!(
            check(ChainAnchor::START, head, &events),
            Err(ChainBreak::HashMismatch {
                id: events[2].id,
                sequence: 3
            })
        );
        // Recomputing the edited event's own hash moves the break to the next event.
        let mut events = chain(5);
        events[2].actor.subject = "someone-else".into();
        events[2].hash = events[2].chained_to(&events[1].hash);
        assert_eq!(
            check(ChainAnchor::START, head, &events),
            Err(ChainBreak::HashMismatch {
                id: events[3].id,
                sequence: 4
            })
        );
    }

    #[test]
    fn deleted_events_are_caught_in_the_middle_and_at_the_end() {
        let events = chain(5);
        let head = head(&events);
        let mut middle = events.clone();
        middle.remove(1);
        assert_eq!(
            check(ChainAnchor::START, head, &middle),
            Err(ChainBreak::Gap {
                id: events[2].id,
                expected: 2,
                found: 3
            })
        );
        assert_eq!(
            check(ChainAnchor::START, head, &events[..4]),
            Err(ChainBreak::Truncated { last: 4, head: 5 })
        );
    }

    #[test]
    fn an_inserted_event_is_caught() {
        let events = chain(6);
        // Appended after the head the chain recorded.
        assert_eq!(
            check(ChainAnchor::START, head(&events[..5]), &events),
            Err(ChainBreak::PastHead {
                id: events[5].id,
                sequence: 6
            })
        );
    }

    #[test]
    fn a_pruned_chain_checks_from_its_anchor() {
        let events = chain(5);
        let anchor = ChainAnchor {
            sequence: 2,
            hash: events[1].hash,
        };
        assert_eq!(check(anchor, head(&events), &events[2..]), Ok(3));
        // Deleting the oldest retained event by hand is a gap after the anchor.
        assert!(matches!(
            check(anchor, head(&events), &events[3..]),
            Err(ChainBreak::Gap { expected: 3, .. })
        ));
    }

    #[test]
    fn the_canonical_bytes_are_pinned() {
        // A change here breaks every stored chain: add a format version instead.
        let event = AuditEvent {
            id: Uuid::from_u128(1),
            ..chain(1).remove(0)
        };
        let digest: String = event
            .chained_to(&GENESIS)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            digest,
            "6fc065acd204672efda1ff51657d864e22c10170eceaa811b7371f044b05e5d4"
        );
    }
}
