//! Databases and servers: a fresh database per test ([`fresh_database`]), the real server
//! over it ([`spawn_app`], [`spawn_with`]), the admin's actions on it ([`TestApp`]), and
//! the SQLite + PostgreSQL pair of every backend-generic test ([`on_both_backends!`]).
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use keyplane::Application;
use keyplane::auth::jwt::JwtSettings;
use keyplane::config::Settings;
use keyplane::proto as pb;
use sea_orm::ConnectionTrait;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;
use uuid::Uuid;

use crate::client::{Client, Cred, JWT_SECRET, Resource, all_builtin, strings, token};
use crate::leaks::{audit_leaks, capture_debug_logs, current_test_id, take_leaks};

/// The database a test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A new database on the server of `KEYPLANE_TEST_POSTGRES_URL`.
    Postgres,
}

/// `KEYPLANE_TEST_POSTGRES_URL`, when set and not empty.
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
/// each on its own runtime (see [`run_test`](crate::run_test)).
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),+ $(,)?) => {$(
        mod $test {
            #[test]
            fn sqlite() {
                $crate::run_test(super::$test($crate::Backend::Sqlite))
            }

            #[test]
            fn postgres() {
                if $crate::postgres_url().is_none() {
                    $crate::announce_skip(
                        module_path!(),
                        "KEYPLANE_TEST_POSTGRES_URL is not set, so the PostgreSQL variant did not run",
                    );
                    return;
                }
                $crate::run_test(super::$test($crate::Backend::Postgres))
            }
        }
    )+};
}

/// A fresh, empty database; a SQLite one lives as long as this value.
pub struct TestDb {
    /// What the server connects to.
    pub url: String,
    dir: Option<tempfile::TempDir>,
}

impl TestDb {
    /// The same PostgreSQL database, for another replica.
    pub fn shared(&self) -> TestDb {
        assert!(self.dir.is_none(), "replicas share PostgreSQL, not SQLite");
        TestDb {
            url: self.url.clone(),
            dir: None,
        }
    }
}

/// A new empty database on `backend`: a SQLite file in a temporary directory, or a
/// database named `kp_test_…` created on the PostgreSQL server.
pub async fn fresh_database(backend: Backend) -> TestDb {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("tempdir");
            TestDb {
                url: format!("sqlite://{}/keyplane.db?mode=rwc", dir.path().display()),
                dir: Some(dir),
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
                dir: None,
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

/// A running server and the tenant its [`TestApp::admin`] acts for. Dropping it fails the
/// test if its server logged a secret or its audit log holds one.
pub struct TestApp {
    /// Where the server listens.
    pub addr: SocketAddr,
    /// A connection to it.
    pub channel: Channel,
    /// The tenant of [`TestApp::admin`].
    pub tenant: Uuid,
    /// The database it serves.
    pub db: TestDb,
    test_id: u64,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The server with the test settings over a fresh database on `backend`.
pub async fn spawn_app(backend: Backend) -> TestApp {
    let db = fresh_database(backend).await;
    let settings = test_settings(&db.url);
    spawn_with(db, settings).await
}

/// The server with these settings, over `db` (which it keeps alive); connected.
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
                dir: None,
            },
        );
        (result, db)
    }

    /// A workspace of the admin's tenant ([`Client::create_workspace`]).
    pub async fn create_workspace(&self, name: &str) -> pb::Workspace {
        self.as_admin().create_workspace(name).await
    }

    /// A scope in `workspace_id`.
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

    /// A role named `name` in `workspace_id` ("" for a tenant-wide one) granting `scopes`.
    pub async fn create_role(&self, name: &str, workspace_id: &str, scopes: &[&str]) -> pb::Role {
        self.as_admin()
            .roles
            .create_role(pb::CreateRoleRequest {
                workspace_id: workspace_id.into(),
                name: name.into(),
                scopes: strings(scopes),
                ..Default::default()
            })
            .await
            .resource()
            .expect("create role")
    }

    /// The role as the admin sees it now.
    pub async fn get_role(&self, id: &str) -> Result<pb::Role, Status> {
        self.as_admin()
            .roles
            .get_role(pb::GetRoleRequest { id: id.into() })
            .await
            .resource()
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

    /// The admin's verdict on `key` requiring `required` ([`Client::verify`]).
    pub async fn verify(&self, key: &str, required: &[&str]) -> pb::VerifyApiKeyResponse {
        self.as_admin().verify(key, required).await
    }

    /// Revokes key `id` as the admin ([`Client::revoke_key`]).
    pub async fn revoke_key(&self, id: &str) -> pb::ApiKey {
        self.as_admin().revoke_key(id).await
    }

    /// Disables key `id` as the admin ([`Client::disable_key`]).
    pub async fn disable_key(&self, id: &str) -> pb::ApiKey {
        self.as_admin().disable_key(id).await
    }
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
