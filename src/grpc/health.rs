//! `grpc.health.v1.Health`: tonic-health's service, with `Watch` streams that
//! end when the server drains (after a last NOT_SERVING), so they cannot hold shutdown up.
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::storage::Store;
use crate::verification::outage::Outage;

/// The names that report whether this replica can answer verifications: the whole server
/// (`""`, what load balancers and sidecars check) and Envoy's ext_authz service (what
/// Envoy's gRPC health check of its ext_authz cluster names). SERVING while the database
/// answers or the stale window is open, so a replica stays in rotation through a failover.
pub const VERIFICATION_NAMES: [&str; 2] = ["", "envoy.service.auth.v3.Authorization"];

/// The names that report whether writes can succeed: SERVING only while the database
/// answers.
pub const WRITE_NAMES: [&str; 5] = [
    "keyplane.v1.WorkspaceService",
    "keyplane.v1.ScopeService",
    "keyplane.v1.RoleService",
    "keyplane.v1.ApiKeyService",
    "keyplane.v1.AuditService",
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
    for name in VERIFICATION_NAMES.into_iter().chain(WRITE_NAMES) {
        reporter.set_service_status(name, status).await;
    }
}

/// What the health service reports: verifications, then writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reported {
    verifications: ServingStatus,
    writes: ServingStatus,
}

fn serving(yes: bool) -> ServingStatus {
    if yes {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Pings the database every `interval` until `stop`: the write services report SERVING only
/// while it answers, the verification names while this replica can answer verifications
/// (the database answers, or the stale window is open). A successful ping also tells the
/// verifier that the database is back.
pub async fn monitor(
    store: Store,
    outage: Arc<Outage>,
    reporter: HealthReporter,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut last: Option<Reported> = None;
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        let answered = match tokio::time::timeout(interval * 2, store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("the ping timed out".to_owned()),
        };
        // Shutdown may have started while the ping ran; it owns the status from then on.
        if stop.is_cancelled() {
            return;
        }
        if answered.is_ok() {
            outage.database_answered();
        } else {
            outage.end_stale_period_if_over();
        }
        let now = Reported {
            verifications: serving(outage.can_answer(answered.is_ok())),
            writes: serving(answered.is_ok()),
        };
        if last == Some(now) {
            continue;
        }
        match &answered {
            Ok(()) => tracing::info!("database answers; reporting SERVING"),
            Err(why) => tracing::warn!(
                error = %why,
                verifications = ?now.verifications,
                "database does not answer; the write services report NOT_SERVING"
            ),
        }
        for (names, status) in [
            (&VERIFICATION_NAMES[..], now.verifications),
            (&WRITE_NAMES[..], now.writes),
        ] {
            for name in names {
                reporter.set_service_status(*name, status).await;
            }
        }
        last = Some(now);
    }
}
