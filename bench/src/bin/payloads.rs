//! Writes the h2load request bodies (`-d FILE`): one uncompressed gRPC length-prefixed
//! message each, for the echo, VerifyApiKey (of a plain, a metered, a role-holding and a
//! delegated key, and of a key checked with a permission query) and Envoy ext_authz Check
//! targets.
use std::path::PathBuf;

use anyhow::Context;
use bench::{check_request, grpc_frame, query_request, verify_request};
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Write the h2load payloads: echo.bin, verify.bin, check.bin, and verify_metered.bin, verify_role.bin, verify_delegated.bin, verify_query.bin for the keys given"
)]
struct Args {
    /// The API key every payload presents.
    #[arg(long, env = "BENCH_KEY", hide_env_values = true)]
    key: String,
    /// A key with a rate limit and credits, for verify_metered.bin (not written without).
    #[arg(long, env = "BENCH_METERED_KEY", hide_env_values = true)]
    metered_key: Option<String>,
    /// A key holding the scopes through a role, for verify_role.bin (not written without).
    #[arg(long, env = "BENCH_ROLE_KEY", hide_env_values = true)]
    role_key: Option<String>,
    /// A delegated key, for verify_delegated.bin (not written without).
    #[arg(long, env = "BENCH_DELEGATED_KEY", hide_env_values = true)]
    delegated_key: Option<String>,
    /// A key satisfying `--query`, for verify_query.bin (not written without).
    #[arg(long, env = "BENCH_QUERY_KEY", hide_env_values = true)]
    query_key: Option<String>,
    /// The permission query of verify_query.bin, which sends no required scopes.
    #[arg(long, default_value = "crm:read AND (crm:write OR billing:*)")]
    query: String,
    /// A scope the key must hold (repeatable).
    #[arg(long = "scope", default_value = "crm:read")]
    scopes: Vec<String>,
    /// Directory to write into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let verify = grpc_frame(&verify_request(&args.key, &args.scopes));
    let check = grpc_frame(&check_request(&args.key, &args.scopes));
    let mut files = vec![
        ("echo.bin", verify.clone()),
        ("verify.bin", verify),
        ("check.bin", check),
    ];
    let optional = [
        ("verify_metered.bin", &args.metered_key),
        ("verify_role.bin", &args.role_key),
        ("verify_delegated.bin", &args.delegated_key),
    ];
    for (name, key) in optional {
        if let Some(key) = key {
            files.push((name, grpc_frame(&verify_request(key, &args.scopes))));
        }
    }
    if let Some(key) = &args.query_key {
        files.push((
            "verify_query.bin",
            grpc_frame(&query_request(key, &args.query)),
        ));
    }
    for (name, bytes) in files {
        let path = args.out.join(name);
        std::fs::write(&path, &bytes)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
