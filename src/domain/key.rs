//! The API key format: `{prefix}{sep}{random}{checksum}`, GitHub's token scheme.
//!
//! `sep` is the prefix's own separator: `-` for a prefix written with `-` (`sk-ol-…`, as
//! Openlayer issues them), `_` otherwise (`kp_…`, `sk_live_…`). `random` is 32 bytes from
//! the OS CSPRNG written as 43 base62 characters; `checksum` is the CRC32 of everything
//! before it, prefix and separator included, as 6 base62 characters. Covering the prefix too
//! means any single-character typo anywhere in a key is caught without a database lookup.
//! The body has a fixed length, so a key splits from its end whatever its prefix holds. At
//! rest only the SHA-256 digest of the whole secret is kept.
use std::fmt;

use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 62^43 > 2^256, so 43 characters hold any 32 bytes.
const RANDOM_LEN: usize = 43;
/// 62^6 > 2^32.
const CHECKSUM_LEN: usize = 6;
const BODY_LEN: usize = RANDOM_LEN + CHECKSUM_LEN;
const PREFIX_MAX: usize = 24;
/// No valid key is longer than this; longer input is refused before any other work.
pub const MAX_KEY_LEN: usize = PREFIX_MAX + 1 + BODY_LEN;

/// A key prefix: 1 to 24 characters, lowercase letters and digits in parts joined by
/// single `_` or `-` (one kind per prefix), starting with a letter: `kp`, `sk_live`,
/// `sk-ol`, `pk_test`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPrefix(String);

/// What [`KeyPrefix::parse`] accepts, for messages.
pub const PREFIX_RULE: &str = "1 to 24 lowercase letters and digits, in parts joined by single _ or - (one kind), starting with a letter";

impl KeyPrefix {
    pub const DEFAULT: &'static str = "kp";

    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        let joiner = bytes.iter().copied().find(|b| matches!(b, b'_' | b'-'));
        let ok = (1..=PREFIX_MAX).contains(&bytes.len())
            && bytes[0].is_ascii_lowercase()
            && text.split(['_', '-']).all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            })
            && joiner.is_none_or(|j| bytes.iter().all(|b| !matches!(b, b'_' | b'-') || *b == j));
        ok.then(|| Self(text.to_owned()))
    }

    pub fn default_prefix() -> Self {
        Self(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What joins this prefix to a key's body.
    pub fn separator(&self) -> char {
        separator_of(&self.0)
    }
}

/// The separator a prefix is written with: `-` for a prefix with `-`, otherwise `_`.
fn separator_of(prefix: &str) -> char {
    if prefix.contains('-') { '-' } else { '_' }
}

/// SHA-256 of a whole secret: the only form in which keys are stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest(pub [u8; 32]);

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(..)")
    }
}

/// Why a hex digest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be 64 hex characters (a SHA-256 digest)")]
pub struct BadDigest;

impl KeyDigest {
    /// A SHA-256 digest written as 64 hex characters, either case: how a home-grown key
    /// table usually keeps its keys.
    pub fn from_hex(text: &str) -> Result<Self, BadDigest> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(BadDigest);
        }
        let mut digest = [0u8; 32];
        for (out, pair) in digest.iter_mut().zip(bytes.chunks_exact(2)) {
            let high = hex_value(pair[0]).ok_or(BadDigest)?;
            let low = hex_value(pair[1]).ok_or(BadDigest)?;
            *out = (high << 4) | low;
        }
        Ok(Self(digest))
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The shortest secret of another system keyplane imports and looks up: shorter strings
/// are not worth a cache entry.
pub const IMPORTED_MIN_LEN: usize = 8;
/// The longest one: longer input is MALFORMED before any other work.
pub const IMPORTED_MAX_LEN: usize = 512;
/// Secrets shorter than this get no derived hint: four characters would show too much.
const HINT_FROM_LEN: usize = 16;

/// Why a secret of another system was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "must be {IMPORTED_MIN_LEN} to {IMPORTED_MAX_LEN} printable ASCII characters, without spaces"
)]
pub struct BadImportedSecret;

/// A secret of another system (`sk_test_…`, a UUID, hex), imported as it is: 8 to 512
/// printable ASCII characters without spaces. Like [`ApiKeySecret`], its `Debug` never
/// shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ImportedSecret(String);

impl fmt::Debug for ImportedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ImportedSecret(..)")
    }
}

impl ImportedSecret {
    pub fn parse(text: &str) -> Result<Self, BadImportedSecret> {
        Self::digest_of(text).map(|_| Self(text.to_owned()))
    }

