//! Command line and environment configuration. Every flag also reads an
//! environment variable; the `///` docs below are the `--help` text.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::auth::jwt::JwtSettings;
use crate::grpc::tls::TlsSettings;

/// Every default of `serve`, defined once: the flags show them in `--help`, and
/// [`Settings::new`] starts from them.
pub mod defaults {
    use super::*;

    pub const LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 50051));
    pub const DATABASE_URL: &str = "sqlite://keyplane.db?mode=rwc";
    pub use crate::auth::jwt::DEFAULT_LEEWAY as JWT_LEEWAY;
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    pub const USAGE_FLUSH_INTERVAL: Duration = Duration::from_secs(2);
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    pub const CACHE_CAPACITY: u64 = 100_000;
    pub const AUDIT_RETENTION: Duration = Duration::from_secs(90 * 24 * 60 * 60);
    pub const STALE_IF_ERROR: Duration = Duration::from_secs(120);
    pub const DATABASE_TIMEOUT: Duration = Duration::from_millis(500);
    pub const MAX_DELEGATION_TTL: Duration = Duration::from_secs(24 * 60 * 60);
}

/// A flag value that must never be printed back: clap parses it straight into a secret.
fn secret(text: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(text.into())
}

#[derive(Debug, Parser)]
#[command(
    name = "keyplane",
    version,
    about = "Multi-tenant gRPC control plane for API keys, workspaces and scopes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(Box<ServeArgs>),
    /// Mint a JWT with the configured HS256 secret (for operators and tests).
    Token(TokenArgs),
    /// Apply or inspect database migrations.
    Migrate(MigrateArgs),
    /// Inspect the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print the OpenAPI 3.1 document of the HTTP/JSON API (as served at /openapi.json).
    Openapi,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a tenant's audit hash chain; names the first broken event and exits non-zero
    /// when an event was edited, inserted or deleted.
    Verify(AuditVerifyArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AuditVerifyArgs {
    /// The tenant whose chain to check.
    #[arg(long)]
    pub tenant: uuid::Uuid,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Where the data lives.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Database URL: `sqlite://FILE?mode=rwc` (embedded) or `postgres://USER:PASSWORD@HOST/DB`;
    /// several PostgreSQL hosts as libpq writes them,
    /// `postgres://USER:PASSWORD@HOST1:PORT1,HOST2:PORT2/DB?target_session_attrs=read-write`,
    /// and keyplane follows the primary among them.
    #[arg(
        long,
        env = "KEYPLANE_DATABASE_URL",
        default_value = defaults::DATABASE_URL,
        value_parser = secret,
        hide_env_values = true
    )]
    pub database_url: SecretString,
}

/// How callers' JWTs are validated. At least one key source is needed outside `--dev`.
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// HS256 shared secret, at least 32 bytes.
    #[arg(long, env = "KEYPLANE_JWT_SECRET", value_parser = secret, hide_env_values = true)]
    pub jwt_secret: Option<SecretString>,
    /// PEM file with an RSA (RS256), EC P-256 (ES256) or Ed25519 (EdDSA) public key.
    #[arg(long, env = "KEYPLANE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS file; the token's `kid` selects the key.
    #[arg(long, env = "KEYPLANE_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss` claim, when set.
    #[arg(long, env = "KEYPLANE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, when set.
    #[arg(long, env = "KEYPLANE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[arg(long, env = "KEYPLANE_JWT_LEEWAY", default_value_t = defaults::JWT_LEEWAY.into())]
    pub jwt_leeway: humantime::Duration,
}

