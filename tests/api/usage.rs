//! Usage controls on one replica (SQLite, and PostgreSQL when configured): credits spent
//! exactly, cost, rate limits, owner-shared budgets, refills, adjustments, rotation,
//! validation. The multi-replica bounds are in tests/usage_replicas.rs.
use std::time::Duration;

use futures::future::join_all;
use keyplane::proto as pb;
use tonic::Code;

use keyplane_testkit::*;

on_both_backends!(
    credits_are_spent_exactly_and_read_back,
    cost_zero_spends_nothing_and_a_failed_check_spends_nothing,
    rate_limits_admit_their_limit_and_spend_no_credits_when_refusing,
    owner_shared_limits_draw_from_one_budget,
    adjusting_credits_during_spending_loses_no_increment,
    retried_adjustments_apply_once,
    updates_set_and_clear_credits_and_limits,
    rotation_carries_limits_and_credits_and_the_predecessor_stops_spending,
    usage_settings_are_validated_field_by_field,
    refill_sets_the_balance_at_its_interval,
);

/// A period whose windows are long enough that no test straddles a boundary by chance.
const LONG: i64 = 30 * 24 * 3600;

async fn verify_cost(app: &TestApp, secret: &str, cost: Option<i32>) -> pb::VerifyApiKeyResponse {
    app.as_admin()
        .keys
        .verify_api_key(pb::VerifyApiKeyRequest {
            key: secret.into(),
            cost,
            ..Default::default()
        })
        .await
        .expect("verify")
        .into_inner()
}

async fn codes(app: &TestApp, secret: &str, n: usize) -> Vec<pb::VerifyCode> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(verify_cost(app, secret, None).await.code());
    }
    out
}

fn count(codes: &[pb::VerifyCode], code: pb::VerifyCode) -> usize {
    codes.iter().filter(|c| **c == code).count()
}

async fn credits_are_spent_exactly_and_read_back(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, secret) = app.create_metered_key("", vec![], Some(10), None).await;
    assert_eq!(key.remaining_uses, Some(10));
    let mut remaining = Vec::new();
    for _ in 0..10 {
        let r = verify_cost(&app, &secret, None).await;
        assert_eq!(r.code(), pb::VerifyCode::Valid);
        assert!(r.valid);
        remaining.push(r.remaining_uses.unwrap());
    }
    assert_eq!(remaining, (0..10).rev().collect::<Vec<i64>>());
    let refused = verify_cost(&app, &secret, None).await;
    assert_eq!(refused.code(), pb::VerifyCode::UsageExceeded);
    assert!(!refused.valid);
    assert_eq!(refused.remaining_uses, Some(0));
    assert_eq!(app.get_key(&key.id).await.unwrap().remaining_uses, Some(0));

    // A key without usage controls reports none and is never refused for usage.
    let ws = app.create_workspace("plain").await;
    let (_, plain) = app.create_key(&ws.id, &[]).await;
    let r = verify_cost(&app, &plain, Some(1000)).await;
    assert_eq!(r.code(), pb::VerifyCode::Valid);
    assert_eq!(r.remaining_uses, None);
    assert!(r.rate_limits.is_empty());
}

async fn cost_zero_spends_nothing_and_a_failed_check_spends_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, secret) = app.create_metered_key("", vec![], Some(5), None).await;
    for _ in 0..3 {
        let r = verify_cost(&app, &secret, Some(0)).await;
        assert_eq!(r.code(), pb::VerifyCode::Valid);
        assert_eq!(r.remaining_uses, Some(5), "cost 0 spends nothing");
    }
    // Cost above what is left: refused, and nothing spent.
    let r = verify_cost(&app, &secret, Some(6)).await;
    assert_eq!(r.code(), pb::VerifyCode::UsageExceeded);
    let r = verify_cost(&app, &secret, Some(3)).await;
    assert_eq!(r.code(), pb::VerifyCode::Valid);
    assert_eq!(r.remaining_uses, Some(2));
    // A check that fails before usage spends nothing.
    let missing = app
        .as_admin()
        .keys
        .verify_api_key(pb::VerifyApiKeyRequest {
            key: secret.clone(),
            required_scopes: strings(&["crm:read"]),
            cost: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.code(), pb::VerifyCode::InsufficientScopes);
    app.disable_key(&key.id).await;
    assert_eq!(
        verify_cost(&app, &secret, Some(1)).await.code(),
        pb::VerifyCode::Disabled
    );
    assert_eq!(app.get_key(&key.id).await.unwrap().remaining_uses, Some(2));
    // Out-of-range costs are the caller's mistake.
    for cost in [-1, 1001] {
        let bad = app
            .as_admin()
            .keys
            .verify_api_key(pb::VerifyApiKeyRequest {
                key: secret.clone(),
                cost: Some(cost),
                ..Default::default()
            })
            .await;
        assert_invalid(bad, &["cost"], "cost out of range");
    }
}

