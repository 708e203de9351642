//! What verifying a key reads besides its own row — its roles' scopes and its ancestors —
//! and what a write to a key reaches besides the key — its descendants.
//!
//! Reads are bounded whatever the depth: a key that holds no roles and was not delegated is
//! one statement (the key with its grants and credit account); otherwise one more reads
//! every ancestor at once by the ids stored on the key's row (`ancestry`), and one more the
//! roles' scopes of the whole chain. Descendants are found through `api_key_ancestors`,
//! indexed by ancestor, in one statement.
use std::collections::HashMap;

use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, JoinType, QueryFilter, QuerySelect, RelationTrait,
    sea_query::Query,
};
use uuid::Uuid;

use super::{Touched, from_model, touched_keys};
use crate::domain::TenantId;
use crate::domain::key::KeyDigest;
use crate::domain::records::ApiKey;
use crate::domain::standing::Standing;
use crate::storage::StoreError;
use crate::storage::entity::{
    api_key, api_key_ancestor, api_key_role, api_key_scope, role_scope, usage_credit,
};

/// The keys with these ids and their grants and credit accounts, in one statement.
pub(super) async fn keys_joined(
    conn: &impl ConnectionTrait,
    filter: sea_orm::Condition,
) -> Result<Vec<ApiKey>, StoreError> {
    let rows = api_key::Entity::find()
        .filter(filter)
        .find_also_related(usage_credit::Entity)
        .find_also_related(api_key_scope::Entity)
        .consolidate()
        .all(conn)
        .await?;
    rows.into_iter()
        .map(|(model, credits, grants)| {
            let mut scopes: Vec<String> = grants.into_iter().map(|g| g.scope).collect();
            scopes.sort();
            scopes.dedup();
            from_model(model, scopes, credits.first())
        })
        .collect()
}

/// The scopes the roles of each of these keys grant, by key.
async fn role_scopes(
    conn: &impl ConnectionTrait,
    keys: &[Uuid],
) -> Result<HashMap<Uuid, Vec<String>>, StoreError> {
    let rows: Vec<(Uuid, String)> = api_key_role::Entity::find()
        .select_only()
        .column(api_key_role::Column::ApiKeyId)
        .column(role_scope::Column::Scope)
        .join(
            JoinType::InnerJoin,
            api_key_role::Relation::RoleScopes.def(),
        )
        .filter(api_key_role::Column::ApiKeyId.is_in(keys.iter().copied()))
        .into_tuple()
        .all(conn)
        .await?;
    let mut by_key: HashMap<Uuid, Vec<String>> = HashMap::new();
    for (key, scope) in rows {
        by_key.entry(key).or_default().push(scope);
    }
    Ok(by_key)
}

/// The standing of a key just read: its roles' scopes and its ancestors, read only when it
/// has any.
pub(super) async fn standing_of(
    conn: &impl ConnectionTrait,
    key: ApiKey,
) -> Result<Standing, StoreError> {
    if key.roles.is_empty() && key.ancestry.is_empty() {
        return Ok(Standing::plain(key));
    }
    let ancestors = if key.ancestry.is_empty() {
        Vec::new()
    } else {
        // Same tenant: a chain never crosses tenants, and a row that says otherwise is
        // not an ancestor.
        keys_joined(
            conn,
            sea_orm::Condition::all()
                .add(api_key::Column::TenantId.eq(key.tenant_id.as_uuid()))
                .add(api_key::Column::Id.is_in(key.ancestry.iter().copied())),
        )
        .await?
    };
    let with_roles: Vec<Uuid> = std::iter::once(&key)
        .chain(&ancestors)
        .filter(|k| !k.roles.is_empty())
        .map(|k| k.id)
        .collect();
    let mut roles = if with_roles.is_empty() {
        HashMap::new()
    } else {
        role_scopes(conn, &with_roles).await?
    };
    let own = roles.remove(&key.id).unwrap_or_default();
    let ancestors = ancestors
        .into_iter()
        .map(|a| {
            let scopes = roles.remove(&a.id).unwrap_or_default();
            (a, scopes)
        })
        .collect();
    Ok(Standing::resolve(key, own, ancestors))
}

/// The keys below these keys in their delegation trees (of this tenant).
pub(super) async fn descendants(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    ancestors: &[Uuid],
) -> Result<Vec<Touched>, StoreError> {
    if ancestors.is_empty() {
        return Ok(Vec::new());
    }
    let below = Query::select()
        .column(api_key_ancestor::Column::ApiKeyId)
        .from(api_key_ancestor::Entity)
        .and_where(api_key_ancestor::Column::AncestorId.is_in(ancestors.iter().copied()))
        .to_owned();
    touched_keys(
        conn,
        tenant,
        sea_orm::Condition::all().add(api_key::Column::Id.in_subquery(below)),
    )
    .await
}

/// The digests of these keys' descendants, with `digests` (what a write to the keys makes
/// stale: each descendant's standing holds the keys' state).
pub(in crate::storage) async fn with_descendants(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    ids: &[Uuid],
    mut digests: Vec<KeyDigest>,
) -> Result<Vec<KeyDigest>, StoreError> {
    for below in descendants(conn, tenant, ids).await? {
        if !digests.contains(&below.digest) {
            digests.push(below.digest);
        }
    }
    Ok(digests)
}
