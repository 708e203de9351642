//! A TCP proxy in front of PostgreSQL that tests cut: a database gone away (or a replica
//! partitioned from it) without touching the real server.
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

/// The address of the PostgreSQL server of `db_url`: what a [`CuttableProxy`] forwards to.
pub fn database_addr(db_url: &str) -> SocketAddr {
    let url = url::Url::parse(db_url).unwrap();
    format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
        .parse()
        .unwrap()
}

/// A TCP proxy in front of PostgreSQL that can be "stopped": live connections are cut and
/// new ones are closed at once, as when the server goes down.
pub struct CuttableProxy {
    /// Where the proxy listens: the address to give the server instead of the database's.
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CuttableProxy {
    /// A proxy on a free loopback port, up, forwarding every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, links2) = (up.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection closed
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                links2.lock().await.push(link);
            }
        });
        Self { addr, up, links }
    }

    /// Cuts every live connection and closes each new one at once, until [`Self::resume`].
    pub async fn stop(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self.links.lock().await.drain(..) {
            link.abort();
        }
    }

    /// Forwards new connections again.
    pub fn resume(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}
