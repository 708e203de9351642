//! WorkspaceService: every RPC, its field rules, pagination, etags and idempotency.
use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    create_applies_defaults_and_get_returns_it,
    create_validates_every_field,
    create_is_idempotent_by_request_id,
    list_pages_through_everything_with_tamper_evident_tokens,
    update_follows_the_mask_and_the_etag,
    update_rejects_bad_masks,
    delete_refuses_live_keys_unless_forced,
);

async fn create_applies_defaults_and_get_returns_it(backend: Backend) {
    let app = spawn_app(backend).await;
    let created = app
        .as_admin()
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(created.name, "Untitled");
    assert_eq!(
        created.owner_id, "tester",
        "owner defaults to the caller's sub"
    );
    assert_eq!(created.default_key_prefix, "kp");
    assert_eq!(created.source, "api");
    assert_eq!(created.tenant_id, app.tenant.to_string());
    assert!(!created.is_private && !created.is_personal && created.company.is_none());
    assert!(!created.etag.is_empty());
    assert_eq!(
        uuid::Uuid::parse_str(&created.id)
            .unwrap()
            .get_version_num(),
        7
    );

    let full = app
        .as_admin()
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "  Project Atlas  ".into(),
            description: "d".into(),
            company: Some("Acme".into()),
            is_private: true,
            is_personal: true,
            owner_id: "acct_1".into(),
            default_key_prefix: "atlas".into(),
            labels: [("env".to_string(), "prod".to_string())].into(),
            request_id: String::new(),
            max_key_ttl: None,
            default_allowed_cidrs: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(full.name, "Project Atlas", "names are trimmed");
    let got = app
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: full.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(got, full);

    let missing = app
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    assert_err(missing, Code::NotFound, "NOT_FOUND");
    let bad_id = app
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest { id: "nope".into() })
        .await;
    let status = assert_err(bad_id, Code::InvalidArgument, "INVALID_ARGUMENT");
    assert_eq!(violated_fields(&status), ["id"]);
}

async fn create_validates_every_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let labels = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    let bad = pb::CreateWorkspaceRequest {
        name: "n".repeat(121),
        description: "d".repeat(1025),
        company: Some("c".repeat(121)),
        owner_id: "o".repeat(257),
        default_key_prefix: "Bad_Prefix".into(),
        labels,
        request_id: "not-a-uuid".into(),
        ..Default::default()
    };
    let status = assert_err(
        app.as_admin().workspaces.create_workspace(bad).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let fields = violated_fields(&status);
    for f in [
        "name",
        "description",
        "company",
        "owner_id",
        "default_key_prefix",
        "labels",
        "request_id",
    ] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }
    for (key, value) in [("UPPER", "v"), ("ok", &"v".repeat(257) as &str), ("", "v")] {
        let r = pb::CreateWorkspaceRequest {
            labels: [(key.to_string(), value.to_string())].into(),
            ..Default::default()
        };
        let status = assert_err(
            app.as_admin().workspaces.create_workspace(r).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["labels"]);
    }
    // The limits themselves are accepted.
    let edge = pb::CreateWorkspaceRequest {
        name: "é".repeat(120),
        description: "d".repeat(1024),
        default_key_prefix: "a234567890123456".into(),
        labels: (0..64)
            .map(|i| (format!("k.{i}-_"), "v".repeat(256)))
            .collect(),
        ..Default::default()
    };
    app.as_admin()
        .workspaces
        .create_workspace(edge)
        .await
        .unwrap();
}

async fn create_is_idempotent_by_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let request = pb::CreateWorkspaceRequest {
        name: "once".into(),
        request_id: uuid::Uuid::now_v7().to_string(),
        ..Default::default()
    };
    let first = app
        .as_admin()
        .workspaces
        .create_workspace(request.clone())
        .await
        .unwrap();
    let retry = app
        .as_admin()
        .workspaces
        .create_workspace(request)
        .await
        .unwrap();
    assert_eq!(first.into_inner(), retry.into_inner());
    let list = app
        .as_admin()
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.workspaces.len(), 1, "the retry created nothing");
}

async fn list_pages_through_everything_with_tamper_evident_tokens(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        ids.push(app.create_workspace(&format!("w{i}")).await.id);
    }
    let list = |size: i32, token: String| {
        let app = &app;
        async move {
            app.as_admin()
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest {
                    page_size: size,
                    page_token: token,
                })
                .await
        }
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(3, token).await.unwrap().into_inner();
        pages += 1;
        assert!(page.workspaces.len() <= 3);
        seen.extend(page.workspaces.into_iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids, "every workspace once, in creation order");

    let all = list(0, String::new()).await.unwrap().into_inner();
    assert_eq!(all.workspaces.len(), 7);
    assert!(all.next_page_token.is_empty(), "empty token at the end");
    let huge = list(5000, String::new()).await.unwrap().into_inner();
    assert_eq!(huge.workspaces.len(), 7);

    let status = assert_err(
        list(-1, String::new()).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["page_size"]);

    let token = list(3, String::new())
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    let mut edited = token.clone().into_bytes();
    edited[5] = if edited[5] == b'A' { b'B' } else { b'A' };
    for bad in [
        String::from_utf8(edited).unwrap(),
        "garbage".into(),
        format!("{token}x"),
    ] {
        let status = assert_err(
            list(3, bad).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["page_token"]);
    }
    // Another tenant's listing refuses this tenant's token: the filters differ.
    let other = stranger();
    let replay = app
        .client(&other)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest {
            page_size: 3,
            page_token: token,
        })
        .await;
    assert_err(replay, Code::InvalidArgument, "INVALID_ARGUMENT");
}

