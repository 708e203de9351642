//! `keyplane.v1.RoleService`.
use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::convert::{self, Patchable, RequestCheck, timestamp};
use super::{KeyplaneApi, acting, caller};
use crate::domain::page::{ListFingerprint, ListKind};
use crate::domain::records;
use crate::domain::role::{NewRole, Role, RoleName, RolePatch};
use crate::domain::update::Update;
use crate::domain::validate::{DESCRIPTION_MAX, ValidationError, Validator};
use crate::proto::{self as pb, role_service_server::RoleService};

const NAME_RULE: &str = "must match [a-z0-9_.-]{1,64}";

/// Parses and validates a create request.
pub fn parse_create(r: pb::CreateRoleRequest) -> Result<NewRole, ValidationError> {
    let mut v = Validator::new();
    let workspace_id = v.optional_id("workspace_id", &r.workspace_id);
    let name = RoleName::parse(&r.name);
    if name.is_none() {
        v.add("name", NAME_RULE);
    }
    let description = v.max_len("description", &r.description, DESCRIPTION_MAX);
    let scopes = v.scopes("scopes", &r.scopes);
    let request_id = convert::request_id(&mut v, &r.request_id);
    let (description, scopes, request_id) = v.finish(|| (description, scopes, request_id))?;
    // A missing name recorded a violation above.
    let name = name.ok_or_else(|| ValidationError::single("name", NAME_RULE))?;
    Ok(NewRole {
        workspace_id,
        name,
        description,
        scopes,
        request_id,
    })
}

impl From<Role> for pb::Role {
    fn from(r: Role) -> Self {
        pb::Role {
            id: r.id.to_string(),
            tenant_id: r.tenant_id.to_string(),
            workspace_id: r.workspace_id.map(|w| w.to_string()).unwrap_or_default(),
            name: r.name,
            description: r.description,
            scopes: r.scopes,
            create_time: Some(timestamp(r.create_time)),
            update_time: Some(timestamp(r.update_time)),
            etag: records::etag(r.revision),
        }
    }
}

impl Patchable for pb::Role {
    type Patch = RolePatch;
    const FIELD: &'static str = "role";
    const MUTABLE: &'static [&'static str] = &["description", "scopes"];
    // The name and the workspace are set on create: keys hold the role by them.
    const OUTPUT_ONLY: &'static [&'static str] = &[
        "id",
        "tenant_id",
        "workspace_id",
        "name",
        "create_time",
        "update_time",
        "etag",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn sets(&self, path: &str) -> bool {
        match path {
            "description" => !self.description.is_empty(),
            "scopes" => !self.scopes.is_empty(),
            _ => false,
        }
    }

    fn patch(&self, v: &mut Validator, path: &str, _: DateTime<Utc>, patch: &mut RolePatch) {
        match path {
            "description" => {
                patch.description =
                    Some(v.max_len("role.description", &self.description, DESCRIPTION_MAX))
            }
            "scopes" => patch.scopes = Some(v.scopes("role.scopes", &self.scopes)),
            _ => {}
        }
    }
}

/// Parses and validates an update request.
pub fn parse_update(r: pb::UpdateRoleRequest) -> Result<Update<RolePatch>, ValidationError> {
    convert::parse_update(r.role, r.update_mask.as_ref(), &r.etag, Utc::now())
}

#[tonic::async_trait]
impl RoleService for KeyplaneApi {
    async fn create_role(
        &self,
        request: Request<pb::CreateRoleRequest>,
    ) -> Result<Response<pb::CreateRoleResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let new = parse_create(request.into_inner())?;
        // No escalation through roles: a role is put on keys, so it may hold only the
        // built-in scopes its author holds.
        caller.may_grant(new.scopes.iter().map(|s| s.as_str()))?;
        let role = self.store.create_role(&acting, new).await?;
        Ok(Response::new(pb::CreateRoleResponse {
            role: Some(role.into()),
        }))
    }

    async fn get_role(
        &self,
        request: Request<pb::GetRoleRequest>,
    ) -> Result<Response<pb::GetRoleResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let role = self.store.get_role(tenant, id).await?;
        Ok(Response::new(pb::GetRoleResponse {
            role: Some(role.into()),
        }))
    }

    async fn list_roles(
        &self,
        request: Request<pb::ListRolesRequest>,
    ) -> Result<Response<pb::ListRolesResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let r = request.into_inner();
        let mut v = Validator::new();
        let workspace_id = v.optional_id("workspace_id", &r.workspace_id);
        let list = ListFingerprint::new(ListKind::Roles, tenant)
            .filter(workspace_id.as_ref().map(|w| w.as_bytes().as_slice()));
        let (size, after) = convert::page(&mut v, &self.pages, r.page_size, &r.page_token, &list);
        v.finish(|| ())?;
        let page = self
            .store
            .list_roles(tenant, workspace_id, after, size)
            .await?;
        let next_page_token = self.next_token(&page, |r| r.id, &list);
        Ok(Response::new(pb::ListRolesResponse {
            roles: page.items.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_role(
        &self,
        request: Request<pb::UpdateRoleRequest>,
    ) -> Result<Response<pb::UpdateRoleResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let update = parse_update(request.into_inner())?;
        // A role holding built-in scopes is changed only by a caller holding them, both
        // those it holds and those it is given.
        let current = self.store.get_role(acting.tenant, update.id).await?;
        let mut scopes: BTreeSet<&str> = current.scopes.iter().map(String::as_str).collect();
        scopes.extend(update.patch.scopes.iter().flatten().map(|s| s.as_str()));
        caller.may_grant(scopes)?;
        let role = self.store.update(&acting, update).await?;
        Ok(Response::new(pb::UpdateRoleResponse {
            role: Some(role.into()),
        }))
    }

    async fn delete_role(
        &self,
        request: Request<pb::DeleteRoleRequest>,
    ) -> Result<Response<pb::DeleteRoleResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let r = request.into_inner();
        let id = convert::parse_id("id", &r.id)?;
        let removed = self.store.delete_role(&acting, id, r.force).await?;
        Ok(Response::new(pb::DeleteRoleResponse {
            removed_holder_count: i64::try_from(removed).unwrap_or(i64::MAX),
        }))
    }
}
