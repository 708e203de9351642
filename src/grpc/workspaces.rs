//! `keyplane.v1.WorkspaceService`.
use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::convert::{self, Patchable};
use super::{KeyplaneApi, acting, caller};
use crate::domain::key::{KeyPrefix, PREFIX_RULE};
use crate::domain::network::allowed_networks;
use crate::domain::page::{ListFingerprint, ListKind};
use crate::domain::records::{NewWorkspace, WorkspacePatch};
use crate::domain::rules::{DEFAULT_WORKSPACE_NAME, KeyTtl};
use crate::domain::update::Update;
use crate::domain::validate::{
    self, DESCRIPTION_MAX, NAME_MAX, OWNER_MAX, ValidationError, Validator,
};
use crate::proto::{self as pb, workspace_service_server::WorkspaceService};

fn max_key_ttl(v: &mut Validator, field: &str, ttl: &prost_types::Duration) -> Option<KeyTtl> {
    let ttl = convert::span(Some(ttl)).map(KeyTtl::new)?;
    v.check(field, ttl)
}

fn prefix(v: &mut Validator, field: &str, text: &str) -> Option<KeyPrefix> {
    let parsed = KeyPrefix::parse(text);
    if parsed.is_none() {
        v.add(field, format!("must be {PREFIX_RULE}"));
    }
    parsed
}

/// Parses and validates a create request; `subject` is the default owner.
pub fn parse_create(
    r: pb::CreateWorkspaceRequest,
    subject: &str,
) -> Result<NewWorkspace, ValidationError> {
    let mut v = Validator::new();
    let name = if r.name.trim().is_empty() {
        DEFAULT_WORKSPACE_NAME.to_owned()
    } else {
        validate::name(&mut v, "name", &r.name)
    };
    let description = v.max_len("description", &r.description, DESCRIPTION_MAX);
    let company = r.company.map(|c| v.max_len("company", &c, NAME_MAX));
    let owner_id = if r.owner_id.is_empty() {
        subject.to_owned()
    } else {
        v.max_len("owner_id", &r.owner_id, OWNER_MAX)
    };
    let default_key_prefix = if r.default_key_prefix.is_empty() {
        Some(KeyPrefix::default_prefix())
    } else {
        prefix(&mut v, "default_key_prefix", &r.default_key_prefix)
    };
    let labels = convert::sorted(r.labels);
    validate::labels(&mut v, "labels", &labels);
    let request_id = convert::request_id(&mut v, &r.request_id);
    let ttl = r
        .max_key_ttl
        .as_ref()
        .and_then(|t| max_key_ttl(&mut v, "max_key_ttl", t));
    let default_allowed_cidrs =
        allowed_networks(&mut v, "default_allowed_cidrs", &r.default_allowed_cidrs);
    v.finish(|| NewWorkspace {
        max_key_ttl: ttl,
        default_allowed_cidrs,
        name,
        description,
        company,
        is_private: r.is_private,
        is_personal: r.is_personal,
        owner_id,
        default_key_prefix: default_key_prefix.unwrap_or_else(KeyPrefix::default_prefix),
        labels,
        request_id,
    })
}

