//! Integration tests: the real server, real sockets, real SQL (SQLite always, PostgreSQL
//! when `KEYPLANE_TEST_POSTGRES_URL` is set), through the test kit (`testkit/`,
//! `keyplane_testkit`).
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod allowed_cidrs;
mod api_keys;
mod audit;
mod auth;
mod cache;
mod connection_limits;
mod delegation;
mod grpc_web;
mod http_json;
mod import;
mod isolation;
mod key_policy;
mod key_roles;
mod leaks;
mod lifecycle;
mod matrix;
mod permission_queries;
mod races;
mod roles;
mod scopes;
mod usage;
mod verify;
mod workspaces;
