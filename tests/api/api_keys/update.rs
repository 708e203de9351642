//! UpdateApiKey: masks, etags, field rules, and disabling.

use keyplane::proto as pb;
use tonic::Code;

use super::new_key;
use keyplane_testkit::*;

on_both_backends!(
    update_follows_the_mask_and_the_etag,
    update_rejects_bad_masks_and_values,
    disabling_is_reversible,
);

async fn update_follows_the_mask_and_the_etag(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", "").await;
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: strings(&["crm:read"]),
            owner_id: "alice".into(),
            metadata: [("a".to_string(), "1".to_string())].into(),
            ..new_key(&w.id)
        })
        .await
        .inner()
        .unwrap();
    let original = created.api_key.unwrap();
    let secret = created.secret;

    let new_expiry = in_secs(7200);
    let changed = pb::ApiKey {
        id: original.id.clone(),
        name: "renamed".into(),
        scopes: strings(&["crm:write"]),
        owner_id: "bob".into(),
        metadata: [("b".to_string(), "2".to_string())].into(),
        expire_time: Some(new_expiry),
        // Not in the mask: ignored.
        disabled: true,
        ..Default::default()
    };
    let updated = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(changed),
            update_mask: mask(&["name", "scopes", "owner_id", "metadata", "expire_time"]),
            etag: original.etag.clone(),
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(updated.name, "renamed");
    assert_eq!(updated.scopes, ["crm:write"]);
    assert_eq!(updated.owner_id, "bob");
    assert_eq!(
        updated.metadata,
        [("b".to_string(), "2".to_string())].into()
    );
    assert_eq!(updated.expire_time, Some(new_expiry));
    assert!(!updated.disabled, "disabled was not in the mask");
    assert_ne!(
        updated.etag, original.etag,
        "the etag changes on every update"
    );
    assert_eq!(updated.create_time, original.create_time);
    assert_ne!(updated.update_time, original.update_time);
    assert_eq!(updated.masked_key, original.masked_key);
    assert_eq!(updated.prefix, original.prefix);
    assert_eq!(app.get_key(&original.id).await.unwrap(), updated);
    assert_no_secret(&updated, &secret);

    // The new scopes are what verification sees, at once.
    let v = app.verify(&secret, &["crm:read"]).await;
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes);
    assert_eq!(v.missing_scopes, ["crm:read"]);
    assert_eq!(
        app.verify(&secret, &["crm:write"]).await.code(),
        pb::VerifyCode::Valid
    );

    // The original etag is stale now.
    let stale = pb::ApiKey {
        id: original.id.clone(),
        name: "lost update".into(),
        ..Default::default()
    };
    assert_err(
        app.as_admin()
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(stale.clone()),
                update_mask: mask(&["name"]),
                etag: original.etag.clone(),
            })
            .await
            .resource(),
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_err(
        app.as_admin()
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(stale),
                update_mask: mask(&["name"]),
                etag: "garbage".into(),
            })
            .await
            .resource(),
        Code::Aborted,
        "ETAG_MISMATCH",
    );
    assert_eq!(app.get_key(&original.id).await.unwrap().name, "renamed");

    // An empty mask updates every field the request sets, and nothing else.
    let set_some = pb::ApiKey {
        id: original.id.clone(),
        owner_id: "carol".into(),
        disabled: true,
        ..Default::default()
    };
    let after = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(set_some),
            update_mask: mask(&[]),
            etag: updated.etag.clone(),
        })
        .await
        .resource()
        .unwrap();
    assert_eq!(after.owner_id, "carol");
    assert!(after.disabled);
    assert_eq!(after.name, "renamed", "unset fields keep their value");
    assert_eq!(after.scopes, ["crm:write"]);
    assert_eq!(after.metadata.len(), 1);
    assert_eq!(after.expire_time, Some(new_expiry));

    // Naming a field with its default value clears it.
    let clear = pb::ApiKey {
        id: original.id.clone(),
        ..Default::default()
    };
    let cleared = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(clear),
            update_mask: mask(&["scopes", "owner_id", "metadata", "expire_time", "disabled"]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
    assert!(cleared.scopes.is_empty());
    assert!(cleared.owner_id.is_empty());
    assert!(cleared.metadata.is_empty());
    assert!(cleared.expire_time.is_none());
    assert!(!cleared.disabled);
    assert_eq!(
        app.verify(&secret, &["crm:write"]).await.missing_scopes,
        ["crm:write"]
    );

    // A key that does not exist.
    let missing = pb::ApiKey {
        id: uuid::Uuid::now_v7().to_string(),
        name: "x".into(),
        ..Default::default()
    };
    assert_err(
        app.as_admin()
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(missing),
                update_mask: mask(&["name"]),
                etag: "".into(),
            })
            .await
            .resource(),
        Code::NotFound,
        "NOT_FOUND",
    );
}

