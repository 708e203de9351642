//! The secret-leak scanner of the harness (`helpers.rs`): what it recognises, and that a
//! leak fails the test that leaked it and no other.
use keyplane::domain::key::{ApiKeySecret, KeyPrefix};

use crate::helpers::*;

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
