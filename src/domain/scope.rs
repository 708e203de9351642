//! Scope strings (`resource:action`), the built-in scopes of keyplane's own API, and the
//! matching rule: a granted `R:*` satisfies any required `R:action`, otherwise the strings
//! must be equal.
use std::fmt;

use uuid::Uuid;

/// Maximum length of each half of a scope string.
pub const PART_MAX: usize = 64;
/// The namespace reserved for keyplane's own scopes.
pub const RESERVED_NAMESPACE: &str = "keyplane";

/// Why a scope string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("must have the form resource:action")]
    Shape,
    #[error("resource must match ^[A-Za-z0-9._-]{{1,64}}$")]
    Resource,
    #[error("action must match ^[A-Za-z0-9._*-]{{1,64}}$")]
    Action,
    #[error("the resource namespace `keyplane` is reserved")]
    Reserved,
}

fn valid_part(part: &str, allow_star: bool) -> bool {
    (1..=PART_MAX).contains(&part.len())
        && part.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'.' | b'_' | b'-')
                || (allow_star && b == b'*')
        })
}

/// A syntactically valid `resource:action` string (built-in or custom).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScopeString {
    text: String,
    colon: usize,
}

impl ScopeString {
    /// Builds a scope from its two halves.
    pub fn from_parts(resource: &str, action: &str) -> Result<Self, ScopeError> {
        if !valid_part(resource, false) {
            return Err(ScopeError::Resource);
        }
        if !valid_part(action, true) {
            return Err(ScopeError::Action);
        }
        Ok(Self {
            text: format!("{resource}:{action}"),
            colon: resource.len(),
        })
    }

    /// Parses `resource:action`.
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let (resource, action) = text.split_once(':').ok_or(ScopeError::Shape)?;
        Self::from_parts(resource, action)
    }

    /// Like [`ScopeString::parse`], but refuses the reserved `keyplane` namespace: what
    /// tenants may create.
    pub fn parse_custom(resource: &str, action: &str) -> Result<Self, ScopeError> {
        let scope = Self::from_parts(resource, action)?;
        if scope.is_reserved() {
            return Err(ScopeError::Reserved);
        }
        Ok(scope)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn resource(&self) -> &str {
        &self.text[..self.colon]
    }

    pub fn action(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    /// Whether the resource is `keyplane` or under `keyplane.`.
    pub fn is_reserved(&self) -> bool {
        let resource = self.resource();
        resource == RESERVED_NAMESPACE
            || resource
                .strip_prefix(RESERVED_NAMESPACE)
                .is_some_and(|rest| rest.starts_with('.'))
    }
}

impl fmt::Display for ScopeString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether the granted scope string satisfies the required one. Granted strings are taken
/// as they come (a JWT may carry `openid` and such), so this works on plain text.
pub fn satisfies(granted: &str, required: &ScopeString) -> bool {
    if granted == required.as_str() {
        return true;
    }
    granted
        .strip_suffix(":*")
        .is_some_and(|resource| resource == required.resource())
}

/// Whether any of the granted scopes satisfies the required one.
pub fn any_satisfies<S: AsRef<str>>(granted: &[S], required: &ScopeString) -> bool {
    granted.iter().any(|g| satisfies(g.as_ref(), required))
}

/// The required scopes that none of the granted scopes satisfies, in request order.
pub fn missing<'a, S: AsRef<str>>(
    granted: &[S],
    required: &'a [ScopeString],
) -> Vec<&'a ScopeString> {
    required
        .iter()
        .filter(|r| !any_satisfies(granted, r))
        .collect()
}

