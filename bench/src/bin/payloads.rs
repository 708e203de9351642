//! Writes the h2load request bodies (`-d FILE`): one uncompressed gRPC length-prefixed
//! message each, for the echo, VerifyApiKey (of a plain and of a metered key) and Envoy
//! ext_authz Check targets.
use std::path::PathBuf;

use anyhow::Context;
use bench::{check_request, grpc_frame, verify_request};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Write the h2load payloads: echo.bin, verify.bin, verify_metered.bin, check.bin")]
struct Args {
    /// The API key every payload presents.
    #[arg(long, env = "BENCH_KEY", hide_env_values = true)]
    key: String,
    /// A key with a rate limit and credits, for verify_metered.bin (not written without).
    #[arg(long, env = "BENCH_METERED_KEY", hide_env_values = true)]
    metered_key: Option<String>,
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
    let metered = args
        .metered_key
        .as_ref()
        .map(|key| grpc_frame(&verify_request(key, &args.scopes)));
    let mut files = vec![
        ("echo.bin", &verify),
        ("verify.bin", &verify),
        ("check.bin", &check),
    ];
    if let Some(metered) = &metered {
        files.push(("verify_metered.bin", metered));
    }
    for (name, bytes) in files {
        let path = args.out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}
