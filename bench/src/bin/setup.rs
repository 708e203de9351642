//! Prepares a keyplane server for the benchmark and proves each payload is answered as
//! expected before h2load (which only sees HTTP statuses) measures it.
//!
//! `setup create` makes a workspace, the scope and a key holding it, and prints
//! `WORKSPACE_ID=...` and `KEY=...` lines for the shell, and a second, metered key with a
//! rate limit and credits that never bind during a run (`METERED_KEY=...`), so that the
//! cost of usage controls on the hot path is measured and nothing else. For the
//! authorization model on the hot path it also prints three keys that each reach the same
//! answer another way: `ROLE_KEY` holds the scopes only through a role, `DELEGATED_KEY` sits
//! at depth 3 of a chain minted through DelegateApiKey, and `QUERY_KEY` holds the scopes and
//! `--query-scope`, so that the permission query `--query` holds for it (and not for the
//! plain key, which is checked here: the query is evaluated, not ignored).
//! `setup probe` sends one payload file's message through a typed client and exits 0 when
//! the answer is a success (echo: the same message; VerifyApiKey: VERIFY_CODE_VALID;
//! Check: an OK status), 3 when the RPC is UNIMPLEMENTED, 1 otherwise.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bench::echo::echo_client::EchoClient;
use bench::kp::api_key_service_client::ApiKeyServiceClient;
use bench::kp::role_service_client::RoleServiceClient;
use bench::kp::scope_service_client::ScopeServiceClient;
use bench::kp::workspace_service_client::WorkspaceServiceClient;
use bench::kp::{
    CreateApiKeyRequest, CreateRoleRequest, CreateScopeRequest, CreateWorkspaceRequest,
    DelegateApiKeyRequest, RateLimit, VerifyApiKeyRequest, VerifyCode,
};
use bench::{Bearer, connect, decode_frame, query_request};
use clap::{Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use tonic::metadata::{Ascii, MetadataValue};

const UNIMPLEMENTED_EXIT: u8 = 3;
/// The scope a key needs to call DelegateApiKey.
const DELEGATE_SCOPE: &str = "keyplane.api_keys:delegate";
/// The deepest a delegated key may sit (root = 0); the benchmark measures that one.
const DELEGATION_DEPTH: i32 = 3;

#[derive(Parser)]
#[command(about = "Create the benchmark's workspace, scope and key; probe payloads")]
struct Args {
    /// keyplane (or echo server) address, host:port.
    #[arg(long)]
    addr: String,
    /// Bearer token (not needed for the echo server).
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true, default_value = "")]
    token: String,
    /// How long to wait for the server to accept connections.
    #[arg(long, default_value = "30")]
    wait_secs: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a workspace, the scopes, a role and the keys.
    Create {
        #[arg(long = "scope", default_value = "crm:read")]
        scopes: Vec<String>,
        /// A scope the query key holds besides `--scope` (created too).
        #[arg(long, default_value = "crm:write")]
        query_scope: String,
        /// The permission query the query key must satisfy and the plain key must not.
        #[arg(long, default_value = "crm:read AND (crm:write OR billing:*)")]
        query: String,
    },
    /// Send one payload file's message and check the answer.
    Probe {
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        payload: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Echo,
    Verify,
    Check,
}

