//! Entry points for the cargo-fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`, which
//! replays their saved corpus and every crash ever found. Each takes arbitrary bytes, must
//! never panic, and checks what must hold for the inputs it accepts.
// A fuzz target reports a broken invariant by panicking: that is what the fuzzer catches.
#![allow(clippy::panic)]

use std::sync::OnceLock;

use prost::Message;

use crate::auth::jwt::{JwtSettings, JwtVerifier};
use crate::auth::{AuthError, bearer_token};
use crate::domain::TenantId;
use crate::domain::key::{ApiKeySecret, ImportedSecret, KeyDigest};
use crate::domain::network::{AllowedNetworks, ClientAddress, Network};
use crate::domain::page::{ListFingerprint, ListKind, PageSize, PageTokenCodec};
use crate::domain::permission::{MAX_LEN, MAX_TERMS, PermissionQuery};
use crate::domain::scope::ScopeString;
use crate::grpc::{api_keys, convert, roles, scopes, workspaces};
use crate::proto as pb;

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs`).
pub const TARGETS: [(&str, Target); 8] = [
    ("key_parser", key_parser),
    ("scope_parser", scope_parser),
    ("page_token", page_token),
    ("credentials", credentials),
    ("request", request),
    ("permission_query", permission_query),
    ("network", network),
    ("http", http),
];

/// The key parsers: an accepted key is exactly its input, and its masked form shows the
/// prefix and the last 4 characters, nothing more; an accepted hex digest is its input read
/// as bytes (either case); a string accepted as an imported secret has that secret's digest,
/// and a keyplane key is one too, with the same digest.
pub fn key_parser(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(digest) = KeyDigest::from_hex(text) {
        let hex: String = digest.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, text.to_ascii_lowercase());
    }
    if let Ok(imported) = ImportedSecret::parse(text) {
        assert_eq!(ImportedSecret::digest_of(text), Ok(imported.digest()));
        assert!(imported.hint().is_none_or(|h| text.ends_with(h.as_str())));
    }
    if let Ok(key) = ApiKeySecret::parse(text) {
        assert_eq!(key.expose(), text);
        // The prefix, its own separator (the character after it in the key), the last 4.
        let separator = &text[key.prefix().len()..=key.prefix().len()];
        assert_eq!(
            key.masked(),
            format!("{}{separator}****{}", key.prefix(), &text[text.len() - 4..])
        );
        assert_eq!(ImportedSecret::digest_of(text), Ok(key.digest()));
    }
}

/// The scope parser: accepted scopes round-trip through their string form.
pub fn scope_parser(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(scope) = ScopeString::parse(text) {
        assert_eq!(scope.as_str(), text);
        assert_eq!(
            ScopeString::from_parts(scope.resource(), scope.action()),
            Ok(scope.clone())
        );
    }
}

/// The permission-query parser: an accepted query has 1 to 64 distinct terms; it fails
/// with nothing granted (every term missing) and holds with every term granted, or every
/// term's `resource:*`; withholding one term can leave only that term missing; and its
/// canonical form parses back to the same query.
pub fn permission_query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(query) = PermissionQuery::parse(text) else {
        return;
    };
    let terms: Vec<&str> = query.terms().iter().map(ScopeString::as_str).collect();
    assert!((1..=MAX_TERMS).contains(&terms.len()));
    assert_eq!(query.missing(&[] as &[&str]), terms);
    assert!(query.missing(&terms).is_empty());
    let wildcards: Vec<String> = query
        .terms()
        .iter()
        .map(|t| format!("{}:*", t.resource()))
        .collect();
    assert!(query.missing(&wildcards).is_empty());
    for (i, withheld) in terms.iter().enumerate() {
        let mut granted = terms.clone();
        granted.remove(i);
        let missing = query.missing(&granted);
        assert!(missing.iter().all(|m| m == withheld), "{missing:?}");
    }
    let canonical = query.to_string();
    if canonical.len() <= MAX_LEN {
        assert_eq!(PermissionQuery::parse(&canonical), Ok(query));
    }
}

/// The allow-list parsers: an allow-list entry and a client address (the input split at
/// its first NUL). An accepted entry reads back as itself, lies within itself, and admits
/// exactly the addresses it contains; an accepted address, as a one-host entry, admits
/// itself.
pub fn network(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (entry, address) = text.split_once('\0').unwrap_or((&text, ""));
    let address = ClientAddress::parse(address).ok();
    if let Some(address) = address {
        let host = Network::parse(&address.to_string())
            .unwrap_or_else(|e| panic!("{address} does not read back: {e}"));
        assert!(host.contains(address));
    }
    let Ok(network) = Network::parse(entry) else {
        return;
    };
    assert_eq!(Network::parse(&network.to_string()), Ok(network));
    let list = AllowedNetworks::new([network]);
    assert!(list.within(&list));
    assert!(list.within(&AllowedNetworks::default()));
    assert!(!AllowedNetworks::default().within(&list));
    assert_eq!(
        list.admits(address),
        address.is_some_and(|a| network.contains(a))
    );
}

/// The list every fuzzed token is checked against.
fn list() -> ListFingerprint {
    ListFingerprint::new(ListKind::ApiKeys, TenantId::new(uuid::Uuid::nil())).filter(Some(b"fuzz"))
}

fn codec() -> &'static PageTokenCodec {
    static CODEC: OnceLock<PageTokenCodec> = OnceLock::new();
    CODEC.get_or_init(|| PageTokenCodec::new([42; 32]))
}

/// The page-token decoder: a token accepted for some filters is the token the codec
/// itself would have written.
pub fn page_token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(id)) = codec().decode::<uuid::Uuid>(text, &list()) {
        assert_eq!(codec().encode(id, &list()), text);
    }
}

fn verifier() -> &'static JwtVerifier {
    static VERIFIER: OnceLock<JwtVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        JwtVerifier::from_settings(&JwtSettings {
            secret: Some("fuzzing-secret-fuzzing-secret-fuzzing".into()),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("fuzzing verifier: {e}"))
    })
}

/// Metadata and credential parsing: `authorization`, `x-api-key` and `x-tenant-id` values
/// (the input split at its first two NUL bytes). Nothing forged may authenticate, and a
/// refusal is one of the token errors, which carry no part of the input.
pub fn credentials(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\0');
    let authorization = parts.next().unwrap_or_default();
    let api_key = parts.next().unwrap_or_default();
    let tenant = parts.next().unwrap_or_default();
    match bearer_token(authorization).and_then(|token| verifier().verify(token)) {
        Ok(identity) => panic!("a fuzzed token authenticated as {identity:?}"),
        Err(err) => assert!(
            matches!(
                err,
                AuthError::TokenInvalid | AuthError::TokenExpired | AuthError::TokenNotYetValid
            ),
            "unexpected refusal {err:?}"
        ),
    }
    let _ = ApiKeySecret::parse(api_key);
    if let Some(parsed) = TenantId::parse(tenant) {
        assert!(tenant.eq_ignore_ascii_case(&parsed.to_string()));
    }
}

/// Decoding and validating every request message: the first byte picks the message type,
/// the rest is its protobuf encoding.
pub fn request(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let now = chrono::Utc::now();
    macro_rules! decode {
        ($t:ty) => {
            match <$t>::decode(bytes) {
                Ok(message) => message,
                Err(_) => return,
            }
        };
    }
    match kind % 17 {
        0 => drop(workspaces::parse_create(
            decode!(pb::CreateWorkspaceRequest),
            "fuzz",
        )),
        1 => drop(workspaces::parse_update(decode!(
            pb::UpdateWorkspaceRequest
        ))),
        2 => drop(scopes::parse_create(decode!(pb::CreateScopeRequest))),
        3 => drop(scopes::parse_update(decode!(pb::UpdateScopeRequest))),
        4 => drop(api_keys::parse_create(
            decode!(pb::CreateApiKeyRequest),
            now,
        )),
        5 => drop(api_keys::parse_update(
            decode!(pb::UpdateApiKeyRequest),
            now,
        )),
        6 => drop(api_keys::parse_rotate(decode!(pb::RotateApiKeyRequest))),
        7 => {
            let r = decode!(pb::VerifyApiKeyRequest);
            let _ = api_keys::parse_required_scopes(&r.required_scopes);
            let _ = api_keys::parse_cost(r.cost);
            let _ = ApiKeySecret::parse(&r.key);
            let _ = ImportedSecret::digest_of(&r.key);
            let _ = PermissionQuery::parse(&r.permission_query);
            let _ = api_keys::parse_client_ip(&r.client_ip);
        }
        8 => drop(convert::parse_id(
            "id",
            &decode!(pb::GetWorkspaceRequest).id,
        )),
        9 => {
            let r = decode!(pb::ListWorkspacesRequest);
            let _ = PageSize::parse(r.page_size);
            let _ = codec().decode::<uuid::Uuid>(&r.page_token, &list());
        }
        10 => {
            let r = decode!(pb::ListScopesRequest);
            let _ = convert::parse_id("workspace_id", &r.workspace_id);
            let _ = codec().decode::<uuid::Uuid>(&r.page_token, &list());
        }
        11 => {
            let r = decode!(pb::ListApiKeysRequest);
            let _ = convert::parse_id("workspace_id", &r.workspace_id);
            let _ = PageSize::parse(r.page_size);
        }
        12 => drop(api_keys::parse_adjust(&decode!(
            pb::AdjustApiKeyCreditsRequest
        ))),
        13 => drop(api_keys::parse_delegate(
            decode!(pb::DelegateApiKeyRequest),
            now,
        )),
        14 => drop(roles::parse_create(decode!(pb::CreateRoleRequest))),
        15 => drop(roles::parse_update(decode!(pb::UpdateRoleRequest))),
        // Digests, secrets of any shape and hints, item by item.
        _ => drop(api_keys::parse_import(
            decode!(pb::ImportApiKeysRequest),
            now,
        )),
    }
}

/// The HTTP layer, built once, in front of a stand-in for the gRPC stack.
fn http_layer() -> Option<&'static crate::http::HttpLayer> {
    static LAYER: OnceLock<Option<crate::http::HttpLayer>> = OnceLock::new();
    LAYER
        .get_or_init(|| crate::http::HttpLayer::new().ok())
        .as_ref()
}

/// The HTTP/JSON layer, in process: byte 0 picks the method (its high bit sends a
/// non-JSON content type), the bytes up to the first newline are the path and query, the
/// rest is the body. Whatever comes in: no panic, never a 500, always a JSON answer with a
/// request id; and what it hands the gRPC stack is one well-formed gRPC frame on a
/// keyplane RPC's path.
pub fn http(data: &[u8]) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tonic::body::Body;
    use tower::{Layer, Service};

    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let methods = ["GET", "POST", "PATCH", "DELETE", "PUT", "OPTIONS", "HEAD"];
    let method = methods[usize::from(selector & 0x7f) % methods.len()];
    let newline = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
    let (target, body) = rest.split_at(newline);
    let body = body.get(1..).unwrap_or_default();
    let Ok(target) = std::str::from_utf8(target) else {
        return;
    };
    // What hyper would refuse never reaches the layer.
    let Ok(request) = http::Request::builder()
        .method(method)
        .uri(if target.starts_with('/') {
            target.to_owned()
        } else {
            format!("/{target}")
        })
        .header(
            "content-type",
            if selector & 0x80 == 0 {
                "application/json"
            } else {
                "text/plain"
            },
        )
        .body(Body::new(Full::new(Bytes::copy_from_slice(body))))
    else {
        return;
    };
    let Some(layer) = http_layer() else {
        panic!("the HTTP layer could not be built");
    };
    let grpc = tower::service_fn(|request: http::Request<Body>| async move {
        assert_eq!(request.method(), http::Method::POST);
        assert!(request.uri().path().starts_with("/keyplane.v1."));
        assert_eq!(request.headers()["content-type"], "application/grpc");
        let frame = request
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let length = frame
            .get(1..5)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
        assert_eq!(frame.first(), Some(&0), "a compressed or empty frame");
        assert_eq!(length.map(|l| l as usize + 5), Some(frame.len()));
        // An empty message is a valid answer of every RPC.
        let answer = http_body_util::StreamBody::new(futures::stream::iter([
            Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
            Ok(http_body::Frame::trailers(http::HeaderMap::from_iter([(
                http::HeaderName::from_static("grpc-status"),
                http::HeaderValue::from_static("0"),
            )]))),
        ]));
        Ok::<_, String>(http::Response::new(Body::new(answer)))
    });
    let mut service = layer.layer(grpc);
    let Ok(response) = futures::executor::block_on(service.call(request)) else {
        panic!("the stand-in gRPC stack failed");
    };
    assert_ne!(response.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.headers()["content-type"], "application/json");
    let Ok(answer) = futures::executor::block_on(response.into_body().collect()) else {
        panic!("the answer's body failed");
    };
    assert!(serde_json::from_slice::<serde_json::Value>(&answer.to_bytes()).is_ok());
}
