//! `grpc.health.v1.Health`: tonic-health's service, with `Watch` streams that
//! end when the server drains (after a last NOT_SERVING), so they cannot hold shutdown up.
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::storage::Store;

/// The names reported: the whole server (`""`) and each keyplane service.
pub const SERVICE_NAMES: [&str; 6] = [
    "",
    "keyplane.v1.WorkspaceService",
    "keyplane.v1.ScopeService",
    "keyplane.v1.ApiKeyService",
    "keyplane.v1.AuditService",
    // What Envoy's gRPC health check of its ext_authz cluster names.
    "envoy.service.auth.v3.Authorization",
];

pub struct DrainingHealth {
    inner: HealthService,
    draining: CancellationToken,
}

impl DrainingHealth {
    pub fn new(reporter: HealthReporter, draining: CancellationToken) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter),
            draining,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for DrainingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let inner = self.inner.watch(request).await?.into_inner();
        let last = HealthCheckResponse {
            status: tonic_health::pb::health_check_response::ServingStatus::NotServing.into(),
        };
        let stream = inner
            .take_until(self.draining.clone().cancelled_owned())
            .chain(stream::once(async move { Ok(last) }));
        Ok(Response::new(Box::pin(stream)))
    }
}

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Reports SERVING only while the database answers; checks every `interval` until `stop`.
pub async fn monitor(
    store: Store,
    reporter: HealthReporter,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut last: Option<ServingStatus> = None;
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let status = match tokio::time::timeout(interval * 2, store.ping()).await {
            Ok(Ok(())) => ServingStatus::Serving,
            Ok(Err(err)) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(error = %err, "database does not answer; reporting NOT_SERVING");
                }
                ServingStatus::NotServing
            }
            Err(_) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!("database ping timed out; reporting NOT_SERVING");
                }
                ServingStatus::NotServing
            }
        };
        // Shutdown may have started while the ping ran; it owns the status from then on.
        if stop.is_cancelled() {
            return;
        }
        if last != Some(status) {
            if status == ServingStatus::Serving {
                tracing::info!("database answers; reporting SERVING");
            }
            set_all(&reporter, status).await;
            last = Some(status);
        }
    }
}
