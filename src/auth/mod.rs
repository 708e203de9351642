//! Authentication and authorization of keyplane's own callers: who is calling,
//! for which tenant, with which built-in scopes. Knows nothing of gRPC; the transport layer
//! hands it the raw credential values.
pub mod jwt;
mod token_cache;

use std::fmt;
use std::sync::Arc;

use crate::domain::audit::{Actor, ActorKind};
use crate::domain::network::ClientAddress;
use crate::domain::records::VerifyCode;
use crate::domain::scope::{BuiltinScope, ScopeString};
use crate::domain::usage::Cost;
use crate::domain::{TenantAccess, TenantId};
use crate::storage::StoreError;
use crate::verification::KeyVerifier;
use jwt::JwtVerifier;
use token_cache::TokenCache;

/// Why a caller was refused: one row each of the authentication-failure table in
/// `docs/api.md`, plus the `x-tenant-id` rules. None carries the credential itself.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send `authorization: Bearer <JWT>` or `x-api-key`")]
    CredentialsMissing,
    #[error("the bearer token is invalid")]
    TokenInvalid,
    #[error("the bearer token has expired")]
    TokenExpired,
    #[error("the bearer token is not valid yet")]
    TokenNotYetValid,
    #[error("the API key is not valid")]
    ApiKeyInvalid,
    #[error("x-tenant-id does not match the credential's tenant")]
    TenantMismatch,
    #[error("x-tenant-id must be a UUID")]
    TenantHeaderInvalid,
    #[error("a platform token must name the tenant in x-tenant-id")]
    TenantRequired,
    #[error("the credential lacks the scope {0}")]
    MissingScope(BuiltinScope),
    #[error("the caller cannot grant scopes it does not hold: {}", .0.join(", "))]
    ScopeEscalation(Vec<String>),
    #[error("could not check the credential")]
    Store(#[from] StoreError),
}

/// A verified caller, handed to every handler.
#[derive(Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's `sub`, or the admin key's id. Shared, like the scopes, with the cached
    /// token: a call copies no strings.
    pub subject: Arc<str>,
    pub access: TenantAccess,
    /// How it authenticated, for the audit log (a platform token keeps its kind when
    /// `x-tenant-id` narrows it to one tenant).
    pub kind: ActorKind,
    /// Granted scope strings as presented (only built-in ones matter to keyplane's API).
    pub scopes: Arc<[String]>,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("subject", &self.subject)
            .field("access", &self.access)
            .finish()
    }
}

impl Caller {
    /// The single tenant this call acts for; a platform token without `x-tenant-id` has
    /// none.
    pub fn tenant(&self) -> Result<TenantId, AuthError> {
        match self.access {
            TenantAccess::One(tenant) => Ok(tenant),
            TenantAccess::Any => Err(AuthError::TenantRequired),
        }
    }

    /// Who acts, as the audit log records it.
    pub fn actor(&self) -> Actor {
        Actor {
            subject: self.subject.clone(),
            kind: self.kind,
            // An admin key's subject is its id.
            api_key_id: match self.kind {
                ActorKind::ApiKey => self.subject.parse().ok(),
                ActorKind::TenantToken | ActorKind::PlatformToken => None,
            },
        }
    }

    pub fn has(&self, needed: BuiltinScope) -> bool {
        self.scopes.iter().any(|granted| needed.granted_by(granted))
    }

    pub fn require(&self, needed: BuiltinScope) -> Result<(), AuthError> {
        if self.has(needed) {
            Ok(())
        } else {
            Err(AuthError::MissingScope(needed))
        }
    }

    /// No escalation through keys: every built-in scope put on a key must be held by the
    /// caller itself.
    pub fn may_grant<'a>(
        &self,
        scopes: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), AuthError> {
        let beyond: Vec<String> = scopes
            .into_iter()
            .filter_map(BuiltinScope::parse)
            .filter(|b| !self.has(*b))
            .map(|b| b.as_str().to_owned())
            .collect();
        if beyond.is_empty() {
            Ok(())
        } else {
            Err(AuthError::ScopeEscalation(beyond))
        }
    }
}

