//! CreateApiKey and GetApiKey: the secret once and its shape, the workspace's default
//! prefix, field rules, unknown scopes and workspaces, idempotency by request id.

use keyplane::proto as pb;
use tonic::Code;

use super::new_key;
use keyplane_testkit::*;

on_both_backends!(
    create_returns_the_secret_once_and_never_again,
    create_uses_the_workspace_default_prefix,
    create_validates_every_field,
    create_rejects_unknown_scopes_and_workspaces,
    create_is_idempotent_by_request_id,
);

async fn create_returns_the_secret_once_and_never_again(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("crm:write", &w.id).await;
    let expire = in_secs(3600);
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: w.id.clone(),
            name: "  ci  ".into(),
            prefix: String::new(),
            scopes: strings(&["crm:write", "crm:read", "keyplane.api_keys:read"]),
            owner_id: "cust_42".into(),
            metadata: [("plan".to_string(), "pro".to_string())].into(),
            expire_time: Some(expire),
            request_id: String::new(),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    let secret = created.secret.clone();
    assert_secret_shape(&secret, "kp");
    let key = created.api_key.clone().unwrap();
    assert_eq!(
        key.masked_key,
        format!("kp_****{}", &secret[secret.len() - 4..])
    );
    assert_eq!(key.prefix, "kp");
    assert_eq!(key.name, "ci");
    assert_eq!(key.tenant_id, app.tenant.to_string());
    assert_eq!(key.workspace_id, w.id);
    let mut scopes = key.scopes.clone();
    scopes.sort();
    assert_eq!(
        scopes,
        ["crm:read", "crm:write", "keyplane.api_keys:read"],
        "every requested scope is granted"
    );
    assert_eq!(key.owner_id, "cust_42");
    assert_eq!(key.metadata.get("plan").map(String::as_str), Some("pro"));
    assert_eq!(key.expire_time, Some(expire));
    assert!(!key.disabled);
    assert!(key.revoke_time.is_none() && key.last_used_time.is_none());
    assert!(key.successor_id.is_empty());
    assert!(!key.etag.is_empty());
    assert!(key.create_time.is_some() && key.update_time.is_some());
    assert_eq!(uuid::Uuid::parse_str(&key.id).unwrap().get_version_num(), 7);
    assert_no_secret(&key, &secret);

    let got = app.get_key(&key.id).await.unwrap();
    assert_eq!(got, key, "GetApiKey returns what CreateApiKey returned");
    assert_no_secret(&got, &secret);
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(listed.api_keys, std::slice::from_ref(&key));
    assert_no_secret(&listed, &secret);

    // The secret works, and two keys never share one.
    assert_eq!(
        app.verify(&secret, &["crm:read"]).await.code(),
        pb::VerifyCode::Valid
    );
    let other = app
        .as_admin()
        .keys
        .create_api_key(new_key(&w.id))
        .await
        .inner()
        .unwrap();
    assert_secret_shape(&other.secret, "kp");
    assert_ne!(other.secret, secret);
    assert_ne!(other.api_key.unwrap().id, key.id);

    // A prefix from the request wins over the workspace's default.
    let custom = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            prefix: "sk9".into(),
            ..new_key(&w.id)
        })
        .await
        .inner()
        .unwrap();
    assert_secret_shape(&custom.secret, "sk9");
    let custom_key = custom.api_key.unwrap();
    assert_eq!(custom_key.prefix, "sk9");
    assert_eq!(
        custom_key.masked_key,
        format!("sk9_****{}", &custom.secret[custom.secret.len() - 4..])
    );
    assert_eq!(
        app.verify(&custom.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );

    // Missing keys and bad ids.
    assert_err(
        app.get_key(&uuid::Uuid::now_v7().to_string()).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let status = assert_err(
        app.get_key("nope").await,
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    assert_eq!(violated_fields(&status), ["id"]);
}

async fn create_uses_the_workspace_default_prefix(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app
        .as_admin()
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest {
            name: "atlas".into(),
            default_key_prefix: "atlas".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let created = app
        .as_admin()
        .keys
        .create_api_key(new_key(&w.id))
        .await
        .inner()
        .unwrap();
    assert_secret_shape(&created.secret, "atlas");
    let key = created.api_key.unwrap();
    assert_eq!(key.prefix, "atlas");
    assert_eq!(
        key.masked_key,
        format!("atlas_****{}", &created.secret[created.secret.len() - 4..])
    );
    let overridden = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            prefix: "x".into(),
            ..new_key(&w.id)
        })
        .await
        .inner()
        .unwrap();
    assert_secret_shape(&overridden.secret, "x");
    // Prefixes as other systems issue them, each joined by its own separator, verifying.
    for (prefix, masked) in [("sk-ol", "sk-ol-****"), ("sk_live", "sk_live_****")] {
        let created = app
            .as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                prefix: prefix.into(),
                ..new_key(&w.id)
            })
            .await
            .inner()
            .unwrap();
        assert_secret_shape(&created.secret, prefix);
        let key = created.api_key.unwrap();
        assert_eq!(
            key.masked_key,
            format!("{masked}{}", &created.secret[created.secret.len() - 4..])
        );
        assert_eq!(
            app.verify(&created.secret, &[]).await.code(),
            pb::VerifyCode::Valid,
            "{prefix}"
        );
    }
}

