//! HTTP/JSON on the gRPC port (SPEC §4.2): round trips of every service at their
//! `google.api.http` paths, Google's JSON error body for RPC errors and for requests that
//! are not requests, request ids, HTTP/2, CORS, and the OpenAPI document. The
//! authorization matrix runs over HTTP too (`matrix::authorization_matrix_over_http`,
//! through [`call`]).
use std::path::Path;

use keyplane::http::error::{code_name, http_status};
use keyplane::http::routes::{BodyMapping, Routes, Segment};
use keyplane::proto::FILE_DESCRIPTOR_SET;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use keyplane_testkit::*;

use crate::matrix::{Fixture, Row};

on_both_backends!(
    workspaces_round_trip,
    scopes_and_roles_round_trip,
    api_keys_round_trip,
    malformed_requests_get_clear_errors,
);

/// An HTTP client of one app, as one credential.
struct Http {
    base: String,
    client: reqwest::Client,
    cred: Cred,
}

/// An answer: status, request id, JSON body.
struct Answer {
    status: StatusCode,
    request_id: String,
    allow: String,
    json: Value,
}

impl Answer {
    #[track_caller]
    fn ok(self) -> Value {
        assert_eq!(self.status, StatusCode::OK, "{}", self.json);
        self.json
    }

    /// Asserts Google's error body with this HTTP status, gRPC code name and reason.
    #[track_caller]
    fn error(&self, status: u16, code: &str, reason: &str) {
        assert_eq!(self.status.as_u16(), status, "{}", self.json);
        let error = &self.json["error"];
        assert_eq!(error["code"], status, "{}", self.json);
        assert_eq!(error["status"], code, "{}", self.json);
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        let info = &error["details"][0];
        assert_eq!(
            info["@type"], "type.googleapis.com/google.rpc.ErrorInfo",
            "{}",
            self.json
        );
        assert_eq!(info["domain"], "keyplane.dev");
        assert_eq!(info["reason"], reason, "{}", self.json);
    }
}

impl Http {
    fn new(app: &TestApp, cred: Cred) -> Self {
        Self {
            base: format!("http://{}", app.addr),
            client: reqwest::Client::new(),
            cred,
        }
    }

    fn admin(app: &TestApp) -> Self {
        Self::new(app, app.admin())
    }

    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Answer {
        let request = self.client.request(method, format!("{}{path}", self.base));
        let request = match body {
            Some(body) => request.json(&body),
            None => request,
        };
        answer(authorize(request, &self.cred, None).send().await.unwrap()).await
    }

    async fn get(&self, path: &str) -> Value {
        self.send(Method::GET, path, None).await.ok()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.send(Method::POST, path, Some(body)).await.ok()
    }

    async fn patch(&self, path: &str, body: Value) -> Value {
        self.send(Method::PATCH, path, Some(body)).await.ok()
    }

    async fn delete(&self, path: &str) -> Value {
        self.send(Method::DELETE, path, None).await.ok()
    }
}

fn authorize(
    request: reqwest::RequestBuilder,
    cred: &Cred,
    tenant: Option<&str>,
) -> reqwest::RequestBuilder {
    let request = match cred {
        Cred::None => request,
        Cred::Bearer(token) => request.bearer_auth(token),
        Cred::ApiKey(key) => request.header("x-api-key", key),
        Cred::Authorization(value) => request.header("authorization", value),
    };
    match tenant {
        Some(tenant) => request.header("x-tenant-id", tenant),
        None => request,
    }
}

/// Reads an answer; every answer is JSON with a request id.
async fn answer(response: reqwest::Response) -> Answer {
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let request_id = header("x-request-id");
    let allow = header("allow");
    assert_eq!(header("content-type"), "application/json");
    assert!(!request_id.is_empty(), "an answer without x-request-id");
    let json = response.json().await.unwrap();
    Answer {
        status,
        request_id,
        allow,
        json,
    }
}

fn pool() -> DescriptorPool {
    DescriptorPool::decode(FILE_DESCRIPTOR_SET).unwrap()
}

