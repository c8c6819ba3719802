//! Migrations: files named `<14-digit UTC timestamp>_<name>.sql`, Postgres ones in
//! `supabase/migrations/` (applied unchanged by `supabase db push`) and SQLite ones in
//! `supabase/sqlite-migrations/`. The Postgres ledger is the Supabase CLI's own table,
//! `supabase_migrations.schema_migrations (version, statements, name)`, so both tools see one
//! history; SQLite keeps the same columns in `atlas_schema_migrations`.
//!
//! Statements are split the way they are recorded in the ledger (quotes, dollar quotes and
//! comments respected); a file whose statements differ from what was recorded is reported as
//! changed after it was applied.

use std::path::{Path, PathBuf};

use include_dir::{Dir, include_dir};

use crate::{Backend, BoxFuture, Store, StoreError};

static POSTGRES_DIR: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../../supabase/migrations");
static SQLITE_DIR: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../../supabase/sqlite-migrations");

/// Folder of Postgres migrations, relative to the project root.
pub const POSTGRES_FOLDER: &str = "supabase/migrations";
/// Folder of SQLite migrations, relative to the project root.
pub const SQLITE_FOLDER: &str = "supabase/sqlite-migrations";

/// One migration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Migration {
    /// The 14-digit timestamp.
    pub version: String,
    /// The name after the underscore.
    pub name: String,
    /// The file name.
    pub file_name: String,
    /// Its text.
    pub sql: String,
    /// Its statements, as recorded in the ledger.
    pub statements: Vec<String>,
}

/// `(version, name)` from `20261124000001_auth_shim.sql`.
pub fn parse_file_name(file: &str) -> Option<(String, String)> {
    let stem = file.strip_suffix(".sql")?;
    let (version, name) = stem.split_once('_')?;
    (version.len() == 14 && version.bytes().all(|b| b.is_ascii_digit()) && !name.is_empty())
        .then(|| (version.to_owned(), name.to_owned()))
}

fn from_parts(file_name: &str, sql: &str) -> Option<Migration> {
    let (version, name) = parse_file_name(file_name)?;
    Some(Migration {
        version,
        name,
        file_name: file_name.to_owned(),
        statements: split_statements(sql),
        sql: sql.to_owned(),
    })
}

/// The migrations compiled into the binary for `backend`, oldest first.
pub fn embedded(backend: Backend) -> Vec<Migration> {
    let dir = match backend {
        Backend::Postgres => &POSTGRES_DIR,
        Backend::Sqlite => &SQLITE_DIR,
    };
    let mut out: Vec<Migration> = dir
        .files()
        .filter_map(|f| {
            let name = f.path().file_name()?.to_str()?;
            from_parts(name, f.contents_utf8()?)
        })
        .collect();
    out.sort_by(|a, b| a.version.cmp(&b.version));
    out
}

/// The `.sql` files of `dir` (all names, for lint) and the well-named migrations, oldest first.
pub fn load_dir(dir: &Path) -> Result<(Vec<String>, Vec<Migration>), StoreError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StoreError::Io(format!("cannot read {}: {e}", dir.display())))?;
    let mut names = Vec::new();
    let mut migrations = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::Io(e.to_string()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".sql") {
            continue;
        }
        let sql = std::fs::read_to_string(entry.path())
            .map_err(|e| StoreError::Io(format!("cannot read {name}: {e}")))?;
        if let Some(m) = from_parts(&name, &sql) {
            migrations.push(m);
        }
        names.push(name);
    }
    names.sort();
    migrations.sort_by(|a, b| a.version.cmp(&b.version));
    Ok((names, migrations))
}

