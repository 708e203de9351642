//! The authorization model: roles (named sets of scopes), the roles a key holds, and the
//! delegation chain of keys minted by other keys; the workspaces' key lifetime policy; and
//! the request ids of credit adjustments. Additive only (new tables, nullable or
//! defaulted columns), so the previous release keeps working on this schema during a
//! rolling upgrade.
//!
//! A key's chain is kept twice, each for one way of reading it: `api_keys.ancestry` (the
//! ancestors' ids, root first) is read with the key, so verifying a delegated key loads its
//! whole chain in one statement whatever its depth; `api_key_ancestors` (one row per key
//! and ancestor) is indexed by ancestor, so a write to a key finds every descendant — to
//! evict, revoke or move them — in one statement too.

use sea_orm_migration::{prelude::*, schema::*};

use crate::index;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
    ParentId,
    DelegationDepth,
    Ancestry,
    Roles,
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
    TenantId,
    MaxKeyTtlMs,
}

#[derive(DeriveIden)]
enum Scopes {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Roles {
    Table,
    Id,
    TenantId,
    WorkspaceId,
    Name,
    Description,
    Revision,
    RequestId,
    CreateTime,
    UpdateTime,
}

#[derive(DeriveIden)]
enum RoleScopes {
    Table,
    RoleId,
    Scope,
    ScopeId,
}

#[derive(DeriveIden)]
enum ApiKeyRoles {
    Table,
    ApiKeyId,
    RoleId,
}

#[derive(DeriveIden)]
enum CreditAdjustments {
    Table,
    TenantId,
    RequestId,
    ApiKeyId,
    Delta,
    Remaining,
    CreateTime,
}

#[derive(DeriveIden)]
enum ApiKeyAncestors {
    Table,
    ApiKeyId,
    AncestorId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        for column in [
            uuid_null(ApiKeys::ParentId),
            small_integer(ApiKeys::DelegationDepth)
                .default(0)
                .to_owned(),
            json(ApiKeys::Ancestry).default("[]").to_owned(),
            json(ApiKeys::Roles).default("[]").to_owned(),
        ] {
            let mut column = column;
            manager
                .alter_table(
                    Table::alter()
                        .table(ApiKeys::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }

        // Key lifetime policy of a workspace (SPEC §3.3.2); NULL: none.
        manager
            .alter_table(
                Table::alter()
                    .table(Workspaces::Table)
                    .add_column(big_integer_null(Workspaces::MaxKeyTtlMs))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Roles::Table)
                    .col(pk_uuid(Roles::Id))
                    .col(uuid(Roles::TenantId))
                    .col(uuid_null(Roles::WorkspaceId))
                    .col(string(Roles::Name))
                    .col(text(Roles::Description))
                    .col(big_integer(Roles::Revision))
                    .col(uuid_null(Roles::RequestId))
                    .col(timestamp_with_time_zone(Roles::CreateTime))
                    .col(timestamp_with_time_zone(Roles::UpdateTime))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_roles_workspace")
                            .from(Roles::Table, (Roles::TenantId, Roles::WorkspaceId))
                            .to(Workspaces::Table, (Workspaces::TenantId, Workspaces::Id))
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "roles_tenant_id_id",
                Roles::Table,
                [Roles::TenantId, Roles::Id],
                true,
            ))
            .await?;
        manager
            .create_index(index(
                "roles_tenant_request",
                Roles::Table,
                [Roles::TenantId, Roles::RequestId],
                true,
            ))
            .await?;
        // As for scopes: tenant-wide roles are unique per tenant, workspace roles per
        // workspace.
        manager
            .create_index(
                index(
                    "roles_tenant_name_uniq",
                    Roles::Table,
                    [Roles::TenantId, Roles::Name],
                    true,
                )
                .and_where(Expr::col(Roles::WorkspaceId).is_null())
                .take(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "roles_tenant_workspace_name_uniq",
                    Roles::Table,
                    [Roles::TenantId, Roles::WorkspaceId, Roles::Name],
                    true,
                )
                .and_where(Expr::col(Roles::WorkspaceId).is_not_null())
                .take(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(RoleScopes::Table)
                    .col(uuid(RoleScopes::RoleId))
                    .col(string(RoleScopes::Scope))
                    .col(uuid_null(RoleScopes::ScopeId))
                    .primary_key(
                        Index::create()
                            .col(RoleScopes::RoleId)
                            .col(RoleScopes::Scope),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_role_scopes_role")
                            .from(RoleScopes::Table, RoleScopes::RoleId)
                            .to(Roles::Table, Roles::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_role_scopes_scope")
                            .from(RoleScopes::Table, RoleScopes::ScopeId)
                            .to(Scopes::Table, Scopes::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "role_scopes_scope_id",
                RoleScopes::Table,
                [RoleScopes::ScopeId],
                false,
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(ApiKeyRoles::Table)
                    .col(uuid(ApiKeyRoles::ApiKeyId))
                    .col(uuid(ApiKeyRoles::RoleId))
                    .primary_key(
                        Index::create()
                            .col(ApiKeyRoles::ApiKeyId)
                            .col(ApiKeyRoles::RoleId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_key_roles_api_key")
                            .from(ApiKeyRoles::Table, ApiKeyRoles::ApiKeyId)
                            .to(ApiKeys::Table, ApiKeys::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_key_roles_role")
                            .from(ApiKeyRoles::Table, ApiKeyRoles::RoleId)
                            .to(Roles::Table, Roles::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // A role's holders: what a change to the role evicts, and what a forced delete
        // takes it from.
        manager
            .create_index(index(
                "api_key_roles_role_id",
                ApiKeyRoles::Table,
                [ApiKeyRoles::RoleId],
                false,
            ))
            .await?;

        // Idempotent credit adjustments: what the first call with a request id did.
        manager
            .create_table(
                Table::create()
                    .table(CreditAdjustments::Table)
                    .col(uuid(CreditAdjustments::TenantId))
                    .col(uuid(CreditAdjustments::RequestId))
                    .col(uuid(CreditAdjustments::ApiKeyId))
                    .col(big_integer(CreditAdjustments::Delta))
                    .col(big_integer(CreditAdjustments::Remaining))
                    .col(timestamp_with_time_zone(CreditAdjustments::CreateTime))
                    .primary_key(
                        Index::create()
                            .col(CreditAdjustments::TenantId)
                            .col(CreditAdjustments::RequestId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "credit_adjustments_tenant_time",
                CreditAdjustments::Table,
                [CreditAdjustments::TenantId, CreditAdjustments::CreateTime],
                false,
            ))
            .await?;

        // No foreign key to the ancestor: a deleted ancestor leaves its (revoked)
        // descendants in place, and their rows with it.
        manager
            .create_table(
                Table::create()
                    .table(ApiKeyAncestors::Table)
                    .col(uuid(ApiKeyAncestors::ApiKeyId))
                    .col(uuid(ApiKeyAncestors::AncestorId))
                    .primary_key(
                        Index::create()
                            .col(ApiKeyAncestors::ApiKeyId)
                            .col(ApiKeyAncestors::AncestorId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_api_key_ancestors_api_key")
                            .from(ApiKeyAncestors::Table, ApiKeyAncestors::ApiKeyId)
                            .to(ApiKeys::Table, ApiKeys::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "api_key_ancestors_ancestor_id",
                ApiKeyAncestors::Table,
                [ApiKeyAncestors::AncestorId],
                false,
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            CreditAdjustments::Table.into_iden(),
            ApiKeyAncestors::Table.into_iden(),
            ApiKeyRoles::Table.into_iden(),
            RoleScopes::Table.into_iden(),
            Roles::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(Workspaces::Table)
                    .drop_column(Workspaces::MaxKeyTtlMs)
                    .to_owned(),
            )
            .await?;
        for column in [
            ApiKeys::Roles,
            ApiKeys::Ancestry,
            ApiKeys::DelegationDepth,
            ApiKeys::ParentId,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(ApiKeys::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}
