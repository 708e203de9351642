//! ListApiKeys: pages, filters, and page tokens bound to their filters.

use keyplane::proto as pb;
use tonic::Code;

use super::new_key;
use keyplane_testkit::*;

on_both_backends!(list_pages_through_keys_with_filters,);

async fn list_pages_through_keys_with_filters(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.create_workspace("a").await;
    let b = app.create_workspace("b").await;
    let mut all = Vec::new();
    // Five keys in `a` (alice, bob, alice, bob, alice), two in `b` (alice).
    for (i, (ws, owner)) in [
        (&a, "alice"),
        (&a, "bob"),
        (&a, "alice"),
        (&a, "bob"),
        (&a, "alice"),
        (&b, "alice"),
        (&b, "alice"),
    ]
    .into_iter()
    .enumerate()
    {
        let key = app
            .as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                name: format!("k{i}"),
                owner_id: owner.into(),
                ..new_key(&ws.id)
            })
            .await
            .inner()
            .unwrap()
            .api_key
            .unwrap();
        all.push(key);
    }

    // Pages of two until the token runs out; returns the ids and the number of pages.
    let page_through = |workspace_id: String, owner_id: String| {
        let app = &app;
        async move {
            let mut ids = Vec::new();
            let mut pages = 0;
            let mut token = String::new();
            loop {
                let page = app
                    .as_admin()
                    .keys
                    .list_api_keys(pb::ListApiKeysRequest {
                        page_size: 2,
                        page_token: token,
                        workspace_id: workspace_id.clone(),
                        owner_id: owner_id.clone(),
                        ..Default::default()
                    })
                    .await
                    .inner()
                    .unwrap();
                pages += 1;
                assert!(page.api_keys.len() <= 2);
                assert!(pages < 20, "the listing never ends");
                ids.extend(page.api_keys.into_iter().map(|k| k.id));
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            (ids, pages)
        }
    };
    let ids_of = |pick: &dyn Fn(&pb::ApiKey) -> bool| -> Vec<String> {
        all.iter()
            .filter(|k| pick(k))
            .map(|k| k.id.clone())
            .collect()
    };

    let (ids, pages) = page_through(String::new(), String::new()).await;
    assert_eq!(ids, ids_of(&|_| true), "every key once, in creation order");
    assert_eq!(pages, 4);

    let (ids, pages) = page_through(a.id.clone(), String::new()).await;
    assert_eq!(ids, ids_of(&|k| k.workspace_id == a.id));
    assert_eq!(ids.len(), 5);
    assert_eq!(pages, 3);

    let (ids, _) = page_through(String::new(), "alice".into()).await;
    assert_eq!(ids, ids_of(&|k| k.owner_id == "alice"));
    assert_eq!(ids.len(), 5);

    let (ids, pages) = page_through(a.id.clone(), "alice".into()).await;
    assert_eq!(
        ids,
        ids_of(&|k| k.workspace_id == a.id && k.owner_id == "alice")
    );
    assert_eq!(ids.len(), 3);
    assert_eq!(pages, 2);

    let (ids, _) = page_through(b.id.clone(), "bob".into()).await;
    assert!(ids.is_empty());

    // Tokens are tamper-evident and bound to their filters.
    let first = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest {
            page_size: 2,
            workspace_id: a.id.clone(),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let mut edited = token.clone().into_bytes();
    let i = edited.len() / 2;
    edited[i] = if edited[i] == b'A' { b'B' } else { b'A' };
    for bad in [
        String::from_utf8(edited).unwrap(),
        "garbage".to_string(),
        format!("{token}x"),
    ] {
        let status = assert_err(
            app.as_admin()
                .keys
                .list_api_keys(pb::ListApiKeysRequest {
                    page_size: 2,
                    page_token: bad,
                    workspace_id: a.id.clone(),
                    ..Default::default()
                })
                .await
                .inner(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["page_token"]);
    }
    for (workspace_id, owner_id) in [
        (b.id.clone(), String::new()),
        (String::new(), String::new()),
        (a.id.clone(), "alice".to_string()),
    ] {
        let status = assert_err(
            app.as_admin()
                .keys
                .list_api_keys(pb::ListApiKeysRequest {
                    page_size: 2,
                    page_token: token.clone(),
                    workspace_id,
                    owner_id,
                    ..Default::default()
                })
                .await
                .inner(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["page_token"]);
    }

    // Bad filters and sizes.
    let status = assert_err(
        app.as_admin()
            .keys
            .list_api_keys(pb::ListApiKeysRequest {
                workspace_id: "nope".into(),
                ..Default::default()
            })
            .await
            .inner(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["workspace_id"]);
    let status = assert_err(
        app.as_admin()
            .keys
            .list_api_keys(pb::ListApiKeysRequest {
                page_size: -1,
                ..Default::default()
            })
            .await
            .inner(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["page_size"]);
    let everything = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(everything.api_keys.len(), 7);
    assert!(everything.next_page_token.is_empty());

    // Another tenant sees none of them.
    let stranger = stranger();
    let theirs = app
        .client(&stranger)
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(theirs.api_keys.is_empty());
}
