//! sea-orm entities for the keyplane schema (see `migrations/`).

pub mod api_key;
pub mod api_key_ancestor;
pub mod api_key_role;
pub mod api_key_scope;
pub mod audit_chain;
pub mod audit_event;
pub mod credit_adjustment;
pub mod role;
pub mod role_scope;
pub mod scope;
pub mod setting;
pub mod usage_credit;
pub mod workspace;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, Select};
use uuid::Uuid;

use crate::domain::TenantId;

/// A table whose rows belong to a tenant and carry a revision: the columns the shared
/// read-by-id and compare-and-set code needs.
pub trait TenantOwned: EntityTrait {
    const TENANT_ID: Self::Column;
    const ID: Self::Column;
    const REVISION: Self::Column;
    /// The idempotency key of the create that made the row.
    const REQUEST_ID: Self::Column;

    /// The row with this id, if it belongs to this tenant.
    fn by_id(tenant: TenantId, id: Uuid) -> Select<Self> {
        Self::find()
            .filter(Self::TENANT_ID.eq(tenant.as_uuid()))
            .filter(Self::ID.eq(id))
    }

    /// The row a create with this request id made, if it belongs to this tenant.
    fn by_request(tenant: TenantId, request_id: Uuid) -> Select<Self> {
        Self::find()
            .filter(Self::TENANT_ID.eq(tenant.as_uuid()))
            .filter(Self::REQUEST_ID.eq(request_id))
    }
}

macro_rules! tenant_owned {
    ($($table:ident),+) => {$(
        impl TenantOwned for $table::Entity {
            const TENANT_ID: Self::Column = $table::Column::TenantId;
            const ID: Self::Column = $table::Column::Id;
            const REVISION: Self::Column = $table::Column::Revision;
            const REQUEST_ID: Self::Column = $table::Column::RequestId;
        }
    )+};
}
tenant_owned!(workspace, scope, api_key, role);
