//! The authorization model (delegation, SPEC §3.8; roles, §3.9) across replicas on one
//! PostgreSQL database: a change to an ancestor reaches a delegated key cached on the other
//! replicas within a second (disable, re-enable, re-scope, revoke); a role update reaches
//! every holder on every replica within a second; and children verified concurrently on
//! every replica never spend more of their parent's credits than it has, nor less.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use keyplane::proto as pb;
use keyplane::proto::api_key_service_client::ApiKeyServiceClient;
use keyplane_testkit::*;

/// The bound every replica must keep.
const BOUND: Duration = Duration::from_secs(1);

/// How long a write's own NOTIFY may take to come back and evict; caching a key before
/// it has would measure an uncached key.
const ECHO: Duration = Duration::from_millis(500);

const DELEGATE: &str = "keyplane.api_keys:delegate";

/// What `writer`'s admin (the tenant of every key here) is told on `replica`.
async fn verify_on(
    replica: &TestApp,
    writer: &TestApp,
    secret: &str,
    required: &[&str],
) -> pb::VerifyApiKeyResponse {
    replica
        .client(&writer.admin())
        .verify(secret, required)
        .await
}

/// Verifies `secret` twice on each replica (the first fills the cache), asserting the
/// second answer is `expected`; returns the second answers.
async fn cache_on(
    replicas: &[&TestApp],
    writer: &TestApp,
    secret: &str,
    required: &[&str],
    expected: pb::VerifyCode,
    what: &str,
) -> Vec<pb::VerifyApiKeyResponse> {
    let mut answers = Vec::new();
    for replica in replicas {
        verify_on(replica, writer, secret, required).await;
        let v = verify_on(replica, writer, secret, required).await;
        assert_eq!(
            v.code(),
            expected,
            "{what}: replica {} before the write: {v:?}",
            replica.addr
        );
        answers.push(v);
    }
    answers
}