    /// The digest a presented string would have as an imported key, when it could be one:
    /// the verifier's check, without copying the string.
    pub fn digest_of(text: &str) -> Result<KeyDigest, BadImportedSecret> {
        let ok = (IMPORTED_MIN_LEN..=IMPORTED_MAX_LEN).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(BadImportedSecret);
        }
        Ok(KeyDigest(Sha256::digest(text.as_bytes()).into()))
    }

    pub fn digest(&self) -> KeyDigest {
        KeyDigest(Sha256::digest(self.0.as_bytes()).into())
    }

    /// The secret in keyplane's own format, when it has it (a key of another keyplane):
    /// then it is shown with its prefix like any key.
    pub fn as_keyplane(&self) -> Option<ApiKeySecret> {
        ApiKeySecret::parse(&self.0).ok()
    }

    /// Its last 4 characters, for `masked_key`; none for a secret short enough that they
    /// would give away a quarter of it.
    pub fn hint(&self) -> Option<KeyHint> {
        (self.0.len() >= HINT_FROM_LEN).then(|| KeyHint(self.0[self.0.len() - 4..].to_owned()))
    }

    /// Whether `hint` is how the secret ends.
    pub fn ends_with(&self, hint: &KeyHint) -> bool {
        self.0.ends_with(hint.as_str())
    }
}

/// Why a hint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be 1 to 4 printable ASCII characters, without spaces")]
pub struct BadHint;

/// The last characters of an imported secret (1 to 4), shown in its `masked_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHint(String);

impl KeyHint {
    pub fn parse(text: &str) -> Result<Self, BadHint> {
        let ok = (1..=4).contains(&text.len()) && text.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| Self(text.to_owned())).ok_or(BadHint)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A well-formed secret. Its `Debug` never shows the secret, so it cannot leak into logs by
/// accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret {
    text: String,
    prefix_len: usize,
}

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySecret({})", self.masked())
    }
}

/// Why a presented key is malformed (all of these answer `VERIFY_CODE_MALFORMED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    #[error("not of the form prefix_body or prefix-body")]
    Shape,
    #[error("invalid prefix")]
    Prefix,
    #[error("wrong length")]
    Length,
    #[error("character outside base62")]
    Alphabet,
    #[error("checksum mismatch")]
    Checksum,
}

impl ApiKeySecret {
    /// Generates a new secret from the operating system's CSPRNG.
    pub fn generate(prefix: &KeyPrefix) -> Result<Self, getrandom::Error> {
        let mut random = [0u8; 32];
        getrandom::fill(&mut random)?;
        let mut text = String::with_capacity(prefix.as_str().len() + 1 + BODY_LEN);
        text.push_str(prefix.as_str());
        text.push(prefix.separator());
        text.push_str(&encode_base62(&random, RANDOM_LEN));
        let checksum = crc32fast::hash(text.as_bytes());
        text.push_str(&encode_base62(&checksum.to_be_bytes(), CHECKSUM_LEN));
        Ok(Self {
            prefix_len: prefix.as_str().len(),
            text,
        })
    }

    /// Checks shape, alphabet and checksum; touches nothing else.
    pub fn parse(text: &str) -> Result<Self, MalformedKey> {
        if text.len() > MAX_KEY_LEN {
            return Err(MalformedKey::Length);
        }
        // The body is the last BODY_LEN characters; before it, the separator and the prefix.
        if text.len() < BODY_LEN + 2 || !text.is_char_boundary(text.len() - BODY_LEN) {
            return Err(MalformedKey::Length);
        }
        let (head, body) = text.split_at(text.len() - BODY_LEN);
        if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(MalformedKey::Alphabet);
        }
        let (prefix, separator) = head.split_at(head.len() - 1);
        if !matches!(separator, "_" | "-") {
            return Err(MalformedKey::Shape);
        }
        let parsed = KeyPrefix::parse(prefix).ok_or(MalformedKey::Prefix)?;
        // The prefix's own separator, and no other.
        if !separator.starts_with(parsed.separator()) {
            return Err(MalformedKey::Prefix);
        }
        let (signed, checksum) = text.split_at(text.len() - CHECKSUM_LEN);
        let expected = encode_base62(
            &crc32fast::hash(signed.as_bytes()).to_be_bytes(),
            CHECKSUM_LEN,
        );
        if checksum != expected {
            return Err(MalformedKey::Checksum);
        }
        Ok(Self {
            text: text.to_owned(),
            prefix_len: prefix.len(),
        })
    }

    /// The full secret, to hand to the client exactly once.
    pub fn expose(&self) -> &str {
        &self.text
    }

    pub fn prefix(&self) -> &str {
        &self.text[..self.prefix_len]
    }

    pub fn last_four(&self) -> &str {
        &self.text[self.text.len() - 4..]
    }

    pub fn masked(&self) -> String {
        masked_key(self.prefix(), self.last_four())
    }

    pub fn digest(&self) -> KeyDigest {
        KeyDigest(Sha256::digest(self.text.as_bytes()).into())
    }
}

