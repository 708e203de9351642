//! The secret-leak scanner. Every test process logs at debug level through
//! [`capture_debug_logs`]; a log line holding a key secret, a JWT or the configured secret
//! is filed under the id of the test whose thread wrote it, and fails that test. A test
//! gets its id, and a runtime whose every thread carries it, from [`run_test`]; its audit
//! rows are scanned too ([`audit_leaks`], when its [`TestApp`](crate::TestApp) goes away).
use std::cell::Cell;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::client::JWT_SECRET;

// ---- One runtime per test, so that a leaked secret is blamed on the test that leaked it ----

static NEXT_TEST_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The test this thread works for; 0 on threads no test owns.
    static TEST_ID: Cell<u64> = const { Cell::new(0) };
}

/// A test id no test has had yet.
pub fn new_test_id() -> u64 {
    NEXT_TEST_ID.fetch_add(1, Ordering::Relaxed)
}

/// The id of the test the current thread works for (0 when none).
pub fn current_test_id() -> u64 {
    TEST_ID.get()
}

/// Runs `f` with the current thread tagged as working for test `id`.
pub fn as_test<R>(id: u64, f: impl FnOnce() -> R) -> R {
    let previous = TEST_ID.replace(id);
    let result = f();
    TEST_ID.set(previous);
    result
}

/// Runs an async test body on a runtime of its own (two workers, like
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`) whose every thread, and
/// the test thread, carries a fresh test id. The server a test spawns runs on that runtime,
/// so what it logs is filed under that test; the test fails if it leaked a secret.
pub fn run_test(body: impl Future<Output = ()>) {
    capture_debug_logs();
    let id = new_test_id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || TEST_ID.set(id))
        .build()
        .expect("a test runtime");
    as_test(id, || {
        runtime.block_on(body);
        // Whatever the server logs while it shuts down is this test's too.
        drop(runtime);
    });
    let leaks = take_leaks(id);
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );
}

// ---- The scanner ----

/// Leaks found so far, each under the id of the test whose thread logged it (0: a thread
/// no test owns), until [`take_leaks`] reports them.
static LEAKS: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());

/// Installs, once per process, the debug-level subscriber that scans every log line.
pub fn capture_debug_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
            .with_ansi(false)
            .with_writer(|| LeakScanner)
            .try_init();
    });
}

/// Takes the leaks filed under test `id`, and those no test owns (they must fail some
/// test, and cannot be blamed on a better one).
pub fn take_leaks(id: u64) -> Vec<String> {
    let mut all = LEAKS.lock().unwrap_or_else(|p| p.into_inner());
    let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut *all)
        .into_iter()
        .partition(|(owner, _)| *owner == id || *owner == 0);
    *all = others;
    mine.into_iter()
        .map(|(owner, leak)| match owner {
            0 => format!("(on a thread of no test) {leak}"),
            _ => leak,
        })
        .collect()
}

struct LeakScanner;

impl std::io::Write for LeakScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf);
        if let Some(leak) = find_secret(&line) {
            LEAKS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((current_test_id(), format!("{leak}  in log line: {line}")));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The first secret in `text`: a well-formed keyplane key (checksum and all), something
/// shaped like a JWT, or the test JWT secret.
pub fn find_secret(text: &str) -> Option<String> {
    if text.contains(JWT_SECRET) {
        return Some("the configured JWT secret".into());
    }
    let bytes = text.as_bytes();
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    for (i, _) in text.match_indices("eyJ") {
        let segment: Vec<usize> = bytes[i..]
            .split(|b| !is_b64(*b) && *b != b'.')
            .next()
            .map(|run| {
                run.iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b'.')
                    .map(|(j, _)| j)
                    .collect()
            })
            .unwrap_or_default();
        if segment.len() >= 2 {
            return Some(format!("a JWT at byte {i}"));
        }
    }
    for (i, _) in text.match_indices('_') {
        let start = bytes[..i]
            .iter()
            .rposition(|b| !(b.is_ascii_lowercase() || b.is_ascii_digit()))
            .map_or(0, |p| p + 1);
        let end = bytes[i + 1..]
            .iter()
            .position(|b| !b.is_ascii_alphanumeric())
            .map_or(bytes.len(), |p| i + 1 + p);
        if let Some(candidate) = text.get(start..end)
            && keyplane::domain::key::ApiKeySecret::parse(candidate).is_ok()
        {
            return Some(format!(
                "an API key ending {}",
                &candidate[candidate.len() - 4..]
            ));
        }
    }
    None
}

/// What a test's audit rows must never hold: a secret or a JWT anywhere in a row, or a
/// changed field that is not a bare field name (a value would be). Checked when every
/// test's app goes away.
pub fn audit_leaks(url: &str) -> Vec<String> {
    use keyplane::storage::entity::audit_event;
    use sea_orm::EntityTrait;
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return Vec::new();
    };
    if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Vec::new();
    }
    let rows = tokio::task::block_in_place(|| {
        handle.block_on(async {
            let db = sea_orm::Database::connect(url).await?;
            let rows = audit_event::Entity::find().all(&db).await;
            let _ = db.close().await;
            rows
        })
    });
    let rows = match rows {
        Ok(rows) => rows,
        // A test that cut or stopped its database has nothing to read here.
        Err(e) => {
            eprintln!("audit rows not scanned for secrets ({url}): {e}");
            return Vec::new();
        }
    };
    let mut leaks = Vec::new();
    for row in rows {
        let text = format!("{row:?}");
        if let Some(leak) = find_secret(&text) {
            leaks.push(format!("{leak} in audit event {}", row.id));
        }
        let fields: Vec<String> = serde_json::from_value(row.changed_fields.clone()).unwrap();
        for field in fields {
            if field.is_empty() || !field.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                leaks.push(format!("changed field {field:?} in audit event {}", row.id));
            }
        }
    }
    leaks
}
