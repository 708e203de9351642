//! The outermost layer, which observes every call: it logs every error response with a
//! request id and returns that id in the response's `x-request-id` (so a client quoting the
//! id finds the log line), echoes a client's own `x-request-id` on every response, and times
//! every known RPC into `keyplane_rpc_duration_seconds{method}`. The request id of an error
//! is the one an internal error already carries, else the client's, else a fresh UUIDv7.
//! A write gets its id up front (the client's or a fresh one, handed to the handler as a
//! [`RequestId`] for its audit event, and returned on success too); other calls get one
//! only when they fail, so a successful verification pays nothing for it. The
//! histograms are registered once, one per row of the [`rpc`](super::rpc) table, so a call
//! records without building a metric key, and an unknown path cannot grow the label set.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderValue;
use metrics::Histogram;
use tower::{Layer, Service};

use super::rpc::{self, RPCS};

/// The header carrying a call's request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The longest client-sent request id kept; longer or odd ones are replaced.
const MAX_CLIENT_ID: usize = 128;

/// The request id of a write, for its audit event.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// A fresh request id.
pub fn new_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[derive(Clone)]
pub struct ObserveLayer {
    histograms: Arc<[Histogram]>,
}

impl ObserveLayer {
    /// Registers the histograms with the metrics recorder installed now (none: no-ops).
    pub fn new() -> Self {
        Self {
            histograms: RPCS
                .iter()
                .map(|r| metrics::histogram!("keyplane_rpc_duration_seconds", "method" => r.path))
                .collect(),
        }
    }
}

impl Default for ObserveLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            inner,
            histograms: self.histograms.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    histograms: Arc<[Histogram]>,
}

/// A fresh request id, as a header value.
pub fn fresh_header() -> HeaderValue {
    HeaderValue::try_from(new_request_id()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// A client's request id, if it is short, visible ASCII: safe to log and to echo.
pub fn client_id(headers: &http::HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(REQUEST_ID_HEADER)?;
    let sane = !value.is_empty()
        && value.len() <= MAX_CLIENT_ID
        && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
    sane.then(|| value.clone())
}

impl<S, B, R> Service<http::Request<B>> for Observe<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let index = rpc::index(request.uri().path());
        let mut request_id = client_id(request.headers());
        if index.is_some_and(|i| RPCS[i].mutates()) {
            let id = request_id.get_or_insert_with(fresh_header);
            let text = id.to_str().unwrap_or_default();
            request.extensions_mut().insert(RequestId(text.into()));
        }
        Observed {
            inner: self.inner.call(request),
            started: Instant::now(),
            histogram: index.map(|i| self.histograms[i].clone()),
            method: index.map_or("unknown", |i| RPCS[i].path),
            request_id,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future that, when it completes, records its duration and, for an error,
    /// tags the response with a request id and logs it.
    pub struct Observed<F> {
        #[pin]
        inner: F,
        started: Instant,
        histogram: Option<Histogram>,
        method: &'static str,
        // The client's id, or a write's own.
        request_id: Option<HeaderValue>,
    }
}

impl<F, R, E> Future for Observed<F>
where
    F: Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let mut output = std::task::ready!(this.inner.poll(cx));
        if let Some(histogram) = this.histogram.take() {
            histogram.record(this.started.elapsed().as_secs_f64());
        }
        if let Ok(response) = &mut output {
            let headers = response.headers_mut();
            // An error answered at once (trailers-only) carries its status in the headers.
            let failed = headers
                .get("grpc-status")
                .is_some_and(|c| c.as_bytes() != b"0");
            if failed {
                // An internal error names its own id (in its message and details too).
                let id = match (headers.get(REQUEST_ID_HEADER), this.request_id.take()) {
                    (Some(own), _) => own.clone(),
                    (None, Some(known)) => known,
                    (None, None) => fresh_header(),
                };
                let text = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                tracing::info!(
                    request_id = id.to_str().unwrap_or_default(),
                    method = *this.method,
                    code = text("grpc-status"),
                    message = text("grpc-message"),
                    "call failed"
                );
                headers.insert(REQUEST_ID_HEADER, id);
            } else if let Some(known) = this.request_id.take() {
                headers.insert(REQUEST_ID_HEADER, known);
            }
        }
        Poll::Ready(output)
    }
}
