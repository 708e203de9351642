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

/// The name a workspace gets when created without one.
pub const DEFAULT_WORKSPACE_NAME: &str = "Untitled";
/// The category a scope gets when created without one (or when it is emptied).
pub const DEFAULT_SCOPE_CATEGORY: &str = "custom";

#[cfg(test)]
mod tests {
    use super::*;

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
