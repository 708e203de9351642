//! RevokeApiKey and DeleteApiKey.
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(revoke_is_final_and_idempotent, delete_forgets_the_key,);

async fn revoke_is_final_and_idempotent(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let revoked = app.revoke_key(&key.id).await;
    let revoke_time = revoked.revoke_time.expect("revoke_time set");
    assert_ne!(revoked.etag, key.etag);
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Revoked);
    assert!(!v.valid);
    assert_eq!(app.get_key(&key.id).await.unwrap(), revoked);

    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = app.revoke_key(&key.id).await;
    assert_eq!(
        again.revoke_time,
        Some(revoke_time),
        "revoking twice keeps the first revoke_time"
    );
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );

    // Revocation is irreversible: re-enabling does not bring the key back.
    let enable = pb::ApiKey {
        id: key.id.clone(),
        disabled: false,
        ..Default::default()
    };
    app.as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(enable),
            update_mask: mask(&["disabled"]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );

    assert_err(
        app.as_admin()
            .keys
            .revoke_api_key(pb::RevokeApiKeyRequest {
                id: uuid::Uuid::now_v7().to_string(),
            })
            .await
            .resource(),
        Code::NotFound,
        "NOT_FOUND",
    );
    let status = assert_err(
        app.as_admin()
            .keys
            .revoke_api_key(pb::RevokeApiKeyRequest { id: "nope".into() })
            .await
            .resource(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
}

async fn delete_forgets_the_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let (kept, kept_secret) = app.create_key(&w.id, &[]).await;
    app.as_admin()
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest { id: key.id.clone() })
        .await
        .inner()
        .unwrap();
    assert_err(app.get_key(&key.id).await, Code::NotFound, "NOT_FOUND");
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::NotFound);
    assert!(v.api_key.is_none());
    assert_err(
        app.as_admin()
            .keys
            .delete_api_key(pb::DeleteApiKeyRequest { id: key.id.clone() })
            .await
            .inner(),
        Code::NotFound,
        "NOT_FOUND",
    );
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(listed.api_keys, std::slice::from_ref(&kept));
    assert_eq!(
        app.verify(&kept_secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );

    // Another tenant cannot delete this tenant's key.
    let stranger = stranger();
    let status = app
        .client(&stranger)
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest {
            id: kept.id.clone(),
        })
        .await;
    assert_err(status, Code::NotFound, "NOT_FOUND");
    let still = app.get_key(&kept.id).await.unwrap();
    assert_eq!((still.id, still.etag), (kept.id, kept.etag), "untouched");
    let status = assert_err(
        app.as_admin()
            .keys
            .delete_api_key(pb::DeleteApiKeyRequest { id: "nope".into() })
            .await
            .inner(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
}