/// The displayable form of a key: its prefix (with its own separator) and last 4
/// characters, nothing more: `kp_****5PW0`, `sk-ol-****5PW0`. An imported key of another
/// format has no prefix (`****5PW0`), and no last characters when none were given (`****`).
pub fn masked_key(prefix: &str, last_four: &str) -> String {
    if prefix.is_empty() {
        return format!("****{last_four}");
    }
    format!("{prefix}{}****{last_four}", separator_of(prefix))
}

/// Big-endian bytes as exactly `width` base62 digits (left-padded with `0`).
fn encode_base62(bytes: &[u8], width: usize) -> String {
    let mut number = bytes.to_vec();
    let mut digits = vec![b'0'; width];
    for slot in digits.iter_mut().rev() {
        // One long division of `number` by 62; the remainder is the next digit.
        let mut remainder = 0u32;
        for byte in number.iter_mut() {
            let acc = (remainder << 8) | u32::from(*byte);
            *byte = (acc / 62) as u8;
            remainder = acc % 62;
        }
        *slot = ALPHABET[remainder as usize];
    }
    // Only ASCII from ALPHABET was written.
    String::from_utf8(digits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> ApiKeySecret {
        ApiKeySecret::generate(&KeyPrefix::default_prefix()).unwrap()
    }

    #[test]
    fn base62_known_values() {
        assert_eq!(encode_base62(&[0, 0, 0, 0], 6), "000000");
        assert_eq!(encode_base62(&61u32.to_be_bytes(), 6), "00000z");
        assert_eq!(encode_base62(&62u32.to_be_bytes(), 6), "000010");
        assert_eq!(encode_base62(&u32::MAX.to_be_bytes(), 6), "4gfFC3");
        assert_eq!(encode_base62(&[0xff; 32], 43).len(), 43);
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = key();
        let text = k.expose();
        assert!(text.starts_with("kp_"));
        assert_eq!(text.len(), 3 + 49);
        assert_eq!(k.masked(), format!("kp_****{}", &text[text.len() - 4..]));
        assert_ne!(key().expose(), text, "two keys must differ");
        assert!(
            !format!("{k:?}").contains(&text[3..]),
            "Debug must not show the secret"
        );
    }

    #[test]
    fn rejects_without_panicking() {
        for bad in [
            "",
            "_",
            "kp_",
            "kp",
            "KP_abc",
            "kp_short",
            "1p_x",
            &"a".repeat(500),
        ] {
            assert!(ApiKeySecret::parse(bad).is_err(), "{bad}");
        }
        let mut text = key().expose().to_owned();
        text.replace_range(5..6, "!");
        assert_eq!(ApiKeySecret::parse(&text), Err(MalformedKey::Alphabet));
    }

    #[test]
    fn prefixes() {
        for good in [
            "kp",
            "a",
            "abcdefghij012345",
            "sk_live",
            "sk-ol",
            "pk_test_2",
            "a-b-c",
            "abcdefghij0123456789abcd",
        ] {
            assert!(KeyPrefix::parse(good).is_some(), "{good}");
        }
        for bad in [
            "",
            "1a",
            "Kp",
            "kp-",
            "kp_",
            "_kp",
            "sk__live",
            "sk-ol_x",
            "sk_1-x",
            "a-",
            "abcdefghij0123456789abcde",
        ] {
            assert!(KeyPrefix::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn each_prefix_joins_with_its_own_separator() {
        for (prefix, start, masked) in [
            ("sk-ol", "sk-ol-", "sk-ol-****"),
            ("sk_live", "sk_live_", "sk_live_****"),
            ("kp", "kp_", "kp_****"),
        ] {
            let k = ApiKeySecret::generate(&KeyPrefix::parse(prefix).unwrap()).unwrap();
            assert!(k.expose().starts_with(start), "{}", k.masked());
            assert_eq!(k.expose().len(), prefix.len() + 1 + BODY_LEN);
            assert_eq!(k.prefix(), prefix);
            assert!(k.masked().starts_with(masked), "{}", k.masked());
            assert_eq!(
                ApiKeySecret::parse(k.expose()).unwrap().digest(),
                k.digest()
            );
            // The other separator is a different (and malformed) key.
            let swapped = format!(
                "{prefix}{}{}",
                if start.ends_with('-') { '_' } else { '-' },
                &k.expose()[prefix.len() + 1..]
            );
            assert!(ApiKeySecret::parse(&swapped).is_err(), "{swapped}");
        }
    }

    #[test]
    fn hex_digests() {
        let k = key();
        let hex: String = k.digest().0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(KeyDigest::from_hex(&hex), Ok(k.digest()));
        assert_eq!(KeyDigest::from_hex(&hex.to_uppercase()), Ok(k.digest()));
        for bad in [
            "",
            "ab",
            &hex[1..],
            &format!("{hex}0"),
            &hex.replacen('a', "g", 1),
        ] {
            if bad != hex {
                assert_eq!(KeyDigest::from_hex(bad), Err(BadDigest), "{bad}");
            }
        }
        // A multi-byte character never splits a pair into a panic.
        assert_eq!(KeyDigest::from_hex(&"é".repeat(32)), Err(BadDigest));
    }

    #[test]
    fn imported_secrets_and_hints() {
        let uuid = "0b6f6b8e-3c2a-4e55-9a4e-7f2f1b7c9d10";
        let s = ImportedSecret::parse(uuid).unwrap();
        assert_eq!(s.digest(), ImportedSecret::digest_of(uuid).unwrap());
        assert_eq!(s.hint().unwrap().as_str(), "9d10");
        assert!(s.ends_with(&KeyHint::parse("d10").unwrap()));
        assert!(!format!("{s:?}").contains("9d10"));
        assert!(s.as_keyplane().is_none());
        assert!(ImportedSecret::parse("short12x").unwrap().hint().is_none());
        for bad in [
            "short",
            "has space inside",
            "tab\there12",
            "ünïcødé-key",
            &"x".repeat(513),
        ] {
            assert!(ImportedSecret::parse(bad).is_err(), "{bad}");
        }
        let own = key();
        let imported = ImportedSecret::parse(own.expose()).unwrap();
        assert_eq!(imported.digest(), own.digest());
        assert_eq!(imported.as_keyplane().unwrap().prefix(), "kp");
        for bad in ["", "abcde", " ab", "\n"] {
            assert!(KeyHint::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(masked_key("", "abcd"), "****abcd");
        assert_eq!(masked_key("", ""), "****");
    }

    const CHARS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_-!";

    proptest! {
        #[test]
        fn every_generated_key_parses(prefix in "[a-z][a-z0-9]{0,7}([_-][a-z0-9]{1,7}){0,2}") {
            prop_assume!(KeyPrefix::parse(&prefix).is_some());
            let k = ApiKeySecret::generate(&KeyPrefix::parse(&prefix).unwrap()).unwrap();
            let parsed = ApiKeySecret::parse(k.expose()).unwrap();
            prop_assert_eq!(parsed.prefix(), prefix.as_str());
            prop_assert_eq!(parsed.digest(), k.digest());
        }

        #[test]
        fn any_single_character_change_is_malformed(
            prefix in "[a-z][a-z0-9]{0,7}([_-][a-z0-9]{1,7}){0,2}",
            position in any::<prop::sample::Index>(),
            replacement in prop::sample::select(CHARS),
        ) {
            prop_assume!(KeyPrefix::parse(&prefix).is_some());
            let k = ApiKeySecret::generate(&KeyPrefix::parse(&prefix).unwrap()).unwrap();
            let mut bytes = k.expose().as_bytes().to_vec();
            let i = position.index(bytes.len());
            prop_assume!(bytes[i] != replacement);
            bytes[i] = replacement;
            let changed = String::from_utf8(bytes).unwrap();
            prop_assert!(ApiKeySecret::parse(&changed).is_err(), "{} accepted", changed);
        }

        #[test]
        fn arbitrary_input_never_panics(text in ".{0,100}") {
            let _ = ApiKeySecret::parse(&text);
            let _ = ImportedSecret::parse(&text);
            let _ = KeyDigest::from_hex(&text);
            let _ = KeyHint::parse(&text);
        }

        #[test]
        fn every_digest_round_trips_through_hex(bytes in any::<[u8; 32]>(), upper in any::<bool>()) {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let hex = if upper { hex.to_uppercase() } else { hex };
            prop_assert_eq!(KeyDigest::from_hex(&hex), Ok(KeyDigest(bytes)));
        }
    }
}
