//! ScopeService: both create forms and their field rules, the reserved namespace and the
//! built-in scopes, uniqueness per tenant and workspace, idempotency, listing (built-ins
//! first, filters, pagination), updates with masks and etags, and deletes of scopes that
//! keys hold.
use keyplane::proto as pb;
use prost_types::FieldMask;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    create_from_parts_or_representation_applies_defaults,
    create_takes_exactly_one_form,
    create_validates_every_field,
    reserved_namespace_and_builtins_cannot_be_created,
    scopes_are_unique_per_tenant_and_workspace,
    create_in_a_missing_workspace_is_not_found,
    create_is_idempotent_by_request_id,
    concurrent_creates_make_one_scope,
    get_returns_custom_and_builtin_scopes,
    list_puts_builtins_first_then_customs_in_creation_order,
    list_filters_by_workspace,
    list_pages_across_the_builtin_boundary,
    list_page_size_defaults_to_50,
    list_refuses_tampered_and_replayed_page_tokens,
    update_follows_the_mask_and_the_etag,
    update_validates_fields_and_rejects_output_only_paths,
    builtins_cannot_be_updated_or_deleted,
    delete_refuses_scopes_in_use_unless_forced,
    delete_of_unknown_or_bad_id,
    workspace_scopes_are_grantable_only_in_their_workspace,
);

// ---------------------------------------------------------------------------------------
// Small wrappers around the ScopeService calls, all as the app's admin.

fn parts(resource: &str, action: &str) -> pb::CreateScopeRequest {
    pb::CreateScopeRequest {
        resource: resource.into(),
        action: action.into(),
        ..Default::default()
    }
}

fn repr(representation: &str) -> pb::CreateScopeRequest {
    pb::CreateScopeRequest {
        representation: representation.into(),
        ..Default::default()
    }
}

async fn create(app: &TestApp, request: pb::CreateScopeRequest) -> Result<pb::Scope, Status> {
    create_as(app, request, &app.admin()).await
}

async fn create_as(
    app: &TestApp,
    request: pb::CreateScopeRequest,
    cred: &Cred,
) -> Result<pb::Scope, Status> {
    app.scopes()
        .create_scope(req(request, cred))
        .await
        .map(|r| r.into_inner().scope.expect("scope in the response"))
}

async fn get(app: &TestApp, id: &str) -> Result<pb::Scope, Status> {
    app.scopes()
        .get_scope(req(pb::GetScopeRequest { id: id.into() }, &app.admin()))
        .await
        .map(|r| r.into_inner().scope.expect("scope in the response"))
}

async fn list(
    app: &TestApp,
    request: pb::ListScopesRequest,
) -> Result<pb::ListScopesResponse, Status> {
    app.scopes()
        .list_scopes(req(request, &app.admin()))
        .await
        .map(|r| r.into_inner())
}

/// Every scope of a listing, page by page; also returns how many pages it took.
async fn list_all(
    app: &TestApp,
    page_size: i32,
    workspace_id: &str,
    exclude_builtin: bool,
) -> (Vec<pb::Scope>, usize) {
    let mut all = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(
            app,
            pb::ListScopesRequest {
                page_size,
                page_token: token,
                workspace_id: workspace_id.into(),
                exclude_builtin,
            },
        )
        .await
        .expect("list scopes");
        pages += 1;
        if page_size > 0 {
            assert!(
                page.scopes.len() <= page_size as usize,
                "page of {} with page_size {page_size}",
                page.scopes.len()
            );
        }
        assert!(
            !page.scopes.is_empty() || page.next_page_token.is_empty(),
            "an empty page must be the last"
        );
        all.extend(page.scopes);
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(pages < 100, "pagination does not end");
        token = page.next_page_token;
    }
    (all, pages)
}

async fn update(
    app: &TestApp,
    scope: pb::Scope,
    paths: &[&str],
    etag: &str,
) -> Result<pb::Scope, Status> {
    app.scopes()
        .update_scope(req(
            pb::UpdateScopeRequest {
                scope: Some(scope),
                update_mask: Some(FieldMask {
                    paths: paths.iter().map(|p| p.to_string()).collect(),
                }),
                etag: etag.into(),
            },
            &app.admin(),
        ))
        .await
        .map(|r| r.into_inner().scope.expect("scope in the response"))
}

async fn delete(app: &TestApp, id: &str, force: bool) -> Result<i64, Status> {
    app.scopes()
        .delete_scope(req(
            pb::DeleteScopeRequest {
                id: id.into(),
                force,
            },
            &app.admin(),
        ))
        .await
        .map(|r| r.into_inner().removed_grant_count)
}

async fn get_key(app: &TestApp, id: &str) -> pb::ApiKey {
    app.keys()
        .get_api_key(req(pb::GetApiKeyRequest { id: id.into() }, &app.admin()))
        .await
        .expect("get key")
        .into_inner()
        .api_key
        .unwrap()
}

async fn create_key_with(
    app: &TestApp,
    workspace_id: &str,
    scopes: &[&str],
) -> Result<pb::ApiKey, Status> {
    app.keys()
        .create_api_key(req(
            pb::CreateApiKeyRequest {
                workspace_id: workspace_id.into(),
                name: "k".into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            &app.admin(),
        ))
        .await
        .map(|r| r.into_inner().api_key.unwrap())
}

/// The fixed id of the n-th built-in scope (1-based, in the order of SPEC §2.4).
fn builtin_id(n: usize) -> String {
    format!("00000000-0000-7000-8000-{n:012x}")
}

fn ids(scopes: &[pb::Scope]) -> Vec<String> {
    scopes.iter().map(|s| s.id.clone()).collect()
}

fn strings(scopes: &[pb::Scope]) -> Vec<String> {
    scopes.iter().map(|s| s.scope.clone()).collect()
}

/// Asserts an INVALID_ARGUMENT whose BadRequest names exactly `fields`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, fields: &[&str], why: &str) {
    let status = result.expect_err(why);
    assert_eq!(status.code(), Code::InvalidArgument, "{why}: {status:?}");
    assert_eq!(
        status.get_details_error_info().map(|i| i.reason),
        Some("INVALID_ARGUMENT".to_string()),
        "{why}: {status:?}"
    );
    assert_eq!(violated_fields(&status), fields, "{why}: {status:?}");
}

