//! `--database-url`, parsed once at the edge: SQLite, or PostgreSQL with libpq's multi-host
//! form (`postgres://user:pw@db1:5432,db2:5432/keyplane?target_session_attrs=read-write`),
//! which sqlx does not read. A PostgreSQL URL becomes one ordinary single-host URL per host
//! (what sqlx parses), in the order given, plus the session attribute that says which host to
//! use. Nothing here ever puts the password into an error.
use std::fmt;
use std::str::FromStr;

use sea_orm::sqlx::ConnectOptions as _;
use sea_orm::sqlx::postgres::PgConnectOptions;
use secrecy::{ExposeSecret, SecretString};

/// Which host of several keyplane uses (libpq's `target_session_attrs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    /// The first host that accepts a connection (libpq's default).
    Any,
    /// The first host that accepts writes (`read-write`, or `primary`: the same for a
    /// client that always writes).
    ReadWrite,
}

/// A parsed `--database-url`.
pub enum DatabaseUrl {
    /// Passed to the driver as given.
    Sqlite(SecretString),
    Postgres(PostgresUrl),
}

/// A PostgreSQL URL with one or more hosts.
pub struct PostgresUrl {
    /// One single-host URL per host, in the order given, for the driver.
    hosts: Vec<Host>,
    pub attrs: SessionAttrs,
    /// The password, to scrub from the driver's errors (which may quote a whole URL).
    password: Option<SecretString>,
}

/// One host of a PostgreSQL URL.
pub struct Host {
    /// `host:port`, for logs.
    pub name: String,
    /// The complete single-host URL (it holds the password).
    url: SecretString,
    pub options: PgConnectOptions,
}

impl Host {
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }
}

/// Why a database URL was refused: names the part at fault, never the password.
#[derive(Debug, thiserror::Error)]
#[error("invalid --database-url: {0}")]
pub struct UrlError(String);

impl DatabaseUrl {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        if url.starts_with("sqlite:") {
            return Ok(Self::Sqlite(url.into()));
        }
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                UrlError("the scheme must be `postgres://`, `postgresql://` or `sqlite:`".into())
            })?;
        PostgresUrl::parse(rest).map(Self::Postgres)
    }
}

impl PostgresUrl {
    /// Parses what follows `postgres://`: `[userinfo@]host[:port][,host[:port]...][/db][?query]`.
    fn parse(rest: &str) -> Result<Self, UrlError> {
        // The query may hold anything; a password may hold `/` only percent-encoded, but `@`
        // ends the userinfo wherever it is, so look for it before the query only.
        let (before_query, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        if before_query.contains("://") {
            return Err(UrlError(
                "mixed schemes: write one scheme, then the hosts separated by commas".into(),
            ));
        }
        let (userinfo, after_userinfo) = match before_query.rfind('@') {
            Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
            None => (None, before_query),
        };
        let (host_list, path) = match after_userinfo.find('/') {
            Some(slash) => (&after_userinfo[..slash], &after_userinfo[slash..]),
            None => (after_userinfo, ""),
        };
        if host_list.is_empty() {
            return Err(UrlError(
                "no host: name at least one, as in postgres://user@db1:5432,db2:5432/keyplane"
                    .into(),
            ));
        }
        let password = userinfo
            .and_then(|u| u.split_once(':'))
            .map(|(_, pw)| pw)
            .filter(|pw| !pw.is_empty());
        let mut attrs = SessionAttrs::Any;
        let mut kept = Vec::new();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == "target_session_attrs" {
                attrs = match value {
                    "any" => SessionAttrs::Any,
                    "read-write" | "primary" => SessionAttrs::ReadWrite,
                    "read-only" | "standby" | "prefer-standby" => {
                        return Err(UrlError(format!(
                            "target_session_attrs={value}: keyplane writes, so it needs \
                             `read-write` (or `primary`, or `any`)"
                        )));
                    }
                    other => {
                        return Err(UrlError(format!(
                            "target_session_attrs: unknown value {other:?} (use `read-write`, \
                             `primary` or `any`)"
                        )));
                    }
                };
            } else {
                kept.push(pair);
            }
        }
        let query = if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let scrub = Scrubber(password);
        let hosts = host_list
            .split(',')
            .enumerate()
            .map(|(i, item)| {
                let (host, port) = split_host(item).map_err(|why| {
                    UrlError(format!("host {} ({}): {why}", i + 1, scrub.text(item)))
                })?;
                let url = format!("postgres://{userinfo}{host}:{port}{path}{query}");
                let options = PgConnectOptions::from_str(&url).map_err(|e| {
                    UrlError(format!(
                        "host {} ({host}:{port}): {}",
                        i + 1,
                        scrub.text(&e.to_string())
                    ))
                })?;
                Ok(Host {
                    name: format!("{host}:{port}"),
                    url: url.into(),
                    options: options.disable_statement_logging(),
                })
            })
            .collect::<Result<Vec<_>, UrlError>>()?;
        Ok(Self {
            hosts,
            attrs,
            password: password.map(SecretString::from),
        })
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The driver's error text with the password removed: sqlx quotes whole URLs.
    pub fn scrub(&self, text: &str) -> String {
        Scrubber(self.password.as_ref().map(|p| p.expose_secret())).text(text)
    }
}

/// Replaces a password, as written and percent-decoded, wherever it appears.
struct Scrubber<'a>(Option<&'a str>);

