//! Durable session records: SQLite (the embedded default) or PostgreSQL (Supabase included),
//! chosen by the `DATABASE_URL` scheme, with Supabase-compatible migrations and a local spool
//! that keeps records safe while the database is unreachable.
//!
//! # Layout
//! - [`records`]: the rows written (`voice_sessions`, `voice_turns`).
//! - [`migrate`]: migration files, statement splitting, lint, status, apply, the ledger.
//! - [`schema`]: live-schema introspection for `db diff`.
//! - [`spool`]: the durable local spool and its replay.
//! - [`Store`]: connecting and writing.

pub mod migrate;
pub mod records;
pub mod schema;
pub mod spool;

use std::str::FromStr;
use std::time::Duration;

pub use records::{SessionRecord, Snapshot, TurnRecord};

/// A database problem, with a message fit for an operator.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names a backend this build does not have, or is malformed.
    #[error("{0}")]
    Config(String),
    /// The database refused or failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration problem.
    #[error("{0}")]
    Migration(String),
    /// A file problem.
    #[error("{0}")]
    Io(String),
}

/// A boxed `Send` future. The public async entry points return these so that callers can
/// spawn them: it makes the compiler check `Send` for sqlx's executor futures at their
/// definition, where the lifetimes are concrete.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Which database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A connection pool to the configured database.
#[derive(Clone, Debug)]
pub enum Store {
    /// SQLite.
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

/// The backend a URL asks for.
pub fn backend_of(url: &str) -> Result<Backend, StoreError> {
    match url.split(':').next().unwrap_or("") {
        "sqlite" => Ok(Backend::Sqlite),
        "postgres" | "postgresql" => Ok(Backend::Postgres),
        other => Err(StoreError::Config(format!(
            "DATABASE_URL scheme {other:?} is not supported: use sqlite://… or postgres://…"
        ))),
    }
}

/// Whether the database at `url` is on this machine (no confirmation needed for `db up`).
pub fn is_local(url: &str) -> bool {
    match backend_of(url) {
        Ok(Backend::Sqlite) => true,
        Ok(Backend::Postgres) => url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .is_none_or(|h| matches!(h.as_str(), "localhost" | "127.0.0.1" | "::1" | "[::1]")),
        Err(_) => false,
    }
}

impl Store {
    /// Connects (creating the SQLite file and its folder if needed).
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        match backend_of(url)? {
            Backend::Sqlite => {
                #[cfg(feature = "sqlite")]
                {
                    use sqlx::sqlite::{
                        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions,
                    };
                    let options = SqliteConnectOptions::from_str(url)
                        .map_err(|e| StoreError::Config(format!("DATABASE_URL: {e}")))?
                        .create_if_missing(true)
                        .journal_mode(SqliteJournalMode::Wal)
                        .foreign_keys(true)
                        .busy_timeout(Duration::from_secs(2));
                    if let Some(dir) = options.get_filename().parent()
                        && !dir.as_os_str().is_empty()
                    {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            StoreError::Io(format!("cannot create {}: {e}", dir.display()))
                        })?;
                    }
                    let pool = SqlitePoolOptions::new()
                        .max_connections(4)
                        .acquire_timeout(Duration::from_secs(3))
                        .connect_with(options)
                        .await?;
                    Ok(Store::Sqlite(pool))
                }
                #[cfg(not(feature = "sqlite"))]
                Err(StoreError::Config(
                    "this build has no SQLite support (enable the `sqlite` feature)".into(),
                ))
            }
            Backend::Postgres => {
                #[cfg(feature = "postgres")]
                {
                    let options = sqlx::postgres::PgConnectOptions::from_str(url)
                        .map_err(|e| StoreError::Config(format!("DATABASE_URL: {e}")))?;
                    // Lazy: the server starts (and spools) even while the database is down.
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(8)
                        .acquire_timeout(Duration::from_secs(3))
                        .connect_lazy_with(options);
                    Ok(Store::Postgres(pool))
                }
                #[cfg(not(feature = "postgres"))]
                Err(StoreError::Config(
                    "this build has no PostgreSQL support (enable the `postgres` feature)".into(),
                ))
            }
        }
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(_) => Backend::Sqlite,
            #[cfg(feature = "postgres")]
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// A cheap round trip (readiness).
    pub fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(self.ping_inner())
    }

    async fn ping_inner(&self) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(p) => sqlx::query("select 1").execute(p).await.map(|_| ()),
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => sqlx::query("select 1").execute(p).await.map(|_| ()),
        }
        .map_err(StoreError::from)
    }

    /// Writes a session and its turns in one transaction; writing the same snapshot again
    /// changes nothing (rows are keyed by session id and turn index).
    pub fn write<'a>(&'a self, snap: &'a Snapshot) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.write_inner(snap))
    }

    async fn write_inner(&self, snap: &Snapshot) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(p) => records::write_sqlite(p, snap).await,
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => records::write_postgres(p, snap).await,
        }
    }

    /// Runs one administrative statement outside a transaction (e.g. `create database`).
    pub fn execute_admin<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self {
                #[cfg(feature = "sqlite")]
                Store::Sqlite(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
                #[cfg(feature = "postgres")]
                Store::Postgres(p) => sqlx::raw_sql(sql).execute(p).await.map(|_| ()),
            }
            .map_err(StoreError::from)
        })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(p) => p.close().await,
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => p.close().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_and_locality() {
        assert_eq!(backend_of("sqlite://./data/x.db").unwrap(), Backend::Sqlite);
        assert_eq!(backend_of("postgres://u@h/db").unwrap(), Backend::Postgres);
        assert!(
            backend_of("mysql://x")
                .unwrap_err()
                .to_string()
                .contains("not supported")
        );
        assert!(is_local("postgres://postgres@127.0.0.1:5432/test"));
        assert!(is_local("postgres://postgres@localhost/test"));
        assert!(!is_local(
            "postgres://postgres@db.abcd.supabase.co:5432/postgres"
        ));
        assert!(is_local("sqlite://./data/x.db"));
    }
}
