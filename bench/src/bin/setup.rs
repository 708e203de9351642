//! Prepares a keyplane server for the benchmark and proves each payload is answered as
//! expected before h2load (which only sees HTTP statuses) measures it.
//!
//! `setup create` makes a workspace, the scope and a key holding it, and prints
//! `WORKSPACE_ID=...` and `KEY=...` lines for the shell, and a second, metered key with a
//! rate limit and credits that never bind during a run (`METERED_KEY=...`), so that the
//! cost of usage controls on the hot path is measured and nothing else.
//! `setup probe` sends one payload file's message through a typed client and exits 0 when
//! the answer is a success (echo: the same message; VerifyApiKey: VERIFY_CODE_VALID;
//! Check: an OK status), 3 when the RPC is UNIMPLEMENTED, 1 otherwise.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use bench::echo::echo_client::EchoClient;
use bench::kp::api_key_service_client::ApiKeyServiceClient;
use bench::kp::scope_service_client::ScopeServiceClient;
use bench::kp::workspace_service_client::WorkspaceServiceClient;
use bench::kp::{
    CreateApiKeyRequest, CreateScopeRequest, CreateWorkspaceRequest, RateLimit,
    VerifyApiKeyRequest, VerifyCode,
};
use bench::{Bearer, connect, decode_frame};
use clap::{Parser, Subcommand, ValueEnum};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;

const UNIMPLEMENTED_EXIT: u8 = 3;

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
    /// Create a workspace, the scopes and one key holding them.
    Create {
        #[arg(long = "scope", default_value = "crm:read")]
        scopes: Vec<String>,
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
        Command::Create { scopes } => create(channel, bearer, &scopes).await,
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
    for scope in scopes {
        scope_client
            .create_scope(CreateScopeRequest {
                representation: scope.clone(),
                description: "benchmark scope".into(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("CreateScope {scope}"))?;
    }
    let mut keys = ApiKeyServiceClient::with_interceptor(channel, bearer);
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
    let mut secrets = Vec::new();
    for request in [plain, metered] {
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
    Ok(Outcome::Success(format!(
        "WORKSPACE_ID={}\nKEY={}\nMETERED_KEY={}",
        workspace.id, secrets[0], secrets[1]
    )))
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