async fn rate_limits_admit_their_limit_and_spend_no_credits_when_refusing(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, secret) = app
        .create_metered_key(
            "",
            vec![rate_limit("per-month", 3, LONG, false)],
            Some(10),
            None,
        )
        .await;
    let seen = codes(&app, &secret, 6).await;
    assert_eq!(count(&seen, pb::VerifyCode::Valid), 3, "{seen:?}");
    assert_eq!(count(&seen, pb::VerifyCode::RateLimited), 3, "{seen:?}");
    assert_eq!(
        &seen[..3],
        [pb::VerifyCode::Valid; 3],
        "the first three pass"
    );
    let refused = verify_cost(&app, &secret, None).await;
    assert_eq!(refused.code(), pb::VerifyCode::RateLimited);
    assert_eq!(
        refused.remaining_uses,
        Some(7),
        "a RATE_LIMITED request spends no credits"
    );
    let state = &refused.rate_limits[0];
    assert_eq!(state.name, "per-month");
    assert_eq!(state.limit, 3);
    assert_eq!(state.remaining, 0);
    assert!(state.exceeded);
    let reset = state.reset_time.as_ref().unwrap();
    assert!(reset.seconds > unix_now() && reset.seconds <= unix_now() + LONG);
    assert_eq!(reset.seconds % LONG, 0, "windows are aligned to the period");
    assert_eq!(app.get_key(&key.id).await.unwrap().remaining_uses, Some(7));
}

async fn owner_shared_limits_draw_from_one_budget(backend: Backend) {
    let app = spawn_app(backend).await;
    let shared = || vec![rate_limit("owner-day", 4, LONG, true)];
    let (_, a) = app
        .create_metered_key("customer-42", shared(), None, None)
        .await;
    let (_, b) = app
        .create_metered_key("customer-42", shared(), None, None)
        .await;
    let (_, other) = app
        .create_metered_key("customer-43", shared(), None, None)
        .await;
    let mut seen = codes(&app, &a, 3).await;
    seen.extend(codes(&app, &b, 3).await);
    assert_eq!(count(&seen, pb::VerifyCode::Valid), 4, "{seen:?}");
    assert_eq!(count(&seen, pb::VerifyCode::RateLimited), 2, "{seen:?}");
    // Another owner has a budget of its own.
    assert_eq!(
        count(&codes(&app, &other, 4).await, pb::VerifyCode::Valid),
        4
    );
}

async fn adjust(app: &TestApp, id: &str, delta: i64) -> Result<pb::ApiKey, tonic::Status> {
    app.as_admin()
        .keys
        .adjust_api_key_credits(pb::AdjustApiKeyCreditsRequest {
            id: id.into(),
            delta,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().api_key.unwrap())
}

async fn retried_adjustments_apply_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, _) = app.create_metered_key("", vec![], Some(1000), None).await;
    let send = |delta: i64, request_id: String| {
        let mut keys = app.as_admin().keys;
        let id = key.id.clone();
        async move {
            keys.adjust_api_key_credits(pb::AdjustApiKeyCreditsRequest {
                id,
                delta,
                request_id,
            })
            .await
            .inner()
        }
    };
    // A burst of 40 adjustments, each sent three times at once (a client retrying a call
    // it believes lost while the first is still in flight), then once more afterwards.
    let ids: Vec<String> = (0..40).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    let burst = ids
        .iter()
        .flat_map(|id| (0..3).map(move |_| (id.clone(), 7)))
        .map(|(id, delta)| send(delta, id));
    let answers = join_all(burst).await;
    let answers: Vec<pb::ApiKey> = answers
        .into_iter()
        .map(|a| a.expect("every retry answered").api_key.unwrap())
        .collect();
    // The retries of one adjustment answer what its first call left.
    for triple in answers.chunks(3) {
        let first = triple[0].remaining_uses;
        assert!(
            triple.iter().all(|k| k.remaining_uses == first),
            "{triple:?}"
        );
    }
    for id in &ids {
        send(7, id.clone()).await.expect("a late retry");
    }
    let balance = app.get_key(&key.id).await.unwrap().remaining_uses;
    assert_eq!(
        balance,
        Some(1000 + 40 * 7),
        "each adjustment applied once, exactly"
    );
    // A request id is one adjustment: reused for another delta, it is refused.
    assert_invalid(
        send(8, ids[0].clone()).await,
        &["request_id"],
        "a request id reused for another delta",
    );
    assert_invalid(
        send(7, "not-a-uuid".into()).await,
        &["request_id"],
        "not a UUID",
    );
}

