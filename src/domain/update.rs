//! Updates (AIP-134) as one shape for every resource: an [`Update`] names the resource, the
//! [`Patch`] to apply and the revision the client last saw; storage runs every update
//! through one compare-and-set write path.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rules::RuleViolation;

/// A validated update request.
#[derive(Debug, Clone)]
pub struct Update<P> {
    pub id: Uuid,
    pub patch: P,
    /// The revision of the client's etag; `None` when it sent none (last writer wins).
    pub expected_revision: Option<i64>,
}

/// The changes of one update; fields left `None` keep their value.
pub trait Patch {
    type Target: Revisioned;

    /// Applies the changes to the current state, or refuses them by a domain rule.
    fn apply(&self, current: &mut Self::Target) -> Result<(), RuleViolation>;

    /// The names of the fields it changes, for the audit log.
    fn fields(&self) -> Vec<&'static str>;
}

/// A resource with a revision counter that every write increments; its etag derives from it.
pub trait Revisioned {
    fn id(&self) -> Uuid;

    fn revision(&self) -> i64;

    /// Marks the resource as written at `now`: the next revision.
    fn touch(&mut self, now: DateTime<Utc>);
}

/// Sets `field` when the patch carries a value for it.
pub(super) fn set<T: Clone>(field: &mut T, value: &Option<T>) {
    if let Some(v) = value {
        field.clone_from(v);
    }
}

/// The names whose flag is set: the fields a patch or a create request carries.
pub fn named<const N: usize>(fields: [(&'static str, bool); N]) -> Vec<&'static str> {
    fields
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
}
