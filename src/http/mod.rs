//! HTTP/JSON on the gRPC port. [`HttpLayer`] is the outermost layer of the server: a gRPC
//! request (HTTP/2, `application/grpc…`) passes straight through; a gRPC-Web one goes
//! through tonic-web, which turns it into gRPC, on its way in; any other request is matched
//! against the `google.api.http` rules of the protos, transcoded into the gRPC request of
//! its RPC, and sent through the very same inner stack as a gRPC call (observation and
//! request ids, the size limit, authentication and the authorization table, the
//! handler). Nothing is implemented twice, so an HTTP request cannot skip what a gRPC
//! request goes through. The gRPC answer is turned back into JSON, or into Google's JSON
//! error body.
pub mod cors;
pub mod descriptors;
pub mod error;
pub mod openapi;
pub mod routes;
pub mod transcode;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use futures::future::{BoxFuture, Either};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use prost_reflect::MessageDescriptor;
use tonic::Code;
use tonic::body::Body;
use tonic_web::{GrpcWebLayer, GrpcWebService};
use tower::{Layer, Service};

use crate::grpc::observe::{self, REQUEST_ID_HEADER};
use crate::grpc::size_limit::MAX_REQUEST_BYTES;
use error::{Outcome, Rejection};
use routes::{Matched, Routes};

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";

static REQUEST_ID: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
static JSON: HeaderValue = HeaderValue::from_static("application/json");

/// What every HTTP call reads: built once at startup.
struct Shared {
    routes: Routes,
    /// `google.rpc.Status`, for error details.
    status_type: MessageDescriptor,
    openapi: Bytes,
}

#[derive(Clone)]
pub struct HttpLayer {
    shared: Arc<Shared>,
}

impl HttpLayer {
    /// Reads the routes from the compiled descriptors; fails on an annotation it cannot
    /// serve.
    pub fn new() -> anyhow::Result<Self> {
        let pool = descriptors::pool()?;
        let routes = Routes::from_pool(&pool)?;
        let status_type = pool
            .get_message_by_name("google.rpc.Status")
            .ok_or_else(|| anyhow::anyhow!("google.rpc.Status is not in the descriptors"))?;
        let openapi = openapi::document(&routes)?;
        Ok(Self {
            shared: Arc::new(Shared {
                routes,
                status_type,
                openapi: Bytes::from(openapi),
            }),
        })
    }
}

impl HttpLayer {
    /// The OpenAPI document of the routes, as served.
    pub fn openapi() -> anyhow::Result<Vec<u8>> {
        Ok(Self::new()?.shared.openapi.to_vec())
    }
}

impl<S> Layer<S> for HttpLayer {
    type Service = HttpService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HttpService<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Which of the three ways in a request takes.
enum Way {
    /// gRPC over HTTP/2: the hot path, straight to the inner stack.
    Grpc,
    /// gRPC-Web, and anything else claiming `application/grpc…` (tonic-web answers a
    /// gRPC call over HTTP/1.1 with 400).
    GrpcWeb,
    /// HTTP/JSON (and the OpenAPI document).
    Json,
}

impl Way {
    fn of<B>(request: &Request<B>) -> Self {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .map_or(&b""[..], |v| v.as_bytes());
        match content_type.strip_prefix(b"application/grpc") {
            None => Way::Json,
            Some(rest)
                if !rest.starts_with(b"-web") && request.version() == http::Version::HTTP_2 =>
            {
                Way::Grpc
            }
            Some(_) => Way::GrpcWeb,
        }
    }
}

impl<S> Service<Request<Body>> for HttpService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<
        S::Future,
        Either<
            tonic_web::ResponseFuture<S::Future>,
            BoxFuture<'static, Result<Response<Body>, S::Error>>,
        >,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let way = Way::of(&request);
        // The gRPC path: one header check, nothing else (no gRPC-Web wrapping either).
        if let Way::Grpc = way {
            return Either::Left(self.inner.call(request));
        }
        // The ready service handles this call; a fresh clone waits for the next one.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Either::Right(match way {
            Way::GrpcWeb => {
                let mut web: GrpcWebService<S> = GrpcWebLayer::new().layer(inner);
                Either::Left(web.call(request))
            }
            _ => Either::Right(Box::pin(serve(self.shared.clone(), inner, request))),
        })
    }
}

/// Answers one HTTP/JSON request.
async fn serve<S>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<Body>,
) -> Result<Response<Body>, S::Error>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    // Every HTTP answer carries a request id: the client's, or one given here and handed
    // on as if the client had sent it, so the gRPC layers log and audit under it too.
    let request_id = observe::client_id(request.headers()).unwrap_or_else(observe::fresh_header);
    // The document describes the API, as reflection (also public) does: no credential,
    // so that tools can fetch it before they have one.
    if request.uri().path() == OPENAPI_PATH {
        return Ok(match *request.method() {
            Method::GET => json(StatusCode::OK, shared.openapi.clone(), request_id),
            _ => reject(
                &shared,
                Rejection::wrong_method(request.method(), vec![Method::GET]),
                request_id,
            ),
        });
    }
    let (route, grpc_request) = match prepare(&shared, request, &request_id).await {
        Ok(prepared) => prepared,
        Err(rejection) => return Ok(reject(&shared, rejection, request_id)),
    };
    let response = inner.call(grpc_request).await?;
    Ok(answer(&shared, route, response, request_id).await)
}

