//! The claims of bearer tokens: types of `exp`/`nbf`, required claims, `tenant_id`,
//! `scope` and `scp`, and the issuer and audience when configured.

use keyplane::proto as pb;
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

use super::*;

on_both_backends!(
    exp_and_nbf_of_the_wrong_type_are_rejected,
    required_claims_must_be_present_and_well_typed,
    tenant_id_and_scope_claims_are_validated,
    scp_array_works_like_scope,
    issuer_and_audience_are_checked_when_configured,
);

async fn exp_and_nbf_of_the_wrong_type_are_rejected(backend: Backend) {
    let app = spawn_app(backend).await;
    let tenant = app.tenant;
    let far = unix_now() + 3600;
    let scope = WS_READ;
    let payload = |exp: &str, extra: &str| {
        format!(r#"{{"sub":"tester","exp":{exp},"tenant_id":"{tenant}","scope":"{scope}"{extra}}}"#)
    };
    // The builder makes good tokens: an integer exp is accepted.
    app.client(&bearer(hs256_payload(&payload(&far.to_string(), ""))))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("a well-formed hand-built token");

    let bad_exps = [
        format!("\"{far}\""),
        "\"9999999999\"".to_string(),
        "1e12".to_string(),
        "99999999999.5".to_string(),
        format!("{far}.0"),
        "184467440737095516160".to_string(),
        "1e400".to_string(),
        "true".to_string(),
        "null".to_string(),
        "[9999999999]".to_string(),
        "{}".to_string(),
    ];
    for exp in &bad_exps {
        assert_token_invalid(
            app.client(&bearer(hs256_payload(&payload(exp, ""))))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            &format!("exp = {exp}"),
        );
    }
    // nbf is checked when present: a wrong type is a rejection, never a skipped check.
    for nbf in [
        format!("\"{far}\""),
        "\"0\"".to_string(),
        "1.5".to_string(),
        "true".to_string(),
        "184467440737095516160".to_string(),
    ] {
        assert_token_invalid(
            app.client(&bearer(hs256_payload(&payload(
                &far.to_string(),
                &format!(r#","nbf":{nbf}"#),
            ))))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
            &format!("nbf = {nbf}"),
        );
    }
}

async fn required_claims_must_be_present_and_well_typed(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = claims(Some(app.tenant), &[WS_READ]);
    let without = |name: &str| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove(name);
        hs256(&c)
    };
    let replaced = |name: &str, value: Value| {
        let mut c = base.clone();
        c[name] = value;
        hs256(&c)
    };
    app.client(&bearer(hs256(&base)))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("control");
    let cases = [
        ("missing sub", without("sub")),
        ("missing exp", without("exp")),
        ("sub null", replaced("sub", Value::Null)),
        ("sub a number", replaced("sub", json!(42))),
        ("sub an object", replaced("sub", json!({"id": "tester"}))),
        ("exp null", replaced("exp", Value::Null)),
        ("payload an array", hs256(&json!([base.clone()]))),
        ("payload a string", hs256(&json!("tester"))),
    ];
    for (what, token) in cases {
        assert_token_invalid(
            app.client(&bearer(&token))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            what,
        );
        assert_token_invalid(
            app.client(&bearer(&token)).try_verify("kp_x", &[]).await,
            what,
        );
    }
}

async fn tenant_id_and_scope_claims_are_validated(backend: Backend) {
    let app = spawn_app(backend).await;
    let base = claims(Some(app.tenant), &[WS_READ]);
    let replaced = |name: &str, value: Value| {
        let mut c = base.clone();
        c[name] = value;
        hs256(&c)
    };
    let cases = [
        ("tenant_id not a UUID", replaced("tenant_id", json!("acme"))),
        ("tenant_id empty", replaced("tenant_id", json!(""))),
        (
            "tenant_id a UUID with junk",
            replaced("tenant_id", json!(format!("{}x", app.tenant))),
        ),
        ("tenant_id a number", replaced("tenant_id", json!(12345))),
        (
            "tenant_id an array",
            replaced("tenant_id", json!([app.tenant.to_string()])),
        ),
        ("scope a number", replaced("scope", json!(42))),
        ("scope an array", replaced("scope", json!([WS_READ]))),
        ("scope an object", replaced("scope", json!({"s": WS_READ}))),
        ("scp a number", replaced("scp", json!(7))),
        ("scp an array of numbers", replaced("scp", json!([1, 2]))),
    ];
    for (what, token) in cases {
        assert_token_invalid(
            app.client(&bearer(&token))
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            what,
        );
        assert_token_invalid(
            app.client(&bearer(&token))
                .workspaces
                .get_workspace(pb::GetWorkspaceRequest {
                    id: Uuid::now_v7().to_string(),
                })
                .await
                .resource(),
            what,
        );
    }
    // A tenant_id of the wrong type never falls back to a platform token.
    let mut c = claims(None, &[WS_READ]);
    c["tenant_id"] = json!(12345);
    assert_token_invalid(
        app.client(&bearer(hs256(&c)))
            .tenant(Uuid::now_v7().to_string())
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        "tenant_id a number, with x-tenant-id",
    );
}

async fn scp_array_works_like_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let scp = |scopes: &[&str]| {
        let mut c = claims(Some(app.tenant), &[]);
        c.as_object_mut().unwrap().remove("scope");
        c["scp"] = json!(scopes);
        bearer(hs256(&c))
    };

    let reader = scp(&[WS_READ]);
    let seen = app
        .client(&reader)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("scp grants read");
    assert_eq!(ids(&seen.workspaces), vec![ws.id.clone()]);
    app.client(&reader)
        .workspaces
        .get_workspace(pb::GetWorkspaceRequest { id: ws.id.clone() })
        .await
        .resource()
        .expect("scp grants read");
    let status = assert_err(
        app.client(&reader)
            .workspaces
            .create_workspace(pb::CreateWorkspaceRequest::default())
            .await
            .resource(),
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    assert_eq!(
        status.get_details_error_info().unwrap().metadata["scope"],
        WS_WRITE
    );

    let writer = scp(&[WS_READ, WS_WRITE]);
    let made = app
        .client(&writer)
        .workspaces
        .create_workspace(pb::CreateWorkspaceRequest::default())
        .await
        .resource()
        .expect("scp grants write");
    assert_eq!(made.tenant_id, app.tenant.to_string());

    // An empty scp grants nothing.
    assert_err(
        app.client(&scp(&[]))
            .workspaces
            .list_workspaces(pb::ListWorkspacesRequest::default())
            .await
            .inner(),
        Code::PermissionDenied,
        "MISSING_SCOPE",
    );
    // scope and scp together: each contributes.
    let mut both = claims(Some(app.tenant), &[WS_READ]);
    both["scp"] = json!([VERIFY]);
    let both = bearer(hs256(&both));
    app.client(&both)
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("read from scope");
    app.client(&both)
        .try_verify("kp_x", &[])
        .await
        .expect("verify from scp");
}

async fn issuer_and_audience_are_checked_when_configured(backend: Backend) {
    let app = spawn_with_jwt(backend, |jwt| {
        jwt.issuer = Some("https://issuer.test".into());
        jwt.audience = Some("keyplane".into());
    })
    .await;
    let with = |iss: Option<Value>, aud: Option<Value>| {
        let mut c = claims(Some(app.tenant), &[WS_READ]);
        if let Some(iss) = iss {
            c["iss"] = iss;
        }
        if let Some(aud) = aud {
            c["aud"] = aud;
        }
        bearer(hs256(&c))
    };
    let iss = || Some(json!("https://issuer.test"));
    let aud = || Some(json!("keyplane"));

    app.client(&with(iss(), aud()))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("the configured issuer and audience");
    app.client(&with(iss(), Some(json!(["other", "keyplane"]))))
        .workspaces
        .list_workspaces(pb::ListWorkspacesRequest::default())
        .await
        .inner()
        .expect("an audience array naming keyplane");

    let cases = [
        (
            "wrong issuer",
            with(Some(json!("https://evil.test")), aud()),
        ),
        (
            "issuer with a trailing slash",
            with(Some(json!("https://issuer.test/")), aud()),
        ),
        (
            "wrong audience",
            with(iss(), Some(json!("keyplane-staging"))),
        ),
        (
            "audience array without keyplane",
            with(iss(), Some(json!(["a", "b"]))),
        ),
        ("missing issuer", with(None, aud())),
        ("missing audience", with(iss(), None)),
        ("missing both", with(None, None)),
        ("issuer a number", with(Some(json!(1)), aud())),
        ("audience a number", with(iss(), Some(json!(1)))),
        ("issuer null", with(Some(Value::Null), aud())),
    ];
    for (what, cred) in &cases {
        assert_token_invalid(
            app.client(cred)
                .workspaces
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await
                .inner(),
            what,
        );
        assert_token_invalid(app.client(cred).try_verify("kp_x", &[]).await, what);
    }
}