impl Scrubber<'_> {
    fn text(&self, text: &str) -> String {
        let Some(password) = self.0 else {
            return text.to_owned();
        };
        let mut text = text.replace(password, "***");
        let decoded = percent_decode(password);
        if !decoded.is_empty() && decoded != password {
            text = text.replace(&decoded, "***");
        }
        text
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the port defaults to 5432.
fn split_host(item: &str) -> Result<(&str, u16), String> {
    if item.is_empty() {
        return Err("empty host (two commas in a row, or a trailing comma?)".into());
    }
    if item.contains("://") {
        return Err(
            "a scheme inside the host list: write one scheme, then the hosts separated by commas"
                .into(),
        );
    }
    let (host, port) = if let Some(v6) = item.strip_prefix('[') {
        let (addr, after) = v6
            .split_once(']')
            .ok_or_else(|| "an IPv6 address without its closing `]`".to_owned())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after the IPv6 address"))?,
            ),
        };
        (&item[..addr.len() + 2], port)
    } else {
        match item.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (item, None),
        }
    };
    if host.is_empty() {
        return Err("empty host name".into());
    }
    let port = match port {
        None => 5432,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {p:?} is not a port number (1-65535)"))?,
    };
    Ok((host, port))
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresUrl")
            .field(
                "hosts",
                &self.hosts.iter().map(|h| &h.name).collect::<Vec<_>>(),
            )
            .field("attrs", &self.attrs)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres(url: &str) -> PostgresUrl {
        match DatabaseUrl::parse(url) {
            Ok(DatabaseUrl::Postgres(p)) => p,
            Ok(DatabaseUrl::Sqlite(_)) => panic!("{url} read as SQLite"),
            Err(e) => panic!("{url}: {e}"),
        }
    }

    fn refused(url: &str) -> String {
        match DatabaseUrl::parse(url) {
            Ok(_) => panic!("{url} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn what_pg_autoctl_prints_is_read_host_by_host() {
        let url = postgres(
            "postgres://127.0.0.1:5492,127.0.0.1:5491/postgres?target_session_attrs=read-write&sslmode=prefer",
        );
        assert_eq!(url.attrs, SessionAttrs::ReadWrite);
        let names: Vec<_> = url.hosts().iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["127.0.0.1:5492", "127.0.0.1:5491"]);
        assert_eq!(
            url.hosts()[1].url(),
            "postgres://127.0.0.1:5491/postgres?sslmode=prefer"
        );
        assert_eq!(url.hosts()[1].options.get_port(), 5491);
        assert_eq!(url.hosts()[1].options.get_database(), Some("postgres"));
    }

    #[test]
    fn a_single_host_keeps_its_credentials_and_defaults() {
        let url = postgres("postgresql://kp:s%40cret@db.internal/keyplane");
        assert_eq!(url.attrs, SessionAttrs::Any);
        assert_eq!(url.hosts().len(), 1);
        assert_eq!(url.hosts()[0].name, "db.internal:5432");
        assert_eq!(url.hosts()[0].options.get_username(), "kp");
        let v6 = postgres("postgres://u@[::1]:6000,[::1]/db?target_session_attrs=primary");
        assert_eq!(v6.attrs, SessionAttrs::ReadWrite);
        assert_eq!(v6.hosts()[0].name, "[::1]:6000");
        assert_eq!(v6.hosts()[1].name, "[::1]:5432");
    }

    #[test]
    fn a_bad_url_names_its_part_and_never_the_password() {
        let cases = [
            (
                "postgres://kpuser:hunter2secret@127.0.0.1:notaport/db",
                "port \"notaport\"",
            ),
            ("postgres://kpuser:hunter2secret@/db", "no host"),
            ("postgres://kpuser:hunter2secret@h1,,h2/db", "host 2"),
            (
                "postgres://kpuser:hunter2secret@h1,mysql://h2/db",
                "mixed schemes",
            ),
            (
                "postgres://kpuser:hunter2secret@h1/db?target_session_attrs=sometimes",
                "target_session_attrs: unknown value \"sometimes\"",
            ),
            (
                "postgres://kpuser:hunter2secret@h1/db?target_session_attrs=standby",
                "needs `read-write`",
            ),
            ("mysql://kpuser:hunter2secret@h1/db", "scheme"),
            (
                "postgres://kpuser:hunter2secret@h1/db?sslmode=sometimes",
                "host 1",
            ),
        ];
        for (url, names) in cases {
            let message = refused(url);
            assert!(message.contains(names), "{url}: {message}");
            assert!(!message.contains("hunter2secret"), "{url}: {message}");
        }
    }

    #[test]
    fn the_scrubber_removes_the_password_as_written_and_decoded() {
        let url = postgres("postgres://u:p%2Fss@h/db");
        assert_eq!(
            url.scrub("bad: postgres://u:p%2Fss@h and p/ss"),
            "bad: postgres://u:***@h and ***"
        );
    }
}
