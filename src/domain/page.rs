//! Keyset pagination (AIP-158): page sizes, pages, and opaque, tamper-evident page tokens.
//!
//! A token carries the cursor of the last row returned (its id, or for the audit log its
//! sequence) plus a truncated HMAC over that cursor and the list's [`ListFingerprint`], so
//! an edited or forged token, or one replayed on another list, for another tenant or with
//! other filters, is refused.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

use super::TenantId;

const DEFAULT_PAGE_SIZE: u64 = 50;
const MAX_PAGE_SIZE: u64 = 1000;
const MAC_LEN: usize = 16;

/// A page size as AIP-158 wants it: 0 means the default, too large means the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(u64);

impl PageSize {
    pub fn parse(raw: i32) -> Result<Self, &'static str> {
        match raw {
            n if n < 0 => Err("must not be negative"),
            0 => Ok(Self(DEFAULT_PAGE_SIZE)),
            n => Ok(Self((n as u64).min(MAX_PAGE_SIZE))),
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// One page of a keyset-paginated list; `more` says whether another page follows.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub more: bool,
}

impl<T> Page<T> {
    /// Builds a page from up to `limit + 1` rows: the extra row only proves there is more.
    pub fn from_rows(mut items: Vec<T>, limit: u64) -> Self {
        let more = items.len() as u64 > limit;
        items.truncate(limit as usize);
        Self { items, more }
    }
}

/// The lists that hand out page tokens. The tag values are part of the token format:
/// never renumber one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Workspaces = 1,
    Scopes = 2,
    ApiKeys = 3,
    AuditEvents = 4,
    Roles = 5,
}

/// What a page token holds: the last row's position in its list's order, as 16 bytes.
pub trait Cursor: Sized {
    fn to_bytes(&self) -> [u8; 16];
    fn from_bytes(bytes: [u8; 16]) -> Option<Self>;
}

/// Lists ordered by id.
impl Cursor for Uuid {
    fn to_bytes(&self) -> [u8; 16] {
        *self.as_bytes()
    }

    fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        Some(Uuid::from_bytes(bytes))
    }
}

/// Lists ordered by a sequence number (the audit log, by its chain sequence).
impl Cursor for i64 {
    fn to_bytes(&self) -> [u8; 16] {
        i128::from(*self).to_be_bytes()
    }

    fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        i64::try_from(i128::from_be_bytes(bytes)).ok()
    }
}

/// Everything that shapes a list, as explicit bytes a page token is bound to: a format
/// version, the list's tag, the tenant's 16 bytes, then each filter in the order the list
/// adds them, as a presence byte and a length-prefixed value.
///
/// Written out by hand rather than derived from `Debug` (which is not a stable format): a
/// changed derive or a renamed type must never silently invalidate, or validate, a token.
/// Adding a filter to a list changes its fingerprints, which is right: tokens handed out
/// before did not filter by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFingerprint(Vec<u8>);

impl ListFingerprint {
    const VERSION: u8 = 1;

    pub fn new(kind: ListKind, tenant: TenantId) -> Self {
        let mut bytes = Vec::with_capacity(64);
        bytes.extend_from_slice(&[Self::VERSION, kind as u8]);
        bytes.extend_from_slice(tenant.as_uuid().as_bytes());
        Self(bytes)
    }

    /// Adds an optional filter value (absent and empty are different).
    pub fn filter(mut self, value: Option<&[u8]>) -> Self {
        match value {
            None => self.0.push(0),
            Some(v) => {
                self.0.push(1);
                self.0.extend_from_slice(&(v.len() as u32).to_be_bytes());
                self.0.extend_from_slice(v);
            }
        }
        self
    }