/// Calls the RPC of a matrix row over HTTP: its request message becomes JSON at the
/// path, query and body of the RPC's binding. A success comes back as the response
/// message's bytes and an error as a `Status` with the code and `ErrorInfo` of the JSON
/// error body, whose HTTP status must be the code's.
pub async fn call(
    app: &TestApp,
    cred: &Cred,
    tenant: Option<&str>,
    row: &Row,
    fixture: &Fixture,
) -> Result<Vec<u8>, Status> {
    let pool = pool();
    let routes = Routes::from_pool(&pool).unwrap();
    let route = routes
        .iter()
        .find(|r| r.grpc_uri.path() == row.path)
        .unwrap_or_else(|| panic!("{} has no HTTP binding", row.path));
    let input = route.rpc.input();
    let message = DynamicMessage::decode(input.clone(), (row.request)(fixture).as_slice()).unwrap();
    let Value::Object(mut fields) = serde_json::to_value(&message).unwrap() else {
        unreachable!()
    };
    let mut path = String::new();
    for segment in &route.segments {
        path.push('/');
        match segment {
            Segment::Literal(literal) => path.push_str(literal),
            Segment::Field(names) => {
                let value = take(&mut fields, &input, names);
                path.extend(percent_encoding::utf8_percent_encode(
                    &value,
                    percent_encoding::NON_ALPHANUMERIC,
                ));
            }
        }
    }
    if let Some(verb) = &route.verb {
        path.push(':');
        path.push_str(verb);
    }
    let (body, query) = match &route.body {
        BodyMapping::Whole => (Some(Value::Object(fields)), Map::new()),
        BodyMapping::Field(name) => {
            let json_name = input
                .get_field_by_name(name)
                .unwrap()
                .json_name()
                .to_owned();
            (Some(fields.remove(&json_name).unwrap_or(json!({}))), fields)
        }
        BodyMapping::None => (None, fields),
    };
    let mut pairs = Vec::new();
    flatten("", &Value::Object(query), &mut pairs);
    let client = reqwest::Client::new();
    let mut request = client
        .request(route.method.clone(), format!("http://{}{path}", app.addr))
        .query(&pairs);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let answer = answer(authorize(request, cred, tenant).send().await.unwrap()).await;
    if answer.status == StatusCode::OK {
        let message = DynamicMessage::deserialize(route.rpc.output(), answer.json).unwrap();
        return Ok(message.encode_to_vec());
    }
    let error = &answer.json["error"];
    let code = (0..=16)
        .map(Code::from_i32)
        .find(|c| code_name(*c) == error["status"])
        .unwrap_or_else(|| panic!("no gRPC code named {}", error["status"]));
    assert_eq!(
        answer.status,
        http_status(code),
        "{}: {}",
        row.path,
        answer.json
    );
    let info = &error["details"][0];
    let metadata: std::collections::HashMap<String, String> = info["metadata"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    Err(Status::with_error_details(
        code,
        error["message"].as_str().unwrap(),
        ErrorDetails::with_error_info(
            info["reason"].as_str().unwrap_or_default(),
            info["domain"].as_str().unwrap_or_default(),
            metadata,
        ),
    ))
}

/// Removes the string at a path of proto field names from a request's JSON.
fn take(fields: &mut Map<String, Value>, message: &MessageDescriptor, names: &[String]) -> String {
    let field = message.get_field_by_name(&names[0]).unwrap();
    if names.len() == 1 {
        return match fields.remove(field.json_name()) {
            Some(Value::String(s)) => s,
            _ => String::new(),
        };
    }
    let inner = fields
        .entry(field.json_name())
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .unwrap();
    take(inner, field.kind().as_message().unwrap(), &names[1..])
}

/// Query parameters of the JSON left for the query: dotted names, repeated values.
fn flatten(prefix: &str, value: &Value, pairs: &mut Vec<(String, String)>) {
    match value {
        Value::Object(fields) => {
            for (name, value) in fields {
                let name = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&name, value, pairs);
            }
        }
        Value::Array(values) => values.iter().for_each(|v| flatten(prefix, v, pairs)),
        Value::String(s) => pairs.push((prefix.to_owned(), s.clone())),
        other => pairs.push((prefix.to_owned(), other.to_string())),
    }
}

