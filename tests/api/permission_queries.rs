//! Permission queries (SPEC §3.4) through VerifyApiKey: a query that holds, one that does
//! not (its missing terms listed), a malformed one (INVALID_ARGUMENT with the position), and
//! the query together with required scopes.
use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(permission_queries_decide_with_the_required_scopes);

async fn verify(
    app: &TestApp,
    key: &str,
    required: &[&str],
    query: &str,
) -> Result<pb::VerifyApiKeyResponse, tonic::Status> {
    app.as_admin()
        .keys
        .verify_api_key(pb::VerifyApiKeyRequest {
            key: key.into(),
            required_scopes: strings(required),
            permission_query: query.into(),
            ..Default::default()
        })
        .await
        .inner()
}

async fn permission_queries_decide_with_the_required_scopes(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    for s in [
        "crm:read",
        "crm:write",
        "billing:*",
        "billing:pay",
        "erp:read",
    ] {
        app.create_scope(s, &ws.id).await;
    }
    let (_, secret) = app.create_key(&ws.id, &["crm:read", "billing:*"]).await;
    let code = |v: Result<pb::VerifyApiKeyResponse, tonic::Status>| v.unwrap().code();

    for query in [
        "crm:read",
        "crm:read AND (crm:write OR billing:pay)",
        "crm:write OR crm:read",
        "(((crm:read)))",
        "erp:read OR billing:refund",
        "crm:read and billing:x or erp:read",
    ] {
        assert_eq!(
            code(verify(&app, &secret, &[], query).await),
            pb::VerifyCode::Valid,
            "{query}"
        );
    }
    let v = verify(&app, &secret, &[], "crm:read AND (crm:write OR erp:read)")
        .await
        .unwrap();
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes);
    assert_eq!(v.missing_scopes, strings(&["crm:write", "erp:read"]));
    assert!(!v.valid);

    // Both must hold: the query holds, a required scope does not.
    let v = verify(&app, &secret, &["erp:read"], "crm:read")
        .await
        .unwrap();
    assert_eq!(v.code(), pb::VerifyCode::InsufficientScopes);
    assert_eq!(v.missing_scopes, strings(&["erp:read"]));

    for (query, position) in [
        ("crm:read AND", "12"),
        ("(crm:read", "9"),
        ("crm:read crm:write", "9"),
        ("crm:read OR not-a-scope", "12"),
        (") crm:read", "0"),
    ] {
        let status = verify(&app, &secret, &[], query).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{query}");
        assert_eq!(violated_fields(&status), ["permission_query"], "{query}");
        assert!(
            status.message().contains(&format!("at {position}")),
            "{query}: {}",
            status.message()
        );
    }
    let too_many = vec!["crm:read"; 65].join(" OR ");
    assert_invalid(
        verify(&app, &secret, &[], &too_many).await,
        &["permission_query"],
        "65 terms",
    );
    let too_deep = format!("{}crm:read{}", "(".repeat(9), ")".repeat(9));
    assert_invalid(
        verify(&app, &secret, &[], &too_deep).await,
        &["permission_query"],
        "9 levels",
    );
    let deep_enough = format!("{}crm:read{}", "(".repeat(8), ")".repeat(8));
    assert_eq!(
        code(verify(&app, &secret, &[], &deep_enough).await),
        pb::VerifyCode::Valid
    );
}
