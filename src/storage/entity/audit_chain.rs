//! Entity for the `audit_chains` table: per tenant, the audit hash chain's newest link
//! (the head) and the link pruning last removed (the anchor the retained chain starts from).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_chains")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub tenant_id: Uuid,
    pub head_sequence: i64,
    pub head_hash: Vec<u8>,
    pub anchor_sequence: i64,
    pub anchor_hash: Vec<u8>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
