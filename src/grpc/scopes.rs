//! `keyplane.v1.ScopeService`.
use chrono::{DateTime, Utc};
use tonic::{Request, Response, Status};

use super::convert::{self, Patchable, RequestCheck};
use super::error::ApiError;
use super::{KeyplaneApi, acting, caller};
use crate::domain::page::{ListFingerprint, ListKind};
use crate::domain::records::{NewScope, ScopePatch};
use crate::domain::rules::{DEFAULT_SCOPE_CATEGORY, RuleViolation};
use crate::domain::scope::{BuiltinScope, ScopeError, ScopeString};
use crate::domain::update::Update;
use crate::domain::validate::{DESCRIPTION_MAX, NAME_MAX, ValidationError, Validator};
use crate::proto::{self as pb, scope_service_server::ScopeService};

const CATEGORY_MAX: usize = 64;

/// Parses and validates a create request.
pub fn parse_create(r: pb::CreateScopeRequest) -> Result<NewScope, ApiError> {
    let mut v = Validator::new();
    let workspace_id = v.optional_id("workspace_id", &r.workspace_id);
    let from_representation = !r.representation.is_empty();
    let parsed = match (
        from_representation,
        r.resource.is_empty() && r.action.is_empty(),
    ) {
        (true, false) => {
            v.add(
                "representation",
                "give either resource and action, or representation",
            );
            None
        }
        (false, true) => {
            v.add("resource", "is required (or give representation)");
            None
        }
        (false, false) => Some(ScopeString::from_parts(&r.resource, &r.action)),
        (true, true) => Some(ScopeString::parse(&r.representation)),
    };
    let scope = match parsed {
        Some(Ok(s)) if BuiltinScope::parse(s.as_str()).is_some() => {
            return Err(RuleViolation::BuiltinExists(s).into());
        }
        Some(Ok(s)) if s.is_reserved() => {
            let field = if from_representation {
                "representation"
            } else {
                "resource"
            };
            v.add(field, ScopeError::Reserved.to_string());
            None
        }
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            let field = match (from_representation, &e) {
                (true, _) => "representation",
                (false, ScopeError::Action) => "action",
                (false, _) => "resource",
            };
            v.add(field, e.to_string());
            None
        }
        None => None,
    };
    let name = if r.name.trim().is_empty() {
        scope.as_ref().map(ToString::to_string).unwrap_or_default()
    } else {
        v.max_len("name", r.name.trim(), NAME_MAX)
    };
    let description = v.max_len("description", &r.description, DESCRIPTION_MAX);
    let category = if r.category.is_empty() {
        DEFAULT_SCOPE_CATEGORY.to_owned()
    } else {
        v.max_len("category", &r.category, CATEGORY_MAX)
    };
    let request_id = convert::request_id(&mut v, &r.request_id);
    let (description, category, request_id) = v.finish(|| (description, category, request_id))?;
    // Every path that leaves `scope` empty recorded a violation above.
    let Some(scope) = scope else {
        return Err(ValidationError::single("resource", "is required").into());
    };
    Ok(NewScope {
        workspace_id,
        scope,
        name,
        description,
        category,
        request_id,
    })
}

impl Patchable for pb::Scope {
    type Patch = ScopePatch;
    const FIELD: &'static str = "scope";
    const MUTABLE: &'static [&'static str] = &["name", "description", "category"];
    const OUTPUT_ONLY: &'static [&'static str] = &[
        "id",
        "tenant_id",
        "workspace_id",
        "resource",
        "action",
        "scope",
        "builtin",
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
            "category" => !self.category.is_empty(),
            _ => false,
        }
    }

    fn patch(&self, v: &mut Validator, path: &str, _: DateTime<Utc>, patch: &mut ScopePatch) {
        match path {
            "name" => patch.name = Some(v.max_len("scope.name", self.name.trim(), NAME_MAX)),
            "description" => {
                patch.description =
                    Some(v.max_len("scope.description", &self.description, DESCRIPTION_MAX))
            }
            "category" => {
                let category = if self.category.is_empty() {
                    DEFAULT_SCOPE_CATEGORY
                } else {
                    &self.category
                };
                patch.category = Some(v.max_len("scope.category", category, CATEGORY_MAX))
            }
            _ => {}
        }
    }
}

/// Parses and validates an update request.
pub fn parse_update(r: pb::UpdateScopeRequest) -> Result<Update<ScopePatch>, ValidationError> {
    convert::parse_update(r.scope, r.update_mask.as_ref(), &r.etag, Utc::now())
}

#[tonic::async_trait]
impl ScopeService for KeyplaneApi {
    async fn create_scope(
        &self,
        request: Request<pb::CreateScopeRequest>,
    ) -> Result<Response<pb::CreateScopeResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let new = parse_create(request.into_inner())?;
        let scope = self.store.create_scope(&acting, new).await?;
        Ok(Response::new(pb::CreateScopeResponse {
            scope: Some(scope.into()),
        }))
    }

    async fn get_scope(
        &self,
        request: Request<pb::GetScopeRequest>,
    ) -> Result<Response<pb::GetScopeResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        let scope = self.store.get_scope(tenant, id).await?;
        Ok(Response::new(pb::GetScopeResponse {
            scope: Some(scope.into()),
        }))
    }

    async fn list_scopes(
        &self,
        request: Request<pb::ListScopesRequest>,
    ) -> Result<Response<pb::ListScopesResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let r = request.into_inner();
        let mut v = Validator::new();
        let workspace_id = v.optional_id("workspace_id", &r.workspace_id);
        let list = ListFingerprint::new(ListKind::Scopes, tenant)
            .filter(workspace_id.as_ref().map(|w| w.as_bytes().as_slice()))
            .flag(r.exclude_builtin);
        let (size, after) = convert::page(&mut v, &self.pages, r.page_size, &r.page_token, &list);
        v.finish(|| ())?;
        let page = self
            .store
            .list_scopes(tenant, workspace_id, !r.exclude_builtin, after, size)
            .await?;
        let next_page_token = self.next_token(&page, |s| s.id, &list);
        Ok(Response::new(pb::ListScopesResponse {
            scopes: page.items.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_scope(
        &self,
        request: Request<pb::UpdateScopeRequest>,
    ) -> Result<Response<pb::UpdateScopeResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let update = parse_update(request.into_inner())?;
        let scope = self.store.update(&acting, update).await?;
        Ok(Response::new(pb::UpdateScopeResponse {
            scope: Some(scope.into()),
        }))
    }

    async fn delete_scope(
        &self,
        request: Request<pb::DeleteScopeRequest>,
    ) -> Result<Response<pb::DeleteScopeResponse>, Status> {
        let (_, acting) = acting(&request)?;
        let r = request.into_inner();
        let id = convert::parse_id("id", &r.id)?;
        let removed = self.store.delete_scope(&acting, id, r.force).await?;
        Ok(Response::new(pb::DeleteScopeResponse {
            removed_grant_count: removed as i64,
        }))
    }
}
