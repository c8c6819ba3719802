//! `atlas-voice db` against a real PostgreSQL: `pull` turns drift made by hand into a
//! migration pair that lints clean, applies to a fresh database and leaves no drift; `list`,
//! `status`, `lint` and `diff` speak JSON for scripts.

use std::path::Path;
use std::process::Command;

use atlas_store::Store;

use atlas_testkit::PgDb;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A project root with a copy of the repository's migrations.
fn project() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for folder in ["supabase/migrations", "supabase/sqlite-migrations"] {
        copy_dir(&repo.join(folder), &root.path().join(folder));
    }
    root
}

/// Runs `atlas-voice db ARGS` on `url` in `root`; returns (exit code, stdout, stderr).
fn db(root: &Path, url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_atlas-voice"))
        .arg("db")
        .args(args)
        .arg("--root")
        .arg(root)
        .arg("--database-url")
        .arg(url)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn pull_turns_drift_into_a_migration_pair_that_leaves_no_drift() {
    let root = project();
    let root = root.path();
    let live = PgDb::new().await;
    let (code, out, err) = db(root, &live.url(), &["up", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    // Someone adds a column and an index in the dashboard.
    live.sql("alter table voice_sessions add column notes text default 'none'")
        .await;
    live.sql("create index voice_sessions_notes_idx on voice_sessions (notes, started_at desc)")
        .await;
    let (code, out, _) = db(root, &live.url(), &["diff", "--json"]);
    assert_eq!(code, 1);
    let diff = json(&out);
    assert_eq!(
        diff["differences"],
        serde_json::json!([
            "+ column voice_sessions.notes (text)",
            "+ index voice_sessions.voice_sessions_notes_idx"
        ])
    );
    // Pull: a new pair, lint-clean.
    let (code, out, err) = db(root, &live.url(), &["pull", "notes_from_dashboard"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = db(root, &live.url(), &["lint", "--json"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(json(&out)["issues"], serde_json::json!([]));
    // The live database already has the changes: `up` records the migration (idempotent).
    let (code, out, err) = db(root, &live.url(), &["up", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied 1 migrations"), "{out}");
    let (code, out, _) = db(root, &live.url(), &["diff", "--json"]);
    assert_eq!(
        (code, json(&out)["differences"].clone()),
        (0, serde_json::json!([]))
    );
    let (code, out, _) = db(root, &live.url(), &["status", "--json"]);
    assert_eq!(code, 0);
    let states = json(&out)["migrations"].clone();
    assert!(
        states
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "applied"),
        "{states}"
    );
    // A fresh database built from the migrations alone matches the live one.
    let fresh = PgDb::new().await;
    let (code, out, err) = db(root, &fresh.url(), &["up", "--yes"]);
    assert_eq!(code, 0, "{out}{err}");
    let a = atlas_store::schema::introspect(&Store::connect(&live.url()).await.unwrap())
        .await
        .unwrap();
    let b = atlas_store::schema::introspect(&Store::connect(&fresh.url()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(atlas_store::schema::diff(&a, &b), Vec::<String>::new());
    // The SQLite edition applies too and has the column and the index.
    let sqlite = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}/atlas.db", sqlite.path().display());
    let (code, out, err) = db(root, &sqlite_url, &["up"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = db(root, &sqlite_url, &["diff", "--json"]);
    assert_eq!(
        (code, json(&out)["differences"].clone()),
        (0, serde_json::json!([]))
    );
    let s = atlas_store::schema::introspect(&Store::connect(&sqlite_url).await.unwrap())
        .await
        .unwrap();
    assert!(s.columns["voice_sessions"].contains_key("notes"));
    assert!(
        s.indexes
            .contains("voice_sessions.voice_sessions_notes_idx")
    );
    // Nothing more to pull.
    let (code, out, _) = db(root, &live.url(), &["pull"]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to pull"), "{out}");
}

#[tokio::test]
async fn list_counts_migrations_per_month_and_kind_as_json() {
    let root = project();
    let (code, out, _) = db(root.path(), "sqlite::memory:", &["list", "--json"]);
    assert_eq!(code, 0);
    let v = json(&out);
    let pg = &v["postgres"];
    let listed = pg["migrations"].as_array().unwrap().len();
    assert!(listed >= 4);
    let months = pg["by_month"].as_array().unwrap();
    let total: u64 = months
        .iter()
        .map(|m| m["migrations"].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, listed);
    assert!(months[0]["kinds"]["create table"].as_u64().unwrap() >= 2);
    let (code, out, _) = db(root.path(), "sqlite::memory:", &["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("2026-11: "), "{out}");
}
