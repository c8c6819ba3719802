//! Durable session records: SQLite (the embedded default) or PostgreSQL (Supabase included),
//! chosen by the `DATABASE_URL` scheme, with Supabase-compatible migrations and a local spool
//! that keeps records safe while the database is unreachable.
//!
//! # Layout
//! - [`records`]: the rows written (`voice_sessions`, `voice_turns`, `voice_tool_calls`).
//! - [`migrate`]: migration files, statement splitting, lint, status, apply, the ledger.
//! - [`sanitize`]: text bound for the database made storable (a NUL becomes U+FFFD).
//! - [`schema`]: live-schema introspection for `db diff`.
//! - [`spool`]: the durable local spool and its replay.
//! - [`Store`]: connecting and writing.
//! - `testing` (tests, and the `testing` feature): fresh databases and sample records.

pub mod migrate;
pub mod records;
pub mod sanitize;
pub mod schema;
pub mod spool;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

pub use records::{SessionRecord, Snapshot, ToolCallRecord, TurnRecord};
pub use sanitize::sanitize_text;

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

impl StoreError {
    /// Whether the database refused this record for good (bad encoding, a violated
    /// constraint, a value it cannot hold), so writing it again can never succeed. Everything
    /// else (connection, timeout, lock, disk, permissions, missing table) may pass later.
    ///
    /// Decided by the database's own error code: on PostgreSQL the SQLSTATE classes `22`
    /// (data exception, e.g. a number out of range) and `23` (integrity constraint violation); on
    /// SQLite the primary result codes `SQLITE_TOOBIG`, `SQLITE_CONSTRAINT` and
    /// `SQLITE_MISMATCH`. A value the driver cannot encode is permanent as well.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Database(sqlx::Error::Encode(_)) => true,
            StoreError::Database(sqlx::Error::Database(e)) => {
                #[cfg(feature = "postgres")]
                if let Some(pg) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    return matches!(pg.code().get(..2), Some("22" | "23"));
                }
                #[cfg(feature = "sqlite")]
                if e.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    let extended: i32 = e.code().and_then(|c| c.parse().ok()).unwrap_or(0);
                    // SQLITE_TOOBIG, SQLITE_CONSTRAINT, SQLITE_MISMATCH.
                    return matches!(extended & 0xff, 18..=20);
                }
                false
            }
            _ => false,
        }
    }
}

impl StoreError {
    /// The message with the database's error code, for the quarantine and logs
    /// (`… [SQLSTATE 22021]`, `… [SQLite 787]`).
    pub fn detail(&self) -> String {
        if let StoreError::Database(sqlx::Error::Database(e)) = self {
            #[cfg(feature = "postgres")]
            if let Some(pg) = e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                return format!("{self} [SQLSTATE {}]", pg.code());
            }
            if let Some(code) = e.code() {
                return format!("{self} [SQLite {code}]");
            }
        }
        self.to_string()
    }
}

/// What a batch write did: every record not listed was written (or was older than the stored
/// row, which is kept).
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Records the database refused for good, by index in the batch, with the error.
    pub rejected: Vec<(usize, StoreError)>,
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

    /// Writes a session and its turns in one transaction. A row is replaced only by a
    /// snapshot with a higher sequence, so writing the same or an older snapshot again changes
    /// nothing.
    pub fn write<'a>(&'a self, snap: &'a Snapshot) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match self
                .write_batch(std::slice::from_ref(snap))
                .await?
                .rejected
                .pop()
            {
                Some((_, e)) => Err(e),
                None => Ok(()),
            }
        })
    }

    /// Writes several snapshots in one transaction. Of several snapshots of one session only
    /// the newest is written (it supersedes the others). When the database refuses the batch
    /// for good, each record is written on its own so that only the records at fault are
    /// rejected ([`BatchOutcome::rejected`]); a transient failure fails the call and nothing
    /// can be assumed written.
    pub fn write_batch<'a>(
        &'a self,
        snaps: &'a [Snapshot],
    ) -> BoxFuture<'a, Result<BatchOutcome, StoreError>> {
        Box::pin(async move {
            let mut outcome = BatchOutcome::default();
            let mut newest: std::collections::HashMap<uuid::Uuid, usize> =
                std::collections::HashMap::new();
            for (i, s) in snaps.iter().enumerate() {
                let slot = newest.entry(s.session.id).or_insert(i);
                if snaps[*slot].seq < s.seq {
                    *slot = i;
                }
            }
            let mut keep: Vec<usize> = newest.into_values().collect();
            keep.sort_unstable();
            // Architecture invariant: every text bound for the database passes `sanitize`
            // here ([`Snapshot::sanitized`]), once per record; the database never sees a NUL.
            // Live records and spooled ones (written by any version) alike, so a NUL never gets
            // a record refused and quarantined. A record with nothing to replace is borrowed as
            // it is, not copied.
            let storable: Vec<Cow<'_, Snapshot>> =
                keep.iter().map(|&i| snaps[i].sanitized()).collect();
            let batch: Vec<&Snapshot> = storable.iter().map(|s| &**s).collect();
            if batch.is_empty() {
                return Ok(outcome);
            }
            match self.write_inner(&batch).await {
                Ok(()) => return Ok(outcome),
                Err(e) if !e.is_permanent() => return Err(e),
                Err(e) if batch.len() == 1 => {
                    outcome.rejected.push((keep[0], e));
                    return Ok(outcome);
                }
                Err(_) => {}
            }
            for (&i, snap) in keep.iter().zip(&batch) {
                match self.write_inner(std::slice::from_ref(snap)).await {
                    Ok(()) => {}
                    Err(e) if e.is_permanent() => outcome.rejected.push((i, e)),
                    Err(e) => return Err(e),
                }
            }
            Ok(outcome)
        })
    }

    /// Writes `snaps`, already sanitised by [`Store::write_batch`], in one transaction: every
    /// write to the record tables goes through here.
    async fn write_inner(&self, snaps: &[&Snapshot]) -> Result<(), StoreError> {
        match self {
            #[cfg(feature = "sqlite")]
            Store::Sqlite(p) => records::write_sqlite(p, snaps).await,
            #[cfg(feature = "postgres")]
            Store::Postgres(p) => records::write_postgres(p, snaps).await,
        }
    }

    /// What `user_id`'s recorded sessions consumed, summed over the sessions that have ended
    /// (a load check compares it with what the providers billed).
    pub fn usage_of<'a>(
        &'a self,
        user_id: &'a str,
    ) -> BoxFuture<'a, Result<records::UserUsage, StoreError>> {
        Box::pin(async move {
            let sql = records::usage_sql(self.backend());
            let row: records::UsageRow = match self {
                #[cfg(feature = "sqlite")]
                Store::Sqlite(p) => sqlx::query_as(&sql).bind(user_id).fetch_one(p).await,
                #[cfg(feature = "postgres")]
                Store::Postgres(p) => sqlx::query_as(&sql).bind(user_id).fetch_one(p).await,
            }
            .map_err(StoreError::from)?;
            Ok(row.into())
        })
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
