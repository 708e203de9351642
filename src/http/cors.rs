//! CORS, for browsers calling the HTTP/JSON or gRPC-Web API from another origin: off
//! unless `--cors-allowed-origin` names origins, and then only for those. A preflight from
//! any other origin gets no `access-control-allow-origin`, so the browser refuses it.
use std::time::Duration;

use anyhow::Context;
use http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may cache a preflight answer.
const MAX_AGE: Duration = Duration::from_secs(600);

/// The CORS layer for these origins; `None` when there are none.
pub fn layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|o| {
            HeaderValue::try_from(o.as_str()).with_context(|| format!("invalid CORS origin {o:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let header = HeaderName::from_static;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
            // What the HTTP/JSON and gRPC-Web clients send: credentials, tenant, request
            // id, and gRPC-Web's own.
            .allow_headers([
                http::header::AUTHORIZATION,
                http::header::CONTENT_TYPE,
                header("x-api-key"),
                header("x-tenant-id"),
                header("x-request-id"),
                header("x-grpc-web"),
                header("x-user-agent"),
                header("grpc-timeout"),
            ])
            .expose_headers([
                header("x-request-id"),
                header("grpc-status"),
                header("grpc-message"),
                header("grpc-status-details-bin"),
            ])
            .max_age(MAX_AGE),
    ))
}