async fn create_validates_every_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;

    let everything_wrong = pb::CreateApiKeyRequest {
        workspace_id: "not-a-uuid".into(),
        name: "n".repeat(121),
        prefix: "Bad_Prefix".into(),
        scopes: strings(&["no-colon"]),
        owner_id: String::new(),
        metadata: (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect(),
        expire_time: Some(in_secs(-60)),
        request_id: "not-a-uuid".into(),
        ..Default::default()
    };
    let status = assert_err(
        app.as_admin()
            .keys
            .create_api_key(everything_wrong)
            .await
            .inner(),
        Code::InvalidArgument,
        "INVALID_ARGUMENT",
    );
    let fields = violated_fields(&status);
    for f in [
        "workspace_id",
        "name",
        "prefix",
        "scopes",
        "metadata",
        "expire_time",
        "request_id",
    ] {
        assert!(
            fields.contains(&f.to_string()),
            "{f} missing from {fields:?}"
        );
    }

    // One bad field at a time names exactly that field.
    let one_field_cases: Vec<(pb::CreateApiKeyRequest, &str)> = vec![
        (new_key("nope"), "workspace_id"),
        (new_key(""), "workspace_id"),
        (
            pb::CreateApiKeyRequest {
                name: "n".repeat(121),
                ..new_key(&w.id)
            },
            "name",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "Kp".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "1kp".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "k__p".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "a234567890123456789012345".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "kp-".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                prefix: "sk-ol_x".into(),
                ..new_key(&w.id)
            },
            "prefix",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&["crm"]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&["crm:"]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&["c*m:read"]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: strings(&[""]),
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                scopes: vec!["keyplane.api_keys:read".to_string(); 65],
                ..new_key(&w.id)
            },
            "scopes",
        ),
        (
            pb::CreateApiKeyRequest {
                metadata: (0..65)
                    .map(|i| (format!("k{i}"), "v".to_string()))
                    .collect(),
                ..new_key(&w.id)
            },
            "metadata",
        ),
        (
            pb::CreateApiKeyRequest {
                metadata: [("big".to_string(), "v".repeat(257))].into(),
                ..new_key(&w.id)
            },
            "metadata",
        ),
        (
            pb::CreateApiKeyRequest {
                expire_time: Some(in_secs(-1)),
                ..new_key(&w.id)
            },
            "expire_time",
        ),
        (
            pb::CreateApiKeyRequest {
                request_id: "not-a-uuid".into(),
                ..new_key(&w.id)
            },
            "request_id",
        ),
    ];
    for (request, field) in one_field_cases {
        let shown = format!("{request:?}");
        let status = assert_err(
            app.as_admin().keys.create_api_key(request).await.inner(),
            Code::InvalidArgument,
            "INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), [field], "{shown}");
    }
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert!(
        listed.api_keys.is_empty(),
        "no invalid request created a key"
    );

    // The limits themselves are accepted.
    let edge = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: w.id.clone(),
            name: "é".repeat(120),
            prefix: "a234567890123456".into(),
            scopes: vec!["keyplane.api_keys:read".to_string(); 64],
            metadata: (0..64)
                .map(|i| (format!("k{i}"), "v".repeat(256)))
                .collect(),
            expire_time: Some(in_secs(60)),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap();
    assert_secret_shape(&edge.secret, "a234567890123456");
    let key = edge.api_key.unwrap();
    assert_eq!(key.metadata.len(), 64);
    assert_eq!(
        key.scopes,
        ["keyplane.api_keys:read"],
        "duplicates collapse"
    );
}

