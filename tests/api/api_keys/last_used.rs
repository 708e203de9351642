//! `last_used_time` follows successful verifications only.
use std::time::Duration;

use keyplane::proto as pb;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(last_used_time_follows_successful_verifications,);

async fn last_used_time_follows_successful_verifications(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let (key, secret) = app.create_key(&w.id, &["crm:read"]).await;
    assert!(key.last_used_time.is_none());

    // Failed verifications do not count as use.
    assert_eq!(
        app.verify(&secret, &["keyplane.scopes:read"]).await.code(),
        pb::VerifyCode::InsufficientScopes
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        app.get_key(&key.id).await.unwrap().last_used_time.is_none(),
        "an INSUFFICIENT_SCOPES verification is not a use"
    );

    let before = unix_now();
    assert_eq!(
        app.verify(&secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    let mut used = None;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        used = app.get_key(&key.id).await.unwrap().last_used_time;
        if used.is_some() {
            break;
        }
    }
    let used = used.expect("last_used_time set within ~1 s of a VALID verification");
    assert!(
        used.seconds >= before - 1 && used.seconds <= unix_now() + 1,
        "{used:?} is not about now"
    );

    // A disabled key's failed verification leaves another key's state alone, and does not
    // set its own.
    let (other, other_secret) = app.create_key(&w.id, &[]).await;
    app.as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: other.id.clone(),
                disabled: true,
                ..Default::default()
            }),
            update_mask: mask(&["disabled"]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(
        app.verify(&other_secret, &[]).await.code(),
        pb::VerifyCode::Disabled
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        app.get_key(&other.id)
            .await
            .unwrap()
            .last_used_time
            .is_none()
    );
}
