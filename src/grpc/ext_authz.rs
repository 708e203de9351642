//! `envoy.service.auth.v3.Authorization/Check`: Envoy's external authorization, answered
//! from keyplane's keys. The caller (Envoy) authenticates like any other caller and needs
//! `keyplane.api_keys:verify`; the HTTP request it asks about presents an API key. The
//! handler is thin: [`parse_check`] reads the request and [`respond`] builds the answer,
//! both pure; [`KeyVerifier::verify`](crate::verification::KeyVerifier::verify) decides.
use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpStatus, HttpStatusCode, OkHttpResponse,
};
use envoy_types::ext_authz::v3::{CheckRequestExt, CheckResponseExt};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use tonic::{Code, Request, Status};

use super::convert::RequestCheck;
use super::prepared::{Answer, AnswerKind};
use super::{KeyplaneApi, caller};
use crate::auth::bearer_token;
use crate::domain::key::{ApiKeySecret, ImportedSecret};
use crate::domain::network::ClientAddress;
use crate::domain::permission::PermissionQuery;
use crate::domain::records::{ApiKey, VerifyCode};
use crate::domain::scope::ScopeString;
use crate::domain::standing::Standing;
use crate::domain::usage::{COST_MAX, Cost, LimitState, headline, seconds_until};
use crate::domain::validate::{ValidationError, Validator};
use crate::proto as pb;
use crate::verification::Verification;
use crate::verification::meter::UsageReport;
use crate::verification::queries::ParsedQueries;

/// The route setting (`context_extensions`) naming the scopes a request needs.
pub const REQUIRED_SCOPES: &str = "required_scopes";
/// The route setting (`context_extensions`) naming what a request costs.
pub const COST: &str = "cost";
/// The route setting (`context_extensions`) holding a permission query (SPEC §3.4).
pub const PERMISSION_QUERY: &str = "permission_query";

// The upstream headers keyplane sets on an allowed request.
pub const TENANT_HEADER: &str = "x-keyplane-tenant-id";
pub const WORKSPACE_HEADER: &str = "x-keyplane-workspace-id";
pub const KEY_HEADER: &str = "x-keyplane-key-id";
pub const SCOPES_HEADER: &str = "x-keyplane-scopes";
pub const OWNER_HEADER: &str = "x-keyplane-owner-id";
/// For a delegated key: the root of its chain, and the chain's ids, root first.
pub const ROOT_KEY_HEADER: &str = "x-keyplane-root-key-id";
pub const CHAIN_HEADER: &str = "x-keyplane-delegation-chain";
/// Client-sent headers with this prefix never reach the upstream.
const RESERVED_HEADER_PREFIX: &str = "x-keyplane-";

/// The namespace of the dynamic metadata keyplane emits.
pub const METADATA_NAMESPACE: &str = "keyplane";

/// Where the presented key came from (removed before the request goes upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHeader {
    ApiKey,
    Authorization,
}

impl KeyHeader {
    fn name(self) -> &'static str {
        match self {
            KeyHeader::ApiKey => "x-api-key",
            KeyHeader::Authorization => "authorization",
        }
    }
}

/// What a `Check` asks, read from the `CheckRequest`.
#[derive(Clone, PartialEq, Eq)]
pub struct CheckInput {
    /// The presented key and its header; `None` when the request carries none.
    pub key: Option<(String, KeyHeader)>,
    /// Client headers that carry a keyplane key, to remove on allow.
    pub credential_headers: Vec<KeyHeader>,
    /// Client-sent `x-keyplane-*` header names, to remove on allow unless keyplane sets them.
    pub client_keyplane_headers: Vec<String>,
    pub required: Vec<ScopeString>,
    /// The route's permission query, parsed once per distinct text ([`ParsedQueries`]).
    pub query: Option<Arc<PermissionQuery>>,
    /// What the request costs (`context_extensions["cost"]`), charged exactly as
    /// `VerifyApiKeyRequest.cost`.
    pub cost: u32,
    /// The downstream address Envoy reports (`attributes.source.address`), for the key's
    /// `allowed_cidrs`; never a client-sent header.
    pub client: Option<ClientAddress>,
    /// A bearer value that is not of keyplane's shape but could be an imported key, when
    /// no other key was presented: a key only once the deployment holds imported keys
    /// ([`CheckInput::with_imported_keys`]); until then the upstream's to judge.
    pub other_bearer: Option<String>,
}

impl CheckInput {
    /// The input as read when the deployment holds imported keys: a bearer value of
    /// another shape is the key (and is removed on allow) when nothing else was presented.
    pub fn with_imported_keys(mut self) -> Self {
        if self.key.is_none()
            && let Some(token) = self.other_bearer.take()
        {
            self.key = Some((token, KeyHeader::Authorization));
            self.credential_headers.push(KeyHeader::Authorization);
        }
        self
    }

    pub fn cost(&self) -> Cost {
        // parse_check bounds it; a cost it could not bound charges the most, never nothing.
        Cost::new(u64::from(self.cost)).unwrap_or(Cost::MAX)
    }
}

