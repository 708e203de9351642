//! The one place where errors become `tonic::Status`: a `google.rpc.Status` with
//! `ErrorInfo` (domain `keyplane.dev`, UPPER_SNAKE_CASE reason, the values involved) and,
//! for validation errors, `BadRequest` with one field violation per bad field.
//! Internal causes go to the log with the call's request id; the client sees only the id.
use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthError;
use crate::domain::rules::RuleViolation;
use crate::domain::validate::ValidationError;
use crate::storage::StoreError;

pub const DOMAIN: &str = "keyplane.dev";

/// Errors that only the transport layer produces.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Rule(#[from] RuleViolation),
    #[error("no caller identity on the request")]
    MissingCaller,
    #[error(transparent)]
    Invalid(#[from] ValidationError),
}

fn status(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: HashMap<String, String>,
) -> Status {
    Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(reason, DOMAIN, metadata),
    )
}

fn meta<const N: usize>(pairs: [(&str, String); N]) -> HashMap<String, String> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// An internal error: logged in full under a fresh request id, answered with only the id.
fn internal(cause: &(dyn std::error::Error + 'static)) -> Status {
    let request_id = super::observe::new_request_id();
    tracing::error!(%request_id, error = %ErrorChain(cause), "internal error");
    let mut details = ErrorDetails::with_error_info(
        "INTERNAL",
        DOMAIN,
        meta([("request_id", request_id.clone())]),
    );
    details.set_request_info(request_id.clone(), "");
    let mut status = Status::with_error_details(
        Code::Internal,
        format!("internal error (request id {request_id})"),
        details,
    );
    // The observing layer logs the failed call under this same id.
    if let Ok(value) = request_id.parse() {
        status
            .metadata_mut()
            .insert(super::observe::REQUEST_ID_HEADER, value);
    }
    status
}

/// Displays an error with its whole `source()` chain, for logs.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl From<ValidationError> for Status {
    fn from(err: ValidationError) -> Self {
        let fields = err
            .violations
            .iter()
            .map(|v| v.field.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut details =
            ErrorDetails::with_error_info("INVALID_ARGUMENT", DOMAIN, meta([("fields", fields)]));
        for v in &err.violations {
            details.add_bad_request_violation(v.field.clone(), v.description.clone());
        }
        Status::with_error_details(Code::InvalidArgument, err.to_string(), details)
    }
}

impl From<AuthError> for Status {
    fn from(err: AuthError) -> Self {
        let message = err.to_string();
        let (code, reason, metadata) = match err {
            AuthError::CredentialsMissing => {
                (Code::Unauthenticated, "CREDENTIALS_MISSING", meta([]))
            }
            AuthError::TokenInvalid => (Code::Unauthenticated, "TOKEN_INVALID", meta([])),
            AuthError::TokenExpired => (Code::Unauthenticated, "TOKEN_EXPIRED", meta([])),
            AuthError::TokenNotYetValid => (Code::Unauthenticated, "TOKEN_NOT_YET_VALID", meta([])),
            AuthError::ApiKeyInvalid => (Code::Unauthenticated, "API_KEY_INVALID", meta([])),
            AuthError::TenantMismatch => (Code::PermissionDenied, "TENANT_MISMATCH", meta([])),
            AuthError::TenantHeaderInvalid => {
                let mut details =
                    ErrorDetails::with_error_info("TENANT_ID_INVALID", DOMAIN, meta([]));
                details.add_bad_request_violation("x-tenant-id", "must be a UUID");
                return Status::with_error_details(Code::InvalidArgument, message, details);
            }
            AuthError::TenantRequired => (Code::InvalidArgument, "TENANT_ID_REQUIRED", meta([])),
            AuthError::MissingScope(scope) => (
                Code::PermissionDenied,
                "MISSING_SCOPE",
                meta([("scope", scope.as_str().to_owned())]),
            ),
            AuthError::ScopeEscalation(scopes) => (
                Code::PermissionDenied,
                "SCOPE_ESCALATION",
                meta([("scopes", scopes.join(" "))]),
            ),
            AuthError::Store(_) => {
                let AuthError::Store(inner) = err else {
                    unreachable!()
                };
                return inner.into();
            }
        };
        status(code, message, reason, metadata)
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        let message = err.to_string();
        match &err {
            StoreError::NotFound { kind, id } => status(
                Code::NotFound,
                format!("{kind} {id} not found"),
                "NOT_FOUND",
                meta([("resource_type", (*kind).to_owned()), ("id", id.clone())]),
            ),
            StoreError::AlreadyExists(_) => {
                status(Code::AlreadyExists, message, "ALREADY_EXISTS", meta([]))
            }
            StoreError::StaleEtag => status(Code::Aborted, message, "ETAG_MISMATCH", meta([])),
            StoreError::Rule(rule) => rule.clone().into(),
            StoreError::UnknownScopes(scopes) => {
                let mut details = ErrorDetails::with_error_info(
                    "UNKNOWN_SCOPE",
                    DOMAIN,
                    meta([("scopes", scopes.join(" "))]),
                );
                for s in scopes {
                    details.add_bad_request_violation(
                        "scopes",
                        format!("scope {s} does not exist for this key or role"),
                    );
                }
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %ErrorChain(cause), "database unavailable");
                database_unavailable()
            }
            StoreError::Metering(why) => {
                tracing::warn!(why, "usage could not be charged");
                database_unavailable()
            }
            // Logged once per outage by the verifier and the health probe, not per call.
            StoreError::NotAnswering(why) => {
                tracing::debug!(why, "database not answering");
                database_unavailable()
            }
            StoreError::Database(_) | StoreError::Corrupt(_) => internal(&err),
        }
    }
}

