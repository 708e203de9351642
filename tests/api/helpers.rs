//! Test harness: every test starts the real server on 127.0.0.1:0 over a fresh database
//! (a temporary SQLite file, or a new PostgreSQL database when
//! `KEYPLANE_TEST_POSTGRES_URL` is set) and calls it through typed clients that carry a
//! credential ([`TestApp::client`]).
use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyplane::Application;
use keyplane::auth::jwt::{JwtSettings, MintClaims, mint_hs256};
use keyplane::config::Settings;
use keyplane::domain::scope::BuiltinScope;
use keyplane::proto::{
    self as pb, api_key_service_client::ApiKeyServiceClient,
    audit_service_client::AuditServiceClient, scope_service_client::ScopeServiceClient,
    workspace_service_client::WorkspaceServiceClient,
};
use prost_types::{FieldMask, Timestamp};
use sea_orm::ConnectionTrait;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
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

/// Generates a SQLite and a PostgreSQL test for each `async fn name(backend: Backend)`,
/// each on its own runtime (see [`run_test`]).
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[test]
            fn sqlite() {
                $crate::helpers::run_test(super::$test($crate::helpers::Backend::Sqlite))
            }

            #[test]
            fn postgres() {
                if $crate::helpers::postgres_url().is_none() {
                    $crate::helpers::announce_skip(
                        module_path!(),
                        "KEYPLANE_TEST_POSTGRES_URL is not set, so the PostgreSQL variant did not run",
                    );
                    return;
                }
                $crate::helpers::run_test(super::$test($crate::helpers::Backend::Postgres))
            }
        }
    )+};
}

// ---- One runtime per test, so that a leaked secret is blamed on the test that leaked it ----

static NEXT_TEST_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The test this thread works for; 0 on threads no test owns.
    static TEST_ID: Cell<u64> = const { Cell::new(0) };
}

/// A test id no test has had yet.
pub fn new_test_id() -> u64 {
    NEXT_TEST_ID.fetch_add(1, Ordering::Relaxed)
}

/// The id of the test the current thread works for (0 when none).
pub fn current_test_id() -> u64 {
    TEST_ID.get()
}

/// Runs `f` with the current thread tagged as working for test `id`.
pub fn as_test<R>(id: u64, f: impl FnOnce() -> R) -> R {
    let previous = TEST_ID.replace(id);
    let result = f();
    TEST_ID.set(previous);
    result
}

