//! RotateApiKey: successors, grace periods, and what cannot be rotated.
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use super::new_key;
use keyplane_testkit::*;

on_both_backends!(
    rotate_issues_a_successor_and_revokes_at_once,
    rotate_with_grace_keeps_the_old_key_until_it_expires,
    rotate_refuses_revoked_keys_and_bad_grace_periods,
);

async fn rotate_issues_a_successor_and_revokes_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let expire = in_secs(3600);
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            name: "ci".into(),
            scopes: strings(&["crm:read", "keyplane.api_keys:read"]),
            owner_id: "alice".into(),
            metadata: [("env".to_string(), "prod".to_string())].into(),
            expire_time: Some(expire),
            ..new_key(&w.id)
        })
        .await
        .inner()
        .unwrap();
    let old = created.api_key.unwrap();

    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: old.id.clone(),
            grace_period: seconds(0),
        })
        .await
        .inner()
        .unwrap();
    let new = rotated.api_key.clone().unwrap();
    assert_secret_shape(&rotated.secret, "kp");
    assert_ne!(rotated.secret, created.secret);
    assert_ne!(new.id, old.id);
    assert!(new.id > old.id, "UUIDv7: the successor is newer");
    assert_eq!(
        new.masked_key,
        format!("kp_****{}", &rotated.secret[rotated.secret.len() - 4..])
    );
    assert_eq!(new.workspace_id, old.workspace_id);
    assert_eq!(new.tenant_id, old.tenant_id);
    assert_eq!(new.name, old.name);
    assert_eq!(new.prefix, old.prefix);
    assert_eq!(new.scopes, old.scopes);
    assert_eq!(new.owner_id, old.owner_id);
    assert_eq!(new.metadata, old.metadata);
    assert_eq!(new.expire_time, Some(expire));
    assert!(new.revoke_time.is_none() && !new.disabled && new.successor_id.is_empty());
    assert_no_secret(&new, &rotated.secret);
    assert_eq!(app.get_key(&new.id).await.unwrap(), new);

    let old_now = app.get_key(&old.id).await.unwrap();
    assert_eq!(old_now.successor_id, new.id);
    assert!(old_now.revoke_time.is_some(), "grace 0 revokes at once");
    assert_eq!(
        app.verify(&created.secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );
    assert_eq!(
        app.verify(&rotated.secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );

    // The successor can be rotated in turn; without a grace period the default is 0:
    // revoked at once.
    let third = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: new.id.clone(),
            grace_period: None,
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.code(),
        pb::VerifyCode::Revoked
    );
    assert_eq!(
        app.verify(&third.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_eq!(
        app.get_key(&new.id).await.unwrap().successor_id,
        third.api_key.unwrap().id
    );
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(listed.api_keys.len(), 3);

    assert_err(
        app.as_admin()
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: uuid::Uuid::now_v7().to_string(),
                grace_period: None,
            })
            .await
            .inner(),
        Code::NotFound,
        "NOT_FOUND",
    );

    // A key is rotated once: rotating it again says so (rotate its successor instead),
    // even though a rotation without grace also revoked it.
    assert_err(
        app.as_admin()
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: old.id.clone(),
                grace_period: seconds(0),
            })
            .await
            .inner(),
        Code::FailedPrecondition,
        "KEY_ALREADY_ROTATED",
    );
    assert_eq!(
        app.as_admin()
            .keys
            .list_api_keys(pb::ListApiKeysRequest::default())
            .await
            .inner()
            .unwrap()
            .api_keys
            .len(),
        3,
        "the refused rotation created nothing"
    );
}