impl std::fmt::Debug for CheckInput {
    // Never shows the presented key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckInput")
            .field("key_header", &self.key.as_ref().map(|(_, h)| h))
            .field("credential_headers", &self.credential_headers)
            .field("client_keyplane_headers", &self.client_keyplane_headers)
            .field("required", &self.required)
            .field("query", &self.query.as_ref().map(|q| q.to_string()))
            .field("cost", &self.cost)
            .field("client", &self.client)
            .finish()
    }
}

/// The key of an `authorization` value, when it is `Bearer <keyplane key>`; other bearer
/// tokens (a JWT for the upstream, say) are not keyplane's to judge.
fn bearer_key(authorization: &str) -> Option<&str> {
    bearer_token(authorization)
        .ok()
        .filter(|token| ApiKeySecret::parse(token).is_ok())
}

/// The downstream client's IP address as Envoy reports it. Envoy derives it from the
/// connection, or from `x-forwarded-for` only as far as its own `xff_num_trusted_hops`
/// allows; a pipe or an internal address has none.
fn source_address(request: &CheckRequest) -> Option<ClientAddress> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    let address = request
        .attributes
        .as_ref()?
        .source
        .as_ref()?
        .address
        .as_ref()?;
    match address.address.as_ref()? {
        Address::SocketAddress(socket) => ClientAddress::parse(&socket.address).ok(),
        _ => None,
    }
}

/// Reads a `CheckRequest`. A bad route setting (`context_extensions`) is the caller's
/// configuration error: INVALID_ARGUMENT, not a deny.
pub fn parse_check(
    request: &CheckRequest,
    queries: &ParsedQueries,
) -> Result<CheckInput, ValidationError> {
    let mut v = Validator::new();
    let empty = HashMap::new();
    let headers = match request.get_client_headers() {
        Some(headers) => headers,
        None => {
            v.add("attributes.request.http", "is required (an HTTP check)");
            &empty
        }
    };
    let extensions = request
        .attributes
        .as_ref()
        .map(|a| &a.context_extensions)
        .unwrap_or(&empty);

    let api_key = headers.get("x-api-key");
    let bearer = headers.get("authorization").and_then(|a| bearer_key(a));
    let other_bearer = match (api_key, bearer) {
        (None, None) => headers
            .get("authorization")
            .and_then(|a| bearer_token(a).ok())
            .filter(|token| ImportedSecret::digest_of(token).is_ok())
            .map(str::to_owned),
        _ => None,
    };
    let key = match (api_key, bearer) {
        (Some(key), _) => Some((key.clone(), KeyHeader::ApiKey)),
        (None, Some(key)) => Some((key.to_owned(), KeyHeader::Authorization)),
        (None, None) => None,
    };
    let mut credential_headers = Vec::new();
    if api_key.is_some() {
        credential_headers.push(KeyHeader::ApiKey);
    }
    if bearer.is_some() {
        credential_headers.push(KeyHeader::Authorization);
    }
    let mut client_keyplane_headers: Vec<String> = headers
        .keys()
        .filter(|name| {
            name.get(..RESERVED_HEADER_PREFIX.len())
                .is_some_and(|start| start.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
        })
        .cloned()
        .collect();
    client_keyplane_headers.sort();

    let field = |name: &str| format!("attributes.context_extensions.{name}");
    let scopes: Vec<String> = extensions
        .get(REQUIRED_SCOPES)
        .map(|s| s.split_ascii_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let required = v.scopes(&field(REQUIRED_SCOPES), &scopes);
    let query = match extensions.get(PERMISSION_QUERY).map(|q| q.trim()) {
        None | Some("") => None,
        Some(text) => match queries.get(text) {
            Ok(query) => Some(query),
            Err(e) => {
                v.add(field(PERMISSION_QUERY), e.to_string());
                None
            }
        },
    };
    let cost = match extensions.get(COST) {
        None => 1,
        Some(text) => match text.trim().parse::<u32>() {
            Ok(cost) if u64::from(cost) <= COST_MAX => cost,
            _ => {
                v.add(
                    field(COST),
                    format!("must be an integer from 0 to {COST_MAX}"),
                );
                0
            }
        },
    };
    let client = source_address(request);
    v.finish(|| CheckInput {
        client,
        key,
        credential_headers,
        client_keyplane_headers,
        required,
        query,
        cost,
        other_bearer,
    })
}

/// What came of a check.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// The request presented no key.
    NoKey,
    Verified(&'a Verification),
}

impl Outcome<'_> {
    /// The code of the outcome, for the body and the metric. A request without a key is
    /// malformed, as an empty key is for `VerifyApiKey`.
    pub fn code(&self) -> VerifyCode {
        match self {
            Outcome::NoKey => VerifyCode::Malformed,
            Outcome::Verified(v) => v.code,
        }
    }

    pub fn code_name(&self) -> &'static str {
        pb::VerifyCode::from(self.code()).as_str_name()
    }
}

fn header(key: &str, value: impl Into<String>) -> HeaderValueOption {
    #[allow(deprecated)] // `append` is deprecated in favour of `append_action`.
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        // An empty value (a key without scopes) must still overwrite a client's value.
        keep_empty_value: true,
    }
}

