//! Live-schema introspection and comparison, for `db diff`: tables and columns, indexes and
//! row-level-security policies of the application's tables.

use std::collections::{BTreeMap, BTreeSet};

use crate::{BoxFuture, Store, StoreError};

/// The parts of a schema `db diff` compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schema {
    /// table → column → type.
    pub columns: BTreeMap<String, BTreeMap<String, String>>,
    /// `table.index`.
    pub indexes: BTreeSet<String>,
    /// `table: policy`.
    pub policies: BTreeSet<String>,
}

const LEDGERS: [&str; 1] = ["atlas_schema_migrations"];

/// Reads the live schema of the application's tables.
pub fn introspect(store: &Store) -> BoxFuture<'_, Result<Schema, StoreError>> {
    Box::pin(introspect_inner(store))
}

async fn introspect_inner(store: &Store) -> Result<Schema, StoreError> {
    let mut schema = Schema::default();
    match store {
        #[cfg(feature = "postgres")]
        Store::Postgres(p) => {
            let cols: Vec<(String, String, String)> = sqlx::query_as(
                "select table_name::text, column_name::text, data_type::text from information_schema.columns \
                 where table_schema = 'public' order by table_name, ordinal_position",
            )
            .fetch_all(p)
            .await?;
            for (t, c, ty) in cols {
                schema.columns.entry(t).or_default().insert(c, ty);
            }
            let idx: Vec<(String, String)> = sqlx::query_as(
                "select tablename::text, indexname::text from pg_indexes where schemaname = 'public'",
            )
            .fetch_all(p)
            .await?;
            schema.indexes = idx.into_iter().map(|(t, i)| format!("{t}.{i}")).collect();
            let pol: Vec<(String, String)> = sqlx::query_as(
                "select tablename::text, policyname::text from pg_policies where schemaname = 'public'",
            )
            .fetch_all(p)
            .await?;
            schema.policies = pol.into_iter().map(|(t, n)| format!("{t}: {n}")).collect();
        }
        #[cfg(feature = "sqlite")]
        Store::Sqlite(p) => {
            let tables: Vec<(String,)> = sqlx::query_as(
                "select name from sqlite_master where type = 'table' and name not like 'sqlite_%' order by name",
            )
            .fetch_all(p)
            .await?;
            for (t,) in tables {
                if LEDGERS.contains(&t.as_str()) {
                    continue;
                }
                let cols: Vec<(String, String)> =
                    sqlx::query_as("select name, type from pragma_table_info(?1)")
                        .bind(&t)
                        .fetch_all(p)
                        .await?;
                schema.columns.insert(
                    t,
                    cols.into_iter()
                        .map(|(c, ty)| (c, ty.to_lowercase()))
                        .collect(),
                );
            }
            let idx: Vec<(String, String)> = sqlx::query_as(
                "select tbl_name, name from sqlite_master where type = 'index' and name not like 'sqlite_%'",
            )
            .fetch_all(p)
            .await?;
            schema.indexes = idx
                .into_iter()
                .filter(|(t, _)| !LEDGERS.contains(&t.as_str()))
                .map(|(t, i)| format!("{t}.{i}"))
                .collect();
        }
    }
    Ok(schema)
}

