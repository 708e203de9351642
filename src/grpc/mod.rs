//! Transport: thin gRPC handlers over the domain and storage layers, the authentication
//! layer in front of them, health and reflection.
pub mod api_keys;
pub mod auth_layer;
pub mod convert;
pub mod error;
pub mod ext_authz;
pub mod health;
pub mod idle;
pub mod observe;
pub mod rpc;
pub mod scopes;
pub mod size_limit;
pub mod workspaces;

use std::sync::Arc;

use metrics::Counter;
use tonic::Request;
use uuid::Uuid;

use crate::auth::Caller;
use crate::domain::page::{ListFingerprint, Page, PageTokenCodec};
use crate::domain::records::VerifyCode;
use crate::storage::Store;
use crate::verification::KeyVerifier;
use error::ApiError;

/// Implements every keyplane service; cheap to clone.
#[derive(Clone)]
pub struct KeyplaneApi {
    store: Store,
    verifier: KeyVerifier,
    pages: PageTokenCodec,
    verifications: Arc<CodeCounters>,
    checks: Arc<CodeCounters>,
}

impl KeyplaneApi {
    pub fn new(store: Store, verifier: KeyVerifier, pages: PageTokenCodec) -> Self {
        Self {
            store,
            verifier,
            pages,
            verifications: Arc::new(CodeCounters::new("keyplane_verifications_total")),
            checks: Arc::new(CodeCounters::new("keyplane_check_total")),
        }
    }

    /// The token for the page after this one; empty at the end.
    fn next_token<T>(
        &self,
        page: &Page<T>,
        id: impl Fn(&T) -> Uuid,
        list: &ListFingerprint,
    ) -> String {
        match (page.more, page.items.last()) {
            (true, Some(last)) => self.pages.encode(id(last), list),
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

/// The caller the auth layer attached to the request.
fn caller<T>(request: &Request<T>) -> Result<Caller, ApiError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(ApiError::MissingCaller)
}
