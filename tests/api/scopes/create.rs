//! CreateScope: both forms and their defaults, field rules, the reserved namespace,
//! uniqueness per tenant and workspace, and idempotency by request id.
use keyplane::proto as pb;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use super::*;

on_both_backends!(
    create_from_parts_or_representation_applies_defaults,
    create_takes_exactly_one_form,
    create_validates_every_field,
    reserved_namespace_and_builtins_cannot_be_created,
    scopes_are_unique_per_tenant_and_workspace,
    create_in_a_missing_workspace_is_not_found,
    create_is_idempotent_by_request_id,
);

async fn create_from_parts_or_representation_applies_defaults(backend: Backend) {
    let app = spawn_app(backend).await;
    let from_parts = app
        .as_admin()
        .scopes
        .create_scope(pb::CreateScopeRequest {
            description: "read the CRM".into(),
            ..parts("crm", "read")
        })
        .await
        .resource()
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
    let from_repr = app
        .as_admin()
        .scopes
        .create_scope(pb::CreateScopeRequest {
            workspace_id: w.id.clone(),
            name: "CRM write".into(),
            category: "data".into(),
            ..repr("crm:write")
        })
        .await
        .resource()
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
    let star = app
        .as_admin()
        .scopes
        .create_scope(repr("crm.contacts_v2-X:*"))
        .await
        .resource()
        .unwrap();
    assert_eq!(
        (star.resource.as_str(), star.action.as_str()),
        ("crm.contacts_v2-X", "*")
    );
    let mixed = app
        .as_admin()
        .scopes
        .create_scope(parts("Billing-9", "re*d.all_x-1"))
        .await
        .resource()
        .unwrap();
    assert_eq!(mixed.scope, "Billing-9:re*d.all_x-1");
    // Names that merely contain "keyplane" are not reserved.
    for s in ["keyplanex:read", "my.keyplane:read", "crm:keyplane"] {
        assert_eq!(
            app.as_admin()
                .scopes
                .create_scope(repr(s))
                .await
                .resource()
                .unwrap()
                .scope,
            s
        );
    }

    for created in [&from_parts, &from_repr, &star] {
        assert_eq!(&app.get_scope(&created.id).await.unwrap(), created);
    }
}