/// UNAVAILABLE, with a hint to retry in a second.
fn database_unavailable() -> Status {
    let mut details = ErrorDetails::with_error_info("DATABASE_UNAVAILABLE", DOMAIN, meta([]));
    details.set_retry_info(Some(std::time::Duration::from_secs(1)));
    Status::with_error_details(
        Code::Unavailable,
        "the database is unavailable; retry later",
        details,
    )
}

/// The wire form of every domain rule: its code, reason and the values involved.
impl From<RuleViolation> for Status {
    fn from(rule: RuleViolation) -> Self {
        let message = rule.to_string();
        let (code, reason, metadata) = match rule {
            RuleViolation::Invalid(invalid) => return invalid.into(),
            RuleViolation::CreditsUnlimited => {
                (Code::FailedPrecondition, "CREDITS_UNLIMITED", meta([]))
            }
            RuleViolation::KeyRevoked => (Code::FailedPrecondition, "KEY_REVOKED", meta([])),
            RuleViolation::KeyExpired => (Code::FailedPrecondition, "KEY_EXPIRED", meta([])),
            RuleViolation::AlreadyRotated => {
                (Code::FailedPrecondition, "KEY_ALREADY_ROTATED", meta([]))
            }
            RuleViolation::WorkspaceHasKeys(n) => (
                Code::FailedPrecondition,
                "WORKSPACE_HAS_KEYS",
                meta([("key_count", n.to_string())]),
            ),
            RuleViolation::ScopeInUse(n) => (
                Code::FailedPrecondition,
                "SCOPE_IN_USE",
                meta([("key_count", n.to_string())]),
            ),
            RuleViolation::RoleInUse(n) => (
                Code::FailedPrecondition,
                "ROLE_IN_USE",
                meta([("key_count", n.to_string())]),
            ),
            RuleViolation::DelegationExceedsParent { field, .. } => (
                Code::PermissionDenied,
                "DELEGATION_EXCEEDS_PARENT",
                meta([("field", field.to_owned())]),
            ),
            RuleViolation::ParentUnusable(state) => (
                Code::FailedPrecondition,
                "PARENT_KEY_UNUSABLE",
                meta([("state", state)]),
            ),
            RuleViolation::DelegationNeedsKey => {
                (Code::PermissionDenied, "DELEGATION_NEEDS_API_KEY", meta([]))
            }
            RuleViolation::BuiltinReadOnly => {
                (Code::PermissionDenied, "BUILTIN_SCOPE_READ_ONLY", meta([]))
            }
            RuleViolation::BuiltinExists(scope) => (
                Code::AlreadyExists,
                "ALREADY_EXISTS",
                meta([("scope", scope.to_string())]),
            ),
        };
        status(code, message, reason, metadata)
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::Rule(rule) => rule.into(),
            ApiError::MissingCaller => internal(&ApiError::MissingCaller),
            ApiError::Invalid(invalid) => invalid.into(),
        }
    }
}

/// An error of one item of a batch (`ImportApiKeys`): the `google.rpc.Status` the call
/// would have failed with, its fields named within the item (`keys[3].scopes`, where the
/// error named `scopes`).
pub fn item_status(status: &Status, item: &str) -> tonic_types::pb::Status {
    use prost::Message;
    use tonic_types::pb;
    let within = |field: &str| {
        if field.starts_with(item) && field[item.len()..].starts_with('.') {
            field.to_owned()
        } else {
            format!("{item}.{field}")
        }
    };
    let mut rpc = pb::Status::decode(status.details()).unwrap_or_default();
    rpc.code = status.code() as i32;
    rpc.message = status.message().to_owned();
    for any in &mut rpc.details {
        if any.type_url.ends_with("/google.rpc.BadRequest")
            && let Ok(mut bad) = pb::BadRequest::decode(any.value.as_slice())
        {
            for violation in &mut bad.field_violations {
                violation.field = within(&violation.field);
            }
            any.value = bad.encode_to_vec();
        } else if any.type_url.ends_with("/google.rpc.ErrorInfo")
            && let Ok(mut info) = pb::ErrorInfo::decode(any.value.as_slice())
            && let Some(fields) = info.metadata.get_mut("fields")
        {
            *fields = fields.split(',').map(within).collect::<Vec<_>>().join(",");
            any.value = info.encode_to_vec();
        }
    }
    rpc
}

/// Requests above the size limit: tonic reports OUT_OF_RANGE, the gRPC convention  is RESOURCE_EXHAUSTED.
pub fn request_too_large(limit: usize) -> Status {
    status(
        Code::ResourceExhausted,
        format!("request message larger than {limit} bytes"),
        "REQUEST_TOO_LARGE",
        meta([("limit_bytes", limit.to_string())]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    #[test]
    fn an_items_error_names_its_fields_within_the_item() {
        let mut invalid = ValidationError::single("scopes", "unknown");
        invalid.add("keys[3].hint", "bad");
        let status = Status::from(invalid);
        let rpc = item_status(&status, "keys[3]");
        assert_eq!(rpc.code, Code::InvalidArgument as i32);
        let back = Status::with_details(
            Code::InvalidArgument,
            rpc.message.clone(),
            prost::Message::encode_to_vec(&rpc).into(),
        );
        let fields: Vec<String> = back
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["keys[3].scopes", "keys[3].hint"]);
        let info = back.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        assert_eq!(info.metadata["fields"], "keys[3].scopes,keys[3].hint");
        // A plain status: its code and message.
        let rpc = item_status(&Status::already_exists("held"), "keys[0]");
        assert_eq!(
            (rpc.code, rpc.message.as_str()),
            (Code::AlreadyExists as i32, "held")
        );
    }
}