/// What a key holding `own` may do under a parent that holds `parent` now: each of its
/// scopes the parent covers, and where it asks for a whole resource (`R:*`) the parent holds
/// only parts of, those parts. Sorted, without repeats. This is how a change to an ancestor
/// narrows every descendant without rewriting them.
pub fn narrow<S: AsRef<str>, P: AsRef<str>>(own: &[S], parent: &[P]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for scope in own.iter().map(AsRef::as_ref) {
        if parent.iter().any(|p| covers(p.as_ref(), scope)) {
            out.push(scope.to_owned());
        } else if let Some(resource) = scope.strip_suffix(":*") {
            out.extend(
                parent
                    .iter()
                    .map(AsRef::as_ref)
                    .filter(|p| p.split_once(':').is_some_and(|(r, _)| r == resource))
                    .map(str::to_owned),
            );
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether holding `granted` includes holding `scope` (both granted strings): equal, or
/// `granted` is `R:*` and `scope` is of resource `R`.
pub fn covers(granted: &str, scope: &str) -> bool {
    granted == scope
        || granted.strip_suffix(":*").is_some_and(|resource| {
            scope
                .split_once(':')
                .is_some_and(|(scope_resource, _)| scope_resource == resource)
        })
}

/// keyplane's own scopes, one per kind of access to its API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BuiltinScope {
    WorkspacesRead,
    WorkspacesWrite,
    ScopesRead,
    ScopesWrite,
    ApiKeysRead,
    ApiKeysWrite,
    ApiKeysVerify,
    AuditRead,
    ApiKeysDelegate,
    RolesRead,
    RolesWrite,
}

impl BuiltinScope {
    /// Their order fixes their ids ([`BuiltinScope::id`]): add new ones at the end.
    pub const ALL: [BuiltinScope; 11] = [
        BuiltinScope::WorkspacesRead,
        BuiltinScope::WorkspacesWrite,
        BuiltinScope::ScopesRead,
        BuiltinScope::ScopesWrite,
        BuiltinScope::ApiKeysRead,
        BuiltinScope::ApiKeysWrite,
        BuiltinScope::ApiKeysVerify,
        BuiltinScope::AuditRead,
        BuiltinScope::ApiKeysDelegate,
        BuiltinScope::RolesRead,
        BuiltinScope::RolesWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuiltinScope::WorkspacesRead => "keyplane.workspaces:read",
            BuiltinScope::WorkspacesWrite => "keyplane.workspaces:write",
            BuiltinScope::ScopesRead => "keyplane.scopes:read",
            BuiltinScope::ScopesWrite => "keyplane.scopes:write",
            BuiltinScope::ApiKeysRead => "keyplane.api_keys:read",
            BuiltinScope::ApiKeysWrite => "keyplane.api_keys:write",
            BuiltinScope::ApiKeysVerify => "keyplane.api_keys:verify",
            BuiltinScope::AuditRead => "keyplane.audit:read",
            BuiltinScope::ApiKeysDelegate => "keyplane.api_keys:delegate",
            BuiltinScope::RolesRead => "keyplane.roles:read",
            BuiltinScope::RolesWrite => "keyplane.roles:write",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == text)
    }

    /// A fixed id, the same on every deployment. The timestamp bits are zero, so built-ins
    /// sort before every generated UUIDv7 and keyset pagination lists them first.
    pub fn id(self) -> Uuid {
        let index = Self::ALL.iter().position(|b| *b == self).unwrap_or(0) as u128;
        Uuid::from_u128(0x0000_0000_0000_7000_8000_0000_0000_0001 + index)
    }

    pub fn from_id(id: Uuid) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.id() == id)
    }

    /// Whether a granted scope string satisfies this built-in scope (the matching rule of
    /// [`satisfies`], without building a [`ScopeString`]: it runs on every call).
    pub fn granted_by(self, granted: &str) -> bool {
        let needed = self.as_str();
        granted == needed
            || granted.strip_suffix(":*").is_some_and(|resource| {
                needed
                    .split_once(':')
                    .is_some_and(|(needed_resource, _)| needed_resource == resource)
            })
    }

    pub fn scope(self) -> ScopeString {
        // The constants above are valid scope strings; a failure here is a typo caught by
        // the unit tests.
        ScopeString::parse(self.as_str()).unwrap_or_else(|_| unreachable!("bad built-in"))
    }

    pub fn description(self) -> &'static str {
        match self {
            BuiltinScope::WorkspacesRead => "Read workspaces",
            BuiltinScope::WorkspacesWrite => "Create, change and delete workspaces",
            BuiltinScope::ScopesRead => "Read scopes",
            BuiltinScope::ScopesWrite => "Create, change and delete scopes",
            BuiltinScope::ApiKeysRead => "Read API keys",
            BuiltinScope::ApiKeysWrite => "Create, change, rotate, revoke and delete API keys",
            BuiltinScope::ApiKeysVerify => "Verify API keys",
            BuiltinScope::AuditRead => "Read the audit log",
            BuiltinScope::ApiKeysDelegate => {
                "Mint narrower child keys of the calling key (DelegateApiKey)"
            }
            BuiltinScope::RolesRead => "Read roles",
            BuiltinScope::RolesWrite => "Create, change and delete roles",
        }
    }
}

