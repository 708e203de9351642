//! Races (issue: prove it, §4): the database's constraints and compare-and-set updates
//! decide, not the order in which requests happen to arrive.
use futures::future::join_all;
use keyplane::proto as pb;
use prost_types::FieldMask;
use tonic::Code;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(
    fifty_concurrent_creates_of_one_scope_make_one,
    ten_updates_with_one_etag_let_exactly_one_win,
    concurrent_rotations_never_make_two_live_successors,
);

async fn fifty_concurrent_creates_of_one_scope_make_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let calls = (0..50).map(|_| {
        let mut client = app.scopes();
        let request = req(
            pb::CreateScopeRequest {
                representation: "race:read".into(),
                ..Default::default()
            },
            &app.admin(),
        );
        async move { client.create_scope(request).await }
    });
    let results = join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one create wins");
    for status in results.into_iter().filter_map(Result::err) {
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
        assert_eq!(reason(&status), "ALREADY_EXISTS");
    }
    let listed = app
        .scopes()
        .list_scopes(req(
            pb::ListScopesRequest {
                exclude_builtin: true,
                ..Default::default()
            },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.scopes.len(), 1);
}

async fn ten_updates_with_one_etag_let_exactly_one_win(backend: Backend) {
    let app = spawn_app(backend).await;
    let workspace = app.create_workspace("race").await;
    let calls = (0..10).map(|i| {
        let mut client = app.workspaces();
        let request = req(
            pb::UpdateWorkspaceRequest {
                workspace: Some(pb::Workspace {
                    id: workspace.id.clone(),
                    name: format!("writer {i}"),
                    ..Default::default()
                }),
                update_mask: Some(FieldMask {
                    paths: vec!["name".into()],
                }),
                etag: workspace.etag.clone(),
            },
            &app.admin(),
        );
        async move { client.update_workspace(request).await }
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
    let stored = app
        .workspaces()
        .get_workspace(req(
            pb::GetWorkspaceRequest { id: workspace.id },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(stored, winner, "what is stored is what the winner was told");
}

async fn concurrent_rotations_never_make_two_live_successors(backend: Backend) {
    let app = spawn_app(backend).await;
    let workspace = app.create_workspace("race").await;
    let (key, old_secret) = app.create_key(&workspace.id, &[]).await;
    let calls = (0..10).map(|_| {
        let mut client = app.keys();
        let request = req(
            pb::RotateApiKeyRequest {
                id: key.id.clone(),
                grace_period: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            },
            &app.admin(),
        );
        async move { client.rotate_api_key(request).await }
    });
    let results = join_all(calls).await;
    let secrets: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .map(|r| r.get_ref().secret.clone())
        .collect();
    assert_eq!(secrets.len(), 1, "exactly one rotation succeeds");
    for status in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert_eq!(reason(status), "KEY_ALREADY_ROTATED");
    }
    let keys = app
        .keys()
        .list_api_keys(req(
            pb::ListApiKeysRequest {
                workspace_id: workspace.id.clone(),
                ..Default::default()
            },
            &app.admin(),
        ))
        .await
        .unwrap()
        .into_inner()
        .api_keys;
    assert_eq!(keys.len(), 2, "the old key and one successor");
    assert_eq!(
        app.verify(&secrets[0], &[]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        app.verify(&old_secret, &[]).await.code(),
        pb::VerifyCode::Valid,
        "inside its grace period"
    );
}
