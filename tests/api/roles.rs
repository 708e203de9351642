//! RoleService (SPEC §3.9): create, get, list, update and delete with the AIP conventions
//! (field rules, idempotency, keyset pages, masks and etags), names unique per tenant and
//! workspace, scopes that must exist for the role, no escalation through roles, tenant
//! isolation, the audit log, and deleting a scope that roles hold. (Keys holding roles:
//! `api_keys`.)
use keyplane::proto as pb;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use keyplane_testkit::*;

on_both_backends!(
    create_get_list_update_delete,
    create_validates_every_field,
    create_is_idempotent_by_request_id,
    names_are_unique_per_tenant_and_workspace,
    scopes_must_exist_for_the_role,
    list_filters_by_workspace_and_pages,
    update_follows_the_mask_and_the_etag,
    update_rejects_output_only_and_invalid_fields,
    delete_of_unknown_or_bad_id,
    workspace_roles_go_with_their_workspace,
    no_escalation_through_roles,
    other_tenants_roles_are_not_found,
    deleting_a_scope_roles_hold_is_refused_unless_forced,
);

fn new_role(name: &str, workspace_id: &str, scopes: &[&str]) -> pb::CreateRoleRequest {
    pb::CreateRoleRequest {
        workspace_id: workspace_id.into(),
        name: name.into(),
        scopes: strings(scopes),
        ..Default::default()
    }
}

async fn create(
    client: &Client,
    request: pb::CreateRoleRequest,
) -> Result<pb::Role, tonic::Status> {
    client.roles.clone().create_role(request).await.resource()
}

async fn update(
    client: &Client,
    role: pb::Role,
    paths: &[&str],
    etag: &str,
) -> Result<pb::Role, tonic::Status> {
    client
        .roles
        .clone()
        .update_role(pb::UpdateRoleRequest {
            role: Some(role),
            update_mask: mask(paths),
            etag: etag.into(),
        })
        .await
        .resource()
}

async fn delete(client: &Client, id: &str, force: bool) -> Result<i64, tonic::Status> {
    client
        .roles
        .clone()
        .delete_role(pb::DeleteRoleRequest {
            id: id.into(),
            force,
        })
        .await
        .inner()
        .map(|r| r.removed_holder_count)
}

/// Every role of a listing, page by page; also returns how many pages it took.
async fn list_all(app: &TestApp, page_size: i32, workspace_id: &str) -> (Vec<pb::Role>, usize) {
    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .as_admin()
            .roles
            .list_roles(pb::ListRolesRequest {
                page_size,
                page_token: token,
                workspace_id: workspace_id.into(),
            })
            .await
            .inner()
            .expect("list roles");
        pages += 1;
        if page_size > 0 {
            assert!(page.roles.len() <= page_size as usize);
        }
        all.extend(page.roles);
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 100, "pagination does not end");
        token = page.next_page_token;
    }
    (all, pages)
}

fn names(roles: &[pb::Role]) -> Vec<&str> {
    roles.iter().map(|r| r.name.as_str()).collect()
}