/// Splits SQL into statements at top-level semicolons, respecting quotes, dollar quotes and
/// comments. Statements are trimmed; empty ones and comment-only ones are dropped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < bytes.len() && !(bytes[i] == b'*' && bytes[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < bytes.len() {
                    if bytes[i] == q {
                        if bytes.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // $tag$ … $tag$ (the tag may be empty).
                let tag_end = bytes[i + 1..]
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(e) if bytes[e] == b'$' => {
                        let tag = &sql[i..=e];
                        match sql[e + 1..].find(tag) {
                            Some(close) => i = e + 1 + close + tag.len(),
                            None => i = bytes.len(),
                        }
                    }
                    _ => i += 1,
                }
            }
            b';' => {
                push_statement(&sql[start..i], &mut out);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    push_statement(&sql[start.min(sql.len())..], &mut out);
    out
}

fn push_statement(s: &str, out: &mut Vec<String>) {
    let s = s.trim();
    let meaningful = s
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"));
    if meaningful {
        out.push(s.to_owned());
    }
}

/// A migration's state against a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Recorded and unchanged.
    Applied,
    /// Not yet applied.
    Pending,
    /// Applied, but the file changed since.
    Changed,
    /// Recorded in the ledger, but the file is gone.
    MissingFromDisk,
}

impl State {
    /// Display name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Applied => "applied",
            State::Pending => "pending",
            State::Changed => "changed-since-applied",
            State::MissingFromDisk => "missing-from-disk",
        }
    }
}

/// One line of `db status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Version.
    pub version: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: State,
}

/// A ledger row.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Version.
    pub version: String,
    /// Name.
    pub name: String,
    /// Statements as applied.
    pub statements: Vec<String>,
}

impl Applied {
    /// A ledger row as read: a missing name or statement list is empty.
    fn from_row(version: String, statements: Option<Vec<String>>, name: Option<String>) -> Self {
        Applied {
            version,
            name: name.unwrap_or_default(),
            statements: statements.unwrap_or_default(),
        }
    }
}

const PG_LEDGER: [&str; 4] = [
    "create schema if not exists supabase_migrations",
    "create table if not exists supabase_migrations.schema_migrations (version text not null primary key)",
    "alter table supabase_migrations.schema_migrations add column if not exists statements text[]",
    "alter table supabase_migrations.schema_migrations add column if not exists name text",
];
const SQLITE_LEDGER: &str = "create table if not exists atlas_schema_migrations \
    (version text not null primary key, statements text, name text, applied_at text)";

/// Creates the ledger if it does not exist.
pub fn ensure_ledger(store: &Store) -> BoxFuture<'_, Result<(), StoreError>> {
    Box::pin(ensure_ledger_inner(store))
}

async fn ensure_ledger_inner(store: &Store) -> Result<(), StoreError> {
    match store {
        #[cfg(feature = "postgres")]
        Store::Postgres(p) => {
            for s in PG_LEDGER {
                sqlx::raw_sql(s).execute(p).await?;
            }
        }
        #[cfg(feature = "sqlite")]
        Store::Sqlite(p) => {
            sqlx::raw_sql(SQLITE_LEDGER).execute(p).await?;
        }
    }
    Ok(())
}

/// The ledger, oldest first.
pub fn applied(store: &Store) -> BoxFuture<'_, Result<Vec<Applied>, StoreError>> {
    Box::pin(applied_inner(store))
}

async fn applied_inner(store: &Store) -> Result<Vec<Applied>, StoreError> {
    ensure_ledger(store).await?;
    let mut rows: Vec<Applied> = match store {
        #[cfg(feature = "postgres")]
        Store::Postgres(p) => {
            let rows: Vec<(String, Option<Vec<String>>, Option<String>)> = sqlx::query_as(
                "select version, statements, name from supabase_migrations.schema_migrations",
            )
            .fetch_all(p)
            .await?;
            rows.into_iter()
                .map(|(version, statements, name)| Applied::from_row(version, statements, name))
                .collect()
        }
        #[cfg(feature = "sqlite")]
        Store::Sqlite(p) => {
            let rows: Vec<(String, Option<String>, Option<String>)> =
                sqlx::query_as("select version, statements, name from atlas_schema_migrations")
                    .fetch_all(p)
                    .await?;
            rows.into_iter()
                .map(|(version, statements, name)| {
                    // The statements are kept as a JSON array.
                    let statements = statements.and_then(|s| serde_json::from_str(&s).ok());
                    Applied::from_row(version, statements, name)
                })
                .collect()
        }
    };
    rows.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(rows)
}