impl JwtArgs {
    pub fn settings(&self) -> JwtSettings {
        JwtSettings {
            secret: self.jwt_secret.clone(),
            public_key_file: self.jwt_public_key.clone(),
            jwks_file: self.jwks_file.clone(),
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            leeway_secs: Duration::from(self.jwt_leeway).as_secs(),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on (port 0 picks a free port).
    #[arg(long, env = "KEYPLANE_LISTEN", default_value_t = defaults::LISTEN)]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Address for the Prometheus `/metrics` endpoint; off when unset.
    #[arg(long, env = "KEYPLANE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "KEYPLANE_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Development mode: runs with nothing configured (SQLite in the working directory, a
    /// generated HS256 secret kept in `keyplane.dev-secret`) and prints an admin token.
    #[arg(long, env = "KEYPLANE_DEV")]
    pub dev: bool,
    /// Do not apply pending migrations on start.
    #[arg(long, env = "KEYPLANE_NO_MIGRATE")]
    pub no_migrate: bool,
    /// How long in-flight calls may take to finish after SIGTERM / Ctrl-C.
    #[arg(long, env = "KEYPLANE_SHUTDOWN_GRACE", default_value_t = defaults::SHUTDOWN_GRACE.into())]
    pub shutdown_grace: humantime::Duration,
    /// How often coalesced `last_used_time` values are written.
    #[arg(long, env = "KEYPLANE_USAGE_FLUSH_INTERVAL", default_value_t = defaults::USAGE_FLUSH_INTERVAL.into())]
    pub usage_flush_interval: humantime::Duration,
    /// How often the database is checked for the health service.
    #[arg(long, env = "KEYPLANE_HEALTH_INTERVAL", default_value_t = defaults::HEALTH_INTERVAL.into())]
    pub health_interval: humantime::Duration,
    /// Connections whose peer sends nothing (not even keepalive acks) for this long are
    /// closed.
    #[arg(long, env = "KEYPLANE_IDLE_TIMEOUT", default_value_t = defaults::IDLE_TIMEOUT.into())]
    pub idle_timeout: humantime::Duration,
    /// Verification cache entries (keys and unknown digests) kept in memory; 0 turns the
    /// cache off, so that every verification reads the database.
    #[arg(long, env = "KEYPLANE_CACHE_CAPACITY", default_value_t = defaults::CACHE_CAPACITY)]
    pub cache_capacity: u64,
    /// Longest time one call may take, however slowly the client sends it; a client's
    /// shorter `grpc-timeout` wins.
    #[arg(long, env = "KEYPLANE_REQUEST_TIMEOUT", default_value_t = defaults::REQUEST_TIMEOUT.into())]
    pub request_timeout: humantime::Duration,
    /// How long audit events are kept; older ones are pruned in the background, in small
    /// batches, and the retained chain stays checkable. 0 keeps them forever.
    #[arg(long, env = "KEYPLANE_AUDIT_RETENTION", default_value_t = defaults::AUDIT_RETENTION.into())]
    pub audit_retention: humantime::Duration,
    /// While PostgreSQL cannot be reached (and the invalidation feed is down), answer
    /// verifications of cached keys from the cache as it stood when the feed was last known
    /// good, for at most this long; answers say `stale`. 0: fail closed (UNAVAILABLE).
    #[arg(long, env = "KEYPLANE_STALE_IF_ERROR", default_value_t = defaults::STALE_IF_ERROR.into())]
    pub stale_if_error: humantime::Duration,
    /// A verification's database read taking longer counts as the database not answering.
    #[arg(long, env = "KEYPLANE_DATABASE_TIMEOUT", default_value_t = defaults::DATABASE_TIMEOUT.into())]
    pub database_timeout: humantime::Duration,
    /// The longest a key minted by DelegateApiKey may live (it also never outlives its
    /// parent).
    #[arg(long, env = "KEYPLANE_MAX_DELEGATION_TTL", default_value_t = defaults::MAX_DELEGATION_TTL.into())]
    pub max_delegation_ttl: humantime::Duration,
    /// PEM certificate chain for TLS on the gRPC port (needs --tls-key); plaintext when
    /// unset. Re-read when the file changes.
    #[arg(long, env = "KEYPLANE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert. Re-read when the file changes.
    #[arg(long, env = "KEYPLANE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): every client must present a certificate they signed (mTLS).
    /// Needs --tls-cert. Re-read when the file changes.
    #[arg(long, env = "KEYPLANE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// An origin browsers may call the HTTP/JSON and gRPC-Web API from
    /// (e.g. https://app.example.com); repeat it or separate origins with commas. CORS is
    /// off when none is given.
    #[arg(long, env = "KEYPLANE_CORS_ALLOWED_ORIGIN", value_delimiter = ',')]
    pub cors_allowed_origin: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// Tenant the token acts for; omit for a platform token (which names the tenant per
    /// call in `x-tenant-id`).
    #[arg(long)]
    pub tenant: Option<uuid::Uuid>,
    /// Space-separated scopes; default: every built-in scope.
    #[arg(long)]
    pub scope: Option<String>,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The `sub` claim.
    #[arg(long, default_value = "operator")]
    pub subject: String,
    /// Sign with the secret of `serve --dev` (and default to its tenant).
    #[arg(long)]
    pub dev: bool,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum MigrateAction {
    /// Apply pending migrations.
    #[default]
    Up,
    /// List applied and pending migrations, and those applied by a newer release.
    Status,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// What to do.
    #[arg(value_enum, default_value = "up")]
    pub action: MigrateAction,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// Everything `Application::build` needs, independent of how it was configured.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// May hold a password: kept as a secret so it is never printed.
    pub database_url: SecretString,
    pub jwt: JwtSettings,
    pub migrate: bool,
    pub shutdown_grace: Duration,
    pub usage_flush_interval: Duration,
    pub health_interval: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub cache_capacity: u64,
    /// Zero: never prune.
    pub audit_retention: Duration,
    /// How long stale verification answers may be given while the database is unreachable;
    /// zero: never.
    pub stale_if_error: Duration,
    /// How long a verification's database read may take before the database counts as not
    /// answering.
    pub database_timeout: Duration,
    /// The longest a delegated key may live.
    pub max_delegation_ttl: Duration,
    /// TLS on the gRPC port; plaintext when `None`.
    pub tls: Option<TlsSettings>,
    /// The origins CORS allows; none: CORS off.
    pub cors_allowed_origins: Vec<String>,
}

impl Settings {
    /// Settings for tests and embedding: everything at its default but the given values.
    pub fn new(listen: SocketAddr, database_url: impl Into<String>, jwt: JwtSettings) -> Self {
        Self {
            listen,
            database_url: database_url.into().into(),
            jwt,
            migrate: true,
            shutdown_grace: defaults::SHUTDOWN_GRACE,
            usage_flush_interval: defaults::USAGE_FLUSH_INTERVAL,
            health_interval: defaults::HEALTH_INTERVAL,
            idle_timeout: defaults::IDLE_TIMEOUT,
            request_timeout: defaults::REQUEST_TIMEOUT,
            cache_capacity: defaults::CACHE_CAPACITY,
            audit_retention: defaults::AUDIT_RETENTION,
            stale_if_error: defaults::STALE_IF_ERROR,
            database_timeout: defaults::DATABASE_TIMEOUT,
            max_delegation_ttl: defaults::MAX_DELEGATION_TTL,
            tls: None,
            cors_allowed_origins: Vec::new(),
        }
    }
}

impl From<ServeArgs> for Settings {
    fn from(args: ServeArgs) -> Self {
        Self {
            listen: args.listen,
            database_url: args.database.database_url,
            jwt: args.jwt.settings(),
            migrate: !args.no_migrate,
            shutdown_grace: args.shutdown_grace.into(),
            usage_flush_interval: args.usage_flush_interval.into(),
            health_interval: args.health_interval.into(),
            idle_timeout: args.idle_timeout.into(),
            request_timeout: args.request_timeout.into(),
            cache_capacity: args.cache_capacity,
            audit_retention: args.audit_retention.into(),
            stale_if_error: args.stale_if_error.into(),
            database_timeout: args.database_timeout.into(),
            max_delegation_ttl: args.max_delegation_ttl.into(),
            // clap requires both or neither of the certificate and key.
            tls: match (args.tls_cert, args.tls_key) {
                (Some(cert), Some(key)) => Some(TlsSettings {
                    cert,
                    key,
                    client_ca: args.tls_client_ca,
                }),
                _ => None,
            },
            cors_allowed_origins: args.cors_allowed_origin,
        }
    }
}
