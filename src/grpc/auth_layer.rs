//! The tower layer in front of every service that decides who may call: it authenticates
//! the caller, checks the one built-in scope the RPC needs (the [`rpc`](super::rpc) table)
//! and hands the [`Caller`] to the handler as a request extension. A path missing from the
//! table is refused, so a new RPC cannot be reachable without a row there.
use std::future::Future;
use std::pin::Pin;
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
use crate::auth::{AuthError, Authenticator, Caller, Credentials};
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

/// The credential values of a request; `peer` is read only when a key needs it.
fn credentials(headers: &HeaderMap, peer: Option<ClientAddress>) -> Credentials<'_> {
    Credentials {
        authorization: header(headers, &AUTHORIZATION),
        api_key: header(headers, &API_KEY),
        tenant: header(headers, &TENANT),
        peer,
    }
}

/// The address the call came from, for an admin key's `allowed_cidrs`.
fn peer<B>(request: &http::Request<B>) -> Option<ClientAddress> {
    request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| ClientAddress::new(addr.ip()))
}

/// The caller, if it authenticated and holds the scope the RPC needs.
fn permitted(
    verified: Result<Caller, AuthError>,
    needed: BuiltinScope,
) -> Result<Caller, AuthError> {
    verified.and_then(|caller| caller.require(needed).map(|()| caller))
}

/// The answer to a refused caller, counted by its code.
fn refused(status: Status) -> http::Response<Body> {
    metrics::counter!("keyplane_auth_failures_total", "code" => format!("{:?}", status.code()))
        .increment(1);
    status.into_http()
}

pin_project_lite::pin_project! {
    /// A call's future: answered at once (a refusal, an unknown method), the inner
    /// service's (the caller was known without waiting: a bearer token, or a public
    /// method), or one that first waits for an admin key's verification.
    #[project = AuthFutureProj]
    pub enum AuthFuture<F, E> {
        Answered { response: Option<http::Response<Body>> },
        Inner { #[pin] inner: F },
        Verifying { #[pin] verifying: BoxFuture<'static, Result<http::Response<Body>, E>> },
    }
}

impl<F, E> Future for AuthFuture<F, E>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AuthFutureProj::Answered { response } => match response.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after it answered: a misuse tower's contract rules out.
                None => Poll::Pending,
            },
            AuthFutureProj::Inner { inner } => inner.poll(cx),
            AuthFutureProj::Verifying { verifying } => verifying.poll(cx),
        }
    }
}

impl<S> Service<http::Request<Body>> for AuthService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = AuthFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let answered = |response| AuthFuture::Answered {
            response: Some(response),
        };
        let needed = match rpc::access(request.uri().path()) {
            Some(Access::Public) => {
                return AuthFuture::Inner {
                    inner: self.inner.call(request),
                };
            }
            None => {
                let path = request.uri().path();
                return answered(
                    Status::unimplemented(format!("unknown method {path}")).into_http(),
                );
            }
            Some(Access::Scope(needed)) => needed,
        };
        let known = self
            .auth
            .authenticate_now(credentials(request.headers(), None));
        match known.map(|verified| permitted(verified, needed)) {
            Some(Ok(caller)) => {
                request.extensions_mut().insert(caller);
                AuthFuture::Inner {
                    inner: self.inner.call(request),
                }
            }
            Some(Err(err)) => answered(refused(err.into())),
            None => {
                // The ready service handles this call; a fresh clone waits for the next one.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let auth = self.auth.clone();
                AuthFuture::Verifying {
                    verifying: Box::pin(async move {
                        let creds = credentials(request.headers(), peer(&request));
                        match permitted(auth.authenticate(creds).await, needed) {
                            Ok(caller) => {
                                request.extensions_mut().insert(caller);
                                inner.call(request).await
                            }
                            Err(err) => Ok(refused(err.into())),
                        }
                    }),
                }
            }
        }
    }
}
