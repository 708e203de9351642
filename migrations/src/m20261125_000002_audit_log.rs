//! The audit log: `audit_events`, one row per successful write, and `audit_chains`, one
//! row per tenant holding its hash chain's head (which also serializes a tenant's writers)
//! and the anchor pruning leaves behind.

use sea_orm_migration::{prelude::*, schema::*};

use crate::index;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    TenantId,
    Sequence,
    Time,
    ActorKind,
    ActorSubject,
    ActorApiKeyId,
    Action,
    ResourceType,
    ResourceId,
    RequestId,
    ChangedFields,
    Hash,
}

#[derive(DeriveIden)]
enum AuditChains {
    Table,
    TenantId,
    HeadSequence,
    HeadHash,
    AnchorSequence,
    AnchorHash,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .col(pk_uuid(AuditEvents::Id))
                    .col(uuid(AuditEvents::TenantId))
                    .col(big_integer(AuditEvents::Sequence))
                    .col(timestamp_with_time_zone(AuditEvents::Time))
                    .col(string(AuditEvents::ActorKind))
                    .col(string(AuditEvents::ActorSubject))
                    .col(uuid_null(AuditEvents::ActorApiKeyId))
                    .col(string(AuditEvents::Action))
                    .col(string(AuditEvents::ResourceType))
                    .col(uuid(AuditEvents::ResourceId))
                    .col(string(AuditEvents::RequestId))
                    .col(json(AuditEvents::ChangedFields))
                    .col(binary(AuditEvents::Hash))
                    .to_owned(),
            )
            .await?;
        // The chain's order, the newest-first listing and its keyset.
        manager
            .create_index(index(
                "audit_events_tenant_sequence",
                AuditEvents::Table,
                [AuditEvents::TenantId, AuditEvents::Sequence],
                true,
            ))
            .await?;
        // Pruning finds events past the retention across tenants.
        manager
            .create_index(index(
                "audit_events_time",
                AuditEvents::Table,
                [AuditEvents::Time],
                false,
            ))
            .await?;
        // "What happened to this key?"
        manager
            .create_index(index(
                "audit_events_tenant_resource",
                AuditEvents::Table,
                [
                    AuditEvents::TenantId,
                    AuditEvents::ResourceId,
                    AuditEvents::Sequence,
                ],
                false,
            ))
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditChains::Table)
                    .col(pk_uuid(AuditChains::TenantId))
                    .col(big_integer(AuditChains::HeadSequence))
                    .col(binary(AuditChains::HeadHash))
                    .col(big_integer(AuditChains::AnchorSequence))
                    .col(binary(AuditChains::AnchorHash))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AuditChains::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(AuditEvents::Table).to_owned())
            .await
    }
}