    /// Adds a yes/no filter.
    pub fn flag(mut self, value: bool) -> Self {
        self.0.push(2 + u8::from(value));
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Signs and checks page tokens with a key shared by every replica.
#[derive(Clone)]
pub struct PageTokenCodec {
    key: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page token is invalid, was altered, or belongs to a request with other filters")]
pub struct BadPageToken;

impl PageTokenCodec {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    pub fn encode(&self, last: impl Cursor, list: &ListFingerprint) -> String {
        let cursor = last.to_bytes();
        let mut raw = Vec::with_capacity(16 + MAC_LEN);
        raw.extend_from_slice(&cursor);
        raw.extend_from_slice(&self.mac(&cursor, list).finalize().into_bytes()[..MAC_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The cursor of a page token; `None` for an empty token (the first page).
    pub fn decode<C: Cursor>(
        &self,
        token: &str,
        list: &ListFingerprint,
    ) -> Result<Option<C>, BadPageToken> {
        if token.is_empty() {
            return Ok(None);
        }
        // Anything longer than a real token is refused before decoding.
        if token.len() > 64 {
            return Err(BadPageToken);
        }
        let raw = URL_SAFE_NO_PAD.decode(token).map_err(|_| BadPageToken)?;
        if raw.len() != 16 + MAC_LEN {
            return Err(BadPageToken);
        }
        let cursor: [u8; 16] = raw[..16].try_into().map_err(|_| BadPageToken)?;
        self.mac(&cursor, list)
            .verify_truncated_left(&raw[16..])
            .map_err(|_| BadPageToken)?;
        C::from_bytes(cursor).map(Some).ok_or(BadPageToken)
    }

    fn mac(&self, cursor: &[u8; 16], list: &ListFingerprint) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(cursor);
        mac.update(list.as_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn page_sizes() {
        assert_eq!(PageSize::parse(0).unwrap().get(), 50);
        assert_eq!(PageSize::parse(7).unwrap().get(), 7);
        assert_eq!(PageSize::parse(5000).unwrap().get(), 1000);
        assert!(PageSize::parse(-1).is_err());
    }

    fn tenant(n: u128) -> TenantId {
        TenantId::new(Uuid::from_u128(n))
    }

    #[test]
    fn sequence_cursors_round_trip_and_stay_apart_from_ids() {
        let codec = PageTokenCodec::new([7; 32]);
        let list = ListFingerprint::new(ListKind::AuditEvents, tenant(1));
        for sequence in [1_i64, 42, i64::MAX] {
            let token = codec.encode(sequence, &list);
            assert_eq!(codec.decode(&token, &list), Ok(Some(sequence)));
        }
        // A workspace token is not an audit token, even with the same bytes.
        let workspaces = ListFingerprint::new(ListKind::Workspaces, tenant(1));
        let token = codec.encode(Uuid::from_u128(42), &workspaces);
        assert_eq!(codec.decode::<i64>(&token, &list), Err(BadPageToken));
    }

    #[test]
    fn tokens_round_trip_and_detect_tampering() {
        let codec = PageTokenCodec::new([7; 32]);
        let id = Uuid::now_v7();
        let list = ListFingerprint::new(ListKind::Workspaces, tenant(1));
        let token = codec.encode(id, &list);
        assert_eq!(codec.decode(&token, &list), Ok(Some(id)));
        assert_eq!(codec.decode::<Uuid>("", &list), Ok(None));
        let other_tenant = ListFingerprint::new(ListKind::Workspaces, tenant(2));
        assert_eq!(
            codec.decode::<Uuid>(&token, &other_tenant),
            Err(BadPageToken)
        );
        let other_list = ListFingerprint::new(ListKind::Scopes, tenant(1));
        assert_eq!(codec.decode::<Uuid>(&token, &other_list), Err(BadPageToken));
        assert_eq!(
            PageTokenCodec::new([8; 32]).decode::<Uuid>(&token, &list),
            Err(BadPageToken)
        );
        let mut edited = token.clone().into_bytes();
        edited[3] = if edited[3] == b'A' { b'B' } else { b'A' };
        assert_eq!(
            codec.decode::<Uuid>(std::str::from_utf8(&edited).unwrap(), &list),
            Err(BadPageToken)
        );
    }

    #[test]
    fn fingerprints_tell_filters_apart() {
        let keys = || ListFingerprint::new(ListKind::ApiKeys, tenant(1));
        let distinct = [
            keys().filter(None).filter(None),
            keys().filter(Some(b"")).filter(None),
            keys().filter(None).filter(Some(b"")),
            // A value cannot run into the next filter: lengths are part of the bytes.
            keys().filter(Some(b"ab")).filter(Some(b"c")),
            keys().filter(Some(b"a")).filter(Some(b"bc")),
            keys().flag(false),
            keys().flag(true),
        ];
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    /// The bytes are the token format: changing them invalidates every token in the wild,
    /// which must be a decision, not an accident.
    #[test]
    fn fingerprint_bytes_are_stable() {
        let list = ListFingerprint::new(ListKind::Scopes, tenant(0x0102))
            .filter(Some(b"ws"))
            .flag(true);
        let mut expected = vec![1, 2];
        expected.extend_from_slice(&0x0102u128.to_be_bytes());
        expected.extend_from_slice(&[1, 0, 0, 0, 2, b'w', b's', 3]);
        assert_eq!(list.as_bytes(), expected);
    }

    proptest! {
        #[test]
        fn arbitrary_tokens_never_panic(token in ".{0,100}") {
            let list = ListFingerprint::new(ListKind::ApiKeys, tenant(1));
            let _ = PageTokenCodec::new([1; 32]).decode::<Uuid>(&token, &list);
        }
    }
}
