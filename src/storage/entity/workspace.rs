//! Entity for the `workspaces` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "workspaces")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    #[sea_orm(column_type = "Text")]
    pub description: String,
    pub company: Option<String>,
    pub is_private: bool,
    pub is_personal: bool,
    pub owner_id: String,
    pub source: String,
    pub default_key_prefix: String,
    /// The longest a key of the workspace may live, in milliseconds; `None`: no limit.
    pub max_key_ttl_ms: Option<i64>,
    /// `["10.0.0.0/8", ...]`: the allow-list of keys created without one.
    pub default_allowed_cidrs: Json,
    pub labels: Json,
    pub revision: i64,
    pub request_id: Option<Uuid>,
    pub create_time: ChronoDateTimeUtc,
    pub update_time: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
