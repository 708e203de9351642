//! Importing keys of another system (`ImportApiKeys`): what one item is once parsed. An
//! imported key is an ordinary key whose digest was not made by keyplane; only how it is
//! found (its digest) and shown (`masked_key`) differ.
use super::key::{ImportedSecret, KeyDigest, KeyHint};
use super::records::NewApiKey;

/// Most keys one call imports.
pub const IMPORT_MAX: usize = 1000;

/// How an item names its key.
#[derive(Debug, Clone)]
pub enum ImportedCredential {
    /// The secret itself (kept only as its digest).
    Secret(ImportedSecret),
    /// The SHA-256 digest a home-grown table kept.
    Digest(KeyDigest),
}

/// A hint that is not how the given secret ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be the last characters of the secret")]
pub struct HintMismatch;

/// One key to import, parsed.
#[derive(Debug, Clone)]
pub struct ImportedKey {
    /// The ordinary fields of a new key (no prefix of its own, no request id: the digest is
    /// what makes an import idempotent).
    pub key: NewApiKey,
    pub digest: KeyDigest,
    /// What `masked_key` shows: a secret in keyplane's own format keeps its prefix and
    /// last 4 characters; any other key has no prefix, and the hint (given, or the last 4
    /// characters of a secret of at least 16) or nothing.
    pub prefix: String,
    pub last_four: String,
}

impl ImportedKey {
    pub fn new(
        credential: ImportedCredential,
        hint: Option<KeyHint>,
        key: NewApiKey,
    ) -> Result<Self, HintMismatch> {
        let (digest, prefix, last_four) = match credential {
            ImportedCredential::Secret(secret) => {
                if hint.as_ref().is_some_and(|h| !secret.ends_with(h)) {
                    return Err(HintMismatch);
                }
                match secret.as_keyplane() {
                    Some(own) => (
                        own.digest(),
                        own.prefix().to_owned(),
                        own.last_four().to_owned(),
                    ),
                    None => (
                        secret.digest(),
                        String::new(),
                        shown(secret.hint().or(hint)),
                    ),
                }
            }
            ImportedCredential::Digest(digest) => (digest, String::new(), shown(hint)),
        };
        Ok(Self {
            key,
            digest,
            prefix,
            last_four,
        })
    }
}

fn shown(hint: Option<KeyHint>) -> String {
    hint.map(|h| h.as_str().to_owned()).unwrap_or_default()
}
