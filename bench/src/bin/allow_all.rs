//! The floor of the "behind Envoy" figure: an Envoy ext_authz server that allows every
//! request without looking at it. Envoy calling this costs the extra hop and nothing else;
//! Envoy calling keyplane costs that plus keyplane's verification.
use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use envoy_types::ext_authz::v3::CheckResponseExt;
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use tonic::transport::Server;
use tonic::{Request, Response, Status};

#[derive(Parser)]
#[command(about = "Envoy ext_authz server that allows everything: the floor of the Envoy figure")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50098")]
    listen: SocketAddr,
}

struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(&self, _: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(CheckResponse::with_status(Status::ok(
            "allowed",
        ))))
    }
}

/// The same allocator as keyplane's binary.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!("allow-all ext_authz on {}", args.listen);
    Server::builder()
        .tcp_nodelay(true)
        .add_service(AuthorizationServer::new(AllowAll))
        .serve_with_shutdown(args.listen, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the allow-all server stopped")
}