/// The gRPC request an HTTP request stands for, and the RPC's output type.
async fn prepare(
    shared: &Shared,
    request: Request<Body>,
    request_id: &HeaderValue,
) -> Result<(MessageDescriptor, Request<Body>), Rejection> {
    let (mut parts, body) = request.into_parts();
    let (route, bound) = match shared.routes.find(&parts.method, parts.uri.path()) {
        Matched::Route(route, bound) => (route, bound),
        Matched::WrongMethod(allow) => return Err(Rejection::wrong_method(&parts.method, allow)),
        Matched::NotFound => return Err(Rejection::unknown_path(parts.uri.path())),
    };
    let body = match Limited::new(body, MAX_REQUEST_BYTES).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Rejection::too_large(MAX_REQUEST_BYTES));
        }
        Err(_) => return Err(Rejection::unreadable_body()),
    };
    if !body.is_empty() && !is_json(&parts.headers) {
        return Err(Rejection::unsupported_media_type());
    }
    let message = transcode::request(route, bound, parts.uri.query(), &body)?;

    // One gRPC frame: uncompressed flag, length, message, encoded in place.
    let length = prost::Message::encoded_len(&message);
    let mut frame = BytesMut::with_capacity(5 + length);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(length).map_err(|_| Rejection::too_large(MAX_REQUEST_BYTES))?);
    prost::Message::encode(&message, &mut frame)
        .map_err(|_| Rejection::too_large(MAX_REQUEST_BYTES))?;

    // The same headers (credentials, tenant, request id, deadline), as a gRPC call's.
    let headers = &mut parts.headers;
    for name in [
        header::CONTENT_TYPE,
        header::CONTENT_LENGTH,
        header::CONTENT_ENCODING,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::TE,
        header::UPGRADE,
        header::ACCEPT,
        header::ACCEPT_ENCODING,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("grpc-encoding");
    headers.remove("grpc-accept-encoding");
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert(REQUEST_ID.clone(), request_id.clone());
    parts.method = Method::POST;
    parts.uri = route.grpc_uri.clone();
    // A gRPC call is HTTP/2 whatever the client spoke (tonic-web refuses gRPC over 1.1).
    parts.version = http::Version::HTTP_2;
    let grpc = Request::from_parts(parts, Body::new(Full::new(frame.freeze())));
    Ok((route.rpc.output(), grpc))
}

/// `application/json`, with or without parameters.
fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// The HTTP answer of a gRPC response.
async fn answer(
    shared: &Shared,
    output: MessageDescriptor,
    response: Response<Body>,
    request_id: HeaderValue,
) -> Response<Body> {
    let (head, body) = response.into_parts();
    // The layers' own id (an internal error names one), else the one this call went with.
    let request_id = head.headers.get(&REQUEST_ID).cloned().unwrap_or(request_id);
    // An error answered at once (trailers-only) has its status in the headers.
    if let Some(outcome) = Outcome::from_headers(&head.headers)
        && outcome.code != Code::Ok
    {
        return error(shared, outcome, request_id);
    }
    let collected = match body.collect().await {
        Ok(collected) => collected,
        Err(status) => return error(shared, status.into(), request_id),
    };
    let outcome = collected.trailers().and_then(Outcome::from_headers);
    let data = collected.to_bytes();
    match outcome {
        Some(outcome) if outcome.code != Code::Ok => error(shared, outcome, request_id),
        Some(_) => match unframe(&data).and_then(|message| transcode::response(output, message)) {
            Some(body) => json(StatusCode::OK, body.into(), request_id),
            None => broken(shared, request_id),
        },
        None => broken(shared, request_id),
    }
}

/// The message of a single uncompressed gRPC frame.
fn unframe(data: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = data.split_first()?;
    let (length, message) = rest.split_first_chunk::<4>()?;
    let length = usize::try_from(u32::from_be_bytes(*length)).ok()?;
    (compressed == 0 && message.len() == length).then_some(message)
}

/// A gRPC answer that is not one (cannot happen with tonic): an internal error, logged.
fn broken(shared: &Shared, request_id: HeaderValue) -> Response<Body> {
    tracing::error!(
        request_id = request_id.to_str().unwrap_or_default(),
        "the gRPC answer of an HTTP call could not be read"
    );
    let outcome = Outcome {
        code: Code::Internal,
        message: format!(
            "internal error (request id {})",
            request_id.to_str().unwrap_or_default()
        ),
        details: Bytes::new(),
    };
    error(shared, outcome, request_id)
}

fn error(shared: &Shared, outcome: Outcome, request_id: HeaderValue) -> Response<Body> {
    let status = error::http_status(outcome.code);
    let body = error::body(status, &outcome, &shared.status_type);
    json(status, body.into(), request_id)
}

/// An error of the HTTP layer itself: logged as the observe layer logs failed calls.
fn reject(shared: &Shared, rejection: Rejection, request_id: HeaderValue) -> Response<Body> {
    tracing::info!(
        request_id = request_id.to_str().unwrap_or_default(),
        status = rejection.http.as_u16(),
        message = rejection.status.message(),
        "HTTP request refused"
    );
    let allow = rejection
        .allow
        .iter()
        .map(Method::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    let body = error::body(
        rejection.http,
        &rejection.status.into(),
        &shared.status_type,
    );
    let mut response = json(rejection.http, body.into(), request_id);
    if let Ok(allow) = HeaderValue::try_from(allow)
        && !allow.is_empty()
    {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

fn json(status: StatusCode, body: Bytes, request_id: HeaderValue) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, JSON.clone());
    headers.insert(REQUEST_ID.clone(), request_id);
    response
}
