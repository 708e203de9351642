//! The scale benchmark's typed measurements (see `bench/scale.sh` and `BENCHMARKS.md`):
//!
//! - `list`: ListApiKeys latency of the first page and of a deep page. Walks the list with
//!   large pages until `--depth` keys have gone by, keeps that `next_page_token`, then times
//!   `--requests` sequential calls of the first page and as many of the deep page.
//! - `verify`: VerifyApiKey latency, `--requests` sequential calls of one key.
//! - `flush`: times `Store::record_last_used` (the usage flush) writing `last_used_time` for
//!   every key id in `--ids` (one UUID a line) directly against the database.
//!
//! Each prints one line of `name=value` pairs for the shell.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bench::kp::api_key_service_client::ApiKeyServiceClient;
use bench::kp::{ListApiKeysRequest, VerifyApiKeyRequest, VerifyCode};
use bench::{Bearer, connect, percentile};
use clap::{Parser, Subcommand};
use keyplane::domain::TenantId;
use keyplane::storage::{Store, connect as connect_db};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

type Client = ApiKeyServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Parser)]
#[command(about = "Scale benchmark probes: list pages, verify latency, usage flush")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// First-page and deep-page ListApiKeys latency.
    List {
        #[command(flatten)]
        server: Server,
        /// Keys to walk past before the deep page.
        #[arg(long)]
        depth: usize,
        /// Page size of the timed requests.
        #[arg(long, default_value = "50")]
        page_size: i32,
        /// Page size of the walk to the deep page.
        #[arg(long, default_value = "1000")]
        walk_page_size: i32,
        /// Timed calls of each page.
        #[arg(long, default_value = "500")]
        requests: usize,
    },
    /// VerifyApiKey latency, sequential calls of one key.
    Verify {
        #[command(flatten)]
        server: Server,
        #[arg(long, env = "BENCH_KEY", hide_env_values = true)]
        key: String,
        #[arg(long, default_value = "crm:read")]
        scope: String,
        #[arg(long, default_value = "2000")]
        requests: usize,
    },
    /// Time `Store::record_last_used` for the key ids in a file.
    Flush {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        tenant: Uuid,
        /// One key id a line.
        #[arg(long)]
        ids: PathBuf,
        /// Flushes to time (each with a newer timestamp, so every row is written).
        #[arg(long, default_value = "3")]
        repeat: usize,
    },
}

#[derive(clap::Args)]
struct Server {
    /// keyplane address, host:port.
    #[arg(long)]
    addr: String,
    /// Bearer token (keyplane.api_keys:read for list, :verify for verify).
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: String,
}

impl Server {
    async fn client(&self) -> anyhow::Result<Client> {
        let channel = connect(&self.addr, Duration::from_secs(30)).await?;
        Ok(ApiKeyServiceClient::with_interceptor(
            channel,
            Bearer::new(&self.token)?,
        ))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::List {
            server,
            depth,
            page_size,
            walk_page_size,
            requests,
        } => list(&server, depth, page_size, walk_page_size, requests).await,
        Command::Verify {
            server,
            key,
            scope,
            requests,
        } => verify(&server, key, scope, requests).await,
        Command::Flush {
            database_url,
            tenant,
            ids,
            repeat,
        } => flush(&database_url, tenant, &ids, repeat).await,
    }
}

/// `p50_ms=.. p99_ms=.. max_ms=..` of sorted samples, with a name prefix.
fn summary(name: &str, mut micros: Vec<u64>) -> String {
    micros.sort_unstable();
    let ms = |p: f64| percentile(&micros, p).map_or(f64::NAN, |us| us as f64 / 1000.0);
    format!(
        "{name}_p50_ms={:.3} {name}_p99_ms={:.3} {name}_max_ms={:.3}",
        ms(50.0),
        ms(99.0),
        ms(100.0)
    )
}

fn micros_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

