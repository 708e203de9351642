//! TLS and mutual TLS on the gRPC port: handshakes with the right and the wrong CA, client
//! certificates, a certificate replaced on disk while a connection stays open, the start
//! errors of bad files, and HTTP/1.1 for HTTP/JSON clients. Certificates are made here
//! with rcgen; SQLite only (TLS does not touch the database).
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use keyplane::Application;
use keyplane::grpc::tls::TlsSettings;
use keyplane::proto as pb;
use keyplane_testkit::*;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SigningKey,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

/// A certificate authority that signs server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A certificate and its key, PEM: for localhost / 127.0.0.1, or a client.
    fn issue(&self, purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "keyplane test");
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self) -> (String, String) {
        self.issue(ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self) -> (String, String) {
        self.issue(ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// A client certificate as `openssl x509 -req` makes one without `-extfile`: X.509 v1,
    /// no version field and no extensions, signed by this CA all the same.
    fn version_1_client(&self) -> (String, String) {
        let (cert, key) = self.client();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        let (_, cert_body) = der_element(&der);
        let (tbs, tbs_body) = der_element(cert_body);
        let (signature_algorithm, _) = der_element(&cert_body[tbs.len()..]);
        let mut fields = Vec::new();
        let mut rest = tbs_body;
        while !rest.is_empty() {
            let (field, _) = der_element(rest);
            // [0] is the version, [3] the extensions.
            if !matches!(field[0], 0xa0 | 0xa3) {
                fields.extend_from_slice(field);
            }
            rest = &rest[field.len()..];
        }
        let tbs = der_encode(0x30, &fields);
        let mut signature = vec![0]; // a BIT STRING's count of unused bits
        signature.extend(self.issuer.key().sign(&tbs).unwrap());
        let v1 = der_encode(
            0x30,
            &[
                tbs,
                signature_algorithm.to_vec(),
                der_encode(0x03, &signature),
            ]
            .concat(),
        );
        let base64 = base64::engine::general_purpose::STANDARD.encode(v1);
        let lines: Vec<&str> = base64
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect();
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            lines.join("\n")
        );
        (pem, key)
    }
}

/// The DER element at the start of `der`: all of it, and its contents.
fn der_element(der: &[u8]) -> (&[u8], &[u8]) {
    let (header, len) = match der[1] {
        short if short < 0x80 => (2, usize::from(short)),
        long => {
            let octets = usize::from(long & 0x7f);
            let len = der[2..2 + octets]
                .iter()
                .fold(0, |len, b| len << 8 | usize::from(*b));
            (2 + octets, len)
        }
    };
    (&der[..header + len], &der[header..header + len])
}

/// A DER element of `tag` around `contents`.
fn der_encode(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut der = vec![tag];
    if contents.len() < 0x80 {
        der.push(contents.len() as u8);
    } else {
        let len: Vec<u8> = contents
            .len()
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        der.push(0x80 | len.len() as u8);
        der.extend(len);
    }
    der.extend(contents);
    der
}

/// The PEM files the server reads, in a directory of their own.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, pem: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, pem).unwrap();
        path
    }

    /// Server certificate and key files from `ca`, with `client_ca` for mTLS.
    fn settings(&self, ca: &Ca, client_ca: Option<&Ca>) -> TlsSettings {
        let (cert, key) = ca.server();
        TlsSettings {
            cert: self.write("server.pem", &cert),
            key: self.write("server.key", &key),
            client_ca: client_ca.map(|ca| self.write("client-ca.pem", &ca.pem)),
        }
    }
}

struct TlsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
    _db: TestDb,
}

impl TlsServer {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap().unwrap();
    }
}

