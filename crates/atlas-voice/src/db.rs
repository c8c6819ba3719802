//! `atlas-voice db`: create, list, check, apply, compare and lint migrations.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use atlas_store::migrate::{self, Migration, Severity, State};
use atlas_store::{Backend, Store, backend_of, is_local, schema};

/// Arguments of `db`.
#[derive(Args)]
pub struct DbArgs {
    /// Database (defaults to DATABASE_URL / the configuration).
    #[arg(long, env = "DATABASE_URL", global = true)]
    database_url: Option<String>,
    /// Read the migrations from this project root (holding `supabase/migrations` and
    /// `supabase/sqlite-migrations`) instead of the ones compiled into the binary: for
    /// development, to see edits without rebuilding. `new` writes there (default: `.`).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Print JSON for scripts (status, list, lint, diff).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: DbCommand,
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create a new migration pair (Postgres and SQLite) named NAME.
    New {
        /// What the migration does, e.g. add_language_column.
        name: String,
    },
    /// List the migration files with their statement counts, and the counts per month and
    /// statement kind.
    List,
    /// Show each migration as applied, pending, changed-since-applied or missing-from-disk.
    Status,
    /// Apply pending migrations, each in a transaction.
    Up {
        /// Show what would be applied without applying it.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation on a remote database.
        #[arg(long)]
        yes: bool,
    },
    /// Compare the live schema with the schema the migrations produce.
    Diff,
    /// Check names, header comments, idempotency and destructive statements.
    Lint,
    /// Turn drift found by `diff` (columns and indexes added to the live database by hand)
    /// into a new migration pair.
    Pull {
        /// Name of the new migration.
        #[arg(default_value = "pulled_from_database")]
        name: String,
    },
}

fn folder(root: &Path, backend: Backend) -> PathBuf {
    root.join(match backend {
        Backend::Postgres => migrate::POSTGRES_FOLDER,
        Backend::Sqlite => migrate::SQLITE_FOLDER,
    })
}

/// The file names (all of them, for lint) and migrations: from `root` when given, else the
/// ones compiled into the binary.
/// The database's live schema and the one its migrations produce.
async fn live_and_expected(
    url: String,
    root: Option<&Path>,
) -> anyhow::Result<(Store, Backend, schema::Schema, schema::Schema)> {
    let backend = backend_of(&url)?;
    let (_, ms) = load(root, backend)?;
    let store = Store::connect(&url).await?;
    let live = schema::introspect(&store).await?;
    let expected = schema::expected(&url, &ms).await?;
    Ok((store, backend, live, expected))
}

fn load(root: Option<&Path>, backend: Backend) -> anyhow::Result<(Vec<String>, Vec<Migration>)> {
    match root {
        Some(root) => Ok(migrate::load_dir(&folder(root, backend))?),
        None => {
            let ms = migrate::embedded(backend);
            Ok((ms.iter().map(|m| m.file_name.clone()).collect(), ms))
        }
    }
}

/// Where the migrations are read from, for messages.
fn source(root: Option<&Path>, backend: Backend) -> String {
    match root {
        Some(root) => folder(root, backend).display().to_string(),
        None => "this binary".into(),
    }
}

