//! The authorization matrix (SPEC §2, §6): every RPC of the compiled descriptor sets ×
//! every kind of caller → the exact gRPC code and `ErrorInfo.reason`. An RPC added to the
//! protos without a row here fails `every_rpc_has_rows`. [`rows`] is the tests' one table of
//! RPCs and the built-in scope each needs, and [`call`] their one way to call any RPC:
//! `auth::builtin_scopes` drives off both.
use std::collections::BTreeSet;

use bytes::{Buf, BufMut};
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, attribute_context::HttpRequest, attribute_context::Request as HttpAttributes,
};
use keyplane::proto::{self as pb, ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET, FILE_DESCRIPTOR_SET};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};
use uuid::Uuid;

use keyplane_testkit::*;

on_both_backends!(authorization_matrix, authorization_matrix_over_http);

/// How the matrix calls: the same table, the same cases, the same expected codes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Grpc,
    /// HTTP/JSON at each RPC's google.api.http path; gRPC codes read back from the error
    /// body (whose HTTP status `http_json::call` checks against the code).
    Http,
}

/// The RPC paths the server was compiled with: keyplane's own, and Envoy's external
/// authorization (whose descriptors are compiled alongside for reflection).
fn compiled_rpcs() -> BTreeSet<String> {
    let mut paths = BTreeSet::new();
    for (encoded, package) in [
        (FILE_DESCRIPTOR_SET, "keyplane.v1"),
        (ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET, "envoy.service.auth.v3"),
    ] {
        let set = prost_types::FileDescriptorSet::decode(encoded).unwrap();
        for file in set.file.iter().filter(|f| f.package() == package) {
            for service in &file.service {
                for method in &service.method {
                    paths.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    assert!(
        paths.contains("/envoy.service.auth.v3.Authorization/Check"),
        "the ext_authz descriptors are missing"
    );
    paths
}

/// An Envoy check of an HTTP request presenting `key` in `x-api-key`, on a route needing
/// `required_scopes`.
pub fn check_request(key: &str, required_scopes: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(HttpAttributes {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            context_extensions: [("required_scopes".to_owned(), required_scopes.to_owned())].into(),
            ..Default::default()
        }),
    }
}

/// RPCs that answer a key's verdict in-band, so a platform token needs no x-tenant-id and
/// another tenant's key is a "not found" answer rather than an error.
fn verifies(row: &Row) -> bool {
    matches!(row.rpc(), "VerifyApiKey" | "Check")
}

/// What each RPC needs, and how to call it on a fixture.
pub struct Row {
    pub path: &'static str,
    /// The one built-in scope the RPC needs.
    pub scope: &'static str,
    /// The request, built against the resources of a fixture.
    pub request: fn(&Fixture) -> Vec<u8>,
    /// With another tenant's credential: NOT_FOUND for RPCs that name a resource, OK for
    /// those that do not (they act in the caller's own, empty tenant).
    names_a_resource: bool,
}

impl Row {
    /// The RPC's method name, e.g. `CreateWorkspace`.
    pub fn rpc(&self) -> &'static str {
        self.path.rsplit('/').next().unwrap()
    }
}

/// Resources of the app's tenant for one call.
pub struct Fixture {
    workspace: String,
    scope: String,
    role: String,
    key: String,
    secret: String,
}

impl Fixture {
    /// Ids that name nothing, for calls that only need to get past authorization.
    pub fn nothing() -> Self {
        Self {
            workspace: Uuid::now_v7().to_string(),
            scope: Uuid::now_v7().to_string(),
            role: Uuid::now_v7().to_string(),
            key: Uuid::now_v7().to_string(),
            secret: String::new(),
        }
    }
}

/// Every keyplane RPC: its path, its built-in scope and a request for it.
pub fn rows() -> Vec<Row> {
    vec![
        Row {
            path: "/keyplane.v1.WorkspaceService/CreateWorkspace",
            scope: "keyplane.workspaces:write",
            request: |_| {
                pb::CreateWorkspaceRequest {
                    name: "m".into(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: false,
        },
        Row {
            path: "/keyplane.v1.WorkspaceService/GetWorkspace",
            scope: "keyplane.workspaces:read",
            request: |f| {
                pb::GetWorkspaceRequest {
                    id: f.workspace.clone(),
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.WorkspaceService/ListWorkspaces",
            scope: "keyplane.workspaces:read",
            request: |_| pb::ListWorkspacesRequest::default().encode_to_vec(),
            names_a_resource: false,
        },
        Row {
            path: "/keyplane.v1.WorkspaceService/UpdateWorkspace",
            scope: "keyplane.workspaces:write",
            request: |f| {
                pb::UpdateWorkspaceRequest {
                    workspace: Some(pb::Workspace {
                        id: f.workspace.clone(),
                        name: "n".into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["name"]),
                    etag: String::new(),
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.WorkspaceService/DeleteWorkspace",
            scope: "keyplane.workspaces:write",
            request: |f| {
                pb::DeleteWorkspaceRequest {
                    id: f.workspace.clone(),
                    force: true,
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ScopeService/CreateScope",
            scope: "keyplane.scopes:write",
            request: |f| {
                pb::CreateScopeRequest {
                    workspace_id: f.workspace.clone(),
                    representation: "matrix:write".into(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ScopeService/GetScope",
            scope: "keyplane.scopes:read",
            request: |f| {
                pb::GetScopeRequest {
                    id: f.scope.clone(),
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ScopeService/ListScopes",
            scope: "keyplane.scopes:read",
            request: |f| {
                pb::ListScopesRequest {
                    workspace_id: f.workspace.clone(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ScopeService/UpdateScope",
            scope: "keyplane.scopes:write",
            request: |f| {
                pb::UpdateScopeRequest {
                    scope: Some(pb::Scope {
                        id: f.scope.clone(),
                        name: "n".into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["name"]),
                    etag: String::new(),
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ScopeService/DeleteScope",
            scope: "keyplane.scopes:write",
            request: |f| {
                pb::DeleteScopeRequest {
                    id: f.scope.clone(),
                    force: true,
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.RoleService/CreateRole",
            scope: "keyplane.roles:write",
            request: |f| {
                pb::CreateRoleRequest {
                    workspace_id: f.workspace.clone(),
                    name: "matrix-new".into(),
                    scopes: vec!["matrix:read".into()],
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.RoleService/GetRole",
            scope: "keyplane.roles:read",
            request: |f| pb::GetRoleRequest { id: f.role.clone() }.encode_to_vec(),
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.RoleService/ListRoles",
            scope: "keyplane.roles:read",
            request: |f| {
                pb::ListRolesRequest {
                    workspace_id: f.workspace.clone(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.RoleService/UpdateRole",
            scope: "keyplane.roles:write",
            request: |f| {
                pb::UpdateRoleRequest {
                    role: Some(pb::Role {
                        id: f.role.clone(),
                        description: "d".into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["description"]),
                    etag: String::new(),
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.RoleService/DeleteRole",
            scope: "keyplane.roles:write",
            request: |f| {
                pb::DeleteRoleRequest {
                    id: f.role.clone(),
                    force: true,
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/CreateApiKey",
            scope: "keyplane.api_keys:write",
            request: |f| {
                pb::CreateApiKeyRequest {
                    workspace_id: f.workspace.clone(),
                    scopes: vec!["matrix:read".into()],
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/GetApiKey",
            scope: "keyplane.api_keys:read",
            request: |f| pb::GetApiKeyRequest { id: f.key.clone() }.encode_to_vec(),
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/ListApiKeys",
            scope: "keyplane.api_keys:read",
            request: |f| {
                pb::ListApiKeysRequest {
                    workspace_id: f.workspace.clone(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/UpdateApiKey",
            scope: "keyplane.api_keys:write",
            request: |f| {
                pb::UpdateApiKeyRequest {
                    api_key: Some(pb::ApiKey {
                        id: f.key.clone(),
                        name: "n".into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["name"]),
                    etag: String::new(),
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/RevokeApiKey",
            scope: "keyplane.api_keys:write",
            request: |f| pb::RevokeApiKeyRequest { id: f.key.clone() }.encode_to_vec(),
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/RotateApiKey",
            scope: "keyplane.api_keys:write",
            request: |f| {
                pb::RotateApiKeyRequest {
                    id: f.key.clone(),
                    grace_period: None,
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/DeleteApiKey",
            scope: "keyplane.api_keys:write",
            request: |f| pb::DeleteApiKeyRequest { id: f.key.clone() }.encode_to_vec(),
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/AdjustApiKeyCredits",
            scope: "keyplane.api_keys:write",
            request: |f| {
                pb::AdjustApiKeyCreditsRequest {
                    id: f.key.clone(),
                    delta: 1,
                    ..Default::default()
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/VerifyApiKey",
            scope: "keyplane.api_keys:verify",
            request: |f| {
                pb::VerifyApiKeyRequest {
                    key: f.secret.clone(),
                    required_scopes: vec!["matrix:read".into()],
                    cost: None,
                    ..Default::default()
                }
                .encode_to_vec()
            },
            // Verification answers in-band: another tenant's key is VERIFY_CODE_NOT_FOUND.
            names_a_resource: false,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/DelegateApiKey",
            scope: "keyplane.api_keys:delegate",
            request: |_| {
                pb::DelegateApiKeyRequest {
                    name: "sub-agent".into(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            // The credential is the parent key: it names nothing else.
            names_a_resource: false,
        },
        Row {
            path: "/keyplane.v1.ApiKeyService/ImportApiKeys",
            scope: "keyplane.api_keys:write",
            request: |f| {
                pb::ImportApiKeysRequest {
                    workspace_id: f.workspace.clone(),
                    keys: vec![pb::ImportedApiKey {
                        // A fresh secret per call: every call imports something.
                        secret: Uuid::now_v7().to_string(),
                        scopes: vec!["matrix:read".into()],
                        ..Default::default()
                    }],
                }
                .encode_to_vec()
            },
            names_a_resource: true,
        },
        Row {
            path: "/keyplane.v1.AuditService/ListAuditEvents",
            scope: "keyplane.audit:read",
            request: |f| {
                pb::ListAuditEventsRequest {
                    resource_id: f.key.clone(),
                    ..Default::default()
                }
                .encode_to_vec()
            },
            // A filter, not a lookup: another tenant lists its own (empty) log.
            names_a_resource: false,
        },
        Row {
            path: "/envoy.service.auth.v3.Authorization/Check",
            scope: "keyplane.api_keys:verify",
            request: |f| check_request(&f.secret, "matrix:read").encode_to_vec(),
            // A deny for Envoy is a successful call, as for VerifyApiKey.
            names_a_resource: false,
        },
    ]
}

#[test]
fn every_rpc_has_rows() {
    let in_table: BTreeSet<String> = rows().iter().map(|r| r.path.to_owned()).collect();
    assert_eq!(
        compiled_rpcs(),
        in_table,
        "every compiled RPC needs rows in the matrix, and only those"
    );
}

/// Sends and receives raw protobuf bytes, so one function can call any RPC by path.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// Calls the RPC of `row` as `client`'s caller with the row's request on `fixture`.
pub async fn call(client: &Client, row: &Row, fixture: &Fixture) -> Result<Vec<u8>, Status> {
    let mut grpc = client.grpc();
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new((row.request)(fixture)),
        http::uri::PathAndQuery::from_static(row.path),
        RawCodec,
    )
    .await
    .map(|r| r.into_inner())
}

async fn fixture(app: &TestApp) -> Fixture {
    let workspace = app.create_workspace("matrix").await.id;
    app.create_scope("matrix:read", &workspace).await;
    let scope = app.create_scope("matrix:delete", &workspace).await.id;
    let role = app
        .create_role("matrix", &workspace, &["matrix:read"])
        .await
        .id;
    // With credits, so that AdjustApiKeyCredits has something to adjust.
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: workspace.clone(),
            name: "matrix".into(),
            scopes: vec!["matrix:read".into()],
            remaining_uses: Some(1_000_000),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    Fixture {
        workspace,
        scope,
        role,
        key: created.api_key.unwrap().id,
        secret: created.secret,
    }
}

/// An admin key of the app's tenant holding exactly `scopes`.
async fn admin_key(app: &TestApp, scopes: &[&str]) -> (String, String) {
    let workspace = app.create_workspace("admins").await.id;
    let (key, secret) = app.create_key(&workspace, scopes).await;
    (key.id, secret)
}

enum Expect {
    Ok,
    Err(Code, &'static str),
}

async fn authorization_matrix(backend: Backend) {
    matrix_over(backend, Transport::Grpc).await;
}

async fn authorization_matrix_over_http(backend: Backend) {
    matrix_over(backend, Transport::Http).await;
}

async fn matrix_over(backend: Backend, transport: Transport) {
    let app = spawn_app(backend).await;
    let own = app.tenant.to_string();
    let other = Uuid::now_v7();
    let all = all_builtin();
    let (revoked_admin_id, revoked_admin) = admin_key(&app, &all).await;
    app.revoke_key(&revoked_admin_id).await;

    let mut failures = Vec::new();
    for row in rows() {
        // Envoy's check is a gRPC service of Envoy's, with no HTTP binding.
        if transport == Transport::Http && !row.path.starts_with("/keyplane.v1.") {
            continue;
        }
        let others: Vec<&str> = all.iter().copied().filter(|s| *s != row.scope).collect();
        let a_different_one = vec![*others.first().unwrap()];
        let (_, with_scope) = admin_key(&app, &[row.scope]).await;
        let (_, without_scope) = admin_key(&app, &others).await;
        let other_result = if row.names_a_resource {
            Expect::Err(Code::NotFound, "NOT_FOUND")
        } else {
            Expect::Ok
        };
        let platform_without_header = if verifies(&row) {
            Expect::Ok
        } else {
            Expect::Err(Code::InvalidArgument, "TENANT_ID_REQUIRED")
        };
        let cases: Vec<(&str, Cred, Option<String>, Expect)> = vec![
            ("tenant token, own resource", app.admin(), None, Expect::Ok),
            (
                "tenant token, own resource, matching x-tenant-id",
                app.admin(),
                Some(own.clone()),
                Expect::Ok,
            ),
            (
                "other tenant's token on this tenant's resource",
                Cred::Bearer(token(Some(other), &all)),
                None,
                other_result,
            ),
            (
                "platform token with x-tenant-id",
                Cred::Bearer(token(None, &all)),
                Some(own.clone()),
                Expect::Ok,
            ),
            (
                "platform token without x-tenant-id",
                Cred::Bearer(token(None, &all)),
                None,
                platform_without_header,
            ),
            (
                "x-tenant-id not the token's tenant",
                app.admin(),
                Some(other.to_string()),
                Expect::Err(Code::PermissionDenied, "TENANT_MISMATCH"),
            ),
            (
                "token lacking the RPC's scope",
                Cred::Bearer(token(Some(app.tenant), &others)),
                None,
                Expect::Err(Code::PermissionDenied, "MISSING_SCOPE"),
            ),
            (
                "token holding only a different built-in scope",
                Cred::Bearer(token(Some(app.tenant), &a_different_one)),
                None,
                Expect::Err(Code::PermissionDenied, "MISSING_SCOPE"),
            ),
            (
                "no credential",
                Cred::None,
                None,
                Expect::Err(Code::Unauthenticated, "CREDENTIALS_MISSING"),
            ),
            (
                "admin key with the scope",
                Cred::ApiKey(with_scope.clone()),
                None,
                Expect::Ok,
            ),
            (
                "admin key with x-tenant-id of another tenant",
                Cred::ApiKey(with_scope),
                Some(other.to_string()),
                Expect::Err(Code::PermissionDenied, "TENANT_MISMATCH"),
            ),
            (
                "admin key without the scope",
                Cred::ApiKey(without_scope),
                None,
                Expect::Err(Code::PermissionDenied, "MISSING_SCOPE"),
            ),
            (
                "revoked admin key",
                Cred::ApiKey(revoked_admin.clone()),
                None,
                Expect::Err(Code::Unauthenticated, "API_KEY_INVALID"),
            ),
        ];
        for (case, cred, tenant, expect) in cases {
            // A token that gets past the table still has no key to delegate from.
            let expect = match (&expect, &cred) {
                (Expect::Ok, Cred::Bearer(_)) if row.rpc() == "DelegateApiKey" => {
                    Expect::Err(Code::PermissionDenied, "DELEGATION_NEEDS_API_KEY")
                }
                _ => expect,
            };
            let result = match transport {
                Transport::Grpc => {
                    let client = match &tenant {
                        Some(t) => app.client(&cred).tenant(t),
                        None => app.client(&cred),
                    };
                    call(&client, &row, &fixture(&app).await).await
                }
                Transport::Http => {
                    crate::http_json::call(
                        &app,
                        &cred,
                        tenant.as_deref(),
                        &row,
                        &fixture(&app).await,
                    )
                    .await
                }
            };
            let ok = match (&expect, &result) {
                (Expect::Ok, Ok(_)) => true,
                (Expect::Err(code, why), Err(status)) => {
                    status.code() == *code && reason(status) == *why
                }
                _ => false,
            };
            if !ok {
                let wanted = match expect {
                    Expect::Ok => "OK".to_string(),
                    Expect::Err(code, why) => format!("{code:?} {why}"),
                };
                let got = match &result {
                    Ok(_) => "OK".to_string(),
                    Err(s) => format!("{:?} {} ({})", s.code(), reason(s), s.message()),
                };
                failures.push(format!("{} × {case}: wanted {wanted}, got {got}", row.path));
            }
            // Verification of another tenant's key succeeds as a call but must not find it.
            if row.path.ends_with("/VerifyApiKey")
                && case.starts_with("other tenant")
                && let Ok(bytes) = &result
            {
                let response = pb::VerifyApiKeyResponse::decode(bytes.as_slice()).unwrap();
                assert_eq!(response.code(), pb::VerifyCode::NotFound);
                assert!(response.api_key.is_none() && response.tenant_id.is_empty());
            }
            // So is Envoy's check: a 401 deny, never an allow.
            if row.rpc() == "Check"
                && let Ok(bytes) = &result
            {
                let response = CheckResponse::decode(bytes.as_slice()).unwrap();
                let verdict = match &response.http_response {
                    Some(HttpResponse::DeniedResponse(d)) => d.body.clone(),
                    Some(HttpResponse::OkResponse(_)) => "allowed".to_owned(),
                    other => format!("no verdict: {other:?}"),
                };
                let allowed = verdict == "allowed";
                let wanted_allow = !case.starts_with("other tenant");
                assert_eq!(allowed, wanted_allow, "Check × {case}: {verdict}");
                if !wanted_allow {
                    assert!(verdict.contains("VERIFY_CODE_NOT_FOUND"), "{verdict}");
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} cells wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
