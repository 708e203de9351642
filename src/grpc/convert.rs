//! Proto ⇄ domain conversion: requests are parsed into validated domain values (every
//! problem collected into one `BadRequest`), records are written back as messages.
use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeDelta, Utc};
use prost_types::{FieldMask, Timestamp};
use uuid::Uuid;

use crate::domain::page::{Cursor, ListFingerprint, PageSize, PageTokenCodec};
use crate::domain::parse_uuid;
use crate::domain::records::{self, ApiKey, Scope, VerifyCode, Workspace};
use crate::domain::role::RoleName;
use crate::domain::scope::ScopeString;
use crate::domain::update::Update;
use crate::domain::usage::{self, RateLimitInput, RateLimits, Refill};
use crate::domain::validate::{SCOPES_MAX, ValidationError, Validator};
use crate::proto as pb;
use crate::verification::meter::UsageReport;

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A timestamp from a request; `None` when out of chrono's range.
pub fn from_timestamp(t: &Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
}

pub fn duration(span: TimeDelta) -> prost_types::Duration {
    prost_types::Duration {
        seconds: span.num_seconds(),
        nanos: span.subsec_nanos(),
    }
}

/// A duration from a request, for validation: `None` when absent; a malformed one
/// (nanoseconds out of range, or of the other sign than the seconds) reads as negative, so
/// that the field's range check reports it.
pub fn span(d: Option<&prost_types::Duration>) -> Option<TimeDelta> {
    let d = d?;
    let valid = (-999_999_999..=999_999_999).contains(&d.nanos)
        && !(d.seconds > 0 && d.nanos < 0 || d.seconds < 0 && d.nanos > 0);
    let parsed = valid
        .then(|| TimeDelta::try_seconds(d.seconds))
        .flatten()
        .and_then(|secs| secs.checked_add(&TimeDelta::nanoseconds(d.nanos.into())));
    Some(parsed.unwrap_or(TimeDelta::seconds(-1)))
}

/// A request's rate limits, before validation.
pub fn rate_limit_inputs(limits: &[pb::RateLimit]) -> Vec<RateLimitInput> {
    limits
        .iter()
        .map(|l| RateLimitInput {
            name: l.name.clone(),
            limit: l.limit,
            period: span(l.period.as_ref()),
            shared_by_owner: l.shared_by_owner,
        })
        .collect()
}

/// A request's refill, validated (`field.amount`, `field.interval`).
pub fn refill(v: &mut Validator, field: &str, refill: &pb::Refill) -> Option<Refill> {
    usage::refill(v, field, refill.amount, span(refill.interval.as_ref()))
}

fn rate_limits(limits: &RateLimits) -> Vec<pb::RateLimit> {
    limits
        .iter()
        .map(|l| pb::RateLimit {
            name: l.name().as_str().to_owned(),
            limit: i64::try_from(l.limit()).unwrap_or(i64::MAX),
            period: Some(duration(l.period().as_time_delta())),
            shared_by_owner: l.shared_by_owner(),
        })
        .collect()
}

