//! Assertions on calls that fail (the code, the `ErrorInfo` reason and its domain, the
//! fields a `BadRequest` names) and on secrets (their shape; never shown again).
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The `ErrorInfo.reason` of an error status (empty when there is none).
pub fn reason(status: &Status) -> String {
    status
        .get_details_error_info()
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// A value of the `ErrorInfo.metadata` of a status (empty when there is none).
pub fn reason_metadata(status: &Status, key: &str) -> String {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get(key).cloned())
        .unwrap_or_default()
}

/// Asserts that a call failed with this code and `ErrorInfo` reason, in the right domain.
#[track_caller]
pub fn assert_err<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
) -> Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_details_error_info()
        .expect("ErrorInfo in the status details");
    assert_eq!(info.reason, expected_reason, "{status:?}");
    assert_eq!(info.domain, "keyplane.dev");
    status
}

/// Like [`assert_err`], naming the case that failed.
#[track_caller]
pub fn refused<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
    what: &str,
) -> Status {
    match result {
        Err(status) if status.code() == code && reason(&status) == expected_reason => {
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.domain, "keyplane.dev", "{what}");
            status
        }
        other => panic!("{what}: expected {code:?} {expected_reason}, got {other:?}"),
    }
}

/// Asserts an INVALID_ARGUMENT whose BadRequest names exactly `fields`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, fields: &[&str], why: &str) {
    let status = result.expect_err(why);
    assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("INVALID_ARGUMENT".to_string()),
        "{why}: {status:?}"
    );
    assert_eq!(violated_fields(&status), fields, "{why}: {status:?}");
}

/// The fields named by the `BadRequest` details of a status.
pub fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// Asserts the documented shape of a fresh secret: the prefix, its own separator (`-` for
/// a prefix written with `-`, else `_`) and 49 base62 characters.
#[track_caller]
pub fn assert_secret_shape(secret: &str, prefix: &str) {
    let separator = if prefix.contains('-') { '-' } else { '_' };
    let body = secret
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(separator))
        .unwrap_or_else(|| panic!("{secret:?} does not start with {prefix}{separator}"));
    assert_eq!(body.len(), 49, "body of {secret:?}");
    assert!(
        body.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{secret:?} is not base62"
    );
}

/// Asserts that the body of `secret` does not appear in the debug form of `what`.
#[track_caller]
pub fn assert_no_secret(what: &impl std::fmt::Debug, secret: &str) {
    let shown = format!("{what:?}");
    // The body alone (without the prefix) is what must never travel again.
    assert!(
        !shown.contains(&secret[secret.len() - 49..]),
        "the secret leaked into {shown}"
    );
}
