//! `keyplane.v1.AuditService`.
use tonic::{Request, Response, Status};

use super::convert::{self, RequestCheck};
use super::{KeyplaneApi, caller};
use crate::domain::audit::{ActorKind, AuditAction, AuditEvent};
use crate::domain::page::{ListFingerprint, ListKind};
use crate::domain::validate::{ValidationError, Validator};
use crate::proto::{self as pb, audit_service_server::AuditService};
use crate::storage::AuditFilter;

/// The longest actor subject a filter accepts (a JWT `sub` of any sane issuer is shorter).
const SUBJECT_MAX: usize = 256;

/// Parses and validates the filters of a list request.
pub fn parse_filter(r: &pb::ListAuditEventsRequest) -> Result<AuditFilter, ValidationError> {
    let mut v = Validator::new();
    let resource_id = v.optional_id("resource_id", &r.resource_id);
    let action = if r.action.is_empty() {
        None
    } else {
        let parsed = AuditAction::parse(&r.action);
        if parsed.is_none() {
            let known: Vec<&str> = AuditAction::ALL.iter().map(|a| a.as_str()).collect();
            v.add("action", format!("must be one of {}", known.join(", ")));
        }
        parsed
    };
    let actor_subject = (!r.actor_subject.is_empty())
        .then(|| v.max_len("actor_subject", &r.actor_subject, SUBJECT_MAX));
    let mut time = |field: &str, t: &Option<prost_types::Timestamp>| {
        let t = t.as_ref()?;
        let parsed = convert::from_timestamp(t);
        if parsed.is_none() {
            v.add(field, "is not a valid timestamp");
        }
        parsed
    };
    let start_time = time("start_time", &r.start_time);
    let end_time = time("end_time", &r.end_time);
    if let (Some(start), Some(end)) = (start_time, end_time)
        && end < start
    {
        v.add("end_time", "must not be before start_time");
    }
    v.finish(|| AuditFilter {
        resource_id,
        action,
        actor_subject,
        start_time,
        end_time,
    })
}

impl From<ActorKind> for pb::ActorKind {
    fn from(kind: ActorKind) -> Self {
        match kind {
            ActorKind::TenantToken => pb::ActorKind::TenantToken,
            ActorKind::PlatformToken => pb::ActorKind::PlatformToken,
            ActorKind::ApiKey => pb::ActorKind::ApiKey,
        }
    }
}

impl From<AuditEvent> for pb::AuditEvent {
    fn from(e: AuditEvent) -> Self {
        let kind: pb::ActorKind = e.actor.kind.into();
        pb::AuditEvent {
            id: e.id.to_string(),
            tenant_id: e.tenant.to_string(),
            time: Some(convert::timestamp(e.time)),
            actor: Some(pb::Actor {
                subject: e.actor.subject.to_string(),
                kind: kind.into(),
                api_key_id: e
                    .actor
                    .api_key_id
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
            }),
            action: e.action,
            resource_type: e.resource_type,
            resource_id: e.resource_id.to_string(),
            request_id: e.request_id,
            changed_fields: e.changed_fields,
            sequence: e.sequence,
            hash: e.hash.iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

#[tonic::async_trait]
impl AuditService for KeyplaneApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let tenant = caller(&request)?.tenant()?;
        let r = request.into_inner();
        let filter = parse_filter(&r)?;
        let micros = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map(|t| t.timestamp_micros().to_be_bytes())
        };
        let list = ListFingerprint::new(ListKind::AuditEvents, tenant)
            .filter(
                filter
                    .resource_id
                    .as_ref()
                    .map(|id| id.as_bytes().as_slice()),
            )
            .filter(filter.action.map(|a| a.as_str().as_bytes()))
            .filter(filter.actor_subject.as_deref().map(str::as_bytes))
            .filter(micros(filter.start_time).as_ref().map(|b| b.as_slice()))
            .filter(micros(filter.end_time).as_ref().map(|b| b.as_slice()));
        let mut v = Validator::new();
        let (size, before) = convert::page(&mut v, &self.pages, r.page_size, &r.page_token, &list);
        v.finish(|| ())?;
        let page = self
            .store
            .list_audit_events(tenant, &filter, before, size)
            .await?;
        let next_page_token = self.next_token(&page, |e| e.sequence, &list);
        Ok(Response::new(pb::ListAuditEventsResponse {
            audit_events: page.items.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}
