//! `keyplane.v1.WorkspaceService`.
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{self, RequestCheck};
use super::{KeyplaneApi, caller};
use crate::domain::key::KeyPrefix;
use crate::domain::records::{NewWorkspace, WorkspacePatch};
use crate::domain::validate::{
    self, DESCRIPTION_MAX, NAME_MAX, OWNER_MAX, ValidationError, Validator,
};
use crate::proto::{self as pb, workspace_service_server::WorkspaceService};

const MUTABLE: &[&str] = &[
    "name",
    "description",
    "company",
    "is_private",
    "is_personal",
    "owner_id",
    "default_key_prefix",
    "labels",
];
const OUTPUT_ONLY: &[&str] = &[
    "id",
    "tenant_id",
    "source",
    "create_time",
    "update_time",
    "etag",
];

fn prefix(v: &mut Validator, field: &str, text: &str) -> Option<KeyPrefix> {
    let parsed = KeyPrefix::parse(text);
    if parsed.is_none() {
        v.add(field, "must match ^[a-z][a-z0-9]{0,15}$");
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
        "Untitled".to_owned()
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
    v.finish(|| NewWorkspace {
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

/// Parses and validates an update request: the id, the changes and the expected revision.
pub fn parse_update(
    r: pb::UpdateWorkspaceRequest,
) -> Result<(Uuid, WorkspacePatch, Option<i64>), ValidationError> {
    let mut v = Validator::new();
    let w = r.workspace.unwrap_or_default();
    let id = v.id("workspace.id", &w.id);
    let paths =
        convert::update_paths(
            &mut v,
            r.update_mask.as_ref(),
            MUTABLE,
            OUTPUT_ONLY,
            |p| match p {
                "name" => !w.name.is_empty(),
                "description" => !w.description.is_empty(),
                "company" => w.company.is_some(),
                "is_private" => w.is_private,
                "is_personal" => w.is_personal,
                "owner_id" => !w.owner_id.is_empty(),
                "default_key_prefix" => !w.default_key_prefix.is_empty(),
                "labels" => !w.labels.is_empty(),
                _ => false,
            },
        );
    let mut patch = WorkspacePatch::default();
    for path in &paths {
        match path.as_str() {
            "name" => patch.name = Some(validate::name(&mut v, "workspace.name", &w.name)),
            "description" => {
                patch.description =
                    Some(v.max_len("workspace.description", &w.description, DESCRIPTION_MAX))
            }
            "company" => {
                patch.company = Some(
                    w.company
                        .as_deref()
                        .filter(|c| !c.is_empty())
                        .map(|c| v.max_len("workspace.company", c, NAME_MAX)),
                )
            }
            "is_private" => patch.is_private = Some(w.is_private),
            "is_personal" => patch.is_personal = Some(w.is_personal),
            "owner_id" => {
                if w.owner_id.is_empty() {
                    v.add("workspace.owner_id", "must not be empty");
                }
                patch.owner_id = Some(v.max_len("workspace.owner_id", &w.owner_id, OWNER_MAX))
            }
            "default_key_prefix" => {
                patch.default_key_prefix = prefix(
                    &mut v,
                    "workspace.default_key_prefix",
                    &w.default_key_prefix,
                )
            }
            "labels" => {
                let labels = convert::sorted(w.labels.clone());
                validate::labels(&mut v, "workspace.labels", &labels);
                patch.labels = Some(labels);
            }
            _ => {}
        }
    }
    v.finish(|| {
        (
            id.unwrap_or_default(),
            patch,
            convert::expected_revision(&r.etag),
        )
    })
}

#[tonic::async_trait]
impl WorkspaceService for KeyplaneApi {
    async fn create_workspace(
        &self,
        request: Request<pb::CreateWorkspaceRequest>,
    ) -> Result<Response<pb::CreateWorkspaceResponse>, Status> {
        let caller = caller(&request)?;
        let tenant = caller.tenant()?;
        let new = parse_create(request.into_inner(), &caller.subject)?;
        let workspace = self.store.create_workspace(tenant, new).await?;
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
        let filters = format!("{:?}", ("workspaces", tenant));
        let mut v = Validator::new();
        let (size, after) =
            convert::page(&mut v, &self.pages, r.page_size, &r.page_token, &filters);
        v.finish(|| ())?;
        let page = self.store.list_workspaces(tenant, after, size).await?;
        let next_page_token = self.next_token(page.more, page.items.last().map(|w| w.id), &filters);
        Ok(Response::new(pb::ListWorkspacesResponse {
            workspaces: page.items.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_workspace(
        &self,
        request: Request<pb::UpdateWorkspaceRequest>,
    ) -> Result<Response<pb::UpdateWorkspaceResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let (id, patch, expected) = parse_update(request.into_inner())?;
        let workspace = self
            .store
            .update_workspace(tenant, id, patch, expected)
            .await?;
        Ok(Response::new(pb::UpdateWorkspaceResponse {
            workspace: Some(workspace.into()),
        }))
    }

    async fn delete_workspace(
        &self,
        request: Request<pb::DeleteWorkspaceRequest>,
    ) -> Result<Response<pb::DeleteWorkspaceResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let r = request.into_inner();
        let id = convert::parse_id("id", &r.id)?;
        let revoked = self.store.delete_workspace(tenant, id, r.force).await?;
        Ok(Response::new(pb::DeleteWorkspaceResponse {
            revoked_key_count: revoked as i64,
        }))
    }
}
