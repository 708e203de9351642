//! Races (issue: prove it, §4): the database's constraints and compare-and-set updates
//! decide, not the order in which requests happen to arrive. Every test here sends its
//! calls at once, over one connection (`join_all`) or from tasks on every worker.
use futures::future::join_all;
use keyplane::proto as pb;
use tonic::Code;
use uuid::Uuid;

use crate::api_keys::new_key;
use crate::scopes::{list_all, repr, representations};
use keyplane_testkit::*;

on_both_backends!(
    fifty_concurrent_creates_of_one_scope_make_one,
    concurrent_creates_make_one_scope,
    ten_updates_with_one_etag_let_exactly_one_win,
    concurrent_idempotent_creates_make_one_key,
    concurrent_rotations_make_one_live_successor,
    concurrent_writes_keep_one_linear_audit_chain,
);

async fn fifty_concurrent_creates_of_one_scope_make_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let calls = (0..50).map(|_| {
        let mut scopes = app.as_admin().scopes;
        async move { scopes.create_scope(repr("race:read")).await }
    });
    let results = join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one create wins");
    for status in results.into_iter().filter_map(Result::err) {
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(reason(&status), "ALREADY_EXISTS");
    }
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
    assert_eq!(listed.scopes.len(), 1);
}

async fn concurrent_creates_make_one_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    // The same scope without a request id: one wins, the others are duplicates.
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut scopes = app.as_admin().scopes;
            tokio::spawn(async move { scopes.create_scope(repr("race:read")).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => created += 1,
            Err(status) => assert_eq!(status.code(), Code::AlreadyExists, "{status:?}"),
        }
    }
    assert_eq!(created, 1);

    // The same request id: every retry answers with the one scope.
    let request = pb::CreateScopeRequest {
        request_id: Uuid::now_v7().to_string(),
        ..repr("race:write")
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut scopes = app.as_admin().scopes;
            let request = request.clone();
            tokio::spawn(async move { scopes.create_scope(request).await })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        let scope = task
            .await
            .unwrap()
            .resource()
            .expect("a retry with the same request id succeeds");
        ids.insert(scope.id);
    }
    assert_eq!(ids.len(), 1, "one scope for one request id");
    let (customs, _) = list_all(&app, 0, "", true).await;
    assert_eq!(representations(&customs), ["race:read", "race:write"]);
}

async fn ten_updates_with_one_etag_let_exactly_one_win(backend: Backend) {
    let app = spawn_app(backend).await;
    let workspace = app.create_workspace("race").await;
    let calls = (0..10).map(|i| {
        let mut workspaces = app.as_admin().workspaces;
        let request = pb::UpdateWorkspaceRequest {
            workspace: Some(pb::Workspace {
                id: workspace.id.clone(),
                name: format!("writer {i}"),
                ..Default::default()
            }),
            update_mask: mask(&["name"]),
            etag: workspace.etag.clone(),
        };
        async move { workspaces.update_workspace(request).await }
    });
    let results = join_all(calls).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(
        winners.len(),
        1,
        "exactly one update with the same etag wins"
    );
    let winner = winners[0].get_ref().workspace.clone().unwrap();
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(status.code(), Code::Aborted, "{status:?}");
        assert_eq!(reason(status), "ETAG_MISMATCH");
    }
    let stored = app.get_workspace(&workspace.id).await.unwrap();
    assert_eq!(stored, winner, "what is stored is what the winner was told");
}

async fn concurrent_idempotent_creates_make_one_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let request = pb::CreateApiKeyRequest {
        request_id: Uuid::now_v7().to_string(),
        ..new_key(&w.id)
    };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut keys = app.as_admin().keys;
            let request = request.clone();
            tokio::spawn(async move { keys.create_api_key(request).await })
        })
        .collect();
    let mut ids = Vec::new();
    let mut secrets = 0;
    for task in tasks {
        let response = task.await.unwrap().inner().expect("every retry succeeds");
        ids.push(response.api_key.unwrap().id);
        if !response.secret.is_empty() {
            secrets += 1;
        }
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "every call returned the same key: {ids:?}");
    assert_eq!(secrets, 1, "exactly one call handed out the secret");
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(listed.api_keys.len(), 1);
}

/// One key rotated ten times at once: one successor, and the old key still works in its
/// grace period. (Merges two tests that raced the same rotation.)
async fn concurrent_rotations_make_one_live_successor(backend: Backend) {
    let app = spawn_app(backend).await;
    let workspace = app.create_workspace("race").await;
    let (key, old_secret) = app.create_key(&workspace.id, &[]).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let mut keys = app.as_admin().keys;
            let request = pb::RotateApiKeyRequest {
                id: key.id.clone(),
                grace_period: seconds(60),
            };
            tokio::spawn(async move { keys.rotate_api_key(request).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(response) => winners.push(response.into_inner()),
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                assert_eq!(reason(&status), "KEY_ALREADY_ROTATED", "{status:?}");
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one rotation succeeds");
    let successor = winners.pop().unwrap();
    let successor_id = successor.api_key.unwrap().id;
    assert_eq!(
        app.get_key(&key.id).await.unwrap().successor_id,
        successor_id
    );
    let keys = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest {
            workspace_id: workspace.id.clone(),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap()
        .api_keys;
    assert_eq!(keys.len(), 2, "the old key and one successor");
    assert_eq!(
        app.verify(&successor.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        app.verify(&old_secret, &[]).await.code(),
        pb::VerifyCode::Valid,
        "inside its grace period"
    );
}

/// Writes racing in one tenant, on PostgreSQL from two replicas, still make one chain:
/// sequences 1..=N without a gap or a repeat, N the number of writes that succeeded, and
/// every link checks out.
async fn concurrent_writes_keep_one_linear_audit_chain(backend: Backend) {
    let app = spawn_app(backend).await;
    let other = match backend {
        Backend::Postgres => Some(spawn_with(app.db.shared(), test_settings(&app.db.url)).await),
        Backend::Sqlite => None,
    };
    let ws = app.create_workspace("shared").await;
    let replicas: Vec<&TestApp> = std::iter::once(&app).chain(other.as_ref()).collect();
    let calls = (0..40).map(|i| {
        let target = replicas[i % replicas.len()];
        let client = target.client(&app.admin());
        let ws = ws.id.clone();
        tokio::spawn(async move {
            if i % 2 == 0 {
                let mut workspaces = client.workspaces;
                workspaces
                    .create_workspace(pb::CreateWorkspaceRequest {
                        name: format!("w{i}"),
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            } else {
                // No etag: last writer wins, every update is a write.
                let mut workspaces = client.workspaces;
                workspaces
                    .update_workspace(pb::UpdateWorkspaceRequest {
                        workspace: Some(pb::Workspace {
                            id: ws,
                            description: format!("d{i}"),
                            ..Default::default()
                        }),
                        update_mask: mask(&["description"]),
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            }
        })
    });
    let succeeded = join_all(calls)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count() as i64;
    assert!(succeeded >= 20, "the creates at least: {succeeded}");
    let db = keyplane::storage::connect(&app.db.url).await.unwrap();
    let report = keyplane::storage::Store::new(db)
        .check_audit_chain(keyplane::domain::TenantId::new(app.tenant))
        .await
        .unwrap();
    assert_eq!(report.broken, None, "{report:?}");
    assert_eq!(report.events as i64, succeeded + 1, "one event per write");
    assert_eq!(report.head.sequence, succeeded + 1, "no gap, no repeat");
}
