//! The outermost layer, which observes every call: it gives the call a request id (the
//! client's `x-request-id` when it sent a sane one, else a fresh UUIDv7), returns it in the
//! response's `x-request-id`, logs every error response with it (so a client quoting the id
//! finds the log line), and times every known RPC into
//! `keyplane_rpc_duration_seconds{method}`. The histograms are registered once, one per row
//! of the [`rpc`](super::rpc) table, so a call records without building a metric key, and
//! an unknown path cannot grow the label set.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::HeaderValue;
use metrics::Histogram;
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use super::rpc::{self, RPCS};

/// The header carrying a call's request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The longest client-sent request id kept; longer or odd ones are replaced.
const MAX_CLIENT_ID: usize = 128;

tokio::task_local! {
    /// The request id of the call being served, for error details and logs.
    static REQUEST_ID: Arc<str>;
}

/// The current call's request id; a fresh one outside a call.
pub fn request_id() -> Arc<str> {
    REQUEST_ID
        .try_with(Arc::clone)
        .unwrap_or_else(|_| uuid::Uuid::now_v7().to_string().into())
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

/// A client's request id, if it is short, visible ASCII: safe to log and to echo.
fn client_id(request: &http::Request<impl Sized>) -> Option<Arc<str>> {
    let value = request.headers().get(REQUEST_ID_HEADER)?.to_str().ok()?;
    let sane = !value.is_empty()
        && value.len() <= MAX_CLIENT_ID
        && value.bytes().all(|b| b.is_ascii_graphic());
    sane.then(|| value.into())
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

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let index = rpc::index(request.uri().path());
        let id = client_id(&request).unwrap_or_else(|| uuid::Uuid::now_v7().to_string().into());
        Observed {
            inner: REQUEST_ID.scope(id.clone(), self.inner.call(request)),
            started: Instant::now(),
            histogram: index.map(|i| self.histograms[i].clone()),
            method: index.map_or("unknown", |i| RPCS[i].path),
            id,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future that, when it completes, records its duration, tags the response
    /// with the request id and logs an error response.
    pub struct Observed<F: Future> {
        #[pin]
        inner: TaskLocalFuture<Arc<str>, F>,
        started: Instant,
        histogram: Option<Histogram>,
        method: &'static str,
        id: Arc<str>,
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
            // An error answered at once (trailers-only) carries its status in the headers.
            let headers = response.headers_mut();
            if let Some(code) = headers.get("grpc-status").filter(|c| c.as_bytes() != b"0") {
                let message = headers
                    .get("grpc-message")
                    .and_then(|m| m.to_str().ok())
                    .unwrap_or_default();
                tracing::info!(
                    request_id = %this.id,
                    method = *this.method,
                    code = %String::from_utf8_lossy(code.as_bytes()),
                    message,
                    "call failed"
                );
            }
            if let Ok(value) = HeaderValue::from_str(this.id) {
                headers.insert(REQUEST_ID_HEADER, value);
            }
        }
        Poll::Ready(output)
    }
}