impl fmt::Display for BuiltinScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_keeps_only_what_the_parent_covers() {
        let parent = ["crm:read", "billing:*", "erp:read", "erp:write"];
        assert_eq!(
            narrow(&["crm:read", "crm:write", "billing:pay", "erp:*"], &parent),
            ["billing:pay", "crm:read", "erp:read", "erp:write"]
        );
        assert!(narrow(&["crm:read"], &[] as &[&str]).is_empty());
        assert_eq!(narrow(&["crm:*"], &["crm:*"]), ["crm:*"]);
        assert!(covers("crm:*", "crm:*") && covers("crm:*", "crm:x") && !covers("crm:x", "crm:*"));
    }

    #[test]
    fn granted_by_agrees_with_satisfies() {
        let granted = [
            "keyplane.api_keys:*",
            "keyplane.api_keys:verify",
            "keyplane.api_keys:verif",
            "keyplane:*",
            "keyplane.workspaces:*",
            "*",
            ":*",
            "openid",
        ];
        for b in BuiltinScope::ALL {
            for g in granted.iter().copied().chain([b.as_str()]) {
                assert_eq!(b.granted_by(g), satisfies(g, &b.scope()), "{b} by {g}");
            }
        }
    }
    use proptest::prelude::*;

    #[test]
    fn builtins_are_valid_reserved_and_have_distinct_stable_ids() {
        let mut ids = std::collections::HashSet::new();
        for b in BuiltinScope::ALL {
            let s = b.scope();
            assert!(s.is_reserved(), "{b}");
            assert_eq!(BuiltinScope::parse(b.as_str()), Some(b));
            assert_eq!(BuiltinScope::from_id(b.id()), Some(b));
            assert!(ids.insert(b.id()));
        }
        assert_eq!(
            BuiltinScope::WorkspacesRead.id().to_string(),
            "00000000-0000-7000-8000-000000000001"
        );
    }

    #[test]
    fn parses_and_rejects() {
        let s = ScopeString::parse("crm:read").unwrap();
        assert_eq!((s.resource(), s.action()), ("crm", "read"));
        assert!(ScopeString::parse("crm.contacts_v2-x:*").is_ok());
        assert_eq!(ScopeString::parse("crm"), Err(ScopeError::Shape));
        assert_eq!(ScopeString::parse(":read"), Err(ScopeError::Resource));
        assert_eq!(ScopeString::parse("crm:"), Err(ScopeError::Action));
        assert_eq!(ScopeString::parse("c*m:read"), Err(ScopeError::Resource));
        assert_eq!(ScopeString::parse("crm:re:ad"), Err(ScopeError::Action));
        assert_eq!(ScopeString::parse("crm:réad"), Err(ScopeError::Action));
        assert_eq!(
            ScopeString::parse(&format!("{}:r", "a".repeat(65))),
            Err(ScopeError::Resource)
        );
        assert!(ScopeString::parse(&format!("{}:r", "a".repeat(64))).is_ok());
        assert_eq!(
            ScopeString::parse_custom("keyplane", "x"),
            Err(ScopeError::Reserved)
        );
        assert_eq!(
            ScopeString::parse_custom("keyplane.x", "y"),
            Err(ScopeError::Reserved)
        );
        assert!(ScopeString::parse_custom("keyplanex", "y").is_ok());
    }

    #[test]
    fn matching() {
        let read = ScopeString::parse("crm:read").unwrap();
        assert!(satisfies("crm:read", &read));
        assert!(satisfies("crm:*", &read));
        assert!(!satisfies("crm:write", &read));
        assert!(!satisfies("cr:*", &read));
        assert!(!satisfies("*:*", &read));
        assert!(!satisfies("crm:rea*", &read));
        let star = ScopeString::parse("crm:*").unwrap();
        assert!(satisfies("crm:*", &star));
        assert!(!satisfies("crm:read", &star));
        let req = [read.clone(), ScopeString::parse("erp:read").unwrap()];
        assert_eq!(missing(&["crm:*"], &req), vec![&req[1]]);
    }

    fn part() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._-]{1,64}"
    }

    proptest! {
        #[test]
        fn any_valid_scope_round_trips(r in part(), a in "[A-Za-z0-9._*-]{1,64}") {
            let s = ScopeString::from_parts(&r, &a).unwrap();
            let again = ScopeString::parse(s.as_str()).unwrap();
            prop_assert_eq!(again.resource(), r.as_str());
            prop_assert_eq!(again.action(), a.as_str());
        }

        #[test]
        fn parse_never_panics(text in ".{0,200}") {
            let _ = ScopeString::parse(&text);
        }

        #[test]
        fn wildcard_grants_exactly_its_resource(r in part(), other in part(), a in "[A-Za-z0-9._-]{1,64}") {
            let required = ScopeString::from_parts(&r, &a).unwrap();
            let wildcard = format!("{r}:*");
            prop_assert!(satisfies(&wildcard, &required));
            prop_assert_eq!(satisfies(&format!("{other}:*"), &required), other == r);
            prop_assert!(satisfies(required.as_str(), &required));
        }
    }
}
