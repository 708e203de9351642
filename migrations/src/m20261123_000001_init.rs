//! Initial schema: workspaces, scopes, api_keys, api_key_scopes and settings.
//!
//! The same statements run on SQLite and PostgreSQL; sea-query renders the
//! backend-specific DDL from the connection's backend.

use sea_orm_migration::{prelude::*, schema::*};

use crate::index;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
    TenantId,
    Name,
    Description,
    Company,
    IsPrivate,
    IsPersonal,
    OwnerId,
    Source,
    DefaultKeyPrefix,
    Labels,
    Revision,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum Scopes {
    Table,
    Id,
    TenantId,
    WorkspaceId,
    Resource,
    Action,
    Scope,
    Name,
    Description,
    Category,
    Revision,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    TenantId,
    WorkspaceId,
    Name,
    Prefix,
    KeyDigest,
    LastFour,
    OwnerId,
    Metadata,
    ExpireTime,
    Disabled,
    RevokeTime,
    LastUsedTime,
    ReplacedBy,
    Revision,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum ApiKeyScopes {
    Table,
    ApiKeyId,
    Scope,
    ScopeId,
}

#[derive(DeriveIden)]
enum Settings {
    Table,
    Name,
    Value,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // workspaces
        manager
            .create_table(
                Table::create()
                    .table(Workspaces::Table)
                    .col(pk_uuid(Workspaces::Id))
                    .col(uuid(Workspaces::TenantId))
                    .col(string(Workspaces::Name))
                    .col(text(Workspaces::Description))
                    .col(string_null(Workspaces::Company))
                    .col(boolean(Workspaces::IsPrivate))
                    .col(boolean(Workspaces::IsPersonal))
                    .col(string(Workspaces::OwnerId))
                    .col(string(Workspaces::Source))
                    .col(string(Workspaces::DefaultKeyPrefix))
                    .col(json(Workspaces::Labels))
                    .col(big_integer(Workspaces::Revision))
                    .col(uuid_null(Workspaces::RequestId))
                    .col(timestamp_with_time_zone(Workspaces::CreateTime))
                    .col(timestamp_with_time_zone(Workspaces::UpdateTime))
                    .to_owned(),
            )
            .await?;
        // (tenant_id, id) must be unique before other tables reference it.
        manager
            .create_index(index(
                "workspaces_tenant_id_id",
                Workspaces::Table,
                [Workspaces::TenantId, Workspaces::Id],
                true,
            ))
            .await?;
        manager
            .create_index(index(
                "workspaces_tenant_request",
                Workspaces::Table,
                [Workspaces::TenantId, Workspaces::RequestId],
                true,
            ))
            .await?;

        // scopes
        manager
            .create_table(
                Table::create()
                    .table(Scopes::Table)
                    .col(pk_uuid(Scopes::Id))
                    .col(uuid(Scopes::TenantId))
                    .col(uuid_null(Scopes::WorkspaceId))
                    .col(string(Scopes::Resource))
                    .col(string(Scopes::Action))
                    .col(string(Scopes::Scope))
                    .col(string(Scopes::Name))
                    .col(text(Scopes::Description))
                    .col(string(Scopes::Category))
                    .col(big_integer(Scopes::Revision))
                    .col(uuid_null(Scopes::RequestId))
                    .col(timestamp_with_time_zone(Scopes::CreateTime))
                    .col(timestamp_with_time_zone(Scopes::UpdateTime))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_scopes_workspace")
                            .from(Scopes::Table, (Scopes::TenantId, Scopes::WorkspaceId))
                            .to(Workspaces::Table, (Workspaces::TenantId, Workspaces::Id))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "scopes_tenant_id_id",
                Scopes::Table,
                [Scopes::TenantId, Scopes::Id],
                true,
            ))
            .await?;
        manager
            .create_index(index(
                "scopes_tenant_workspace_id",
                Scopes::Table,
                [Scopes::TenantId, Scopes::WorkspaceId, Scopes::Id],
                false,
            ))
            .await?;
        manager
            .create_index(index(
                "scopes_tenant_request",
                Scopes::Table,
                [Scopes::TenantId, Scopes::RequestId],
                true,
            ))
            .await?;
        // Partial unique indexes: tenant-wide scopes (workspace_id IS NULL) are
        // unique per tenant, workspace scopes are unique per workspace.
        // sea-query renders `... WHERE "workspace_id" IS [NOT] NULL`, valid on
        // both SQLite (>= 3.8) and PostgreSQL.
        manager
            .create_index(
                index(
                    "scopes_tenant_scope_uniq",
                    Scopes::Table,
                    [Scopes::TenantId, Scopes::Scope],
                    true,
                )
                .and_where(Expr::col(Scopes::WorkspaceId).is_null())
                .take(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "scopes_tenant_workspace_scope_uniq",
                    Scopes::Table,
                    [Scopes::TenantId, Scopes::WorkspaceId, Scopes::Scope],
                    true,
                )
                .and_where(Expr::col(Scopes::WorkspaceId).is_not_null())
                .take(),
            )
            .await?;

        // api_keys
        manager
            .create_table(
                Table::create()
                    .table(ApiKeys::Table)
                    .col(pk_uuid(ApiKeys::Id))
                    .col(uuid(ApiKeys::TenantId))
                    .col(uuid(ApiKeys::WorkspaceId))
                    .col(string(ApiKeys::Name))
                    .col(string(ApiKeys::Prefix))
                    // BLOB on SQLite, BYTEA on PostgreSQL; holds a 32-byte digest.
                    .col(blob(ApiKeys::KeyDigest))
                    .col(string(ApiKeys::LastFour))
                    .col(string_null(ApiKeys::OwnerId))
                    .col(json(ApiKeys::Metadata))
                    .col(timestamp_with_time_zone_null(ApiKeys::ExpireTime))
                    .col(boolean(ApiKeys::Disabled))
                    .col(timestamp_with_time_zone_null(ApiKeys::RevokeTime))
                    .col(timestamp_with_time_zone_null(ApiKeys::LastUsedTime))
                    .col(uuid_null(ApiKeys::ReplacedBy))
                    .col(big_integer(ApiKeys::Revision))
                    .col(uuid_null(ApiKeys::RequestId))
                    .col(timestamp_with_time_zone(ApiKeys::CreateTime))
                    .col(timestamp_with_time_zone(ApiKeys::UpdateTime))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_keys_workspace")
                            .from(ApiKeys::Table, (ApiKeys::TenantId, ApiKeys::WorkspaceId))
                            .to(Workspaces::Table, (Workspaces::TenantId, Workspaces::Id))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "api_keys_key_digest",
                ApiKeys::Table,
                [ApiKeys::KeyDigest],
                true,
            ))
            .await?;
        manager
            .create_index(index(
                "api_keys_tenant_id_id",
                ApiKeys::Table,
                [ApiKeys::TenantId, ApiKeys::Id],
                true,
            ))
            .await?;
        manager
            .create_index(index(
                "api_keys_tenant_workspace_id",
                ApiKeys::Table,
                [ApiKeys::TenantId, ApiKeys::WorkspaceId, ApiKeys::Id],
                false,
            ))
            .await?;
        manager
            .create_index(index(
                "api_keys_tenant_owner_id",
                ApiKeys::Table,
                [ApiKeys::TenantId, ApiKeys::OwnerId, ApiKeys::Id],
                false,
            ))
            .await?;
        manager
            .create_index(index(
                "api_keys_tenant_request",
                ApiKeys::Table,
                [ApiKeys::TenantId, ApiKeys::RequestId],
                true,
            ))
            .await?;

        // api_key_scopes
        manager
            .create_table(
                Table::create()
                    .table(ApiKeyScopes::Table)
                    .col(uuid(ApiKeyScopes::ApiKeyId))
                    .col(string(ApiKeyScopes::Scope))
                    .col(uuid_null(ApiKeyScopes::ScopeId))
                    .primary_key(
                        Index::create()
                            .col(ApiKeyScopes::ApiKeyId)
                            .col(ApiKeyScopes::Scope),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_key_scopes_api_key")
                            .from(ApiKeyScopes::Table, ApiKeyScopes::ApiKeyId)
                            .to(ApiKeys::Table, ApiKeys::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_key_scopes_scope")
                            .from(ApiKeyScopes::Table, ApiKeyScopes::ScopeId)
                            .to(Scopes::Table, Scopes::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "api_key_scopes_scope_id",
                ApiKeyScopes::Table,
                [ApiKeyScopes::ScopeId],
                false,
            ))
            .await?;

        // settings
        manager
            .create_table(
                Table::create()
                    .table(Settings::Table)
                    .col(string(Settings::Name).primary_key())
                    .col(string(Settings::Value))
                    .to_owned(),
            )
            .await?;

        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Indexes and foreign keys go away with their tables.
        manager
            .drop_table(Table::drop().table(Settings::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ApiKeyScopes::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ApiKeys::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Scopes::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Workspaces::Table).to_owned())
            .await?;
        Ok(())
    }

    /// Run inside a transaction on every backend (SQLite DDL is transactional
    /// too), so a failed migration never leaves a half-built schema.
    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
