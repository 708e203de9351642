//! Cross-replica revocation latency. Against replicas sharing one database, each round
//! creates a key through replica A, verifies it VALID on every other replica (so a replica
//! with a cache holds it), revokes it through A, and then polls VerifyApiKey on every other
//! replica concurrently, back to back, until the first answer that is not VALID. The time
//! from the revoke RPC's return to that first refusal is one sample per replica per round.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::kp::api_key_service_client::ApiKeyServiceClient;
use bench::kp::{CreateApiKeyRequest, RevokeApiKeyRequest, VerifyApiKeyRequest, VerifyCode};
use bench::{Bearer, connect, percentile};
use clap::Parser;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

type Client = ApiKeyServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Parser)]
#[command(about = "Cross-replica revocation latency: revoke on A, time until B, C... refuse")]
struct Args {
    /// Replica that creates and revokes the keys (host:port).
    #[arg(long)]
    revoke_on: String,
    /// Replicas that verify (host:port, repeatable).
    #[arg(long = "verify-on", required = true)]
    verify_on: Vec<String>,
    /// Bearer token with keyplane.api_keys:write and :verify.
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: String,
    /// Workspace of the keys.
    #[arg(long)]
    workspace: String,
    /// Scope each key holds and each verification requires.
    #[arg(long, default_value = "crm:read")]
    scope: String,
    /// Number of revocations.
    #[arg(long, default_value = "100")]
    rounds: usize,
    /// Give up on a replica after this long without a refusal (counted, reported as a miss).
    #[arg(long, default_value = "5")]
    give_up_secs: u64,
    /// Write every sample here as CSV (round, replica, microseconds, code).
    #[arg(long)]
    csv: Option<PathBuf>,
}

struct Sample {
    round: usize,
    replica: usize,
    micros: u64,
    code: VerifyCode,
    polls: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bearer = Bearer::new(&args.token)?;
    let wait = Duration::from_secs(30);
    let mut admin: Client = ApiKeyServiceClient::with_interceptor(
        connect(&args.revoke_on, wait).await?,
        bearer.clone(),
    );
    let mut verifiers: Vec<Client> = Vec::new();
    for addr in &args.verify_on {
        verifiers.push(ApiKeyServiceClient::with_interceptor(
            connect(addr, wait).await?,
            bearer.clone(),
        ));
    }
    let give_up = Duration::from_secs(args.give_up_secs);
    let mut samples = Vec::with_capacity(args.rounds * verifiers.len());
    let mut misses = 0usize;

    for round in 0..args.rounds {
        let created = admin
            .create_api_key(CreateApiKeyRequest {
                workspace_id: args.workspace.clone(),
                name: format!("revocation-{round}"),
                scopes: vec![args.scope.clone()],
                ..Default::default()
            })
            .await
            .context("CreateApiKey")?
            .into_inner();
        let id = created.api_key.context("CreateApiKey answered no key")?.id;
        let request = VerifyApiKeyRequest {
            key: created.secret,
            required_scopes: vec![args.scope.clone()],
            cost: None,
            ..Default::default()
        };
        for (replica, client) in verifiers.iter_mut().enumerate() {
            let code = verify(client, &request).await?;
            if code != VerifyCode::Valid {
                bail!(
                    "round {round}: replica {} answered {} for a fresh key",
                    args.verify_on[replica],
                    code.as_str_name()
                );
            }
        }
        admin
            .revoke_api_key(RevokeApiKeyRequest { id })
            .await
            .context("RevokeApiKey")?;
        let revoked = Instant::now();
        let polls = verifiers.iter().map(|client| {
            let mut client = client.clone();
            let request = request.clone();
            async move { until_refused(&mut client, &request, revoked, give_up).await }
        });
        for (replica, result) in futures::future::join_all(polls)
            .await
            .into_iter()
            .enumerate()
        {
            match result? {
                Some((elapsed, code, polls)) => samples.push(Sample {
                    round,
                    replica,
                    micros: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                    code,
                    polls,
                }),
                None => misses += 1,
            }
        }
    }

    if let Some(path) = &args.csv {
        let mut csv = String::from("round,replica,micros,code,polls\n");
        for s in &samples {
            csv.push_str(&format!(
                "{},{},{},{},{}\n",
                s.round,
                args.verify_on[s.replica],
                s.micros,
                s.code.as_str_name(),
                s.polls
            ));
        }
        std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let not_revoked = samples
        .iter()
        .filter(|s| s.code != VerifyCode::Revoked)
        .count();
    let mut micros: Vec<u64> = samples.iter().map(|s| s.micros).collect();
    micros.sort_unstable();
    let ms = |p: f64| percentile(&micros, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    println!(
        "REVOCATION rounds={} samples={} misses={} not_revoked={} p50_ms={:.3} p99_ms={:.3} max_ms={:.3} give_up_ms={}",
        args.rounds,
        micros.len(),
        misses,
        not_revoked,
        ms(50.0),
        ms(99.0),
        ms(100.0),
        give_up.as_millis()
    );
    Ok(())
}

async fn verify(client: &mut Client, request: &VerifyApiKeyRequest) -> anyhow::Result<VerifyCode> {
    let answer = client
        .verify_api_key(request.clone())
        .await
        .context("VerifyApiKey")?
        .into_inner();
    Ok(VerifyCode::try_from(answer.code).unwrap_or(VerifyCode::Unspecified))
}

/// Polls until the first answer that is not VALID: its time since `since`, its code and how
/// many calls it took; `None` when `give_up` passes first.
async fn until_refused(
    client: &mut Client,
    request: &VerifyApiKeyRequest,
    since: Instant,
    give_up: Duration,
) -> anyhow::Result<Option<(Duration, VerifyCode, u64)>> {
    let mut polls = 0;
    loop {
        let code = verify(client, request).await?;
        polls += 1;
        let elapsed = since.elapsed();
        if code != VerifyCode::Valid {
            return Ok(Some((elapsed, code, polls)));
        }
        if elapsed >= give_up {
            return Ok(None);
        }
    }
}