/// Runs a `db` subcommand; returns the process exit code.
pub async fn run(args: DbArgs) -> anyhow::Result<i32> {
    let url = || -> anyhow::Result<String> {
        match &args.database_url {
            Some(u) => Ok(u.clone()),
            None => Ok(atlas_server::Config::load_unvalidated(None)?.database_url),
        }
    };
    let root = args.root.as_deref();
    match args.command {
        DbCommand::New { name } => {
            let root = root.unwrap_or(Path::new("."));
            for p in migrate::new_migration(root, &name, chrono::Utc::now())? {
                println!("created {}", p.display());
            }
            Ok(0)
        }
        DbCommand::List => {
            let mut report = serde_json::Map::new();
            for backend in [Backend::Postgres, Backend::Sqlite] {
                let (_, ms) = load(root, backend)?;
                let counts = migrate::counts(&ms);
                if args.json {
                    report.insert(
                        label(backend).into(),
                        serde_json::json!({
                            "folder": source(root, backend),
                            "migrations": ms.iter().map(|m| serde_json::json!({
                                "version": m.version, "name": m.name,
                                "statements": m.statements.len(),
                            })).collect::<Vec<_>>(),
                            "by_month": counts.iter().map(|c| serde_json::json!({
                                "month": c.month, "migrations": c.migrations, "kinds": c.kinds,
                            })).collect::<Vec<_>>(),
                        }),
                    );
                    continue;
                }
                println!(
                    "{} ({} migrations in {}):",
                    label(backend),
                    ms.len(),
                    source(root, backend)
                );
                for m in &ms {
                    println!(
                        "  {}  {:<32} {} statements",
                        m.version,
                        m.name,
                        m.statements.len()
                    );
                }
                for c in &counts {
                    let kinds: Vec<String> =
                        c.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
                    println!(
                        "  {}: {} migrations; {}",
                        c.month,
                        c.migrations,
                        kinds.join(", ")
                    );
                }
            }
            if args.json {
                println!("{}", serde_json::Value::Object(report));
            }
            Ok(0)
        }
        DbCommand::Lint => {
            let mut errors = 0;
            let mut warnings = 0;
            let mut found = Vec::new();
            for backend in [Backend::Postgres, Backend::Sqlite] {
                let (names, ms) = load(root, backend)?;
                for issue in migrate::lint(backend, &names, &ms) {
                    let tag = match issue.severity {
                        Severity::Error => {
                            errors += 1;
                            "error"
                        }
                        Severity::Warning => {
                            warnings += 1;
                            "warning"
                        }
                    };
                    if args.json {
                        found.push(serde_json::json!({
                            "backend": label(backend), "file": issue.file,
                            "severity": tag, "message": issue.message,
                        }));
                    } else {
                        println!(
                            "{tag}: {}/{}: {}",
                            label(backend),
                            issue.file,
                            issue.message
                        );
                    }
                }
            }
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"errors": errors, "warnings": warnings, "issues": found})
                );
            } else {
                println!("{errors} errors, {warnings} warnings");
            }
            Ok(if errors > 0 { 1 } else { 0 })
        }
        DbCommand::Status => {
            let url = url()?;
            let backend = backend_of(&url)?;
            let (_, ms) = load(root, backend)?;
            let store = Store::connect(&url).await?;
            let states = migrate::status(&store, &ms).await?;
            let count = |st: State| states.iter().filter(|s| s.state == st).count();
            if args.json {
                let rows: Vec<serde_json::Value> = states
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "version": s.version, "name": s.name, "state": s.state.as_str(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "backend": label(backend), "migrations": rows })
                );
            } else {
                for s in &states {
                    println!("{}  {:<32} {}", s.version, s.name, s.state.as_str());
                }
                println!(
                    "{} applied, {} pending, {} changed since applied, {} missing from disk",
                    count(State::Applied),
                    count(State::Pending),
                    count(State::Changed),
                    count(State::MissingFromDisk)
                );
            }
            Ok(
                if count(State::Changed) + count(State::MissingFromDisk) > 0 {
                    1
                } else {
                    0
                },
            )
        }
        DbCommand::Up { dry_run, yes } => {
            let url = url()?;
            let backend = backend_of(&url)?;
            let (_, ms) = load(root, backend)?;
            let store = Store::connect(&url).await?;
            let pending = migrate::up(&store, &ms, true).await?;
            if pending.is_empty() {
                println!("nothing to apply");
                return Ok(0);
            }
            for v in &pending {
                let m = ms.iter().find(|m| &m.version == v).expect("listed");
                println!(
                    "{} {}",
                    if dry_run { "would apply" } else { "applying" },
                    m.file_name
                );
            }
            if dry_run {
                return Ok(0);
            }
            if !is_local(&url) && !yes && !confirm("apply these migrations to a remote database?")?
            {
                println!("cancelled");
                return Ok(1);
            }
            let done = migrate::up(&store, &ms, false).await?;
            println!("applied {} migrations", done.len());
            Ok(0)
        }
        DbCommand::Diff => {
            let (_, backend, live, expected) = live_and_expected(url()?, root).await?;
            let lines = schema::diff(&expected, &live);
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "backend": label(backend), "differences": lines })
                );
                Ok(if lines.is_empty() { 0 } else { 1 })
            } else if lines.is_empty() {
                println!("the live schema matches the migrations");
                Ok(0)
            } else {
                println!("differences (+ only in the database, - missing from it, ~ changed):");
                for l in &lines {
                    println!("  {l}");
                }
                Ok(1)
            }
        }
        DbCommand::Pull { name } => {
            let (store, _, live, expected) = live_and_expected(url()?, root).await?;
            let pull = schema::pull(&store, &expected, &live).await?;
            for s in &pull.skipped {
                eprintln!("not pulled (write a migration by hand): {s}");
            }
            if pull.is_empty() {
                println!("nothing to pull: no column or index was added by hand");
                return Ok(if pull.skipped.is_empty() { 0 } else { 1 });
            }
            let paths =
                migrate::new_migration(root.unwrap_or(Path::new(".")), &name, chrono::Utc::now())?;
            for (path, backend) in paths.iter().zip([Backend::Postgres, Backend::Sqlite]) {
                let statements = match backend {
                    Backend::Postgres => &pull.postgres,
                    Backend::Sqlite => &pull.sqlite,
                };
                std::fs::write(path, schema::pull_file(statements, backend, &pull.pulled))?;
                println!("wrote {}", path.display());
            }
            println!(
                "pulled {} change(s); the database already has them: `db up` records them \
                 (the statements are idempotent)",
                pull.pulled.len()
            );
            Ok(0)
        }
    }
}

fn label(b: Backend) -> &'static str {
    match b {
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
    }
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    print!("{question} [y/N] ");
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}
