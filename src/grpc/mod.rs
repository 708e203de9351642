//! Transport: thin gRPC handlers over the domain and storage layers, the authentication
//! layer in front of them, health and reflection, and TLS on the port they share.
pub mod api_keys;
pub mod audit;
pub mod auth_layer;
pub mod convert;
pub mod error;
pub mod ext_authz;
pub mod health;
pub mod hot_path;
pub mod idle;
pub mod observe;
pub mod prepared;
pub mod roles;
pub mod rpc;
pub mod scopes;
pub mod size_limit;
pub mod tls;
pub mod workspaces;

use std::sync::Arc;

use metrics::Counter;
use tonic::Request;

use crate::auth::Caller;
use crate::domain::audit::Acting;
use crate::domain::page::{Cursor, ListFingerprint, Page, PageTokenCodec};
use crate::domain::records::VerifyCode;
use crate::storage::Store;
use crate::verification::KeyVerifier;
use crate::verification::queries::{self, ParsedQueries};
use error::ApiError;
use observe::RequestId;
use prepared::PreparedAnswers;

/// Implements every keyplane service; cheap to clone.
#[derive(Clone)]
pub struct KeyplaneApi {
    store: Store,
    verifier: KeyVerifier,
    pages: PageTokenCodec,
    verifications: Arc<CodeCounters>,
    checks: Arc<CodeCounters>,
    /// The longest a delegated key may live (`--max-delegation-ttl`).
    max_delegation_ttl: chrono::Duration,
    /// Permission queries parsed once per distinct text, for VerifyApiKey and Check.
    queries: Arc<ParsedQueries>,
    /// VerifyApiKey's and Check's answers, encoded once per key.
    prepared: Arc<PreparedAnswers>,
}

impl KeyplaneApi {
    pub fn new(
        store: Store,
        verifier: KeyVerifier,
        pages: PageTokenCodec,
        max_delegation_ttl: chrono::Duration,
        cache_capacity: u64,
    ) -> Self {
        Self {
            max_delegation_ttl,
            queries: Arc::new(ParsedQueries::new(queries::DEFAULT_CAPACITY)),
            prepared: Arc::new(PreparedAnswers::new(cache_capacity)),
            store,
            verifier,
            pages,
            verifications: Arc::new(CodeCounters::new("keyplane_verifications_total")),
            checks: Arc::new(CodeCounters::new("keyplane_check_total")),
        }
    }

    /// The token for the page after this one; empty at the end.
    fn next_token<T, C: Cursor>(
        &self,
        page: &Page<T>,
        cursor: impl Fn(&T) -> C,
        list: &ListFingerprint,
    ) -> String {
        match (page.more, page.items.last()) {
            (true, Some(last)) => self.pages.encode(cursor(last), list),
            _ => String::new(),
        }
    }
}

/// A counter per verification code, registered once: a label set built on every call
/// would cost an allocation and a registry lookup on the hot path.
struct CodeCounters([Counter; VerifyCode::ALL.len()]);

impl CodeCounters {
    fn new(name: &'static str) -> Self {
        Self(VerifyCode::ALL.map(|code| {
            metrics::counter!(name, "code" => crate::proto::VerifyCode::from(code).as_str_name())
        }))
    }

    fn count(&self, code: VerifyCode) {
        self.0[code as usize].increment(1);
    }
}

/// The caller and the context of its write: its tenant, who it is, and the request id the
/// observe layer gave the call (the audit event and the log lines share it).
fn acting<T>(request: &Request<T>) -> Result<(Caller, Acting), tonic::Status> {
    let caller = caller(request)?;
    let acting = Acting {
        tenant: caller.tenant()?,
        actor: caller.actor(),
        request_id: request
            .extensions()
            .get::<RequestId>()
            .map_or_else(|| observe::new_request_id().into(), |id| id.0.clone()),
    };
    Ok((caller, acting))
}

/// The caller the auth layer attached to the request.
fn caller<T>(request: &Request<T>) -> Result<Caller, ApiError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(ApiError::MissingCaller)
}