async fn adjusting_credits_during_spending_loses_no_increment(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, secret) = app.create_metered_key("", vec![], Some(100), None).await;
    // 300 verifications and ten +10 adjustments at once: exactly 200 can pass.
    let spends = (0..300).map(|_| {
        let mut keys = app.as_admin().keys;
        let secret = secret.clone();
        tokio::spawn(async move {
            keys.verify_api_key(pb::VerifyApiKeyRequest {
                key: secret,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .code()
        })
    });
    let adjusts = (0..10).map(|_| {
        let mut keys = app.as_admin().keys;
        let id = key.id.clone();
        tokio::spawn(async move {
            keys.adjust_api_key_credits(pb::AdjustApiKeyCreditsRequest {
                id,
                delta: 10,
                ..Default::default()
            })
            .await
            .is_ok()
        })
    });
    let (spent, adjusted) = tokio::join!(join_all(spends), join_all(adjusts));
    assert!(
        adjusted.into_iter().all(|r| r.unwrap()),
        "every adjustment applied"
    );
    let mut codes: Vec<pb::VerifyCode> = spent.into_iter().map(|r| r.unwrap()).collect();
    // Whatever was not spent during the race is spent now.
    codes.extend(self::codes(&app, &secret, 250).await);
    assert_eq!(
        count(&codes, pb::VerifyCode::Valid),
        200,
        "100 + 10 × 10, exactly"
    );
    assert_eq!(
        count(&codes, pb::VerifyCode::UsageExceeded),
        codes.len() - 200
    );

    // Removing more than is left clamps at zero.
    let clamped = adjust(&app, &key.id, -1_000).await.unwrap();
    assert_eq!(clamped.remaining_uses, Some(0));
    let back = adjust(&app, &key.id, 2).await.unwrap();
    assert_eq!(back.remaining_uses, Some(2));
    assert_eq!(
        count(&self::codes(&app, &secret, 3).await, pb::VerifyCode::Valid),
        2
    );
    // Refused: a key without credits, a zero delta, another tenant's key.
    let ws = app.create_workspace("plain").await;
    let (unlimited, _) = app.create_key(&ws.id, &[]).await;
    let status = adjust(&app, &unlimited.id, 5).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_invalid(adjust(&app, &key.id, 0).await, &["delta"], "zero delta");
    let foreign = app
        .client(&stranger())
        .keys
        .adjust_api_key_credits(pb::AdjustApiKeyCreditsRequest {
            id: key.id.clone(),
            delta: 5,
            ..Default::default()
        })
        .await;
    assert_err(foreign, Code::NotFound, "NOT_FOUND");
}

async fn updates_set_and_clear_credits_and_limits(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, secret) = app.create_metered_key("", vec![], Some(1), None).await;
    assert_eq!(codes(&app, &secret, 1).await, [pb::VerifyCode::Valid]);
    let update = |api_key: pb::ApiKey, paths: &[&str]| {
        let mut keys = app.as_admin().keys;
        let request = pb::UpdateApiKeyRequest {
            api_key: Some(api_key),
            update_mask: mask(paths),
            ..Default::default()
        };
        async move { keys.update_api_key(request).await.resource().unwrap() }
    };
    // Set: exactly that many more pass.
    let set = update(
        pb::ApiKey {
            id: key.id.clone(),
            remaining_uses: Some(2),
            ..Default::default()
        },
        &["remaining_uses"],
    )
    .await;
    assert_eq!(set.remaining_uses, Some(2));
    let seen = codes(&app, &secret, 4).await;
    assert_eq!(count(&seen, pb::VerifyCode::Valid), 2, "{seen:?}");
    // Cleared (in the mask, absent): unlimited.
    let cleared = update(
        pb::ApiKey {
            id: key.id.clone(),
            ..Default::default()
        },
        &["remaining_uses"],
    )
    .await;
    assert_eq!(cleared.remaining_uses, None);
    assert_eq!(
        count(&codes(&app, &secret, 3).await, pb::VerifyCode::Valid),
        3
    );
    // A rate limit added by update applies to the next verification.
    let limited = update(
        pb::ApiKey {
            id: key.id.clone(),
            rate_limits: vec![rate_limit("tight", 1, LONG, false)],
            ..Default::default()
        },
        &["rate_limits"],
    )
    .await;
    assert_eq!(limited.rate_limits.len(), 1);
    let seen = codes(&app, &secret, 3).await;
    assert_eq!(
        seen,
        [
            pb::VerifyCode::Valid,
            pb::VerifyCode::RateLimited,
            pb::VerifyCode::RateLimited
        ]
    );
    // Every change is in the audit log.
    let events = app
        .as_admin()
        .audit
        .list_audit_events(pb::ListAuditEventsRequest {
            resource_id: key.id.clone(),
            ..Default::default()
        })
        .await
        .inner()
        .unwrap()
        .audit_events;
    let fields: Vec<Vec<String>> = events.iter().map(|e| e.changed_fields.clone()).collect();
    assert!(
        fields.contains(&vec!["rate_limits".to_owned()]),
        "{fields:?}"
    );
    assert!(
        fields.contains(&vec!["remaining_uses".to_owned()]),
        "{fields:?}"
    );
}

