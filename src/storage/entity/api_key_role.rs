//! Entity for the `api_key_roles` table (composite primary key): which key holds which
//! role. The names are also on the key's row (`api_keys.roles`), read with it.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_key_roles")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub api_key_id: Uuid,
    #[sea_orm(primary_key, auto_increment = false)]
    pub role_id: Uuid,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The scopes of the held role, joined when a key's standing is read.
    #[sea_orm(
        belongs_to = "super::role_scope::Entity",
        from = "Column::RoleId",
        to = "super::role_scope::Column::RoleId"
    )]
    RoleScopes,
}

impl ActiveModelBehavior for ActiveModel {}