async fn build(tls: TlsSettings) -> (anyhow::Result<Application>, TestDb) {
    capture_debug_logs();
    let db = fresh_database(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.tls = Some(tls);
    (Application::build(settings).await, db)
}

async fn serve(tls: TlsSettings) -> TlsServer {
    let (app, db) = build(tls).await;
    let app = app.expect("build the application");
    let addr = app.local_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TlsServer {
        addr,
        stop: Some(tx),
        handle,
        _db: db,
    }
}

/// A connection that trusts `ca` and presents `identity` (certificate, key) if given.
async fn connect(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn health_check(channel: Channel) -> Result<ServingStatus, String> {
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| format!("{status:?}"))?;
    Ok(reply.into_inner().status())
}

/// Connects and asks Health/Check; the error says where it failed. (Under TLS 1.3 a client
/// certificate is judged after the client's handshake is done, so a refusal may only show
/// on the first call.)
async fn health_over(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&(String, String)>,
) -> Result<ServingStatus, String> {
    let channel = connect(addr, ca, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    health_check(channel).await
}

#[test]
fn tls_serves_health_and_authenticated_calls() {
    run_test(async {
        let ca = Ca::new("keyplane test CA");
        let files = Files::new();
        let server = serve(files.settings(&ca, None)).await;

        let channel = connect(server.addr, &ca, None).await.expect("TLS connect");
        assert_eq!(
            health_check(channel.clone()).await.unwrap(),
            ServingStatus::Serving
        );
        let admin = Cred::Bearer(token(Some(Uuid::now_v7()), &all_builtin()));
        let created = Client::new(channel, &admin)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest {
                name: "over-tls".into(),
                ..Default::default()
            })
            .await
            .expect("an authenticated call over TLS")
            .into_inner();
        assert_eq!(created.workspace.unwrap().name, "over-tls");

        // A client that trusts another CA does not get a connection.
        let stranger = Ca::new("another CA");
        let refused = health_over(server.addr, &stranger, None).await;
        assert!(refused.is_err(), "a wrong CA was accepted: {refused:?}");

        // Nor does a plaintext client.
        let plain = async {
            let channel = Channel::from_shared(format!("http://{}", server.addr))
                .unwrap()
                .connect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            health_check(channel).await
        };
        let plain = tokio::time::timeout(Duration::from_secs(10), plain)
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        assert!(plain.is_err(), "plaintext was served: {plain:?}");
        server.stop().await;
    });
}

#[test]
fn mtls_requires_a_client_certificate_from_the_client_ca() {
    run_test(async {
        let server_ca = Ca::new("server CA");
        let client_ca = Ca::new("client CA");
        let files = Files::new();
        let server = serve(files.settings(&server_ca, Some(&client_ca))).await;

        let anonymous = health_over(server.addr, &server_ca, None).await;
        assert!(
            anonymous.is_err(),
            "served without a certificate: {anonymous:?}"
        );

        let good = client_ca.client();
        assert_eq!(
            health_over(server.addr, &server_ca, Some(&good))
                .await
                .unwrap(),
            ServingStatus::Serving
        );

        let foreign = Ca::new("someone else's CA").client();
        let refused = health_over(server.addr, &server_ca, Some(&foreign)).await;
        assert!(
            refused.is_err(),
            "a certificate from another CA was accepted: {refused:?}"
        );

        // Nor one from the client CA that is X.509 v1; the client hears so at once.
        let v1 = client_ca.version_1_client();
        let refused = tokio::time::timeout(
            Duration::from_secs(5),
            health_over(server.addr, &server_ca, Some(&v1)),
        )
        .await
        .expect("the client was left waiting");
        assert!(refused.is_err(), "a v1 certificate was accepted");
        server.stop().await;
    });
}

#[test]
fn a_rotated_certificate_serves_new_connections_and_open_ones_keep_working() {
    run_test(async {
        let old_ca = Ca::new("old CA");
        let new_ca = Ca::new("new CA");
        let files = Files::new();
        let settings = files.settings(&old_ca, None);
        let server = serve(settings.clone()).await;

        let open = connect(server.addr, &old_ca, None).await.unwrap();
        assert_eq!(
            health_check(open.clone()).await.unwrap(),
            ServingStatus::Serving
        );

        // Replace the files in place, as a certificate manager does.
        let (cert, key) = new_ca.server();
        std::fs::write(&settings.key, key).unwrap();
        std::fs::write(&settings.cert, cert).unwrap();

        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if health_over(server.addr, &new_ca, None).await.is_ok() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new certificate was never served"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // New handshakes get only the new certificate...
        assert!(health_over(server.addr, &old_ca, None).await.is_err());
        // ...while the connection opened before keeps its session (a reconnect would fail:
        // that channel trusts only the old CA).
        assert_eq!(health_check(open).await.unwrap(), ServingStatus::Serving);
        server.stop().await;
    });
}

#[test]
fn a_bad_reload_keeps_the_current_certificate() {
    run_test(async {
        let ca = Ca::new("CA");
        let files = Files::new();
        let settings = files.settings(&ca, None);
        let server = serve(settings.clone()).await;
        std::fs::write(&settings.cert, "not a certificate").unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            health_over(server.addr, &ca, None).await.unwrap(),
            ServingStatus::Serving
        );
        server.stop().await;
    });
}

fn assert_start_error(result: anyhow::Result<Application>, file: &Path) {
    let error = match result {
        Ok(_) => panic!("the server started with a bad {}", file.display()),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains(&file.display().to_string()),
        "the error does not name {}: {error}",
        file.display()
    );
}

#[test]
fn a_key_that_does_not_match_the_certificate_stops_the_start() {
    run_test(async {
        let ca = Ca::new("CA");
        let files = Files::new();
        let mut settings = files.settings(&ca, None);
        let (_, other_key) = ca.server();
        settings.key = files.write("other.key", &other_key);
        let (result, _db) = build(settings.clone()).await;
        assert_start_error(result, &settings.key);
    });
}

#[test]
fn missing_files_stop_the_start() {
    run_test(async {
        let ca = Ca::new("CA");
        let files = Files::new();
        let good = files.settings(&ca, Some(&ca));

        for settings in [
            TlsSettings {
                cert: files.path("missing-cert.pem"),
                ..good.clone()
            },
            TlsSettings {
                key: files.path("missing.key"),
                ..good.clone()
            },
            TlsSettings {
                client_ca: Some(files.path("missing-ca.pem")),
                ..good.clone()
            },
        ] {
            let missing = [&settings.cert, &settings.key]
                .into_iter()
                .chain(settings.client_ca.as_ref())
                .find(|path| !path.exists())
                .unwrap()
                .clone();
            let (result, _db) = build(settings).await;
            assert_start_error(result, &missing);
        }

        // A file that is there but holds no certificate is named too.
        let garbage = TlsSettings {
            cert: files.write("garbage.pem", "hello"),
            ..good.clone()
        };
        let (result, _db) = build(garbage.clone()).await;
        assert_start_error(result, &garbage.cert);
    });
}

/// HTTP/JSON clients speak HTTP/1.1 over TLS too: the server offers it in ALPN beside h2.
#[test]
fn tls_serves_http1_for_http_json() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    run_test(async {
        let ca = Ca::new("keyplane test CA");
        let files = Files::new();
        let server = serve(files.settings(&ca, None)).await;

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
            .unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .expect("a TLS handshake offering only http/1.1");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        tls.write_all(
            b"GET /openapi.json HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:.300}");
        assert!(answer.contains("\"openapi\": \"3.1.0\""), "{answer:.300}");
        server.stop().await;
    });
}
