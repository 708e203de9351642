//! Idempotent credit adjustments (SPEC §3.6): the first `AdjustApiKeyCredits` with a
//! request id claims it in its own transaction, so a retry — on any replica, racing the
//! first or after it — applies nothing again and answers with the balance the first left.
//! Claims are kept at least [`KEPT`]; older ones of a tenant go with its next claim.
use chrono::{DateTime, Duration, Utc};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::usage::CreditDelta;
use crate::storage::StoreError;
use crate::storage::entity::credit_adjustment;

/// How long a request id is remembered at least (and an hour more, so that "24 hours" holds
/// whatever the clocks of the replicas say).
pub(super) const KEPT: Duration = Duration::hours(25);

/// Claims `request_id` for this adjustment; a unique violation means another call has it.
pub(super) async fn claim(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    request_id: Uuid,
    key: Uuid,
    delta: CreditDelta,
    now: DateTime<Utc>,
) -> Result<(), sea_orm::DbErr> {
    credit_adjustment::Entity::delete_many()
        .filter(credit_adjustment::Column::TenantId.eq(tenant.as_uuid()))
        .filter(credit_adjustment::Column::CreateTime.lt(now - KEPT))
        .exec(conn)
        .await?;
    credit_adjustment::Entity::insert(credit_adjustment::ActiveModel {
        tenant_id: Set(tenant.as_uuid()),
        request_id: Set(request_id),
        api_key_id: Set(key),
        delta: Set(delta.get()),
        remaining: Set(0),
        create_time: Set(now),
    })
    .exec_without_returning(conn)
    .await?;
    Ok(())
}

/// Writes the balance the claimed adjustment left: the answer to its retries.
pub(super) async fn record(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    request_id: Uuid,
    remaining: u64,
) -> Result<(), StoreError> {
    credit_adjustment::Entity::update_many()
        .col_expr(
            credit_adjustment::Column::Remaining,
            sea_orm::sea_query::Expr::value(i64::try_from(remaining).unwrap_or(i64::MAX)),
        )
        .filter(credit_adjustment::Column::TenantId.eq(tenant.as_uuid()))
        .filter(credit_adjustment::Column::RequestId.eq(request_id))
        .exec(conn)
        .await?;
    Ok(())
}

/// The adjustment an earlier call made with this request id, if any.
pub(super) async fn earlier(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    request_id: Uuid,
) -> Result<Option<credit_adjustment::Model>, StoreError> {
    Ok(
        credit_adjustment::Entity::find_by_id((tenant.as_uuid(), request_id))
            .one(conn)
            .await?,
    )
}
