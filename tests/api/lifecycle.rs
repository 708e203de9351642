//! Operating the server: health, reflection, restart, graceful shutdown, request limits.
use std::time::Duration;

use keyplane::proto as pb;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use keyplane_testkit::*;

on_both_backends!(
    health_reports_every_service_serving,
    reflection_lists_services_in_v1_and_v1alpha,
    restart_keeps_all_data,
    shutdown_ends_watch_streams_after_not_serving,
    requests_over_one_mebibyte_are_resource_exhausted,
);

const NAMES: [&str; 5] = [
    "",
    "keyplane.v1.WorkspaceService",
    "keyplane.v1.ScopeService",
    "keyplane.v1.RoleService",
    "keyplane.v1.ApiKeyService",
];

async fn health_reports_every_service_serving(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    for name in NAMES {
        let status = health
            .check(HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

async fn reflection_lists_services_in_v1_and_v1alpha(backend: Backend) {
    use tonic_reflection::pb::{v1, v1alpha};
    let app = spawn_app(backend).await;

    let mut client = v1::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "keyplane.v1.WorkspaceService",
        "keyplane.v1.ScopeService",
        "keyplane.v1.RoleService",
        "keyplane.v1.ApiKeyService",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "keyplane.v1.ApiKeyService".into(),
            ),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

async fn restart_keeps_all_data(backend: Backend) {
    let app = spawn_app(backend).await;
    let tenant = app.tenant;
    let workspace = app.create_workspace("durable").await;
    let scope = app.create_scope("crm:read", "").await;
    let (key, secret) = app.create_key(&workspace.id, &["crm:read"]).await;
    let (result, db) = app.stop().await;
    result.expect("clean shutdown");

    let settings = test_settings(&db.url);
    let mut again = spawn_with(db, settings).await;
    again.tenant = tenant;
    let got = again
        .as_admin()
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest {
            id: workspace.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    assert_eq!(got, workspace);
    let got_scope = again
        .as_admin()
        .scopes
        .get_scope(pb::GetScopeRequest {
            id: scope.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .scope
        .unwrap();
    assert_eq!(got_scope, scope);
    let verified = again.verify(&secret, &["crm:read"]).await;
    assert_eq!(verified.code(), pb::VerifyCode::Valid);
    assert_eq!(verified.api_key.unwrap().id, key.id);

    // Page tokens stay valid across restarts: their key is stored in the database.
    for i in 0..3 {
        again.create_workspace(&format!("more{i}")).await;
    }
    let first = again
        .as_admin()
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest {
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (result, db) = again.stop().await;
    result.unwrap();
    let settings = test_settings(&db.url);
    let mut third = spawn_with(db, settings).await;
    third.tenant = tenant;
    let next = third
        .as_admin()
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest {
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.workspaces.len(), 2);
}

async fn shutdown_ends_watch_streams_after_not_serving(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let (result, _db) = tokio::time::timeout(Duration::from_secs(4), app.stop())
        .await
        .expect("shutdown finishes well within the grace period");
    result.expect("run_until_stopped returns Ok");

    let mut last = None;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_secs(2), watch.next()).await
    {
        last = Some(message.status());
    }
    assert_eq!(
        last,
        Some(ServingStatus::NotServing),
        "NOT_SERVING before the stream ends"
    );
}

async fn requests_over_one_mebibyte_are_resource_exhausted(backend: Backend) {
    let app = spawn_app(backend).await;
    let big = pb::CreateWorkspaceRequest {
        description: "x".repeat(1024 * 1024 + 1),
        ..Default::default()
    };
    let result = app.as_admin().workspaces.create_workspace(big).await;
    assert_err(result, Code::ResourceExhausted, "REQUEST_TOO_LARGE");
    // Just under the limit is decoded and then refused by the field rules.
    let under = pb::CreateWorkspaceRequest {
        description: "x".repeat(1024 * 1000),
        ..Default::default()
    };
    let result = app.as_admin().workspaces.create_workspace(under).await;
    assert_err(result, Code::InvalidArgument, "INVALID_ARGUMENT");
}

/// SQLite is one process: the verification cache of one would never hear of the other's
/// writes, so a second server on the same file is refused at start, naming why.
#[test]
fn a_second_server_on_one_sqlite_file_is_refused() {
    run_test(async {
        let app = spawn_app(Backend::Sqlite).await;
        let second = keyplane::Application::build(test_settings(&app.db.url)).await;
        let refusal = format!("{:#}", second.err().expect("the second server is refused"));
        assert!(refusal.contains("another keyplane process"), "{refusal}");
        // The first keeps serving.
        app.create_workspace("still here").await;
    });
}

on_both_backends!(every_error_carries_its_request_id);

/// Every error response names its request id in `x-request-id` (the one the client sent,
/// when it sent one) and the server logs it with that id, so an operator handed the id finds
/// the line; a client's own id is echoed on success too.
async fn every_error_carries_its_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut workspaces = app.as_admin().workspaces;
    let missing = || pb::GetWorkspaceRequest {
        id: uuid::Uuid::now_v7().to_string(),
    };
    let failed = workspaces.get_workspace(missing()).await.unwrap_err();
    let id = failed
        .metadata()
        .get("x-request-id")
        .expect("an error response carries its request id")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::try_parse(&id).is_ok(), "{id}");

    let mut request = tonic::Request::new(missing());
    request
        .metadata_mut()
        .insert("x-request-id", "trace-42".parse().unwrap());
    let failed = workspaces.get_workspace(request).await.unwrap_err();
    assert_eq!(failed.metadata().get("x-request-id").unwrap(), "trace-42");

    let mut request = tonic::Request::new(pb::ListWorkspacesRequest::default());
    request
        .metadata_mut()
        .insert("x-request-id", "trace-43".parse().unwrap());
    let listed = workspaces.list_workspaces(request).await.expect("list");
    assert_eq!(listed.metadata().get("x-request-id").unwrap(), "trace-43");
}