fn string(value: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(value.into())),
    }
}

/// The `keyplane` namespace of the dynamic metadata of an allowed request; `stale: true`
/// when the answer came from the cache as it stood before the database stopped answering.
fn metadata(standing: &Standing, chain: &[String], stale: bool) -> Struct {
    let key = &standing.key;
    let list = |items: &[String]| Value {
        kind: Some(Kind::ListValue(ListValue {
            values: items.iter().map(|s| string(s.as_str())).collect(),
        })),
    };
    let mut fields = HashMap::from([
        ("tenant_id".to_owned(), string(key.tenant_id.to_string())),
        (
            "workspace_id".to_owned(),
            string(key.workspace_id.to_string()),
        ),
        ("key_id".to_owned(), string(key.id.to_string())),
        ("scopes".to_owned(), list(&standing.effective)),
    ]);
    if !chain.is_empty() {
        fields.insert("delegation_chain".to_owned(), list(chain));
    }
    if let Some(owner) = &key.owner_id {
        fields.insert("owner_id".to_owned(), string(owner.as_str()));
    }
    if stale {
        let yes = Value {
            kind: Some(Kind::BoolValue(true)),
        };
        fields.insert("stale".to_owned(), yes);
    }
    let namespace = Value {
        kind: Some(Kind::StructValue(Struct { fields })),
    };
    Struct {
        fields: HashMap::from([(METADATA_NAMESPACE.to_owned(), namespace)]),
    }
}

// The `x-ratelimit-*` headers (and `retry-after`) of a response, in delta seconds.
pub const RETRY_AFTER: &str = "retry-after";
pub const RATELIMIT_LIMIT: &str = "x-ratelimit-limit";
pub const RATELIMIT_REMAINING: &str = "x-ratelimit-remaining";
pub const RATELIMIT_RESET: &str = "x-ratelimit-reset";

/// The client-facing headers of an allowed request: the rate limit with the fewest units
/// left (ties: the earliest reset), so a client can slow down before it is refused.
fn rate_headers(usage: Option<&UsageReport>) -> Vec<HeaderValueOption> {
    let Some(usage) = usage else {
        return Vec::new();
    };
    let states: Vec<LimitState> = usage.limits.iter().map(|l| l.state).collect();
    let Some(report) = headline(&states).and_then(|i| usage.limits.get(i)) else {
        return Vec::new();
    };
    vec![
        header(RATELIMIT_LIMIT, report.state.limit.to_string()),
        header(RATELIMIT_REMAINING, report.state.remaining.to_string()),
        header(
            RATELIMIT_RESET,
            seconds_until(report.state.reset_ms, report.db_now_ms).to_string(),
        ),
    ]
}

/// The headers of a 429: when to retry and what ran out. Every 429 carries all four.
/// Credits without a refill come back only by an adjustment (or when another replica
/// returns an idle lease): the limit reads 0 and the retry is the shortest, 1 second —
/// no sooner than this replica asks the database again.
fn exhausted_headers(verification: &Verification) -> Vec<HeaderValueOption> {
    let usage = verification.usage.as_ref();
    let (limit, remaining, reset) = match verification.code {
        VerifyCode::RateLimited => {
            match usage.and_then(|u| u.limits.iter().find(|l| l.state.exceeded)) {
                Some(report) => (
                    report.state.limit,
                    report.state.remaining,
                    seconds_until(report.state.reset_ms, report.db_now_ms),
                ),
                // An ancestor's limit refused a delegated key: its state is the ancestor's
                // to know; the client learns only to come back.
                None => (0, 0, 1),
            }
        }
        _ => match usage.and_then(|u| u.credits) {
            Some(credits) => match (credits.refill_amount, credits.reset_ms) {
                (Some(amount), Some(reset_ms)) => (
                    amount,
                    credits.remaining,
                    seconds_until(reset_ms, credits.db_now_ms),
                ),
                _ => (0, credits.remaining, 1),
            },
            None => (0, 0, 1),
        },
    };
    vec![
        header(RETRY_AFTER, reset.to_string()),
        header(RATELIMIT_LIMIT, limit.to_string()),
        header(RATELIMIT_REMAINING, remaining.to_string()),
        header(RATELIMIT_RESET, reset.to_string()),
    ]
}

