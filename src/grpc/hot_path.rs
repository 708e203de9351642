//! The services of the two verification RPCs, written out so their answers can be the
//! bytes [`prepared`](super::prepared) for a key: `VerifyApiKey`, in front of the generated
//! `ApiKeyService` (every other method of which it hands on unchanged), and Envoy's
//! `Check`. Each is what tonic's generated code does for a unary method (decode, call,
//! encode, the same size limit), with [`AnswerCodec`] instead of tonic-prost's codec.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};
use tower::Service;

use super::KeyplaneApi;
use super::prepared::{Answer, AnswerCodec};
use super::size_limit::MAX_REQUEST_BYTES;
use crate::proto::{self as pb, api_key_service_server::ApiKeyServiceServer};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

const VERIFY_PATH: &str = "/keyplane.v1.ApiKeyService/VerifyApiKey";
const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// `keyplane.v1.ApiKeyService`: `VerifyApiKey` answered here, the rest by the generated
/// server.
#[derive(Clone)]
pub struct ApiKeys {
    /// Shared as the generated servers share theirs: a call costs one reference count,
    /// where cloning the API clones each of its parts.
    api: Arc<KeyplaneApi>,
    generated: ApiKeyServiceServer<KeyplaneApi>,
}

impl ApiKeys {
    pub fn new(api: KeyplaneApi) -> Self {
        Self {
            generated: ApiKeyServiceServer::new(api.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            api: Arc::new(api),
        }
    }
}

impl NamedService for ApiKeys {
    const NAME: &'static str = <ApiKeyServiceServer<KeyplaneApi> as NamedService>::NAME;
}

impl Service<http::Request<Body>> for ApiKeys {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != VERIFY_PATH {
            return self.generated.call(request);
        }
        let method = Verify(Arc::clone(&self.api));
        Box::pin(async move { Ok(unary::<pb::VerifyApiKeyRequest, _, _>(method, request).await) })
    }
}

struct Verify(Arc<KeyplaneApi>);

impl UnaryService<pb::VerifyApiKeyRequest> for Verify {
    type Response = Answer<pb::VerifyApiKeyResponse>;
    type Future = BoxFuture<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<pb::VerifyApiKeyRequest>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move {
            let outcome = api.verify_outcome(request).await?;
            Ok(Response::new(api.verify_answer(&outcome)))
        })
    }
}

/// `envoy.service.auth.v3.Authorization`: its one method, `Check`.
#[derive(Clone)]
pub struct Authorization {
    api: Arc<KeyplaneApi>,
}

impl Authorization {
    pub fn new(api: KeyplaneApi) -> Self {
        Self { api: Arc::new(api) }
    }
}

impl NamedService for Authorization {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl Service<http::Request<Body>> for Authorization {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            // As tonic's generated servers answer an unknown method of their service.
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = Check(Arc::clone(&self.api));
        Box::pin(async move { Ok(unary::<CheckRequest, _, _>(method, request).await) })
    }
}

struct Check(Arc<KeyplaneApi>);

impl UnaryService<CheckRequest> for Check {
    type Response = Answer<CheckResponse>;
    type Future = BoxFuture<Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<CheckRequest>) -> Self::Future {
        let api = Arc::clone(&self.0);
        Box::pin(async move { api.check(request).await.map(Response::new) })
    }
}

/// One unary call through tonic's server machinery, with answers that may be prepared.
async fn unary<Req, M, S>(method: S, request: http::Request<Body>) -> http::Response<Body>
where
    Req: prost::Message + Default + Send + 'static,
    M: prost::Message + Send + 'static,
    S: UnaryService<Req, Response = Answer<M>>,
{
    Grpc::new(AnswerCodec::<M, Req>::default())
        .apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None)
        .unary(method, request)
        .await
}
