//! The request size limit (1 MiB). tonic enforces it while decoding and answers
//! OUT_OF_RANGE; the gRPC convention for "too large" is RESOURCE_EXHAUSTED, which
//! [`resource_exhausted`] restores on the way out.
use tonic::body::Body;

use super::error;

/// Largest request message accepted.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Rewrites tonic's OUT_OF_RANGE to RESOURCE_EXHAUSTED. keyplane's handlers never use
/// OUT_OF_RANGE, so any such response is the size limit.
pub fn resource_exhausted(response: http::Response<Body>) -> http::Response<Body> {
    let out_of_range = response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    if out_of_range {
        error::request_too_large(MAX_REQUEST_BYTES).into_http()
    } else {
        response
    }
}