/// A time on the database clock, in milliseconds since the Unix epoch.
pub fn timestamp_ms(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The rate limits of a verification's response: each of the key's, by name, with this
/// replica's estimate.
pub fn limit_states(key: &ApiKey, usage: &UsageReport) -> Vec<pb::RateLimitState> {
    key.rate_limits
        .iter()
        .zip(&usage.limits)
        .map(|(limit, report)| pb::RateLimitState {
            name: limit.name().as_str().to_owned(),
            limit: i64::try_from(report.state.limit).unwrap_or(i64::MAX),
            remaining: i64::try_from(report.state.remaining).unwrap_or(i64::MAX),
            reset_time: Some(timestamp_ms(report.state.reset_ms)),
            exceeded: report.state.exceeded,
        })
        .collect()
}

/// A request's labels or metadata, sorted so responses and storage are stable.
pub fn sorted(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn unsorted(map: &BTreeMap<String, String>) -> HashMap<String, String> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

impl From<Workspace> for pb::Workspace {
    fn from(w: Workspace) -> Self {
        pb::Workspace {
            id: w.id.to_string(),
            tenant_id: w.tenant_id.to_string(),
            name: w.name,
            description: w.description,
            company: w.company,
            is_private: w.is_private,
            is_personal: w.is_personal,
            owner_id: w.owner_id,
            source: w.source,
            default_key_prefix: w.default_key_prefix,
            labels: unsorted(&w.labels),
            create_time: Some(timestamp(w.create_time)),
            update_time: Some(timestamp(w.update_time)),
            etag: records::etag(w.revision),
            max_key_ttl: w.max_key_ttl.map(|t| duration(t.get())),
            default_allowed_cidrs: w.default_allowed_cidrs.to_strings(),
        }
    }
}

impl From<Scope> for pb::Scope {
    fn from(s: Scope) -> Self {
        pb::Scope {
            id: s.id.to_string(),
            tenant_id: s.tenant_id.map(|t| t.to_string()).unwrap_or_default(),
            workspace_id: s.workspace_id.map(|w| w.to_string()).unwrap_or_default(),
            resource: s.scope.resource().to_owned(),
            action: s.scope.action().to_owned(),
            scope: s.scope.to_string(),
            name: s.name,
            description: s.description,
            category: s.category,
            builtin: s.builtin,
            create_time: Some(timestamp(s.create_time)),
            update_time: Some(timestamp(s.update_time)),
            etag: records::etag(s.revision),
        }
    }
}

/// From a shared key (the verification cache's): every field is copied once, straight
/// into the message.
impl From<&ApiKey> for pb::ApiKey {
    fn from(k: &ApiKey) -> Self {
        pb::ApiKey {
            masked_key: k.masked_key(),
            id: k.id.to_string(),
            tenant_id: k.tenant_id.to_string(),
            workspace_id: k.workspace_id.to_string(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            scopes: k.scopes.clone(),
            owner_id: k.owner_id.clone().unwrap_or_default(),
            metadata: unsorted(&k.metadata),
            expire_time: k.expire_time.map(timestamp),
            disabled: k.disabled,
            revoke_time: k.revoke_time.map(timestamp),
            last_used_time: k.last_used_time.map(timestamp),
            create_time: Some(timestamp(k.create_time)),
            update_time: Some(timestamp(k.update_time)),
            etag: records::etag(k.revision),
            successor_id: k.successor_id.map(|id| id.to_string()).unwrap_or_default(),
            roles: k.roles.clone(),
            parent_id: k.parent_id.map(|id| id.to_string()).unwrap_or_default(),
            delegation_depth: k.delegation_depth.into(),
            allowed_cidrs: k.allowed_cidrs.to_strings(),
            rate_limits: rate_limits(&k.rate_limits),
            // The balance no replica has reserved, counting a refill that fell due.
            remaining_uses: k.credits.map(|c| {
                i64::try_from(c.balance_at(Utc::now().timestamp_millis())).unwrap_or(i64::MAX)
            }),
            refill: k.credits.and_then(|c| c.refill).map(|r| pb::Refill {
                amount: i64::try_from(r.amount()).unwrap_or(i64::MAX),
                interval: Some(duration(r.interval().as_time_delta())),
            }),
        }
    }
}

impl From<ApiKey> for pb::ApiKey {
    fn from(k: ApiKey) -> Self {
        (&k).into()
    }
}

impl From<VerifyCode> for pb::VerifyCode {
    fn from(code: VerifyCode) -> Self {
        match code {
            VerifyCode::Valid => pb::VerifyCode::Valid,
            VerifyCode::Malformed => pb::VerifyCode::Malformed,
            VerifyCode::NotFound => pb::VerifyCode::NotFound,
            VerifyCode::Revoked => pb::VerifyCode::Revoked,
            VerifyCode::Expired => pb::VerifyCode::Expired,
            VerifyCode::Disabled => pb::VerifyCode::Disabled,
            VerifyCode::IpNotAllowed => pb::VerifyCode::IpNotAllowed,
            VerifyCode::InsufficientScopes => pb::VerifyCode::InsufficientScopes,
            VerifyCode::RateLimited => pb::VerifyCode::RateLimited,
            VerifyCode::UsageExceeded => pb::VerifyCode::UsageExceeded,
        }
    }
}

/// Parsing helpers over a [`Validator`].
pub trait RequestCheck {
    /// A required resource id.
    fn id(&mut self, field: &str, text: &str) -> Option<Uuid>;
    /// An optional id (empty means none).
    fn optional_id(&mut self, field: &str, text: &str) -> Option<Uuid>;
    /// A list of scope strings, at most [`SCOPES_MAX`].
    fn scopes(&mut self, field: &str, list: &[String]) -> Vec<ScopeString>;
    /// A list of role names, at most [`SCOPES_MAX`], without repeats.
    fn roles(&mut self, field: &str, list: &[String]) -> Vec<RoleName>;
    /// A future expiry.
    fn future_time(
        &mut self,
        field: &str,
        t: &Timestamp,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>>;
}

impl RequestCheck for Validator {
    fn id(&mut self, field: &str, text: &str) -> Option<Uuid> {
        if text.is_empty() {
            self.add(field, "is required");
            return None;
        }
        self.optional_id(field, text)
    }

    fn optional_id(&mut self, field: &str, text: &str) -> Option<Uuid> {
        if text.is_empty() {
            return None;
        }
        let parsed = parse_uuid(text);
        if parsed.is_none() {
            self.add(field, "must be a UUID");
        }
        parsed
    }

    fn scopes(&mut self, field: &str, list: &[String]) -> Vec<ScopeString> {
        if list.len() > SCOPES_MAX {
            self.add(field, format!("at most {SCOPES_MAX} scopes"));
            return Vec::new();
        }
        let mut out: Vec<ScopeString> = Vec::with_capacity(list.len());
        for s in list {
            match ScopeString::parse(s) {
                Ok(parsed) if !out.contains(&parsed) => out.push(parsed),
                Ok(_) => {}
                Err(e) => self.add(field, format!("{}: {e}", truncate(s))),
            }
        }
        out
    }

    fn roles(&mut self, field: &str, list: &[String]) -> Vec<RoleName> {
        if list.len() > SCOPES_MAX {
            self.add(field, format!("at most {SCOPES_MAX} roles"));
            return Vec::new();
        }
        let mut out: Vec<RoleName> = Vec::with_capacity(list.len());
        for name in list {
            match RoleName::parse(name) {
                Some(parsed) if !out.contains(&parsed) => out.push(parsed),
                Some(_) => {}
                None => self.add(
                    field,
                    format!("{}: must match [a-z0-9_.-]{{1,64}}", truncate(name)),
                ),
            }
        }
        out
    }

    fn future_time(
        &mut self,
        field: &str,
        t: &Timestamp,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match from_timestamp(t) {
            Some(at) if at > now => Some(at),
            Some(_) => {
                self.add(field, "must be in the future");
                None
            }
            None => {
                self.add(field, "is not a valid timestamp");
                None
            }
        }
    }
}

/// Echoing a client's bad value is useful; echoing a megabyte of it is not.
const ECHO_MAX: usize = 80;

fn truncate(s: &str) -> String {
    if s.chars().count() <= ECHO_MAX {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(ECHO_MAX).collect::<String>())
    }
}

/// A required resource id, on its own.
pub fn parse_id(field: &str, text: &str) -> Result<Uuid, ValidationError> {
    let mut v = Validator::new();
    let id = v.id(field, text);
    v.finish(|| id.unwrap_or_default())
}

/// An optional idempotency key.
pub fn request_id(v: &mut Validator, text: &str) -> Option<Uuid> {
    v.optional_id("request_id", text)
}

/// Page size and cursor of a list request.
pub fn page<C: Cursor>(
    v: &mut Validator,
    codec: &PageTokenCodec,
    size: i32,
    token: &str,
    list: &ListFingerprint,
) -> (u64, Option<C>) {
    let size = v
        .check("page_size", PageSize::parse(size))
        .map_or(0, |s| s.get());
    let cursor = v.check("page_token", codec.decode(token, list)).flatten();
    (size, cursor)
}

/// A resource message that an Update RPC patches (AIP-134): which fields a client may
/// name in the mask, and how each becomes part of the domain patch.
pub trait Patchable: Default {
    type Patch: Default;
    /// The request field holding the resource, as violations name it (`workspace`).
    const FIELD: &'static str;
    const MUTABLE: &'static [&'static str];
    const OUTPUT_ONLY: &'static [&'static str];

    fn id(&self) -> &str;
    /// Whether the message sets `path`: what an empty mask updates.
    fn sets(&self, path: &str) -> bool;
    /// Validates the field at `path` (a mutable one) into the patch.
    fn patch(&self, v: &mut Validator, path: &str, now: DateTime<Utc>, patch: &mut Self::Patch);
}

/// Parses any update request: the resource's id, the patch of the fields the mask names
/// (or, with an empty mask, every mutable field the message sets), and the etag's revision.
pub fn parse_update<M: Patchable>(
    resource: Option<M>,
    mask: Option<&FieldMask>,
    etag: &str,
    now: DateTime<Utc>,
) -> Result<Update<M::Patch>, ValidationError> {
    let mut v = Validator::new();
    let resource = resource.unwrap_or_default();
    let id = v.id(&format!("{}.id", M::FIELD), resource.id());
    let paths: Vec<String> = match mask.map(|m| m.paths.as_slice()).unwrap_or_default() {
        [] => M::MUTABLE
            .iter()
            .filter(|p| resource.sets(p))
            .map(|p| (*p).to_owned())
            .collect(),
        named => named.to_vec(),
    };
    let mut patch = M::Patch::default();
    for path in &paths {
        if M::OUTPUT_ONLY.contains(&path.as_str()) {
            v.add("update_mask", format!("{} is output only", truncate(path)));
        } else if !M::MUTABLE.contains(&path.as_str()) {
            v.add("update_mask", format!("unknown field {}", truncate(path)));
        } else {
            resource.patch(&mut v, path, now, &mut patch);
        }
    }
    v.finish(|| Update {
        id: id.unwrap_or_default(),
        patch,
        expected_revision: expected_revision(etag),
    })
}

/// An etag sent with an update: `None` when absent; an unparseable one can never match.
fn expected_revision(etag: &str) -> Option<i64> {
    if etag.is_empty() {
        None
    } else {
        Some(records::revision_of(etag).unwrap_or(-1))
    }
}