async fn create_takes_exactly_one_form(backend: Backend) {
    let app = spawn_app(backend).await;
    let both = pb::CreateScopeRequest {
        representation: "crm:read".into(),
        ..parts("crm", "read")
    };
    let status = assert_err(
        app.as_admin().scopes.create_scope(both).await.resource(),
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
        app.as_admin().scopes.create_scope(half).await.resource(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );

    let neither = pb::CreateScopeRequest {
        name: "nameless".into(),
        ..Default::default()
    };
    let status = assert_err(
        app.as_admin().scopes.create_scope(neither).await.resource(),
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

    let listed = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert!(listed.scopes.is_empty(), "nothing was created: {listed:?}");

    // A form with a missing half names the missing half.
    assert_invalid(
        app.as_admin()
            .scopes
            .create_scope(parts("crm", ""))
            .await
            .resource(),
        &["action"],
        "no action",
    );
    assert_invalid(
        app.as_admin()
            .scopes
            .create_scope(parts("", "read"))
            .await
            .resource(),
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
        match app.as_admin().scopes.create_scope(request).await.resource() {
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
        app.as_admin().scopes.create_scope(all_bad).await.resource(),
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

    let listed = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert!(listed.scopes.is_empty(), "nothing invalid was stored");

    // The limits themselves are accepted.
    let edge = app
        .as_admin()
        .scopes
        .create_scope(pb::CreateScopeRequest {
            name: "é".repeat(120),
            description: "d".repeat(1024),
            category: "c".repeat(64),
            ..parts(&"r".repeat(64), &"*".repeat(64))
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(edge.scope, format!("{}:{}", "r".repeat(64), "*".repeat(64)));
    assert_eq!(edge.name.chars().count(), 120);
    assert_eq!(edge.category.len(), 64);
    let edge_repr = app
        .as_admin()
        .scopes
        .create_scope(repr(&format!("{}:{}", "s".repeat(64), "a".repeat(64))))
        .await
        .resource()
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
        assert_invalid(
            app.as_admin().scopes.create_scope(repr(s)).await.resource(),
            &["representation"],
            s,
        );
    }
    for (resource, action) in [("keyplane.x", "read"), ("keyplane", "read")] {
        assert_invalid(
            app.as_admin()
                .scopes
                .create_scope(parts(resource, action))
                .await
                .resource(),
            &["resource"],
            resource,
        );
    }
    let in_workspace = pb::CreateScopeRequest {
        workspace_id: w.id.clone(),
        ..repr("keyplane.x:read")
    };
    assert_invalid(
        app.as_admin()
            .scopes
            .create_scope(in_workspace)
            .await
            .resource(),
        &["representation"],
        "reserved in a workspace",
    );

    // A built-in scope string already exists: it is never duplicated or overridden.
    for builtin in all_builtin() {
        assert_err(
            app.as_admin()
                .scopes
                .create_scope(repr(builtin))
                .await
                .resource(),
            Code::AlreadyExists,
            "ALREADY_EXISTS",
        );
    }
    assert_err(
        app.as_admin()
            .scopes
            .create_scope(parts("keyplane.scopes", "read"))
            .await
            .resource(),
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    let builtin_in_workspace = pb::CreateScopeRequest {
        workspace_id: w.id.clone(),
        ..repr("keyplane.scopes:read")
    };
    assert_err(
        app.as_admin()
            .scopes
            .create_scope(builtin_in_workspace)
            .await
            .resource(),
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    let listed = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(
        listed.scopes.len(),
        BUILTINS,
        "only the built-ins: {listed:?}"
    );
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

    let wide = app
        .as_admin()
        .scopes
        .create_scope(repr("crm:read"))
        .await
        .resource()
        .unwrap();
    assert_err(
        app.as_admin()
            .scopes
            .create_scope(repr("crm:read"))
            .await
            .resource(),
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // The two create forms name the same scope.
    assert_err(
        app.as_admin()
            .scopes
            .create_scope(parts("crm", "read"))
            .await
            .resource(),
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );

    // The same string in a workspace, and in another workspace, is allowed.
    let local1 = app
        .as_admin()
        .scopes
        .create_scope(in_ws(&w1.id, "crm:read"))
        .await
        .resource()
        .unwrap();
    let local2 = app
        .as_admin()
        .scopes
        .create_scope(in_ws(&w2.id, "crm:read"))
        .await
        .resource()
        .unwrap();
    assert_ne!(local1.id, local2.id);
    assert_eq!(local1.workspace_id, w1.id);
    assert_eq!(local2.workspace_id, w2.id);
    assert_err(
        app.as_admin()
            .scopes
            .create_scope(in_ws(&w1.id, "crm:read"))
            .await
            .resource(),
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    assert_err(
        app.as_admin()
            .scopes
            .create_scope(pb::CreateScopeRequest {
                workspace_id: w2.id.clone(),
                ..parts("crm", "read")
            })
            .await
            .resource(),
        Code::AlreadyExists,
        "ALREADY_EXISTS",
    );
    // Matching is exact: case and wildcard make other scopes.
    app.as_admin()
        .scopes
        .create_scope(repr("CRM:read"))
        .await
        .resource()
        .unwrap();
    app.as_admin()
        .scopes
        .create_scope(repr("crm:*"))
        .await
        .resource()
        .unwrap();

    // Another tenant has its own namespace.
    let other = stranger();
    let theirs = app
        .client(&other)
        .scopes
        .create_scope(repr("crm:read"))
        .await
        .resource()
        .unwrap();
    assert_ne!(theirs.tenant_id, wide.tenant_id);

    let (customs, _) = list_all(&app, 0, "", true).await;
    assert_eq!(
        representations(&customs),
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
    assert_err(
        app.as_admin().scopes.create_scope(missing).await.resource(),
        Code::NotFound,
        "NOT_FOUND",
    );

    // A workspace that was deleted is missing too.
    let w = app.create_workspace("gone").await;
    app.as_admin()
        .workspaces
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: w.id.clone(),
            force: false,
        })
        .await
        .unwrap();
    let deleted = pb::CreateScopeRequest {
        workspace_id: w.id,
        ..repr("crm:read")
    };
    assert_err(
        app.as_admin().scopes.create_scope(deleted).await.resource(),
        Code::NotFound,
        "NOT_FOUND",
    );
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
    let first = app
        .as_admin()
        .scopes
        .create_scope(request.clone())
        .await
        .resource()
        .unwrap();
    let retry = app
        .as_admin()
        .scopes
        .create_scope(request.clone())
        .await
        .resource()
        .unwrap();
    assert_eq!(first, retry, "the retry returns the first result");
    // Without the request id the same request is a duplicate.
    let again = pb::CreateScopeRequest {
        request_id: String::new(),
        ..request.clone()
    };
    assert_err(
        app.as_admin().scopes.create_scope(again).await.resource(),
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
    let second = app
        .as_admin()
        .scopes
        .create_scope(other)
        .await
        .resource()
        .unwrap();
    assert_ne!(second.id, first.id);
}
