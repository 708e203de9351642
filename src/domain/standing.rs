//! A key's standing: everything its verification depends on besides its own row — what its
//! roles grant and the state of every ancestor it was delegated from — resolved once, when
//! the key is read, so that a verification is one lookup and a few comparisons however deep
//! the key sits. The cache holds standings, and a write to a role or an ancestor evicts the
//! standings it changes (`storage::invalidation`): they are never patched in place.
//!
//! The rules (SPEC §3.8, §3.9):
//! - a key holds its own scopes and its roles' scopes;
//! - a delegated key holds only what every ancestor holds now: its scopes are narrowed by
//!   its parent's effective scopes, which were narrowed by theirs ([`scope::narrow`]), so an
//!   ancestor's re-scope reaches the whole subtree;
//! - a delegated key is usable only while every ancestor is: revoked, then expired, then
//!   disabled, whichever key of the chain is in that state;
//! - a delegated key is used only from where every key of its chain may be used: each
//!   allow-list of the chain must admit the client's address.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::network::ClientAddress;
use super::permission::PermissionQuery;
use super::records::{ApiKey, VerifyCode};
use super::scope::{self, ScopeString};

#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub key: ApiKey,
    /// The key's ancestors, root first; empty for a key not minted by delegation.
    pub ancestors: Vec<ApiKey>,
    /// What the key holds now: its scopes and its roles', narrowed by its chain. Sorted.
    pub effective: Vec<String>,
    /// An ancestor the key names is gone (deleted): the key is answered as revoked, as
    /// deleting a key revokes its descendants.
    broken: bool,
}

impl Standing {
    /// A key that holds no roles and was not delegated: its scopes are all it holds.
    pub fn plain(key: ApiKey) -> Self {
        Self {
            effective: key.scopes.clone(),
            key,
            ancestors: Vec::new(),
            broken: false,
        }
    }

    /// Resolves a key from its own row and its roles' scopes, and each ancestor's (in any
    /// order: they are put in the key's `ancestry` order here).
    pub fn resolve(
        key: ApiKey,
        role_scopes: Vec<String>,
        ancestors: Vec<(ApiKey, Vec<String>)>,
    ) -> Self {
        let mut by_id: Vec<(ApiKey, Vec<String>)> = Vec::with_capacity(key.ancestry.len());
        let mut found = ancestors;
        for id in &key.ancestry {
            if let Some(i) = found.iter().position(|(a, _)| a.id == *id) {
                by_id.push(found.swap_remove(i));
            }
        }
        let broken = by_id.len() != key.ancestry.len();
        let mut effective: Option<Vec<String>> = None;
        let mut ancestors = Vec::with_capacity(by_id.len());
        for (ancestor, roles) in by_id {
            effective = Some(narrowed(held(&ancestor.scopes, roles), effective));
            ancestors.push(ancestor);
        }
        let effective = narrowed(held(&key.scopes, role_scopes), effective);
        Self {
            key,
            ancestors,
            effective,
            broken,
        }
    }

    /// The checks of SPEC §3.4 up to the scopes, in their order: revoked, expired and
    /// disabled (of the key or any ancestor), the client's address against every
    /// allow-list of the chain, then the required scopes and the permission query against
    /// what the key holds now. The scopes it lacks (the query's terms it does not hold,
    /// when the query fails) come with [`VerifyCode::InsufficientScopes`].
    pub fn check(
        &self,
        now: DateTime<Utc>,
        client: Option<ClientAddress>,
        required: &[ScopeString],
        query: Option<&PermissionQuery>,
    ) -> (VerifyCode, Vec<String>) {
        if let Some(code) = self.unusable(now) {
            return (code, Vec::new());
        }
        if !self.chain().all(|k| k.allowed_cidrs.admits(client)) {
            return (VerifyCode::IpNotAllowed, Vec::new());
        }
        let mut missing: Vec<String> = scope::missing(&self.effective, required)
            .into_iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(query) = query {
            for term in query.missing(&self.effective) {
                if !missing.contains(&term) {
                    missing.push(term);
                }
            }
        }
        if missing.is_empty() {
            (VerifyCode::Valid, missing)
        } else {
            (VerifyCode::InsufficientScopes, missing)
        }
    }

    /// Revoked, expired or disabled — the key or any ancestor — in that order; `None` when
    /// the whole chain is usable.
    pub fn unusable(&self, now: DateTime<Utc>) -> Option<VerifyCode> {
        if self.broken {
            return Some(VerifyCode::Revoked);
        }
        let codes = self.chain().filter_map(|k| k.unusable(now));
        codes.min_by_key(|code| match code {
            VerifyCode::Revoked => 0,
            VerifyCode::Expired => 1,
            _ => 2,
        })
    }