async fn time_page(
    client: &mut Client,
    request: &ListApiKeysRequest,
    requests: usize,
) -> anyhow::Result<Vec<u64>> {
    let mut samples = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        let page = client
            .list_api_keys(request.clone())
            .await
            .context("ListApiKeys")?
            .into_inner();
        samples.push(micros_since(start));
        if page.api_keys.len() != usize::try_from(request.page_size).unwrap_or(0) {
            bail!(
                "ListApiKeys answered {} keys, expected a full page of {}",
                page.api_keys.len(),
                request.page_size
            );
        }
    }
    Ok(samples)
}

async fn list(
    server: &Server,
    depth: usize,
    page_size: i32,
    walk_page_size: i32,
    requests: usize,
) -> anyhow::Result<()> {
    let mut client = server.client().await?;
    let walk_started = Instant::now();
    let mut seen = 0usize;
    let mut token = String::new();
    while seen < depth {
        let page = client
            .list_api_keys(ListApiKeysRequest {
                // Never past the depth, so the deep page starts exactly there.
                page_size: walk_page_size.min(i32::try_from(depth - seen).unwrap_or(i32::MAX)),
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .context("ListApiKeys (walk)")?
            .into_inner();
        seen += page.api_keys.len();
        token = page.next_page_token;
        if token.is_empty() {
            bail!("the list ended after {seen} keys, before the depth of {depth}");
        }
    }
    let walk_secs = walk_started.elapsed().as_secs_f64();
    let first = ListApiKeysRequest {
        page_size,
        ..Default::default()
    };
    let deep = ListApiKeysRequest {
        page_size,
        page_token: token,
        ..Default::default()
    };
    // One untimed call of each first: connection and plan warm-up.
    time_page(&mut client, &first, 1).await?;
    time_page(&mut client, &deep, 1).await?;
    let first_samples = time_page(&mut client, &first, requests).await?;
    let deep_samples = time_page(&mut client, &deep, requests).await?;
    println!(
        "LIST depth={seen} page_size={page_size} requests={requests} walk_s={walk_secs:.1} {} {}",
        summary("first", first_samples),
        summary("deep", deep_samples)
    );
    Ok(())
}

async fn verify(
    server: &Server,
    key: String,
    scope: String,
    requests: usize,
) -> anyhow::Result<()> {
    let mut client = server.client().await?;
    let request = VerifyApiKeyRequest {
        key,
        required_scopes: vec![scope],
        cost: None,
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(requests);
    for i in 0..=requests {
        let start = Instant::now();
        let answer = client
            .verify_api_key(request.clone())
            .await
            .context("VerifyApiKey")?
            .into_inner();
        let elapsed = micros_since(start);
        if answer.code != VerifyCode::Valid as i32 {
            bail!("VerifyApiKey answered code {}, not VALID", answer.code);
        }
        // The first call (connection warm-up) is not counted.
        if i > 0 {
            samples.push(elapsed);
        }
    }
    println!("VERIFY requests={requests} {}", summary("verify", samples));
    Ok(())
}

async fn flush(
    database_url: &str,
    tenant: Uuid,
    ids: &PathBuf,
    repeat: usize,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(ids).with_context(|| format!("cannot read {}", ids.display()))?;
    let ids: Vec<Uuid> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| Uuid::parse_str(line.trim()))
        .collect::<Result<_, _>>()
        .context("a line of the ids file is not a UUID")?;
    let store = Store::new(connect_db(database_url).await.context("connect")?);
    let tenant = TenantId::new(tenant);
    let mut millis = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let now = chrono::Utc::now();
        let batch: Vec<_> = ids.iter().map(|id| (tenant, *id, now)).collect();
        let start = Instant::now();
        store
            .record_last_used(&batch)
            .await
            .context("record_last_used")?;
        millis.push(start.elapsed().as_secs_f64() * 1000.0);
        // Timestamps are compared strictly: make the next flush's newer.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all = millis
        .iter()
        .map(|ms| format!("{ms:.0}"))
        .collect::<Vec<_>>()
        .join(",");
    millis.sort_by(f64::total_cmp);
    let median = millis.get(millis.len() / 2).copied().unwrap_or(f64::NAN);
    println!(
        "FLUSH keys={} runs_ms={all} median_ms={median:.0}",
        ids.len()
    );
    Ok(())
}