enum Outcome {
    Success(String),
    Unimplemented,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(Outcome::Success(what)) => {
            println!("{what}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Unimplemented) => {
            println!("UNIMPLEMENTED");
            ExitCode::from(UNIMPLEMENTED_EXIT)
        }
        Err(err) => {
            eprintln!("setup: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Outcome> {
    let channel = connect(&args.addr, Duration::from_secs(args.wait_secs)).await?;
    let bearer = Bearer::new(&args.token)?;
    match args.command {
        Command::Create {
            scopes,
            query_scope,
            query,
        } => create(channel, bearer, &scopes, &query_scope, &query).await,
        Command::Probe { kind, payload } => {
            let frame = std::fs::read(&payload)
                .with_context(|| format!("cannot read {}", payload.display()))?;
            probe(channel, bearer, kind, &frame).await
        }
    }
}

async fn create(
    channel: tonic::transport::Channel,
    bearer: Bearer,
    scopes: &[String],
    query_scope: &str,
    query: &str,
) -> anyhow::Result<Outcome> {
    let workspace = WorkspaceServiceClient::with_interceptor(channel.clone(), bearer.clone())
        .create_workspace(CreateWorkspaceRequest {
            name: "bench".into(),
            ..Default::default()
        })
        .await
        .context("CreateWorkspace")?
        .into_inner()
        .workspace
        .context("CreateWorkspace answered no workspace")?;
    let mut scope_client = ScopeServiceClient::with_interceptor(channel.clone(), bearer.clone());
    for scope in scopes.iter().map(String::as_str).chain([query_scope]) {
        scope_client
            .create_scope(CreateScopeRequest {
                representation: scope.to_owned(),
                description: "benchmark scope".into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("CreateScope {scope}"))?;
    }
    let role = RoleServiceClient::with_interceptor(channel.clone(), bearer.clone())
        .create_role(CreateRoleRequest {
            workspace_id: workspace.id.clone(),
            name: "bench-reader".into(),
            description: "benchmark role".into(),
            scopes: scopes.to_vec(),
            ..Default::default()
        })
        .await
        .context("CreateRole")?
        .into_inner()
        .role
        .context("CreateRole answered no role")?;
    let mut keys = ApiKeyServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let plain = CreateApiKeyRequest {
        workspace_id: workspace.id.clone(),
        name: "bench".into(),
        scopes: scopes.to_vec(),
        ..Default::default()
    };
    let metered = CreateApiKeyRequest {
        name: "bench-metered".into(),
        // The largest limit per second, and the most credits: every request spends from
        // both, and neither refuses within a run.
        rate_limits: vec![RateLimit {
            name: "bench".into(),
            limit: 1_000_000_000,
            period: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
            shared_by_owner: false,
        }],
        remaining_uses: Some(1_000_000_000_000_000),
        ..plain.clone()
    };
    let role_key = CreateApiKeyRequest {
        name: "bench-role".into(),
        scopes: Vec::new(),
        roles: vec![role.name],
        ..plain.clone()
    };
    let query_key = CreateApiKeyRequest {
        name: "bench-query".into(),
        scopes: scopes
            .iter()
            .cloned()
            .chain([query_scope.to_owned()])
            .collect(),
        ..plain.clone()
    };
    let root = CreateApiKeyRequest {
        name: "bench-delegation-root".into(),
        scopes: scopes
            .iter()
            .cloned()
            .chain([DELEGATE_SCOPE.to_owned()])
            .collect(),
        ..plain.clone()
    };
    let mut secrets = Vec::new();
    for request in [plain, metered, role_key, query_key, root] {
        let created = keys
            .create_api_key(request)
            .await
            .context("CreateApiKey")?
            .into_inner();
        if created.secret.is_empty() {
            bail!("CreateApiKey returned no secret");
        }
        secrets.push(created.secret);
    }
    // Root → child → grandchild → great-grandchild, each minted by its parent with the
    // parent's own secret as credential; all but the last may delegate further.
    let mut delegated = secrets[4].clone();
    let mut depth = 0;
    for level in 1..=DELEGATION_DEPTH {
        let child = delegate(&channel, &delegated, scopes, level < DELEGATION_DEPTH)
            .await
            .with_context(|| format!("DelegateApiKey at depth {level}"))?;
        depth = child.api_key.map_or(0, |k| k.delegation_depth);
        delegated = child.secret;
    }
    if depth != DELEGATION_DEPTH {
        bail!("the last delegated key is at depth {depth}, not {DELEGATION_DEPTH}");
    }
    let answer = keys
        .verify_api_key(query_request(&secrets[0], query))
        .await
        .context("VerifyApiKey with the permission query")?
        .into_inner();
    if answer.valid {
        bail!("the plain key satisfied {query:?}: the query key would not measure a query");
    }
    Ok(Outcome::Success(format!(
        "WORKSPACE_ID={}\nKEY={}\nMETERED_KEY={}\nROLE_KEY={}\nQUERY_KEY={}\nDELEGATED_KEY={delegated}",
        workspace.id, secrets[0], secrets[1], secrets[2], secrets[3]
    )))
}

/// DelegateApiKey called as the parent key itself (`x-api-key`), for a child holding
/// `scopes` with the default lifetime (1 h, longer than a run).
async fn delegate(
    channel: &tonic::transport::Channel,
    parent_secret: &str,
    scopes: &[String],
    delegable: bool,
) -> anyhow::Result<bench::kp::DelegateApiKeyResponse> {
    let credential: MetadataValue<Ascii> = parent_secret
        .parse()
        .context("the parent secret is not a valid header value")?;
    let as_parent = move |mut request: tonic::Request<()>| {
        request
            .metadata_mut()
            .insert("x-api-key", credential.clone());
        Ok(request)
    };
    let child = ApiKeyServiceClient::with_interceptor(channel.clone(), as_parent)
        .delegate_api_key(DelegateApiKeyRequest {
            name: "bench-delegated".into(),
            scopes: scopes.to_vec(),
            delegable,
            ..Default::default()
        })
        .await?
        .into_inner();
    if child.secret.is_empty() {
        bail!("DelegateApiKey returned no secret");
    }
    Ok(child)
}

async fn probe(
    channel: tonic::transport::Channel,
    bearer: Bearer,
    kind: Kind,
    frame: &[u8],
) -> anyhow::Result<Outcome> {
    match kind {
        Kind::Echo => {
            let request: VerifyApiKeyRequest = decode_frame(frame)?;
            let answer = EchoClient::new(channel)
                .echo(request.clone())
                .await
                .context("Echo")?
                .into_inner();
            if answer != request {
                bail!("the echo answered a different message");
            }
            Ok(Outcome::Success("echo: OK, same message".into()))
        }
        Kind::Verify => {
            let request: VerifyApiKeyRequest = decode_frame(frame)?;
            let answer = ApiKeyServiceClient::with_interceptor(channel, bearer)
                .verify_api_key(request)
                .await
                .context("VerifyApiKey")?
                .into_inner();
            let code = VerifyCode::try_from(answer.code).unwrap_or(VerifyCode::Unspecified);
            if code != VerifyCode::Valid || !answer.valid {
                bail!("VerifyApiKey answered {}", code.as_str_name());
            }
            Ok(Outcome::Success(format!(
                "VerifyApiKey: OK, {}",
                code.as_str_name()
            )))
        }
        Kind::Check => {
            let request: CheckRequest = decode_frame(frame)?;
            let answer = AuthorizationClient::with_interceptor(channel, bearer)
                .check(request)
                .await;
            let answer = match answer {
                Ok(answer) => answer.into_inner(),
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    return Ok(Outcome::Unimplemented);
                }
                Err(status) => return Err(status).context("Check"),
            };
            let code = answer.status.as_ref().map_or(0, |s| s.code);
            let denied = matches!(answer.http_response, Some(HttpResponse::DeniedResponse(_)));
            if code != 0 || denied {
                bail!(
                    "Check denied the request: status {code} {:?}",
                    answer.status.map(|s| s.message).unwrap_or_default()
                );
            }
            Ok(Outcome::Success("Check: OK, status 0 (allowed)".into()))
        }
    }
}
