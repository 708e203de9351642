//! Credentials and typed clients: test tokens ([`token`], [`stranger`]), a [`Client`] of
//! every service that calls as one [`Cred`], the actions a scenario takes with it
//! ([`Client::create_workspace`], [`Client::verify`], [`Client::revoke_key`],
//! [`Client::disable_key`]), `.inner()` and
//! `.resource()` on responses, and small request builders.
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest,
    attribute_context::{HttpRequest, Request as HttpAttributes},
};
use keyplane::auth::jwt::{MintClaims, mint_hs256};
use keyplane::domain::scope::BuiltinScope;
use keyplane::proto::{
    self as pb, api_key_service_client::ApiKeyServiceClient,
    audit_service_client::AuditServiceClient, role_service_client::RoleServiceClient,
    scope_service_client::ScopeServiceClient, workspace_service_client::WorkspaceServiceClient,
};
use prost_types::{FieldMask, Timestamp};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// The HS256 secret every test app accepts tokens signed with.
pub const JWT_SECRET: &str = "keyplane-test-secret-0123456789abcdef";

/// A credential to call with.
#[derive(Clone, Debug)]
pub enum Cred {
    /// No credential at all.
    None,
    /// `authorization: Bearer <token>`.
    Bearer(String),
    /// `x-api-key: <secret>`.
    ApiKey(String),
    /// This exact `authorization` header value, well-formed or not.
    Authorization(String),
}

/// A bearer token credential.
pub fn bearer(token: impl Into<String>) -> Cred {
    Cred::Bearer(token.into())
}

/// The interceptor of a [`Client`]: adds the credential, and `x-tenant-id` when set, to
/// every request.
#[derive(Clone, Debug)]
pub struct Auth {
    cred: Cred,
    tenant: Option<String>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let md = request.metadata_mut();
        match &self.cred {
            Cred::None => {}
            Cred::Bearer(t) => {
                md.insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            Cred::ApiKey(k) => {
                md.insert("x-api-key", k.parse().unwrap());
            }
            Cred::Authorization(value) => {
                md.insert("authorization", value.parse().unwrap());
            }
        }
        if let Some(tenant) = &self.tenant {
            md.insert("x-tenant-id", tenant.parse().unwrap());
        }
        Ok(request)
    }
}

/// A channel whose requests carry a credential.
pub type Authed = InterceptedService<Channel, Auth>;

/// The generated clients of keyplane's services, all calling as one credential.
#[derive(Clone)]
pub struct Client {
    /// `keyplane.v1.WorkspaceService`.
    pub workspaces: WorkspaceServiceClient<Authed>,
    /// `keyplane.v1.ScopeService`.
    pub scopes: ScopeServiceClient<Authed>,
    /// `keyplane.v1.RoleService`.
    pub roles: RoleServiceClient<Authed>,
    /// `keyplane.v1.ApiKeyService`.
    pub keys: ApiKeyServiceClient<Authed>,
    /// `keyplane.v1.AuditService`.
    pub audit: AuditServiceClient<Authed>,
    channel: Channel,
    auth: Auth,
}

impl Client {
    /// Every service on `channel`, called with `cred`.
    pub fn new(channel: Channel, cred: &Cred) -> Self {
        Self::with(
            channel,
            Auth {
                cred: cred.clone(),
                tenant: None,
            },
        )
    }

    fn with(channel: Channel, auth: Auth) -> Self {
        Self {
            workspaces: WorkspaceServiceClient::with_interceptor(channel.clone(), auth.clone()),
            scopes: ScopeServiceClient::with_interceptor(channel.clone(), auth.clone()),
            roles: RoleServiceClient::with_interceptor(channel.clone(), auth.clone()),
            keys: ApiKeyServiceClient::with_interceptor(channel.clone(), auth.clone()),
            audit: AuditServiceClient::with_interceptor(channel.clone(), auth.clone()),
            channel,
            auth,
        }
    }

    /// The same caller naming `tenant` in `x-tenant-id` (any text, valid or not).
    pub fn tenant(&self, tenant: impl std::fmt::Display) -> Self {
        Self::with(
            self.channel.clone(),
            Auth {
                tenant: Some(tenant.to_string()),
                ..self.auth.clone()
            },
        )
    }

    /// A raw gRPC client with this caller's headers, for calling an RPC by its path.
    pub fn grpc(&self) -> tonic::client::Grpc<Authed> {
        tonic::client::Grpc::new(InterceptedService::new(
            self.channel.clone(),
            self.auth.clone(),
        ))
    }

