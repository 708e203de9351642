//! Delegation (SPEC §3.8): a key mints a child that can do less, for less time, and that
//! dies with it. This module decides whether a requested child is within its parent; storage
//! writes it, and verification keeps it within its chain for as long as it lives
//! ([`super::standing`]).
use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::network::AllowedNetworks;
use super::records::StringMap;
use super::role::RoleName;
use super::rules::RuleViolation;
use super::scope::{self, BuiltinScope, ScopeString};
use super::standing::Standing;
use super::usage::{CreditLimit, RateLimits};

/// The deepest a key may sit: a chain holds at most 4 keys, root included.
pub const MAX_DEPTH: u8 = 3;
/// A child's lifetime when the request names none (cut to its parent's, if shorter).
pub const DEFAULT_TTL: Duration = Duration::hours(1);

/// How long the child lives, as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    Until(DateTime<Utc>),
    For(Duration),
}

/// A validated `DelegateApiKey` request.
#[derive(Debug, Clone)]
pub struct NewDelegation {
    pub name: String,
    pub scopes: Vec<ScopeString>,
    pub roles: Vec<RoleName>,
    /// `None`: [`DEFAULT_TTL`].
    pub lifetime: Option<Lifetime>,
    pub metadata: StringMap,
    pub owner_id: Option<String>,
    pub credits: Option<CreditLimit>,
    pub rate_limits: RateLimits,
    pub delegable: bool,
    /// `None`: the parent's allow-list.
    pub allowed_cidrs: Option<AllowedNetworks>,
    pub request_id: Option<Uuid>,
}

impl NewDelegation {
    /// The fields the request set, for the audit log.
    pub fn fields(&self) -> Vec<&'static str> {
        super::update::named([
            ("name", !self.name.is_empty()),
            ("scopes", !self.scopes.is_empty()),
            ("roles", !self.roles.is_empty()),
            ("expire_time", true),
            ("metadata", !self.metadata.is_empty()),
            ("owner_id", self.owner_id.is_some()),
            ("remaining_uses", self.credits.is_some()),
            ("rate_limits", !self.rate_limits.is_empty()),
            ("delegable", self.delegable),
            ("allowed_cidrs", self.allowed_cidrs.is_some()),
        ])
    }
}

/// What the rules make of an admitted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    /// The child's own scopes: the requested ones, and `keyplane.api_keys:delegate` when it
    /// may delegate in turn. Sorted.
    pub scopes: Vec<String>,
    pub expire_time: DateTime<Utc>,
    pub depth: u8,
    /// Root first, ending with the parent.
    pub ancestry: Vec<Uuid>,
    pub allowed_cidrs: AllowedNetworks,
}

fn exceeds(field: &'static str, why: impl Into<String>) -> RuleViolation {
    RuleViolation::DelegationExceedsParent {
        field,
        why: why.into(),
    }
}

