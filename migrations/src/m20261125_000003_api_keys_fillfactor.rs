//! Room in `api_keys` pages for the usage flush (PostgreSQL only; SQLite has no such knob).
//!
//! The flush rewrites `last_used_time`, an unindexed column, of up to 100,000 keys at a
//! time. With free space on the row's page PostgreSQL updates it in place (a HOT update: no
//! new entries in the table's six indexes); on a full page every update is a new row version
//! elsewhere plus six index insertions, about three times the work. A fill factor of 85
//! leaves 15% of each page free for that. It applies to pages written from now on: an
//! existing table gets the room as its rows are rewritten, or at once with
//! `VACUUM FULL api_keys` (docs/operations.md).
use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        // A storage parameter only: no rewrite, and the lock taken does not block reads
        // or writes, so replicas of the previous release keep serving meanwhile.
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE api_keys SET (fillfactor = 85)")
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE api_keys RESET (fillfactor)")
            .await?;
        Ok(())
    }
}
