//! Database migrations for keyplane (SQLite and PostgreSQL).

pub use sea_orm_migration;
pub use sea_orm_migration::prelude::*;

mod m20261123_000001_init;
mod m20261125_000002_audit_log;
mod m20261125_000003_api_keys_fillfactor;
mod m20261125_000004_usage_controls;
mod m20261205_000005_authorization;
mod m20261205_000006_ip_allow_lists;

/// Runs all keyplane schema migrations in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_init::Migration),
            Box::new(m20261125_000002_audit_log::Migration),
            Box::new(m20261125_000003_api_keys_fillfactor::Migration),
            Box::new(m20261125_000004_usage_controls::Migration),
            Box::new(m20261205_000005_authorization::Migration),
            Box::new(m20261205_000006_ip_allow_lists::Migration),
        ]
    }
}

/// Builds `CREATE [UNIQUE] INDEX name ON table (cols...)`.
fn index<T, C>(name: &str, table: T, cols: C, unique: bool) -> IndexCreateStatement
where
    T: IntoIden,
    C: IntoIterator,
    C::Item: IntoIden,
{
    let mut idx = Index::create();
    idx.name(name).table(table);
    for col in cols {
        idx.col(col.into_iden());
    }
    if unique {
        idx.unique();
    }
    idx.take()
}