/// Whether `parent` may mint the child `new` asks for, whose roles grant `role_scopes`, at
/// `now` with `max_ttl` the server's ceiling on a child's lifetime. Never wider than the
/// parent: scopes (its own and its roles') within the parent's effective scopes, expiry
/// within the parent's chain and the ceiling, depth at most [`MAX_DEPTH`].
pub fn admit(
    parent: &Standing,
    new: &NewDelegation,
    role_scopes: &[String],
    now: DateTime<Utc>,
    max_ttl: Duration,
) -> Result<Child, RuleViolation> {
    let depth = parent.key.delegation_depth + 1;
    if depth > MAX_DEPTH {
        return Err(exceeds(
            "delegation_depth",
            format!(
                "a key at depth {} cannot delegate: at most {MAX_DEPTH}",
                depth - 1
            ),
        ));
    }
    let outside = |scopes: &mut dyn Iterator<Item = &str>| {
        scopes
            .filter(|s| !parent.effective.iter().any(|p| scope::covers(p, s)))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let beyond = outside(&mut new.scopes.iter().map(ScopeString::as_str));
    if !beyond.is_empty() {
        return Err(exceeds(
            "scopes",
            format!("the parent does not hold {}", beyond.join(", ")),
        ));
    }
    let beyond = outside(&mut role_scopes.iter().map(String::as_str));
    if !beyond.is_empty() {
        return Err(exceeds(
            "roles",
            format!(
                "the roles grant what the parent does not hold: {}",
                beyond.join(", ")
            ),
        ));
    }
    let delegate = BuiltinScope::ApiKeysDelegate;
    let may_delegate = new.delegable
        || new.scopes.iter().any(|s| delegate.granted_by(s.as_str()))
        || role_scopes.iter().any(|s| delegate.granted_by(s));
    if may_delegate && depth >= MAX_DEPTH {
        return Err(exceeds(
            "delegable",
            format!("a key at depth {MAX_DEPTH} cannot delegate further"),
        ));
    }

    let parent_end = parent.chain().filter_map(|k| k.expire_time).min();
    let expire_time = match new.lifetime {
        Some(Lifetime::Until(at)) => at,
        Some(Lifetime::For(ttl)) => now + ttl,
        // Unasked, the default hour is cut to what the parent and the ceiling allow: a
        // child of a short-lived parent is what its caller wants, not a refusal.
        None => [Some(now + DEFAULT_TTL), Some(now + max_ttl), parent_end]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now + DEFAULT_TTL),
    };
    let field = match new.lifetime {
        Some(Lifetime::For(_)) | None => "ttl",
        Some(Lifetime::Until(_)) => "expire_time",
    };
    if expire_time > now + max_ttl {
        return Err(exceeds(
            field,
            format!("at most {}s from now", max_ttl.num_seconds()),
        ));
    }
    if let Some(end) = parent_end.filter(|end| expire_time > *end) {
        return Err(exceeds(
            field,
            format!("the parent's chain expires at {}", end.to_rfc3339()),
        ));
    }

    let allowed_cidrs = match &new.allowed_cidrs {
        None => parent.key.allowed_cidrs.clone(),
        Some(asked) if asked.within(&parent.key.allowed_cidrs) => asked.clone(),
        Some(_) => {
            return Err(exceeds(
                "allowed_cidrs",
                "every network must lie within one of the parent's allowed_cidrs",
            ));
        }
    };

    let mut scopes: Vec<String> = new.scopes.iter().map(ToString::to_string).collect();
    if new.delegable {
        scopes.push(delegate.as_str().to_owned());
    }
    scopes.sort();
    scopes.dedup();
    let mut ancestry = parent.key.ancestry.clone();
    ancestry.push(parent.key.id);
    Ok(Child {
        scopes,
        expire_time,
        depth,
        ancestry,
        allowed_cidrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::records::ApiKey;

    fn parent(scopes: &[&str]) -> Standing {
        Standing::plain(ApiKey {
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ..ApiKey::fixture()
        })
    }

    fn ask(scopes: &[&str]) -> NewDelegation {
        NewDelegation {
            name: String::new(),
            scopes: scopes
                .iter()
                .map(|s| ScopeString::parse(s).unwrap())
                .collect(),
            roles: Vec::new(),
            lifetime: None,
            metadata: StringMap::new(),
            owner_id: None,
            credits: None,
            rate_limits: RateLimits::default(),
            delegable: false,
            allowed_cidrs: None,
            request_id: None,
        }
    }

    fn field(result: Result<Child, RuleViolation>) -> &'static str {
        match result {
            Err(RuleViolation::DelegationExceedsParent { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    const DAY: Duration = Duration::hours(24);

    #[test]
    fn a_child_gets_at_most_what_its_parent_holds() {
        let now = Utc::now();
        let p = parent(&["crm:*", "keyplane.api_keys:delegate"]);
        let child = admit(&p, &ask(&["crm:read"]), &[], now, DAY).unwrap();
        assert_eq!(child.scopes, ["crm:read"]);
        assert_eq!(child.expire_time, now + DEFAULT_TTL);
        assert_eq!((child.depth, child.ancestry.clone()), (1, vec![p.key.id]));
        assert_eq!(
            field(admit(&p, &ask(&["erp:read"]), &[], now, DAY)),
            "scopes"
        );
        assert_eq!(
            field(admit(&p, &ask(&[]), &["erp:read".to_owned()], now, DAY)),
            "roles"
        );
        let delegable = NewDelegation {
            delegable: true,
            ..ask(&["crm:read"])
        };
        assert_eq!(
            admit(&p, &delegable, &[], now, DAY).unwrap().scopes,
            ["crm:read", "keyplane.api_keys:delegate"]
        );
    }

    #[test]
    fn lifetimes_stay_within_the_parent_and_the_ceiling() {
        let now = Utc::now();
        let mut p = parent(&["crm:read"]);
        let long = NewDelegation {
            lifetime: Some(Lifetime::For(DAY + Duration::seconds(1))),
            ..ask(&[])
        };
        assert_eq!(field(admit(&p, &long, &[], now, DAY)), "ttl");
        p.key.expire_time = Some(now + Duration::minutes(10));
        let later = NewDelegation {
            lifetime: Some(Lifetime::Until(now + Duration::minutes(11))),
            ..ask(&[])
        };
        assert_eq!(field(admit(&p, &later, &[], now, DAY)), "expire_time");
        // The default hour is longer than the parent's ten minutes: cut to them.
        assert_eq!(
            admit(&p, &ask(&[]), &[], now, DAY).unwrap().expire_time,
            now + Duration::minutes(10)
        );
    }

    #[test]
    fn allow_lists_stay_within_the_parents() {
        use crate::domain::network::Network;
        let now = Utc::now();
        let nets = |e: &[&str]| AllowedNetworks::new(e.iter().map(|e| Network::parse(e).unwrap()));
        let mut p = parent(&["crm:read"]);
        // An unrestricted parent: the child may restrict itself, or not.
        let asked = |e: &[&str]| NewDelegation {
            allowed_cidrs: Some(nets(e)),
            ..ask(&[])
        };
        assert_eq!(
            admit(&p, &asked(&["10.0.0.0/8"]), &[], now, DAY)
                .unwrap()
                .allowed_cidrs,
            nets(&["10.0.0.0/8"])
        );
        p.key.allowed_cidrs = nets(&["10.0.0.0/8"]);
        // Unasked: the parent's list.
        assert_eq!(
            admit(&p, &ask(&[]), &[], now, DAY).unwrap().allowed_cidrs,
            p.key.allowed_cidrs
        );
        assert!(admit(&p, &asked(&["10.1.0.0/16"]), &[], now, DAY).is_ok());
        assert_eq!(
            field(admit(&p, &asked(&["10.0.0.0/7"]), &[], now, DAY)),
            "allowed_cidrs"
        );
        // Asking for "from anywhere" under a restricted parent is wider.
        assert_eq!(
            field(admit(&p, &asked(&[]), &[], now, DAY)),
            "allowed_cidrs"
        );
    }

    #[test]
    fn depth_is_bounded() {
        let now = Utc::now();
        let mut p = parent(&["crm:read", "keyplane.api_keys:delegate"]);
        p.key.delegation_depth = 2;
        let delegable = NewDelegation {
            delegable: true,
            ..ask(&[])
        };
        assert_eq!(field(admit(&p, &delegable, &[], now, DAY)), "delegable");
        assert_eq!(
            field(admit(
                &p,
                &ask(&["keyplane.api_keys:delegate"]),
                &[],
                now,
                DAY
            )),
            "delegable"
        );
        assert_eq!(
            admit(&p, &ask(&["crm:read"]), &[], now, DAY).unwrap().depth,
            3
        );
        p.key.delegation_depth = 3;
        assert_eq!(
            field(admit(&p, &ask(&[]), &[], now, DAY)),
            "delegation_depth"
        );
    }
}