fn str(value: &Value) -> String {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
        .to_owned()
}

async fn workspaces_round_trip(backend: Backend) {
    let app = spawn_app(backend).await;
    let http = Http::admin(&app);
    let created = http
        .post(
            "/v1/workspaces",
            json!({"name": "Atlas", "company": "Acme", "isPrivate": true}),
        )
        .await;
    let workspace = &created["workspace"];
    let id = str(&workspace["id"]);
    assert_eq!(workspace["name"], "Atlas");
    assert_eq!(workspace["isPrivate"], true);
    assert_eq!(workspace["tenantId"], app.tenant.to_string());
    // What gRPC sees is what HTTP made.
    assert_eq!(
        app.get_workspace(&id).await.unwrap().company.as_deref(),
        Some("Acme")
    );

    assert_eq!(
        http.get(&format!("/v1/workspaces/{id}")).await["workspace"],
        *workspace
    );
    http.post("/v1/workspaces", json!({"name": "Borealis"}))
        .await;

    // Pagination in the query.
    let first = http.get("/v1/workspaces?pageSize=1").await;
    assert_eq!(first["workspaces"].as_array().unwrap().len(), 1);
    let token = str(&first["nextPageToken"]);
    let second = http
        .get(&format!("/v1/workspaces?pageSize=1&pageToken={token}"))
        .await;
    assert_eq!(second["workspaces"][0]["name"], "Borealis");
    assert!(second.get("nextPageToken").is_none(), "{second}");

    // PATCH: the mask in the query, the etag too; a stale etag is ABORTED → 409.
    let etag = str(&workspace["etag"]);
    let updated = http
        .patch(
            &format!("/v1/workspaces/{id}?updateMask=name,company&etag={etag}"),
            json!({"name": "Atlas 2", "company": "Acme 2", "isPrivate": false}),
        )
        .await;
    assert_eq!(updated["workspace"]["name"], "Atlas 2");
    assert_eq!(updated["workspace"]["isPrivate"], true, "not in the mask");
    http.send(
        Method::PATCH,
        &format!("/v1/workspaces/{id}?updateMask=name&etag={etag}"),
        Some(json!({"name": "late"})),
    )
    .await
    .error(409, "ABORTED", "ETAG_MISMATCH");
    // The mask may also be in the body's JSON form: not for this binding, whose body is
    // the workspace; an unknown field is refused.
    http.send(
        Method::PATCH,
        &format!("/v1/workspaces/{id}"),
        Some(json!({"updateMask": "name"})),
    )
    .await
    .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");

    http.delete(&format!("/v1/workspaces/{id}?force=true"))
        .await;
    http.send(Method::GET, &format!("/v1/workspaces/{id}"), None)
        .await
        .error(404, "NOT_FOUND", "NOT_FOUND");
}

