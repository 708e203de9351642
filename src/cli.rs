//! The commands: `serve`, `token`, `migrate`, `audit verify` and `openapi`.
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use secrecy::ExposeSecret;

use crate::auth::jwt::{JwtSettings, MintClaims, mint_hs256};
use crate::config::{
    AuditCommand, AuditVerifyArgs, Cli, Command, LogFormat, MigrateAction, MigrateArgs, ServeArgs,
    Settings, TokenArgs,
};
use crate::domain::TenantId;
use crate::domain::scope::BuiltinScope;
use crate::startup::{Application, shutdown_signal};
use crate::storage::{self, schema};
use crate::telemetry;

/// Where `serve --dev` keeps its generated HS256 secret: next to the default SQLite file.
pub const DEV_SECRET_FILE: &str = "keyplane.dev-secret";
/// The tenant of the admin token printed by `serve --dev`.
pub const DEV_TENANT: &str = "0193a0c4-0000-7000-8000-000000000001";

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Token(args) => token(args),
        Command::Migrate(args) => migrate(args).await,
        Command::Audit(AuditCommand::Verify(args)) => audit_verify(args).await,
        Command::Openapi => openapi(),
    }
}

/// Prints the OpenAPI document: `keyplane openapi > docs/openapi.json` refreshes the
/// committed copy.
fn openapi() -> anyhow::Result<()> {
    let document = crate::http::HttpLayer::openapi()?;
    std::io::stdout().write_all(&document)?;
    Ok(())
}

/// Checks a tenant's audit chain: prints what it checked, or the first broken event and
/// fails.
async fn audit_verify(args: AuditVerifyArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text);
    let url = args.database.database_url.expose_secret();
    let db = storage::connect(url)
        .await
        .with_context(|| format!("cannot open {}", telemetry::redact_url(url)))?;
    let tenant = TenantId::new(args.tenant);
    let report = storage::Store::new(db).check_audit_chain(tenant).await?;
    let hex = |h: &[u8]| h.iter().map(|b| format!("{b:02x}")).collect::<String>();
    match report.broken {
        None => {
            println!(
                "tenant {tenant}: audit chain intact: {} event(s), sequence {}..{}, head {}",
                report.events,
                report.anchor.sequence + 1,
                report.head.sequence,
                hex(&report.head.hash),
            );
            Ok(())
        }
        Some(broken) => {
            anyhow::bail!(
                "tenant {tenant}: audit chain BROKEN after {} intact event(s): {broken}",
                report.events
            )
        }
    }
}

/// The dev secret, created on first use.
fn dev_secret(create: bool) -> anyhow::Result<String> {
    let path = Path::new(DEV_SECRET_FILE);
    if path.exists() {
        let secret = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {DEV_SECRET_FILE}"))?;
        return Ok(secret.trim().to_owned());
    }
    anyhow::ensure!(
        create,
        "{DEV_SECRET_FILE} does not exist: start `keyplane serve --dev` first"
    );
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("CSPRNG: {e}"))?;
    let secret = URL_SAFE_NO_PAD.encode(bytes);
    write_private(path, &secret).with_context(|| format!("cannot write {DEV_SECRET_FILE}"))?;
    Ok(secret)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

fn all_builtin_scopes() -> String {
    BuiltinScope::ALL.map(|b| b.as_str()).join(" ")
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    if let Some(addr) = args.metrics_listen {
        telemetry::install_metrics(addr)?;
    }
    let (dev, log_format) = (args.dev, args.log_format);
    let mut settings = Settings::from(args);
    if dev && !settings.jwt.is_configured() {
        settings.jwt.secret = Some(dev_secret(true)?.into());
    }
    let jwt = settings.jwt.clone();
    let app = Application::build(settings).await?;
    if dev {
        print_dev_banner(&app, &jwt, log_format)?;
    }
    app.run_until_stopped(shutdown_signal()).await
}

/// `--dev` prints a ready-to-paste admin token: the one place keyplane shows a token, on
/// purpose, on stdout and never in the log.
fn print_dev_banner(app: &Application, jwt: &JwtSettings, format: LogFormat) -> anyhow::Result<()> {
    let Some(secret) = &jwt.secret else {
        return Ok(());
    };
    let claims = MintClaims {
        sub: "dev-admin".into(),
        iat: now_secs(),
        exp: now_secs() + 24 * 3600,
        tenant_id: Some(DEV_TENANT.into()),
        scope: all_builtin_scopes(),
        iss: jwt.issuer.clone(),
        aud: jwt.audience.clone(),
    };
    let token = mint_hs256(secret.expose_secret(), &claims)?;
    let addr = app.local_addr();
    // A closed stdout (e.g. `serve --dev | head`) must not take the server down.
    let mut out = std::io::stdout().lock();
    let _ = if format == LogFormat::Text {
        writeln!(
            out,
            "\nkeyplane dev mode on {addr} — admin token for tenant {DEV_TENANT} (all built-in scopes, 24h):\n\n  \
             export KEYPLANE_TOKEN={token}\n\ntry:\n\n  \
             grpcurl -plaintext -H \"authorization: Bearer $KEYPLANE_TOKEN\" {addr} keyplane.v1.WorkspaceService/ListWorkspaces\n"
        )
    } else {
        let banner = serde_json::json!({ "dev_admin_token": token, "tenant_id": DEV_TENANT, "listen": addr.to_string() });
        writeln!(out, "{banner}")
    };
    Ok(())
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let secret = match (&args.jwt.jwt_secret, args.dev) {
        (Some(secret), _) => secret.clone(),
        (None, true) => dev_secret(false)?.into(),
        (None, false) => {
            anyhow::bail!("no HS256 secret: set --jwt-secret / KEYPLANE_JWT_SECRET, or use --dev")
        }
    };
    let tenant = match (args.tenant, args.dev) {
        (Some(t), _) => Some(t.to_string()),
        (None, true) => Some(DEV_TENANT.to_owned()),
        (None, false) => None,
    };
    let claims = MintClaims {
        sub: args.subject,
        iat: now_secs(),
        exp: now_secs() + args.ttl.as_secs(),
        tenant_id: tenant,
        scope: args.scope.unwrap_or_else(all_builtin_scopes),
        iss: args.jwt.jwt_issuer,
        aud: args.jwt.jwt_audience,
    };
    println!("{}", mint_hs256(secret.expose_secret(), &claims)?);
    Ok(())
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    telemetry::init(LogFormat::Text);
    let url = args.database.database_url.expose_secret();
    let db = storage::connect(url)
        .await
        .with_context(|| format!("cannot open {}", telemetry::redact_url(url)))?;
    match args.action {
        MigrateAction::Up => {
            let schema = schema::migrate_on_start(&db).await?;
            if schema.is_newer() {
                // Nothing of this release is missing: not a failure, but say why nothing ran.
                eprintln!("{}", schema.newer_warning());
            }
            if schema.applied_now.is_empty() {
                println!("no migration to apply");
            } else {
                println!("migrations applied: {}", schema.applied_now.join(", "));
            }
        }
        MigrateAction::Status => {
            for line in schema::inspect(&db).await?.status_lines() {
                println!("{line}");
            }
        }
    }
    Ok(())
}
