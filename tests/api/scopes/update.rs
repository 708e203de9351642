//! UpdateScope and DeleteScope of what cannot change: masks, etags, field rules, output-only
//! paths, the built-in scopes and ids that name nothing.
use keyplane::proto as pb;
use tonic::Code;
use uuid::Uuid;

use super::*;

on_both_backends!(
    update_follows_the_mask_and_the_etag,
    update_validates_fields_and_rejects_output_only_paths,
    builtins_cannot_be_updated_or_deleted,
    delete_of_unknown_or_bad_id,
);

async fn update_follows_the_mask_and_the_etag(backend: Backend) {
    let app = spawn_app(backend).await;
    let original = app
        .as_admin()
        .scopes
        .create_scope(pb::CreateScopeRequest {
            name: "CRM read".into(),
            description: "before".into(),
            category: "data".into(),
            ..repr("crm:read")
        })
        .await
        .resource()
        .unwrap();

    let changed = pb::Scope {
        id: original.id.clone(),
        name: "Read the CRM".into(),
        description: "not in the mask".into(),
        category: "not in the mask".into(),
        ..Default::default()
    };
    let renamed = app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(changed),
            update_mask: mask(&["name"]),
            etag: original.etag.clone(),
        })
        .await
        .resource()
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
    assert_eq!(
        app.get_scope(&original.id).await.unwrap(),
        renamed,
        "stored"
    );

    // The old etag is stale now; an unparseable one never matches.
    let stale = pb::Scope {
        id: original.id.clone(),
        name: "lost update".into(),
        ..Default::default()
    };
    assert_err(
        app.as_admin()
            .scopes
            .update_scope(pb::UpdateScopeRequest {
                scope: Some(stale.clone()),
                update_mask: mask(&["name"]),
                etag: original.etag.clone(),
            })
            .await
            .resource(),
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_err(
        app.as_admin()
            .scopes
            .update_scope(pb::UpdateScopeRequest {
                scope: Some(stale),
                update_mask: mask(&["name"]),
                etag: "garbage".into(),
            })
            .await
            .resource(),
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(
        app.get_scope(&original.id).await.unwrap(),
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
    let both = app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(two),
            update_mask: mask(&["description", "category"]),
            etag: renamed.etag.clone(),
        })
        .await
        .resource()
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
    let after = app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(only_name),
            update_mask: mask(&[]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
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
    let cleared = app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(clear.clone()),
            update_mask: mask(&["description", "category"]),
            etag: after.etag.clone(),
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(cleared.description, "");
    assert_eq!(cleared.category, "custom");

    let missing = pb::Scope {
        id: Uuid::now_v7().to_string(),
        name: "x".into(),
        ..Default::default()
    };
    assert_err(
        app.as_admin()
            .scopes
            .update_scope(pb::UpdateScopeRequest {
                scope: Some(missing),
                update_mask: mask(&["name"]),
                etag: "".into(),
            })
            .await
            .resource(),
        Code::NotFound,
        "NOT_FOUND",
    );

    // A name named in the mask but empty: like the category, it falls back to its default
    // (the scope string), or it is refused; a scope never ends up without a name.
    match app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(clear),
            update_mask: mask(&["name"]),
            etag: "".into(),
        })
        .await
        .resource()
    {
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
            app.as_admin()
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(request.clone()),
                    update_mask: mask(&[path]),
                    etag: "".into(),
                })
                .await
                .resource(),
            &["update_mask"],
            path,
        );
        assert_invalid(
            app.as_admin()
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(request),
                    update_mask: mask(&["name", path]),
                    etag: "".into(),
                })
                .await
                .resource(),
            &["update_mask"],
            path,
        );
    }
    for path in ["no_such_field", "Name", ""] {
        assert_invalid(
            app.as_admin()
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(with(pb::Scope {
                        name: "x".into(),
                        ..Default::default()
                    })),
                    update_mask: mask(&[path]),
                    etag: "".into(),
                })
                .await
                .resource(),
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
    let updated = app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(sneaky),
            update_mask: mask(&[]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
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
        assert_invalid(
            app.as_admin()
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(with(scope)),
                    update_mask: mask(&[path]),
                    etag: "".into(),
                })
                .await
                .resource(),
            &[field],
            path,
        );
    }
    assert_invalid(
        app.as_admin()
            .scopes
            .update_scope(pb::UpdateScopeRequest {
                scope: Some(pb::Scope {
                    id: "nope".into(),
                    name: "x".into(),
                    ..Default::default()
                }),
                update_mask: mask(&["name"]),
                etag: "".into(),
            })
            .await
            .resource(),
        &["scope.id"],
        "bad id",
    );
    // The limits themselves are accepted.
    let edge = app
        .as_admin()
        .scopes
        .update_scope(pb::UpdateScopeRequest {
            scope: Some(with(pb::Scope {
                name: "é".repeat(120),
                description: "d".repeat(1024),
                category: "c".repeat(64),
                ..Default::default()
            })),
            update_mask: mask(&["name", "description", "category"]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(edge.name.chars().count(), 120);
    assert_eq!(edge.scope, "crm:read");
}

async fn builtins_cannot_be_updated_or_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    for n in 1..=7 {
        let id = builtin_id(n);
        let before = app.get_scope(&id).await.unwrap();
        let change = pb::Scope {
            id: id.clone(),
            name: "mine now".into(),
            description: "mine".into(),
            ..Default::default()
        };
        assert_err(
            app.as_admin()
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(change.clone()),
                    update_mask: mask(&["name"]),
                    etag: "".into(),
                })
                .await
                .resource(),
            Code::PermissionDenied,
            "BUILTIN_SCOPE_READ_ONLY",
        );
        assert_err(
            app.as_admin()
                .scopes
                .update_scope(pb::UpdateScopeRequest {
                    scope: Some(change),
                    update_mask: mask(&[]),
                    etag: before.etag.clone(),
                })
                .await
                .resource(),
            Code::PermissionDenied,
            "BUILTIN_SCOPE_READ_ONLY",
        );
        for force in [false, true] {
            assert_err(
                app.as_admin()
                    .scopes
                    .delete_scope(pb::DeleteScopeRequest {
                        id: id.clone(),
                        force,
                    })
                    .await
                    .inner()
                    .map(|r| r.removed_grant_count),
                Code::PermissionDenied,
                "BUILTIN_SCOPE_READ_ONLY",
            );
        }
        assert_eq!(app.get_scope(&id).await.unwrap(), before, "unchanged");
    }
    let (all, _) = list_all(&app, 0, "", false).await;
    assert_eq!(representations(&all), all_builtin());
    // Keys holding built-in scopes keep them.
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &["keyplane.scopes:read"]).await;
    assert_eq!(key.scopes, ["keyplane.scopes:read"]);
    assert_eq!(
        app.verify(&secret, &["keyplane.scopes:read"]).await.code(),
        pb::VerifyCode::Valid
    );
}

async fn delete_of_unknown_or_bad_id(backend: Backend) {
    let app = spawn_app(backend).await;
    for force in [false, true] {
        assert_err(
            app.as_admin()
                .scopes
                .delete_scope(pb::DeleteScopeRequest {
                    id: Uuid::now_v7().to_string(),
                    force,
                })
                .await
                .inner()
                .map(|r| r.removed_grant_count),
            Code::NotFound,
            "NOT_FOUND",
        );
    }
    assert_invalid(
        app.as_admin()
            .scopes
            .delete_scope(pb::DeleteScopeRequest {
                id: "nope".into(),
                force: false,
            })
            .await
            .inner()
            .map(|r| r.removed_grant_count),
        &["id"],
        "bad id",
    );
    assert_invalid(
        app.as_admin()
            .scopes
            .delete_scope(pb::DeleteScopeRequest {
                id: "".into(),
                force: false,
            })
            .await
            .inner()
            .map(|r| r.removed_grant_count),
        &["id"],
        "empty id",
    );
}
