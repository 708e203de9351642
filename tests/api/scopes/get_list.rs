//! GetScope and ListScopes: built-ins first, filters, pagination and page tokens.
use keyplane::proto as pb;
use tonic::Code;
use uuid::Uuid;

use super::*;

on_both_backends!(
    get_returns_custom_and_builtin_scopes,
    list_puts_builtins_first_then_customs_in_creation_order,
    list_filters_by_workspace,
    list_pages_across_the_builtin_boundary,
    list_page_size_defaults_to_50,
    list_refuses_tampered_and_replayed_page_tokens,
);

async fn get_returns_custom_and_builtin_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    for (i, builtin) in all_builtin().into_iter().enumerate() {
        let id = builtin_id(i + 1);
        let got = app.get_scope(&id).await.unwrap();
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
        let other = stranger();
        let theirs = app
            .client(&other)
            .scopes
            .get_scope(pb::GetScopeRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .scope
            .unwrap();
        assert_eq!(theirs, got);
    }
    assert_eq!(builtin_id(1), "00000000-0000-7000-8000-000000000001");

    let custom = app
        .as_admin()
        .scopes
        .create_scope(pb::CreateScopeRequest {
            name: "CRM read".into(),
            description: "d".into(),
            category: "integration".into(),
            ..repr("crm:read")
        })
        .await
        .resource()
        .unwrap();
    let got = app.get_scope(&custom.id).await.unwrap();
    assert_eq!(got, custom);
    assert!(!got.builtin);

    assert_err(
        app.get_scope(&Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // Next to the built-in ids, but not one of them.
    assert_err(
        app.get_scope(&builtin_id(BUILTINS + 1)).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_invalid(app.get_scope("nope").await, &["id"], "bad id");
    assert_invalid(app.get_scope("").await, &["id"], "empty id");
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
            app.as_admin()
                .scopes
                .create_scope(pb::CreateScopeRequest {
                    workspace_id: ws.into(),
                    ..repr(s)
                })
                .await
                .resource()
                .unwrap(),
        );
    }

    let page = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest::default())
        .await
        .inner()
        .unwrap();
    assert!(page.next_page_token.is_empty(), "everything fits a page");
    assert_eq!(page.scopes.len(), BUILTINS + 4);
    let expected_builtin_ids: Vec<String> = (1..=BUILTINS).map(builtin_id).collect();
    assert_eq!(ids(&page.scopes[..BUILTINS]), expected_builtin_ids);
    assert_eq!(representations(&page.scopes[..BUILTINS]), all_builtin());
    assert!(
        page.scopes[..BUILTINS]
            .iter()
            .all(|s| s.builtin && s.tenant_id.is_empty())
    );
    assert_eq!(
        &page.scopes[BUILTINS..],
        &created[..],
        "customs in creation order"
    );

    let customs = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            exclude_builtin: true,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(customs.scopes, created);
    assert!(customs.next_page_token.is_empty());

    // A fresh tenant lists the built-ins only, or nothing without them.
    let fresh = spawn_app(backend).await;
    let (only_builtin, _) = list_all(&fresh, 0, "", false).await;
    assert_eq!(representations(&only_builtin), all_builtin());
    let (nothing, pages) = list_all(&fresh, 0, "", true).await;
    assert!(nothing.is_empty());
    assert_eq!(pages, 1);

    let status = assert_err(
        app.as_admin()
            .scopes
            .list_scopes(pb::ListScopesRequest {
                page_size: -1,
                ..Default::default()
            })
            .await
            .inner(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["page_size"]);
    let huge = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(huge.scopes.len(), BUILTINS + 4);
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
    assert_eq!(representations(&in_w1[..BUILTINS]), all_builtin());
    assert_eq!(
        ids(&in_w1[BUILTINS..]),
        ids(&[wide1.clone(), own1.clone(), wide2.clone(), own1b.clone()]),
        "built-ins, tenant-wide and w1's own, not w2's"
    );
    let (in_w1_custom, _) = list_all(&app, 0, &w1.id, true).await;
    assert_eq!(in_w1_custom, in_w1[BUILTINS..].to_vec());

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
    assert_eq!(
        pages,
        (BUILTINS + 4).div_ceil(2),
        "the built-ins and w1's 4 in pages of 2"
    );

    assert_err(
        app.as_admin()
            .scopes
            .list_scopes(pb::ListScopesRequest {
                workspace_id: Uuid::now_v7().to_string(),
                ..Default::default()
            })
            .await
            .inner(),
        Code::NotFound,
        "NOT_FOUND",
    );
    assert_invalid(
        app.as_admin()
            .scopes
            .list_scopes(pb::ListScopesRequest {
                workspace_id: "nope".into(),
                ..Default::default()
            })
            .await
            .inner(),
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
    let mut expected: Vec<String> = (1..=BUILTINS).map(builtin_id).collect();
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
            (BUILTINS + 5).div_ceil(size as usize).max(1),
            "page_size {size}"
        );
    }
    for size in [1, 2, 3, 5, 6] {
        let (all, pages) = list_all(&app, size, "", true).await;
        assert_eq!(ids(&all), custom_ids, "exclude_builtin, page_size {size}");
        assert_eq!(pages, 5usize.div_ceil(size as usize), "page_size {size}");
    }

    // The boundary itself: a page of as many as there are is exactly the built-ins, and still has a next page.
    let first = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            page_size: BUILTINS as i32,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert!(first.scopes.iter().all(|s| s.builtin));
    assert!(!first.next_page_token.is_empty());
    let second = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            page_size: BUILTINS as i32,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(ids(&second.scopes), custom_ids);
    assert!(second.next_page_token.is_empty());

    // A scope created while paging shows up on a later page.
    let start = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            // The built-ins and two customs.
            page_size: BUILTINS as i32 + 2,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    let late = app.create_scope("late:read", "").await;
    let rest = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            page_size: BUILTINS as i32 + 2,
            page_token: start.next_page_token,
            ..Default::default()
        })
        .await
        .inner()
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
    let first = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(first.scopes.len(), 50, "page_size 0 means 50");
    assert!(!first.next_page_token.is_empty());
    let second = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    // 45 customs after the built-ins: the second page holds those the first had no room for.
    let rest: Vec<String> = (50 - BUILTINS..45)
        .map(|i| format!("bulk{i:02}:read"))
        .collect();
    assert_eq!(representations(&second.scopes), rest);
    assert!(second.next_page_token.is_empty());
    let big = app
        .as_admin()
        .scopes
        .list_scopes(pb::ListScopesRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(big.scopes.len(), BUILTINS + 45);
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
    let token = app
        .as_admin()
        .scopes
        .list_scopes(page(String::new(), "", false))
        .await
        .inner()
        .unwrap()
        .next_page_token;
    assert!(!token.is_empty());
    // The token works as given.
    let next = app
        .as_admin()
        .scopes
        .list_scopes(page(token.clone(), "", false))
        .await
        .inner()
        .unwrap();
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
        assert_invalid(
            app.as_admin()
                .scopes
                .list_scopes(page(bad, "", false))
                .await
                .inner(),
            &["page_token"],
            why,
        );
    }

    // Reused with other filters.
    assert_invalid(
        app.as_admin()
            .scopes
            .list_scopes(page(token.clone(), "", true))
            .await
            .inner(),
        &["page_token"],
        "token reused with exclude_builtin",
    );
    assert_invalid(
        app.as_admin()
            .scopes
            .list_scopes(page(token.clone(), &w.id, false))
            .await
            .inner(),
        &["page_token"],
        "token reused with a workspace filter",
    );
    let ws_token = app
        .as_admin()
        .scopes
        .list_scopes(page(String::new(), &w.id, false))
        .await
        .inner()
        .unwrap()
        .next_page_token;
    assert!(!ws_token.is_empty());
    assert_invalid(
        app.as_admin()
            .scopes
            .list_scopes(page(ws_token.clone(), "", false))
            .await
            .inner(),
        &["page_token"],
        "workspace token reused without the filter",
    );
    let w2 = app.create_workspace("w2").await;
    assert_invalid(
        app.as_admin()
            .scopes
            .list_scopes(page(ws_token, &w2.id, false))
            .await
            .inner(),
        &["page_token"],
        "workspace token reused with another workspace",
    );
    // A token of another list kind.
    for i in 0..4 {
        app.create_workspace(&format!("more{i}")).await;
    }
    let workspace_token = app
        .as_admin()
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!workspace_token.is_empty());
    assert_invalid(
        app.as_admin()
            .scopes
            .list_scopes(page(workspace_token, "", false))
            .await
            .inner(),
        &["page_token"],
        "a ListWorkspaces token",
    );
    // Another tenant's listing.
    let other = stranger();
    let status = app
        .client(&other)
        .scopes
        .list_scopes(page(token, "", false))
        .await
        .expect_err("another tenant's token");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&status), ["page_token"]);
}
