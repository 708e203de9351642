//! Entity for the `roles` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "roles")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub workspace_id: Option<Uuid>,
    pub name: String,
    #[sea_orm(column_type = "Text")]
    pub description: String,
    pub revision: i64,
    pub request_id: Option<Uuid>,
    pub create_time: ChronoDateTimeUtc,
    pub update_time: ChronoDateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The role's scopes.
    #[sea_orm(has_many = "super::role_scope::Entity")]
    Scopes,
}

impl Related<super::role_scope::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Scopes.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
