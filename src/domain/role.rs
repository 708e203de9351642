//! Roles: named sets of scopes that keys hold by name (SPEC: a change of what a role may do
//! is one write, not one per key).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["support-agent", "a", "crm.reader_2", &"x".repeat(64)] {
            assert!(RoleName::parse(good).is_some(), "{good}");
        }
        for bad in ["", "Admin", "has space", "a:b", &"x".repeat(65)] {
            assert!(RoleName::parse(bad).is_none(), "{bad}");
        }
    }
}
