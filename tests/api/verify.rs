//! VerifyApiKey (SPEC §3.4): every outcome code, in the specified order, scope matching,
//! what a response carries, tenancy of verification and the caller's own scope.
use std::time::Duration;

use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    malformed_keys_are_an_answer_not_an_error,
    every_single_character_change_is_malformed,
    unknown_keys_are_not_found,
    checks_run_in_the_specified_order,
    a_rotated_key_past_its_grace_is_expired_before_disabled,
    insufficient_scopes_lists_exactly_the_missing_ones,
    wildcards_satisfy_any_action_of_their_resource,
    invalid_required_scopes_are_an_error,
    found_keys_carry_their_identity_but_never_the_secret,
    platform_tokens_verify_any_tenant,
    callers_need_the_verify_scope,
);

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Asserts an outcome that names no key: MALFORMED or NOT_FOUND.
#[track_caller]
fn assert_keyless(v: &pb::VerifyApiKeyResponse, code: pb::VerifyCode, what: &str) {
    assert_eq!(v.code(), code, "{what}: {v:?}");
    assert!(!v.valid, "{what}");
    assert!(v.api_key.is_none(), "{what}: no api_key for {code:?}");
    assert!(v.tenant_id.is_empty(), "{what}: no tenant_id for {code:?}");
    assert!(
        v.workspace_id.is_empty(),
        "{what}: no workspace_id for {code:?}"
    );
    assert!(v.missing_scopes.is_empty(), "{what}");
}

/// Asserts an outcome about a found key: the key and where it lives are reported.
#[track_caller]
fn assert_found(v: &pb::VerifyApiKeyResponse, code: pb::VerifyCode, key: &pb::ApiKey) {
    assert_eq!(v.code(), code, "{v:?}");
    assert_eq!(v.valid, code == pb::VerifyCode::Valid, "{v:?}");
    let found = v.api_key.as_ref().expect("api_key for a found key");
    assert_eq!(found.id, key.id);
    assert_eq!(v.tenant_id, key.tenant_id);
    assert_eq!(v.workspace_id, key.workspace_id);
}

async fn malformed_keys_are_an_answer_not_an_error(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (_, secret) = app.create_key(&w.id, &[]).await;
    let body = &secret[3..];
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);

    let mut non_base62 = secret.clone();
    non_base62.replace_range(10..11, "-");
    let mut non_ascii = secret.clone();
    non_ascii.replace_range(10..11, "é");
    let cases: Vec<(String, &str)> = vec![
        (String::new(), "empty"),
        (body.to_string(), "no underscore"),
        (secret.replace('_', ""), "underscore removed"),
        (format!("KP_{body}"), "upper-case prefix"),
        (format!("1p_{body}"), "prefix starting with a digit"),
        (format!("_{body}"), "empty prefix"),
        (format!("k-p_{body}"), "prefix outside [a-z0-9]"),
        (
            format!("abcdefghijklmnopqrstuvwxy_{body}"),
            "25-character prefix",
        ),
        (format!("sk-ol_{body}"), "a prefix with - joined by _"),
        (format!("sk_live-{body}"), "a prefix with _ joined by -"),
        (format!("kp-{body}"), "the other separator"),
        (
            secret[..secret.len() - 1].to_string(),
            "one character short",
        ),
        (format!("{secret}0"), "one character long"),
        ("kp_".to_string(), "no body"),
        ("kp_short".to_string(), "short body"),
        (non_base62, "a character outside base62"),
        (non_ascii, "a non-ASCII character"),
        (format!(" {secret}"), "leading space"),
        (format!("{secret}\n"), "trailing newline"),
        (format!("Bearer {secret}"), "with a scheme"),
        ("x".repeat(10 * 1024), "10 KB of garbage"),
        ("_".repeat(10 * 1024), "10 KB of underscores"),
        (format!("kp_{}", "é".repeat(5000)), "10 KB of non-ASCII"),
    ];
    for (key, what) in cases {
        let v = app.verify(&key, &[]).await;
        assert_keyless(&v, pb::VerifyCode::Malformed, what);
        // Required scopes do not change a malformed answer.
        let v = app.verify(&key, &["crm:read"]).await;
        assert_keyless(&v, pb::VerifyCode::Malformed, what);
    }
}

