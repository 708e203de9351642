//! The layer that times every known RPC into `keyplane_rpc_duration_seconds{method}`. The
//! histograms are registered once, one per row of the [`rpc`](super::rpc) table, so a call
//! records without building a metric key (no allocation on the hot path), and an unknown
//! path cannot grow the label set.
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use metrics::Histogram;
use tower::{Layer, Service};

use super::rpc::{self, RPCS};

#[derive(Clone)]
pub struct RpcMetricsLayer {
    histograms: Arc<[Histogram]>,
}

impl RpcMetricsLayer {
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

impl Default for RpcMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            histograms: self.histograms.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    histograms: Arc<[Histogram]>,
}

impl<S, B> Service<http::Request<B>> for RpcMetrics<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let histogram = rpc::index(request.uri().path()).map(|i| self.histograms[i].clone());
        Timed {
            inner: self.inner.call(request),
            started: Instant::now(),
            histogram,
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's future that records its duration when it completes.
    pub struct Timed<F> {
        #[pin]
        inner: F,
        started: Instant,
        histogram: Option<Histogram>,
    }
}

impl<F: Future> Future for Timed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let Some(histogram) = this.histogram.take() {
            histogram.record(this.started.elapsed().as_secs_f64());
        }
        Poll::Ready(output)
    }
}