/// Each migration's state, plus ledger entries whose file is gone.
pub fn status<'a>(
    store: &'a Store,
    migrations: &'a [Migration],
) -> BoxFuture<'a, Result<Vec<Status>, StoreError>> {
    Box::pin(status_inner(store, migrations))
}

async fn status_inner(store: &Store, migrations: &[Migration]) -> Result<Vec<Status>, StoreError> {
    let ledger = applied(store).await?;
    let mut out: Vec<Status> = migrations
        .iter()
        .map(|m| {
            let state = match ledger.iter().find(|a| a.version == m.version) {
                None => State::Pending,
                Some(a) if a.statements == m.statements => State::Applied,
                Some(_) => State::Changed,
            };
            Status {
                version: m.version.clone(),
                name: m.name.clone(),
                state,
            }
        })
        .collect();
    for a in &ledger {
        if !migrations.iter().any(|m| m.version == a.version) {
            out.push(Status {
                version: a.version.clone(),
                name: a.name.clone(),
                state: State::MissingFromDisk,
            });
        }
    }
    out.sort_by(|a, b| a.version.cmp(&b.version));
    Ok(out)
}

/// Applies every pending migration, each in its own transaction with its ledger row.
/// Returns the versions applied (or, with `dry_run`, that would be).
pub fn up<'a>(
    store: &'a Store,
    migrations: &'a [Migration],
    dry_run: bool,
) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
    Box::pin(up_inner(store, migrations, dry_run))
}

async fn up_inner(
    store: &Store,
    migrations: &[Migration],
    dry_run: bool,
) -> Result<Vec<String>, StoreError> {
    let states = status(store, migrations).await?;
    let mut done = Vec::new();
    for m in migrations {
        let state = states
            .iter()
            .find(|s| s.version == m.version)
            .map(|s| s.state);
        if state != Some(State::Pending) {
            continue;
        }
        if !dry_run {
            apply(store, m).await.map_err(|e| {
                StoreError::Migration(format!("migration {} failed: {e}", m.file_name))
            })?;
            tracing::info!(version = %m.version, name = %m.name, "migration applied");
        }
        done.push(m.version.clone());
    }
    Ok(done)
}

fn apply<'a>(store: &'a Store, m: &'a Migration) -> BoxFuture<'a, Result<(), StoreError>> {
    Box::pin(apply_inner(store, m))
}

/// Runs `$m`'s statements, then `$ledger` (the query that records it in the ledger), in one
/// transaction of `$pool`.
macro_rules! apply_with_ledger {
    ($pool:expr, $m:expr, $ledger:expr) => {{
        let mut tx = $pool.begin().await?;
        for s in &$m.statements {
            sqlx::query(s).persistent(false).execute(&mut *tx).await?;
        }
        $ledger.execute(&mut *tx).await?;
        tx.commit().await?;
    }};
}

async fn apply_inner(store: &Store, m: &Migration) -> Result<(), StoreError> {
    match store {
        #[cfg(feature = "postgres")]
        Store::Postgres(p) => apply_with_ledger!(
            p,
            m,
            sqlx::query(
                "insert into supabase_migrations.schema_migrations (version, statements, name) values ($1, $2, $3)",
            )
            .bind(&m.version)
            .bind(&m.statements)
            .bind(&m.name)
        ),
        #[cfg(feature = "sqlite")]
        Store::Sqlite(p) => apply_with_ledger!(
            p,
            m,
            sqlx::query(
                "insert into atlas_schema_migrations (version, statements, name, applied_at) values (?1, ?2, ?3, ?4)",
            )
            .bind(&m.version)
            .bind(serde_json::to_string(&m.statements).unwrap_or_default())
            .bind(&m.name)
            .bind(chrono::Utc::now().to_rfc3339())
        ),
    }
    Ok(())
}

/// How serious a lint finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// Must be fixed.
    Error,
    /// Needs a deliberate decision (destructive statements).
    Warning,
}

