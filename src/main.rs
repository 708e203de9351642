use clap::Parser;
use keyplane::config::Cli;

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