/// Runs an async test body on a runtime of its own (two workers, like
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`) whose every thread, and
/// the test thread, carries a fresh test id. The server a test spawns runs on that runtime,
/// so what it logs is filed under that test; the test fails if it leaked a secret.
pub fn run_test(body: impl Future<Output = ()>) {
    capture_debug_logs();
    let id = new_test_id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || TEST_ID.set(id))
        .build()
        .expect("a test runtime");
    as_test(id, || {
        runtime.block_on(body);
        // Whatever the server logs while it shuts down is this test's too.
        drop(runtime);
    });
    let leaks = take_leaks(id);
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );
}

// ---- Databases and servers ----

/// A fresh, empty database; a SQLite one lives as long as this value.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// The same PostgreSQL database, for another replica (tests/replicas.rs).
    #[allow(dead_code)]
    pub fn shared(&self) -> TestDb {
        assert!(self._dir.is_none(), "replicas share PostgreSQL, not SQLite");
        TestDb {
            url: self.url.clone(),
            _dir: None,
        }
    }
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

/// The JWT settings of every test app: the HS256 test secret, no leeway. (The one place
/// that builds them.)
pub fn jwt_settings() -> JwtSettings {
    JwtSettings {
        secret: Some(JWT_SECRET.into()),
        leeway_secs: 0,
        ..Default::default()
    }
}

/// The settings of a test app over `db_url`, with short intervals. (The one place that
/// builds them.)
pub fn test_settings(db_url: &str) -> Settings {
    let mut settings = Settings::new("127.0.0.1:0".parse().unwrap(), db_url, jwt_settings());
    settings.usage_flush_interval = Duration::from_millis(100);
    settings.health_interval = Duration::from_millis(200);
    settings.shutdown_grace = Duration::from_secs(5);
    settings
}

/// A running server and the tenant its [`TestApp::admin`] acts for.
pub struct TestApp {
    pub addr: SocketAddr,
    pub channel: Channel,
    /// The tenant of [`TestApp::admin`].
    pub tenant: Uuid,
    pub db: TestDb,
    test_id: u64,
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
        test_id: current_test_id(),
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    /// Every service, called with `cred`.
    pub fn client(&self, cred: &Cred) -> Client {
        Client::new(self.channel.clone(), cred)
    }

    /// Every service, called as [`TestApp::admin`].
    pub fn as_admin(&self) -> Client {
        self.client(&self.admin())
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
        self.as_admin()
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .expect("create workspace")
            .into_inner()
            .workspace
            .unwrap()
    }

    pub async fn create_scope(&self, representation: &str, workspace_id: &str) -> pb::Scope {
        self.as_admin()
            .scopes
            .create_scope(pb::CreateScopeRequest {
                representation: representation.into(),
                workspace_id: workspace_id.into(),
                ..Default::default()
            })
            .await
            .expect("create scope")
            .into_inner()
            .scope
            .unwrap()
    }

    /// A key in `workspace_id` holding `scopes`; returns the key and its secret.
    pub async fn create_key(&self, workspace_id: &str, scopes: &[&str]) -> (pb::ApiKey, String) {
        let r = self
            .as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: workspace_id.into(),
                name: "test".into(),
                scopes: strings(scopes),
                ..Default::default()
            })
            .await
            .expect("create key")
            .into_inner();
        (r.api_key.unwrap(), r.secret)
    }

    /// A key in a fresh workspace with these usage controls (`owner` may be ""); returns
    /// the key and its secret.
    pub async fn create_metered_key(
        &self,
        owner: &str,
        rate_limits: Vec<pb::RateLimit>,
        remaining_uses: Option<i64>,
        refill: Option<pb::Refill>,
    ) -> (pb::ApiKey, String) {
        let ws = self.create_workspace("metered").await;
        let r = self
            .as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: ws.id,
                name: "metered".into(),
                owner_id: owner.into(),
                rate_limits,
                remaining_uses,
                refill,
                ..Default::default()
            })
            .await
            .expect("create a metered key")
            .into_inner();
        (r.api_key.unwrap(), r.secret)
    }

    /// The key as the admin sees it now.
    pub async fn get_key(&self, id: &str) -> Result<pb::ApiKey, Status> {
        self.as_admin()
            .keys
            .get_api_key(pb::GetApiKeyRequest { id: id.into() })
            .await
            .resource()
    }

    /// The scope as the admin sees it now.
    pub async fn get_scope(&self, id: &str) -> Result<pb::Scope, Status> {
        self.as_admin()
            .scopes
            .get_scope(pb::GetScopeRequest { id: id.into() })
            .await
            .resource()
    }

    /// The workspace as the admin sees it now.
    pub async fn get_workspace(&self, id: &str) -> Result<pb::Workspace, Status> {
        self.as_admin()
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest { id: id.into() })
            .await
            .resource()
    }

    pub async fn verify(&self, key: &str, required: &[&str]) -> pb::VerifyApiKeyResponse {
        self.as_admin()
            .keys
            .verify_api_key(pb::VerifyApiKeyRequest {
                key: key.into(),
                required_scopes: strings(required),
                cost: None,
            })
            .await
            .expect("verify")
            .into_inner()
    }
}

// ---- Credentials and typed clients ----

/// A credential to call with.
#[derive(Clone, Debug)]
pub enum Cred {
    None,
    Bearer(String),
    ApiKey(String),
    /// This exact `authorization` header value, well-formed or not.
    Authorization(String),
}

/// A bearer token credential.
pub fn bearer(token: impl Into<String>) -> Cred {
    Cred::Bearer(token.into())
}

/// The interceptor of a [`Client`]: adds the credential, and `x-tenant-id` when set, to
/// every request.
#[derive(Clone, Debug)]
pub struct Auth {
    cred: Cred,
    tenant: Option<String>,
}

impl Interceptor for Auth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let md = request.metadata_mut();
        match &self.cred {
            Cred::None => {}
            Cred::Bearer(t) => {
                md.insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            Cred::ApiKey(k) => {
                md.insert("x-api-key", k.parse().unwrap());
            }
            Cred::Authorization(value) => {
                md.insert("authorization", value.parse().unwrap());
            }
        }
        if let Some(tenant) = &self.tenant {
            md.insert("x-tenant-id", tenant.parse().unwrap());
        }
        Ok(request)
    }
}

/// A channel whose requests carry a credential.
pub type Authed = InterceptedService<Channel, Auth>;

/// The generated clients of keyplane's services, all calling as one credential.
#[derive(Clone)]
pub struct Client {
    pub workspaces: WorkspaceServiceClient<Authed>,
    pub scopes: ScopeServiceClient<Authed>,
    pub keys: ApiKeyServiceClient<Authed>,
    pub audit: AuditServiceClient<Authed>,
    channel: Channel,
    auth: Auth,
}

impl Client {
    pub fn new(channel: Channel, cred: &Cred) -> Self {
        Self::with(
            channel,
            Auth {
                cred: cred.clone(),
                tenant: None,
            },
        )
    }

    fn with(channel: Channel, auth: Auth) -> Self {
        Self {
            workspaces: WorkspaceServiceClient::with_interceptor(channel.clone(), auth.clone()),
            scopes: ScopeServiceClient::with_interceptor(channel.clone(), auth.clone()),
            keys: ApiKeyServiceClient::with_interceptor(channel.clone(), auth.clone()),
            audit: AuditServiceClient::with_interceptor(channel.clone(), auth.clone()),
            channel,
            auth,
        }
    }

    /// The same caller naming `tenant` in `x-tenant-id` (any text, valid or not).
    pub fn tenant(&self, tenant: impl std::fmt::Display) -> Self {
        Self::with(
            self.channel.clone(),
            Auth {
                tenant: Some(tenant.to_string()),
                ..self.auth.clone()
            },
        )
    }

    /// A raw gRPC client with this caller's headers, for calling an RPC by its path.
    pub fn grpc(&self) -> tonic::client::Grpc<Authed> {
        tonic::client::Grpc::new(InterceptedService::new(
            self.channel.clone(),
            self.auth.clone(),
        ))
    }
}

/// `.inner()`: the message of a successful call.
pub trait Reply<T> {
    fn inner(self) -> Result<T, Status>;
}

impl<T> Reply<T> for Result<Response<T>, Status> {
    fn inner(self) -> Result<T, Status> {
        self.map(Response::into_inner)
    }
}

/// `.resource()`: the one resource a Create/Get/Update/Revoke response carries.
pub trait Resource {
    type Of;
    fn resource(self) -> Result<Self::Of, Status>;
}

macro_rules! resource_of {
    ($($response:ty => $field:ident: $of:ty),+ $(,)?) => {$(
        impl Resource for Result<Response<$response>, Status> {
            type Of = $of;
            fn resource(self) -> Result<$of, Status> {
                self.map(|r| {
                    r.into_inner()
                        .$field
                        .expect(concat!(stringify!($field), " in the response"))
                })
            }
        }
    )+};
}

resource_of!(
    pb::CreateWorkspaceResponse => workspace: pb::Workspace,
    pb::GetWorkspaceResponse => workspace: pb::Workspace,
    pb::UpdateWorkspaceResponse => workspace: pb::Workspace,
    pb::CreateScopeResponse => scope: pb::Scope,
    pb::GetScopeResponse => scope: pb::Scope,
    pb::UpdateScopeResponse => scope: pb::Scope,
    pb::GetApiKeyResponse => api_key: pb::ApiKey,
    pb::UpdateApiKeyResponse => api_key: pb::ApiKey,
    pb::RevokeApiKeyResponse => api_key: pb::ApiKey,
);

/// How many built-in scopes every tenant sees.
pub const BUILTINS: usize = BuiltinScope::ALL.len();

pub fn all_builtin() -> Vec<&'static str> {
    BuiltinScope::ALL.iter().map(|b| b.as_str()).collect()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token signed with the test secret; `tenant: None` makes a platform token.
pub fn token(tenant: Option<Uuid>, scopes: &[&str]) -> String {
    let now = unix_now() as u64;
    mint_hs256(
        JWT_SECRET,
        &MintClaims {
            sub: "tester".into(),
            iat: now,
            exp: now + 600,
            tenant_id: tenant.map(|t| t.to_string()),
            scope: scopes.join(" "),
            iss: None,
            aud: None,
        },
    )
    .unwrap()
}

/// A tenant token with every built-in scope for a tenant of its own.
pub fn stranger() -> Cred {
    Cred::Bearer(token(Some(Uuid::now_v7()), &all_builtin()))
}

// ---- Small builders ----

pub fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// An update mask of these paths (an empty one is still sent, as an empty mask).
pub fn mask(paths: &[&str]) -> Option<FieldMask> {
    Some(FieldMask {
        paths: strings(paths),
    })
}

/// A whole-second timestamp `secs` from now (whole seconds survive every backend exactly).
pub fn in_secs(secs: i64) -> Timestamp {
    Timestamp {
        seconds: unix_now() + secs,
        nanos: 0,
    }
}

/// A whole-second duration, as a grace period.
pub fn seconds(seconds: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds, nanos: 0 })
}

/// A rate limit of `limit` per `period_secs`.
pub fn rate_limit(name: &str, limit: i64, period_secs: i64, shared: bool) -> pb::RateLimit {
    pb::RateLimit {
        name: name.into(),
        limit,
        period: seconds(period_secs),
        shared_by_owner: shared,
    }
}

// ---- Assertions ----

/// The `ErrorInfo.reason` of an error status (empty when there is none).
pub fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// A value of the `ErrorInfo.metadata` of a status (empty when there is none).
pub fn reason_metadata(status: &Status, key: &str) -> String {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
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

/// Like [`assert_err`], naming the case that failed.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
    what: &str,
) -> Status {
    match result {
        Err(status) if status.code() == code && reason(&status) == expected_reason => {
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.domain, "keyplane.dev", "{what}");
            status
        }
        other => panic!("{what}: expected {code:?} {expected_reason}, got {other:?}"),
    }
}

/// Asserts an INVALID_ARGUMENT whose BadRequest names exactly `fields`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, fields: &[&str], why: &str) {
    let status = result.expect_err(why);
    assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("INVALID_ARGUMENT".to_string()),
        "{why}: {status:?}"
    );
    assert_eq!(violated_fields(&status), fields, "{why}: {status:?}");
}

/// The fields named by the `BadRequest` details of a status.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts the documented shape of a fresh secret: `{prefix}_` and 49 base62 characters.
#[track_caller]
pub fn assert_secret_shape(secret: &str, prefix: &str) {
    let body = secret
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .unwrap_or_else(|| panic!("{secret:?} does not start with {prefix}_"));
    assert_eq!(body.len(), 49, "body of {secret:?}");
    assert!(
        body.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret:?} is not base62"
    );
}

/// Asserts that the body of `secret` does not appear in the debug form of `what`.
#[track_caller]
pub fn assert_no_secret(what: &impl std::fmt::Debug, secret: &str) {
    let shown = format!("{what:?}");
    // The body alone (without the prefix) is what must never travel again.
    assert!(
        !shown.contains(&secret[secret.len() - 49..]),
        "the secret leaked into {shown}"
    );
}

// ---- The secret-leak scanner ----

/// Every test process logs at debug level through [`LeakScanner`]; a log line holding a
/// key secret, a JWT or the configured secret is filed here under the id of the test whose
/// thread wrote it (0: a thread no test owns), and fails that test (see [`run_test`] and
/// `Drop for TestApp`).
static LEAKS: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

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

/// Takes the leaks filed under test `id`, and those no test owns (they must fail some
/// test, and cannot be blamed on a better one).
pub fn take_leaks(id: u64) -> Vec<String> {
    let mut all = LEAKS.lock().unwrap_or_else(|p| p.into_inner());
    let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *all)
        .into_iter()
        .partition(|(owner, _)| *owner == id || *owner == 0);
    *all = others;
    mine.into_iter()
        .map(|(owner, leak)| match owner {
            0 => format!("(on a thread of no test) {leak}"),
            _ => leak,
        })
        .collect()
}

struct LeakScanner;

impl std::io::Write for LeakScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        if let Some(leak) = find_secret(&line) {
            LEAKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((current_test_id(), format!("{leak}  in log line: {line}")));
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
        // Fails early, with the test's own leaks only; `run_test` checks again once the
        // server has stopped.
        let mut leaks = take_leaks(self.test_id);
        if !std::thread::panicking() && !self.db.url.is_empty() {
            leaks.extend(audit_leaks(&self.db.url));
        }
        if !leaks.is_empty() && !std::thread::panicking() {
            panic!(
                "secrets in the logs or the audit log:\n{}",
                leaks.join("\n")
            );
        }
    }
}

/// What a test's audit rows must never hold: a secret or a JWT anywhere in a row, or a
/// changed field that is not a bare field name (a value would be). Checked when every
/// test's app goes away.
pub fn audit_leaks(url: &str) -> Vec<String> {
    use keyplane::storage::entity::audit_event;
    use sea_orm::EntityTrait;
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return Vec::new();
    };
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Vec::new();
    }
    let rows = tokio::task::block_in_place(|| {
        handle.block_on(async {
            let db = sea_orm::Database::connect(url).await?;
            let rows = audit_event::Entity::find().all(&db).await;
            let _ = db.close().await;
            rows
        })
    });
    let rows = match rows {
        Ok(rows) => rows,
        // A test that cut or stopped its database has nothing to read here.
        Err(e) => {
            eprintln!("audit rows not scanned for secrets ({url}): {e}");
            return Vec::new();
        }
    };
    let mut leaks = Vec::new();
    for row in rows {
        let text = format!("{row:?}");
        if let Some(leak) = find_secret(&text) {
            leaks.push(format!("{leak} in audit event {}", row.id));
        }
        let fields: Vec<String> = serde_json::from_value(row.changed_fields.clone()).unwrap();
        for field in fields {
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                leaks.push(format!("changed field {field:?} in audit event {}", row.id));
            }
        }
    }
    leaks
}

/// Whether PostgreSQL is configured; says `SKIPPED` loudly when it is not. (For the
/// multi-replica tests, which include this file.)
#[allow(dead_code)]
pub fn postgres_or_skip(test: &str) -> bool {
    if postgres_url().is_none() {
        announce_skip(
            test,
            "KEYPLANE_TEST_POSTGRES_URL is not set: replicas need PostgreSQL",
        );
        return false;
    }
    true
}

/// `n` replicas on one fresh PostgreSQL database, after `settle`: time for their feeds to
/// LISTEN (and to hear each other's heartbeats, which usage controls count).
#[allow(dead_code)]
pub async fn replicas(n: usize, settle: Duration) -> Vec<TestApp> {
    let first = spawn_app(Backend::Postgres).await;
    let mut all = Vec::with_capacity(n);
    for _ in 1..n {
        all.push(spawn_with(first.db.shared(), test_settings(&first.db.url)).await);
    }
    all.insert(0, first);
    tokio::time::sleep(settle).await;
    all
}

/// Polls the overall health (`""`) until it is `wanted`; returns how long that took. Fails
/// the test after `within`.
#[allow(dead_code)]
pub async fn wait_for_health(
    app: &TestApp,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) -> Duration {
    wait_for_service_health(app, "", wanted, within).await
}

/// Polls one service name's health until it is `wanted`; returns how long that took. Fails
/// the test after `within`. (Used by the tests that take the database away.)
#[allow(dead_code)]
pub async fn wait_for_service_health(
    app: &TestApp,
    service: &str,
    wanted: tonic_health::pb::health_check_response::ServingStatus,
    within: Duration,
) -> Duration {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(app.channel.clone());
    let started = tokio::time::Instant::now();
    loop {
        let status = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
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
            "health of {service:?} not {wanted:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
