//! Role repository. A role's scopes are rows of `role_scopes`, so that deleting a scope
//! finds the roles holding it; the keys holding a role are rows of `api_key_roles` (and
//! names in the key's own `roles` column, read with the key).
use std::collections::{BTreeMap, HashMap};

use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
    sea_query::{Expr, ExprTrait, Query},
};
use uuid::Uuid;

use super::api_keys::touched_keys;
use super::entity::{TenantOwned, api_key, api_key_ancestor, api_key_role, role, role_scope};
use super::invalidation::{self, Eviction};
use super::update::Stored;
use super::workspaces::require_workspace;
use super::{Store, StoreError, db_now, is_unique_violation};
use crate::domain::TenantId;
use crate::domain::audit::{Acting, AuditAction, Change};
use crate::domain::page::Page;
use crate::domain::role::{NewRole, Role, RolePatch};

/// Holders rewritten by one statement in a forced delete: far below the bind-parameter
/// limits of SQLite and PostgreSQL.
const HOLDERS_PER_UPDATE: usize = 500;

fn from_model(m: role::Model, scopes: Vec<String>) -> Role {
    Role {
        id: m.id,
        tenant_id: TenantId::new(m.tenant_id),
        workspace_id: m.workspace_id,
        name: m.name,
        description: m.description,
        scopes,
        revision: m.revision,
        create_time: m.create_time,
        update_time: m.update_time,
    }
}