    /// The key and its ancestors, the key first: whose budgets a use of the key is charged
    /// to.
    pub fn chain(&self) -> impl Iterator<Item = &ApiKey> {
        std::iter::once(&self.key).chain(self.ancestors.iter().rev())
    }

    /// Whether a use spends anything: a rate limit or credits anywhere in the chain.
    pub fn has_usage_controls(&self) -> bool {
        self.chain().any(ApiKey::has_usage_controls)
    }

    /// The key ids from the root to this key; empty for a key not minted by delegation.
    pub fn delegation_chain(&self) -> Vec<Uuid> {
        if self.key.ancestry.is_empty() {
            return Vec::new();
        }
        let mut ids = self.key.ancestry.clone();
        ids.push(self.key.id);
        ids
    }

    /// The built-in scopes the key holds now: what it may do as a credential of keyplane's
    /// own API.
    pub fn builtin_scopes(&self) -> impl Iterator<Item = scope::BuiltinScope> + '_ {
        self.effective
            .iter()
            .filter_map(|s| scope::BuiltinScope::parse(s))
    }
}

/// A key's own scopes and its roles', sorted and without repeats.
fn held(own: &[String], roles: Vec<String>) -> Vec<String> {
    let mut all = roles;
    all.extend(own.iter().cloned());
    all.sort();
    all.dedup();
    all
}

