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
