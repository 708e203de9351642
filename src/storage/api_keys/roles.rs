//! The roles a key holds: resolved by name when a key is created, updated or delegated
//! (tenant-wide roles, or roles of the key's workspace, which win over a tenant-wide role of
//! the same name), kept as rows of `api_key_roles` (so a role finds its holders) and as the
//! names on the key's row (read with the key).
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use uuid::Uuid;

use crate::domain::TenantId;
use crate::domain::role::RoleName;
use crate::domain::rules::RuleViolation;
use crate::domain::validate::ValidationError;
use crate::storage::entity::{api_key_role, role, role_scope};
use crate::storage::{Store, StoreError};

/// A role a key holds: its id and name.
pub(super) struct HeldRole {
    pub id: Uuid,
    pub name: String,
}

/// The roles of these names a key of `workspace` may hold; an unknown name is
/// INVALID_ARGUMENT naming it (under `field`).
pub(super) async fn resolve_roles(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    workspace: Uuid,
    names: &[RoleName],
    field: &str,
) -> Result<Vec<HeldRole>, StoreError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(Uuid, String, Option<Uuid>)> = role::Entity::find()
        .select_only()
        .columns([
            role::Column::Id,
            role::Column::Name,
            role::Column::WorkspaceId,
        ])
        .filter(role::Column::TenantId.eq(tenant.as_uuid()))
        .filter(role::Column::Name.is_in(names.iter().map(RoleName::as_str)))
        .filter(
            sea_orm::Condition::any()
                .add(role::Column::WorkspaceId.is_null())
                .add(role::Column::WorkspaceId.eq(workspace)),
        )
        .into_tuple()
        .all(conn)
        .await?;
    let mut held = Vec::with_capacity(names.len());
    for name in names {
        let found = rows
            .iter()
            .filter(|(_, n, _)| n == name.as_str())
            // The workspace's own role before a tenant-wide one of the same name.
            .max_by_key(|(_, _, workspace)| workspace.is_some());
        let Some((id, _, _)) = found else {
            return Err(RuleViolation::Invalid(ValidationError::single(
                field,
                format!("{}: no such role for this key", name.as_str()),
            ))
            .into());
        };
        held.push(HeldRole {
            id: *id,
            name: name.as_str().to_owned(),
        });
    }
    Ok(held)
}

/// The names of these roles, sorted: the key row's `roles` column.
pub(super) fn names_json(roles: &[HeldRole]) -> serde_json::Value {
    let mut names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    serde_json::json!(names)
}

/// Replaces the key's role rows.
pub(super) async fn write_roles(
    conn: &impl ConnectionTrait,
    key: Uuid,
    roles: &[HeldRole],
) -> Result<(), StoreError> {
    api_key_role::Entity::delete_many()
        .filter(api_key_role::Column::ApiKeyId.eq(key))
        .exec(conn)
        .await?;
    if roles.is_empty() {
        return Ok(());
    }
    let rows = roles.iter().map(|r| api_key_role::ActiveModel {
        api_key_id: Set(key),
        role_id: Set(r.id),
    });
    api_key_role::Entity::insert_many(rows)
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

/// The scopes these roles grant (sorted, without repeats).
pub(super) async fn scopes_of(
    conn: &impl ConnectionTrait,
    roles: &[HeldRole],
) -> Result<Vec<String>, StoreError> {
    if roles.is_empty() {
        return Ok(Vec::new());
    }
    let mut scopes: Vec<String> = role_scope::Entity::find()
        .select_only()
        .column(role_scope::Column::Scope)
        .filter(role_scope::Column::RoleId.is_in(roles.iter().map(|r| r.id)))
        .into_tuple()
        .all(conn)
        .await?;
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

impl Store {
    /// The scopes the named roles would give a key of `workspace`: what a caller putting
    /// them on a key must be allowed to grant.
    pub async fn scopes_of_roles(
        &self,
        tenant: TenantId,
        workspace: Uuid,
        names: &[RoleName],
        field: &str,
    ) -> Result<Vec<String>, StoreError> {
        let roles = resolve_roles(&self.db, tenant, workspace, names, field).await?;
        scopes_of(&self.db, &roles).await
    }
}
