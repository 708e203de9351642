//! Opening the database named by `--database-url`: SQLite, one PostgreSQL host, or several
//! (libpq's multi-host form), of which the pool follows the primary ([`primary`]).
pub mod primary;
pub mod url;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::{ConnectOptions, Database, DatabaseConnection};
use secrecy::ExposeSecret;

pub use primary::Primary;
pub use url::{DatabaseUrl, SessionAttrs, UrlError};

/// How long a connection, or a search for the primary at start, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the database could not be opened. Never holds the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("no host of the URL takes writes: {0}")]
    NoPrimary(String),
    /// The driver's error, with the password scrubbed out (it may quote the URL).
    #[error("{0}")]
    Driver(String),
}

/// An open database, and what follows its primary (a multi-host or `read-write` URL).
pub struct Opened {
    pub db: DatabaseConnection,
    pub primary: Option<Arc<Primary>>,
}

/// Opens the database named by the URL, for a command that runs once (migrations, audit
/// checks, tests): the pool starts on the primary but does not follow a failover.
pub async fn connect(url: &str) -> Result<DatabaseConnection, ConnectError> {
    open(url).await.map(|opened| opened.db)
}

/// Opens the database named by the URL: SQLite (WAL, foreign keys on) or PostgreSQL. A
/// multi-host URL, or one asking for `target_session_attrs=read-write`, starts on the first
/// host that takes writes; [`Primary::follow`] keeps it there.
pub async fn open(url: &str) -> Result<Opened, ConnectError> {
    let pg = match DatabaseUrl::parse(url)? {
        DatabaseUrl::Sqlite(url) => {
            // One writer at a time is all SQLite allows; a small pool avoids lock convoys.
            let mut options = pool_options(url.expose_secret(), 4);
            options.map_sqlx_sqlite_opts(|o| {
                o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5))
            });
            let db = Database::connect(options)
                .await
                .map_err(|e| ConnectError::Driver(e.to_string()))?;
            return Ok(Opened { db, primary: None });
        }
        DatabaseUrl::Postgres(pg) => pg,
    };
    if pg.hosts().len() == 1 && pg.attrs == SessionAttrs::Any {
        let db = Database::connect(pool_options(pg.hosts()[0].url(), POSTGRES_POOL))
            .await
            .map_err(|e| ConnectError::Driver(pg.scrub(&e.to_string())))?;
        return Ok(Opened { db, primary: None });
    }
    let primary = Primary::find(pg, CONNECT_TIMEOUT)
        .await
        .map_err(ConnectError::NoPrimary)?;
    let mut options = pool_options(primary.url(), POSTGRES_POOL);
    // A connection that opens on a standby (the options still name a demoted primary) is
    // refused at once: the pool opens another, reading the options again.
    let attrs = primary.attrs();
    options.map_sqlx_postgres_pool_opts(move |pool| {
        pool.after_connect(move |conn, _| {
            Box::pin(async move {
                primary::check(conn, attrs).await.map_err(|why| {
                    sea_orm::sqlx::Error::Protocol(format!("not the primary: {why}"))
                })
            })
        })
    });
    let follows = primary.clone();
    options.map_sqlx_postgres_before_acquire(move |_, meta| {
        let keep = !follows.predates_switch(meta.age);
        Box::pin(async move { Ok(keep) })
    });
    let db = Database::connect(options)
        .await
        .map_err(|e| ConnectError::Driver(primary.scrub(&e.to_string())))?;
    Ok(Opened {
        db,
        primary: Some(primary),
    })
}

/// Connections a PostgreSQL pool keeps at most.
const POSTGRES_POOL: u32 = 16;

fn pool_options(url: &str, max_connections: u32) -> ConnectOptions {
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(max_connections)
        .min_connections(1)
        .connect_timeout(CONNECT_TIMEOUT)
        .acquire_timeout(CONNECT_TIMEOUT)
        .sqlx_logging(false);
    options
}