/// The raw credential values of one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Credentials<'a> {
    /// The `authorization` header.
    pub authorization: Option<&'a str>,
    /// The `x-api-key` header.
    pub api_key: Option<&'a str>,
    /// The `x-tenant-id` header.
    pub tenant: Option<&'a str>,
    /// The address the call came from: an admin key with `allowed_cidrs` is refused from
    /// elsewhere, as any use of the key is.
    pub peer: Option<ClientAddress>,
}

/// The caller as `x-tenant-id` (when sent) narrows it: a platform token to the tenant named,
/// any other credential only to its own tenant.
fn narrow(caller: Caller, header: Option<&str>) -> Result<Caller, AuthError> {
    let Some(header) = header else {
        return Ok(caller);
    };
    let named = TenantId::parse(header).ok_or(AuthError::TenantHeaderInvalid)?;
    match caller.access {
        TenantAccess::Any => Ok(Caller {
            access: TenantAccess::One(named),
            ..caller
        }),
        TenantAccess::One(own) if own == named => Ok(caller),
        TenantAccess::One(_) => Err(AuthError::TenantMismatch),
    }
}

/// The token of an `authorization: Bearer <token>` header (scheme case-insensitive).
pub fn bearer_token(authorization: &str) -> Result<&str, AuthError> {
    let (scheme, token) = authorization
        .split_once(' ')
        .ok_or(AuthError::TokenInvalid)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::TokenInvalid);
    }
    Ok(token.trim())
}

/// Turns credentials into a [`Caller`].
#[derive(Clone)]
pub struct Authenticator {
    jwt: Arc<JwtVerifier>,
    tokens: Arc<TokenCache>,
    keys: KeyVerifier,
}

impl Authenticator {
    pub fn new(jwt: JwtVerifier, keys: KeyVerifier) -> Self {
        Self {
            jwt: Arc::new(jwt),
            tokens: Arc::new(TokenCache::new()),
            keys,
        }
    }

    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Caller, AuthError> {
        if let Some(result) = self.authenticate_now(creds) {
            return result;
        }
        let key = creds.api_key.unwrap_or_default();
        let caller = self.admin_key(key, creds.peer).await?;
        narrow(caller, creds.tenant)
    }

    /// [`authenticate`](Self::authenticate) when it needs no waiting: a bearer token is
    /// checked in memory (its signature once, then from the token cache). `None` for an
    /// admin key, which may need the database.
    pub fn authenticate_now(&self, creds: Credentials<'_>) -> Option<Result<Caller, AuthError>> {
        let caller = match (creds.authorization, creds.api_key) {
            (Some(authorization), _) => self.bearer(authorization),
            (None, Some(_)) => return None,
            (None, None) => Err(AuthError::CredentialsMissing),
        };
        Some(caller.and_then(|caller| narrow(caller, creds.tenant)))
    }

    fn bearer(&self, authorization: &str) -> Result<Caller, AuthError> {
        let token = bearer_token(authorization)?;
        let identity = self.tokens.identity(token, |t| self.jwt.verify(t))?;
        Ok(Caller {
            subject: identity.subject.clone(),
            // No tenant claim: a platform token, which may act for any tenant.
            access: identity.tenant.map_or(TenantAccess::Any, TenantAccess::One),
            kind: if identity.tenant.is_some() {
                ActorKind::TenantToken
            } else {
                ActorKind::PlatformToken
            },
            scopes: identity.scopes.clone(),
        })
    }

    async fn admin_key(
        &self,
        presented: &str,
        peer: Option<ClientAddress>,
    ) -> Result<Caller, AuthError> {
        let verification = self
            .keys
            // keyplane's own API is not the metered service: checking an admin key spends
            // nothing from its rate limits or credits.
            .verify(
                TenantAccess::Any,
                presented,
                peer,
                &[] as &[ScopeString],
                None,
                Cost::FREE,
            )
            .await?;
        match (verification.code, verification.standing) {
            // What the key holds now: its roles' built-in scopes too, and for a delegated
            // key only what its whole chain holds.
            (VerifyCode::Valid, Some(standing)) => Ok(Caller {
                subject: standing.key.id.to_string().into(),
                access: TenantAccess::One(standing.key.tenant_id),
                kind: ActorKind::ApiKey,
                scopes: standing
                    .builtin_scopes()
                    .map(|b| b.as_str().to_owned())
                    .collect(),
            }),
            _ => Err(AuthError::ApiKeyInvalid),
        }
    }
}