/// One lint finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LintIssue {
    /// File.
    pub file: String,
    /// Severity.
    pub severity: Severity,
    /// What is wrong.
    pub message: String,
}

fn normalise(s: &str) -> String {
    let without_comments: Vec<&str> = s
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect();
    without_comments
        .join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Checks names, header comments, idempotency and destructive statements. SQLite has no
/// `ADD COLUMN IF NOT EXISTS`: its migrations are applied once each by the server (recorded in
/// its ledger), so a plain `ADD COLUMN` is accepted there.
pub fn lint(backend: Backend, file_names: &[String], migrations: &[Migration]) -> Vec<LintIssue> {
    let mut issues = Vec::new();
    let mut push = |file: &str, severity, message: String| {
        issues.push(LintIssue {
            file: file.to_owned(),
            severity,
            message,
        })
    };
    for name in file_names {
        if parse_file_name(name).is_none() {
            push(
                name,
                Severity::Error,
                "name must be <14-digit UTC timestamp>_<name>.sql".into(),
            );
        } else if !name[15..name.len() - 4]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            push(
                name,
                Severity::Error,
                "the name part must be lower_snake_case".into(),
            );
        }
    }
    let mut versions = std::collections::HashSet::new();
    for m in migrations {
        let f = m.file_name.as_str();
        if !versions.insert(&m.version) {
            push(
                f,
                Severity::Error,
                format!("version {} is used twice", m.version),
            );
        }
        if !m.sql.trim_start().starts_with("--") {
            push(
                f,
                Severity::Error,
                "start with a comment saying what the migration is for".into(),
            );
        }
        let mut dropped_policies: Vec<String> = Vec::new();
        for stmt in &m.statements {
            let s = normalise(stmt);
            let first: String = s.chars().take(60).collect();
            if s.starts_with("do ") || s.starts_with("do$") {
                continue; // guarded blocks decide for themselves
            }
            let needs = |prefix: &str| {
                s.starts_with(prefix) && !s.starts_with(&format!("{prefix} if not exists"))
            };
            if needs("create table")
                || needs("create schema")
                || needs("create extension")
                || needs("create sequence")
            {
                push(
                    f,
                    Severity::Error,
                    format!("not idempotent (add IF NOT EXISTS): {first}…"),
                );
            }
            if (s.starts_with("create index") || s.starts_with("create unique index"))
                && !s.contains(" index if not exists ")
                && !s.contains(" index concurrently if not exists ")
            {
                push(
                    f,
                    Severity::Error,
                    format!("not idempotent (CREATE INDEX IF NOT EXISTS): {first}…"),
                );
            }
            if s.starts_with("create function")
                || s.starts_with("create view")
                || s.starts_with("create trigger")
            {
                push(
                    f,
                    Severity::Error,
                    format!("not idempotent (use CREATE OR REPLACE): {first}…"),
                );
            }
            if s.starts_with("create role") || s.starts_with("create type") {
                push(
                    f,
                    Severity::Error,
                    format!("not idempotent (guard it in a DO block): {first}…"),
                );
            }
            if backend == Backend::Postgres
                && s.contains(" add column ")
                && !s.contains(" add column if not exists ")
            {
                push(
                    f,
                    Severity::Error,
                    format!("not idempotent (ADD COLUMN IF NOT EXISTS): {first}…"),
                );
            }
            if let Some(rest) = s.strip_prefix("drop policy if exists ") {
                dropped_policies.push(rest.split(" on ").next().unwrap_or("").to_owned());
            }
            if let Some(rest) = s.strip_prefix("create policy ") {
                let name = rest.split(" on ").next().unwrap_or("");
                if !dropped_policies.iter().any(|d| d == name) {
                    push(
                        f,
                        Severity::Error,
                        format!("not idempotent (DROP POLICY IF EXISTS {name} first)"),
                    );
                }
            }
            for (pattern, what) in [
                ("drop table", "drops a table"),
                ("drop schema", "drops a schema"),
                (" drop column ", "drops a column"),
                ("truncate ", "truncates a table"),
                (" alter column ", "changes a column"),
            ] {
                if s.starts_with(pattern) || s.contains(pattern) && pattern.starts_with(' ') {
                    push(
                        f,
                        Severity::Warning,
                        format!("destructive: {what}: {first}…"),
                    );
                }
            }
            if s.starts_with("delete from") && !s.contains(" where ") {
                push(
                    f,
                    Severity::Warning,
                    format!("destructive: deletes every row: {first}…"),
                );
            }
        }
    }
    issues
}

