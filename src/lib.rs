//! keyplane: a multi-tenant gRPC control plane for API keys, workspaces and permission
//! scopes. Layers, outermost first: `http` (HTTP/JSON, transcoded into gRPC calls) and
//! `grpc` (transport) → `auth` → `verification` →
//! `storage` → `domain` (pure). Each uses only layers after it, not only the next: `grpc`
//! reads and writes through `storage` directly. `startup` wires them together.
pub mod auth;
pub mod cli;
pub mod config;
pub mod domain;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod proto;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod verification;

pub use startup::Application;
