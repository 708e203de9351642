//! Building and running the server: `Application::build` connects, migrates and binds
//! (port 0 works); `run_until_stopped` serves until the shutdown future resolves, then
//! drains gracefully.
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;
use tower::util::MapResponseLayer;

use crate::auth::Authenticator;
use crate::auth::jwt::JwtVerifier;
use crate::config::Settings;
use crate::domain::page::PageTokenCodec;
use crate::grpc::KeyplaneApi;
use crate::grpc::auth_layer::AuthLayer;
use crate::grpc::health::{self, DrainingHealth};
use crate::grpc::hot_path;
use crate::grpc::idle::IdleTimeout;
use crate::grpc::observe::ObserveLayer;
use crate::grpc::size_limit::{self, MAX_REQUEST_BYTES};
use crate::grpc::tls::{self, Tls};
use crate::http::HttpLayer;
use crate::proto::{
    audit_service_server::AuditServiceServer, role_service_server::RoleServiceServer,
    scope_service_server::ScopeServiceServer, workspace_service_server::WorkspaceServiceServer,
};
use crate::storage::database::Primary;
use crate::storage::feed::{self, FeedState};
use crate::storage::last_used::LastUsedRecorder;
use crate::storage::{self, Store};
use crate::telemetry::redact_url;
use crate::verification::KeyVerifier;
use crate::verification::cache::VerificationCache;
use crate::verification::meter::Meter;
use crate::verification::outage::Outage;

