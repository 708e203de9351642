//! keyplane's integration-test kit. Every test starts the real server on 127.0.0.1:0 over a
//! fresh database (a temporary SQLite file, or a new PostgreSQL database when
//! `KEYPLANE_TEST_POSTGRES_URL` is set) and calls it through typed clients that carry a
//! credential ([`TestApp::client`]). Every test logs at debug level through a scanner that
//! fails it if its server logged a secret, or wrote one into an audit row.
//!
//! By concern:
//! - [`app`]: databases, servers ([`TestApp`]) and the admin's actions on them, and the
//!   SQLite + PostgreSQL test pairs ([`on_both_backends!`]);
//! - [`client`]: credentials and tokens, the typed [`Client`] and its actions
//!   ([`Client::verify`], [`Client::revoke_key`], [`Client::disable_key`]), request
//!   builders;
//! - [`assertions`]: error codes, `ErrorInfo` reasons, field violations, secret shapes;
//! - [`leaks`]: the secret-leak scanner and [`run_test`], which files what a test's server
//!   logs under that test;
//! - [`replicas`]: several servers on one PostgreSQL database, and waits on health;
//! - [`proxy`]: a TCP proxy in front of PostgreSQL that a test can cut.
//!
//! Everything is re-exported here: a test crate says `use keyplane_testkit::*;`.
pub mod app;
pub mod assertions;
pub mod client;
pub mod leaks;
pub mod proxy;
pub mod replicas;

pub use app::*;
pub use assertions::*;
pub use client::*;
pub use leaks::*;
pub use proxy::*;
pub use replicas::*;
