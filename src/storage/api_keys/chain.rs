//! What verifying a key reads besides its own row — its roles' scopes and its ancestors —
//! and what a write to a key reaches besides the key — its descendants.
//!
//! A verification the cache cannot answer reads one statement whatever the key's depth: its
//! row and its ancestors' rows (through `api_key_ancestors`, indexed by key), each with its
//! grants, credit account and roles' scopes joined. Descendants are found through the same
//! table, indexed by ancestor, in one statement too.
use std::collections::BTreeSet;
use std::sync::OnceLock;

use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query, SelectStatement, UnionType};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, DeriveIden, EntityTrait, FromQueryResult, JoinType,
    QueryTrait, Statement,
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

/// The alias of the verified key's row in the ancestors' half of [`standing_by_digest`].
#[derive(DeriveIden)]
struct Verified;

/// The column of a row's role scope in [`standing_by_digest`].
const ROLE_SCOPE: &str = "role_scope";

/// A key row of the chain with its credit account, grants and roles' scopes joined: one
/// row per grant × role scope, as `A_`, `B_`, `C_` and `role_scope` columns.
fn chain_rows(tenant: Option<TenantId>) -> SelectStatement {
    let mut select = api_key::Entity::find()
        .find_also_related(usage_credit::Entity)
        .find_also_related(api_key_scope::Entity)
        .into_query();
    select
        .join(
            JoinType::LeftJoin,
            api_key_role::Entity,
            Expr::col((api_key_role::Entity, api_key_role::Column::ApiKeyId))
                .equals((api_key::Entity, api_key::Column::Id)),
        )
        .join(
            JoinType::LeftJoin,
            role_scope::Entity,
            Expr::col((role_scope::Entity, role_scope::Column::RoleId))
                .equals((api_key_role::Entity, api_key_role::Column::RoleId)),
        )
        .expr_as(
            Expr::col((role_scope::Entity, role_scope::Column::Scope)),
            Alias::new(ROLE_SCOPE),
        );
    if let Some(tenant) = tenant {
        select.and_where(
            Expr::col((api_key::Entity, api_key::Column::TenantId)).eq(tenant.as_uuid()),
        );
    }
    select
}

/// What the rows of one key of the chain add up to.
struct Gathered {
    model: api_key::Model,
    credits: Option<usage_credit::Model>,
    grants: BTreeSet<String>,
    role_scopes: BTreeSet<String>,
}

/// The statement of [`standing_by_digest`]: the key's own rows, and (`UNION ALL`) those of
/// the keys `api_key_ancestors` lists for it. It binds the digest twice, nothing else but
/// the tenant when given.
fn chain_statement(tenant: Option<TenantId>, digest: &KeyDigest) -> SelectStatement {
    let bytes = digest.0.to_vec();
    let mut own = chain_rows(tenant);
    own.and_where(Expr::col((api_key::Entity, api_key::Column::KeyDigest)).eq(bytes.clone()));
    let mut above = chain_rows(tenant);
    above
        .join(
            JoinType::InnerJoin,
            api_key_ancestor::Entity,
            Expr::col((
                api_key_ancestor::Entity,
                api_key_ancestor::Column::AncestorId,
            ))
            .equals((api_key::Entity, api_key::Column::Id)),
        )
        .join_as(
            JoinType::InnerJoin,
            api_key::Entity,
            Verified,
            Expr::col((Verified, api_key::Column::Id))
                .equals((api_key_ancestor::Entity, api_key_ancestor::Column::ApiKeyId)),
        )
        .and_where(Expr::col((Verified, api_key::Column::KeyDigest)).eq(bytes))
        // A chain never crosses tenants; a row that says otherwise is not an ancestor.
        .and_where(
            Expr::col((Verified, api_key::Column::TenantId))
                .equals((api_key::Entity, api_key::Column::TenantId)),
        );
    own.union(UnionType::All, above);
    own
}

/// The statement for a digest of any tenant (every verification the cache cannot answer),
/// its SQL rendered once per backend: building and rendering the query tree took about a
/// quarter of a cold verification's CPU.
fn any_tenant_statement(backend: DbBackend, digest: &KeyDigest) -> Statement {
    static POSTGRES: OnceLock<String> = OnceLock::new();
    static SQLITE: OnceLock<String> = OnceLock::new();
    let cell = match backend {
        DbBackend::Postgres => &POSTGRES,
        DbBackend::Sqlite => &SQLITE,
        _ => return backend.build(&chain_statement(None, digest)),
    };
    let sql = cell.get_or_init(|| backend.build(&chain_statement(None, digest)).sql);
    let bytes = digest.0.to_vec();
    Statement::from_sql_and_values(backend, sql.clone(), [bytes.clone().into(), bytes.into()])
}

/// The standing of the key with this digest, if `tenant` (when given) is its tenant: the
/// key, its roles' scopes and its ancestors with theirs, in one statement however deep the
/// key sits ([`chain_statement`]). A key without roles or ancestors reads what it always read: its row, its
/// grants and its credit account.
pub(super) async fn standing_by_digest(
    conn: &impl ConnectionTrait,
    tenant: Option<TenantId>,
    digest: &KeyDigest,
) -> Result<Option<Standing>, StoreError> {
    let backend = conn.get_database_backend();
    let statement = match tenant {
        None => any_tenant_statement(backend, digest),
        Some(_) => backend.build(&chain_statement(tenant, digest)),
    };
    let rows = conn.query_all_raw(statement).await?;

    let mut keys: Vec<Gathered> = Vec::new();
    for row in rows {
        let model = api_key::Model::from_query_result(&row, "A_")?;
        let index = match keys.iter().position(|k| k.model.id == model.id) {
            Some(i) => i,
            None => {
                keys.push(Gathered {
                    credits: usage_credit::Model::from_query_result_optional(&row, "B_")?,
                    model,
                    grants: BTreeSet::new(),
                    role_scopes: BTreeSet::new(),
                });
                keys.len() - 1
            }
        };
        let gathered = &mut keys[index];
        if let Some(grant) = api_key_scope::Model::from_query_result_optional(&row, "C_")? {
            gathered.grants.insert(grant.scope);
        }
        if let Some(scope) = row.try_get::<Option<String>>("", ROLE_SCOPE)? {
            gathered.role_scopes.insert(scope);
        }
    }
    let Some(at) = keys.iter().position(|k| k.model.key_digest == digest.0) else {
        return Ok(None);
    };
    let key = keys.swap_remove(at);
    let (key, own_roles) = key.into_key()?;
    let ancestors = keys
        .into_iter()
        .map(Gathered::into_key)
        .collect::<Result<Vec<_>, _>>()?;
    if own_roles.is_empty() && ancestors.is_empty() {
        return Ok(Some(Standing::plain(key)));
    }
    Ok(Some(Standing::resolve(key, own_roles, ancestors)))
}

impl Gathered {
    /// The key, and what its roles grant.
    fn into_key(self) -> Result<(ApiKey, Vec<String>), StoreError> {
        let key = from_model(
            self.model,
            self.grants.into_iter().collect(),
            self.credits.as_ref(),
        )?;
        Ok((key, self.role_scopes.into_iter().collect()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_statement_is_the_built_one() {
        let digest = KeyDigest([7; 32]);
        for backend in [DbBackend::Postgres, DbBackend::Sqlite] {
            for _ in 0..2 {
                let cached = any_tenant_statement(backend, &digest);
                let built = backend.build(&chain_statement(None, &digest));
                assert_eq!(cached.sql, built.sql);
                assert_eq!(
                    format!("{:?}", cached.values),
                    format!("{:?}", built.values)
                );
            }
        }
    }
}
