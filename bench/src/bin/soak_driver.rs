//! The soak's key lifecycle driver (see `bench/soak.sh`). For `--seconds`, at `--rate`
//! cycles a second, each cycle, through replica `cycle % n`:
//!
//! 1. creates a key and checks every replica answers VALID for it;
//! 2. rotates it with no grace period (the old key is revoked at once), checks every replica
//!    refuses the old key within `--deadline-ms` and answers VALID for the new one;
//! 3. revokes the new key through the next replica and checks every replica refuses it
//!    within `--deadline-ms`.
//!
//! A refusal is any answer but VALID, found by polling back to back. Every failed RPC or
//! unexpected answer is an error; the cycle is abandoned and the run goes on. Prints
//! `SOAK_DRIVER ...` with the counts and the refusal latencies.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::kp::api_key_service_client::ApiKeyServiceClient;
use bench::kp::{
    CreateApiKeyRequest, RevokeApiKeyRequest, RotateApiKeyRequest, VerifyApiKeyRequest, VerifyCode,
};
use bench::{Bearer, connect, percentile};
use clap::Parser;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = ApiKeyServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Parser)]
#[command(about = "Create, rotate and revoke keys across replicas; check every revocation")]
struct Args {
    /// Replicas (host:port, repeatable).
    #[arg(long = "replica", required = true)]
    replicas: Vec<String>,
    /// Bearer token with keyplane.api_keys:write and :verify.
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long)]
    workspace: String,
    #[arg(long, default_value = "crm:read")]
    scope: String,
    /// How long to run.
    #[arg(long)]
    seconds: u64,
    /// Cycles a second (each: one create, one rotation, one revocation).
    #[arg(long, default_value = "1")]
    rate: f64,
    /// A replica must refuse a revoked key within this long.
    #[arg(long, default_value = "1000")]
    deadline_ms: u64,
    /// Each error's message is appended here.
    #[arg(long)]
    errors: Option<PathBuf>,
}

#[derive(Default)]
struct Tally {
    cycles: u64,
    creates: u64,
    rotations: u64,
    revocations: u64,
    checks: u64,
    late: u64,
    errors: u64,
    micros: Vec<u64>,
    messages: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bearer = Bearer::new(&args.token)?;
    let mut clients: Vec<Client> = Vec::new();
    for addr in &args.replicas {
        clients.push(ApiKeyServiceClient::with_interceptor(
            connect(addr, Duration::from_secs(30)).await?,
            bearer.clone(),
        ));
    }
    if !args.rate.is_finite() || args.rate <= 0.0 {
        bail!("--rate must be positive");
    }
    let deadline = Duration::from_millis(args.deadline_ms);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut tally = Tally::default();
    while Instant::now() < end {
        ticker.tick().await;
        let n = usize::try_from(tally.cycles).unwrap_or(0);
        tally.cycles += 1;
        if let Err(err) = cycle(&args, &mut clients, n, deadline, &mut tally).await {
            tally.errors += 1;
            let message = format!("cycle {n}: {err:#}");
            eprintln!("soak_driver: {message}");
            tally.messages.push(message);
        }
    }
    if let Some(path) = &args.errors {
        let mut text = tally.messages.join("\n");
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    tally.micros.sort_unstable();
    let ms = |p: f64| percentile(&tally.micros, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    println!(
        "SOAK_DRIVER cycles={} creates={} rotations={} revocations={} checks={} late={} errors={} refusal_p50_ms={:.3} refusal_p99_ms={:.3} refusal_max_ms={:.3} deadline_ms={}",
        tally.cycles,
        tally.creates,
        tally.rotations,
        tally.revocations,
        tally.checks,
        tally.late,
        tally.errors,
        ms(50.0),
        ms(99.0),
        ms(100.0),
        args.deadline_ms
    );
    Ok(())
}

async fn cycle(
    args: &Args,
    clients: &mut [Client],
    n: usize,
    deadline: Duration,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let count = clients.len();
    let first = n % count;
    let second = (n + 1) % count;
    let created = clients[first]
        .create_api_key(CreateApiKeyRequest {
            workspace_id: args.workspace.clone(),
            name: format!("soak-{n}"),
            scopes: vec![args.scope.clone()],
            ..Default::default()
        })
        .await
        .context("CreateApiKey")?
        .into_inner();
    tally.creates += 1;
    let id = created.api_key.context("CreateApiKey answered no key")?.id;
    let old = VerifyApiKeyRequest {
        key: created.secret,
        required_scopes: vec![args.scope.clone()],
        cost: None,
        ..Default::default()
    };
    all_valid(clients, &old, "the created key").await?;

    let rotated = clients[first]
        .rotate_api_key(RotateApiKeyRequest {
            id,
            grace_period: Some(prost_types::Duration {
                seconds: 0,
                nanos: 0,
            }),
        })
        .await
        .context("RotateApiKey")?
        .into_inner();
    tally.rotations += 1;
    let revoked_at = Instant::now();
    let new_id = rotated.api_key.context("RotateApiKey answered no key")?.id;
    let new = VerifyApiKeyRequest {
        key: rotated.secret,
        required_scopes: vec![args.scope.clone()],
        cost: None,
        ..Default::default()
    };
    all_refuse(clients, &old, revoked_at, deadline, tally).await?;
    all_valid(clients, &new, "the rotated key's successor").await?;

    clients[second]
        .revoke_api_key(RevokeApiKeyRequest { id: new_id })
        .await
        .context("RevokeApiKey")?;
    tally.revocations += 1;
    let revoked_at = Instant::now();
    all_refuse(clients, &new, revoked_at, deadline, tally).await?;
    Ok(())
}

async fn code(client: &mut Client, request: &VerifyApiKeyRequest) -> anyhow::Result<VerifyCode> {
    let answer = client
        .verify_api_key(request.clone())
        .await
        .context("VerifyApiKey")?
        .into_inner();
    Ok(VerifyCode::try_from(answer.code).unwrap_or(VerifyCode::Unspecified))
}

async fn all_valid(
    clients: &mut [Client],
    request: &VerifyApiKeyRequest,
    what: &str,
) -> anyhow::Result<()> {
    for (replica, client) in clients.iter_mut().enumerate() {
        let answer = code(client, request).await?;
        if answer != VerifyCode::Valid {
            bail!(
                "replica {replica} answered {} for {what}",
                answer.as_str_name()
            );
        }
    }
    Ok(())
}

/// Polls every replica concurrently until it refuses the key. A replica that takes longer
/// than `deadline` is counted late (polling goes on up to five times the deadline so the
/// latency is still known); one that never refuses is an error.
async fn all_refuse(
    clients: &[Client],
    request: &VerifyApiKeyRequest,
    since: Instant,
    deadline: Duration,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    let give_up = deadline * 5;
    let polls = clients.iter().map(|client| {
        let mut client = client.clone();
        async move {
            loop {
                let answer = code(&mut client, request).await?;
                let elapsed = since.elapsed();
                if answer != VerifyCode::Valid {
                    return anyhow::Ok(Some(elapsed));
                }
                if elapsed >= give_up {
                    return Ok(None);
                }
            }
        }
    });
    let mut never = 0;
    for result in futures::future::join_all(polls).await {
        tally.checks += 1;
        match result? {
            Some(elapsed) => {
                if elapsed > deadline {
                    tally.late += 1;
                }
                tally
                    .micros
                    .push(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
            }
            None => {
                tally.late += 1;
                never += 1;
            }
        }
    }
    if never > 0 {
        bail!("{never} replica(s) still answered VALID {give_up:?} after a revocation");
    }
    Ok(())
}