fn allow(standing: &Standing, input: &CheckInput, verification: &Verification) -> CheckResponse {
    let key = &standing.key;
    let usage = verification.usage.as_ref();
    let mut headers = vec![
        header(TENANT_HEADER, key.tenant_id.to_string()),
        header(WORKSPACE_HEADER, key.workspace_id.to_string()),
        header(KEY_HEADER, key.id.to_string()),
        header(SCOPES_HEADER, standing.effective.join(" ")),
    ];
    if let Some(owner) = &key.owner_id {
        headers.push(header(OWNER_HEADER, owner.as_str()));
    }
    let chain: Vec<String> = standing
        .delegation_chain()
        .iter()
        .map(ToString::to_string)
        .collect();
    if let Some(root) = chain.first() {
        headers.push(header(ROOT_KEY_HEADER, root.as_str()));
        headers.push(header(CHAIN_HEADER, chain.join(" ")));
    }
    // Envoy applies removals after the headers above, so only what keyplane does not set
    // is removed: the credentials and any other client-sent x-keyplane-* header.
    let set: Vec<&str> = headers
        .iter()
        .filter_map(|h| h.header.as_ref().map(|h| h.key.as_str()))
        .collect();
    let mut headers_to_remove: Vec<String> = input
        .credential_headers
        .iter()
        .map(|h| h.name().to_owned())
        .collect();
    headers_to_remove.extend(
        input
            .client_keyplane_headers
            .iter()
            .filter(|name| !set.iter().any(|s| s.eq_ignore_ascii_case(name)))
            .cloned(),
    );
    let mut response = CheckResponse::with_status(Status::ok("allowed"));
    response
        .set_dynamic_metadata(Some(metadata(standing, &chain, verification.stale)))
        .set_http_response(OkHttpResponse {
            headers,
            headers_to_remove,
            response_headers_to_add: rate_headers(usage),
            ..Default::default()
        });
    response
}

fn deny(code: Code, http: HttpStatusCode, name: &str, message: &str) -> CheckResponse {
    deny_with(code, http, name, message, Vec::new())
}

fn deny_with(
    code: Code,
    http: HttpStatusCode,
    name: &str,
    message: &str,
    extra: Vec<HeaderValueOption>,
) -> CheckResponse {
    let body = serde_json::json!({ "code": name, "message": message }).to_string();
    let mut headers = vec![header("content-type", "application/json")];
    if http == HttpStatusCode::Unauthorized {
        headers.push(header("www-authenticate", "ApiKey"));
    }
    headers.extend(extra);
    let mut response = CheckResponse::with_status(Status::new(code, message));
    response.set_http_response(DeniedHttpResponse {
        status: Some(HttpStatus { code: http.into() }),
        headers,
        body,
    });
    response
}

/// The answer to Envoy: allow with the key's identity, or a JSON deny. Never holds the key.
pub fn respond(outcome: Outcome<'_>, input: &CheckInput) -> CheckResponse {
    let unauthenticated = |message: &str| {
        deny(
            Code::Unauthenticated,
            HttpStatusCode::Unauthorized,
            outcome.code_name(),
            message,
        )
    };
    let verification = match outcome {
        Outcome::NoKey => {
            return unauthenticated(
                "no API key: send it in x-api-key or as authorization: Bearer <key>",
            );
        }
        Outcome::Verified(v) => v,
    };
    match (verification.code, &verification.standing) {
        (VerifyCode::Valid, Some(standing)) => allow(standing, input, verification),
        // A valid verdict without its key cannot happen; fail closed all the same.
        (VerifyCode::Valid, None) => unauthenticated("the API key is not valid"),
        (VerifyCode::Malformed, _) => unauthenticated("the API key is malformed"),
        (VerifyCode::NotFound, _) => unauthenticated("the API key is not known"),
        (VerifyCode::Revoked, _) => unauthenticated("the API key has been revoked"),
        (VerifyCode::Expired, _) => unauthenticated("the API key has expired"),
        (VerifyCode::Disabled, _) => unauthenticated("the API key is disabled"),
        (VerifyCode::RateLimited | VerifyCode::UsageExceeded, standing) => deny_with(
            Code::ResourceExhausted,
            HttpStatusCode::TooManyRequests,
            outcome.code_name(),
            &exhausted_message(verification, standing.as_deref().map(|s| &s.key)),
            exhausted_headers(verification),
        ),
        (VerifyCode::IpNotAllowed, _) => deny(
            Code::PermissionDenied,
            HttpStatusCode::Forbidden,
            outcome.code_name(),
            "the API key may not be used from this address",
        ),
        (VerifyCode::InsufficientScopes, _) => deny(
            Code::PermissionDenied,
            HttpStatusCode::Forbidden,
            outcome.code_name(),
            &format!(
                "the API key lacks the scopes: {}",
                verification.missing.join(" ")
            ),
        ),
    }
}

/// What a 429's body says: which limit refused, or that the credits ran out.
fn exhausted_message(verification: &Verification, key: Option<&ApiKey>) -> String {
    let refused = verification
        .usage
        .as_ref()
        .and_then(|u| u.limits.iter().position(|l| l.state.exceeded))
        .and_then(|i| key.and_then(|k| k.rate_limits.iter().nth(i)));
    match (verification.code, refused) {
        (VerifyCode::RateLimited, Some(limit)) => {
            format!("rate limit \"{}\" exceeded", limit.name())
        }
        (VerifyCode::RateLimited, None) => "rate limit exceeded".to_owned(),
        _ if key.is_some_and(|k| k.successor_id.is_some()) => {
            "the API key was rotated: its successor spends its credits".to_owned()
        }
        _ => "the API key has no remaining uses for this request".to_owned(),
    }
}

