//! Built-in scopes (§2.4): every RPC needs exactly its own, and a resource's wildcard grants
//! that resource only. Driven by the matrix's table of RPCs (`matrix::rows`).
use keyplane::proto as pb;
use tonic::{Code, Status};
use tonic_types::StatusExt;

use super::*;
use crate::matrix::{Fixture, Row, call, rows};

on_both_backends!(
    every_rpc_needs_its_builtin_scope,
    wildcard_grants_every_action_of_its_resource_only,
);

/// Calls the RPC of `row` as `cred` on ids that name nothing: enough to see whether the
/// call gets past authorization, which happens before the request is read.
async fn call_as(app: &TestApp, cred: &Cred, row: &Row) -> Result<Vec<u8>, Status> {
    call(&app.client(cred), row, &Fixture::nothing()).await
}

#[track_caller]
fn assert_missing_scope<T: std::fmt::Debug>(result: Result<T, Status>, needed: &str, what: &str) {
    let status = match result {
        Err(s) if s.code() == Code::PermissionDenied && reason(&s) == "MISSING_SCOPE" => s,
        other => panic!("{what}: expected PERMISSION_DENIED MISSING_SCOPE, got {other:?}"),
    };
    let info = status.get_details_error_info().unwrap();
    assert_eq!(info.domain, "keyplane.dev");
    assert_eq!(
        info.metadata.get("scope").map(String::as_str),
        Some(needed),
        "{what}: {status:?}"
    );
}

#[track_caller]
fn assert_authorized<T: std::fmt::Debug>(result: Result<T, Status>, what: &str) {
    if let Err(status) = result {
        assert!(
            !matches!(
                status.code(),
                Code::Unauthenticated | Code::PermissionDenied
            ),
            "{what}: the credential should have been accepted: {status:?}"
        );
    }
}

async fn every_rpc_needs_its_builtin_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let all = all_builtin();
    for row in rows() {
        let (rpc, needed) = (row.rpc(), row.scope);
        // Every built-in scope but the needed one.
        let others: Vec<&str> = all.iter().copied().filter(|s| *s != needed).collect();
        assert_eq!(others.len(), all.len() - 1, "{needed} is a built-in scope");
        let without = bearer(token(Some(app.tenant), &others));
        assert_missing_scope(
            call_as(&app, &without, &row).await,
            needed,
            &format!("{rpc} without {needed}"),
        );

        // A custom scope of the same name outside the keyplane namespace is not it.
        let lookalike = needed.trim_start_matches("keyplane.");
        let fake = bearer(token(
            Some(app.tenant),
            &[lookalike, &needed.to_uppercase()],
        ));
        assert_missing_scope(
            call_as(&app, &fake, &row).await,
            needed,
            &format!("{rpc} with lookalikes"),
        );

        // A token holding only the needed scope gets past authorization; DelegateApiKey's
        // credential is the parent key itself, so there a key holding only it.
        let only = if rpc == "DelegateApiKey" {
            let ws = app.create_workspace("delegating").await;
            Cred::ApiKey(app.create_key(&ws.id, &[needed]).await.1)
        } else {
            bearer(token(Some(app.tenant), &[needed]))
        };
        assert_authorized(
            call_as(&app, &only, &row).await,
            &format!("{rpc} with {needed}"),
        );
    }
    // A token without any scope at all.
    let none = bearer(token(Some(app.tenant), &[]));
    for row in rows() {
        assert_missing_scope(
            call_as(&app, &none, &row).await,
            row.scope,
            &format!("{} with no scope", row.rpc()),
        );
    }
    // An admin key works the same way.
    let ws = app.create_workspace("keys").await;
    let (_, reader_key) = app
        .create_key(&ws.id, &[WS_READ, "keyplane.scopes:read"])
        .await;
    let reader_key = Cred::ApiKey(reader_key);
    for row in rows() {
        let result = call_as(&app, &reader_key, &row).await;
        let what = format!("{} with a reader key", row.rpc());
        if row.scope == WS_READ || row.scope == "keyplane.scopes:read" {
            assert_authorized(result, &what);
        } else {
            assert_missing_scope(result, row.scope, &what);
        }
    }
}

async fn wildcard_grants_every_action_of_its_resource_only(backend: Backend) {
    let app = spawn_app(backend).await;
    let star = bearer(token(Some(app.tenant), &["keyplane.workspaces:*"]));
    let made = app
        .client(&star)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .resource()
        .expect(":* grants write");
    assert_eq!(
        ids(&app
            .client(&star)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .unwrap()
            .workspaces),
        vec![made.id.clone()]
    );
    app.client(&star)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: made.id.clone(),
        })
        .await
        .resource()
        .expect(":* grants read");

    // It does not reach the other resources.
    for row in rows() {
        let result = call_as(&app, &star, &row).await;
        if row.scope.starts_with("keyplane.workspaces:") {
            assert_authorized(result, row.rpc());
        } else {
            assert_missing_scope(result, row.scope, row.rpc());
        }
    }
    // Only the resource's own wildcard counts.
    for scopes in [
        vec!["keyplane.scopes:*", "keyplane.api_keys:*"],
        vec!["keyplane.workspace:*"],
        vec!["keyplane.workspaces*"],
        vec!["workspaces:*"],
    ] {
        let cred = bearer(token(Some(app.tenant), &scopes));
        assert_missing_scope(
            app.client(&cred)
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner()
                .map(drop),
            WS_READ,
            &format!("{scopes:?}"),
        );
        assert_missing_scope(
            app.client(&cred)
                .workspaces
                .create_workspace(pb::CreateWorkspaceRequest::default())
                .await
                .resource()
                .map(drop),
            WS_WRITE,
            &format!("{scopes:?}"),
        );
    }
    // api_keys:* grants verify too.
    let keys_star = bearer(token(Some(app.tenant), &["keyplane.api_keys:*"]));
    app.client(&keys_star)
        .try_verify("kp_x", &[])
        .await
        .expect("api_keys:* grants verify");
    // Reading does not grant writing, and vice versa.
    let reader = bearer(token(Some(app.tenant), &[WS_READ]));
    assert_missing_scope(
        app.client(&reader)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .resource()
            .map(drop),
        WS_WRITE,
        "workspaces:read creating",
    );
    let writer = bearer(token(Some(app.tenant), &[WS_WRITE]));
    assert_missing_scope(
        app.client(&writer)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner()
            .map(drop),
        WS_READ,
        "workspaces:write listing",
    );
    assert_missing_scope(
        app.client(&writer)
            .workspaces
            .get_workspace(pb::GetWorkspaceRequest {
                id: made.id.clone(),
            })
            .await
            .resource()
            .map(drop),
        WS_READ,
        "workspaces:write getting",
    );
}
