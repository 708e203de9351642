//! The rules a request can break whatever its transport: the domain decides, and only
//! `grpc/error.rs` turns a [`RuleViolation`] into a status code and an `ErrorInfo` reason.
use chrono::{DateTime, Duration, Utc};

use super::scope::ScopeString;
use super::validate::ValidationError;

/// Why the domain refused a well-formed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleViolation {
    #[error("a revoked key cannot be rotated")]
    KeyRevoked,
    #[error("an expired key cannot be rotated")]
    KeyExpired,
    #[error("the key was already rotated; rotate its successor instead")]
    AlreadyRotated,
    #[error("the workspace holds {0} non-revoked keys; revoke them or set force")]
    WorkspaceHasKeys(u64),
    #[error("{0} keys or roles hold this scope; remove it from them or set force")]
    ScopeInUse(u64),
    #[error("built-in scopes cannot be changed or deleted")]
    BuiltinReadOnly,
    #[error("scope {0} is a built-in scope")]
    BuiltinExists(ScopeString),
    /// Fields that are invalid given the stored state (a shared rate limit on a key
    /// without an owner): reported like any invalid field.
    #[error(transparent)]
    Invalid(ValidationError),
    #[error("the key has no remaining_uses to adjust: its credits are unlimited")]
    CreditsUnlimited,
    #[error("{0} keys hold this role; take it from them or set force")]
    RoleInUse(u64),
    /// A delegation asked for more than its parent has.
    #[error("{field}: {why}")]
    DelegationExceedsParent { field: &'static str, why: String },
    /// The calling key became revoked, expired or disabled (itself or an ancestor) since
    /// it was checked.
    #[error("the parent key is {0}")]
    ParentUnusable(String),
    /// Only a key can delegate, and only what it holds itself.
    #[error("DelegateApiKey is called with the parent key itself as the credential (x-api-key)")]
    DelegationNeedsKey,
}

/// How long a rotated key keeps working: 0 (revoked at once) up to [`GracePeriod::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracePeriod(Duration);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be between 0 and {}s", GracePeriod::MAX.num_seconds())]
pub struct GraceOutOfRange;

impl GracePeriod {
    /// Thirty days: longer than any sane hand-over, short enough that a forgotten rotation
    /// does not leave two live secrets for good.
    pub const MAX: Duration = Duration::days(30);
    /// No grace: the old key is revoked with the rotation.
    pub const NONE: Self = Self(Duration::zero());

    pub fn new(grace: Duration) -> Result<Self, GraceOutOfRange> {
        if grace < Duration::zero() || grace > Self::MAX {
            return Err(GraceOutOfRange);
        }
        Ok(Self(grace))
    }

    pub fn get(self) -> Duration {
        self.0
    }
}

/// What a rotation does to the key it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retirement {
    /// No grace period: the old key is revoked with the rotation.
    RevokeNow,
    /// The old key expires at this time (never later than it would have anyway).
    ExpireAt(DateTime<Utc>),
}

/// A workspace's key lifetime policy (`max_key_ttl`): every key created, rotated or
/// delegated in it expires within this long, as GitHub organisations cap token lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyTtl(Duration);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be between 1 minute and {} days, in whole milliseconds", KeyTtl::MAX.num_days())]
pub struct KeyTtlOutOfRange;

impl KeyTtl {
    pub const MIN: Duration = Duration::minutes(1);
    pub const MAX: Duration = Duration::days(3650);

    pub fn new(ttl: Duration) -> Result<Self, KeyTtlOutOfRange> {
        let whole_ms = ttl.subsec_nanos() % 1_000_000 == 0;
        if ttl < Self::MIN || ttl > Self::MAX || !whole_ms {
            return Err(KeyTtlOutOfRange);
        }
        Ok(Self(ttl))
    }

    /// As stored: milliseconds.
    pub fn from_millis(ms: i64) -> Option<Self> {
        Self::new(Duration::milliseconds(ms)).ok()
    }

    pub fn get(self) -> Duration {
        self.0
    }

    pub fn millis(self) -> i64 {
        self.0.num_milliseconds()
    }

    /// The expiry of a key created at `now` asking for `requested`: none asked, the policy's
    /// end; one within it, as asked; a later one (reported on `field`) is refused.
    pub fn expiry(
        policy: Option<Self>,
        requested: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        field: &str,
    ) -> Result<Option<DateTime<Utc>>, RuleViolation> {
        let Some(ttl) = policy else {
            return Ok(requested);
        };
        let end = now + ttl.0;
        match requested {
            None => Ok(Some(end)),
            Some(at) if at <= end => Ok(Some(at)),
            Some(_) => Err(RuleViolation::Invalid(ValidationError::single(
                field,
                format!(
                    "must be within the workspace's max_key_ttl ({}s from now)",
                    ttl.0.num_seconds()
                ),
            ))),
        }
    }

    /// The expiry a rotation's successor gets: the old key's, cut to the policy's end.
    pub fn cut(
        policy: Option<Self>,
        expiry: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match (policy, expiry) {
            (None, expiry) => expiry,
            (Some(ttl), None) => Some(now + ttl.0),
            (Some(ttl), Some(at)) => Some(at.min(now + ttl.0)),
        }
    }
}

/// The name a workspace gets when created without one.
pub const DEFAULT_WORKSPACE_NAME: &str = "Untitled";
/// The category a scope gets when created without one (or when it is emptied).
pub const DEFAULT_SCOPE_CATEGORY: &str = "custom";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_lifetimes_follow_the_workspace_policy() {
        let now = Utc::now();
        let day = KeyTtl::new(Duration::days(1)).unwrap();
        let within = now + Duration::hours(2);
        assert_eq!(KeyTtl::expiry(None, None, now, "f"), Ok(None));
        assert_eq!(
            KeyTtl::expiry(Some(day), None, now, "f"),
            Ok(Some(now + Duration::days(1)))
        );
        assert_eq!(
            KeyTtl::expiry(Some(day), Some(within), now, "f"),
            Ok(Some(within))
        );
        assert!(KeyTtl::expiry(Some(day), Some(now + Duration::days(2)), now, "f").is_err());
        assert_eq!(
            KeyTtl::cut(Some(day), None, now),
            Some(now + Duration::days(1))
        );
        assert_eq!(KeyTtl::cut(Some(day), Some(within), now), Some(within));
        assert_eq!(KeyTtl::cut(None, Some(within), now), Some(within));
        assert!(KeyTtl::new(Duration::seconds(59)).is_err());
        assert!(KeyTtl::new(Duration::days(3651)).is_err());
        assert_eq!(KeyTtl::from_millis(day.millis()), Some(day));
    }

    #[test]
    fn grace_periods_are_bounded() {
        assert!(GracePeriod::new(Duration::zero()).is_ok());
        assert!(GracePeriod::new(GracePeriod::MAX).is_ok());
        assert_eq!(
            GracePeriod::new(GracePeriod::MAX + Duration::nanoseconds(1)),
            Err(GraceOutOfRange)
        );
        assert_eq!(
            GracePeriod::new(Duration::seconds(-1)),
            Err(GraceOutOfRange)
        );
    }
}
