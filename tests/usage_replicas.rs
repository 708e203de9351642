//! Usage controls across replicas on one PostgreSQL database: credits are spent exactly
//! (never one more than granted, none refused while some are left), adjustments during
//! spending lose nothing and apply once however many replicas their retries reach, a SIGKILLed replica never lets more through than was granted, and
//! a rate limit admits between 95% and 105% (plus one per replica) of its limit in a window.
// Tests fail by panicking; the no-unwrap rule is for the server's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use keyplane::proto as pb;
use keyplane::proto::api_key_service_client::ApiKeyServiceClient;
use keyplane_testkit::*;
use tonic::transport::Channel;

/// `n` verifications of `secret` at once, spread round-robin over `clients`.
async fn burst(
    clients: &[ApiKeyServiceClient<Authed>],
    secret: &str,
    n: usize,
) -> Vec<Result<pb::VerifyCode, tonic::Status>> {
    let calls = (0..n).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let secret = secret.to_owned();
        tokio::spawn(async move {
            client
                .verify_api_key(pb::VerifyApiKeyRequest {
                    key: secret,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().code())
        })
    });
    join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
}

/// Caches the key on every replica first, with checks that spend nothing (cost 0), after the
/// create's own notification has come back: these tests are about the meter, not about a
/// stampede of first reads, which on two cores can starve the replicas' health checks.
async fn cached(clients: &[ApiKeyServiceClient<Authed>], secret: &str) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    for client in clients {
        let code = client
            .clone()
            .verify_api_key(pb::VerifyApiKeyRequest {
                key: secret.to_owned(),
                cost: Some(0),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .code();
        assert_eq!(code, pb::VerifyCode::Valid);
    }
}

fn valid(results: &[Result<pb::VerifyCode, tonic::Status>]) -> usize {
    results
        .iter()
        .filter(|r| matches!(r, Ok(pb::VerifyCode::Valid)))
        .count()
}

fn clients(apps: &[TestApp]) -> Vec<ApiKeyServiceClient<Authed>> {
    apps.iter()
        .map(|a| a.client(&apps[0].admin()).keys)
        .collect()
}

#[test]
fn credits_are_exact_across_three_replicas() {
    if !postgres_or_skip("credits_are_exact_across_three_replicas") {
        return;
    }
    run_test(async {
        let apps = replicas(3, Duration::from_millis(1500)).await;
        let clients = clients(&apps);

        // 500 credits, 2,000 verifications at once: exactly 500 pass, never 501.
        let (_, secret) = apps[0]
            .create_metered_key("", vec![], Some(500), None)
            .await;
        cached(&clients, &secret).await;
        let results = burst(&clients, &secret, 2000).await;
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(
            failed.is_empty(),
            "no call failed: {:?}",
            &failed[..failed.len().min(3)]
        );
        assert_eq!(valid(&results), 500, "exactly the credits granted");
        let left = burst(&clients, &secret, 30).await;
        assert_eq!(valid(&left), 0, "nothing left anywhere");

        // As many verifications as credits: every one passes (none is refused while
        // credits are left anywhere).
        let (key, secret) = apps[0]
            .create_metered_key("", vec![], Some(500), None)
            .await;
        cached(&clients, &secret).await;
        let results = burst(&clients, &secret, 500).await;
        assert_eq!(valid(&results), 500, "{:?}", refused(&results));
        let read = clients[1]
            .clone()
            .get_api_key(pb::GetApiKeyRequest { id: key.id.clone() })
            .await
            .unwrap()
            .into_inner()
            .api_key
            .unwrap();
        assert_eq!(read.remaining_uses, Some(0), "read back on another replica");

        // Adjustments racing spending on every replica lose no increment, and each is
        // retried at once on the two other replicas (a client that believes its call lost):
        // every adjustment applies once, and its retries answer what the first call did.
        let (key, secret) = apps[0]
            .create_metered_key("", vec![], Some(100), None)
            .await;
        cached(&clients, &secret).await;
        let adjusts = (0..10).flat_map(|i| {
            let request_id = uuid::Uuid::now_v7().to_string();
            let id = key.id.clone();
            let clients = clients.clone();
            (0..3).map(move |retry| {
                let mut client = clients[(i + retry) % 3].clone();
                let request = pb::AdjustApiKeyCreditsRequest {
                    id: id.clone(),
                    delta: 10,
                    request_id: request_id.clone(),
                };
                tokio::spawn(async move {
                    let answer = client.adjust_api_key_credits(request).await;
                    answer.map(|a| a.into_inner().api_key.unwrap().remaining_uses)
                })
            })
        });
        let (spent, adjusted) = tokio::join!(burst(&clients, &secret, 600), join_all(adjusts));
        let answers: Vec<Option<i64>> = adjusted
            .into_iter()
            .map(|r| r.unwrap().expect("every call and retry answered"))
            .collect();
        for retries in answers.chunks(3) {
            assert!(
                retries.iter().all(|a| *a == retries[0]),
                "retries on other replicas answer the first call's answer: {retries:?}"
            );
        }
        let after = burst(&clients, &secret, 300).await;
        assert_eq!(
            valid(&spent) + valid(&after),
            200,
            "100 + 10 × 10, exactly, however many retries"
        );
    });
}

fn refused(results: &[Result<pb::VerifyCode, tonic::Status>]) -> Vec<String> {
    results
        .iter()
        .filter(|r| !matches!(r, Ok(pb::VerifyCode::Valid)))
        .map(|r| format!("{r:?}"))
        .collect()
}

#[test]
fn a_rate_limit_admits_between_95_and_105_percent_in_a_window() {
    if !postgres_or_skip("a_rate_limit_admits_between_95_and_105_percent_in_a_window") {
        return;
    }
    run_test(async {
        let apps = replicas(3, Duration::from_millis(1500)).await;
        let clients = clients(&apps);
        let (_, secret) = apps[0]
            .create_metered_key("", vec![rate_limit("api", 1000, 10, false)], None, None)
            .await;
        cached(&clients, &secret).await;
        // Start just after a window opens (windows are aligned to multiples of 10 s), and
        // offer 1,500 requests in it.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let into_window = now.as_millis() % 10_000;
        tokio::time::sleep(Duration::from_millis((10_000 - into_window + 200) as u64)).await;
        let started = std::time::Instant::now();
        let mut results = Vec::new();
        for _ in 0..3 {
            results.extend(burst(&clients, &secret, 500).await);
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(9_500),
            "the load must fit one window to measure it: took {took:?}"
        );
        let admitted = valid(&results);
        eprintln!(
            "rate limit 1,000 per 10 s, 3 replicas, 1,500 offered in {took:?}: {admitted} admitted"
        );
        assert!(
            (950..=1053).contains(&admitted),
            "1,000 per 10 s over 3 replicas admitted {admitted}"
        );
        let limited = results
            .iter()
            .filter(|r| matches!(r, Ok(pb::VerifyCode::RateLimited)))
            .count();
        assert_eq!(admitted + limited, 1500, "{:?}", refused(&results));
    });
}

const BIN: &str = env!("CARGO_BIN_EXE_keyplane");

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn start_server(db_url: &str, addr: SocketAddr) -> Child {
    Command::new(BIN)
        .args(["serve", "--listen", &addr.to_string()])
        .env("KEYPLANE_DATABASE_URL", db_url)
        .env("KEYPLANE_JWT_SECRET", JWT_SECRET)
        .env("KEYPLANE_JWT_LEEWAY", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

async fn connect_when_ready(addr: SocketAddr) -> Channel {
    for _ in 0..100 {
        if let Ok(channel) = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server at {addr} did not come up");
}

#[test]
fn a_sigkilled_replica_never_lets_more_through_than_was_granted() {
    if !postgres_or_skip("a_sigkilled_replica_never_lets_more_through_than_was_granted") {
        return;
    }
    run_test(async {
        let db = fresh_database(Backend::Postgres).await;
        let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
        let mut servers: Vec<Child> = addrs.iter().map(|a| start_server(&db.url, *a)).collect();
        let mut channels = Vec::new();
        for addr in &addrs {
            channels.push(connect_when_ready(*addr).await);
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tenant = uuid::Uuid::now_v7();
        let admin = Cred::Bearer(token(Some(tenant), &all_builtin()));
        let clients: Vec<ApiKeyServiceClient<Authed>> = channels
            .iter()
            .map(|c| Client::new(c.clone(), &admin).keys)
            .collect();
        let mut workspaces = Client::new(channels[0].clone(), &admin).workspaces;
        let ws = workspaces
            .create_workspace(pb::CreateWorkspaceRequest {
                name: "w".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .workspace
            .unwrap();
        let created = clients[0]
            .clone()
            .create_api_key(pb::CreateApiKeyRequest {
                workspace_id: ws.id,
                remaining_uses: Some(500),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let secret = created.secret;

        // Spend on all three while one is killed mid-burst.
        let spending = {
            let clients = clients.clone();
            let secret = secret.clone();
            tokio::spawn(async move { burst(&clients, &secret, 1500).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        servers[1].kill().unwrap(); // SIGKILL
        let _ = servers[1].wait();
        let during = spending.await.unwrap();
        let survivors = [clients[0].clone(), clients[2].clone()];
        let after = burst(&survivors, &secret, 1000).await;
        let admitted = valid(&during) + valid(&after);
        eprintln!("500 credits, a replica SIGKILLed mid-spend: {admitted} admitted");
        assert!(
            admitted <= 500,
            "{admitted} verifications passed on 500 credits"
        );
        // What the killed replica had reserved and not spent is lost, never more.
        assert!(
            admitted >= 250,
            "only a killed replica's reservation is lost: {admitted}"
        );
        for mut server in servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    });
}