/// The scope strings of each role, sorted.
async fn load_scopes(
    conn: &impl ConnectionTrait,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Vec<String>>, StoreError> {
    let mut by_role: HashMap<Uuid, Vec<String>> = HashMap::new();
    if ids.is_empty() {
        return Ok(by_role);
    }
    let rows = role_scope::Entity::find()
        .filter(role_scope::Column::RoleId.is_in(ids.iter().copied()))
        .order_by_asc(role_scope::Column::Scope)
        .all(conn)
        .await?;
    for row in rows {
        by_role.entry(row.role_id).or_default().push(row.scope);
    }
    Ok(by_role)
}

/// Roles of these rows, with their scopes (one more query for the lot).
async fn with_scopes(
    conn: &impl ConnectionTrait,
    models: Vec<role::Model>,
) -> Result<Vec<Role>, StoreError> {
    let ids: Vec<Uuid> = models.iter().map(|m| m.id).collect();
    let mut scopes = load_scopes(conn, &ids).await?;
    Ok(models
        .into_iter()
        .map(|m| {
            let s = scopes.remove(&m.id).unwrap_or_default();
            from_model(m, s)
        })
        .collect())
}

async fn find_role(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<Role>, StoreError> {
    let found = role::Entity::by_id(tenant, id).one(conn).await?;
    Ok(with_scopes(conn, found.into_iter().collect()).await?.pop())
}

/// The role's row, locked until the write's transaction ends (PostgreSQL; SQLite has one
/// writer at a time anyway). Putting the role on a key checks the key's reference against
/// this row, so the lock makes that wait for the write, or the write for it: a change to
/// the role never misses, in its holders and its eviction, a key that was being given it.
async fn lock_role(
    txn: &DatabaseTransaction,
    tenant: TenantId,
    id: Uuid,
) -> Result<Option<role::Model>, StoreError> {
    Ok(role::Entity::by_id(tenant, id)
        .lock_exclusive()
        .one(txn)
        .await?)
}

async fn insert_scopes(
    conn: &impl ConnectionTrait,
    role_id: Uuid,
    grants: &[(String, Option<Uuid>)],
) -> Result<(), StoreError> {
    if grants.is_empty() {
        return Ok(());
    }
    let rows = grants
        .iter()
        .map(|(scope, scope_id)| role_scope::ActiveModel {
            role_id: Set(role_id),
            scope: Set(scope.clone()),
            scope_id: Set(*scope_id),
        });
    role_scope::Entity::insert_many(rows)
        .exec_without_returning(conn)
        .await?;
    Ok(())
}

/// The keys whose effective scopes come from these roles: the keys holding one, and every
/// key delegated from those (a child's scopes are narrowed by its ancestors').
fn holders_and_descendants(role_ids: &[Uuid]) -> Condition {
    let holders = Query::select()
        .column(api_key_role::Column::ApiKeyId)
        .from(api_key_role::Entity)
        .and_where(api_key_role::Column::RoleId.is_in(role_ids.iter().copied()))
        .to_owned();
    let descendants = Query::select()
        .column(api_key_ancestor::Column::ApiKeyId)
        .from(api_key_ancestor::Entity)
        .and_where(api_key_ancestor::Column::AncestorId.in_subquery(holders.clone()))
        .to_owned();
    Condition::any()
        .add(api_key::Column::Id.in_subquery(holders))
        .add(api_key::Column::Id.in_subquery(descendants))
}

/// What a change to these roles' scopes (or their deletion) makes stale: the cached
/// answers of every key holding one of them and of every descendant of those keys. Past
/// [`invalidation::MAX_NAMED`] keys it flushes the whole cache rather than read them all.
pub(super) async fn holders_eviction(
    conn: &impl ConnectionTrait,
    tenant: TenantId,
    role_ids: &[Uuid],
) -> Result<Eviction, StoreError> {
    if role_ids.is_empty() {
        return Ok(Eviction::None);
    }
    let affected = holders_and_descendants(role_ids);
    let count = api_key::Entity::find()
        .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
        .filter(affected.clone())
        .count(conn)
        .await?;
    if count > invalidation::MAX_NAMED as u64 {
        return Ok(Eviction::All);
    }
    let keys = touched_keys(conn, tenant, affected).await?;
    Ok(Eviction::keys(keys.into_iter().map(|k| k.digest).collect()))
}

/// Takes the role's name off the `roles` column of the keys holding it, moving each
/// holder to its next revision. Holders that end up with the same list are written by one
/// statement.
async fn take_from_holders(
    txn: &DatabaseTransaction,
    tenant: TenantId,
    role_id: Uuid,
    name: &str,
) -> Result<(), StoreError> {
    let holders: Vec<(Uuid, serde_json::Value)> = api_key::Entity::find()
        .select_only()
        .columns([api_key::Column::Id, api_key::Column::Roles])
        .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
        .filter(
            api_key::Column::Id.in_subquery(
                Query::select()
                    .column(api_key_role::Column::ApiKeyId)
                    .from(api_key_role::Entity)
                    .and_where(api_key_role::Column::RoleId.eq(role_id))
                    .to_owned(),
            ),
        )
        .into_tuple()
        .all(txn)
        .await?;
    let mut by_list: BTreeMap<Vec<String>, Vec<Uuid>> = BTreeMap::new();
    for (id, roles) in holders {
        let mut names: Vec<String> = serde_json::from_value(roles)
            .map_err(|e| StoreError::Corrupt(format!("key {id} roles: {e}")))?;
        names.retain(|n| n != name);
        by_list.entry(names).or_default().push(id);
    }
    let now = db_now();
    for (names, ids) in by_list {
        let json = serde_json::Value::from(names);
        for chunk in ids.chunks(HOLDERS_PER_UPDATE) {
            api_key::Entity::update_many()
                .col_expr(api_key::Column::Roles, Expr::value(json.clone()))
                .col_expr(
                    api_key::Column::Revision,
                    Expr::col(api_key::Column::Revision).add(1),
                )
                .col_expr(api_key::Column::UpdateTime, Expr::value(now))
                .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
                .filter(api_key::Column::Id.is_in(chunk.iter().copied()))
                .exec(txn)
                .await?;
        }
    }
    Ok(())
}

impl Store {
    /// Creates a role; a retry with the same request id returns the first one.
    pub async fn create_role(&self, acting: &Acting, new: NewRole) -> Result<Role, StoreError> {
        let tenant = acting.tenant;
        if let Some(request_id) = new.request_id
            && let Some(existing) = self.role_by_request(tenant, request_id).await?
        {
            return Ok(existing);
        }
        let fields = new.fields();
        let txn = self.begin_write().await?;
        if let Some(ws) = new.workspace_id {
            require_workspace(&txn, tenant, ws).await?;
        }
        let grants = Self::resolve_scopes(&txn, tenant, new.workspace_id, &new.scopes).await?;
        let now = db_now();
        let model = role::Model {
            id: Uuid::now_v7(),
            tenant_id: tenant.as_uuid(),
            workspace_id: new.workspace_id,
            name: new.name.as_str().to_owned(),
            description: new.description,
            revision: 1,
            request_id: new.request_id,
            create_time: now,
            update_time: now,
        };
        let inserted = role::Entity::insert(role::ActiveModel::from(model.clone()))
            .exec_without_returning(&txn)
            .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                drop(txn);
                if let Some(request_id) = new.request_id
                    && let Some(existing) = self.role_by_request(tenant, request_id).await?
                {
                    return Ok(existing);
                }
                return Err(StoreError::AlreadyExists(format!(
                    "role {} already exists",
                    new.name.as_str()
                )));
            }
            Err(e) => return Err(e.into()),
        }
        insert_scopes(&txn, model.id, &grants).await?;
        let mut scopes: Vec<String> = grants.into_iter().map(|(scope, _)| scope).collect();
        scopes.sort();
        let change = Change::new(AuditAction::RoleCreate, model.id, fields);
        // No key holds it yet: nothing cached can change.
        self.commit(txn, acting, change, Eviction::None).await?;
        Ok(from_model(model, scopes))
    }

    async fn role_by_request(
        &self,
        tenant: TenantId,
        request_id: Uuid,
    ) -> Result<Option<Role>, StoreError> {
        let found = role::Entity::by_request(tenant, request_id)
            .one(&self.db)
            .await?;
        Ok(with_scopes(&self.db, found.into_iter().collect())
            .await?
            .pop())
    }

    pub async fn get_role(&self, tenant: TenantId, id: Uuid) -> Result<Role, StoreError> {
        find_role(&self.db, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("role", id))
    }

    /// Roles in creation order. With a workspace: only those its keys may hold (tenant-wide
    /// ones and its own).
    pub async fn list_roles(
        &self,
        tenant: TenantId,
        workspace_id: Option<Uuid>,
        after: Option<Uuid>,
        limit: u64,
    ) -> Result<Page<Role>, StoreError> {
        let mut query = role::Entity::find().filter(role::Column::TenantId.eq(tenant.as_uuid()));
        if let Some(ws) = workspace_id {
            require_workspace(&self.db, tenant, ws).await?;
            query = query.filter(
                Condition::any()
                    .add(role::Column::WorkspaceId.is_null())
                    .add(role::Column::WorkspaceId.eq(ws)),
            );
        }
        if let Some(after) = after {
            query = query.filter(role::Column::Id.gt(after));
        }
        let rows = query
            .order_by_asc(role::Column::Id)
            .limit(limit + 1)
            .all(&self.db)
            .await?;
        Ok(Page::from_rows(with_scopes(&self.db, rows).await?, limit))
    }

    /// Deletes a role. Refused while keys hold it, unless forced: then it is taken from
    /// them in the same transaction. Returns how many keys lost it.
    pub async fn delete_role(
        &self,
        acting: &Acting,
        id: Uuid,
        force: bool,
    ) -> Result<u64, StoreError> {
        let tenant = acting.tenant;
        let txn = self.begin_write().await?;
        let found = lock_role(&txn, tenant, id)
            .await?
            .ok_or_else(|| StoreError::not_found("role", id))?;
        let holders = api_key_role::Entity::find()
            .filter(api_key_role::Column::RoleId.eq(id))
            .count(&txn)
            .await?;
        Role::ensure_deletable(holders, force)?;
        // Read before the role's rows go: its holders are found through them.
        let eviction = holders_eviction(&txn, tenant, &[id]).await?;
        if holders > 0 {
            take_from_holders(&txn, tenant, id, &found.name).await?;
        }
        // Its scope rows and its holders' rows go with it (ON DELETE CASCADE).
        role::Entity::delete_many()
            .filter(role::Column::TenantId.eq(tenant.as_uuid()))
            .filter(role::Column::Id.eq(id))
            .exec(&txn)
            .await?;
        let change = Change::new(AuditAction::RoleDelete, id, Vec::new());
        self.commit(txn, acting, change, eviction).await?;
        Ok(holders)
    }
}

