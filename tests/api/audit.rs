//! The audit log: one event per successful write, in its transaction; who did it; field
//! names only; the per-tenant hash chain that `keyplane audit verify` checks; listing with
//! filters and keyset pages; pruning that keeps the chain checkable.
use std::time::Duration;

use keyplane::domain::TenantId;
use keyplane::proto as pb;
use keyplane::storage::Store;
use keyplane::storage::entity::audit_event;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};
use tonic::Code;
use uuid::Uuid;

use keyplane_testkit::*;

on_both_backends!(
    every_write_records_one_event_with_its_actor_and_fields,
    failed_refused_and_repeated_writes_record_nothing,
    admin_keys_and_platform_tokens_are_named_as_such,
    list_filters_pages_and_stays_in_its_tenant,
    audit_verify_names_the_first_tampered_event,
    pruning_keeps_the_retained_chain_checkable,
);

/// Every event of the app's tenant, newest first, through every page.
async fn all_events(app: &TestApp, filter: pb::ListAuditEventsRequest) -> Vec<pb::AuditEvent> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .as_admin()
            .audit
            .list_audit_events(pb::ListAuditEventsRequest {
                page_token,
                ..filter.clone()
            })
            .await
            .inner()
            .unwrap();
        events.extend(page.audit_events);
        if page.next_page_token.is_empty() {
            return events;
        }
        page_token = page.next_page_token;
    }
}

fn actions(events: &[pb::AuditEvent]) -> Vec<&str> {
    events.iter().map(|e| e.action.as_str()).collect()
}

/// The library's check of a tenant's chain, as `keyplane audit verify` runs it.
async fn check_chain(app: &TestApp, tenant: Uuid) -> keyplane::storage::ChainReport {
    let db = keyplane::storage::connect(&app.db.url).await.unwrap();
    Store::new(db)
        .check_audit_chain(TenantId::new(tenant))
        .await
        .unwrap()
}

async fn every_write_records_one_event_with_its_actor_and_fields(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let ws = app.create_workspace("audited").await;
    admin
        .workspaces
        .clone()
        .update_workspace(pb::UpdateWorkspaceRequest {
            workspace: Some(pb::Workspace {
                id: ws.id.clone(),
                description: "now described".into(),
                ..Default::default()
            }),
            update_mask: mask(&["description"]),
            ..Default::default()
        })
        .await
        .unwrap();
    let scope = app.create_scope("crm:read", &ws.id).await;
    admin
        .scopes
        .clone()
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(pb::Scope {
                id: scope.id.clone(),
                category: "data".into(),
                ..Default::default()
            }),
            update_mask: mask(&["category"]),
            ..Default::default()
        })
        .await
        .unwrap();
    let (key, secret) = app.create_key(&ws.id, &["crm:read"]).await;
    // A client's request id is the event's.
    let mut disable = tonic::Request::new(pb::UpdateApiKeyRequest {
        api_key: Some(pb::ApiKey {
            id: key.id.clone(),
            disabled: true,
            ..Default::default()
        }),
        update_mask: mask(&["disabled"]),
        ..Default::default()
    });
    disable
        .metadata_mut()
        .insert("x-request-id", "change-ticket-7".parse().unwrap());
    admin.keys.clone().update_api_key(disable).await.unwrap();
    // Without one, the server makes one and returns it.
    let rotated = admin
        .keys
        .clone()
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: key.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let rotation_request_id = rotated
        .metadata()
        .get("x-request-id")
        .expect("a write answers with its request id")
        .to_str()
        .unwrap()
        .to_owned();
    let successor = rotated.into_inner().api_key.unwrap();
    admin.revoke_key(&successor.id).await;
    admin
        .keys
        .clone()
        .delete_api_key(pb::DeleteApiKeyRequest {
            id: successor.id.clone(),
        })
        .await
        .unwrap();
    admin
        .scopes
        .clone()
        .delete_scope(pb::DeleteScopeRequest {
            id: scope.id.clone(),
            force: true,
        })
        .await
        .unwrap();
    admin
        .workspaces
        .clone()
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: ws.id.clone(),
            force: true,
        })
        .await
        .unwrap();

    let events = all_events(&app, Default::default()).await;
    assert_eq!(
        actions(&events),
        [
            "workspace.delete",
            "scope.delete",
            "api_key.delete",
            "api_key.revoke",
            "api_key.rotate",
            "api_key.update",
            "api_key.create",
            "scope.update",
            "scope.create",
            "workspace.update",
            "workspace.create",
        ],
        "one event per write, newest first"
    );
    let sequences: Vec<i64> = events.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=11).rev().collect::<Vec<i64>>());
    let tenant = app.tenant.to_string();
    for event in &events {
        assert_eq!(event.tenant_id, tenant);
        let actor = event.actor.as_ref().unwrap();
        assert_eq!(actor.subject, "tester");
        assert_eq!(actor.kind(), pb::ActorKind::TenantToken);
        assert!(actor.api_key_id.is_empty());
        assert!(!event.request_id.is_empty());
        assert_eq!(event.hash.len(), 64);
        assert!(!format!("{event:?}").contains(&secret));
    }
    let by_action = |action: &str| events.iter().find(|e| e.action == action).unwrap();
    let update = by_action("api_key.update");
    assert_eq!(update.changed_fields, ["disabled"]);
    assert_eq!(update.resource_id, key.id);
    assert_eq!(update.resource_type, "api_key");
    assert_eq!(update.request_id, "change-ticket-7");
    let rotate = by_action("api_key.rotate");
    assert_eq!(
        rotate.resource_id, key.id,
        "the rotated key, not its successor"
    );
    assert_eq!(rotate.changed_fields, ["successor_id", "revoke_time"]);
    assert_eq!(rotate.request_id, rotation_request_id);
    assert_eq!(by_action("scope.update").changed_fields, ["category"]);
    assert_eq!(
        by_action("workspace.update").changed_fields,
        ["description"]
    );
    assert_eq!(by_action("api_key.revoke").changed_fields, ["revoke_time"]);
    assert_eq!(by_action("workspace.delete").resource_id, ws.id);
    let created = by_action("api_key.create");
    assert_eq!(
        created.changed_fields,
        ["workspace_id", "name", "prefix", "scopes"]
    );

    let report = check_chain(&app, app.tenant).await;
    assert_eq!(report.broken, None);
    assert_eq!(report.events, 11);
}

