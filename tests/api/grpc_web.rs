//! gRPC-Web on the gRPC port (SPEC §4.2): a real gRPC-Web client under node
//! (`tests/grpc-web/`, Connect's gRPC-Web transport) creates and verifies a key, and the
//! text format (base64) answers too. Without node and `npm ci` in `tests/grpc-web` the
//! node test is skipped, unless `KEYPLANE_TEST_NODE=1` (as `.ci/run` sets), which makes it
//! fail instead.
use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyplane::proto::{self as pb, FILE_DESCRIPTOR_SET};
use prost::Message;

use keyplane_testkit::*;

#[test]
fn a_grpc_web_client_creates_and_verifies_a_key() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/grpc-web");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node || !dir.join("node_modules/@connectrpc/connect-node").is_dir() {
        let why = "node or tests/grpc-web/node_modules is missing (run `npm ci` in tests/grpc-web)";
        assert!(
            std::env::var_os("KEYPLANE_TEST_NODE").is_none(),
            "KEYPLANE_TEST_NODE is set but {why}"
        );
        announce_skip(module_path!(), why);
        return;
    }
    run_test(async move {
        let app = spawn_app(Backend::Sqlite).await;
        let workspace = app.create_workspace("browser").await.id;
        app.create_scope("crm:read", &workspace).await;
        let descriptors = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(descriptors.path(), FILE_DESCRIPTOR_SET).unwrap();
        let Cred::Bearer(token) = app.admin() else {
            unreachable!()
        };
        let mut node = Command::new("node");
        node.current_dir(&dir)
            .arg("client.mjs")
            .arg(format!("http://{}", app.addr))
            .arg(descriptors.path())
            .arg(token)
            .arg(&workspace);
        let output = tokio::task::spawn_blocking(move || node.output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "node failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(seen["code"], "VERIFY_CODE_VALID", "{seen}");
        assert_eq!(seen["missing"], 5, "NOT_FOUND: {seen}");
        // The key it made is there for gRPC callers too.
        let id = seen["keyId"].as_str().unwrap();
        assert_eq!(app.get_key(id).await.unwrap().name, "browser");
    });
}

/// A gRPC-Web text (base64) call, as `grpc-web-text` clients make it.
#[test]
fn grpc_web_text_is_answered() {
    run_test(async {
        let app = spawn_app(Backend::Sqlite).await;
        let workspace = app.create_workspace("text").await.id;
        let (_, secret) = app.create_key(&workspace, &[]).await;
        let request = pb::VerifyApiKeyRequest {
            key: secret,
            ..Default::default()
        }
        .encode_to_vec();
        let mut frame = vec![0];
        frame.extend((request.len() as u32).to_be_bytes());
        frame.extend(request);
        let Cred::Bearer(token) = app.admin() else {
            unreachable!()
        };
        let response = reqwest::Client::new()
            .post(format!(
                "http://{}/keyplane.v1.ApiKeyService/VerifyApiKey",
                app.addr
            ))
            .header("content-type", "application/grpc-web-text")
            .header("accept", "application/grpc-web-text")
            .header("x-grpc-web", "1")
            .bearer_auth(token)
            .body(STANDARD.encode(frame))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        // Each chunk is padded base64 of its own: decode 4 characters at a time.
        let bytes: Vec<u8> = text
            .as_bytes()
            .chunks(4)
            .flat_map(|group| STANDARD.decode(group).unwrap())
            .collect();
        let length = u32::from_be_bytes(bytes[1..5].try_into().unwrap()) as usize;
        assert_eq!(bytes[0], 0, "a data frame first");
        let answer = pb::VerifyApiKeyResponse::decode(&bytes[5..5 + length]).unwrap();
        assert_eq!(answer.code(), pb::VerifyCode::Valid);
        let trailers = String::from_utf8_lossy(&bytes[5 + length + 5..]).to_lowercase();
        assert_eq!(bytes[5 + length], 0x80, "then the trailers frame");
        assert!(trailers.contains("grpc-status:0"), "{trailers}");
    });
}