/// Migrations and statements of one month, for `db list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MonthCounts {
    /// `YYYY-MM` of the migrations' versions.
    pub month: String,
    /// Migrations in that month.
    pub migrations: usize,
    /// Statements by kind (`create table`, `create index`, `alter table`, `create policy`…).
    pub kinds: std::collections::BTreeMap<String, usize>,
}

/// The kind of a statement: its verb and object, e.g. `create index` for
/// `CREATE UNIQUE INDEX …`, `create function` for `CREATE OR REPLACE FUNCTION …`.
pub fn statement_kind(stmt: &str) -> String {
    let s = normalise(stmt);
    let mut words = s
        .split(|c: char| c.is_whitespace() || c == '(' || c == '$')
        .filter(|w| !w.is_empty() && !matches!(*w, "or" | "replace" | "unique" | "concurrently"));
    let first = words.next().unwrap_or("");
    match first {
        "create" | "alter" | "drop" => format!("{first} {}", words.next().unwrap_or("")),
        _ => first.to_owned(),
    }
}

/// Counts per month and statement kind, oldest month first.
pub fn counts(migrations: &[Migration]) -> Vec<MonthCounts> {
    let mut by_month: std::collections::BTreeMap<String, MonthCounts> = Default::default();
    for m in migrations {
        let month = format!("{}-{}", &m.version[..4], &m.version[4..6]);
        let entry = by_month
            .entry(month.clone())
            .or_insert_with(|| MonthCounts {
                month,
                migrations: 0,
                kinds: Default::default(),
            });
        entry.migrations += 1;
        for s in &m.statements {
            *entry.kinds.entry(statement_kind(s)).or_default() += 1;
        }
    }
    by_month.into_values().collect()
}

