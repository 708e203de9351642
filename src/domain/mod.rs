//! Domain layer: validated newtypes, scope matching, the key format and the records the
//! service works with. Nothing here knows about gRPC or SQL.
pub mod audit;
pub mod delegation;
pub mod import;
pub mod key;
pub mod network;
pub mod page;
pub mod permission;
pub mod records;
pub mod role;
pub mod rules;
pub mod scope;
pub mod standing;
pub mod update;
pub mod usage;
pub mod validate;

use std::fmt;

use uuid::Uuid;

/// The isolation boundary (an organization). Built once from a UUID at the edge, then
/// required by every repository call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Uuid);

impl TenantId {
    pub fn new(id: Uuid) -> Self {
        Self(id)
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// Parses the canonical hyphenated form only, so that equal tenants compare equal as
    /// strings too.
    pub fn parse(text: &str) -> Option<Self> {
        parse_uuid(text).map(Self)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Parses a UUID in its 36-character hyphenated form (any case).
pub fn parse_uuid(text: &str) -> Option<Uuid> {
    if text.len() != 36 {
        return None;
    }
    Uuid::try_parse(text).ok()
}

/// The tenants a caller may act for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TenantAccess {
    /// Exactly this tenant.
    One(TenantId),
    /// Any tenant: a platform token without `x-tenant-id` (only `VerifyApiKey` accepts it).
    Any,
}