async fn scopes_and_roles_round_trip(backend: Backend) {
    let app = spawn_app(backend).await;
    let http = Http::admin(&app);
    let workspace = app.create_workspace("roles").await.id;
    let scope = http
        .post(
            "/v1/scopes",
            json!({"workspaceId": workspace, "resource": "crm", "action": "read", "description": "d"}),
        )
        .await["scope"]
        .clone();
    let scope_id = str(&scope["id"]);
    assert_eq!(
        http.get(&format!("/v1/scopes/{scope_id}")).await["scope"],
        scope
    );
    let listed = http
        .get(&format!("/v1/scopes?workspaceId={workspace}"))
        .await;
    assert!(
        listed["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == scope["id"])
    );
    let updated = http
        .patch(
            &format!("/v1/scopes/{scope_id}?updateMask=description"),
            json!({"description": "CRM read"}),
        )
        .await;
    assert_eq!(updated["scope"]["description"], "CRM read");

    let role = http
        .post(
            "/v1/roles",
            json!({"workspaceId": workspace, "name": "reader", "scopes": ["crm:read"]}),
        )
        .await["role"]
        .clone();
    let role_id = str(&role["id"]);
    assert_eq!(
        http.get(&format!("/v1/roles/{role_id}")).await["role"],
        role
    );
    let listed = http
        .get(&format!("/v1/roles?workspace_id={workspace}"))
        .await;
    assert_eq!(listed["roles"][0]["id"], role["id"]);
    let updated = http
        .patch(
            &format!("/v1/roles/{role_id}?updateMask=description"),
            json!({"description": "reads"}),
        )
        .await;
    assert_eq!(updated["role"]["description"], "reads");
    http.delete(&format!("/v1/roles/{role_id}?force=true"))
        .await;
    http.delete(&format!("/v1/scopes/{scope_id}?force=true"))
        .await;
    http.send(Method::GET, &format!("/v1/scopes/{scope_id}"), None)
        .await
        .error(404, "NOT_FOUND", "NOT_FOUND");
}

async fn api_keys_round_trip(backend: Backend) {
    let app = spawn_app(backend).await;
    let http = Http::admin(&app);
    let workspace = app.create_workspace("keys").await.id;
    app.create_scope("crm:read", &workspace).await;
    let created = http
        .post(
            "/v1/apiKeys",
            json!({
                "workspaceId": workspace,
                "name": "ci",
                "scopes": ["crm:read"],
                "remainingUses": "10",
                "expireTime": "2099-01-01T00:00:00Z",
            }),
        )
        .await;
    let secret = str(&created["secret"]);
    let key = created["apiKey"].clone();
    let id = str(&key["id"]);
    // int64 as a string, a Timestamp as RFC 3339.
    assert_eq!(key["remainingUses"], "10");
    assert_eq!(key["expireTime"], "2099-01-01T00:00:00Z");
    assert_eq!(
        http.get(&format!("/v1/apiKeys/{id}")).await["apiKey"]["name"],
        "ci"
    );
    let listed = http
        .get(&format!("/v1/apiKeys?workspaceId={workspace}&pageSize=10"))
        .await;
    assert_eq!(listed["apiKeys"][0]["id"], key["id"]);
    let updated = http
        .patch(
            &format!("/v1/apiKeys/{id}?updateMask=name"),
            json!({"name": "ci-2"}),
        )
        .await;
    assert_eq!(updated["apiKey"]["name"], "ci-2");

    let verified = http
        .post(
            "/v1/apiKeys:verify",
            json!({"key": secret, "requiredScopes": ["crm:read"]}),
        )
        .await;
    assert_eq!(verified["code"], "VERIFY_CODE_VALID", "{verified}");
    assert_eq!(verified["valid"], true);
    assert_eq!(verified["remainingUses"], "9");

    let adjusted = http
        .post(
            &format!("/v1/apiKeys/{id}:adjustCredits"),
            json!({"delta": 5}),
        )
        .await;
    assert_eq!(adjusted["apiKey"]["remainingUses"], "14");

    let rotated = http
        .post(
            &format!("/v1/apiKeys/{id}:rotate"),
            json!({"gracePeriod": "0s"}),
        )
        .await;
    let successor = str(&rotated["apiKey"]["id"]);
    let new_secret = str(&rotated["secret"]);
    assert_ne!(successor, id);
    // A custom method with an empty body: no content type needed.
    let revoked = http
        .send(
            Method::POST,
            &format!("/v1/apiKeys/{successor}:revoke"),
            None,
        )
        .await
        .ok();
    assert!(revoked["apiKey"]["revokeTime"].is_string(), "{revoked}");
    let verified = http
        .post("/v1/apiKeys:verify", json!({"key": new_secret}))
        .await;
    assert_eq!(verified["code"], "VERIFY_CODE_REVOKED");

    // Rotating the revoked key is a precondition failure: 400 with its reason.
    http.send(
        Method::POST,
        &format!("/v1/apiKeys/{successor}:rotate"),
        Some(json!({})),
    )
    .await
    .error(400, "FAILED_PRECONDITION", "KEY_REVOKED");

    // The audit log over HTTP, with a filter in the query.
    let events = http
        .get(&format!("/v1/auditEvents?resourceId={successor}"))
        .await;
    assert!(
        events["auditEvents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "api_key.revoke"),
        "{events}"
    );

    http.delete(&format!("/v1/apiKeys/{id}")).await;
    http.send(Method::GET, &format!("/v1/apiKeys/{id}"), None)
        .await
        .error(404, "NOT_FOUND", "NOT_FOUND");
}

async fn malformed_requests_get_clear_errors(backend: Backend) {
    let app = spawn_app(backend).await;
    let http = Http::admin(&app);
    let raw = |method: Method, path: &str| {
        authorize(
            http.client.request(method, format!("{}{path}", http.base)),
            &http.cred,
            None,
        )
    };
    let send = |request: reqwest::RequestBuilder| async move {
        answer(request.send().await.unwrap()).await
    };
    let json_body = |body: &str| {
        raw(Method::POST, "/v1/workspaces")
            .header("content-type", "application/json")
            .body(body.to_owned())
    };

    send(json_body("{\"name\": "))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    send(json_body("{\"name\": \"n\", \"nope\": 1}"))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    send(json_body("{\"name\": 5}"))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    send(json_body("[1]"))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    // A valid request that the handler refuses: the RPC's own error, in JSON.
    let answer = send(json_body(
        "{\"name\": \"n\", \"requestId\": \"not-a-uuid\"}",
    ))
    .await;
    answer.error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT");
    assert_eq!(
        answer.json["error"]["details"][1]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(
        answer.json["error"]["details"][1]["fieldViolations"][0]["field"],
        "request_id"
    );

    let too_large = format!("{{\"name\": \"{}\"}}", "x".repeat(1024 * 1024 + 1));
    send(json_body(&too_large))
        .await
        .error(413, "RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE");
    send(
        raw(Method::POST, "/v1/workspaces")
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await
    .error(415, "INVALID_ARGUMENT", "UNSUPPORTED_MEDIA_TYPE");
    send(raw(Method::GET, "/v1/nothing"))
        .await
        .error(404, "NOT_FOUND", "UNKNOWN_PATH");
    send(raw(Method::GET, "/"))
        .await
        .error(404, "NOT_FOUND", "UNKNOWN_PATH");
    let answer = send(raw(Method::PUT, "/v1/workspaces/x")).await;
    answer.error(405, "UNIMPLEMENTED", "METHOD_NOT_ALLOWED");
    assert_eq!(answer.allow, "GET, PATCH, DELETE");
    send(raw(Method::GET, "/v1/workspaces?pageSize=lots"))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    send(raw(Method::GET, "/v1/workspaces?colour=red"))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    send(raw(Method::DELETE, "/v1/workspaces/x?force=maybe"))
        .await
        .error(400, "INVALID_ARGUMENT", "MALFORMED_REQUEST");
    send(raw(Method::GET, "/v1/workspaces?pageSize=-1"))
        .await
        .error(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT");

    // Credentials are checked as on gRPC.
    Http::new(&app, Cred::None)
        .send(Method::GET, "/v1/workspaces", None)
        .await
        .error(401, "UNAUTHENTICATED", "CREDENTIALS_MISSING");

    // Request ids: the client's is echoed, on success and on errors of either layer.
    for (method, path) in [
        (Method::GET, "/v1/workspaces"),
        (Method::GET, "/v1/workspaces/not-a-uuid"),
        (Method::GET, "/v1/nothing"),
    ] {
        let answer = send(raw(method, path).header("x-request-id", "my-request-1")).await;
        assert_eq!(answer.request_id, "my-request-1", "{path}");
    }
    // A write's audit event carries the id the HTTP answer shows.
    let answer = send(json_body("{\"name\": \"audited\"}")).await;
    let id = str(&answer.json["workspace"]["id"]);
    let events = http.get(&format!("/v1/auditEvents?resourceId={id}")).await;
    assert_eq!(
        events["auditEvents"][0]["requestId"], answer.request_id,
        "{events}"
    );
}

#[test]
fn http2_and_http1_are_both_served() {
    run_test(both_http_versions());
}

async fn both_http_versions() {
    let app = spawn_app(Backend::Sqlite).await;
    let token = match app.admin() {
        Cred::Bearer(token) => token,
        _ => unreachable!(),
    };
    for client in [
        reqwest::Client::builder().http1_only().build().unwrap(),
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ] {
        let response = client
            .get(format!("http://{}/v1/workspaces", app.addr))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let version = response.version();
        let answer = answer(response).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{version:?}: {}",
            answer.json
        );
    }
    // gRPC still works beside it.
    app.create_workspace("grpc").await;
}

#[test]
fn cors_allows_configured_origins_only() {
    run_test(cors());
}

async fn cors() {
    let preflight = |app: &TestApp, origin: &str| {
        reqwest::Client::new()
            .request(
                Method::OPTIONS,
                format!("http://{}/v1/apiKeys:verify", app.addr),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-tenant-id",
            )
            .send()
    };
    let allowed_origin = |response: &reqwest::Response| {
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_owned())
    };

    let db = fresh_database(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.cors_allowed_origins = vec!["https://app.example".into(), "https://b.example".into()];
    let app = spawn_with(db, settings).await;
    let allowed = preflight(&app, "https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed_origin(&allowed).as_deref(),
        Some("https://app.example")
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = allowed.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap();
    assert!(headers.contains("x-tenant-id"), "{headers}");
    let refused = preflight(&app, "https://evil.example").await.unwrap();
    assert_eq!(allowed_origin(&refused), None);
    // A simple request from an allowed origin is answered with the header too.
    let response = reqwest::Client::new()
        .get(format!("http://{}/openapi.json", app.addr))
        .header("origin", "https://b.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        allowed_origin(&response).as_deref(),
        Some("https://b.example")
    );

    // Off by default: no CORS header for anyone.
    let app = spawn_app(Backend::Sqlite).await;
    let response = preflight(&app, "https://app.example").await.unwrap();
    assert_eq!(allowed_origin(&response), None);
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

/// `docs/openapi.json` is the document the server serves. To refresh it after changing
/// the protos: `KEYPLANE_WRITE_OPENAPI=1 cargo test --test api openapi` (or
/// `cargo run -q -- openapi > docs/openapi.json`).
#[test]
fn openapi_document_is_served_and_committed() {
    run_test(openapi_document());
}

async fn openapi_document() {
    let app = spawn_app(Backend::Sqlite).await;
    // No credential needed.
    let response = reqwest::get(format!("http://{}/openapi.json", app.addr))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let served = response.bytes().await.unwrap();
    let document: Value = serde_json::from_slice(&served).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let verify = &document["paths"]["/v1/apiKeys:verify"]["post"];
    assert_eq!(verify["operationId"], "ApiKeyService_VerifyApiKey");
    assert_eq!(
        document["paths"]["/v1/workspaces/{workspace.id}"]["patch"]["parameters"][1]["name"],
        "updateMask"
    );
    assert!(
        document["components"]["schemas"]["keyplane.v1.ApiKey"]["properties"]["expireTime"]
            .is_object()
    );

    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("KEYPLANE_WRITE_OPENAPI").is_some() {
        std::fs::write(&committed, &served).unwrap();
    }
    let on_disk = std::fs::read(&committed).unwrap_or_default();
    assert!(
        on_disk == served,
        "docs/openapi.json is stale: run `KEYPLANE_WRITE_OPENAPI=1 cargo test --test api openapi` \
         (or `cargo run -q -- openapi > docs/openapi.json`) and commit it"
    );
}