impl Stored for Role {
    type Patch = RolePatch;
    type Table = role::Entity;
    const KIND: &'static str = "role";
    const UPDATED: AuditAction = AuditAction::RoleUpdate;

    async fn load(
        txn: &DatabaseTransaction,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<Self>, StoreError> {
        let found = lock_role(txn, tenant, id).await?;
        Ok(with_scopes(txn, found.into_iter().collect()).await?.pop())
    }

    fn changes(&self) -> role::ActiveModel {
        role::ActiveModel {
            description: Set(self.description.clone()),
            revision: Set(self.revision),
            update_time: Set(self.update_time),
            ..Default::default()
        }
    }

    /// A new scope list replaces the role's scope rows, and every holder's cached answer
    /// (and its descendants') goes stale with it.
    async fn save_related(
        &mut self,
        txn: &DatabaseTransaction,
        tenant: TenantId,
        patch: &RolePatch,
    ) -> Result<Eviction, StoreError> {
        let Some(scopes) = &patch.scopes else {
            return Ok(Eviction::None);
        };
        let grants = Store::resolve_scopes(txn, tenant, self.workspace_id, scopes).await?;
        role_scope::Entity::delete_many()
            .filter(role_scope::Column::RoleId.eq(self.id))
            .exec(txn)
            .await?;
        insert_scopes(txn, self.id, &grants).await?;
        holders_eviction(txn, tenant, &[self.id]).await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::domain::audit::{Actor, ActorKind};
    use crate::domain::key::{KeyDigest, KeyPrefix};
    use crate::domain::records::{NewScope, NewWorkspace, StringMap};
    use crate::domain::role::RoleName;
    use crate::domain::rules::RuleViolation;
    use crate::domain::scope::ScopeString;
    use crate::domain::update::Update;
    use crate::storage::budgets::tests::{on_both, store};
    use crate::storage::invalidation::EvictionSink;

    /// The evictions of every write, in order.
    #[derive(Default)]
    struct Recorded(Mutex<Vec<Eviction>>);

    impl EvictionSink for Recorded {
        fn evict(&self, eviction: &Eviction) {
            self.0.lock().unwrap().push(eviction.clone());
        }
    }

    impl Recorded {
        fn last(&self) -> Eviction {
            self.0.lock().unwrap().last().cloned().unwrap()
        }
    }

    fn acting(tenant: TenantId) -> Acting {
        Acting {
            tenant,
            actor: Actor {
                subject: "tester".into(),
                kind: ActorKind::TenantToken,
                api_key_id: None,
            },
            request_id: "req".into(),
        }
    }

    fn digest(n: u16) -> KeyDigest {
        let mut d = [0; 32];
        d[..2].copy_from_slice(&n.to_be_bytes());
        KeyDigest(d)
    }

    fn digests(eviction: Eviction) -> HashSet<[u8; 32]> {
        match eviction {
            Eviction::Keys(keys) => keys.into_iter().map(|d| d.0).collect(),
            other => panic!("expected named keys, got {other:?}"),
        }
    }

    /// A key row holding `roles` (names), delegated from `ancestors` (root first); the
    /// rows of `api_key_roles` are written apart, as the key's own writes would.
    async fn key(
        conn: &impl ConnectionTrait,
        tenant: TenantId,
        workspace: Uuid,
        n: u16,
        roles: &[&str],
        ancestors: &[Uuid],
    ) -> Uuid {
        let now = db_now();
        let id = Uuid::now_v7();
        let model = api_key::Model {
            id,
            tenant_id: tenant.as_uuid(),
            workspace_id: workspace,
            name: String::new(),
            prefix: "kp".into(),
            key_digest: digest(n).0.to_vec(),
            last_four: "abcd".into(),
            owner_id: None,
            metadata: serde_json::json!({}),
            expire_time: None,
            disabled: false,
            revoke_time: None,
            last_used_time: None,
            replaced_by: None,
            revision: 1,
            request_id: None,
            create_time: now,
            update_time: now,
            rate_limits: serde_json::json!([]),
            usage_id: Some(id),
            parent_id: ancestors.last().copied(),
            delegation_depth: ancestors.len() as i16,
            ancestry: serde_json::json!(ancestors),
            roles: serde_json::json!(roles),
            allowed_cidrs: serde_json::json!([]),
        };
        api_key::Entity::insert(api_key::ActiveModel::from(model))
            .exec_without_returning(conn)
            .await
            .unwrap();
        for ancestor in ancestors {
            api_key_ancestor::Entity::insert(api_key_ancestor::ActiveModel {
                api_key_id: Set(id),
                ancestor_id: Set(*ancestor),
            })
            .exec_without_returning(conn)
            .await
            .unwrap();
        }
        id
    }

    async fn hold(conn: &impl ConnectionTrait, key: Uuid, role: Uuid) {
        api_key_role::Entity::insert(api_key_role::ActiveModel {
            api_key_id: Set(key),
            role_id: Set(role),
        })
        .exec_without_returning(conn)
        .await
        .unwrap();
    }

    async fn new_role(store: &Store, acting: &Acting, name: &str, scopes: &[&str]) -> Role {
        let new = NewRole {
            workspace_id: None,
            name: RoleName::parse(name).unwrap(),
            description: String::new(),
            scopes: scopes
                .iter()
                .map(|s| ScopeString::parse(s).unwrap())
                .collect(),
            request_id: None,
        };
        store.create_role(acting, new).await.unwrap()
    }

    async fn holders_and_descendants_are_evicted(postgres: bool) {
        let Some((store, _dir)) = store(postgres).await else {
            return;
        };
        let recorded = Arc::new(Recorded::default());
        let store = store.with_evictions(recorded.clone());
        let db = store.connection();
        let tenant = TenantId::new(Uuid::now_v7());
        let acting = acting(tenant);
        let workspace = store
            .create_workspace(
                &acting,
                NewWorkspace {
                    name: "w".into(),
                    description: String::new(),
                    company: None,
                    is_private: false,
                    is_personal: false,
                    owner_id: "tester".into(),
                    default_key_prefix: KeyPrefix::parse("kp").unwrap(),
                    labels: StringMap::new(),
                    max_key_ttl: None,
                    default_allowed_cidrs: Default::default(),
                    request_id: None,
                },
            )
            .await
            .unwrap()
            .id;
        store
            .create_scope(
                &acting,
                NewScope {
                    workspace_id: None,
                    scope: ScopeString::parse("crm:read").unwrap(),
                    name: "crm:read".into(),
                    description: String::new(),
                    category: "custom".into(),
                    request_id: None,
                },
            )
            .await
            .unwrap();
        let agent = new_role(&store, &acting, "agent", &[]).await;
        let reader = new_role(&store, &acting, "reader", &["crm:read"]).await;

        let holder = key(db, tenant, workspace, 1, &["agent", "other"], &[]).await;
        let child = key(db, tenant, workspace, 2, &[], &[holder]).await;
        key(db, tenant, workspace, 3, &[], &[holder, child]).await;
        key(db, tenant, workspace, 4, &[], &[]).await;
        let reading = key(db, tenant, workspace, 5, &["reader"], &[]).await;
        hold(db, holder, agent.id).await;
        hold(db, reading, reader.id).await;

        let family: HashSet<[u8; 32]> = [digest(1).0, digest(2).0, digest(3).0].into();
        let found = holders_eviction(db, tenant, &[agent.id]).await.unwrap();
        assert_eq!(digests(found), family, "the holder and its descendants");
        let other_tenant = TenantId::new(Uuid::now_v7());
        assert_eq!(
            holders_eviction(db, other_tenant, &[agent.id])
                .await
                .unwrap(),
            Eviction::None
        );
        assert_eq!(
            holders_eviction(db, tenant, &[]).await.unwrap(),
            Eviction::None
        );

        // A new scope list evicts them; a new description nothing.
        let rescope = Update {
            id: agent.id,
            patch: RolePatch {
                description: None,
                scopes: Some(vec![ScopeString::parse("crm:read").unwrap()]),
            },
            expected_revision: None,
        };
        let updated = store.update(&acting, rescope).await.unwrap();
        assert_eq!(updated.scopes, ["crm:read"]);
        assert_eq!(digests(recorded.last()), family);
        let describe = Update {
            id: agent.id,
            patch: RolePatch {
                description: Some("d".into()),
                scopes: None,
            },
            expected_revision: Some(updated.revision),
        };
        store.update(&acting, describe).await.unwrap();
        assert_eq!(recorded.last(), Eviction::None);

        // A scope's forced delete evicts the holders of the roles that lose it.
        let crm = store
            .list_scopes(tenant, None, false, None, 10)
            .await
            .unwrap()
            .items
            .remove(0);
        let refused = store
            .delete_scope(&acting, crm.id, false)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::Rule(RuleViolation::ScopeInUse(2))),
            "{refused:?}"
        );
        assert_eq!(store.delete_scope(&acting, crm.id, true).await.unwrap(), 0);
        let mut both = family.clone();
        both.insert(digest(5).0);
        assert_eq!(digests(recorded.last()), both);
        assert!(
            store
                .get_role(tenant, reader.id)
                .await
                .unwrap()
                .scopes
                .is_empty()
        );

        // A forced delete takes the role from its holder, and evicts it and its
        // descendants.
        let refused = store
            .delete_role(&acting, agent.id, false)
            .await
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::Rule(RuleViolation::RoleInUse(1))),
            "{refused:?}"
        );
        assert_eq!(store.delete_role(&acting, agent.id, true).await.unwrap(), 1);
        assert_eq!(digests(recorded.last()), family);
        let row = api_key::Entity::find_by_id(holder)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(row.roles, serde_json::json!(["other"]));
        assert_eq!(row.revision, 2, "the holder changed, so its etag did");
        let left = api_key_role::Entity::find()
            .filter(api_key_role::Column::ApiKeyId.eq(holder))
            .count(db)
            .await
            .unwrap();
        assert_eq!(left, 0);
        let untouched = api_key::Entity::find_by_id(reading)
            .one(db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (untouched.roles, untouched.revision),
            (serde_json::json!(["reader"]), 1)
        );
    }

    async fn a_large_role_flushes_the_cache(postgres: bool) {
        let Some((store, _dir)) = store(postgres).await else {
            return;
        };
        let db = store.connection();
        let tenant = TenantId::new(Uuid::now_v7());
        let acting = acting(tenant);
        let workspace = store
            .create_workspace(
                &acting,
                NewWorkspace {
                    name: "w".into(),
                    description: String::new(),
                    company: None,
                    is_private: false,
                    is_personal: false,
                    owner_id: "tester".into(),
                    default_key_prefix: KeyPrefix::parse("kp").unwrap(),
                    labels: StringMap::new(),
                    max_key_ttl: None,
                    default_allowed_cidrs: Default::default(),
                    request_id: None,
                },
            )
            .await
            .unwrap()
            .id;
        let role = new_role(&store, &acting, "crowd", &[]).await;
        let txn = store.begin_write().await.unwrap();
        for n in 0..=invalidation::MAX_NAMED as u16 {
            let id = key(&txn, tenant, workspace, n, &["crowd"], &[]).await;
            hold(&txn, id, role.id).await;
        }
        txn.commit().await.unwrap();
        assert_eq!(
            holders_eviction(db, tenant, &[role.id]).await.unwrap(),
            Eviction::All
        );
        assert_eq!(
            store.delete_role(&acting, role.id, true).await.unwrap(),
            invalidation::MAX_NAMED as u64 + 1
        );
        let still_named = api_key::Entity::find()
            .filter(api_key::Column::TenantId.eq(tenant.as_uuid()))
            .all(db)
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.roles != serde_json::json!([]))
            .count();
        assert_eq!(still_named, 0, "every holder lost it, across statements");
    }

    on_both!(
        holders_and_descendants_are_evicted,
        a_large_role_flushes_the_cache
    );
}
