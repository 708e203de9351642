//! Roles: named sets of scopes that keys hold by name (SPEC: a change of what a role may do
//! is one write, not one per key).
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::TenantId;
use super::rules::RuleViolation;
use super::scope::ScopeString;
use super::update::{Patch, Revisioned, named, set};

/// A role's name: `[a-z0-9_.-]{1,64}`, unique per tenant and workspace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleName(String);

impl RoleName {
    pub const MAX: usize = 64;

    pub fn parse(text: &str) -> Option<Self> {
        let ok = (1..=Self::MAX).contains(&text.len())
            && text.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
            });
        ok.then(|| Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A role as the service sees it. The name and the workspace are set on create and never
/// change: keys hold the role by name, within its workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    pub id: Uuid,
    pub tenant_id: TenantId,
    /// `None` for a tenant-wide role.
    pub workspace_id: Option<Uuid>,
    pub name: String,
    pub description: String,
    /// The scopes it grants, sorted.
    pub scopes: Vec<String>,
    pub revision: i64,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
}

impl Role {
    /// A role that keys hold is deleted only when forced (which takes it from them).
    pub fn ensure_deletable(holders: u64, force: bool) -> Result<(), RuleViolation> {
        if holders > 0 && !force {
            return Err(RuleViolation::RoleInUse(holders));
        }
        Ok(())
    }
}

/// The sorted, unique text of these scopes: how a role stores and shows them.
pub fn sorted_scopes(scopes: &[ScopeString]) -> Vec<String> {
    let mut out: Vec<String> = scopes.iter().map(ToString::to_string).collect();
    out.sort();
    out.dedup();
    out
}

#[derive(Debug, Clone)]
pub struct NewRole {
    pub workspace_id: Option<Uuid>,
    pub name: RoleName,
    pub description: String,
    pub scopes: Vec<ScopeString>,
    pub request_id: Option<Uuid>,
}

impl NewRole {
    /// The fields the request set, for the audit log.
    pub fn fields(&self) -> Vec<&'static str> {
        named([
            ("workspace_id", self.workspace_id.is_some()),
            ("name", true),
            ("description", !self.description.is_empty()),
            ("scopes", !self.scopes.is_empty()),
        ])
    }
}

/// The fields an update changes; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct RolePatch {
    pub description: Option<String>,
    /// Written to the role's scope rows by storage (which resolves them).
    pub scopes: Option<Vec<ScopeString>>,
}

impl Patch for RolePatch {
    type Target = Role;

    fn apply(&self, r: &mut Role) -> Result<(), RuleViolation> {
        set(&mut r.description, &self.description);
        if let Some(scopes) = &self.scopes {
            r.scopes = sorted_scopes(scopes);
        }
        Ok(())
    }

    fn fields(&self) -> Vec<&'static str> {
        named([
            ("description", self.description.is_some()),
            ("scopes", self.scopes.is_some()),
        ])
    }
}

impl Revisioned for Role {
    fn id(&self) -> Uuid {
        self.id
    }

    fn revision(&self) -> i64 {
        self.revision
    }

    fn touch(&mut self, now: DateTime<Utc>) {
        self.revision += 1;
        self.update_time = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role() -> Role {
        let now = Utc::now();
        Role {
            id: Uuid::now_v7(),
            tenant_id: TenantId::new(Uuid::now_v7()),
            workspace_id: None,
            name: "support-agent".into(),
            description: "before".into(),
            scopes: vec!["crm:read".into()],
            revision: 1,
            create_time: now,
            update_time: now,
        }
    }

    fn scopes(list: &[&str]) -> Vec<ScopeString> {
        list.iter()
            .map(|s| ScopeString::parse(s).unwrap())
            .collect()
    }

    #[test]
    fn names() {
        for good in ["support-agent", "a", "crm.reader_2", &"x".repeat(64)] {
            assert!(RoleName::parse(good).is_some(), "{good}");
        }
        for bad in ["", "Admin", "has space", "a:b", &"x".repeat(65)] {
            assert!(RoleName::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn a_patch_changes_what_it_names_and_keeps_scopes_sorted() {
        let mut r = role();
        let patch = RolePatch {
            description: None,
            scopes: Some(scopes(&["tickets:write", "crm:read", "tickets:write"])),
        };
        patch.apply(&mut r).unwrap();
        assert_eq!(r.scopes, ["crm:read", "tickets:write"]);
        assert_eq!(r.description, "before");
        assert_eq!(patch.fields(), ["scopes"]);
        let now = Utc::now();
        r.touch(now);
        assert_eq!((r.revision, r.update_time), (2, now));
    }

    #[test]
    fn held_roles_go_only_when_forced() {
        assert_eq!(Role::ensure_deletable(0, false), Ok(()));
        assert_eq!(Role::ensure_deletable(3, true), Ok(()));
        assert_eq!(
            Role::ensure_deletable(3, false),
            Err(RuleViolation::RoleInUse(3))
        );
    }
}