/// The role's audit events, newest first.
async fn role_events(app: &TestApp, id: &str) -> Vec<pb::AuditEvent> {
    app.as_admin()
        .audit
        .list_audit_events(pb::ListAuditEventsRequest {
            resource_id: id.into(),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap()
        .audit_events
}

async fn create_get_list_update_delete(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    app.create_scope("tickets:write", "").await;
    app.create_scope("crm:read", "").await;

    let created = create(
        &admin,
        pb::CreateRoleRequest {
            description: "answers tickets".into(),
            ..new_role(
                "support-agent",
                "",
                &[
                    "tickets:write",
                    "keyplane.api_keys:read",
                    "crm:read",
                    "crm:read",
                ],
            )
        },
    )
    .await
    .unwrap();
    assert!(Uuid::parse_str(&created.id).is_ok());
    assert_eq!(created.tenant_id, app.tenant.to_string());
    assert_eq!(created.workspace_id, "", "tenant-wide");
    assert_eq!(created.name, "support-agent");
    assert_eq!(created.description, "answers tickets");
    assert_eq!(
        created.scopes,
        ["crm:read", "keyplane.api_keys:read", "tickets:write"],
        "sorted, without repeats"
    );
    assert!(created.create_time.is_some());
    assert_eq!(created.create_time, created.update_time);
    assert!(!created.etag.is_empty());

    assert_eq!(app.get_role(&created.id).await.unwrap(), created);
    let (listed, _) = list_all(&app, 0, "").await;
    assert_eq!(listed, std::slice::from_ref(&created));

    let updated = update(
        &admin,
        pb::Role {
            id: created.id.clone(),
            description: "answers and closes tickets".into(),
            scopes: strings(&["tickets:write"]),
            ..Default::default()
        },
        &["description", "scopes"],
        &created.etag,
    )
    .await
    .unwrap();
    assert_eq!(updated.description, "answers and closes tickets");
    assert_eq!(updated.scopes, ["tickets:write"]);
    assert_eq!(
        (updated.name.as_str(), updated.workspace_id.as_str()),
        ("support-agent", "")
    );
    assert_eq!(updated.create_time, created.create_time);
    assert_ne!(updated.update_time, created.update_time);
    assert_ne!(updated.etag, created.etag);
    assert_eq!(app.get_role(&created.id).await.unwrap(), updated, "stored");

    assert_eq!(delete(&admin, &created.id, false).await.unwrap(), 0);
    assert_err(app.get_role(&created.id).await, Code::NotFound, "NOT_FOUND");
    assert!(list_all(&app, 0, "").await.0.is_empty());
    assert_err(
        delete(&admin, &created.id, true).await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // One event per write, with the fields it set or changed.
    let events = role_events(&app, &created.id).await;
    let actions: Vec<&str> = events.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["role.delete", "role.update", "role.create"]);
    for event in &events {
        assert_eq!(event.resource_type, "role");
        assert_eq!(event.actor.as_ref().unwrap().subject, "tester");
    }
    assert_eq!(events[1].changed_fields, ["description", "scopes"]);
    assert_eq!(events[2].changed_fields, ["name", "description", "scopes"]);
    assert!(events[0].changed_fields.is_empty());
}

async fn create_validates_every_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let everything_wrong = pb::CreateRoleRequest {
        workspace_id: "nope".into(),
        name: "Support Agent".into(),
        description: "d".repeat(1025),
        scopes: strings(&["no-colon"]),
        request_id: "not-a-uuid".into(),
    };
    assert_invalid(
        create(&admin, everything_wrong).await,
        &[
            "workspace_id",
            "name",
            "description",
            "scopes",
            "request_id",
        ],
        "every bad field at once",
    );
    for bad in ["", "Admin", "has space", "a:b", &"x".repeat(65)] {
        assert_invalid(create(&admin, new_role(bad, "", &[])).await, &["name"], bad);
    }
    let too_many: Vec<String> = (0..65).map(|i| format!("s{i}:read")).collect();
    assert_invalid(
        create(
            &admin,
            pb::CreateRoleRequest {
                scopes: too_many,
                ..new_role("many", "", &[])
            },
        )
        .await,
        &["scopes"],
        "65 scopes",
    );
    assert_err(
        create(&admin, new_role("lost", &Uuid::now_v7().to_string(), &[])).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert!(list_all(&app, 0, "").await.0.is_empty(), "nothing created");

    // The limits themselves are accepted; a role may grant nothing (yet).
    let edge = create(
        &admin,
        pb::CreateRoleRequest {
            description: "é".repeat(1024),
            ..new_role(&"a".repeat(64), "", &[])
        },
    )
    .await
    .unwrap();
    assert_eq!(edge.description.chars().count(), 1024);
    assert!(edge.scopes.is_empty());
    create(&admin, new_role("crm.reader_2-x", "", &[]))
        .await
        .unwrap();
}

async fn create_is_idempotent_by_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let w = app.create_workspace("w").await;
    let request = pb::CreateRoleRequest {
        request_id: Uuid::now_v7().to_string(),
        ..new_role("reader", &w.id, &["keyplane.scopes:read"])
    };
    let first = create(&admin, request.clone()).await.unwrap();
    let retry = create(&admin, request.clone()).await.unwrap();
    assert_eq!(first, retry, "the retry returns the first result");
    // Even when the retry's body differs: the request id decides.
    let changed = pb::CreateRoleRequest {
        name: "other".into(),
        ..request.clone()
    };
    assert_eq!(create(&admin, changed).await.unwrap(), first);
    // Without the request id the same request is a duplicate.
    assert_err(
        create(
            &admin,
            pb::CreateRoleRequest {
                request_id: String::new(),
                ..request
            },
        )
        .await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    assert_eq!(list_all(&app, 0, "").await.0, std::slice::from_ref(&first));
    let creates = role_events(&app, &first.id).await;
    assert_eq!(creates.len(), 1, "one create, one event");
}

async fn names_are_unique_per_tenant_and_workspace(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;

    let wide = create(&admin, new_role("agent", "", &[])).await.unwrap();
    let status = assert_err(
        create(&admin, new_role("agent", "", &[])).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    assert!(status.message().contains("agent"), "{status:?}");
    // The same name in a workspace, and in another workspace, is another role.
    let local1 = create(&admin, new_role("agent", &w1.id, &[]))
        .await
        .unwrap();
    let local2 = create(&admin, new_role("agent", &w2.id, &[]))
        .await
        .unwrap();
    assert_ne!(local1.id, local2.id);
    assert_eq!(local1.workspace_id, w1.id);
    assert_err(
        create(&admin, new_role("agent", &w1.id, &[])).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // Another tenant has its own names.
    let theirs = create(&app.client(&stranger()), new_role("agent", "", &[]))
        .await
        .unwrap();
    assert_ne!(theirs.tenant_id, wide.tenant_id);
    assert_eq!(
        names(&list_all(&app, 0, "").await.0),
        ["agent", "agent", "agent"]
    );
}

async fn scopes_must_exist_for_the_role(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;
    app.create_scope("local:read", &w1.id).await;
    app.create_scope("shared:read", "").await;

    let status = assert_err(
        create(&admin, new_role("r", "", &["shared:read", "nowhere:read"])).await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert_eq!(violated_fields(&status), ["scopes"]);
    let info = status.get_details_error_info().unwrap();
    assert!(
        info.metadata.values().any(|v| v.contains("nowhere:read"))
            && !info.metadata.values().any(|v| v.contains("shared:read")),
        "names the unknown scope only: {info:?}"
    );
    // A workspace's scope exists only for that workspace's roles.
    assert_err(
        create(&admin, new_role("r", "", &["local:read"])).await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert_err(
        create(&admin, new_role("r", &w2.id, &["local:read"])).await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    // A reserved name that is no built-in scope exists nowhere.
    assert_err(
        create(&admin, new_role("r", "", &["keyplane.nothing:read"])).await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(list_all(&app, 0, "").await.0.is_empty(), "nothing created");

    let local = create(
        &admin,
        new_role(
            "r",
            &w1.id,
            &["local:read", "shared:read", "keyplane.audit:read"],
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        local.scopes,
        ["keyplane.audit:read", "local:read", "shared:read"]
    );
    let wide = create(&admin, new_role("r", "", &["shared:read"]))
        .await
        .unwrap();

    // Nor can an update add one.
    let status = assert_err(
        update(
            &admin,
            pb::Role {
                id: wide.id.clone(),
                scopes: strings(&["shared:read", "local:read"]),
                ..Default::default()
            },
            &["scopes"],
            "",
        )
        .await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(reason_metadata(&status, "scopes").contains("local:read"));
    assert_eq!(app.get_role(&wide.id).await.unwrap(), wide, "unchanged");
}

async fn list_filters_by_workspace_and_pages(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;
    let mut made = Vec::new();
    for (name, ws) in [
        ("a", ""),
        ("b", w1.id.as_str()),
        ("c", ""),
        ("d", w2.id.as_str()),
        ("e", w1.id.as_str()),
        ("f", ""),
        ("g", ""),
    ] {
        made.push(create(&admin, new_role(name, ws, &[])).await.unwrap());
    }

    let (all, pages) = list_all(&app, 2, "").await;
    assert_eq!(all, made, "creation order, every role once");
    assert_eq!(pages, 4);
    let (one_page, pages) = list_all(&app, 0, "").await;
    assert_eq!((one_page.len(), pages), (7, 1));
    let (huge, _) = list_all(&app, 5000, "").await;
    assert_eq!(huge.len(), 7);

    // A workspace's keys may hold the tenant-wide roles and its own.
    let (in_w1, _) = list_all(&app, 2, &w1.id).await;
    assert_eq!(names(&in_w1), ["a", "b", "c", "e", "f", "g"]);
    let (in_w2, _) = list_all(&app, 0, &w2.id).await;
    assert_eq!(names(&in_w2), ["a", "c", "d", "f", "g"]);

    let list = |page_size: i32, page_token: &str, workspace_id: &str| {
        let admin = admin.clone();
        let request = pb::ListRolesRequest {
            page_size,
            page_token: page_token.into(),
            workspace_id: workspace_id.into(),
        };
        async move { admin.roles.clone().list_roles(request).await.inner() }
    };
    assert_invalid(list(-1, "", "").await, &["page_size"], "negative page size");
    assert_invalid(
        list(0, "", "nope").await,
        &["workspace_id"],
        "bad workspace id",
    );
    assert_err(
        list(0, "", &Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let first = list(2, "", &w1.id).await.unwrap();
    assert!(!first.next_page_token.is_empty());
    // A token is bound to its list: its filters and its kind.
    assert_invalid(
        list(2, &first.next_page_token, "").await,
        &["page_token"],
        "token of another filter",
    );
    let scopes_token = admin
        .scopes
        .clone()
        .list_scopes(pb::ListScopesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap()
        .next_page_token;
    assert_invalid(
        list(2, &scopes_token, "").await,
        &["page_token"],
        "token of another list",
    );
    let mut edited = first.next_page_token.clone();
    let last = edited.pop().unwrap();
    edited.push(if last == 'A' { 'B' } else { 'A' });
    assert_invalid(
        list(2, &edited, &w1.id).await,
        &["page_token"],
        "edited token",
    );
    assert_invalid(
        list(2, "garbage", "").await,
        &["page_token"],
        "forged token",
    );
}

async fn update_follows_the_mask_and_the_etag(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let original = create(
        &admin,
        pb::CreateRoleRequest {
            description: "before".into(),
            ..new_role("crm", "", &["crm:read"])
        },
    )
    .await
    .unwrap();

    let described = update(
        &admin,
        pb::Role {
            id: original.id.clone(),
            description: "after".into(),
            scopes: strings(&["crm:write"]),
            ..Default::default()
        },
        &["description"],
        &original.etag,
    )
    .await
    .unwrap();
    assert_eq!(described.description, "after");
    assert_eq!(
        described.scopes,
        ["crm:read"],
        "outside the mask: unchanged"
    );
    assert_ne!(described.etag, original.etag);

    // The old etag is stale now; an unparseable one never matches.
    for etag in [original.etag.as_str(), "garbage"] {
        assert_err(
            update(
                &admin,
                pb::Role {
                    id: original.id.clone(),
                    description: "lost update".into(),
                    ..Default::default()
                },
                &["description"],
                etag,
            )
            .await,
            Code::Aborted,
            "ETAG_MISMATCH",
        );
    }
    assert_eq!(app.get_role(&original.id).await.unwrap(), described);

    // An empty mask updates every field the request sets, and clears nothing else.
    let rescoped = update(
        &admin,
        pb::Role {
            id: original.id.clone(),
            scopes: strings(&["crm:write", "crm:read"]),
            ..Default::default()
        },
        &[],
        "",
    )
    .await
    .unwrap();
    assert_eq!(rescoped.scopes, ["crm:read", "crm:write"]);
    assert_eq!(rescoped.description, "after");

    // Naming a field with its empty value clears it.
    let cleared = update(
        &admin,
        pb::Role {
            id: original.id.clone(),
            ..Default::default()
        },
        &["description", "scopes"],
        &rescoped.etag,
    )
    .await
    .unwrap();
    assert_eq!(cleared.description, "");
    assert!(cleared.scopes.is_empty());
    assert_eq!(app.get_role(&original.id).await.unwrap(), cleared);

    assert_err(
        update(
            &admin,
            pb::Role {
                id: Uuid::now_v7().to_string(),
                description: "x".into(),
                ..Default::default()
            },
            &["description"],
            "",
        )
        .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let events = role_events(&app, &original.id).await;
    let changed: Vec<&[String]> = events.iter().map(|e| e.changed_fields.as_slice()).collect();
    assert_eq!(
        changed,
        [
            &["description".to_string(), "scopes".to_string()][..],
            &["scopes".to_string()],
            &["description".to_string()],
            &[
                "name".to_string(),
                "description".to_string(),
                "scopes".to_string()
            ],
        ],
        "refused updates record nothing"
    );
}

async fn update_rejects_output_only_and_invalid_fields(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let w = app.create_workspace("w").await;
    let original = create(&admin, new_role("r", &w.id, &[])).await.unwrap();
    let with = |r: pb::Role| pb::Role {
        id: original.id.clone(),
        ..r
    };
    let hijack = with(pb::Role {
        name: "hijacked".into(),
        workspace_id: String::new(),
        tenant_id: Uuid::now_v7().to_string(),
        description: "fine".into(),
        ..Default::default()
    });
    for path in [
        "id",
        "tenant_id",
        "workspace_id",
        "name",
        "create_time",
        "update_time",
        "etag",
    ] {
        assert_invalid(
            update(&admin, hijack.clone(), &[path], "").await,
            &["update_mask"],
            path,
        );
        assert_invalid(
            update(&admin, hijack.clone(), &["description", path], "").await,
            &["update_mask"],
            path,
        );
    }
    for path in ["no_such_field", "Description", ""] {
        assert_invalid(
            update(&admin, hijack.clone(), &[path], "").await,
            &["update_mask"],
            path,
        );
    }
    // An empty mask never touches what cannot change, even when the request sets it.
    let updated = update(&admin, hijack, &[], "").await.unwrap();
    assert_eq!(
        (updated.name.as_str(), updated.workspace_id.as_str()),
        ("r", w.id.as_str())
    );
    assert_eq!(updated.tenant_id, original.tenant_id);
    assert_eq!(updated.description, "fine");

    assert_invalid(
        update(
            &admin,
            with(pb::Role {
                description: "d".repeat(1025),
                ..Default::default()
            }),
            &["description"],
            "",
        )
        .await,
        &["role.description"],
        "description too long",
    );
    assert_invalid(
        update(
            &admin,
            with(pb::Role {
                scopes: strings(&["not a scope"]),
                ..Default::default()
            }),
            &["scopes"],
            "",
        )
        .await,
        &["role.scopes"],
        "bad scope",
    );
    for id in ["nope", ""] {
        assert_invalid(
            update(
                &admin,
                pb::Role {
                    id: id.into(),
                    description: "x".into(),
                    ..Default::default()
                },
                &["description"],
                "",
            )
            .await,
            &["role.id"],
            "bad id",
        );
    }
}

async fn delete_of_unknown_or_bad_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    for force in [false, true] {
        assert_err(
            delete(&admin, &Uuid::now_v7().to_string(), force).await,
            Code::NotFound,
            "NOT_FOUND",
        );
    }
    assert_invalid(delete(&admin, "nope", false).await, &["id"], "bad id");
    assert_invalid(delete(&admin, "", false).await, &["id"], "empty id");
    assert_invalid(app.get_role("nope").await, &["id"], "bad id");
    assert_err(
        app.get_role(&Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn workspace_roles_go_with_their_workspace(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("local:read", &w.id).await;
    let local = app.create_role("local", &w.id, &["local:read"]).await;
    let wide = app.create_role("wide", "", &[]).await;
    app.as_admin()
        .workspaces
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: w.id.clone(),
            force: false,
        })
        .await
        .unwrap();
    assert_err(app.get_role(&local.id).await, Code::NotFound, "NOT_FOUND");
    assert_eq!(list_all(&app, 0, "").await.0, [wide]);
}

async fn no_escalation_through_roles(backend: Backend) {
    let app = spawn_app(backend).await;
    app.create_scope("crm:read", "").await;
    let limited = app.client(&bearer(token(
        Some(app.tenant),
        &["keyplane.roles:write", "keyplane.roles:read"],
    )));

    // Create: only built-in scopes the caller holds.
    let status = assert_err(
        create(
            &limited,
            new_role("admin", "", &["crm:read", "keyplane.api_keys:write"]),
        )
        .await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    let named = reason_metadata(&status, "scopes");
    assert!(named.contains("keyplane.api_keys:write"), "{status:?}");
    assert!(!named.contains("crm:read"), "{status:?}");
    // A wildcard over built-in scopes is never a way around the rule.
    let status = create(&limited, new_role("star", "", &["keyplane.api_keys:*"]))
        .await
        .expect_err("keyplane.api_keys:* would be stronger than the caller");
    assert!(
        matches!(
            status.code(),
            Code::PermissionDenied | Code::InvalidArgument
        ),
        "{status:?}"
    );
    let ordinary = create(
        &limited,
        new_role("reader", "", &["crm:read", "keyplane.roles:read"]),
    )
    .await
    .expect("held built-in scopes and custom scopes may be put in a role");

    // Update: neither adding a built-in scope the caller lacks…
    assert_err(
        update(
            &limited,
            pb::Role {
                id: ordinary.id.clone(),
                scopes: strings(&["crm:read", "keyplane.workspaces:write"]),
                ..Default::default()
            },
            &["scopes"],
            "",
        )
        .await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    // …nor changing a role that holds one.
    let strong = app
        .create_role("strong", "", &["keyplane.api_keys:write"])
        .await;
    for (role, paths) in [
        (
            pb::Role {
                id: strong.id.clone(),
                description: "mine now".into(),
                ..Default::default()
            },
            &["description"],
        ),
        (
            pb::Role {
                id: strong.id.clone(),
                scopes: strings(&["crm:read"]),
                ..Default::default()
            },
            &["scopes"],
        ),
    ] {
        assert_err(
            update(&limited, role, paths, "").await,
            Code::PermissionDenied,
            "SCOPE_ESCALATION",
        );
    }
    assert_eq!(app.get_role(&strong.id).await.unwrap(), strong, "unchanged");
    assert_eq!(app.get_role(&ordinary.id).await.unwrap(), ordinary);
    // A caller holding them may.
    update(
        &app.as_admin(),
        pb::Role {
            id: strong.id.clone(),
            description: "admins".into(),
            ..Default::default()
        },
        &["description"],
        &strong.etag,
    )
    .await
    .unwrap();
    // An admin key is held to the same rule as a token.
    let w = app.create_workspace("admins").await;
    let (_, secret) = app
        .create_key(&w.id, &["keyplane.roles:write", "keyplane.audit:read"])
        .await;
    let key_caller = app.client(&Cred::ApiKey(secret));
    assert_err(
        create(
            &key_caller,
            new_role("x", "", &["keyplane.workspaces:read"]),
        )
        .await,
        Code::PermissionDenied,
        "SCOPE_ESCALATION",
    );
    create(
        &key_caller,
        new_role("auditor", "", &["keyplane.audit:read"]),
    )
    .await
    .unwrap();
    assert_eq!(
        names(&list_all(&app, 0, "").await.0),
        ["reader", "strong", "auditor"],
        "refused requests created nothing"
    );
}

async fn other_tenants_roles_are_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let role = app.create_role("mine", "", &[]).await;
    let other = app.client(&stranger());

    assert_err(
        other
            .roles
            .clone()
            .get_role(pb::GetRoleRequest {
                id: role.id.clone(),
            })
            .await
            .resource(),
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_err(
        update(
            &other,
            pb::Role {
                id: role.id.clone(),
                description: "theirs".into(),
                ..Default::default()
            },
            &["description"],
            "",
        )
        .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    for force in [false, true] {
        assert_err(
            delete(&other, &role.id, force).await,
            Code::NotFound,
            "NOT_FOUND",
        );
    }
    assert_err(
        create(&other, new_role("theirs", &w.id, &[])).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let listed = other
        .roles
        .clone()
        .list_roles(pb::ListRolesRequest::default())
        .await
        .inner()
        .unwrap();
    assert!(listed.roles.is_empty());
    assert_err(
        other
            .roles
            .clone()
            .list_roles(pb::ListRolesRequest {
                workspace_id: w.id.clone(),
                ..Default::default()
            })
            .await
            .inner(),
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_eq!(app.get_role(&role.id).await.unwrap(), role, "untouched");
}

async fn deleting_a_scope_roles_hold_is_refused_unless_forced(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.as_admin();
    let w = app.create_workspace("w").await;
    let read = app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let both = app
        .create_role("both", "", &["crm:read", "crm:write"])
        .await;
    let only = app.create_role("only", &w.id, &["crm:read"]).await;
    let (key, _) = app.create_key(&w.id, &["crm:read"]).await;

    let delete_scope = |force: bool| {
        let admin = admin.clone();
        let id = read.id.clone();
        async move {
            admin
                .scopes
                .clone()
                .delete_scope(pb::DeleteScopeRequest { id, force })
                .await
                .inner()
                .map(|r| r.removed_grant_count)
        }
    };
    let status = assert_err(
        delete_scope(false).await,
        Code::FailedPrecondition,
        "SCOPE_IN_USE",
    );
    assert_eq!(
        reason_metadata(&status, "key_count"),
        "3",
        "one key and two roles hold it"
    );
    // Refused means untouched.
    assert_eq!(app.get_scope(&read.id).await.unwrap(), read);
    assert_eq!(app.get_role(&both.id).await.unwrap(), both);
    assert_eq!(app.get_role(&only.id).await.unwrap(), only);

    assert_eq!(
        delete_scope(true).await.unwrap(),
        1,
        "the keys that lost it"
    );
    assert_err(app.get_scope(&read.id).await, Code::NotFound, "NOT_FOUND");
    let both_after = app.get_role(&both.id).await.unwrap();
    assert_eq!(both_after.scopes, ["crm:write"], "the role lost it");
    assert_ne!(
        both_after.etag, both.etag,
        "the role changed, so its etag did"
    );
    let only_after = app.get_role(&only.id).await.unwrap();
    assert!(only_after.scopes.is_empty());
    assert_ne!(only_after.etag, only.etag);
    assert!(app.get_key(&key.id).await.unwrap().scopes.is_empty());
    // The roles' old etags are stale now.
    assert_err(
        update(
            &admin,
            pb::Role {
                id: both.id.clone(),
                description: "lost update".into(),
                ..Default::default()
            },
            &["description"],
            &both.etag,
        )
        .await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    // Creating the scope again puts it in no role.
    app.create_scope("crm:read", "").await;
    assert_eq!(app.get_role(&both.id).await.unwrap().scopes, ["crm:write"]);

    // A scope held by a role alone is in use too; forced, no key lost it.
    let local = app.create_scope("local:read", &w.id).await;
    app.create_role("local", &w.id, &["local:read"]).await;
    let request = |force| pb::DeleteScopeRequest {
        id: local.id.clone(),
        force,
    };
    let status = assert_err(
        admin
            .scopes
            .clone()
            .delete_scope(request(false))
            .await
            .inner(),
        Code::FailedPrecondition,
        "SCOPE_IN_USE",
    );
    assert_eq!(reason_metadata(&status, "key_count"), "1");
    let removed = admin
        .scopes
        .clone()
        .delete_scope(request(true))
        .await
        .inner()
        .unwrap()
        .removed_grant_count;
    assert_eq!(removed, 0);
}