async fn rotation_carries_limits_and_credits_and_the_predecessor_stops_spending(backend: Backend) {
    let app = spawn_app(backend).await;
    let (key, secret) = app
        .create_metered_key(
            "",
            vec![rate_limit("month", 100, LONG, false)],
            Some(10),
            None,
        )
        .await;
    assert_eq!(
        count(&codes(&app, &secret, 3).await, pb::VerifyCode::Valid),
        3
    );
    let rotated = app
        .as_admin()
        .keys
        .rotate_api_key(pb::RotateApiKeyRequest {
            id: key.id.clone(),
            grace_period: seconds(3600),
        })
        .await
        .unwrap()
        .into_inner();
    let successor = rotated.api_key.unwrap();
    assert_eq!(successor.rate_limits, key.rate_limits, "limits carried");
    assert_eq!(successor.remaining_uses, Some(7), "credits carried");
    let old = verify_cost(&app, &secret, Some(1)).await;
    assert_eq!(
        old.code(),
        pb::VerifyCode::UsageExceeded,
        "the predecessor stops spending"
    );
    let new = codes(&app, &rotated.secret, 8).await;
    assert_eq!(count(&new, pb::VerifyCode::Valid), 7, "{new:?}");
}

async fn usage_settings_are_validated_field_by_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let ws = app.create_workspace("w").await;
    let create = |r: pb::CreateApiKeyRequest| {
        let mut keys = app.as_admin().keys;
        let ws = ws.id.clone();
        async move {
            keys.create_api_key(pb::CreateApiKeyRequest {
                workspace_id: ws,
                ..r
            })
            .await
        }
    };
    let nine = (0..9)
        .map(|i| rate_limit(&format!("l{i}"), 1, 60, false))
        .collect();
    assert_invalid(
        create(pb::CreateApiKeyRequest {
            rate_limits: nine,
            ..Default::default()
        })
        .await,
        &["rate_limits"],
        "more than 8 limits",
    );
    let status = create(pb::CreateApiKeyRequest {
        rate_limits: vec![
            rate_limit("ok", 10, 60, false),
            rate_limit("Bad Name", 10, 60, false),
            rate_limit("zero", 0, 60, false),
            pb::RateLimit {
                period: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
                ..rate_limit("short", 10, 0, false)
            },
            rate_limit("ok", 10, 60, false),
            rate_limit("shared", 10, 60, true),
        ],
        remaining_uses: Some(-1),
        refill: Some(pb::Refill {
            amount: 5,
            interval: seconds(30),
        }),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let fields = violated_fields(&status);
    for expected in [
        "rate_limits[1].name",
        "rate_limits[2].limit",
        "rate_limits[3].period",
        "rate_limits[4].name",
        "rate_limits[5].shared_by_owner",
        "remaining_uses",
        "refill.interval",
    ] {
        assert!(
            fields.iter().any(|f| f == expected),
            "{expected} in {fields:?}"
        );
    }
    assert!(
        !fields.iter().any(|f| f == "rate_limits[0].name"),
        "a good entry is not a violation: {fields:?}"
    );
}

async fn refill_sets_the_balance_at_its_interval(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, secret) = app
        .create_metered_key(
            "",
            vec![],
            Some(3),
            Some(pb::Refill {
                amount: 5,
                interval: seconds(60),
            }),
        )
        .await;
    let r = verify_cost(&app, &secret, None).await;
    assert_eq!(r.remaining_uses, Some(2));
    // The shortest interval a refill may have; the balance is set, not added to.
    tokio::time::sleep(Duration::from_secs(61)).await;
    let r = verify_cost(&app, &secret, None).await;
    assert_eq!(r.code(), pb::VerifyCode::Valid);
    assert_eq!(
        r.remaining_uses,
        Some(4),
        "set to 5, then 1 spent: not 2 + 5"
    );
}
