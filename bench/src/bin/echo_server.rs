//! The ceiling: a bare tonic unary echo server, on the same transport settings as
//! `keyplane serve` (tcp_nodelay, 256 concurrent streams per connection, the same request
//! timeout and keepalive, HTTP/2 defaults otherwise, tokio's default multi-threaded
//! runtime) and nothing else: no authentication, no metrics, no database.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bench::echo::echo_server::{Echo, EchoServer};
use bench::kp::VerifyApiKeyRequest;
use clap::Parser;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

/// keyplane's values (src/startup.rs and the defaults of src/config.rs).
const MAX_CONCURRENT_STREAMS: u32 = 256;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser)]
#[command(about = "Bare tonic unary echo server: the ceiling of keyplane's benchmark")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50099")]
    listen: SocketAddr,
}

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: Request<VerifyApiKeyRequest>,
    ) -> Result<Response<VerifyApiKeyRequest>, Status> {
        Ok(Response::new(request.into_inner()))
    }
}

/// The same allocator as keyplane's binary, so that the ratio measures keyplane's own work.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!("echo server on {}", listener.local_addr()?);
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            let _ = stream.set_nodelay(true);
        })
    });
    Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(IDLE_TIMEOUT / 4))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(EchoServer::new(EchoService))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the echo server stopped")
}