async fn create_rejects_unknown_scopes_and_workspaces(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let other_ws = app.create_workspace("other").await;
    app.create_scope("crm:read", "").await;
    app.create_scope("erp:read", &other_ws.id).await;

    let status = assert_err(
        app.as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                scopes: strings(&["crm:read", "hr:read"]),
                ..new_key(&w.id)
            })
            .await
            .inner(),
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(status.message().contains("hr:read"), "{status:?}");
    let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
    let named = info.metadata.get("scopes").cloned().unwrap_or_default();
    assert!(named.contains("hr:read"), "{info:?}");
    assert!(
        !named.contains("crm:read"),
        "only unknown scopes are named: {info:?}"
    );
    assert_eq!(violated_fields(&status), ["scopes"]);

    // Another workspace's scope does not exist for a key of this workspace.
    let status = assert_err(
        app.as_admin()
            .keys
            .create_api_key(pb::CreateApiKeyRequest {
                scopes: strings(&["erp:read"]),
                ..new_key(&w.id)
            })
            .await
            .inner(),
        Code::InvalidArgument,
        "UNKNOWN_SCOPE",
    );
    assert!(status.message().contains("erp:read"), "{status:?}");
    // ... but does for a key of its own workspace.
    app.as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            scopes: strings(&["erp:read", "crm:read"]),
            ..new_key(&other_ws.id)
        })
        .await
        .inner()
        .unwrap();

    // A workspace that does not exist, or of another tenant.
    assert_err(
        app.as_admin()
            .keys
            .create_api_key(new_key(&uuid::Uuid::now_v7().to_string()))
            .await
            .inner(),
        Code::NotFound,
        "NOT_FOUND",
    );
    let stranger = stranger();
    assert_err(
        app.client(&stranger)
            .keys
            .create_api_key(new_key(&w.id))
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
    assert_eq!(
        listed.api_keys.len(),
        1,
        "only the valid request created a key"
    );
}

async fn create_is_idempotent_by_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let request = pb::CreateApiKeyRequest {
        request_id: uuid::Uuid::now_v7().to_string(),
        ..new_key(&w.id)
    };
    let first = app
        .as_admin()
        .keys
        .create_api_key(request.clone())
        .await
        .inner()
        .unwrap();
    assert!(!first.secret.is_empty());
    let retry = app
        .as_admin()
        .keys
        .create_api_key(request.clone())
        .await
        .inner()
        .unwrap();
    assert_eq!(
        retry.api_key, first.api_key,
        "the retry returns the same key"
    );
    assert!(retry.secret.is_empty(), "the retry carries no secret");
    let listed = app
        .as_admin()
        .keys
        .list_api_keys(pb::ListApiKeysRequest::default())
        .await
        .inner()
        .unwrap();
    assert_eq!(listed.api_keys.len(), 1, "the retry created nothing");
    // The first secret still works.
    assert_eq!(
        app.verify(&first.secret, &[]).await.code(),
        pb::VerifyCode::Valid
    );
    // Another request id creates another key.
    let second = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            request_id: uuid::Uuid::now_v7().to_string(),
            ..request.clone()
        })
        .await
        .inner()
        .unwrap();
    assert!(!second.secret.is_empty());
    assert_ne!(
        second.api_key.unwrap().id,
        first.api_key.clone().unwrap().id
    );

    // Request ids are per tenant: another tenant reusing one gets its own key.
    let stranger = stranger();
    let their_ws = app
        .client(&stranger)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let theirs = app
        .client(&stranger)
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: their_ws.id.clone(),
            ..request
        })
        .await
        .inner()
        .unwrap();
    assert!(!theirs.secret.is_empty(), "a new key, with its secret");
    let their_key = theirs.api_key.unwrap();
    assert_ne!(their_key.id, first.api_key.unwrap().id);
    assert_eq!(their_key.workspace_id, their_ws.id);
}