async fn failed_refused_and_repeated_writes_record_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let ws = app.create_workspace("w").await;
    let (key, _) = app.create_key(&ws.id, &[]).await;
    let before = all_events(&app, Default::default()).await.len();
    assert_eq!(before, 2);

    // A validation error, a stale etag, a domain rule, a missing resource, another
    // tenant's resource, a missing scope: all refused, none recorded.
    assert_invalid(
        admin
            .workspaces
            .clone()
            .create_workspace(pb::CreateWorkspaceRequest {
                name: "x".repeat(500),
                ..Default::default()
            })
            .await,
        &["name"],
        "too long",
    );
    let stale = admin
        .keys
        .clone()
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: key.id.clone(),
                name: "renamed".into(),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
            etag: "r999".into(),
        })
        .await;
    assert_err(stale, Code::Aborted, "ETAG_MISMATCH");
    let busy = admin
        .workspaces
        .clone()
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: ws.id.clone(),
            force: false,
        })
        .await;
    assert_eq!(busy.unwrap_err().code(), Code::FailedPrecondition);
    let missing = admin
        .keys
        .clone()
        .revoke_api_key(pb::RevokeApiKeyRequest {
            id: Uuid::now_v7().to_string(),
        })
        .await;
    assert_err(missing, Code::NotFound, "NOT_FOUND");
    let foreign = app
        .client(&stranger())
        .keys
        .revoke_api_key(pb::RevokeApiKeyRequest { id: key.id.clone() })
        .await;
    assert_err(foreign, Code::NotFound, "NOT_FOUND");
    let unscoped = app
        .client(&bearer(token(
            Some(app.tenant),
            &["keyplane.api_keys:read"],
        )))
        .keys
        .revoke_api_key(pb::RevokeApiKeyRequest { id: key.id.clone() })
        .await;
    assert_err(unscoped, Code::PermissionDenied, "MISSING_SCOPE");
    assert_eq!(all_events(&app, Default::default()).await.len(), before);

    // A retried create returns the first result and changes nothing; so does revoking a
    // revoked key.
    let request_id = Uuid::now_v7().to_string();
    for _ in 0..3 {
        admin
            .workspaces
            .clone()
            .create_workspace(pb::CreateWorkspaceRequest {
                name: "once".into(),
                request_id: request_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for _ in 0..2 {
        admin.revoke_key(&key.id).await;
    }
    let events = all_events(&app, Default::default()).await;
    assert_eq!(
        actions(&events),
        [
            "api_key.revoke",
            "workspace.create",
            "api_key.create",
            "workspace.create"
        ]
    );
    assert_eq!(check_chain(&app, app.tenant).await.broken, None);
}

async fn admin_keys_and_platform_tokens_are_named_as_such(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let (admin_key, admin_secret) = app.create_key(&ws.id, &["keyplane.workspaces:write"]).await;
    app.client(&Cred::ApiKey(admin_secret))
        .create_workspace("by key")
        .await;
    app.client(&bearer(token(None, &["keyplane.workspaces:write"])))
        .tenant(app.tenant)
        .create_workspace("by platform")
        .await;
    let events = all_events(&app, Default::default()).await;
    let platform = events[0].actor.clone().unwrap();
    assert_eq!(platform.kind(), pb::ActorKind::PlatformToken);
    assert_eq!(platform.subject, "tester");
    let by_key = events[1].actor.clone().unwrap();
    assert_eq!(by_key.kind(), pb::ActorKind::ApiKey);
    assert_eq!(by_key.api_key_id, admin_key.id);
    assert_eq!(by_key.subject, admin_key.id);
}

async fn list_filters_pages_and_stays_in_its_tenant(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let (a, _) = app.create_key(&ws.id, &[]).await;
    let (b, _) = app.create_key(&ws.id, &[]).await;
    let middle = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    for key in [&a, &b, &a] {
        app.as_admin()
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    id: key.id.clone(),
                    name: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Six events: one workspace, two creates, three updates.
    let all = all_events(&app, Default::default()).await;
    assert_eq!(all.len(), 6);
    let of_a = all_events(
        &app,
        pb::ListAuditEventsRequest {
            resource_id: a.id.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        actions(&of_a),
        ["api_key.update", "api_key.update", "api_key.create"]
    );
    let updates = all_events(
        &app,
        pb::ListAuditEventsRequest {
            action: "api_key.update".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(updates.len(), 3);
    let by_tester = all_events(
        &app,
        pb::ListAuditEventsRequest {
            actor_subject: "tester".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_tester.len(), 6);
    let by_nobody = all_events(
        &app,
        pb::ListAuditEventsRequest {
            actor_subject: "nobody".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(by_nobody.is_empty());
    let stamp = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    };
    let after_middle = all_events(
        &app,
        pb::ListAuditEventsRequest {
            start_time: Some(stamp(middle)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(actions(&after_middle), ["api_key.update"; 3]);
    let before_middle = all_events(
        &app,
        pb::ListAuditEventsRequest {
            end_time: Some(stamp(middle)),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(before_middle.len(), 3);

    // Pages of two, newest first, each event once.
    let mut audit = app.as_admin().audit;
    let first = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(first.audit_events, all[..2]);
    let second = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            page_token: first.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(second.audit_events, all[2..4]);
    // A token belongs to its filters.
    let replayed = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            page_size: 2,
            page_token: first.next_page_token,
            action: "api_key.update".into(),
            ..Default::default()
        })
        .await;
    assert_invalid(replayed, &["page_token"], "token of other filters");
    let bad = audit
        .list_audit_events(pb::ListAuditEventsRequest {
            action: "api_key.explode".into(),
            resource_id: "nope".into(),
            start_time: Some(stamp(middle)),
            end_time: Some(stamp(middle - chrono::Duration::seconds(1))),
            ..Default::default()
        })
        .await;
    assert_invalid(
        bad,
        &["resource_id", "action", "end_time"],
        "one violation per bad filter",
    );

    // Another tenant's log is its own, and empty.
    let theirs = app
        .client(&stranger())
        .audit
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await
        .inner()
        .unwrap();
    assert!(theirs.audit_events.is_empty());
}

/// Runs `keyplane audit verify` on the app's tenant; returns whether it passed and what
/// it printed.
fn audit_verify(app: &TestApp) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyplane"))
        .args(["audit", "verify", "--tenant", &app.tenant.to_string()])
        .env("KEYPLANE_DATABASE_URL", &app.db.url)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn audit_verify_names_the_first_tampered_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    for name in ["a", "b", "c"] {
        app.as_admin()
            .workspaces
            .update_workspace(pb::UpdateWorkspaceRequest {
                workspace: Some(pb::Workspace {
                    id: ws.id.clone(),
                    name: name.into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (ok, text) = audit_verify(&app);
    assert!(ok, "{text}");
    assert!(text.contains("intact: 4 event(s)"), "{text}");

    let events = all_events(&app, Default::default()).await;
    let id = |e: &pb::AuditEvent| Uuid::parse_str(&e.id).unwrap();
    let (second, third) = (&events[1], &events[2]);
    let db = sea_orm::Database::connect(&app.db.url).await.unwrap();
    let set_subject = |id: Uuid, subject: &'static str| {
        let db = db.clone();
        async move {
            audit_event::Entity::update_many()
                .col_expr(audit_event::Column::ActorSubject, subject.into())
                .filter(audit_event::Column::Id.eq(id))
                .exec(&db)
                .await
                .unwrap()
        }
    };

    // Edited: the edited event is named.
    set_subject(id(second), "someone-else").await;
    let (ok, text) = audit_verify(&app);
    assert!(!ok, "an edit must break the chain: {text}");
    assert!(text.contains(&second.id), "names the edited event: {text}");
    set_subject(id(second), "tester").await;
    assert!(audit_verify(&app).0, "restored");

    // Deleted in the middle: the event after the gap is named.
    audit_event::Entity::delete_by_id(id(third))
        .exec(&db)
        .await
        .unwrap();
    let (ok, text) = audit_verify(&app);
    assert!(!ok, "a deletion must break the chain: {text}");
    assert!(
        text.contains(&second.id),
        "names the event after the gap: {text}"
    );

    // Deleted at the end: the chain's head no longer matches.
    let app2 = spawn_app(backend).await;
    let ws2 = app2.create_workspace("w").await;
    app2.as_admin()
        .workspaces
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: ws2.id.clone(),
            force: false,
        })
        .await
        .unwrap();
    let newest = all_events(&app2, Default::default()).await.remove(0);
    let db2 = sea_orm::Database::connect(&app2.db.url).await.unwrap();
    audit_event::Entity::delete_by_id(id(&newest))
        .exec(&db2)
        .await
        .unwrap();
    let (ok, text) = audit_verify(&app2);
    assert!(!ok, "a truncated chain must fail: {text}");
    assert!(text.contains("newest events were deleted"), "{text}");

    // Inserted: a copy of the only event under a new id and the next sequence.
    let app3 = spawn_app(backend).await;
    app3.create_workspace("w").await;
    let db3 = sea_orm::Database::connect(&app3.db.url).await.unwrap();
    let original = audit_event::Entity::find()
        .one(&db3)
        .await
        .unwrap()
        .unwrap();
    let forged = audit_event::Model {
        id: Uuid::now_v7(),
        sequence: original.sequence + 1,
        ..original
    };
    audit_event::Entity::insert(audit_event::ActiveModel::from(forged.clone()))
        .exec_without_returning(&db3)
        .await
        .unwrap();
    let (ok, text) = audit_verify(&app3);
    assert!(!ok, "an inserted event must break the chain: {text}");
    assert!(
        text.contains(&forged.id.to_string()),
        "names the inserted event: {text}"
    );
}

async fn pruning_keeps_the_retained_chain_checkable(backend: Backend) {
    let db = fresh_database(backend).await;
    let mut settings = test_settings(&db.url);
    settings.audit_retention = Duration::from_secs(1);
    let app = spawn_with(db, settings).await;
    let ws = app.create_workspace("old").await;
    app.create_key(&ws.id, &[]).await;
    // Past the retention, and a pruning round (every retention period) later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !all_events(&app, Default::default()).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "events past the retention were not pruned"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = check_chain(&app, app.tenant).await;
    assert_eq!(report.broken, None);
    assert_eq!(
        report.anchor.sequence, 2,
        "the anchor is the last pruned event"
    );

    // The chain goes on from where pruning left it, and stays checkable.
    app.create_workspace("new").await;
    let events = all_events(&app, Default::default()).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].sequence, 3);
    let (ok, text) = audit_verify(&app);
    assert!(ok, "{text}");
}