/// Differences between what the migrations produce (`expected`) and the database (`live`):
/// `+` for things only in the database, `-` for things it lacks, `~` for changed types.
pub fn diff(expected: &Schema, live: &Schema) -> Vec<String> {
    let mut out = Vec::new();
    let tables: BTreeSet<&String> = expected.columns.keys().chain(live.columns.keys()).collect();
    for t in tables {
        match (expected.columns.get(t), live.columns.get(t)) {
            (Some(_), None) => out.push(format!("- table {t}")),
            (None, Some(_)) => out.push(format!("+ table {t}")),
            (Some(e), Some(l)) => {
                for (c, ty) in l {
                    match e.get(c) {
                        None => out.push(format!("+ column {t}.{c} ({ty})")),
                        Some(ety) if ety != ty => {
                            out.push(format!("~ column {t}.{c}: {ety} → {ty}"))
                        }
                        _ => {}
                    }
                }
                for (c, ty) in e {
                    if !l.contains_key(c) {
                        out.push(format!("- column {t}.{c} ({ty})"));
                    }
                }
            }
            (None, None) => {}
        }
    }
    for i in live.indexes.difference(&expected.indexes) {
        out.push(format!("+ index {i}"));
    }
    for i in expected.indexes.difference(&live.indexes) {
        out.push(format!("- index {i}"));
    }
    for p in live.policies.difference(&expected.policies) {
        out.push(format!("+ policy {p}"));
    }
    for p in expected.policies.difference(&live.policies) {
        out.push(format!("- policy {p}"));
    }
    out
}

/// The schema `migrations` produce, built in a scratch database next to `url` (an in-memory
/// SQLite database, or a temporary Postgres database created and dropped here, which needs
/// the CREATEDB privilege).
pub fn expected<'a>(
    url: &'a str,
    migrations: &'a [crate::migrate::Migration],
) -> BoxFuture<'a, Result<Schema, StoreError>> {
    Box::pin(async move {
        match crate::backend_of(url)? {
            crate::Backend::Sqlite => {
                let scratch = Store::connect("sqlite::memory:").await?;
                crate::migrate::up(&scratch, migrations, false).await?;
                let schema = introspect(&scratch).await;
                scratch.close().await;
                schema
            }
            crate::Backend::Postgres => {
                let admin = Store::connect(url).await?;
                let name = format!("atlas_diff_{}", uuid::Uuid::new_v4().simple());
                admin
                    .execute_admin(&format!("create database {name}"))
                    .await?;
                let mut scratch_url = url::Url::parse(url)
                    .map_err(|e| StoreError::Config(format!("DATABASE_URL: {e}")))?;
                scratch_url.set_path(&format!("/{name}"));
                let result = async {
                    let scratch = Store::connect(scratch_url.as_str()).await?;
                    crate::migrate::up(&scratch, migrations, false).await?;
                    let schema = introspect(&scratch).await;
                    scratch.close().await;
                    schema
                }
                .await;
                let _ = admin
                    .execute_admin(&format!("drop database if exists {name} with (force)"))
                    .await;
                admin.close().await;
                result
            }
        }
    })
}

/// A migration pair that turns drift found in a live database into migrations: the Postgres
/// and SQLite texts, and the differences that cannot be pulled (things the database lacks or
/// changed types, which need a migration written by hand).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pull {
    /// Statements for `supabase/migrations/` (idempotent: IF NOT EXISTS).
    pub postgres: Vec<String>,
    /// Statements for `supabase/sqlite-migrations/`.
    pub sqlite: Vec<String>,
    /// What was pulled, as `db diff` lines.
    pub pulled: Vec<String>,
    /// Differences left for a hand-written migration.
    pub skipped: Vec<String>,
}

impl Pull {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.pulled.is_empty()
    }
}

/// One live column as DDL: type, nullability and default.
#[derive(Clone, Debug)]
struct ColumnDef {
    /// Postgres type (`format_type`) or SQLite declared type.
    sql_type: String,
    not_null: bool,
    default: Option<String>,
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn sqlite_type(pg: &str) -> &'static str {
    let t = pg.to_lowercase();
    if t.contains("int") || t == "boolean" {
        "integer"
    } else if t.contains("double") || t == "real" || t.starts_with("numeric") {
        "real"
    } else if t == "bytea" {
        "blob"
    } else {
        "text"
    }
}

fn postgres_type(sqlite: &str) -> &'static str {
    let t = sqlite.to_lowercase();
    if t.contains("int") {
        "bigint"
    } else if t.contains("real") || t.contains("floa") || t.contains("doub") {
        "double precision"
    } else if t.contains("blob") {
        "bytea"
    } else {
        "text"
    }
}

