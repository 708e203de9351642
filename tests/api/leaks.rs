//! The secret-leak scanner of the test kit (`keyplane_testkit::leaks`): what it recognises,
//! and that a leak fails the test that leaked it and no other.
use keyplane::domain::key::{ApiKeySecret, KeyPrefix};

use keyplane_testkit::*;

fn a_secret() -> String {
    ApiKeySecret::generate(&KeyPrefix::default_prefix())
        .unwrap()
        .expose()
        .to_owned()
}

#[test]
fn the_log_scanner_recognises_secrets() {
    let key = keyplane::domain::key::ApiKeySecret::generate(
        &keyplane::domain::key::KeyPrefix::default_prefix(),
    )
    .unwrap();
    let line = format!("DEBUG request x-api-key={} done", key.expose());
    assert!(find_secret(&line).is_some());
    let jwt = token(None, &["a:b"]);
    assert!(find_secret(&format!("authorization: Bearer {jwt}")).is_some());
    assert!(find_secret(&format!("secret is {JWT_SECRET}!")).is_some());
    assert!(find_secret(&format!("masked {}", key.masked())).is_none());
    assert!(
        find_secret(
            "tenant_id=0193a0c4-0000-7000-8000-000000000001 api_keys:write keyplane.api_keys"
        )
        .is_none()
    );
}

#[test]
fn a_leak_is_filed_under_the_test_that_logged_it() {
    capture_debug_logs();
    let secret = a_secret();
    let (leaker, bystander) = (new_test_id(), new_test_id());
    as_test(leaker, || tracing::info!("oops: {secret}"));
    let mentions = |leaks: Vec<String>| leaks.iter().filter(|l| l.contains(&secret)).count();
    assert_eq!(
        mentions(take_leaks(bystander)),
        0,
        "not another test's leak"
    );
    assert_eq!(mentions(take_leaks(leaker)), 1, "the leaker's own");
    assert_eq!(mentions(take_leaks(leaker)), 0, "reported once");
}

#[test]
fn run_test_fails_a_test_whose_runtime_logged_a_secret() {
    let secret = a_secret();
    let leaked = secret.clone();
    // Logged from a task on a worker thread of the test's runtime, as a server would.
    let outcome = std::panic::catch_unwind(|| {
        run_test(async move {
            tokio::spawn(async move { tracing::info!("oops: {leaked}") })
                .await
                .unwrap();
        })
    });
    let panic = outcome.expect_err("the leak fails the test");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("secrets in the logs"), "{message}");
    assert!(message.contains(&secret), "{message}");
    // A test that leaks nothing passes.
    run_test(async { tracing::info!("nothing secret here") });
}

#[test]
fn the_audit_scanner_flags_a_secret_or_a_value_in_an_audit_row() {
    use keyplane::storage::entity::audit_event;
    use sea_orm::{ActiveValue::Set, EntityTrait};
    run_test(async {
        let app = spawn_app(Backend::Sqlite).await;
        app.create_workspace("w").await;
        assert!(audit_leaks(&app.db.url).is_empty(), "a clean log");
        let db = sea_orm::Database::connect(&app.db.url).await.unwrap();
        let row = audit_event::Entity::find().one(&db).await.unwrap().unwrap();
        let secret = a_secret();
        let planted = audit_event::ActiveModel {
            id: Set(row.id),
            request_id: Set(format!("leaked {secret}")),
            changed_fields: Set(serde_json::json!(["name", "name=Project Atlas"])),
            ..Default::default()
        };
        audit_event::Entity::update(planted)
            .exec(&db)
            .await
            .unwrap();
        let leaks = audit_leaks(&app.db.url);
        assert_eq!(leaks.len(), 2, "{leaks:?}");
        assert!(leaks[0].contains("an API key ending"), "{leaks:?}");
        assert!(leaks[1].contains("name=Project Atlas"), "{leaks:?}");
        // Put it back, or dropping the app would fail this test.
        let clean = audit_event::ActiveModel {
            id: Set(row.id),
            request_id: Set(row.request_id.clone()),
            changed_fields: Set(row.changed_fields.clone()),
            ..Default::default()
        };
        audit_event::Entity::update(clean).exec(&db).await.unwrap();
    });
}