async fn update_rejects_bad_masks_and_values(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, _) = app.create_key(&w.id, &[]).await;
    let named = |name: &str| pb::ApiKey {
        id: key.id.clone(),
        name: name.into(),
        ..Default::default()
    };
    for paths in [
        vec!["prefix"],
        vec!["masked_key"],
        vec!["revoke_time"],
        vec!["id"],
        vec!["tenant_id"],
        vec!["workspace_id"],
        vec!["last_used_time"],
        vec!["successor_id"],
        vec!["etag"],
        vec!["create_time"],
        vec!["no_such_field"],
        vec!["name", "update_time"],
    ] {
        let status = assert_err(
            app.as_admin()
                .keys
                .update_api_key(pb::UpdateApiKeyRequest {
                    api_key: Some(named("x")),
                    update_mask: mask(&paths),
                    etag: "".into(),
                })
                .await
                .resource(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), ["update_mask"], "{paths:?}");
    }
    assert_eq!(app.get_key(&key.id).await.unwrap(), key, "nothing changed");

    let cases: Vec<(pb::ApiKey, &[&str], &str)> = vec![
        (named(&"n".repeat(121)), &["name"], "api_key.name"),
        (
            pb::ApiKey {
                id: key.id.clone(),
                scopes: strings(&["bad scope"]),
                ..Default::default()
            },
            &["scopes"],
            "api_key.scopes",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                scopes: vec!["keyplane.api_keys:read".to_string(); 65],
                ..Default::default()
            },
            &["scopes"],
            "api_key.scopes",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                metadata: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..Default::default()
            },
            &["metadata"],
            "api_key.metadata",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                metadata: [("k".to_string(), "v".repeat(257))].into(),
                ..Default::default()
            },
            &["metadata"],
            "api_key.metadata",
        ),
        (
            pb::ApiKey {
                id: key.id.clone(),
                expire_time: Some(in_secs(-60)),
                ..Default::default()
            },
            &["expire_time"],
            "api_key.expire_time",
        ),
        (
            pb::ApiKey {
                id: "nope".into(),
                name: "x".into(),
                ..Default::default()
            },
            &["name"],
            "api_key.id",
        ),
    ];
    for (k, paths, field) in cases {
        let status = assert_err(
            app.as_admin()
                .keys
                .update_api_key(pb::UpdateApiKeyRequest {
                    api_key: Some(k),
                    update_mask: mask(paths),
                    etag: "".into(),
                })
                .await
                .resource(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), [field]);
    }
    let unknown = pb::ApiKey {
        id: key.id.clone(),
        scopes: strings(&["hr:read"]),
        ..Default::default()
    };
    let status = assert_err(
        app.as_admin()
            .keys
            .update_api_key(pb::UpdateApiKeyRequest {
                api_key: Some(unknown),
                update_mask: mask(&["scopes"]),
                etag: "".into(),
            })
            .await
            .resource(),
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(status.message().contains("hr:read"), "{status:?}");
    assert_eq!(app.get_key(&key.id).await.unwrap(), key, "nothing changed");
}

async fn disabling_is_reversible(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let disable = pb::ApiKey {
        id: key.id.clone(),
        disabled: true,
        ..Default::default()
    };
    let disabled = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(disable),
            update_mask: mask(&["disabled"]),
            etag: key.etag.clone(),
        })
        .await
        .resource()
        .unwrap();
    assert!(disabled.disabled);
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Disabled);
    assert!(!v.valid);

    // `disabled: false` is the default value: without a mask it is not "set".
    let rename = pb::ApiKey {
        id: key.id.clone(),
        name: "still off".into(),
        disabled: false,
        ..Default::default()
    };
    let renamed = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(rename),
            update_mask: mask(&[]),
            etag: "".into(),
        })
        .await
        .resource()
        .unwrap();
    assert!(
        renamed.disabled,
        "an empty mask does not touch unset fields"
    );
    assert_eq!(
        app.verify(&secret, &[]).await.code(),
        pb::VerifyCode::Disabled
    );

    let enable = pb::ApiKey {
        id: key.id.clone(),
        disabled: false,
        ..Default::default()
    };
    let enabled = app
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(enable),
            update_mask: mask(&["disabled"]),
            etag: renamed.etag.clone(),
        })
        .await
        .resource()
        .unwrap();
    assert!(!enabled.disabled);
    let v = app.verify(&secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid);
    assert!(v.valid);
}