// ---------------------------------------------------------------------------------------

async fn create_from_parts_or_representation_applies_defaults(backend: Backend) {
    let app = spawn_app(backend).await;
    let from_parts = create(
        &app,
        pb::CreateScopeRequest {
            description: "read the CRM".into(),
            ..parts("crm", "read")
        },
    )
    .await
    .unwrap();
    assert_eq!(from_parts.resource, "crm");
    assert_eq!(from_parts.action, "read");
    assert_eq!(from_parts.scope, "crm:read", "the composed representation");
    assert_eq!(
        from_parts.name, "crm:read",
        "name defaults to the scope string"
    );
    assert_eq!(from_parts.category, "custom", "category defaults to custom");
    assert_eq!(from_parts.description, "read the CRM");
    assert_eq!(from_parts.tenant_id, app.tenant.to_string());
    assert_eq!(from_parts.workspace_id, "", "tenant-wide");
    assert!(!from_parts.builtin);
    assert!(!from_parts.etag.is_empty());
    assert!(from_parts.create_time.is_some());
    assert_eq!(from_parts.create_time, from_parts.update_time);
    assert_eq!(
        Uuid::parse_str(&from_parts.id).unwrap().get_version_num(),
        7,
        "ids are UUIDv7"
    );

    let w = app.create_workspace("w").await;
    let from_repr = create(
        &app,
        pb::CreateScopeRequest {
            workspace_id: w.id.clone(),
            name: "CRM write".into(),
            category: "data".into(),
            ..repr("crm:write")
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (
            from_repr.resource.as_str(),
            from_repr.action.as_str(),
            from_repr.scope.as_str()
        ),
        ("crm", "write", "crm:write")
    );
    assert_eq!(from_repr.name, "CRM write");
    assert_eq!(from_repr.category, "data");
    assert_eq!(from_repr.workspace_id, w.id);
    assert_eq!(from_repr.tenant_id, app.tenant.to_string());
    assert!(from_repr.id > from_parts.id, "id order is creation order");

    // `*` is allowed in the action, and every allowed character round-trips.
    let star = create(&app, repr("crm.contacts_v2-X:*")).await.unwrap();
    assert_eq!(
        (star.resource.as_str(), star.action.as_str()),
        ("crm.contacts_v2-X", "*")
    );
    let mixed = create(&app, parts("Billing-9", "re*d.all_x-1"))
        .await
        .unwrap();
    assert_eq!(mixed.scope, "Billing-9:re*d.all_x-1");
    // Names that merely contain "keyplane" are not reserved.
    for s in ["keyplanex:read", "my.keyplane:read", "crm:keyplane"] {
        assert_eq!(create(&app, repr(s)).await.unwrap().scope, s);
    }

    for created in [&from_parts, &from_repr, &star] {
        assert_eq!(&get(&app, &created.id).await.unwrap(), created);
    }
}

async fn create_takes_exactly_one_form(backend: Backend) {
    let app = spawn_app(backend).await;
    let both = pb::CreateScopeRequest {
        representation: "crm:read".into(),
        ..parts("crm", "read")
    };
    let status = assert_err(
        create(&app, both).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let fields = violated_fields(&status);
    assert!(
        !fields.is_empty()
            && fields
                .iter()
                .all(|f| ["resource", "action", "representation"].contains(&f.as_str())),
        "both forms: {fields:?}"
    );
    // Only one half of the representation next to it is still both forms.
    let half = pb::CreateScopeRequest {
        representation: "crm:read".into(),
        action: "read".into(),
        ..Default::default()
    };
    assert_err(
        create(&app, half).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );

    let neither = pb::CreateScopeRequest {
        name: "nameless".into(),
        ..Default::default()
    };
    let status = assert_err(
        create(&app, neither).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let fields = violated_fields(&status);
    assert!(
        !fields.is_empty()
            && fields
                .iter()
                .all(|f| ["resource", "action", "representation"].contains(&f.as_str())),
        "neither form: {fields:?}"
    );

    let listed = list(
        &app,
        pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(listed.scopes.is_empty(), "nothing was created: {listed:?}");

    // A form with a missing half names the missing half.
    assert_invalid(
        create(&app, parts("crm", "")).await,
        &["action"],
        "no action",
    );
    assert_invalid(
        create(&app, parts("", "read")).await,
        &["resource"],
        "no resource",
    );
}

async fn create_validates_every_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let long = "a".repeat(65);
    let cases: Vec<(pb::CreateScopeRequest, &str, &str)> = vec![
        (parts("c*m", "read"), "resource", "`*` only in the action"),
        (parts("cr m", "read"), "resource", "space in resource"),
        (parts("crm:x", "read"), "resource", "colon in resource"),
        (parts("crmé", "read"), "resource", "non-ASCII resource"),
        (parts(&long, "read"), "resource", "65-char resource"),
        (parts("crm", "re:ad"), "action", "colon in action"),
        (parts("crm", "re ad"), "action", "space in action"),
        (parts("crm", "réad"), "action", "non-ASCII action"),
        (parts("crm", &long), "action", "65-char action"),
        (repr("crm"), "representation", "no colon"),
        (repr(":read"), "representation", "empty resource"),
        (repr("crm:"), "representation", "empty action"),
        (repr("c*m:read"), "representation", "`*` in resource"),
        (repr("crm:re:ad"), "representation", "two colons"),
        (
            repr(&format!("{long}:read")),
            "representation",
            "65-char resource",
        ),
        (
            repr(&format!("crm:{long}")),
            "representation",
            "65-char action",
        ),
        (
            pb::CreateScopeRequest {
                name: "n".repeat(121),
                ..repr("crm:read")
            },
            "name",
            "name over 120",
        ),
        (
            pb::CreateScopeRequest {
                description: "d".repeat(1025),
                ..repr("crm:read")
            },
            "description",
            "description over 1024",
        ),
        (
            pb::CreateScopeRequest {
                category: "c".repeat(65),
                ..repr("crm:read")
            },
            "category",
            "category over 64",
        ),
        (
            pb::CreateScopeRequest {
                workspace_id: "not-a-uuid".into(),
                ..repr("crm:read")
            },
            "workspace_id",
            "bad workspace id",
        ),
        (
            pb::CreateScopeRequest {
                request_id: "not-a-uuid".into(),
                ..repr("crm:read")
            },
            "request_id",
            "bad request id",
        ),
    ];
    // Every case runs, so that one failure shows all the wrong answers at once.
    let mut wrong = Vec::new();
    for (request, field, why) in cases {
        match create(&app, request).await {
            Ok(scope) => wrong.push(format!("{why}: accepted as {}", scope.scope)),
            Err(status) => {
                let reason = status.get_details_error_info().map(|i| i.reason);
                let fields = violated_fields(&status);
                if status.code() != Code::InvalidArgument
                    || reason.as_deref() != Some("INVALID_ARGUMENT")
                    || fields != [field]
                {
                    wrong.push(format!(
                        "{why}: expected INVALID_ARGUMENT naming [{field}], got {:?} {reason:?} naming {fields:?}",
                        status.code()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));

    // Every bad field at once: one violation each.
    let all_bad = pb::CreateScopeRequest {
        name: "n".repeat(121),
        description: "d".repeat(1025),
        category: "c".repeat(65),
        workspace_id: "nope".into(),
        request_id: "nope".into(),
        ..repr("crm:read")
    };
    let status = assert_err(
        create(&app, all_bad).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let mut fields = violated_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        [
            "category",
            "description",
            "name",
            "request_id",
            "workspace_id"
        ]
    );

    let listed = list(
        &app,
        pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(listed.scopes.is_empty(), "nothing invalid was stored");

    // The limits themselves are accepted.
    let edge = create(
        &app,
        pb::CreateScopeRequest {
            name: "é".repeat(120),
            description: "d".repeat(1024),
            category: "c".repeat(64),
            ..parts(&"r".repeat(64), &"*".repeat(64))
        },
    )
    .await
    .unwrap();
    assert_eq!(edge.scope, format!("{}:{}", "r".repeat(64), "*".repeat(64)));
    assert_eq!(edge.name.chars().count(), 120);
    assert_eq!(edge.category.len(), 64);
    let edge_repr = create(
        &app,
        repr(&format!("{}:{}", "s".repeat(64), "a".repeat(64))),
    )
    .await
    .unwrap();
    assert_eq!(edge_repr.resource.len(), 64);
    assert_eq!(edge_repr.action.len(), 64);
}

async fn reserved_namespace_and_builtins_cannot_be_created(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    for s in [
        "keyplane.x:read",
        "keyplane:read",
        "keyplane.scopes:*",
        "keyplane.workspaces:delete",
    ] {
        assert_invalid(create(&app, repr(s)).await, &["representation"], s);
    }
    for (resource, action) in [("keyplane.x", "read"), ("keyplane", "read")] {
        assert_invalid(
            create(&app, parts(resource, action)).await,
            &["resource"],
            resource,
        );
    }
    let in_workspace = pb::CreateScopeRequest {
        workspace_id: w.id.clone(),
        ..repr("keyplane.x:read")
    };
    assert_invalid(
        create(&app, in_workspace).await,
        &["representation"],
        "reserved in a workspace",
    );

    // A built-in scope string already exists: it is never duplicated or overridden.
    for builtin in all_builtin() {
        assert_err(
            create(&app, repr(builtin)).await,
            Code::AlreadyExists,
            "ALREADY_EXISTS",
        );
    }
    assert_err(
        create(&app, parts("keyplane.scopes", "read")).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    let builtin_in_workspace = pb::CreateScopeRequest {
        workspace_id: w.id.clone(),
        ..repr("keyplane.scopes:read")
    };
    assert_err(
        create(&app, builtin_in_workspace).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    let listed = list(&app, pb::ListScopesRequest::default()).await.unwrap();
    assert_eq!(listed.scopes.len(), 7, "only the built-ins: {listed:?}");
    assert!(listed.scopes.iter().all(|s| s.builtin));
}

async fn scopes_are_unique_per_tenant_and_workspace(backend: Backend) {
    let app = spawn_app(backend).await;
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;
    let in_ws = |ws: &str, s: &str| pb::CreateScopeRequest {
        workspace_id: ws.into(),
        ..repr(s)
    };

    let wide = create(&app, repr("crm:read")).await.unwrap();
    assert_err(
        create(&app, repr("crm:read")).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // The two create forms name the same scope.
    assert_err(
        create(&app, parts("crm", "read")).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    // The same string in a workspace, and in another workspace, is allowed.
    let local1 = create(&app, in_ws(&w1.id, "crm:read")).await.unwrap();
    let local2 = create(&app, in_ws(&w2.id, "crm:read")).await.unwrap();
    assert_ne!(local1.id, local2.id);
    assert_eq!(local1.workspace_id, w1.id);
    assert_eq!(local2.workspace_id, w2.id);
    assert_err(
        create(&app, in_ws(&w1.id, "crm:read")).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    assert_err(
        create(
            &app,
            pb::CreateScopeRequest {
                workspace_id: w2.id.clone(),
                ..parts("crm", "read")
            },
        )
        .await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // Matching is exact: case and wildcard make other scopes.
    create(&app, repr("CRM:read")).await.unwrap();
    create(&app, repr("crm:*")).await.unwrap();

    // Another tenant has its own namespace.
    let other = Cred::Bearer(token(Some(Uuid::now_v7()), &all_builtin()));
    let theirs = create_as(&app, repr("crm:read"), &other).await.unwrap();
    assert_ne!(theirs.tenant_id, wide.tenant_id);

    let (customs, _) = list_all(&app, 0, "", true).await;
    assert_eq!(
        strings(&customs),
        ["crm:read", "crm:read", "crm:read", "CRM:read", "crm:*"]
    );
    assert_eq!(customs[0].id, wide.id);
}

async fn create_in_a_missing_workspace_is_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let missing = pb::CreateScopeRequest {
        workspace_id: Uuid::now_v7().to_string(),
        ..repr("crm:read")
    };
    assert_err(create(&app, missing).await, Code::NotFound, "NOT_FOUND");

    // A workspace that was deleted is missing too.
    let w = app.create_workspace("gone").await;
    app.workspaces()
        .delete_workspace(req(
            pb::DeleteWorkspaceRequest {
                id: w.id.clone(),
                force: false,
            },
            &app.admin(),
        ))
        .await
        .unwrap();
    let deleted = pb::CreateScopeRequest {
        workspace_id: w.id,
        ..repr("crm:read")
    };
    assert_err(create(&app, deleted).await, Code::NotFound, "NOT_FOUND");
    let (customs, _) = list_all(&app, 0, "", true).await;
    assert!(customs.is_empty());
}

async fn create_is_idempotent_by_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let request = pb::CreateScopeRequest {
        workspace_id: w.id.clone(),
        description: "once".into(),
        request_id: Uuid::now_v7().to_string(),
        ..repr("crm:read")
    };
    let first = create(&app, request.clone()).await.unwrap();
    let retry = create(&app, request.clone()).await.unwrap();
    assert_eq!(first, retry, "the retry returns the first result");
    // Without the request id the same request is a duplicate.
    let again = pb::CreateScopeRequest {
        request_id: String::new(),
        ..request.clone()
    };
    assert_err(
        create(&app, again).await,
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    let (customs, _) = list_all(&app, 0, "", true).await;
    assert_eq!(
        ids(&customs),
        std::slice::from_ref(&first.id),
        "the retry created nothing"
    );

    // A different request id is a different request.
    let other = pb::CreateScopeRequest {
        request_id: Uuid::now_v7().to_string(),
        ..repr("crm:write")
    };
    let second = create(&app, other).await.unwrap();
    assert_ne!(second.id, first.id);
}

async fn concurrent_creates_make_one_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    // The same scope without a request id: one wins, the others are duplicates.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = app.scopes();
        let request = req(repr("race:read"), &app.admin());
        tasks.push(tokio::spawn(
            async move { client.create_scope(request).await },
        ));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(created, 1);

    // The same request id: every retry answers with the one scope.
    let request_id = Uuid::now_v7().to_string();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = app.scopes();
        let request = req(
            pb::CreateScopeRequest {
                request_id: request_id.clone(),
                ..repr("race:write")
            },
            &app.admin(),
        );
        tasks.push(tokio::spawn(
            async move { client.create_scope(request).await },
        ));
    }
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let scope = task
            .await
            .unwrap()
            .expect("a retry with the same request id succeeds")
            .into_inner()
            .scope
            .unwrap();
        ids.insert(scope.id);
    }
    assert_eq!(ids.len(), 1, "one scope for one request id");
    let (customs, _) = list_all(&app, 0, "", true).await;
    assert_eq!(strings(&customs), ["race:read", "race:write"]);
}

async fn get_returns_custom_and_builtin_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    for (i, builtin) in all_builtin().into_iter().enumerate() {
        let id = builtin_id(i + 1);
        let got = get(&app, &id).await.unwrap();
        assert_eq!(got.id, id);
        assert_eq!(got.scope, builtin);
        let (resource, action) = builtin.split_once(':').unwrap();
        assert_eq!(
            (got.resource.as_str(), got.action.as_str()),
            (resource, action)
        );
        assert!(got.builtin, "{builtin}");
        assert_eq!(got.tenant_id, "", "built-ins belong to no tenant");
        assert_eq!(got.workspace_id, "");
        assert!(!got.etag.is_empty());
        // Every tenant sees the same built-in under the same id.
        let other = Cred::Bearer(token(Some(Uuid::now_v7()), &all_builtin()));
        let theirs = app
            .scopes()
            .get_scope(req(pb::GetScopeRequest { id: id.clone() }, &other))
            .await
            .unwrap()
            .into_inner()
            .scope
            .unwrap();
        assert_eq!(theirs, got);
    }
    assert_eq!(builtin_id(1), "00000000-0000-7000-8000-000000000001");

    let custom = create(
        &app,
        pb::CreateScopeRequest {
            name: "CRM read".into(),
            description: "d".into(),
            category: "integration".into(),
            ..repr("crm:read")
        },
    )
    .await
    .unwrap();
    let got = get(&app, &custom.id).await.unwrap();
    assert_eq!(got, custom);
    assert!(!got.builtin);

    assert_err(
        get(&app, &Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // Next to the built-in ids, but not one of them.
    assert_err(get(&app, &builtin_id(8)).await, Code::NotFound, "NOT_FOUND");
    assert_invalid(get(&app, "nope").await, &["id"], "bad id");
    assert_invalid(get(&app, "").await, &["id"], "empty id");
}

async fn list_puts_builtins_first_then_customs_in_creation_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    // Created out of alphabetical order: the listing follows creation, not names.
    let mut created = Vec::new();
    for (s, ws) in [
        ("zeta:read", ""),
        ("alpha:read", w.id.as_str()),
        ("mid:*", ""),
        ("beta:write", w.id.as_str()),
    ] {
        created.push(
            create(
                &app,
                pb::CreateScopeRequest {
                    workspace_id: ws.into(),
                    ..repr(s)
                },
            )
            .await
            .unwrap(),
        );
    }

    let page = list(&app, pb::ListScopesRequest::default()).await.unwrap();
    assert!(page.next_page_token.is_empty(), "everything fits a page");
    assert_eq!(page.scopes.len(), 11);
    let expected_builtin_ids: Vec<String> = (1..=7).map(builtin_id).collect();
    assert_eq!(ids(&page.scopes[..7]), expected_builtin_ids);
    assert_eq!(strings(&page.scopes[..7]), all_builtin());
    assert!(
        page.scopes[..7]
            .iter()
            .all(|s| s.builtin && s.tenant_id.is_empty())
    );
    assert_eq!(&page.scopes[7..], &created[..], "customs in creation order");

    let customs = list(
        &app,
        pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(customs.scopes, created);
    assert!(customs.next_page_token.is_empty());

    // A fresh tenant lists the built-ins only, or nothing without them.
    let fresh = spawn_app(backend).await;
    let (only_builtin, _) = list_all(&fresh, 0, "", false).await;
    assert_eq!(strings(&only_builtin), all_builtin());
    let (nothing, pages) = list_all(&fresh, 0, "", true).await;
    assert!(nothing.is_empty());
    assert_eq!(pages, 1);

    let status = assert_err(
        list(
            &app,
            pb::ListScopesRequest {
                page_size: -1,
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["page_size"]);
    let huge = list(
        &app,
        pb::ListScopesRequest {
            page_size: 5000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(huge.scopes.len(), 11);
}

async fn list_filters_by_workspace(backend: Backend) {
    let app = spawn_app(backend).await;
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;
    let empty = app.create_workspace("empty").await;
    let wide1 = app.create_scope("shared:read", "").await;
    let own1 = app.create_scope("one:read", &w1.id).await;
    let own2 = app.create_scope("two:read", &w2.id).await;
    let wide2 = app.create_scope("shared:write", "").await;
    let own1b = app.create_scope("shared:read", &w1.id).await;

    let (in_w1, _) = list_all(&app, 0, &w1.id, false).await;
    assert_eq!(strings(&in_w1[..7]), all_builtin());
    assert_eq!(
        ids(&in_w1[7..]),
        ids(&[wide1.clone(), own1.clone(), wide2.clone(), own1b.clone()]),
        "built-ins, tenant-wide and w1's own, not w2's"
    );
    let (in_w1_custom, _) = list_all(&app, 0, &w1.id, true).await;
    assert_eq!(in_w1_custom, in_w1[7..].to_vec());

    let (in_w2, _) = list_all(&app, 0, &w2.id, true).await;
    assert_eq!(
        ids(&in_w2),
        ids(&[wide1.clone(), own2.clone(), wide2.clone()])
    );
    let (in_empty, _) = list_all(&app, 0, &empty.id, true).await;
    assert_eq!(ids(&in_empty), ids(&[wide1.clone(), wide2.clone()]));

    // Without the filter: everything of the tenant.
    let (everything, _) = list_all(&app, 0, "", true).await;
    assert_eq!(ids(&everything), ids(&[wide1, own1, own2, wide2, own1b]));

    // Paging through a filtered listing keeps the filter.
    let (paged, pages) = list_all(&app, 2, &w1.id, false).await;
    assert_eq!(paged, in_w1);
    assert_eq!(pages, 6, "11 scopes in pages of 2");

    assert_err(
        list(
            &app,
            pb::ListScopesRequest {
                workspace_id: Uuid::now_v7().to_string(),
                ..Default::default()
            },
        )
        .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_invalid(
        list(
            &app,
            pb::ListScopesRequest {
                workspace_id: "nope".into(),
                ..Default::default()
            },
        )
        .await,
        &["workspace_id"],
        "bad workspace id",
    );
}

async fn list_pages_across_the_builtin_boundary(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut custom_ids = Vec::new();
    for i in 0..5 {
        custom_ids.push(app.create_scope(&format!("r{i}:read"), "").await.id);
    }
    let mut expected: Vec<String> = (1..=7).map(builtin_id).collect();
    expected.extend(custom_ids.iter().cloned());

    for size in [1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13] {
        let (all, pages) = list_all(&app, size, "", false).await;
        assert_eq!(
            ids(&all),
            expected,
            "page_size {size}: each scope once, in order"
        );
        assert_eq!(
            pages,
            12usize.div_ceil(size as usize).max(1),
            "page_size {size}"
        );
    }
    for size in [1, 2, 3, 5, 6] {
        let (all, pages) = list_all(&app, size, "", true).await;
        assert_eq!(ids(&all), custom_ids, "exclude_builtin, page_size {size}");
        assert_eq!(pages, 5usize.div_ceil(size as usize), "page_size {size}");
    }

    // The boundary itself: a page of 7 is exactly the built-ins, and still has a next page.
    let first = list(
        &app,
        pb::ListScopesRequest {
            page_size: 7,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(first.scopes.iter().all(|s| s.builtin));
    assert!(!first.next_page_token.is_empty());
    let second = list(
        &app,
        pb::ListScopesRequest {
            page_size: 7,
            page_token: first.next_page_token,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&second.scopes), custom_ids);
    assert!(second.next_page_token.is_empty());

    // A scope created while paging shows up on a later page.
    let start = list(
        &app,
        pb::ListScopesRequest {
            page_size: 9,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let late = app.create_scope("late:read", "").await;
    let rest = list(
        &app,
        pb::ListScopesRequest {
            page_size: 9,
            page_token: start.next_page_token,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut tail = custom_ids[2..].to_vec();
    tail.push(late.id);
    assert_eq!(ids(&rest.scopes), tail);
}

async fn list_page_size_defaults_to_50(backend: Backend) {
    let app = spawn_app(backend).await;
    for i in 0..45 {
        app.create_scope(&format!("bulk{i:02}:read"), "").await;
    }
    let first = list(&app, pb::ListScopesRequest::default()).await.unwrap();
    assert_eq!(first.scopes.len(), 50, "page_size 0 means 50");
    assert!(!first.next_page_token.is_empty());
    let second = list(
        &app,
        pb::ListScopesRequest {
            page_token: first.next_page_token,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(strings(&second.scopes), ["bulk43:read", "bulk44:read"]);
    assert!(second.next_page_token.is_empty());
    let big = list(
        &app,
        pb::ListScopesRequest {
            page_size: 1001,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(big.scopes.len(), 52);
    assert!(big.next_page_token.is_empty());
}

async fn list_refuses_tampered_and_replayed_page_tokens(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    for i in 0..3 {
        app.create_scope(&format!("r{i}:read"), "").await;
    }
    let page = |token: String, workspace_id: &str, exclude_builtin: bool| pb::ListScopesRequest {
        page_size: 3,
        page_token: token,
        workspace_id: workspace_id.into(),
        exclude_builtin,
    };
    let token = list(&app, page(String::new(), "", false))
        .await
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());
    // The token works as given.
    let next = list(&app, page(token.clone(), "", false)).await.unwrap();
    assert_eq!(
        ids(&next.scopes),
        (4..=6).map(builtin_id).collect::<Vec<_>>()
    );

    let mut edited = token.clone().into_bytes();
    edited[5] = if edited[5] == b'A' { b'B' } else { b'A' };
    let mut edited_mac = token.clone().into_bytes();
    // Well inside the signature part (the last character holds padding bits too).
    let at = edited_mac.len() - 3;
    edited_mac[at] = if edited_mac[at] == b'A' { b'B' } else { b'A' };
    for (bad, why) in [
        (String::from_utf8(edited).unwrap(), "edited cursor"),
        (String::from_utf8(edited_mac).unwrap(), "edited signature"),
        ("garbage".to_string(), "garbage"),
        (format!("{token}x"), "appended"),
        (token[..token.len() - 2].to_string(), "truncated"),
        ("A".repeat(5000), "huge"),
    ] {
        assert_invalid(list(&app, page(bad, "", false)).await, &["page_token"], why);
    }

    // Reused with other filters.
    assert_invalid(
        list(&app, page(token.clone(), "", true)).await,
        &["page_token"],
        "token reused with exclude_builtin",
    );
    assert_invalid(
        list(&app, page(token.clone(), &w.id, false)).await,
        &["page_token"],
        "token reused with a workspace filter",
    );
    let ws_token = list(&app, page(String::new(), &w.id, false))
        .await
        .unwrap()
        .next_page_token;
    assert!(!ws_token.is_empty());
    assert_invalid(
        list(&app, page(ws_token.clone(), "", false)).await,
        &["page_token"],
        "workspace token reused without the filter",
    );
    let w2 = app.create_workspace("w2").await;
    assert_invalid(
        list(&app, page(ws_token, &w2.id, false)).await,
        &["page_token"],
        "workspace token reused with another workspace",
    );
    // A token of another list kind.
    for i in 0..4 {
        app.create_workspace(&format!("more{i}")).await;
    }
    let workspace_token = app
        .workspaces()
        .list_workspaces(req(
            pb::ListWorkspacesRequest {
                page_size: 1,
                page_token: String::new(),
            },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!workspace_token.is_empty());
    assert_invalid(
        list(&app, page(workspace_token, "", false)).await,
        &["page_token"],
        "a ListWorkspaces token",
    );
    // Another tenant's listing.
    let other = Cred::Bearer(token_of(Uuid::now_v7()));
    let status = app
        .scopes()
        .list_scopes(req(page(token, "", false), &other))
        .await
        .expect_err("another tenant's token");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["page_token"]);
}

fn token_of(tenant: Uuid) -> String {
    token(Some(tenant), &all_builtin())
}

async fn update_follows_the_mask_and_the_etag(backend: Backend) {
    let app = spawn_app(backend).await;
    let original = create(
        &app,
        pb::CreateScopeRequest {
            name: "CRM read".into(),
            description: "before".into(),
            category: "data".into(),
            ..repr("crm:read")
        },
    )
    .await
    .unwrap();

    let changed = pb::Scope {
        id: original.id.clone(),
        name: "Read the CRM".into(),
        description: "not in the mask".into(),
        category: "not in the mask".into(),
        ..Default::default()
    };
    let renamed = update(&app, changed, &["name"], &original.etag)
        .await
        .unwrap();
    assert_eq!(renamed.name, "Read the CRM");
    assert_eq!(renamed.description, "before", "outside the mask: unchanged");
    assert_eq!(renamed.category, "data");
    assert_eq!(renamed.scope, "crm:read");
    assert_eq!(
        (renamed.resource.as_str(), renamed.action.as_str()),
        ("crm", "read")
    );
    assert_eq!(renamed.tenant_id, original.tenant_id);
    assert_eq!(renamed.create_time, original.create_time);
    assert_ne!(renamed.update_time, original.update_time);
    assert_ne!(
        renamed.etag, original.etag,
        "the etag changes on every update"
    );
    assert_eq!(get(&app, &original.id).await.unwrap(), renamed, "stored");

    // The old etag is stale now; an unparseable one never matches.
    let stale = pb::Scope {
        id: original.id.clone(),
        name: "lost update".into(),
        ..Default::default()
    };
    assert_err(
        update(&app, stale.clone(), &["name"], &original.etag).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_err(
        update(&app, stale, &["name"], "garbage").await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(
        get(&app, &original.id).await.unwrap(),
        renamed,
        "nothing changed"
    );

    let two = pb::Scope {
        id: original.id.clone(),
        name: "ignored".into(),
        description: "after".into(),
        category: "tool".into(),
        ..Default::default()
    };
    let both = update(&app, two, &["description", "category"], &renamed.etag)
        .await
        .unwrap();
    assert_eq!(
        (
            both.name.as_str(),
            both.description.as_str(),
            both.category.as_str()
        ),
        ("Read the CRM", "after", "tool")
    );
    assert_ne!(both.etag, renamed.etag);

    // An empty mask updates every field the request sets, and clears nothing else.
    let only_name = pb::Scope {
        id: original.id.clone(),
        name: "Empty mask".into(),
        ..Default::default()
    };
    let after = update(&app, only_name, &[], "").await.unwrap();
    assert_eq!(
        (
            after.name.as_str(),
            after.description.as_str(),
            after.category.as_str()
        ),
        ("Empty mask", "after", "tool")
    );

    // Naming a field with its empty value clears it; the category falls back to its
    // default, and the name never ends up empty.
    let clear = pb::Scope {
        id: original.id.clone(),
        ..Default::default()
    };
    let cleared = update(
        &app,
        clear.clone(),
        &["description", "category"],
        &after.etag,
    )
    .await
    .unwrap();
    assert_eq!(cleared.description, "");
    assert_eq!(cleared.category, "custom");

    let missing = pb::Scope {
        id: Uuid::now_v7().to_string(),
        name: "x".into(),
        ..Default::default()
    };
    assert_err(
        update(&app, missing, &["name"], "").await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // A name named in the mask but empty: like the category, it falls back to its default
    // (the scope string), or it is refused; a scope never ends up without a name.
    match update(&app, clear, &["name"], "").await {
        Ok(scope) => assert_eq!(
            scope.name, "crm:read",
            "a cleared name must fall back to the scope string, not be empty"
        ),
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert_eq!(violated_fields(&status), ["scope.name"]);
        }
    }
}

async fn update_validates_fields_and_rejects_output_only_paths(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let original = app.create_scope("crm:read", &w.id).await;
    let with = |s: pb::Scope| pb::Scope {
        id: original.id.clone(),
        ..s
    };

    for path in [
        "id",
        "tenant_id",
        "workspace_id",
        "resource",
        "action",
        "scope",
        "builtin",
        "create_time",
        "update_time",
        "etag",
    ] {
        let request = with(pb::Scope {
            resource: "hijack".into(),
            action: "all".into(),
            scope: "hijack:all".into(),
            name: "x".into(),
            ..Default::default()
        });
        assert_invalid(
            update(&app, request.clone(), &[path], "").await,
            &["update_mask"],
            path,
        );
        assert_invalid(
            update(&app, request, &["name", path], "").await,
            &["update_mask"],
            path,
        );
    }
    for path in ["no_such_field", "Name", ""] {
        assert_invalid(
            update(
                &app,
                with(pb::Scope {
                    name: "x".into(),
                    ..Default::default()
                }),
                &[path],
                "",
            )
            .await,
            &["update_mask"],
            path,
        );
    }

    // An empty mask never touches what cannot change, even when the request sets it.
    let sneaky = with(pb::Scope {
        resource: "hijack".into(),
        action: "all".into(),
        scope: "hijack:all".into(),
        workspace_id: String::new(),
        builtin: true,
        description: "fine".into(),
        ..Default::default()
    });
    let updated = update(&app, sneaky, &[], "").await.unwrap();
    assert_eq!(updated.scope, "crm:read");
    assert_eq!(updated.workspace_id, w.id);
    assert!(!updated.builtin);
    assert_eq!(updated.description, "fine");

    for (scope, path, field) in [
        (
            pb::Scope {
                name: "n".repeat(121),
                ..Default::default()
            },
            "name",
            "scope.name",
        ),
        (
            pb::Scope {
                description: "d".repeat(1025),
                ..Default::default()
            },
            "description",
            "scope.description",
        ),
        (
            pb::Scope {
                category: "c".repeat(65),
                ..Default::default()
            },
            "category",
            "scope.category",
        ),
    ] {
        assert_invalid(update(&app, with(scope), &[path], "").await, &[field], path);
    }
    assert_invalid(
        update(
            &app,
            pb::Scope {
                id: "nope".into(),
                name: "x".into(),
                ..Default::default()
            },
            &["name"],
            "",
        )
        .await,
        &["scope.id"],
        "bad id",
    );
    // The limits themselves are accepted.
    let edge = update(
        &app,
        with(pb::Scope {
            name: "é".repeat(120),
            description: "d".repeat(1024),
            category: "c".repeat(64),
            ..Default::default()
        }),
        &["name", "description", "category"],
        "",
    )
    .await
    .unwrap();
    assert_eq!(edge.name.chars().count(), 120);
    assert_eq!(edge.scope, "crm:read");
}

async fn builtins_cannot_be_updated_or_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    for n in 1..=7 {
        let id = builtin_id(n);
        let before = get(&app, &id).await.unwrap();
        let change = pb::Scope {
            id: id.clone(),
            name: "mine now".into(),
            description: "mine".into(),
            ..Default::default()
        };
        assert_err(
            update(&app, change.clone(), &["name"], "").await,
            Code::PermissionDenied,
            "BUILTIN_SCOPE_READ_ONLY",
        );
        assert_err(
            update(&app, change, &[], &before.etag).await,
            Code::PermissionDenied,
            "BUILTIN_SCOPE_READ_ONLY",
        );
        for force in [false, true] {
            assert_err(
                delete(&app, &id, force).await,
                Code::PermissionDenied,
                "BUILTIN_SCOPE_READ_ONLY",
            );
        }
        assert_eq!(get(&app, &id).await.unwrap(), before, "unchanged");
    }
    let (all, _) = list_all(&app, 0, "", false).await;
    assert_eq!(strings(&all), all_builtin());
    // Keys holding built-in scopes keep them.
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &["keyplane.scopes:read"]).await;
    assert_eq!(key.scopes, ["keyplane.scopes:read"]);
    assert_eq!(
        app.verify(&secret, &["keyplane.scopes:read"]).await.code(),
        pb::VerifyCode::Valid
    );
}

async fn delete_refuses_scopes_in_use_unless_forced(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let read = app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let (k1, s1) = app.create_key(&w.id, &["crm:read", "crm:write"]).await;
    let (k2, s2) = app.create_key(&w.id, &["crm:read"]).await;
    assert_eq!(k1.scopes, ["crm:read", "crm:write"]);
    assert_eq!(
        app.verify(&s1, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    let status = assert_err(
        delete(&app, &read.id, false).await,
        Code::FailedPrecondition,
        "SCOPE_IN_USE",
    );
    assert!(!status.message().is_empty());
    // Refused means untouched.
    assert_eq!(get(&app, &read.id).await.unwrap(), read);
    assert_eq!(get_key(&app, &k1.id).await.etag, k1.etag);
    assert_eq!(
        app.verify(&s2, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    let removed = delete(&app, &read.id, true).await.unwrap();
    assert_eq!(removed, 2, "two keys held the scope");
    assert_err(get(&app, &read.id).await, Code::NotFound, "NOT_FOUND");

    let k1_after = get_key(&app, &k1.id).await;
    assert_eq!(k1_after.scopes, ["crm:write"], "the grant is gone");
    assert_ne!(k1_after.etag, k1.etag, "the key changed, so its etag did");
    let k2_after = get_key(&app, &k2.id).await;
    assert!(k2_after.scopes.is_empty(), "{:?}", k2_after.scopes);
    assert_ne!(k2_after.etag, k2.etag);
    // The old etag of the key is stale now.
    let stale = app
        .keys()
        .update_api_key(req(
            pb::UpdateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    id: k1.id.clone(),
                    name: "renamed".into(),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["name".into()],
                }),
                etag: k1.etag.clone(),
            },
            &app.admin(),
        ))
        .await;
    assert_err(stale, Code::Aborted, "ETAG_MISMATCH");

    let verdict = app.verify(&s1, &["crm:read"]).await;
    assert_eq!(verdict.code(), pb::VerifyCode::InsufficientScopes);
    assert!(!verdict.valid);
    assert_eq!(verdict.missing_scopes, ["crm:read"]);
    assert_eq!(
        app.verify(&s1, &["crm:write"]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        app.verify(&s2, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Creating the scope again grants it to nobody.
    let reborn = app.create_scope("crm:read", "").await;
    assert_ne!(reborn.id, read.id);
    assert_eq!(
        app.verify(&s1, &["crm:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );
    assert_eq!(get_key(&app, &k1.id).await.scopes, ["crm:write"]);

    // An unused scope goes without force; with force it reports no grants.
    assert_eq!(delete(&app, &reborn.id, false).await.unwrap(), 0);
    let unused = app.create_scope("unused:read", &w.id).await;
    assert_eq!(delete(&app, &unused.id, true).await.unwrap(), 0);
    assert_err(
        delete(&app, &read.id, true).await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn delete_of_unknown_or_bad_id(backend: Backend) {
    let app = spawn_app(backend).await;
    for force in [false, true] {
        assert_err(
            delete(&app, &Uuid::now_v7().to_string(), force).await,
            Code::NotFound,
            "NOT_FOUND",
        );
    }
    assert_invalid(delete(&app, "nope", false).await, &["id"], "bad id");
    assert_invalid(delete(&app, "", false).await, &["id"], "empty id");
}

async fn workspace_scopes_are_grantable_only_in_their_workspace(backend: Backend) {
    let app = spawn_app(backend).await;
    let w1 = app.create_workspace("w1").await;
    let w2 = app.create_workspace("w2").await;
    app.create_scope("local:read", &w1.id).await;
    app.create_scope("shared:read", "").await;

    let (k1, s1) = app.create_key(&w1.id, &["local:read", "shared:read"]).await;
    assert_eq!(k1.scopes, ["local:read", "shared:read"]);
    assert_eq!(
        app.verify(&s1, &["local:read", "shared:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    let status = assert_err(
        create_key_with(&app, &w2.id, &["shared:read", "local:read"]).await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert_eq!(violated_fields(&status), ["scopes"]);
    let info = status.get_details_error_info().unwrap();
    assert!(
        info.metadata.values().any(|v| v.contains("local:read"))
            && !info.metadata.values().any(|v| v.contains("shared:read")),
        "names the unknown scope only: {info:?}"
    );
    // A tenant-wide scope is fine there.
    let (k2, s2) = app.create_key(&w2.id, &["shared:read"]).await;
    assert_eq!(
        app.verify(&s2, &["local:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );

    // Nor can an update put it on a key of the other workspace.
    let added = app
        .keys()
        .update_api_key(req(
            pb::UpdateApiKeyRequest {
                api_key: Some(pb::ApiKey {
                    id: k2.id.clone(),
                    scopes: vec!["shared:read".into(), "local:read".into()],
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["scopes".into()],
                }),
                etag: String::new(),
            },
            &app.admin(),
        ))
        .await;
    assert_err(added, Code::InvalidArgument, "UNKNOWN_SCOPE");
    assert_eq!(get_key(&app, &k2.id).await.scopes, ["shared:read"]);

    // A scope that exists nowhere is unknown everywhere.
    assert_err(
        create_key_with(&app, &w1.id, &["nowhere:read"]).await,
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );

    // Once w2 has its own scope of that name, its keys may hold it.
    app.create_scope("local:read", &w2.id).await;
    let k3 = create_key_with(&app, &w2.id, &["local:read"])
        .await
        .unwrap();
    assert_eq!(k3.scopes, ["local:read"]);
}