impl Patchable for pb::Workspace {
    type Patch = WorkspacePatch;
    const FIELD: &'static str = "workspace";
    const MUTABLE: &'static [&'static str] = &[
        "name",
        "description",
        "company",
        "is_private",
        "is_personal",
        "owner_id",
        "default_key_prefix",
        "labels",
        "max_key_ttl",
        "default_allowed_cidrs",
    ];
    const OUTPUT_ONLY: &'static [&'static str] = &[
        "id",
        "tenant_id",
        "source",
        "create_time",
        "update_time",
        "etag",
    ];

    fn id(&self) -> &str {
        &self.id
    }

    fn sets(&self, path: &str) -> bool {
        match path {
            "name" => !self.name.is_empty(),
            "description" => !self.description.is_empty(),
            "company" => self.company.is_some(),
            "is_private" => self.is_private,
            "is_personal" => self.is_personal,
            "owner_id" => !self.owner_id.is_empty(),
            "default_key_prefix" => !self.default_key_prefix.is_empty(),
            "labels" => !self.labels.is_empty(),
            "max_key_ttl" => self.max_key_ttl.is_some(),
            "default_allowed_cidrs" => !self.default_allowed_cidrs.is_empty(),
            _ => false,
        }
    }

    fn patch(&self, v: &mut Validator, path: &str, _: DateTime<Utc>, patch: &mut WorkspacePatch) {
        match path {
            "name" => patch.name = Some(validate::name(v, "workspace.name", &self.name)),
            "description" => {
                patch.description =
                    Some(v.max_len("workspace.description", &self.description, DESCRIPTION_MAX))
            }
            "company" => {
                patch.company = Some(
                    self.company
                        .as_deref()
                        .filter(|c| !c.is_empty())
                        .map(|c| v.max_len("workspace.company", c, NAME_MAX)),
                )
            }
            "is_private" => patch.is_private = Some(self.is_private),
            "is_personal" => patch.is_personal = Some(self.is_personal),
            "owner_id" => {
                if self.owner_id.is_empty() {
                    v.add("workspace.owner_id", "must not be empty");
                }
                patch.owner_id = Some(v.max_len("workspace.owner_id", &self.owner_id, OWNER_MAX))
            }
            "default_key_prefix" => {
                patch.default_key_prefix =
                    prefix(v, "workspace.default_key_prefix", &self.default_key_prefix)
            }
            "labels" => {
                let labels = convert::sorted(self.labels.clone());
                validate::labels(v, "workspace.labels", &labels);
                patch.labels = Some(labels);
            }
            // Named but absent: no limit.
            "max_key_ttl" => {
                patch.max_key_ttl = Some(
                    self.max_key_ttl
                        .as_ref()
                        .and_then(|t| max_key_ttl(v, "workspace.max_key_ttl", t)),
                )
            }
            "default_allowed_cidrs" => {
                patch.default_allowed_cidrs = Some(allowed_networks(
                    v,
                    "workspace.default_allowed_cidrs",
                    &self.default_allowed_cidrs,
                ))
            }
            _ => {}
        }
    }
}

/// Parses and validates an update request.
pub fn parse_update(
    r: pb::UpdateWorkspaceRequest,
) -> Result<Update<WorkspacePatch>, ValidationError> {
    convert::parse_update(r.workspace, r.update_mask.as_ref(), &r.etag, Utc::now())
}

#[tonic::async_trait]
impl WorkspaceService for KeyplaneApi {
    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::CreateWorkspaceResponse>, Status> {
        let (caller, acting) = acting(&request)?;
        let new = parse_create(request.into_inner(), &caller.subject)?;
        let workspace = self.store.create_workspace(&acting, new).await?;
        Ok(Response::new(pb::CreateWorkspaceResponse {
            workspace: Some(workspace.into()),
        }))
    }

    async fn get_workspace(
        &self,
        request: Request<pb::GetWorkspaceRequest>,
    ) -> Result<Response<pb::GetWorkspaceResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let workspace = self.store.get_workspace(tenant, id).await?;
        Ok(Response::new(pb::GetWorkspaceResponse {
            workspace: Some(workspace.into()),
        }))
    }

    async fn list_workspaces(
        &self,
        request: Request<pb::ListWorkspacesRequest>,
    ) -> Result<Response<pb::ListWorkspacesResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let r = request.into_inner();
        let list = ListFingerprint::new(ListKind::Workspaces, tenant);
        let mut v = Validator::new();
        let (size, after) = convert::page(&mut v, &self.pages, r.page_size, &r.page_token, &list);
        v.finish(|| ())?;
        let page = self.store.list_workspaces(tenant, after, size).await?;
        let next_page_token = self.next_token(&page, |w| w.id, &list);
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: page.items.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_workspace(
        &self,
        request: Request<pb::UpdateWorkspaceRequest>,
    ) -> Result<Response<pb::UpdateWorkspaceResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let update = parse_update(request.into_inner())?;
        let workspace = self.store.update(&acting, update).await?;
        Ok(Response::new(pb::UpdateWorkspaceResponse {
            workspace: Some(workspace.into()),
        }))
    }

    async fn delete_workspace(
        &self,
        request: Request<pb::DeleteWorkspaceRequest>,
    ) -> Result<Response<pb::DeleteWorkspaceResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let r = request.into_inner();
        let id = convert::parse_id("id", &r.id)?;
        let revoked = self.store.delete_workspace(&acting, id, r.force).await?;
        Ok(Response::new(pb::DeleteWorkspaceResponse {
            revoked_key_count: revoked as i64,
        }))
    }
}
