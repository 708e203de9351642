//! Errors over HTTP: the status of the gRPC code (the mapping in the comments of
//! `google/rpc/code.proto`) and Google's JSON error body,
//! `{"error": {"code", "message", "status", "details"}}`, whose details are the
//! `google.rpc.Status` details of the gRPC error (`ErrorInfo`, `BadRequest`, ...) with
//! their `@type`. Errors the HTTP layer finds itself (a path, a method, a body that is not
//! a request) use the same body, with `ErrorInfo` reasons of their own.
use std::collections::HashMap;

use base64::Engine;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http::StatusCode;
use prost_reflect::{DynamicMessage, MessageDescriptor, SerializeOptions};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::grpc::error::DOMAIN;

/// gRPC's binary headers: standard base64, padded or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The HTTP status of a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        // 499 is nginx's "client closed request", as Google uses it.
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// The name of a gRPC code, as `google.rpc.Code` spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A gRPC outcome read from response headers or trailers.
pub struct Outcome {
    pub code: Code,
    pub message: String,
    /// The encoded `google.rpc.Status`, if any.
    pub details: Bytes,
}

impl Outcome {
    /// The `grpc-status` of these headers, with its message and details. Parsed here
    /// rather than with `Status::from_header_map`, which panics on bad base64.
    pub fn from_headers(headers: &http::HeaderMap) -> Option<Self> {
        let code = Code::from_bytes(headers.get("grpc-status")?.as_bytes());
        let message = headers
            .get("grpc-message")
            .map(|m| {
                percent_encoding::percent_decode(m.as_bytes())
                    .decode_utf8_lossy()
                    .into_owned()
            })
            .unwrap_or_default();
        let details = headers
            .get("grpc-status-details-bin")
            .and_then(|d| BASE64.decode(d.as_bytes()).ok())
            .map(Bytes::from)
            .unwrap_or_default();
        Some(Self {
            code,
            message,
            details,
        })
    }
}

impl From<Status> for Outcome {
    fn from(status: Status) -> Self {
        Self {
            code: status.code(),
            message: status.message().to_owned(),
            details: status.details().to_vec().into(),
        }
    }
}

/// An error answered by the HTTP layer itself, before any RPC runs.
pub struct Rejection {
    pub http: StatusCode,
    pub status: Status,
    /// For 405: the methods the path takes.
    pub allow: Vec<http::Method>,
}

impl Rejection {
    fn new(http: StatusCode, code: Code, message: String, reason: &str) -> Self {
        Self::with_details(
            http,
            code,
            message,
            ErrorDetails::with_error_info(reason, DOMAIN, HashMap::new()),
        )
    }

    fn with_details(http: StatusCode, code: Code, message: String, details: ErrorDetails) -> Self {
        Self {
            http,
            status: Status::with_error_details(code, message, details),
            allow: Vec::new(),
        }
    }

    pub fn unknown_path(path: &str) -> Self {
        let details = ErrorDetails::with_error_info(
            "UNKNOWN_PATH",
            DOMAIN,
            HashMap::from([("path".to_owned(), truncate(path))]),
        );
        Self::with_details(
            StatusCode::NOT_FOUND,
            Code::NotFound,
            "no HTTP route has this path; see /openapi.json".into(),
            details,
        )
    }

    pub fn wrong_method(method: &http::Method, allow: Vec<http::Method>) -> Self {
        let names = allow.iter().map(http::Method::as_str).collect::<Vec<_>>();
        let mut rejection = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unimplemented,
            format!(
                "this path does not take {}; it takes {}",
                truncate(method.as_str()),
                names.join(", ")
            ),
            "METHOD_NOT_ALLOWED",
        );
        rejection.allow = allow;
        rejection
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidArgument,
            "a request body must be JSON (content-type: application/json)".into(),
            "UNSUPPORTED_MEDIA_TYPE",
        )
    }

    pub fn too_large(limit: usize) -> Self {
        let status = crate::grpc::error::request_too_large(limit);
        Self {
            http: StatusCode::PAYLOAD_TOO_LARGE,
            status,
            allow: Vec::new(),
        }
    }

    pub fn unreadable_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            Code::InvalidArgument,
            "the request body could not be read".into(),
            "BODY_UNREADABLE",
        )
    }

    /// A body or parameter that is not the request: bad JSON, an unknown field, a wrong
    /// type. `field` is the parameter or field at fault, when known.
    pub fn malformed(message: String, field: Option<&str>) -> Self {
        let mut details = ErrorDetails::with_error_info(
            "MALFORMED_REQUEST",
            DOMAIN,
            field
                .map(|f| HashMap::from([("field".to_owned(), truncate(f))]))
                .unwrap_or_default(),
        );
        if let Some(field) = field {
            details.add_bad_request_violation(truncate(field), message.clone());
        }
        Self::with_details(
            StatusCode::BAD_REQUEST,
            Code::InvalidArgument,
            message,
            details,
        )
    }
}

/// Caps what the client sent before it is echoed in an error.
fn truncate(text: &str) -> String {
    const MAX: usize = 200;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// The JSON error body for `outcome`, answered with the HTTP status `http`.
/// `status_type` is `google.rpc.Status`, from a pool that knows the detail types.
pub fn body(http: StatusCode, outcome: &Outcome, status_type: &MessageDescriptor) -> Vec<u8> {
    let details = DynamicMessage::decode(status_type.clone(), outcome.details.as_ref())
        .ok()
        .and_then(|status| {
            status
                .serialize_with_options(
                    serde_json::value::Serializer,
                    &SerializeOptions::new().skip_default_fields(true),
                )
                .ok()
        })
        .and_then(|mut json| json.get_mut("details").map(serde_json::Value::take))
        .unwrap_or_else(|| serde_json::Value::Array(Vec::new()));
    let body = serde_json::json!({
        "error": {
            "code": http.as_u16(),
            "message": outcome.message,
            "status": code_name(outcome.code),
            "details": details,
        }
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_google_statuses() {
        assert_eq!(http_status(Code::InvalidArgument), 400);
        assert_eq!(http_status(Code::FailedPrecondition), 400);
        assert_eq!(http_status(Code::Unauthenticated), 401);
        assert_eq!(http_status(Code::PermissionDenied), 403);
        assert_eq!(http_status(Code::NotFound), 404);
        assert_eq!(http_status(Code::Aborted), 409);
        assert_eq!(http_status(Code::ResourceExhausted), 429);
        assert_eq!(http_status(Code::Cancelled), 499);
        assert_eq!(http_status(Code::Unimplemented), 501);
        assert_eq!(http_status(Code::Unavailable), 503);
        assert_eq!(http_status(Code::DeadlineExceeded), 504);
    }

    #[test]
    fn details_print_with_their_type() {
        let pool = super::super::descriptors::pool().unwrap();
        let status_type = pool.get_message_by_name("google.rpc.Status").unwrap();
        let rejection = Rejection::malformed("bad".into(), Some("pageSize"));
        let outcome = Outcome::from(rejection.status);
        let json: serde_json::Value =
            serde_json::from_slice(&body(StatusCode::BAD_REQUEST, &outcome, &status_type)).unwrap();
        let error = &json["error"];
        assert_eq!(error["code"], 400);
        assert_eq!(error["status"], "INVALID_ARGUMENT");
        assert_eq!(
            error["details"][0]["@type"],
            "type.googleapis.com/google.rpc.ErrorInfo"
        );
        assert_eq!(error["details"][0]["reason"], "MALFORMED_REQUEST");
        assert_eq!(
            error["details"][1]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(
            error["details"][1]["fieldViolations"][0]["field"],
            "pageSize"
        );
    }
}