impl KeyplaneApi {
    /// Envoy's `Check`: the request read, the key verified, the answer built — or, for an
    /// allow that depends on nothing but the key and the headers it came in, the answer
    /// prepared for this key before ([`super::prepared`]).
    pub(super) async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Answer<CheckResponse>, Status> {
        let caller = caller(&request)?;
        let mut input = parse_check(request.get_ref(), &self.queries)?;
        if self.verifier.holds_imported_keys() {
            input = input.with_imported_keys();
        }
        let verification = match &input.key {
            None => None,
            Some((key, _)) => {
                match self
                    .verifier
                    .verify(
                        caller.access,
                        key,
                        input.client,
                        &input.required,
                        input.query.as_deref(),
                        input.cost(),
                    )
                    .await
                {
                    Ok(verification) => Some(verification),
                    Err(err) => {
                        // Never an allow when keyplane cannot tell: Envoy denies on an error
                        // (with failure_mode_allow off).
                        let code = match err {
                            crate::storage::StoreError::Unavailable(_)
                            | crate::storage::StoreError::NotAnswering(_)
                            | crate::storage::StoreError::Metering(_) => "unavailable",
                            _ => "internal",
                        };
                        metrics::counter!("keyplane_check_total", "code" => code).increment(1);
                        return Err(err.into());
                    }
                }
            }
        };
        let outcome = verification
            .as_ref()
            .map_or(Outcome::NoKey, Outcome::Verified);
        self.checks.count(outcome.code());
        if let Some(v) = &verification
            && let Some(standing) = &v.standing
            && v.code == VerifyCode::Valid
            && v.usage.is_none()
            && !v.stale
            && input.client_keyplane_headers.is_empty()
        {
            let kind = AnswerKind::CheckAllow(credential_bits(&input.credential_headers));
            let bytes = self
                .prepared
                .get_or_prepare(standing, kind, || respond(outcome, &input));
            return Ok(Answer::Prepared(bytes, None));
        }
        Ok(Answer::Built(respond(outcome, &input)))
    }
}

/// The credential headers an allow removes, as the bits of a prepared answer's kind.
fn credential_bits(headers: &[KeyHeader]) -> u8 {
    headers.iter().fold(0, |bits, h| {
        bits | match h {
            KeyHeader::ApiKey => 1,
            KeyHeader::Authorization => 2,
        }
    })
}

#[cfg(test)]
mod tests {
    use envoy_types::ext_authz::v3::pb::HttpResponse;
    use envoy_types::pb::envoy::service::auth::v3::{
        AttributeContext, attribute_context::HttpRequest, attribute_context::Request as AttrRequest,
    };

    use super::*;
    use crate::domain::key::KeyPrefix;

    fn secret() -> String {
        ApiKeySecret::generate(&KeyPrefix::default_prefix())
            .unwrap()
            .expose()
            .to_owned()
    }