async fn every_single_character_change_is_malformed(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (_, secret) = app.create_key(&w.id, &[]).await;
    let original = secret.as_bytes();
    let mut keys = app.as_admin().keys;
    let mut tried = 0;
    for i in 0..original.len() {
        for &c in BASE62 {
            if c == original[i] {
                continue;
            }
            let mut changed = original.to_vec();
            changed[i] = c;
            let changed = String::from_utf8(changed).unwrap();
            let v = keys
                .verify_api_key(pb::VerifyApiKeyRequest {
                    key: changed.clone(),
                    required_scopes: Vec::new(),
                    cost: None,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_keyless(
                &v,
                pb::VerifyCode::Malformed,
                &format!("{changed} (position {i})"),
            );
            tried += 1;
        }
    }
    assert!(tried >= 52 * 60, "{tried}");
    // The original still verifies: the loop really compared against a live key.
    assert_eq!(app.verify(&secret, &[]).await.code(), pb::VerifyCode::Valid);
}

async fn unknown_keys_are_not_found(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    app.as_admin()
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest { id: key.id.clone() })
        .await
        .unwrap();
    // Well-formed (the checksum is right) but no longer issued.
    let v = app.verify(&secret, &[]).await;
    assert_keyless(&v, pb::VerifyCode::NotFound, "deleted key");
    let v = app.verify(&secret, &["crm:read"]).await;
    assert_keyless(&v, pb::VerifyCode::NotFound, "deleted key with scopes");

    // A key of another tenant is answered exactly like a key that does not exist.
    let other_tenant = uuid::Uuid::now_v7();
    let other = Cred::Bearer(token(Some(other_tenant), &all_builtin()));
    let their_ws = app
        .client(&other)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .unwrap()
        .into_inner()
        .workspace
        .unwrap();
    let theirs = app
        .client(&other)
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: their_ws.id,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let v = app.verify(&theirs.secret, &[]).await;
    assert_keyless(&v, pb::VerifyCode::NotFound, "another tenant's key");
    assert_no_secret(&v, &theirs.secret);
    // Its own tenant sees it.
    let v = app.client(&other).verify(&theirs.secret, &[]).await;
    assert_eq!(v.code(), pb::VerifyCode::Valid);
    assert_eq!(v.tenant_id, other_tenant.to_string());
}

async fn checks_run_in_the_specified_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: w.id.clone(),
            scopes: strings(&["crm:read"]),
            expire_time: Some(in_secs(3)),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.api_key.unwrap();
    let secret = created.secret;
    let need = ["crm:read", "erp:read"];

    assert_found(
        &app.verify(&secret, &["crm:read"]).await,
        pb::VerifyCode::Valid,
        &key,
    );
    let v = app.verify(&secret, &need).await;
    assert_found(&v, pb::VerifyCode::InsufficientScopes, &key);
    assert_eq!(v.missing_scopes, ["erp:read"]);

    // Disabled beats insufficient scopes.
    app.disable_key(&key.id).await;
    let v = app.verify(&secret, &need).await;
    assert_found(&v, pb::VerifyCode::Disabled, &key);
    assert!(v.api_key.as_ref().unwrap().disabled);
    assert_found(
        &app.verify(&secret, &[]).await,
        pb::VerifyCode::Disabled,
        &key,
    );

    // Expired beats disabled.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let v = app.verify(&secret, &need).await;
    assert_found(&v, pb::VerifyCode::Expired, &key);
    assert_found(
        &app.verify(&secret, &[]).await,
        pb::VerifyCode::Expired,
        &key,
    );

    // Revoked beats expired.
    app.revoke_key(&key.id).await;
    let v = app.verify(&secret, &need).await;
    assert_found(&v, pb::VerifyCode::Revoked, &key);
    assert!(v.api_key.as_ref().unwrap().revoke_time.is_some());
    assert_found(
        &app.verify(&secret, &[]).await,
        pb::VerifyCode::Revoked,
        &key,
    );

    // Not found beats everything about the key; malformed beats not found.
    app.as_admin()
        .keys
        .delete_api_key(pb::DeleteApiKeyRequest { id: key.id.clone() })
        .await
        .unwrap();
    assert_keyless(
        &app.verify(&secret, &need).await,
        pb::VerifyCode::NotFound,
        "deleted",
    );
    let mut typo = secret.clone().into_bytes();
    typo[5] = if typo[5] == b'a' { b'b' } else { b'a' };
    assert_keyless(
        &app.verify(&String::from_utf8(typo).unwrap(), &need).await,
        pb::VerifyCode::Malformed,
        "typo of a deleted key",
    );
}

