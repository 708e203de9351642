use clap::Parser;
use keyplane::config::Cli;

/// Verification allocates a little on every call from every worker thread; glibc's malloc
/// serialises those threads on its arena locks (a tenth of a profile under load), mimalloc
/// keeps per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match keyplane::cli::run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("keyplane: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
