//! Usage controls (rate limits and credits): two columns on `api_keys` and the two counter
//! tables. Additive only — a defaulted and a nullable column, new tables — so the previous
//! release keeps working on this schema during a rolling upgrade (it ignores them).
//!
//! Counters live apart from the keys so that the churn of reservations never rewrites (or
//! locks, or changes the etag of) an `api_keys` row. See `docs/usage-controls.md`.

use sea_orm_migration::{prelude::*, schema::*};

use crate::index;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    TenantId,
    RateLimits,
    UsageId,
}

#[derive(DeriveIden)]
enum UsageCredits {
    Table,
    AccountId,
    TenantId,
    Balance,
    Epoch,
    Version,
    RefillAmount,
    RefillIntervalMs,
    NextRefillMs,
    LastGrant,
}

#[derive(DeriveIden)]
enum UsageWindows {
    Table,
    BudgetId,
    TenantId,
    PeriodMs,
    WindowStart,
    Taken,
    LastGrant,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(json(ApiKeys::RateLimits).default("[]"))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(uuid_null(ApiKeys::UsageId))
                    .to_owned(),
            )
            .await?;
        // The keys of a credit account (a rotation family): what a credit write evicts.
        manager
            .create_index(index(
                "api_keys_tenant_usage_id",
                ApiKeys::Table,
                [ApiKeys::TenantId, ApiKeys::UsageId],
                false,
            ))
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(UsageCredits::Table)
                    .col(pk_uuid(UsageCredits::AccountId))
                    .col(uuid(UsageCredits::TenantId))
                    .col(big_integer_null(UsageCredits::Balance))
                    .col(big_integer(UsageCredits::Epoch).default(1))
                    .col(big_integer(UsageCredits::Version).default(1))
                    .col(big_integer_null(UsageCredits::RefillAmount))
                    .col(big_integer_null(UsageCredits::RefillIntervalMs))
                    .col(big_integer_null(UsageCredits::NextRefillMs))
                    .col(big_integer(UsageCredits::LastGrant).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(UsageWindows::Table)
                    // BLOB on SQLite, BYTEA on PostgreSQL: a 32-byte budget id.
                    .col(blob(UsageWindows::BudgetId).primary_key())
                    .col(uuid(UsageWindows::TenantId))
                    .col(big_integer(UsageWindows::PeriodMs))
                    .col(big_integer(UsageWindows::WindowStart))
                    .col(big_integer(UsageWindows::Taken))
                    .col(big_integer(UsageWindows::LastGrant).default(0))
                    .to_owned(),
            )
            .await?;
        // The sweeper finds windows that ended long ago.
        manager
            .create_index(index(
                "usage_windows_window_start",
                UsageWindows::Table,
                [UsageWindows::WindowStart],
                false,
            ))
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(UsageWindows::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(UsageCredits::Table).to_owned())
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name("api_keys_tenant_usage_id")
                    .table(ApiKeys::Table)
                    .to_owned(),
            )
            .await?;
        for column in [ApiKeys::UsageId, ApiKeys::RateLimits] {
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
}