    fn request(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: extensions
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
        }
    }

    fn key(owner: Option<&str>) -> ApiKey {
        let mut key = ApiKey {
            scopes: vec!["crm:read".into(), "erp:*".into()],
            owner_id: owner.map(str::to_owned),
            ..ApiKey::fixture()
        };
        key.bind_budgets();
        key
    }

    fn verified(code: VerifyCode, key: Option<ApiKey>, missing: &[&str]) -> Verification {
        Verification {
            code,
            standing: key.map(|k| std::sync::Arc::new(Standing::plain(k))),
            missing: missing.iter().map(|s| s.to_string()).collect(),
            usage: None,
            stale: false,
        }
    }

    fn queries() -> ParsedQueries {
        ParsedQueries::new(16)
    }

    #[test]
    fn a_route_may_set_a_permission_query() {
        let q = "crm:read AND (crm:write OR billing:*)";
        let input = parse_check(&request(&[], &[("permission_query", q)]), &queries()).unwrap();
        assert_eq!(input.query.unwrap().to_string(), q);
        let input = parse_check(&request(&[], &[("permission_query", " ")]), &queries()).unwrap();
        assert!(input.query.is_none());
        let bad = parse_check(
            &request(&[], &[("permission_query", "crm:read AND")]),
            &queries(),
        );
        assert_eq!(
            fields(bad.unwrap_err()),
            ["attributes.context_extensions.permission_query"]
        );
    }

    fn fields(e: ValidationError) -> Vec<String> {
        e.violations.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn reads_the_key_from_x_api_key_first_then_a_bearer_keyplane_key() {
        let k = secret();
        let bearer = format!("Bearer {k}");
        let input = parse_check(&request(&[("x-api-key", "abc")], &[]), &queries()).unwrap();
        assert_eq!(input.key, Some(("abc".into(), KeyHeader::ApiKey)));
        assert_eq!(input.credential_headers, vec![KeyHeader::ApiKey]);

        let input = parse_check(&request(&[("authorization", &bearer)], &[]), &queries()).unwrap();
        assert_eq!(input.key, Some((k.clone(), KeyHeader::Authorization)));
        assert_eq!(input.credential_headers, vec![KeyHeader::Authorization]);

        // Both: x-api-key decides, and both are removed on allow.
        let input = parse_check(
            &request(&[("x-api-key", "x"), ("authorization", &bearer)], &[]),
            &queries(),
        )
        .unwrap();
        assert_eq!(input.key.unwrap().1, KeyHeader::ApiKey);
        assert_eq!(
            input.credential_headers,
            vec![KeyHeader::ApiKey, KeyHeader::Authorization]
        );

        // A bearer that is not a keyplane key (a JWT, a typo) is not a key at all.
        for other in [
            "Bearer eyJhbGciOi.x.y",
            "Basic dXNlcjpwYXNz",
            "Bearer kp_short",
        ] {
            let input =
                parse_check(&request(&[("authorization", other)], &[]), &queries()).unwrap();
            assert_eq!(input.key, None, "{other}");
            assert!(input.credential_headers.is_empty());
        }
        assert!(
            !format!(
                "{input:?}",
                input =
                    parse_check(&request(&[("authorization", &bearer)], &[]), &queries()).unwrap()
            )
            .contains(&k)
        );
    }

    #[test]
    fn a_bearer_of_another_shape_is_a_key_only_with_imported_keys() {
        let legacy = "Bearer sk_live_0123456789abcdef";
        let input = parse_check(&request(&[("authorization", legacy)], &[]), &queries()).unwrap();
        assert_eq!(input.key, None, "no imported keys: not a key");
        assert!(input.credential_headers.is_empty());
        let input = input.with_imported_keys();
        assert_eq!(
            input.key,
            Some((
                "sk_live_0123456789abcdef".to_owned(),
                KeyHeader::Authorization
            ))
        );
        assert_eq!(input.credential_headers, vec![KeyHeader::Authorization]);
        assert!(!format!("{input:?}").contains("0123456789"));
        // x-api-key decides, and the upstream keeps its own bearer token.
        let input = parse_check(
            &request(
                &[("x-api-key", "legacy-key-1"), ("authorization", legacy)],
                &[],
            ),
            &queries(),
        )
        .unwrap()
        .with_imported_keys();
        assert_eq!(input.key.unwrap().0, "legacy-key-1");
        assert_eq!(input.credential_headers, vec![KeyHeader::ApiKey]);
        // Too short or too long to be any key.
        for other in ["Bearer short", &format!("Bearer {}", "x".repeat(513))] {
            let input = parse_check(&request(&[("authorization", other)], &[]), &queries())
                .unwrap()
                .with_imported_keys();
            assert_eq!(input.key, None, "{other}");
        }
    }

    #[test]
    fn reads_route_settings() {
        let input = parse_check(&request(&[], &[]), &queries()).unwrap();
        assert_eq!((input.required.len(), input.cost), (0, 1));
        let input = parse_check(
            &request(
                &[("X-Keyplane-Tenant-Id", "t"), ("x-other", "o")],
                &[
                    ("required_scopes", " crm:read  erp:write crm:read "),
                    ("cost", "1000"),
                ],
            ),
            &queries(),
        )
        .unwrap();
        let required: Vec<&str> = input.required.iter().map(|s| s.as_str()).collect();
        assert_eq!(required, ["crm:read", "erp:write"]);
        assert_eq!(input.cost, 1000);
        assert_eq!(input.client_keyplane_headers, ["X-Keyplane-Tenant-Id"]);
        assert_eq!(
            parse_check(&request(&[], &[("cost", "0")]), &queries())
                .unwrap()
                .cost,
            0
        );
    }

    #[test]
    fn bad_route_settings_are_invalid_arguments() {
        for cost in ["1001", "-1", "1.5", "", "ten"] {
            assert_eq!(
                fields(parse_check(&request(&[], &[("cost", cost)]), &queries()).unwrap_err()),
                ["attributes.context_extensions.cost"],
                "{cost}"
            );
        }
        assert_eq!(
            fields(
                parse_check(
                    &request(&[], &[("required_scopes", "crm:read nope")]),
                    &queries()
                )
                .unwrap_err()
            ),
            ["attributes.context_extensions.required_scopes"]
        );
        assert_eq!(
            fields(parse_check(&CheckRequest::default(), &queries()).unwrap_err()),
            ["attributes.request.http"]
        );
    }

    fn ok(response: &CheckResponse) -> &OkHttpResponse {
        assert_eq!(response.status.as_ref().unwrap().code, 0);
        match &response.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok,
            other => panic!("not an allow: {other:?}"),
        }
    }

    fn set_headers(ok: &OkHttpResponse) -> HashMap<String, String> {
        ok.headers
            .iter()
            .map(|h| {
                assert_eq!(
                    h.append_action,
                    i32::from(HeaderAppendAction::OverwriteIfExistsOrAdd)
                );
                let h = h.header.as_ref().unwrap();
                (h.key.clone(), h.value.clone())
            })
            .collect()
    }

    #[test]
    fn allow_sets_identity_headers_and_removes_credentials_and_client_keyplane_headers() {
        let k = key(Some("user-7"));
        let input = parse_check(
            &request(
                &[
                    ("x-api-key", &secret()),
                    ("x-keyplane-tenant-id", "forged"),
                    ("x-keyplane-extra", "forged"),
                ],
                &[],
            ),
            &queries(),
        )
        .unwrap();
        let response = respond(
            Outcome::Verified(&verified(VerifyCode::Valid, Some(k.clone()), &[])),
            &input,
        );
        let ok = ok(&response);
        let set = set_headers(ok);
        assert_eq!(set[TENANT_HEADER], k.tenant_id.to_string());
        assert_eq!(set[WORKSPACE_HEADER], k.workspace_id.to_string());
        assert_eq!(set[KEY_HEADER], k.id.to_string());
        assert_eq!(set[SCOPES_HEADER], "crm:read erp:*");
        assert_eq!(set[OWNER_HEADER], "user-7");
        assert_eq!(ok.headers_to_remove, ["x-api-key", "x-keyplane-extra"]);

        let meta = &response.dynamic_metadata.as_ref().unwrap().fields[METADATA_NAMESPACE];
        let Some(Kind::StructValue(meta)) = &meta.kind else {
            panic!("not a struct")
        };
        let text = |name: &str| match &meta.fields[name].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(text("tenant_id"), k.tenant_id.to_string());
        assert_eq!(text("workspace_id"), k.workspace_id.to_string());
        assert_eq!(text("key_id"), k.id.to_string());
        assert_eq!(text("owner_id"), "user-7");
        let Some(Kind::ListValue(scopes)) = &meta.fields["scopes"].kind else {
            panic!("scopes not a list")
        };
        assert_eq!(scopes.values.len(), 2);
    }

    #[test]
    fn allow_without_owner_removes_a_client_owner_header_and_a_bearer_credential() {
        let bearer = format!("Bearer {}", secret());
        let input = parse_check(
            &request(
                &[
                    ("authorization", &bearer),
                    ("x-keyplane-owner-id", "forged"),
                ],
                &[],
            ),
            &queries(),
        )
        .unwrap();
        let response = respond(
            Outcome::Verified(&verified(VerifyCode::Valid, Some(key(None)), &[])),
            &input,
        );
        let ok = ok(&response);
        assert!(!set_headers(ok).contains_key(OWNER_HEADER));
        assert_eq!(ok.headers_to_remove, ["authorization", OWNER_HEADER]);
    }

    fn denied(response: &CheckResponse) -> (i32, u16, HashMap<String, String>, serde_json::Value) {
        let Some(HttpResponse::DeniedResponse(d)) = &response.http_response else {
            panic!("not a deny: {response:?}")
        };
        let headers = d
            .headers
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.clone(), h.value.clone())
            })
            .collect();
        (
            response.status.as_ref().unwrap().code,
            d.status.as_ref().unwrap().code as u16,
            headers,
            serde_json::from_str(&d.body).unwrap(),
        )
    }

    #[test]
    fn denies_map_to_401_or_403_with_a_json_body() {
        let input = parse_check(&request(&[("x-api-key", "whatever")], &[]), &queries()).unwrap();
        let cases = [
            (None, "VERIFY_CODE_MALFORMED"),
            (
                Some(verified(VerifyCode::Malformed, None, &[])),
                "VERIFY_CODE_MALFORMED",
            ),
            (
                Some(verified(VerifyCode::NotFound, None, &[])),
                "VERIFY_CODE_NOT_FOUND",
            ),
            (
                Some(verified(VerifyCode::Revoked, Some(key(None)), &[])),
                "VERIFY_CODE_REVOKED",
            ),
            (
                Some(verified(VerifyCode::Expired, Some(key(None)), &[])),
                "VERIFY_CODE_EXPIRED",
            ),
            (
                Some(verified(VerifyCode::Disabled, Some(key(None)), &[])),
                "VERIFY_CODE_DISABLED",
            ),
            (
                Some(verified(VerifyCode::Valid, None, &[])),
                "VERIFY_CODE_VALID",
            ),
        ];
        for (outcome, name) in cases {
            let outcome = outcome.as_ref().map_or(Outcome::NoKey, Outcome::Verified);
            let (grpc, http, headers, body) = denied(&respond(outcome, &input));
            assert_eq!(grpc, Code::Unauthenticated as i32, "{name}");
            assert_eq!(http, 401, "{name}");
            assert_eq!(headers["www-authenticate"], "ApiKey");
            assert_eq!(headers["content-type"], "application/json");
            assert_eq!(body["code"], name);
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let short = verified(
            VerifyCode::InsufficientScopes,
            Some(key(None)),
            &["erp:write"],
        );
        let outcome = Outcome::Verified(&short);
        let (grpc, http, headers, body) = denied(&respond(outcome, &input));
        assert_eq!((grpc, http), (Code::PermissionDenied as i32, 403));
        assert!(!headers.contains_key("www-authenticate"));
        assert_eq!(body["code"], "VERIFY_CODE_INSUFFICIENT_SCOPES");
        assert!(body["message"].as_str().unwrap().contains("erp:write"));
        assert!(respond(outcome, &input).dynamic_metadata.is_none());
    }

    fn report(limits: &[(u64, u64, bool)], credits: Option<(u64, Option<u64>)>) -> UsageReport {
        use crate::verification::meter::{CreditReport, LimitReport};
        let db_now_ms = 1_800_000_000_000;
        UsageReport {
            limits: limits
                .iter()
                .enumerate()
                .map(|(i, (limit, remaining, exceeded))| LimitReport {
                    state: LimitState {
                        limit: *limit,
                        remaining: *remaining,
                        // 2.5 s, then 10.5 s away: rounded up to whole seconds.
                        reset_ms: db_now_ms + 2_500 + 8_000 * i as i64,
                        exceeded: *exceeded,
                    },
                    db_now_ms,
                })
                .collect(),
            credits: credits.map(|(remaining, refill)| CreditReport {
                remaining,
                reset_ms: refill.map(|_| db_now_ms + 60_000),
                refill_amount: refill,
                db_now_ms,
            }),
        }
    }

    /// A verification of a key whose limits are named l0, l1 … as the report's.
    fn with_usage(code: VerifyCode, usage: UsageReport) -> Verification {
        use crate::domain::usage::{Period, RateLimit, RateLimitName, RateLimits};
        let mut k = key(None);
        k.rate_limits = RateLimits::new(
            usage
                .limits
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let name = RateLimitName::parse(&format!("l{i}")).unwrap();
                    let period = Period::rate_limit_ms(10_000).unwrap();
                    RateLimit::new(name, l.state.limit, period, false).unwrap()
                })
                .collect(),
        )
        .unwrap();
        Verification {
            usage: Some(usage),
            ..verified(code, Some(k), &[])
        }
    }

    fn response_headers(ok: &OkHttpResponse) -> HashMap<String, String> {
        ok.response_headers_to_add
            .iter()
            .map(|h| {
                let h = h.header.as_ref().unwrap();
                (h.key.clone(), h.value.clone())
            })
            .collect()
    }

    #[test]
    fn exhausted_usage_is_a_429_with_when_to_retry() {
        let input = parse_check(&request(&[("x-api-key", "whatever")], &[]), &queries()).unwrap();
        let limited = with_usage(
            VerifyCode::RateLimited,
            report(&[(100, 40, false), (10, 0, true)], Some((7, None))),
        );
        let (grpc, http, headers, body) = denied(&respond(Outcome::Verified(&limited), &input));
        assert_eq!((grpc, http), (Code::ResourceExhausted as i32, 429));
        assert_eq!(body["code"], "VERIFY_CODE_RATE_LIMITED");
        assert!(
            body["message"].as_str().unwrap().contains("\"l1\""),
            "{body}"
        );
        assert_eq!(headers[RETRY_AFTER], "11");
        assert_eq!(headers[RATELIMIT_RESET], "11");
        assert_eq!(headers[RATELIMIT_LIMIT], "10");
        assert_eq!(headers[RATELIMIT_REMAINING], "0");
        assert!(!headers.contains_key("www-authenticate"));

        let refill = with_usage(VerifyCode::UsageExceeded, report(&[], Some((2, Some(500)))));
        let (_, http, headers, body) = denied(&respond(Outcome::Verified(&refill), &input));
        assert_eq!(http, 429);
        assert_eq!(body["code"], "VERIFY_CODE_USAGE_EXCEEDED");
        assert_eq!(headers[RETRY_AFTER], "60");
        assert_eq!(headers[RATELIMIT_LIMIT], "500");
        assert_eq!(headers[RATELIMIT_REMAINING], "2");

        let spent = with_usage(VerifyCode::UsageExceeded, report(&[], Some((0, None))));
        let (_, _, headers, _) = denied(&respond(Outcome::Verified(&spent), &input));
        assert_eq!(headers[RETRY_AFTER], "1");
        assert_eq!(headers[RATELIMIT_LIMIT], "0");
        assert_eq!(headers[RATELIMIT_REMAINING], "0");
        assert_eq!(headers[RATELIMIT_RESET], "1");
    }

    #[test]
    fn an_allow_tells_the_client_about_its_tightest_limit() {
        let input = parse_check(&request(&[("x-api-key", "whatever")], &[]), &queries()).unwrap();
        let fine = with_usage(
            VerifyCode::Valid,
            report(&[(100, 40, false), (10, 3, false)], None),
        );
        let response = respond(Outcome::Verified(&fine), &input);
        let headers = response_headers(ok(&response));
        assert_eq!(headers[RATELIMIT_LIMIT], "10");
        assert_eq!(headers[RATELIMIT_REMAINING], "3");
        assert_eq!(headers[RATELIMIT_RESET], "11");
        assert!(!headers.contains_key(RETRY_AFTER));
        // Not upstream: these are for the client.
        assert!(!set_headers(ok(&response)).contains_key(RATELIMIT_LIMIT));

        let plain = verified(VerifyCode::Valid, Some(key(None)), &[]);
        let response = respond(Outcome::Verified(&plain), &input);
        assert!(ok(&response).response_headers_to_add.is_empty());
    }
}