    /// Envoy's `envoy.service.auth.v3.Authorization` (`Check`), called as this caller.
    pub fn authorization(&self) -> AuthorizationClient<Authed> {
        AuthorizationClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    /// Creates a workspace named `name`, with every other field at its default; returns
    /// it. Fails the test if refused.
    pub async fn create_workspace(&self, name: &str) -> pb::Workspace {
        self.workspaces
            .clone()
            .create_workspace(pb::CreateWorkspaceRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .resource()
            .expect("create workspace")
    }

    /// `VerifyApiKey` of `key` requiring `required`, at no cost: the verdict, or the status
    /// of a refused call.
    pub async fn try_verify(
        &self,
        key: &str,
        required: &[&str],
    ) -> Result<pb::VerifyApiKeyResponse, Status> {
        self.keys
            .clone()
            .verify_api_key(pb::VerifyApiKeyRequest {
                key: key.into(),
                required_scopes: strings(required),
                cost: None,
                ..Default::default()
            })
            .await
            .inner()
    }

    /// The verdict on `key` requiring `required` ([`Client::try_verify`]); fails the test
    /// if the call is refused.
    pub async fn verify(&self, key: &str, required: &[&str]) -> pb::VerifyApiKeyResponse {
        self.try_verify(key, required).await.expect("verify")
    }

    /// Revokes key `id` now; returns the revoked key. Fails the test if refused.
    pub async fn revoke_key(&self, id: &str) -> pb::ApiKey {
        self.keys
            .clone()
            .revoke_api_key(pb::RevokeApiKeyRequest { id: id.into() })
            .await
            .resource()
            .expect("revoke the key")
    }

    /// Disables key `id`, whatever its etag; returns the disabled key. Fails the test if
    /// refused.
    pub async fn disable_key(&self, id: &str) -> pb::ApiKey {
        self.keys
            .clone()
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    id: id.into(),
                    disabled: true,
                    ..Default::default()
                }),
                update_mask: mask(&["disabled"]),
                etag: String::new(),
            })
            .await
            .resource()
            .expect("disable the key")
    }
}

/// An Envoy `Check` of an HTTP request presenting `key` in `x-api-key`, and nothing else.
pub fn envoy_check(key: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(HttpAttributes {
                http: Some(HttpRequest {
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// `.inner()`: the message of a successful call.
pub trait Reply<T> {
    /// The response's message, or the call's status.
    fn inner(self) -> Result<T, Status>;
}

impl<T> Reply<T> for Result<Response<T>, Status> {
    fn inner(self) -> Result<T, Status> {
        self.map(Response::into_inner)
    }
}

/// `.resource()`: the one resource a Create/Get/Update/Revoke response carries.
pub trait Resource {
    /// The resource's message type.
    type Of;
    /// The resource (the response must carry it), or the call's status.
    fn resource(self) -> Result<Self::Of, Status>;
}

macro_rules! resource_of {
    ($($response:ty => $field:ident: $of:ty),+ $(,)?) => {$(
        impl Resource for Result<Response<$response>, Status> {
            type Of = $of;
            fn resource(self) -> Result<$of, Status> {
                self.map(|r| {
                    r.into_inner()
                        .$field
                        .expect(concat!(stringify!($field), " in the response"))
                })
            }
        }
    )+};
}

resource_of!(
    pb::CreateWorkspaceResponse => workspace: pb::Workspace,
    pb::GetWorkspaceResponse => workspace: pb::Workspace,
    pb::UpdateWorkspaceResponse => workspace: pb::Workspace,
    pb::CreateScopeResponse => scope: pb::Scope,
    pb::GetScopeResponse => scope: pb::Scope,
    pb::UpdateScopeResponse => scope: pb::Scope,
    pb::CreateRoleResponse => role: pb::Role,
    pb::GetRoleResponse => role: pb::Role,
    pb::UpdateRoleResponse => role: pb::Role,
    pb::GetApiKeyResponse => api_key: pb::ApiKey,
    pb::UpdateApiKeyResponse => api_key: pb::ApiKey,
    pb::RevokeApiKeyResponse => api_key: pb::ApiKey,
);

/// How many built-in scopes every tenant sees.
pub const BUILTINS: usize = BuiltinScope::ALL.len();

/// Every built-in scope's representation.
pub fn all_builtin() -> Vec<&'static str> {
    BuiltinScope::ALL.iter().map(|b| b.as_str()).collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token signed with the test secret; `tenant: None` makes a platform token.
pub fn token(tenant: Option<Uuid>, scopes: &[&str]) -> String {
    let now = unix_now() as u64;
    mint_hs256(
        JWT_SECRET,
        &MintClaims {
            sub: "tester".into(),
            iat: now,
            exp: now + 600,
            tenant_id: tenant.map(|t| t.to_string()),
            scope: scopes.join(" "),
            iss: None,
            aud: None,
        },
    )
    .unwrap()
}

/// A tenant token with every built-in scope for a tenant of its own.
pub fn stranger() -> Cred {
    Cred::Bearer(token(Some(Uuid::now_v7()), &all_builtin()))
}

/// Owned copies of `list`, as repeated string fields want them.
pub fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// An update mask of these paths (an empty one is still sent, as an empty mask).
pub fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: strings(paths),
    })
}

/// A whole-second timestamp `secs` from now (whole seconds survive every backend exactly).
pub fn in_secs(secs: i64) -> Timestamp {
    Timestamp {
        seconds: unix_now() + secs,
        nanos: 0,
    }
}

/// A whole-second duration, as a grace period.
pub fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// A rate limit of `limit` per `period_secs`.
pub fn rate_limit(name: &str, limit: i64, period_secs: i64, shared: bool) -> pb::RateLimit {
    pb::RateLimit {
        name: name.into(),
        limit,
        period: seconds(period_secs),
        shared_by_owner: shared,
    }
}
