//! TLS and mutual TLS on the gRPC port, with rustls. The handshake happens here, over the
//! accepted (idle-guarded) TCP stream, rather than in tonic, so that the certificate, key
//! and client CA can be replaced on disk while serving: a background task polls the files
//! and swaps in a new `ServerConfig`. Open connections keep their session; the next
//! handshake gets the new certificate. A change that does not load keeps the old config.
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::grpc::idle::IdleTimeout;

/// How often the files are checked for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Where the server's certificate chain, its key and (for mTLS) the client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM: the server's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the private key of the first certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: when set, every client must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

/// The contents last loaded, to tell a real change from a touch.
#[derive(Clone, PartialEq, Eq)]
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The live TLS configuration, swapped whole when the files change.
pub struct Tls {
    settings: TlsSettings,
    config: ArcSwap<ServerConfig>,
    /// What `load` read: the watcher compares against it, so a change made between start
    /// and the first check is not missed.
    loaded: Contents,
}

impl Tls {
    /// Loads the files; an error names the file that is missing, unreadable or wrong.
    pub fn load(settings: TlsSettings) -> anyhow::Result<Arc<Self>> {
        let contents = read(&settings)?;
        let config = build(&settings, &contents)?;
        Ok(Arc::new(Self {
            settings,
            config: ArcSwap::from_pointee(config),
            loaded: contents,
        }))
    }

    /// An acceptor over the current configuration, for one handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.load_full())
    }

    /// Checks the files every `interval` until `stop`, swapping in what changed.
    pub async fn watch(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        // What is serving now; a failed reload is not retried until the files change again.
        let mut seen = Some(self.loaded.clone());
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let contents = match read(&self.settings) {
                Ok(contents) => contents,
                Err(error) => {
                    if seen.take().is_some() {
                        tracing::error!(
                            error = format!("{error:#}"),
                            "TLS files unreadable; keeping the current certificate"
                        );
                    }
                    continue;
                }
            };
            if seen.as_ref() == Some(&contents) {
                continue;
            }
            match build(&self.settings, &contents) {
                Ok(config) => {
                    self.config.store(Arc::new(config));
                    tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
                }
                Err(error) => tracing::error!(
                    error = format!("{error:#}"),
                    "TLS reload failed; keeping the current certificate"
                ),
            }
            seen = Some(contents);
        }
    }
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the TLS {what} {}", path.display()))
}

fn read(settings: &TlsSettings) -> anyhow::Result<Contents> {
    Ok(Contents {
        cert: read_file(&settings.cert, "certificate")?,
        key: read_file(&settings.key, "key")?,
        client_ca: settings
            .client_ca
            .as_deref()
            .map(|path| read_file(path, "client CA"))
            .transpose()?,
    })
}

fn certificates(pem: &[u8], path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate file", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "no certificate in {}", path.display());
    Ok(certs)
}

fn build(settings: &TlsSettings, contents: &Contents) -> anyhow::Result<ServerConfig> {
    // ring, explicitly: the process-wide default is ambiguous when more than one provider
    // is compiled in.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(&contents.cert, &settings.cert)?;
    // The error names the file only: the key's bytes never reach a message.
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|_| anyhow::anyhow!("no PEM private key in {}", settings.key.display()))?;
    let certified = CertifiedKey::from_der(chain, key, &provider).with_context(|| {
        format!(
            "the key {} does not go with the certificate {}",
            settings.key.display(),
            settings.cert.display()
        )
    })?;

    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("the TLS provider supports no protocol version")?;
    let builder = match (&settings.client_ca, &contents.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(pem, path)? {
                roots
                    .add(cert)
                    .with_context(|| format!("bad CA certificate in {}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("unusable client CA {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(Single(Arc::new(certified))));
    // HTTP/1.1 as well, for HTTP/JSON and gRPC-Web clients.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves one chain to every client, whatever name it asks for.
#[derive(Debug)]
struct Single(Arc<CertifiedKey>);

impl ResolvesServerCert for Single {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A TLS connection over an idle-guarded TCP stream. (A local type: tonic's `Connected`
/// cannot be implemented for tokio-rustls' stream here.)
pub struct TlsConnection(pub TlsStream<IdleTimeout>);

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // As on plaintext: h2 then packs many answers into one TLS record and one write.
        crate::grpc::idle::VECTORED_WRITES
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

/// Longest a client may take over its handshake (at most the idle timeout): the HTTP/2
/// preface deadline of [`IdleTimeout`] is met by the ClientHello alone.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one refused handshake is logged in this long.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(1);

/// Which refused handshakes get a log line: a client that retries in a loop, or a scanner,
/// must not flood the log, yet the operator must see that handshakes are being refused,
/// and why (a refusal is silent on the server otherwise, and the client may only see a
/// timeout).
#[derive(Debug, Default)]
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RefusalLog {
    /// `Some(n)`: log the refusal seen at `now`, saying that `n` were suppressed since the
    /// last line. `None`: suppress it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < REFUSALS_LOGGED_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Accepted TCP connections in, finished TLS connections out. Each handshake runs on its
/// own task, so a slow client holds up nobody. One that TLS refused (an untrusted or X.509
/// v1 client certificate, a plaintext client, no common protocol) is logged at warn,
/// rate-limited by [`RefusalLog`]; one whose peer went away or timed out is logged at
/// debug, as a TCP health check does that before any handshake. Stops accepting when the
/// server drops the stream.
pub fn incoming<S>(
    tls: Arc<Tls>,
    tcp: S,
    idle_timeout: Duration,
) -> impl Stream<Item = io::Result<TlsConnection>> + Send + 'static
where
    S: Stream<Item = io::Result<IdleTimeout>> + Send + 'static,
{
    let timeout = HANDSHAKE_TIMEOUT.min(idle_timeout);
    let refusals = Arc::new(Mutex::new(RefusalLog::default()));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        tokio::pin!(tcp);
        loop {
            let accepted = tokio::select! {
                // The server stopped: release the listener now, not at the next accept.
                _ = tx.closed() => return,
                accepted = tcp.next() => accepted,
            };
            let Some(accepted) = accepted else { return };
            match accepted {
                Ok(stream) => {
                    let acceptor = tls.acceptor();
                    let tx = tx.clone();
                    let refusals = refusals.clone();
                    tokio::spawn(async move {
                        let peer = stream
                            .connect_info()
                            .remote_addr()
                            .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
                        match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                            Ok(Ok(conn)) => {
                                let _ = tx.send(Ok(TlsConnection(conn))).await;
                            }
                            Ok(Err(error)) => refused(&refusals, &peer, &error),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
                Err(error) => {
                    if tx.send(Err(error)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Logs a failed handshake: at warn when TLS refused it, with rustls's reason.
fn refused(refusals: &Mutex<RefusalLog>, peer: &str, error: &io::Error) {
    // tokio-rustls hands back rustls's own error inside the io::Error when TLS refused.
    let Some(reason) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        tracing::debug!(%peer, %error, "TLS handshake failed");
        return;
    };
    let admitted = refusals
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .admit(Instant::now());
    if let Some(suppressed) = admitted {
        tracing::warn!(%peer, %reason, suppressed, "TLS handshake refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_at_most_once_a_second_with_a_count_of_the_rest() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(log.admit(at(0)), Some(0));
        assert_eq!(log.admit(at(1)), None);
        assert_eq!(log.admit(at(999)), None);
        assert_eq!(log.admit(at(1_000)), Some(2));
        assert_eq!(log.admit(at(5_000)), Some(0));
    }
}