/// Creates a new migration pair (Postgres and SQLite) stamped with `now`; returns the paths.
pub fn new_migration(
    root: &Path,
    name: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<PathBuf>, StoreError> {
    let clean: String = name
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let clean = clean.trim_matches('_').to_owned();
    if clean.is_empty() {
        return Err(StoreError::Migration(
            "give the migration a name, e.g. `db new add_language_column`".into(),
        ));
    }
    let file = format!("{}_{clean}.sql", now.format("%Y%m%d%H%M%S"));
    let mut paths = Vec::new();
    for (folder, note) in [
        (
            POSTGRES_FOLDER,
            "PostgreSQL (applied unchanged by `supabase db push`)",
        ),
        (
            SQLITE_FOLDER,
            "SQLite edition of the Postgres migration with the same version",
        ),
    ] {
        let dir = root.join(folder);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::Io(format!("{}: {e}", dir.display())))?;
        let path = dir.join(&file);
        if path.exists() {
            return Err(StoreError::Migration(format!(
                "{} already exists",
                path.display()
            )));
        }
        let body = format!(
            "-- Purpose: TODO say what this migration is for and why.\n-- {note}.\n-- Keep it idempotent: IF NOT EXISTS, CREATE OR REPLACE, DROP POLICY IF EXISTS.\n\n"
        );
        std::fs::write(&path, body)
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        paths.push(path);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_respecting_quotes_dollars_and_comments() {
        let sql = "-- header; not a statement\ncreate table a (x text default 'a;b');\n\
                   do $$ begin perform 1; end $$;\n\
                   create function f() returns int language sql as $f$ select 1; $f$;\n\
                   /* block; comment */ select \"we;ird\";\n-- trailing comment\n";
        let s = split_statements(sql);
        assert_eq!(s.len(), 4, "{s:#?}");
        assert!(s[0].starts_with("-- header; not a statement\ncreate table a"));
        assert!(s[1].starts_with("do $$"));
        assert!(s[2].ends_with("$f$"));
        assert!(s[3].contains("\"we;ird\""));
    }

    #[test]
    fn embedded_migrations_are_well_formed_and_lint_clean() {
        for backend in [Backend::Postgres, Backend::Sqlite] {
            let ms = embedded(backend);
            assert!(!ms.is_empty());
            let names: Vec<String> = ms.iter().map(|m| m.file_name.clone()).collect();
            let issues = lint(backend, &names, &ms);
            assert!(issues.is_empty(), "{backend:?}: {issues:#?}");
        }
    }

    #[test]
    fn lint_flags_what_it_should() {
        let bad = "create table t (id int);\ncreate index i on t (id);\n\
                   create policy p on t for select using (true);\nalter table t drop column x;\ndelete from t;";
        let ms = vec![from_parts("20260101000000_bad.sql", bad).unwrap()];
        let names = vec![
            "20260101000000_bad.sql".to_owned(),
            "2026_oops.sql".to_owned(),
        ];
        let issues = lint(Backend::Postgres, &names, &ms);
        let text = format!("{issues:#?}");
        assert!(text.contains("name must be"), "{text}");
        assert!(text.contains("start with a comment"));
        assert!(text.contains("IF NOT EXISTS"));
        assert!(text.contains("CREATE INDEX IF NOT EXISTS"));
        assert!(text.contains("DROP POLICY IF EXISTS"));
        assert!(text.contains("drops a column"));
        assert!(text.contains("deletes every row"));
    }

    #[test]
    fn sqlite_may_add_columns_without_if_not_exists_postgres_may_not() {
        let sql = "-- Purpose: a column.\nalter table t add column c integer;\n";
        let ms = vec![from_parts("20260101000000_c.sql", sql).unwrap()];
        let names = vec!["20260101000000_c.sql".to_owned()];
        assert!(lint(Backend::Sqlite, &names, &ms).is_empty());
        let pg = lint(Backend::Postgres, &names, &ms);
        assert!(
            format!("{pg:?}").contains("ADD COLUMN IF NOT EXISTS"),
            "{pg:?}"
        );
    }

    #[test]
    fn counts_group_by_month_and_statement_kind() {
        let a = from_parts(
            "20261101000000_a.sql",
            "-- a\ncreate table if not exists t (x int);\ncreate unique index if not exists i on t (x);\n",
        )
        .unwrap();
        let b = from_parts(
            "20261124000000_b.sql",
            "-- b\ncreate or replace function f() returns int language sql as $$ select 1 $$;\ncreate index if not exists j on t (x);\n",
        )
        .unwrap();
        let c = from_parts("20261201000000_c.sql", "-- c\ngrant select on t to anon;\n").unwrap();
        let counts = counts(&[a, b, c]);
        assert_eq!(counts.len(), 2);
        assert_eq!(counts[0].month, "2026-11");
        assert_eq!(counts[0].migrations, 2);
        assert_eq!(counts[0].kinds.get("create index"), Some(&2));
        assert_eq!(counts[0].kinds.get("create table"), Some(&1));
        assert_eq!(counts[0].kinds.get("create function"), Some(&1));
        assert_eq!(counts[1].kinds.get("grant"), Some(&1));
    }

    #[test]
    fn new_migration_creates_a_pair() {
        let dir = std::env::temp_dir().join(format!("atlas-new-{}", uuid::Uuid::new_v4()));
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-24T10:20:30Z")
            .unwrap()
            .to_utc();
        let paths = new_migration(&dir, "Add language column", now).unwrap();
        assert_eq!(paths.len(), 2);
        assert!(paths[0].ends_with("supabase/migrations/20261124102030_add_language_column.sql"));
        assert!(
            new_migration(&dir, "Add language column", now).is_err(),
            "no overwrite"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
