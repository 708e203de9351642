//! Entity for the `api_keys` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "api_keys")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub workspace_id: Uuid,
    pub name: String,
    pub prefix: String,
    #[sea_orm(column_type = "Blob", unique)]
    pub key_digest: Vec<u8>,
    pub last_four: String,
    pub owner_id: Option<String>,
    pub metadata: Json,
    pub expire_time: Option<ChronoDateTimeUtc>,
    pub disabled: bool,
    pub revoke_time: Option<ChronoDateTimeUtc>,
    pub last_used_time: Option<ChronoDateTimeUtc>,
    pub replaced_by: Option<Uuid>,
    pub revision: i64,
    pub request_id: Option<Uuid>,
    pub create_time: ChronoDateTimeUtc,
    pub update_time: ChronoDateTimeUtc,
    /// `[{"name", "limit", "period_ms", "shared_by_owner"}]`, in the key's order.
    pub rate_limits: Json,
    /// The credit account and key-budget subject; `None` (keys written before usage
    /// controls): the key's own id.
    pub usage_id: Option<Uuid>,
    /// The key that minted this one through delegation.
    pub parent_id: Option<Uuid>,
    /// 0 for a key not minted by delegation; otherwise 1 + its parent's.
    pub delegation_depth: i16,
    /// `["<uuid>", ...]`: the ancestors' ids, root first (empty for an undelegated key).
    pub ancestry: Json,
    /// `["name", ...]`: the names of the roles the key holds, sorted.
    pub roles: Json,
    /// `["10.0.0.0/8", ...]`: the networks the key may be used from; empty: anywhere.
    pub allowed_cidrs: Json,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {
    /// The key's grants, loaded with it in one query when a key is verified.
    #[sea_orm(has_many = "super::api_key_scope::Entity")]
    Grants,
    /// The key's credit account, joined when a key is verified.
    #[sea_orm(
        belongs_to = "super::usage_credit::Entity",
        from = "Column::UsageId",
        to = "super::usage_credit::Column::AccountId"
    )]
    Credits,
}

impl Related<super::api_key_scope::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Grants.def()
    }
}

impl Related<super::usage_credit::Entity> for Entity {
    fn to() -> RelationDef {
        Relation::Credits.def()
    }
}

impl ActiveModelBehavior for ActiveModel {}