/// Polls every replica until it answers `after`, failing on an answer that is neither
/// `before` nor `after` and on a `before` seen `BOUND` after `since` (when the write
/// returned). Returns the slowest time taken and each replica's final answer.
async fn until_everywhere(
    replicas: &[&TestApp],
    writer: &TestApp,
    secret: &str,
    required: &[&str],
    (before, after): (pb::VerifyCode, pb::VerifyCode),
    since: Instant,
    what: &str,
) -> (Duration, Vec<pb::VerifyApiKeyResponse>) {
    let mut slowest = Duration::ZERO;
    let mut answers = Vec::new();
    for replica in replicas {
        loop {
            let v = verify_on(replica, writer, secret, required).await;
            if v.code() == after {
                slowest = slowest.max(since.elapsed());
                answers.push(v);
                break;
            }
            assert_eq!(
                v.code(),
                before,
                "{what}: replica {} answered neither {before:?} nor {after:?}: {v:?}",
                replica.addr
            );
            assert!(
                since.elapsed() < BOUND,
                "{what}: replica {} still answers {before:?} {:?} after the write",
                replica.addr,
                since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    (slowest, answers)
}

/// `DelegateApiKey` called with the parent key itself as the credential.
async fn delegate(
    app: &TestApp,
    parent_secret: &str,
    request: pb::DelegateApiKeyRequest,
) -> (pb::ApiKey, String) {
    let r = app
        .client(&Cred::ApiKey(parent_secret.to_owned()))
        .keys
        .delegate_api_key(request)
        .await
        .expect("delegate")
        .into_inner();
    (r.api_key.unwrap(), r.secret)
}

fn ask(scopes: &[&str], delegable: bool) -> pb::DelegateApiKeyRequest {
    pb::DelegateApiKeyRequest {
        name: "sub-agent".into(),
        scopes: strings(scopes),
        delegable,
        ..Default::default()
    }
}

/// A key of `writer`'s tenant as the admin creates it; returns the key and its secret.
async fn create(writer: &TestApp, request: pb::CreateApiKeyRequest) -> (pb::ApiKey, String) {
    let r = writer
        .as_admin()
        .keys
        .create_api_key(request)
        .await
        .expect("create key")
        .into_inner();
    (r.api_key.unwrap(), r.secret)
}

/// UpdateApiKey of the fields in `paths`, whatever the etag.
async fn update_key(writer: &TestApp, id: &str, patch: pb::ApiKey, paths: &[&str]) {
    writer
        .as_admin()
        .keys
        .update_api_key(pb::UpdateApiKeyRequest {
            api_key: Some(pb::ApiKey {
                id: id.into(),
                ..patch
            }),
            update_mask: mask(paths),
            etag: String::new(),
        })
        .await
        .expect("update key");
}

#[test]
fn an_ancestors_change_reaches_a_grandchild_cached_on_other_replicas_within_a_second() {
    if !postgres_or_skip("authorization_replicas::an_ancestors_change_reaches_a_grandchild") {
        return;
    }
    run_test(async {
        use pb::VerifyCode::{Disabled, InsufficientScopes, Revoked, Valid};
        let all = replicas(3, Duration::from_millis(300)).await;
        let a = &all[0];
        let others: Vec<&TestApp> = all[1..].iter().collect();

        // root → child → grandchild, all made on A.
        let ws = a.create_workspace("agents").await;
        for s in ["crm:read", "crm:write", "erp:read"] {
            a.create_scope(s, &ws.id).await;
        }
        let (root, root_secret) = create(
            a,
            pb::CreateApiKeyRequest {
                workspace_id: ws.id.clone(),
                name: "agent".into(),
                scopes: strings(&["crm:read", "crm:write", "erp:read", DELEGATE]),
                ..Default::default()
            },
        )
        .await;
        let (child, child_secret) =
            delegate(a, &root_secret, ask(&["crm:read", "crm:write"], true)).await;
        let (grandchild, g) =
            delegate(a, &child_secret, ask(&["crm:read", "crm:write"], false)).await;
        assert_eq!(grandchild.parent_id, child.id);
        assert_eq!(grandchild.delegation_depth, 2);

        tokio::time::sleep(ECHO).await;
        for v in cache_on(&others, a, &g, &["crm:write"], Valid, "the chain").await {
            assert_eq!(
                v.delegation_chain,
                [root.id.clone(), child.id.clone(), grandchild.id.clone()],
                "the chain as another replica sees it"
            );
            assert_eq!(v.effective_scopes, strings(&["crm:read", "crm:write"]));
        }

        // The child disabled on A: its grandchild is DISABLED on B and C.
        a.disable_key(&child.id).await;
        let since = Instant::now();
        let (took, _) = until_everywhere(
            &others,
            a,
            &g,
            &["crm:write"],
            (Valid, Disabled),
            since,
            "child disabled",
        )
        .await;
        eprintln!("child disabled: grandchild DISABLED on every other replica after {took:?}");
        assert!(took < BOUND, "child disabled: took {took:?}");

        // Enabled again: VALID again everywhere, within the bound too.
        update_key(a, &child.id, pb::ApiKey::default(), &["disabled"]).await;
        let since = Instant::now();
        let (took, _) = until_everywhere(
            &others,
            a,
            &g,
            &["crm:write"],
            (Disabled, Valid),
            since,
            "child enabled",
        )
        .await;
        eprintln!("child enabled: grandchild VALID on every other replica after {took:?}");
        assert!(took < BOUND, "child enabled: took {took:?}");

        // The root loses crm:write: so does the grandchild, whose own scopes keep it.
        tokio::time::sleep(ECHO).await;
        cache_on(&others, a, &g, &["crm:write"], Valid, "before the re-scope").await;
        update_key(
            a,
            &root.id,
            pb::ApiKey {
                scopes: strings(&["crm:read", "erp:read", DELEGATE]),
                ..Default::default()
            },
            &["scopes"],
        )
        .await;
        let since = Instant::now();
        let (took, answers) = until_everywhere(
            &others,
            a,
            &g,
            &["crm:write"],
            (Valid, InsufficientScopes),
            since,
            "root re-scoped",
        )
        .await;
        eprintln!(
            "root re-scoped: grandchild lost crm:write on every other replica after {took:?}"
        );
        assert!(took < BOUND, "root re-scoped: took {took:?}");
        for v in answers {
            assert_eq!(v.effective_scopes, strings(&["crm:read"]), "{v:?}");
            assert_eq!(v.missing_scopes, strings(&["crm:write"]), "{v:?}");
        }

        // The root revoked: the grandchild is REVOKED on B and C, and revoked in the
        // database with it (not merely answered so).
        tokio::time::sleep(ECHO).await;
        cache_on(&others, a, &g, &["crm:read"], Valid, "before the revoke").await;
        a.revoke_key(&root.id).await;
        let since = Instant::now();
        let (took, _) = until_everywhere(
            &others,
            a,
            &g,
            &["crm:read"],
            (Valid, Revoked),
            since,
            "root revoked",
        )
        .await;
        eprintln!("root revoked: grandchild REVOKED on every other replica after {took:?}");
        assert!(took < BOUND, "root revoked: took {took:?}");
        let mut keys_on_c = all[2].client(&a.admin()).keys;
        for key in [&child, &grandchild] {
            let read = keys_on_c
                .get_api_key(pb::GetApiKeyRequest { id: key.id.clone() })
                .await
                .resource()
                .unwrap();
            assert!(
                read.revoke_time.is_some(),
                "a descendant of the revoked root is not revoked: {read:?}"
            );
        }
    });
}

#[test]
fn a_role_update_reaches_every_holder_on_every_replica_within_a_second() {
    if !postgres_or_skip("authorization_replicas::a_role_update_reaches_every_holder") {
        return;
    }
    run_test(async {
        use pb::VerifyCode::{InsufficientScopes, Valid};
        let all = replicas(3, Duration::from_millis(300)).await;
        let a = &all[0];
        let everywhere: Vec<&TestApp> = all.iter().collect();

        let ws = a.create_workspace("support").await;
        for s in ["crm:read", "crm:write"] {
            a.create_scope(s, &ws.id).await;
        }
        let role = a
            .create_role("support-agent", &ws.id, &["crm:read", "crm:write"])
            .await;
        let holder = |scopes: &[&str]| pb::CreateApiKeyRequest {
            workspace_id: ws.id.clone(),
            name: "holder".into(),
            scopes: strings(scopes),
            roles: strings(&["support-agent"]),
            ..Default::default()
        };
        // Six keys holding crm:write only through the role, the first able to delegate;
        // and a delegated child of it, which holds crm:write only through its parent's role.
        let mut losing = Vec::new();
        for i in 0..6 {
            let own: &[&str] = if i == 0 { &[DELEGATE] } else { &[] };
            losing.push(create(a, holder(own)).await.1);
        }
        let (_, child) = delegate(a, &losing[0], ask(&["crm:read", "crm:write"], false)).await;
        losing.push(child);
        // A control: a holder with crm:write of its own keeps it.
        let (_, keeper) = create(a, holder(&["crm:write"])).await;

        tokio::time::sleep(ECHO).await;
        for secret in losing.iter().chain([&keeper]) {
            cache_on(&everywhere, a, secret, &["crm:write"], Valid, "a holder").await;
        }

        a.as_admin()
            .roles
            .update_role(pb::UpdateRoleRequest {
                role: Some(pb::Role {
                    id: role.id.clone(),
                    scopes: strings(&["crm:read"]),
                    ..Default::default()
                }),
                update_mask: mask(&["scopes"]),
                etag: String::new(),
            })
            .await
            .expect("update role");
        let since = Instant::now();
        let mut slowest = Duration::ZERO;
        for (i, secret) in losing.iter().enumerate() {
            let what = format!("holder {i} after the role lost crm:write");
            let (took, answers) = until_everywhere(
                &everywhere,
                a,
                secret,
                &["crm:write"],
                (Valid, InsufficientScopes),
                since,
                &what,
            )
            .await;
            for v in answers {
                assert_eq!(v.missing_scopes, strings(&["crm:write"]), "{what}: {v:?}");
            }
            slowest = slowest.max(took);
        }
        eprintln!(
            "role update: {} holders INSUFFICIENT_SCOPES on all 3 replicas after {slowest:?}",
            losing.len()
        );
        assert!(slowest < BOUND, "role update: took {slowest:?}");

        // What the role still grants, and what a holder holds of its own, stay.
        for replica in &everywhere {
            for secret in &losing {
                let v = verify_on(replica, a, secret, &["crm:read"]).await;
                assert_eq!(v.code(), Valid, "crm:read is still the role's: {v:?}");
            }
            let v = verify_on(replica, a, &keeper, &["crm:write"]).await;
            assert_eq!(v.code(), Valid, "the keeper's own crm:write: {v:?}");
        }
    });
}

/// How many verifications are in flight at once. The three servers and this client share
/// the test's two runtime threads (on two shared cores): a thousand at once starve the
/// servers' own database pings past `--database-timeout`, and a replica that believes the
/// database gone rightly answers UNAVAILABLE for credits it does not hold (SPEC §3.4.2),
/// which is not what these tests are about. 48 at a time still spends from every replica
/// at once.
const IN_FLIGHT: usize = 48;

/// `n` verifications, `IN_FLIGHT` at a time: call `i` is of `secrets[i % secrets.len()]`
/// on `clients[i % clients.len()]`.
async fn burst(
    clients: &[ApiKeyServiceClient<Authed>],
    secrets: &[String],
    n: usize,
) -> Vec<Result<pb::VerifyCode, tonic::Status>> {
    let calls = (0..n).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let secret = secrets[i % secrets.len()].clone();
        async move {
            let call = tokio::spawn(async move {
                client
                    .verify_api_key(pb::VerifyApiKeyRequest {
                        key: secret,
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().code())
            });
            call.await.unwrap()
        }
    });
    stream::iter(calls)
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}

/// How many calls ended each way: a verification code, or a failed call's code and message.
fn tally(results: &[Result<pb::VerifyCode, tonic::Status>]) -> BTreeMap<String, usize> {
    let mut counted = BTreeMap::new();
    for result in results {
        let outcome = match result {
            Ok(code) => format!("{code:?}"),
            Err(status) => format!("failed {:?}: {}", status.code(), status.message()),
        };
        *counted.entry(outcome).or_insert(0) += 1;
    }
    counted
}

/// The expected tally: each code and its count.
fn only(expected: &[(pb::VerifyCode, usize)]) -> BTreeMap<String, usize> {
    expected
        .iter()
        .map(|(code, n)| (format!("{code:?}"), *n))
        .collect()
}

/// A parent holding the delegate scope and `credits`, and `n` children with no credits of
/// their own; returns the parent's id and the children's secrets.
async fn parent_and_children(writer: &TestApp, credits: i64, n: usize) -> (String, Vec<String>) {
    let ws = writer.create_workspace("agents").await;
    let (parent, secret) = create(
        writer,
        pb::CreateApiKeyRequest {
            workspace_id: ws.id,
            name: "parent".into(),
            scopes: strings(&[DELEGATE]),
            remaining_uses: Some(credits),
            ..Default::default()
        },
    )
    .await;
    let mut children = Vec::new();
    for _ in 0..n {
        children.push(delegate(writer, &secret, ask(&[], false)).await.1);
    }
    (parent.id, children)
}

#[test]
fn children_on_every_replica_spend_exactly_their_parents_credits() {
    if !postgres_or_skip("authorization_replicas::children_spend_exactly_their_parents_credits") {
        return;
    }
    run_test(async {
        use pb::VerifyCode::{UsageExceeded, Valid};
        // Long enough for the replicas to hear each other's heartbeats (usage controls
        // count the replicas), as in tests/usage_replicas.rs.
        let all = replicas(3, Duration::from_millis(1500)).await;
        let a = &all[0];
        let clients: Vec<ApiKeyServiceClient<Authed>> =
            all.iter().map(|r| r.client(&a.admin()).keys).collect();

        // 300 credits, 1,000 verifications of 4 children spread over the 3 replicas, all
        // spending at once: exactly 300 pass (never 301), the rest are USAGE_EXCEEDED, none
        // fails.
        let (parent, children) = parent_and_children(a, 300, 4).await;
        let results = burst(&clients, &children, 1000).await;
        let outcomes = tally(&results);
        eprintln!("300 parent credits, 1,000 child verifications over 3 replicas: {outcomes:?}");
        assert_eq!(
            outcomes,
            only(&[(Valid, 300), (UsageExceeded, 700)]),
            "300 credits, 1,000 verifications: exactly 300 VALID, the rest USAGE_EXCEEDED, no errors"
        );
        let after = tally(&burst(&clients, &children, 30).await);
        assert_eq!(
            after,
            only(&[(UsageExceeded, 30)]),
            "nothing left on any replica"
        );
        let read = clients[1]
            .clone()
            .get_api_key(pb::GetApiKeyRequest { id: parent })
            .await
            .resource()
            .unwrap();
        assert_eq!(read.remaining_uses, Some(0), "read back on another replica");

        // As many verifications as credits: every one passes (none is refused while the
        // parent has credits left on any replica).
        let (_, children) = parent_and_children(a, 300, 4).await;
        let outcomes = tally(&burst(&clients, &children, 300).await);
        eprintln!("300 parent credits, 300 child verifications over 3 replicas: {outcomes:?}");
        assert_eq!(
            outcomes,
            only(&[(Valid, 300)]),
            "300 credits, 300 verifications: every one VALID"
        );
    });
}
