//! The tower layer in front of every service: authenticates the caller, checks the one
//! built-in scope the RPC needs (SPEC §2.4, §4) and hands the [`Caller`] to the handler as a
//! request extension. An RPC missing from [`rpc_access`] is refused, so a new RPC cannot be
//! reachable without a row there.
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::HeaderMap;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use super::error;
use crate::auth::{Authenticator, Caller, Credentials};
use crate::domain::scope::BuiltinScope;

/// Largest request message accepted (SPEC §4.1).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// What an RPC path requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Health and reflection: no credential.
    Public,
    /// A credential holding this built-in scope.
    Scope(BuiltinScope),
    /// Not a known RPC.
    Unknown,
}

/// The access rule of every RPC, by its gRPC path.
pub fn rpc_access(path: &str) -> Access {
    use BuiltinScope::*;
    const PUBLIC_SERVICES: [&str; 3] = [
        "/grpc.health.v1.Health/",
        "/grpc.reflection.v1.ServerReflection/",
        "/grpc.reflection.v1alpha.ServerReflection/",
    ];
    if PUBLIC_SERVICES.iter().any(|p| path.starts_with(p)) {
        return Access::Public;
    }
    let scope = match path {
        "/keyplane.v1.WorkspaceService/CreateWorkspace"
        | "/keyplane.v1.WorkspaceService/UpdateWorkspace"
        | "/keyplane.v1.WorkspaceService/DeleteWorkspace" => WorkspacesWrite,
        "/keyplane.v1.WorkspaceService/GetWorkspace"
        | "/keyplane.v1.WorkspaceService/ListWorkspaces" => WorkspacesRead,
        "/keyplane.v1.ScopeService/CreateScope"
        | "/keyplane.v1.ScopeService/UpdateScope"
        | "/keyplane.v1.ScopeService/DeleteScope" => ScopesWrite,
        "/keyplane.v1.ScopeService/GetScope" | "/keyplane.v1.ScopeService/ListScopes" => ScopesRead,
        "/keyplane.v1.ApiKeyService/CreateApiKey"
        | "/keyplane.v1.ApiKeyService/UpdateApiKey"
        | "/keyplane.v1.ApiKeyService/RevokeApiKey"
        | "/keyplane.v1.ApiKeyService/RotateApiKey"
        | "/keyplane.v1.ApiKeyService/DeleteApiKey" => ApiKeysWrite,
        "/keyplane.v1.ApiKeyService/GetApiKey" | "/keyplane.v1.ApiKeyService/ListApiKeys" => {
            ApiKeysRead
        }
        "/keyplane.v1.ApiKeyService/VerifyApiKey" => ApiKeysVerify,
        _ => return Access::Unknown,
    };
    Access::Scope(scope)
}

#[derive(Clone)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
}

/// A header's value; one that is not visible ASCII becomes "" and fails validation.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or(""))
}

async fn authorize(
    auth: &Authenticator,
    headers: &HeaderMap,
    needed: BuiltinScope,
) -> Result<Caller, Status> {
    let creds = Credentials {
        authorization: header(headers, "authorization"),
        api_key: header(headers, "x-api-key"),
        tenant: header(headers, "x-tenant-id"),
    };
    let caller = auth.authenticate(creds).await?;
    caller.require(needed)?;
    Ok(caller)
}

/// tonic answers an oversized request with OUT_OF_RANGE; keyplane's handlers never use
/// that code, so any OUT_OF_RANGE here is the size limit, reported as RESOURCE_EXHAUSTED.
fn remap_too_large(response: http::Response<Body>) -> http::Response<Body> {
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if out_of_range {
        error::request_too_large(MAX_REQUEST_BYTES).into_http()
    } else {
        response
    }
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The ready service handles this call; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            match rpc_access(request.uri().path()) {
                Access::Public => return inner.call(request).await,
                Access::Unknown => {
                    return Ok(Status::unimplemented(format!(
                        "unknown method {}",
                        request.uri().path()
                    ))
                    .into_http());
                }
                Access::Scope(needed) => match authorize(&auth, request.headers(), needed).await {
                    Ok(caller) => {
                        request.extensions_mut().insert(caller);
                    }
                    Err(status) => {
                        metrics::counter!("keyplane_auth_failures_total", "code" => format!("{:?}", status.code()))
                            .increment(1);
                        return Ok(status.into_http());
                    }
                },
            }
            // Only known paths get here, so the label set stays bounded.
            let method = request.uri().path().to_owned();
            let started = std::time::Instant::now();
            let response = inner.call(request).await.map(remap_too_large);
            metrics::histogram!("keyplane_rpc_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            response
        })
    }
}