async fn update_follows_the_mask_and_the_etag(backend: Backend) {
    let app = spawn_app(backend).await;
    let original = app.create_workspace("before").await;
    let update = |w: pb::Workspace, paths: &[&str], etag: &str| {
        let request = pb::UpdateWorkspaceRequest {
            workspace: Some(w),
            update_mask: mask(paths),
            etag: etag.into(),
        };
        let mut workspaces = app.as_admin().workspaces;
        async move { workspaces.update_workspace(request).await }
    };

    let changed = pb::Workspace {
        id: original.id.clone(),
        name: "after".into(),
        description: "not in the mask".into(),
        ..Default::default()
    };
    let updated = update(changed, &["name"], &original.etag)
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(updated.name, "after");
    assert_eq!(
        updated.description, "",
        "fields outside the mask keep their value"
    );
    assert_ne!(
        updated.etag, original.etag,
        "the etag changes on every update"
    );
    assert_ne!(updated.update_time, original.update_time);
    assert_eq!(updated.create_time, original.create_time);

    // The old etag is stale now.
    let stale = pb::Workspace {
        id: original.id.clone(),
        name: "lost update".into(),
        ..Default::default()
    };
    assert_err(
        update(stale.clone(), &["name"], &original.etag).await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_err(
        update(stale, &["name"], "garbage").await,
        Code::Aborted,
        "ETAG_MISMATCH",
    );

    // An empty mask updates every field the request sets, and clears nothing else.
    let set = pb::Workspace {
        id: original.id.clone(),
        company: Some("Acme".into()),
        is_private: true,
        labels: [("team".to_string(), "core".to_string())].into(),
        ..Default::default()
    };
    let after = update(set, &[], "")
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(after.name, "after");
    assert_eq!(after.company.as_deref(), Some("Acme"));
    assert!(after.is_private);
    assert_eq!(after.labels.get("team").map(String::as_str), Some("core"));

    // Naming a field with its default value clears it.
    let clear = pb::Workspace {
        id: original.id.clone(),
        ..Default::default()
    };
    let cleared = update(clear, &["is_private", "labels", "company"], &after.etag)
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert!(!cleared.is_private && cleared.labels.is_empty() && cleared.company.is_none());

    let missing = pb::Workspace {
        id: uuid::Uuid::now_v7().to_string(),
        name: "x".into(),
        ..Default::default()
    };
    assert_err(
        update(missing, &["name"], "").await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn update_rejects_bad_masks(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    for (paths, why) in [
        (vec!["id"], "output only"),
        (vec!["source"], "output only"),
        (vec!["etag"], "output only"),
        (vec!["no_such_field"], "unknown"),
        (vec!["name", "create_time"], "output only"),
    ] {
        let request = pb::UpdateWorkspaceRequest {
            workspace: Some(pb::Workspace {
                id: w.id.clone(),
                name: "x".into(),
                ..Default::default()
            }),
            update_mask: mask(&paths),
            etag: String::new(),
        };
        let status = assert_err(
            app.as_admin().workspaces.update_workspace(request).await,
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["update_mask"], "{why}");
    }
    let empty_name = pb::UpdateWorkspaceRequest {
        workspace: Some(pb::Workspace {
            id: w.id.clone(),
            ..Default::default()
        }),
        update_mask: mask(&["name"]),
        etag: String::new(),
    };
    let status = assert_err(
        app.as_admin().workspaces.update_workspace(empty_name).await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["workspace.name"]);
}

async fn delete_refuses_live_keys_unless_forced(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (_, secret) = app.create_key(&w.id, &[]).await;
    let delete = |force: bool| {
        let mut workspaces = app.as_admin().workspaces;
        let request = pb::DeleteWorkspaceRequest {
            id: w.id.clone(),
            force,
        };
        async move { workspaces.delete_workspace(request).await }
    };
    assert_err(
        delete(false).await,
        Code::FailedPrecondition,
        "WORKSPACE_HAS_KEYS",
    );
    let deleted = delete(true).await.unwrap().into_inner();
    assert_eq!(deleted.revoked_key_count, 1);
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::NotFound
    );
    assert_err(delete(true).await, Code::NotFound, "NOT_FOUND");

    // A workspace without live keys goes without force.
    let empty = app.create_workspace("empty").await;
    app.as_admin()
        .workspaces
        .delete_workspace(pb::DeleteWorkspaceRequest {
            id: empty.id,
            force: false,
        })
        .await
        .unwrap();
}