/// A default both databases accept unchanged (a number, a quoted string, true/false, null),
/// with Postgres casts stripped (`'x'::text` → `'x'`).
fn portable_default(d: &str) -> Option<String> {
    let d = d.trim();
    let base = match d.find("::") {
        Some(i) if d.starts_with('\'') => &d[..i],
        _ => d,
    };
    let numeric = base.parse::<f64>().is_ok();
    let quoted = base.len() >= 2 && base.starts_with('\'') && base.ends_with('\'');
    (numeric || quoted || matches!(base, "true" | "false" | "null" | "NULL"))
        .then(|| base.to_owned())
}

async fn column_def(
    store: &Store,
    table: &str,
    column: &str,
) -> Result<Option<ColumnDef>, StoreError> {
    match store {
        #[cfg(feature = "postgres")]
        Store::Postgres(p) => {
            let row: Option<(String, bool, Option<String>)> = sqlx::query_as(
                "select format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid) \
                 from pg_attribute a join pg_class c on c.oid = a.attrelid \
                 join pg_namespace n on n.oid = c.relnamespace \
                 left join pg_attrdef d on d.adrelid = a.attrelid and d.adnum = a.attnum \
                 where n.nspname = 'public' and c.relname = $1 and a.attname = $2 and not a.attisdropped",
            )
            .bind(table)
            .bind(column)
            .fetch_optional(p)
            .await?;
            Ok(row.map(|(sql_type, not_null, default)| ColumnDef {
                sql_type,
                not_null,
                default,
            }))
        }
        #[cfg(feature = "sqlite")]
        Store::Sqlite(p) => {
            let row: Option<(String, bool, Option<String>)> = sqlx::query_as(
                "select type, \"notnull\", dflt_value from pragma_table_info(?1) where name = ?2",
            )
            .bind(table)
            .bind(column)
            .fetch_optional(p)
            .await?;
            Ok(row.map(|(sql_type, not_null, default)| ColumnDef {
                sql_type: sql_type.to_lowercase(),
                not_null,
                default,
            }))
        }
    }
}

/// `(unique, method, column list)` of a live index, e.g. `(false, "btree", "(notes, id desc)")`.
async fn index_def(
    store: &Store,
    table: &str,
    index: &str,
) -> Result<Option<(bool, String, String)>, StoreError> {
    let ddl: Option<(String,)> = match store {
        #[cfg(feature = "postgres")]
        Store::Postgres(p) => {
            sqlx::query_as(
                "select indexdef from pg_indexes where schemaname = 'public' and tablename = $1 and indexname = $2",
            )
            .bind(table)
            .bind(index)
            .fetch_optional(p)
            .await?
        }
        #[cfg(feature = "sqlite")]
        Store::Sqlite(p) => {
            sqlx::query_as(
                "select sql from sqlite_master where type = 'index' and tbl_name = ?1 and name = ?2 and sql is not null",
            )
            .bind(table)
            .bind(index)
            .fetch_optional(p)
            .await?
        }
    };
    Ok(ddl.and_then(|(ddl,)| {
        let lower = ddl.to_lowercase();
        let unique = lower.starts_with("create unique index");
        let method = lower
            .split(" using ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("btree")
            .to_owned();
        // The column list: from the first parenthesis after the table name.
        let on = lower.find(" on ")?;
        let open = on + ddl[on..].find('(')?;
        let cols = ddl[open..].trim().to_owned();
        (!lower.contains(" where ")).then_some((unique, method, cols))
    }))
}

/// The definition `find` gives for `name` (`table.column` or `table.index`), with the name's
/// two parts; `None` (the line is skipped) when the name has no dot, `find` finds nothing, or
/// a part is not a plain identifier (safe to write into a migration).
async fn definition<'n, T, F>(
    name: &'n str,
    find: impl FnOnce(&'n str, &'n str) -> F,
) -> Result<Option<(&'n str, &'n str, T)>, StoreError>
where
    F: std::future::Future<Output = Result<Option<T>, StoreError>>,
{
    let Some((table, item)) = name.split_once('.') else {
        return Ok(None);
    };
    let def = find(table, item).await?;
    Ok(def
        .filter(|_| is_ident(table) && is_ident(item))
        .map(|d| (table, item, d)))
}

