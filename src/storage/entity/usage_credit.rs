//! Entity for the `usage_credits` table: one credit account per usage id (a key and its
//! rotation successors). Written only by the raw statements of `storage::budgets`; read
//! with the keys that draw from it.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "usage_credits")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub account_id: Uuid,
    pub tenant_id: Uuid,
    /// Credits no replica has reserved; `None`: unlimited now.
    pub balance: Option<i64>,
    pub epoch: i64,
    pub version: i64,
    pub refill_amount: Option<i64>,
    pub refill_interval_ms: Option<i64>,
    pub next_refill_ms: Option<i64>,
    pub last_grant: i64,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