fn narrowed(held: Vec<String>, parent: Option<Vec<String>>) -> Vec<String> {
    match parent {
        None => held,
        Some(parent) => scope::narrow(&held, &parent),
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn key(scopes: &[&str]) -> ApiKey {
        ApiKey {
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ..ApiKey::fixture()
        }
    }

    fn child_of(parent: &ApiKey, scopes: &[&str]) -> ApiKey {
        let mut ancestry = parent.ancestry.clone();
        ancestry.push(parent.id);
        ApiKey {
            parent_id: Some(parent.id),
            delegation_depth: parent.delegation_depth + 1,
            ancestry,
            ..key(scopes)
        }
    }

    fn need(s: &str) -> Vec<ScopeString> {
        vec![ScopeString::parse(s).unwrap()]
    }

    #[test]
    fn checks_run_in_the_specified_order() {
        let now = Utc::now();
        let mut k = key(&["crm:*"]);
        let standing = |k: &ApiKey| Standing::plain(k.clone());
        assert_eq!(
            standing(&k).check(now, None, &need("erp:read"), None),
            (VerifyCode::InsufficientScopes, vec!["erp:read".into()])
        );
        assert_eq!(
            standing(&k).check(now, None, &need("crm:read"), None).0,
            VerifyCode::Valid
        );
        k.disabled = true;
        assert_eq!(
            standing(&k).check(now, None, &need("erp:read"), None).0,
            VerifyCode::Disabled
        );
        k.expire_time = Some(now - Duration::seconds(1));
        assert_eq!(
            standing(&k).check(now, None, &need("erp:read"), None).0,
            VerifyCode::Expired
        );
        k.revoke_time = Some(now);
        assert_eq!(
            standing(&k).check(now, None, &need("erp:read"), None).0,
            VerifyCode::Revoked
        );
    }

    #[test]
    fn every_allow_list_of_the_chain_must_admit_the_client() {
        use crate::domain::network::{AllowedNetworks, Network};
        let now = Utc::now();
        let nets = |e: &str| AllowedNetworks::new([Network::parse(e).unwrap()]);
        let at = |ip: &str| Some(ClientAddress::parse(ip).unwrap());
        let mut root = key(&["crm:read"]);
        root.allowed_cidrs = nets("10.0.0.0/8");
        let mut child = child_of(&root, &["crm:read"]);
        child.allowed_cidrs = nets("10.1.0.0/16");
        let s = Standing::resolve(child.clone(), Vec::new(), vec![(root.clone(), Vec::new())]);
        assert_eq!(s.check(now, at("10.1.2.3"), &[], None).0, VerifyCode::Valid);
        assert_eq!(
            s.check(now, at("10.2.0.1"), &[], None).0,
            VerifyCode::IpNotAllowed
        );
        assert_eq!(s.check(now, None, &[], None).0, VerifyCode::IpNotAllowed);
        // The root narrows later: the child follows.
        root.allowed_cidrs = nets("10.9.0.0/16");
        let s = Standing::resolve(child, Vec::new(), vec![(root, Vec::new())]);
        assert_eq!(
            s.check(now, at("10.1.2.3"), &need("crm:read"), None).0,
            VerifyCode::IpNotAllowed
        );
        // The address is checked after the key's state and before its scopes.
        let mut k = key(&[]);
        k.allowed_cidrs = nets("192.0.2.1");
        assert_eq!(
            Standing::plain(k.clone())
                .check(now, at("192.0.2.1"), &need("x:y"), None)
                .0,
            VerifyCode::InsufficientScopes
        );
        k.disabled = true;
        assert_eq!(
            Standing::plain(k).check(now, at("192.0.2.2"), &[], None).0,
            VerifyCode::Disabled
        );
    }

    #[test]
    fn a_permission_query_must_hold_too() {
        let s = Standing::plain(key(&["crm:read", "billing:*"]));
        let query = |q: &str| PermissionQuery::parse(q).unwrap();
        let now = Utc::now();
        let holds = query("crm:read AND (crm:write OR billing:pay)");
        assert_eq!(
            s.check(now, None, &[], Some(&holds)),
            (VerifyCode::Valid, Vec::new())
        );
        let fails = query("crm:write OR erp:read");
        assert_eq!(
            s.check(now, None, &need("crm:read"), Some(&fails)),
            (
                VerifyCode::InsufficientScopes,
                vec!["crm:write".to_owned(), "erp:read".to_owned()]
            )
        );
        // Both must hold: a required scope missing fails a query that holds.
        let (code, missing) = s.check(now, None, &need("erp:read"), Some(&holds));
        assert_eq!(
            (code, missing),
            (VerifyCode::InsufficientScopes, vec!["erp:read".to_owned()])
        );
    }

    #[test]
    fn roles_add_to_what_a_key_holds() {
        let s = Standing::resolve(key(&["crm:read"]), vec!["billing:read".into()], Vec::new());
        assert_eq!(s.effective, ["billing:read", "crm:read"]);
        assert_eq!(
            s.check(Utc::now(), None, &need("billing:read"), None).0,
            VerifyCode::Valid
        );
    }

    #[test]
    fn a_grandchild_holds_what_its_whole_chain_holds_now() {
        let now = Utc::now();
        let root = key(&["crm:*", "erp:read"]);
        let child = child_of(&root, &["crm:read", "crm:write", "erp:read"]);
        let grandchild = child_of(&child, &["crm:*"]);
        let resolve = |root: &ApiKey, child: &ApiKey| {
            Standing::resolve(
                grandchild.clone(),
                Vec::new(),
                vec![(child.clone(), Vec::new()), (root.clone(), Vec::new())],
            )
        };
        let s = resolve(&root, &child);
        assert_eq!(s.effective, ["crm:read", "crm:write"]);
        assert_eq!(s.delegation_chain(), [root.id, child.id, grandchild.id]);
        assert_eq!(
            s.chain().map(|k| k.id).collect::<Vec<_>>(),
            [grandchild.id, child.id, root.id]
        );
        // The root is re-scoped: the grandchild loses what the root no longer has.
        let narrower = key(&["crm:read"]);
        let narrower = ApiKey {
            id: root.id,
            ..narrower
        };
        assert_eq!(resolve(&narrower, &child).effective, ["crm:read"]);
        // The root gets a role with crm:write back: so does the grandchild.
        let s = Standing::resolve(
            grandchild.clone(),
            Vec::new(),
            vec![
                (child.clone(), Vec::new()),
                (narrower.clone(), vec!["crm:write".into()]),
            ],
        );
        assert_eq!(s.effective, ["crm:read", "crm:write"]);
        // Any ancestor's state is the grandchild's.
        let mut disabled = child.clone();
        disabled.disabled = true;
        assert_eq!(
            resolve(&root, &disabled).check(now, None, &[], None).0,
            VerifyCode::Disabled
        );
        let mut revoked = root.clone();
        revoked.revoke_time = Some(now);
        assert_eq!(
            resolve(&revoked, &disabled).check(now, None, &[], None).0,
            VerifyCode::Revoked
        );
        let mut expired = root.clone();
        expired.expire_time = Some(now - Duration::seconds(1));
        assert_eq!(
            resolve(&expired, &disabled).check(now, None, &[], None).0,
            VerifyCode::Expired
        );
        // A deleted ancestor: answered as revoked.
        let orphan = Standing::resolve(
            grandchild.clone(),
            Vec::new(),
            vec![(root.clone(), Vec::new())],
        );
        assert_eq!(orphan.check(now, None, &[], None).0, VerifyCode::Revoked);
    }
}
