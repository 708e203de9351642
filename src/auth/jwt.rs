//! JWT validation. The algorithms come from the configured keys only: an HS256
//! secret allows HS256, a PEM public key allows the one algorithm of its key type, a JWKS
//! key the one algorithm of its entry. The token's header merely picks among them.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::AuthError;
use crate::domain::TenantId;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// The shortest HS256 secret accepted (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_LEN: usize = 32;
/// The clock skew allowed on `exp` and `nbf` unless the operator sets another.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Why the JWT configuration is unusable (reported at start-up).
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("the JWT secret must be at least {MIN_SECRET_LEN} bytes")]
    SecretTooShort,
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no RSA, EC P-256 or Ed25519 public key in PEM form")]
    Pem { path: String },
    #[error("{path} is not a JWKS document: {source}")]
    Jwks {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: no usable key (each needs a kid and an RS256, ES256 or EdDSA key)")]
    JwksEmpty { path: String },
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// What the operator configured.
#[derive(Debug, Clone)]
pub struct JwtSettings {
    /// The HS256 secret: a type that never prints its value.
    pub secret: Option<SecretString>,
    pub public_key_file: Option<std::path::PathBuf>,
    pub jwks_file: Option<std::path::PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            secret: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: DEFAULT_LEEWAY.as_secs(),
        }
    }
}

impl JwtSettings {
    pub fn is_configured(&self) -> bool {
        self.secret.is_some() || self.public_key_file.is_some() || self.jwks_file.is_some()
    }
}

struct VerifyKey {
    /// Only JWKS keys have a kid; such a key is used only for tokens naming it.
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Validates bearer tokens against the configured keys.
pub struct JwtVerifier {
    keys: Vec<VerifyKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// The claims keyplane reads. Types are strict: a claim of the wrong JSON type fails
/// deserialization and so rejects the token.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    /// Checked by jsonwebtoken; declared so that a non-integer `exp` rejects the token.
    exp: u64,
    /// Likewise for `nbf`.
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<u64>,
    #[serde(default)]
    tenant_id: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

/// A validated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub subject: Arc<str>,
    /// `None`: a platform token.
    pub tenant: Option<TenantId>,
    pub scopes: Arc<[String]>,
    /// The last second (Unix time) at which the token is accepted: `exp` plus the leeway.
    pub accepted_until: u64,
}

fn read(path: &Path) -> Result<Vec<u8>, JwtConfigError> {
    std::fs::read(path).map_err(|source| JwtConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

type PemParser = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;

fn pem_key(path: &Path) -> Result<VerifyKey, JwtConfigError> {
    let pem = read(path)?;
    let candidates: [(Algorithm, PemParser); 3] = [
        (Algorithm::RS256, DecodingKey::from_rsa_pem),
        (Algorithm::ES256, DecodingKey::from_ec_pem),
        (Algorithm::EdDSA, DecodingKey::from_ed_pem),
    ];
    candidates
        .into_iter()
        .find_map(|(algorithm, parse)| {
            parse(&pem).ok().map(|key| VerifyKey {
                kid: None,
                algorithm,
                key,
            })
        })
        .ok_or_else(|| JwtConfigError::Pem {
            path: path.display().to_string(),
        })
}

/// The algorithm a JWKS entry is for: its `alg`, or the one its key type implies.
fn jwk_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    match (&jwk.common.key_algorithm, &jwk.algorithm) {
        (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_))
        | (None, AlgorithmParameters::RSA(_)) => Some(Algorithm::RS256),
        (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(p))
        | (None, AlgorithmParameters::EllipticCurve(p))
            if p.curve == EllipticCurve::P256 =>
        {
            Some(Algorithm::ES256)
        }
        (Some(KeyAlgorithm::EdDSA), AlgorithmParameters::OctetKeyPair(_))
        | (None, AlgorithmParameters::OctetKeyPair(_)) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

fn jwks_keys(path: &Path) -> Result<Vec<VerifyKey>, JwtConfigError> {
    let set: JwkSet =
        serde_json::from_slice(&read(path)?).map_err(|source| JwtConfigError::Jwks {
            path: path.display().to_string(),
            source,
        })?;
    let keys: Vec<VerifyKey> = set
        .keys
        .iter()
        .filter_map(|jwk| {
            let kid = jwk.common.key_id.clone()?;
            let algorithm = jwk_algorithm(jwk)?;
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(VerifyKey {
                kid: Some(kid),
                algorithm,
                key,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(JwtConfigError::JwksEmpty {
            path: path.display().to_string(),
        });
    }
    Ok(keys)
}

impl JwtVerifier {
    pub fn from_settings(settings: &JwtSettings) -> Result<Self, JwtConfigError> {
        let mut keys = Vec::new();
        if let Some(secret) = &settings.secret {
            let secret = secret.expose_secret();
            if secret.len() < MIN_SECRET_LEN {
                return Err(JwtConfigError::SecretTooShort);
            }
            keys.push(VerifyKey {
                kid: None,
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            });
        }
        if let Some(path) = &settings.public_key_file {
            keys.push(pem_key(path)?);
        }
        if let Some(path) = &settings.jwks_file {
            keys.extend(jwks_keys(path)?);
        }
        Ok(Self {
            keys,
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway_secs: settings.leeway_secs,
        })
    }

    /// Validates a bearer token and reads its identity.
    pub fn verify(&self, token: &str) -> Result<TokenIdentity, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::TokenInvalid);
        }
        // `alg: none` and unknown algorithms fail here: Algorithm has no such variant.
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::TokenInvalid)?;
        let key = self
            .keys
            .iter()
            .find(|k| {
                k.algorithm == header.alg
                    && match &k.kid {
                        Some(kid) => header.kid.as_deref() == Some(kid.as_str()),
                        None => true,
                    }
            })
            .ok_or(AuthError::TokenInvalid)?;

        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);

        let data =
            jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::TokenExpired,
                    ErrorKind::ImmatureSignature => AuthError::TokenNotYetValid,
                    _ => AuthError::TokenInvalid,
                }
            })?;
        let claims = data.claims;
        if claims.sub.is_empty() {
            return Err(AuthError::TokenInvalid);
        }
        let tenant = match claims.tenant_id {
            Some(text) => Some(TenantId::parse(&text).ok_or(AuthError::TokenInvalid)?),
            None => None,
        };
        let mut scopes: Vec<String> = claims
            .scope
            .as_deref()
            .unwrap_or_default()
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        scopes.extend(claims.scp.unwrap_or_default());
        Ok(TokenIdentity {
            subject: claims.sub.into(),
            tenant,
            scopes: scopes.into(),
            accepted_until: claims.exp.saturating_add(self.leeway_secs),
        })
    }
}

/// Claims of a token minted by `keyplane token`.
#[derive(Debug, Serialize)]
pub struct MintClaims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// Signs claims with an HS256 secret.
pub fn mint_hs256(secret: &str, claims: &MintClaims) -> Result<String, JwtConfigError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(JwtConfigError::SecretTooShort);
    }
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}