async fn rotate_with_grace_keeps_the_old_key_until_it_expires(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (old, old_secret) = app.create_key(&w.id, &[]).await;
    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: old.id.clone(),
            grace_period: seconds(2),
        })
        .await
        .inner()
        .unwrap();
    let new = rotated.api_key.unwrap();
    assert!(
        new.expire_time.is_none(),
        "the successor keeps the old key's (absent) expiry"
    );
    let old_now = app.get_key(&old.id).await.unwrap();
    assert_eq!(old_now.successor_id, new.id);
    assert!(
        old_now.revoke_time.is_none(),
        "not revoked during the grace period"
    );
    assert_eq!(
        app.verify(&old_secret, &[]).await.code(),
        pb::VerifyCode::Valid,
        "the old key works during the grace period"
    );
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    // A key is rotated once, even while its grace period runs.
    assert_err(
        app.as_admin()
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: old.id.clone(),
                grace_period: seconds(2),
            })
            .await
            .inner(),
        Code::FailedPrecondition,
        "KEY_ALREADY_ROTATED",
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let v = app.verify(&old_secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Expired, "past the grace period");
    assert!(!v.valid);
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    assert_err(
        app.as_admin()
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: old.id.clone(),
                grace_period: seconds(2),
            })
            .await
            .inner(),
        Code::FailedPrecondition,
        "KEY_ALREADY_ROTATED",
    );

    // The successor keeps the old key's expiry; the old key ends at the sooner of its own
    // expiry and the end of the grace period.
    let expire = in_secs(3600);
    let dated = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            expire_time: Some(expire),
            ..new_key(&w.id)
        })
        .await
        .inner()
        .unwrap()
        .api_key
        .unwrap();
    let before = unix_now();
    let successor = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: dated.id.clone(),
            grace_period: seconds(60),
        })
        .await
        .inner()
        .unwrap()
        .api_key
        .unwrap();
    assert_eq!(successor.expire_time, Some(expire));
    let retired = app.get_key(&dated.id).await.unwrap().expire_time.unwrap();
    assert!(
        retired.seconds >= before + 59 && retired.seconds <= unix_now() + 61,
        "the old key expires when the grace period ends: {retired:?}"
    );
    let short = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            expire_time: Some(expire),
            ..new_key(&w.id)
        })
        .await
        .inner()
        .unwrap()
        .api_key
        .unwrap();
    let successor = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: short.id.clone(),
            grace_period: seconds(7 * 24 * 3600),
        })
        .await
        .inner()
        .unwrap()
        .api_key
        .unwrap();
    assert_eq!(successor.expire_time, Some(expire));
    assert_eq!(
        app.get_key(&short.id).await.unwrap().expire_time,
        Some(expire),
        "a grace period never extends a key's life"
    );
}

async fn rotate_refuses_revoked_keys_and_bad_grace_periods(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (revoked, _) = app.create_key(&w.id, &[]).await;
    app.revoke_key(&revoked.id).await;
    let status = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: revoked.id.clone(),
            grace_period: None,
        })
        .await
        .inner()
        .expect_err("a revoked key cannot be rotated");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(!reason(&status).is_empty(), "ErrorInfo with a reason");

    let (key, secret) = app.create_key(&w.id, &[]).await;
    for grace in [
        prost_types::Duration {
            seconds: -1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 0,
            nanos: -1,
        },
        prost_types::Duration {
            seconds: 30 * 24 * 3600 + 1,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 365 * 24 * 3600,
            nanos: 0,
        },
    ] {
        let status = assert_err(
            app.as_admin()
                .keys
                .rotate_api_key(pb::RotateApiKeyRequest {
                    id: key.id.clone(),
                    grace_period: Some(grace),
                })
                .await
                .inner(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["grace_period"], "{grace:?}");
    }
    let status = assert_err(
        app.as_admin()
            .keys
            .rotate_api_key(pb::RotateApiKeyRequest {
                id: "nope".into(),
                grace_period: None,
            })
            .await
            .inner(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
    // None of that touched the key.
    let untouched = app.get_key(&key.id).await.unwrap();
    assert!(untouched.successor_id.is_empty());
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);

    // Exactly 30 days is allowed.
    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: key.id.clone(),
            grace_period: seconds(30 * 24 * 3600),
        })
        .await
        .inner()
        .unwrap();
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
    assert_eq!(
        app.get_key(&key.id).await.unwrap().successor_id,
        rotated.api_key.unwrap().id
    );
}
