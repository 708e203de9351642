//! Test harness: every test starts the real server on 127.0.0.1:0 over a fresh database
//! (a temporary SQLite file, or a new PostgreSQL database when
//! `KEYPLANE_TEST_POSTGRES_URL` is set) and calls it through the generated clients.
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyplane::Application;
use keyplane::auth::jwt::{JwtSettings, MintClaims, mint_hs256};
use keyplane::config::Settings;
use keyplane::domain::scope::BuiltinScope;
use keyplane::proto::{
    self as pb, api_key_service_client::ApiKeyServiceClient,
    scope_service_client::ScopeServiceClient, workspace_service_client::WorkspaceServiceClient,
};
use sea_orm::ConnectionTrait;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

pub const JWT_SECRET: &str = "keyplane-test-secret-0123456789abcdef";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn postgres_url() -> Option<String> {
    std::env::var("KEYPLANE_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
}

/// Says, past the test harness's output capture, that a test did not really run.
pub fn announce_skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Generates a SQLite and a PostgreSQL test for each `async fn name(backend: Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$test($crate::helpers::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if $crate::helpers::postgres_url().is_none() {
                    $crate::helpers::announce_skip(
                        module_path!(),
                        "KEYPLANE_TEST_POSTGRES_URL is not set, so the PostgreSQL variant did not run",
                    );
                    return;
                }
                super::$test($crate::helpers::Backend::Postgres).await
            }
        }
    )+};
}

/// A fresh, empty database; a SQLite one lives as long as this value.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn fresh_database(backend: Backend) -> TestDb {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            TestDb {
                url: format!("sqlite://{}/keyplane.db?mode=rwc", dir.path().display()),
                _dir: Some(dir),
            }
        }
        Backend::Postgres => {
            let admin_url = postgres_url().expect("KEYPLANE_TEST_POSTGRES_URL");
            let name = format!("kp_test_{}", Uuid::now_v7().simple());
            let admin = sea_orm::Database::connect(&admin_url)
                .await
                .expect("connect to PostgreSQL");
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await
                .expect("create test database");
            let _ = admin.close().await;
            let base = admin_url.split('?').next().unwrap_or(&admin_url);
            let base = &base[..base.rfind('/').expect("URL with a database path")];
            TestDb {
                url: format!("{base}/{name}"),
                _dir: None,
            }
        }
    }
}

pub fn jwt_settings() -> JwtSettings {
    JwtSettings {
        secret: Some(JWT_SECRET.into()),
        leeway_secs: 0,
        ..Default::default()
    }
}

pub fn test_settings(db_url: &str) -> Settings {
    let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), db_url, jwt_settings());
    settings.usage_flush_interval = Duration::from_millis(100);
    settings.health_interval = Duration::from_millis(200);
    settings.shutdown_grace = Duration::from_secs(5);
    settings
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub channel: Channel,
    /// The tenant of [`TestApp::admin`].
    pub tenant: Uuid,
    pub db: TestDb,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    let db = fresh_database(backend).await;
    let settings = test_settings(&db.url);
    spawn_with(db, settings).await
}

pub async fn spawn_with(db: TestDb, settings: Settings) -> TestApp {
    capture_debug_logs();
    let app = Application::build(settings)
        .await
        .expect("build the application");
    let addr = app.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the server");
    TestApp {
        addr,
        channel,
        tenant: Uuid::now_v7(),
        db,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    pub fn workspaces(&self) -> WorkspaceServiceClient<Channel> {
        WorkspaceServiceClient::new(self.channel.clone())
    }

    pub fn scopes(&self) -> ScopeServiceClient<Channel> {
        ScopeServiceClient::new(self.channel.clone())
    }

    pub fn keys(&self) -> ApiKeyServiceClient<Channel> {
        ApiKeyServiceClient::new(self.channel.clone())
    }

    /// A tenant token for this app's tenant with every built-in scope.
    pub fn admin(&self) -> Cred {
        Cred::Bearer(token(Some(self.tenant), &all_builtin()))
    }

    /// Stops the server gracefully and returns what `run_until_stopped` returned, keeping
    /// the database for a restart.
    pub async fn stop(mut self) -> (anyhow::Result<()>, TestDb) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = match self.handle.take() {
            Some(handle) => handle.await.expect("server task panicked"),
            None => Ok(()),
        };
        let db = std::mem::replace(
            &mut self.db,
            TestDb {
                url: String::new(),
                _dir: None,
            },
        );
        (result, db)
    }

    pub async fn create_workspace(&self, name: &str) -> pb::Workspace {
        self.workspaces()
            .create_workspace(req(
                pb::CreateWorkspaceRequest {
                    name: name.into(),
                    ..Default::default()
                },
                &self.admin(),
            ))
            .await
            .expect("create workspace")
            .into_inner()
            .workspace
            .unwrap()
    }

    pub async fn create_scope(&self, representation: &str, workspace_id: &str) -> pb::Scope {
        self.scopes()
            .create_scope(req(
                pb::CreateScopeRequest {
                    representation: representation.into(),
                    workspace_id: workspace_id.into(),
                    ..Default::default()
                },
                &self.admin(),
            ))
            .await
            .expect("create scope")
            .into_inner()
            .scope
            .unwrap()
    }

    /// A key in `workspace_id` holding `scopes`; returns the key and its secret.
    pub async fn create_key(&self, workspace_id: &str, scopes: &[&str]) -> (pb::ApiKey, String) {
        let r = self
            .keys()
            .create_api_key(req(
                pb::CreateApiKeyRequest {
                    workspace_id: workspace_id.into(),
                    name: "test".into(),
                    scopes: scopes.iter().map(|s| s.to_string()).collect(),
                    ..Default::default()
                },
                &self.admin(),
            ))
            .await
            .expect("create key")
            .into_inner();
        (r.api_key.unwrap(), r.secret)
    }

    pub async fn verify(&self, key: &str, required: &[&str]) -> pb::VerifyApiKeyResponse {
        self.keys()
            .verify_api_key(req(
                pb::VerifyApiKeyRequest {
                    key: key.into(),
                    required_scopes: required.iter().map(|s| s.to_string()).collect(),
                },
                &self.admin(),
            ))
            .await
            .expect("verify")
            .into_inner()
    }
}

pub fn all_builtin() -> Vec<&'static str> {
    BuiltinScope::ALL.iter().map(|b| b.as_str()).collect()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token signed with the test secret; `tenant: None` makes a platform token.
pub fn token(tenant: Option<Uuid>, scopes: &[&str]) -> String {
    mint_hs256(
        JWT_SECRET,
        &MintClaims {
            sub: "tester".into(),
            iat: now(),
            exp: now() + 600,
            tenant_id: tenant.map(|t| t.to_string()),
            scope: scopes.join(" "),
            iss: None,
            aud: None,
        },
    )
    .unwrap()
}

/// A credential to call with.
#[derive(Clone, Debug)]
pub enum Cred {
    None,
    Bearer(String),
    ApiKey(String),
}

pub fn req<T>(message: T, cred: &Cred) -> Request<T> {
    let mut request = Request::new(message);
    let md = request.metadata_mut();
    match cred {
        Cred::None => {}
        Cred::Bearer(t) => {
            md.insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Cred::ApiKey(k) => {
            md.insert("x-api-key", k.parse().unwrap());
        }
    }
    request
}

pub fn req_tenant<T>(message: T, cred: &Cred, tenant: &str) -> Request<T> {
    let mut request = req(message, cred);
    request
        .metadata_mut()
        .insert("x-tenant-id", tenant.parse().unwrap());
    request
}

/// The `ErrorInfo.reason` of an error status (empty when there is none).
pub fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Asserts that a call failed with this code and `ErrorInfo` reason, in the right domain.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
) -> Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("ErrorInfo in the status details");
    assert_eq!(info.reason, expected_reason, "{status:?}");
    assert_eq!(info.domain, "keyplane.dev");
    status
}

/// The fields named by the `BadRequest` details of a status.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Every test process logs at debug level through [`LeakScanner`]; a log line holding a
/// key secret, a JWT or the configured secret is recorded here and fails the test whose
/// server is dropped next (see `Drop for TestApp`).
static LEAKS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

pub fn capture_debug_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(|| LeakScanner)
            .try_init();
    });
}

struct LeakScanner;

impl std::io::Write for LeakScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        if let Some(leak) = find_secret(&line) {
            LEAKS
                .lock()
                .unwrap()
                .push(format!("{leak}  in log line: {line}"));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first secret in `text`: a well-formed keyplane key (checksum and all), something
/// shaped like a JWT, or the test JWT secret.
pub fn find_secret(text: &str) -> Option<String> {
    if text.contains(JWT_SECRET) {
        return Some("the configured JWT secret".into());
    }
    let bytes = text.as_bytes();
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    for (i, _) in text.match_indices("eyJ") {
        let segment: Vec<usize> = bytes[i..]
            .split(|b| !is_b64(*b) && *b != b'.')
            .next()
            .map(|run| {
                run.iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'.')
                    .map(|(j, _)| j)
                    .collect()
            })
            .unwrap_or_default();
        if segment.len() >= 2 {
            return Some(format!("a JWT at byte {i}"));
        }
    }
    for (i, _) in text.match_indices('_') {
        let start = bytes[..i]
            .iter()
            .rposition(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit()))
            .map_or(0, |p| p + 1);
        let end = bytes[i + 1..]
            .iter()
            .position(|b| !b.is_ascii_alphanumeric())
            .map_or(bytes.len(), |p| i + 1 + p);
        if let Some(candidate) = text.get(start..end)
            && keyplane::domain::key::ApiKeySecret::parse(candidate).is_ok()
        {
            return Some(format!(
                "an API key ending {}",
                &candidate[candidate.len() - 4..]
            ));
        }
    }
    None
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let leaks = std::mem::take(&mut *LEAKS.lock().unwrap_or_else(|p| p.into_inner()));
        if !leaks.is_empty() && !std::thread::panicking() {
            panic!("secrets in the logs:\n{}", leaks.join("\n"));
        }
    }
}

/// Polls the overall health until it is `wanted`; returns how long that took. Fails the
/// test after `within`. (Used by `tests/faults.rs` and `tests/postgres_restart.rs`, which
/// include this file.)
#[allow(dead_code)]
pub async fn wait_for_health(
    app: &TestApp,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) -> Duration {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(app.channel.clone());
    let started = tokio::time::Instant::now();
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        if status == wanted {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "health not {wanted:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