async fn a_rotated_key_past_its_grace_is_expired_before_disabled(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (old, old_secret) = app.create_key(&w.id, &[]).await;
    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: old.id.clone(),
            grace_period: Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_found(
        &app.verify(&old_secret, &[]).await,
        pb::VerifyCode::Valid,
        &old,
    );
    app.disable_key(&old.id).await;
    assert_found(
        &app.verify(&old_secret, &[]).await,
        pb::VerifyCode::Disabled,
        &old,
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_found(
        &app.verify(&old_secret, &[]).await,
        pb::VerifyCode::Expired,
        &old,
    );
    let new = rotated.api_key.unwrap();
    assert_found(
        &app.verify(&rotated.secret, &[]).await,
        pb::VerifyCode::Valid,
        &new,
    );
}

async fn insufficient_scopes_lists_exactly_the_missing_ones(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    for s in ["crm:read", "erp:*", "hr:read"] {
        app.create_scope(s, "").await;
    }
    let (key, secret) = app
        .create_key(&w.id, &["crm:read", "erp:*", "keyplane.api_keys:read"])
        .await;
    let v = app
        .verify(
            &secret,
            &[
                "crm:read",
                "crm:write",
                "erp:delete",
                "hr:read",
                "keyplane.api_keys:read",
                "keyplane.api_keys:write",
            ],
        )
        .await;
    assert_found(&v, pb::VerifyCode::InsufficientScopes, &key);
    assert!(!v.valid);
    assert_eq!(
        v.missing_scopes,
        ["crm:write", "hr:read", "keyplane.api_keys:write"],
        "exactly the missing scopes, in request order"
    );
    let v = app.verify(&secret, &["hr:read"]).await;
    assert_found(&v, pb::VerifyCode::InsufficientScopes, &key);
    assert_eq!(v.missing_scopes, ["hr:read"]);
    // Nothing missing: valid, and nothing listed.
    let v = app
        .verify(
            &secret,
            &["crm:read", "erp:delete", "keyplane.api_keys:read"],
        )
        .await;
    assert_found(&v, pb::VerifyCode::Valid, &key);
    assert!(v.valid);
    assert!(v.missing_scopes.is_empty());
}

async fn wildcards_satisfy_any_action_of_their_resource(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    for s in ["crm:*", "hr:read"] {
        app.create_scope(s, "").await;
    }
    let (key, secret) = app.create_key(&w.id, &["crm:*", "hr:read"]).await;
    for required in [
        &[][..],
        &["crm:read"][..],
        &["crm:write"][..],
        &["crm:read", "crm:write"][..],
        &["crm:*"][..],
        &["crm:delete.all", "hr:read"][..],
    ] {
        let v = app.verify(&secret, required).await;
        assert_found(&v, pb::VerifyCode::Valid, &key);
        assert!(v.missing_scopes.is_empty(), "{required:?}");
    }
    for (required, missing) in [
        (&["erp:read"][..], &["erp:read"][..]),
        (&["crm:read", "erp:read"][..], &["erp:read"][..]),
        // `crm:*` grants no other resource, not even one that starts alike.
        (&["crm.contacts:read"][..], &["crm.contacts:read"][..]),
        (&["crmx:read"][..], &["crmx:read"][..]),
        // A granted action satisfies only itself.
        (&["hr:write"][..], &["hr:write"][..]),
        (&["hr:*"][..], &["hr:*"][..]),
    ] {
        let v = app.verify(&secret, required).await;
        assert_found(&v, pb::VerifyCode::InsufficientScopes, &key);
        assert_eq!(v.missing_scopes, missing, "{required:?}");
    }
}

async fn invalid_required_scopes_are_an_error(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (_, secret) = app.create_key(&w.id, &[]).await;
    let too_many: Vec<String> = (0..65).map(|i| format!("r{i}:read")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    for required in [
        &["crm"][..],
        &["crm:"][..],
        &[":read"][..],
        &[""][..],
        &["c*m:read"][..],
        &["crm:read", "not a scope"][..],
        &too_many[..],
    ] {
        for key in [secret.as_str(), "garbage"] {
            let status = assert_err(
                app.as_admin().try_verify(key, required).await,
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            );
            assert!(
                violated_fields(&status)
                    .iter()
                    .all(|f| f == "required_scopes"),
                "{status:?}"
            );
            assert!(!violated_fields(&status).is_empty());
            assert!(!status.message().contains(&secret[3..]), "{status:?}");
        }
    }
    // 64 required scopes are fine.
    let v = app.verify(&secret, &too_many[..64]).await;
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes);
    assert_eq!(v.missing_scopes.len(), 64);
}

async fn found_keys_carry_their_identity_but_never_the_secret(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    app.create_scope("crm:read", "").await;
    let created = app
        .as_admin()
        .keys
        .create_api_key(pb::CreateApiKeyRequest {
            workspace_id: w.id.clone(),
            name: "billing".into(),
            scopes: strings(&["crm:read"]),
            owner_id: "cust_7".into(),
            metadata: [("plan".to_string(), "pro".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let key = created.api_key.unwrap();
    let secret = created.secret;

    let v = app.verify(&secret, &["crm:read"]).await;
    assert_found(&v, pb::VerifyCode::Valid, &key);
    assert!(v.valid);
    assert_eq!(v.tenant_id, app.tenant.to_string());
    assert_eq!(v.workspace_id, w.id);
    let found = v.api_key.clone().unwrap();
    assert_eq!(found.name, "billing");
    assert_eq!(found.owner_id, "cust_7");
    assert_eq!(found.scopes, ["crm:read"]);
    assert_eq!(
        found.metadata.get("plan").map(String::as_str),
        Some("pro"),
        "verification returns the metadata"
    );
    assert_eq!(found.masked_key, key.masked_key);
    assert_eq!(found.prefix, "kp");
    assert_no_secret(&v, &secret);

    let v = app.verify(&secret, &["erp:read"]).await;
    assert_found(&v, pb::VerifyCode::InsufficientScopes, &key);
    assert_no_secret(&v, &secret);
    app.revoke_key(&key.id).await;
    let v = app.verify(&secret, &[]).await;
    assert_found(&v, pb::VerifyCode::Revoked, &key);
    assert_eq!(v.api_key.as_ref().unwrap().name, "billing");
    assert_no_secret(&v, &secret);
}

async fn platform_tokens_verify_any_tenant(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;
    let platform = Cred::Bearer(token(None, &["keyplane.api_keys:verify"]));

    let v = app.client(&platform).verify(&secret, &[]).await;
    assert_found(&v, pb::VerifyCode::Valid, &key);
    assert_eq!(v.tenant_id, app.tenant.to_string());

    let tenant = app.tenant.to_string();
    let v = app
        .client(&platform)
        .tenant(&tenant)
        .verify(&secret, &[])
        .await;
    assert_found(&v, pb::VerifyCode::Valid, &key);

    let elsewhere = uuid::Uuid::now_v7().to_string();
    let v = app
        .client(&platform)
        .tenant(&elsewhere)
        .verify(&secret, &[])
        .await;
    assert_keyless(
        &v,
        pb::VerifyCode::NotFound,
        "platform token for another tenant",
    );

    // Without x-tenant-id, every outcome is still reported for any tenant's key.
    let v = app.client(&platform).verify(&secret, &["crm:read"]).await;
    assert_found(&v, pb::VerifyCode::InsufficientScopes, &key);
    let v = app.client(&platform).verify("kp_nope", &[]).await;
    assert_keyless(&v, pb::VerifyCode::Malformed, "platform, malformed");

    // A tenant token of another tenant does not see the key; sending that tenant's header
    // does not help either.
    let stranger = stranger();
    let v = app.client(&stranger).verify(&secret, &[]).await;
    assert_keyless(
        &v,
        pb::VerifyCode::NotFound,
        "tenant token of another tenant",
    );
    assert_err(
        app.client(&stranger)
            .tenant(&tenant)
            .try_verify(&secret, &[])
            .await,
        Code::PermissionDenied,
        "TENANT_MISMATCH",
    );
}

async fn callers_need_the_verify_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.create_workspace("w").await;
    let (key, secret) = app.create_key(&w.id, &[]).await;

    let without = Cred::Bearer(token(
        Some(app.tenant),
        &[
            "keyplane.api_keys:read",
            "keyplane.api_keys:write",
            "keyplane.workspaces:write",
        ],
    ));
    for candidate in [secret.as_str(), "garbage"] {
        let status = assert_err(
            app.client(&without).try_verify(candidate, &[]).await,
            Code::PermissionDenied,
            "MISSING_SCOPE",
        );
        let info = tonic_types::StatusExt::get_details_error_info(&status).unwrap();
        assert_eq!(
            info.metadata.get("scope").map(String::as_str),
            Some("keyplane.api_keys:verify"),
            "{info:?}"
        );
        assert!(!status.message().contains(&secret[3..]));
    }
    let platform_without = Cred::Bearer(token(None, &["keyplane.api_keys:read"]));
    assert_err(
        app.client(&platform_without).try_verify(&secret, &[]).await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );

    // `keyplane.api_keys:*` satisfies `keyplane.api_keys:verify`.
    let wildcard = Cred::Bearer(token(Some(app.tenant), &["keyplane.api_keys:*"]));
    let v = app.client(&wildcard).verify(&secret, &[]).await;
    assert_found(&v, pb::VerifyCode::Valid, &key);
    let narrow = Cred::Bearer(token(Some(app.tenant), &["keyplane.api_keys:verify"]));
    let v = app.client(&narrow).verify(&secret, &[]).await;
    assert_found(&v, pb::VerifyCode::Valid, &key);

    // Admin keys (x-api-key) follow the same rule.
    let (_, weak_admin) = app.create_key(&w.id, &["keyplane.api_keys:read"]).await;
    assert_err(
        app.client(&Cred::ApiKey(weak_admin))
            .try_verify(&secret, &[])
            .await,
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    let (_, verifier) = app.create_key(&w.id, &["keyplane.api_keys:verify"]).await;
    let v = app
        .client(&Cred::ApiKey(verifier))
        .verify(&secret, &[])
        .await;
    assert_found(&v, pb::VerifyCode::Valid, &key);

    // No credential at all.
    assert_err(
        app.client(&Cred::None).try_verify(&secret, &[]).await,
        Code::Unauthenticated,
        "CREDENTIALS_MISSING",
    );
}
