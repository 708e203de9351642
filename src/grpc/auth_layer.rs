//! The tower layer in front of every service that decides who may call: it authenticates
//! the caller, checks the one built-in scope the RPC needs (the [`rpc`](super::rpc) table)
//! and hands the [`Caller`] to the handler as a request extension. A path missing from the
//! table is refused, so a new RPC cannot be reachable without a row there.
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tower::{Layer, Service};

use super::rpc::{self, Access};
use crate::auth::{Authenticator, Caller, Credentials};
use crate::domain::network::ClientAddress;
use crate::domain::scope::BuiltinScope;

#[derive(Clone)]
pub struct AuthLayer {
    /// Shared: every call clones the service, and one reference count is all that costs.
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Authenticator) -> Self {
        Self {
            auth: Arc::new(auth),
        }
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
    auth: Arc<Authenticator>,
}

// Named once: looking a header up by `&str` parses the name again on every call.
static API_KEY: HeaderName = HeaderName::from_static("x-api-key");
static TENANT: HeaderName = HeaderName::from_static("x-tenant-id");

/// A header's value; one that is not visible ASCII becomes "" and fails validation.
fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap_or(""))
}

async fn authorize(
    auth: &Authenticator,
    headers: &HeaderMap,
    peer: Option<ClientAddress>,
    needed: BuiltinScope,
) -> Result<Caller, Status> {
    let creds = Credentials {
        authorization: header(headers, &AUTHORIZATION),
        api_key: header(headers, &API_KEY),
        tenant: header(headers, &TENANT),
        peer,
    };
    let caller = auth.authenticate(creds).await?;
    caller.require(needed)?;
    Ok(caller)
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
            match rpc::access(request.uri().path()) {
                Some(Access::Public) => {}
                None => {
                    let path = request.uri().path();
                    return Ok(Status::unimplemented(format!("unknown method {path}")).into_http());
                }
                Some(Access::Scope(needed)) => {
                    let peer = request
                        .extensions()
                        .get::<TcpConnectInfo>()
                        .and_then(TcpConnectInfo::remote_addr)
                        .map(|addr| ClientAddress::new(addr.ip()));
                    match authorize(&auth, request.headers(), peer, needed).await {
                        Ok(caller) => {
                            request.extensions_mut().insert(caller);
                        }
                        Err(status) => {
                            metrics::counter!("keyplane_auth_failures_total", "code" => format!("{:?}", status.code()))
                                .increment(1);
                            return Ok(status.into_http());
                        }
                    }
                }
            }
            inner.call(request).await
        })
    }
}