/// Turns the `+` lines of `diff(expected, live)` — columns and indexes added to existing
/// tables by hand — into an idempotent migration pair; everything else is listed as skipped.
pub fn pull<'a>(
    store: &'a Store,
    expected: &'a Schema,
    live: &'a Schema,
) -> BoxFuture<'a, Result<Pull, StoreError>> {
    Box::pin(async move {
        let mut out = Pull::default();
        let from_pg = store.backend() == crate::Backend::Postgres;
        for line in diff(expected, live) {
            if let Some(rest) = line.strip_prefix("+ column ") {
                let name = rest.split(' ').next().unwrap_or("");
                let found = definition(name, |t, c| column_def(store, t, c)).await?;
                let Some((table, column, def)) = found else {
                    out.skipped.push(line);
                    continue;
                };
                let (pg_type, lite_type) = if from_pg {
                    (def.sql_type.clone(), sqlite_type(&def.sql_type).to_owned())
                } else {
                    (
                        postgres_type(&def.sql_type).to_owned(),
                        def.sql_type.clone(),
                    )
                };
                let default = def.default.as_deref().and_then(portable_default);
                if def.default.is_some() && default.is_none() {
                    // An expression default (now(), a sequence…) needs a hand-written migration.
                    out.skipped
                        .push(format!("{line}: default {:?} is not portable", def.default));
                    continue;
                }
                let mut tail = String::new();
                if let Some(d) = &default {
                    tail.push_str(&format!(" default {d}"));
                }
                if def.not_null {
                    if default.is_none() {
                        out.skipped
                            .push(format!("{line}: NOT NULL without a default"));
                        continue;
                    }
                    tail.push_str(" not null");
                }
                out.postgres.push(format!(
                    "alter table public.{table} add column if not exists {column} {pg_type}{tail}"
                ));
                out.sqlite.push(format!(
                    "alter table {table} add column {column} {lite_type}{tail}"
                ));
                out.pulled.push(line);
            } else if let Some(rest) = line.strip_prefix("+ index ") {
                let found = definition(rest, |t, i| index_def(store, t, i)).await?;
                let Some((table, index, (unique, method, cols))) = found else {
                    out.skipped.push(line);
                    continue;
                };
                let unique = if unique { "unique " } else { "" };
                out.postgres.push(format!(
                    "create {unique}index if not exists {index} on public.{table} using {method} {cols}"
                ));
                if method == "btree" {
                    out.sqlite.push(format!(
                        "create {unique}index if not exists {index} on {table} {cols}"
                    ));
                }
                out.pulled.push(line);
            } else {
                out.skipped.push(line);
            }
        }
        Ok(out)
    })
}

/// The text of one migration file of a pulled pair.
pub fn pull_file(statements: &[String], backend: crate::Backend, pulled: &[String]) -> String {
    let mut text = String::from(
        "-- Purpose: bring the migrations in line with changes made directly in the database\n\
         -- (pulled by `atlas-voice db pull`):\n",
    );
    for p in pulled {
        text.push_str(&format!("--   {p}\n"));
    }
    if backend == crate::Backend::Sqlite {
        text.push_str(
            "-- SQLite edition of the Postgres migration with the same version (SQLite has no\n\
             -- ADD COLUMN IF NOT EXISTS; the server applies each migration once).\n",
        );
    }
    text.push('\n');
    for s in statements {
        text.push_str(s);
        text.push_str(";\n");
    }
    text
}