/// Streams one HTTP/2 connection may open at once: enough for any real client, and a
/// bound on what one connection can make the server hold.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// A built, bound server that has not started serving yet.
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    settings: Settings,
    store: Store,
    /// Held while serving: a second process on the same SQLite file is refused.
    _sqlite_claim: Option<std::fs::File>,
    /// On PostgreSQL: the feed that keeps the cache in step with the other replicas.
    feed: Option<(Arc<FeedState>, Arc<VerificationCache>)>,
    api: KeyplaneApi,
    auth: Authenticator,
    usage: Arc<LastUsedRecorder>,
    /// Rate limits and credits: this replica's leases.
    meter: Arc<Meter>,
    /// What this replica does while the database does not answer.
    outage: Arc<Outage>,
    /// Follows the primary among the hosts of a multi-host URL.
    primary: Option<Arc<Primary>>,
    health: HealthReporter,
    /// TLS on the gRPC port, when configured.
    tls: Option<Arc<Tls>>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        if !settings.jwt.is_configured() {
            anyhow::bail!(
                "authentication is not configured: set --jwt-secret (KEYPLANE_JWT_SECRET, HS256, at least 32 bytes), \
                 --jwt-public-key (KEYPLANE_JWT_PUBLIC_KEY) or --jwks-file (KEYPLANE_JWKS_FILE); \
                 or run `keyplane serve --dev` to try it locally"
            );
        }
        let jwt = JwtVerifier::from_settings(&settings.jwt).context("invalid JWT configuration")?;
        // Before touching the database: a bad certificate is a configuration error.
        let tls = settings
            .tls
            .clone()
            .map(Tls::load)
            .transpose()
            .context("invalid TLS configuration")?;
        let url = settings.database_url.expose_secret();
        let sqlite_claim =
            storage::claim_sqlite(url).context("cannot claim the SQLite database")?;
        let storage::database::Opened { db, primary } = storage::database::open(url)
            .await
            .with_context(|| format!("cannot open the database {}", redact_url(url)))?;
        // A schema newer than this release (a rolling upgrade in progress) is served as it
        // is; --no-migrate only looks, and never stops the start over what it sees.
        if settings.migrate {
            storage::schema::migrate_on_start(&db)
                .await
                .context("cannot apply migrations")?
                .log_on_start(true);
        } else {
            match storage::schema::inspect(&db).await {
                Ok(schema) => schema.log_on_start(false),
                Err(e) => tracing::warn!(error = %e, "cannot read the applied migrations"),
            }
        }
        let store = Store::new(db);
        store
            .refresh_imported_keys()
            .await
            .context("cannot read whether the deployment holds imported keys")?;

        // Page tokens must verify on every replica and across restarts, so the key lives in
        // the database. Without the OS random source there is no safe key to store for good.
        let mut fresh = [0u8; 32];
        getrandom::fill(&mut fresh).context("the OS random source failed")?;
        let stored = store
            .shared_setting("page_token_key", BASE64.encode(fresh))
            .await
            .context("cannot read the page-token key")?;
        let key: [u8; 32] = BASE64
            .decode(&stored)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .context("the stored page-token key is corrupt")?;
        let pages = PageTokenCodec::new(key);

        // PostgreSQL may have other replicas writing: the cache answers only while the
        // invalidation feed is up. SQLite is one process: every write evicts locally.
        let postgres = store.is_shared();
        let feed = if postgres {
            FeedState::down()
        } else {
            FeedState::always_up()
        };
        let cache = Arc::new(VerificationCache::new(
            settings.cache_capacity,
            feed.clone(),
        ));
        let store = store.with_evictions(cache.clone());
        let usage = Arc::new(LastUsedRecorder::default());
        let meter = Arc::new(Meter::new(store.clone()));
        let outage = Arc::new(Outage::new(
            feed.clone(),
            settings.stale_if_error,
            settings.database_timeout,
        ));
        let verifier = KeyVerifier::new(
            store.clone(),
            cache.clone(),
            usage.clone(),
            meter.clone(),
            outage.clone(),
        );
        let auth = Authenticator::new(jwt, verifier.clone());
        let max_delegation_ttl = chrono::Duration::from_std(settings.max_delegation_ttl)
            .context("--max-delegation-ttl is too long")?;
        let api = KeyplaneApi::new(
            store.clone(),
            verifier,
            pages,
            max_delegation_ttl,
            settings.cache_capacity,
        );

        let health = HealthReporter::new();
        let initial = if store.ping().await.is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health::set_all(&health, initial).await;

        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let local_addr = listener.local_addr()?;
        tracing::info!(%local_addr, database = store.backend(), tls = tls.is_some(), "keyplane ready");
        Ok(Self {
            listener,
            local_addr,
            settings,
            store,
            _sqlite_claim: sqlite_claim,
            feed: postgres.then_some((feed, cache)),
            api,
            auth,
            usage,
            meter,
            outage,
            primary,
            health,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` resolves; then reports NOT_SERVING, stops accepting, ends
    /// health `Watch` streams, lets in-flight calls finish within the grace period and
    /// writes pending key usage.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let draining = CancellationToken::new();
        let stop_monitor = CancellationToken::new();
        let stop_usage = CancellationToken::new();

        let stop_primary = CancellationToken::new();
        let primary = self.primary.clone().map(|primary| {
            tokio::spawn(primary.follow(self.store.connection().clone(), stop_primary.clone()))
        });
        let monitor = tokio::spawn(health::monitor(
            self.store.clone(),
            self.outage.clone(),
            self.health.clone(),
            self.settings.health_interval,
            stop_monitor.clone(),
        ));
        let usage = self.usage.clone();
        let usage_store = self.store.clone();
        let flush_interval = self.settings.usage_flush_interval;
        let usage_stop = stop_usage.clone();
        let flusher =
            tokio::spawn(async move { usage.run(usage_store, flush_interval, usage_stop).await });
        let stop_pruning = CancellationToken::new();
        // Zero retention keeps the audit log forever.
        let pruner = (!self.settings.audit_retention.is_zero()).then(|| {
            tokio::spawn(storage::audit::prune_forever(
                self.store.clone(),
                self.settings.audit_retention,
                stop_pruning.clone(),
            ))
        });
        let stop_meter = CancellationToken::new();
        let meter = tokio::spawn(self.meter.clone().run(stop_meter.clone()));
        let stop_feed = CancellationToken::new();
        let feed = self.feed.clone().map(|(state, cache)| {
            tokio::spawn(feed::run(
                self.store.connection().clone(),
                cache,
                state,
                self.meter.clone(),
                self.store.imported_keys(),
                stop_feed.clone(),
            ))
        });

        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        let cors = crate::http::cors::layer(&self.settings.cors_allowed_origins)?;
        let router = Server::builder()
            // HTTP/1.1 too: HTTP/JSON and gRPC-Web clients (browsers, curl) speak it.
            .accept_http1(true)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .timeout(self.settings.request_timeout)
            // Pings keep healthy idle connections readable well within the idle timeout.
            .http2_keepalive_interval(Some(self.settings.idle_timeout / 4))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            // Outermost first: CORS when configured; HTTP/JSON transcoded into gRPC calls
            // and gRPC-Web turned into gRPC (gRPC passes straight through); then, for
            // every call alike, observe it (request id, error log, latency), fix up the
            // size-limit status, and authorize.
            .layer(tower::util::option_layer(cors))
            .layer(HttpLayer::new()?)
            .layer(ObserveLayer::new())
            .layer(MapResponseLayer::new(size_limit::resource_exhausted))
            .layer(AuthLayer::new(self.auth.clone()))
            .add_service(HealthServer::new(DrainingHealth::new(
                self.health.clone(),
                draining.clone(),
            )))
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                WorkspaceServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                ScopeServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                RoleServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(hot_path::ApiKeys::new(self.api.clone()))
            .add_service(
                AuditServiceServer::new(self.api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(hot_path::Authorization::new(self.api.clone()));

        let idle_timeout = self.settings.idle_timeout;
        let incoming = TcpListenerStream::new(self.listener).map(move |accepted| {
            accepted.map(|stream| {
                let _ = stream.set_nodelay(true);
                IdleTimeout::new(stream, idle_timeout)
            })
        });
        let stop_reload = CancellationToken::new();
        let shutdown_signal = draining.clone().cancelled_owned();
        // Boxed: the plaintext and the TLS server are different future types.
        let serve: std::pin::Pin<
            Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
        > = match &self.tls {
            None => Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown_signal)),
            Some(tls) => {
                tokio::spawn(tls.clone().watch(tls::RELOAD_INTERVAL, stop_reload.clone()));
                let incoming = tls::incoming(tls.clone(), incoming, idle_timeout);
                Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown_signal))
            }
        };
        tokio::pin!(serve);

        // When the grace period ends, once shutdown has begun.
        let mut grace_ends = None;
        let result = tokio::select! {
            result = &mut serve => result.context("the server stopped"),
            _ = shutdown => {
                grace_ends = Some(tokio::time::Instant::now() + self.settings.shutdown_grace);
                tracing::info!("shutting down: reporting NOT_SERVING and draining");
                stop_monitor.cancel();
                let _ = monitor.await;
                health::set_all(&self.health, ServingStatus::NotServing).await;
                draining.cancel();
                match tokio::time::timeout(self.settings.shutdown_grace, &mut serve).await {
                    Ok(result) => result.context("the server failed while draining"),
                    Err(_) => {
                        tracing::warn!(grace = ?self.settings.shutdown_grace, "grace period over; closing remaining calls");
                        Ok(())
                    }
                }
            }
        };
        stop_reload.cancel();
        // In-flight calls are done: hand every usage lease back to the other replicas, in
        // what is left of the grace period (at least a moment: the statements take
        // milliseconds). What does not make it is lost, as with a crash, never created.
        stop_meter.cancel();
        let _ = meter.await;
        let left = grace_ends.map_or(self.settings.shutdown_grace, |end| {
            end.saturating_duration_since(tokio::time::Instant::now())
        });
        let left = left.max(std::time::Duration::from_secs(1));
        if tokio::time::timeout(left, self.meter.give_back_all())
            .await
            .is_err()
        {
            tracing::warn!("could not give every usage lease back within the grace period");
        }
        stop_pruning.cancel();
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        stop_usage.cancel();
        let _ = flusher.await;
        stop_feed.cancel();
        if let Some(feed) = feed {
            let _ = feed.await;
        }
        stop_primary.cancel();
        if let Some(primary) = primary {
            let _ = primary.await;
        }
        tracing::info!("stopped");
        result
    }
}

/// Reflection over keyplane's protos, Envoy's ext_authz, health, and `google.rpc` (so
/// grpcurl can print error details).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(crate::proto::ENVOY_EXT_AUTHZ_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
