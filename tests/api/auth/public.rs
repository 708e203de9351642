//! Health and reflection answer without a credential; the API does not.
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use super::*;

on_both_backends!(health_and_reflection_need_no_credential,);

async fn health_and_reflection_need_no_credential(backend: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let app = spawn_app(backend).await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "keyplane.v1.WorkspaceService"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let response = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap_or_else(|s| panic!("Health/Check({service:?}) without credential: {s:?}"))
                .into_inner();
            if response.status() == ServingStatus::Serving {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{service:?} never became SERVING: {response:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("reflection without credential")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("a reflection answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(services)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "keyplane.v1.WorkspaceService"),
        "{names:?}"
    );
    // The API itself still needs one.
    assert_err(
        app.client(&Cred::None)
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
}
