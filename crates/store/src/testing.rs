//! Test support for the store and the crates that record through it: fresh databases (a
//! SQLite file in a temporary folder, or a PostgreSQL database dropped when the test ends),
//! ways to read their rows back, and sample records.
//!
//! Built for this crate's own tests and, for other crates' tests, with the `testing` feature.
//! Everything here panics on failure: it is meant for tests only.

use std::net::SocketAddr;

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Row;
use uuid::Uuid;

use crate::migrate::{self, Migration};
use crate::{Backend, SessionRecord, Snapshot, Store, ToolCallRecord, TurnRecord};

/// The PostgreSQL server the tests use (`ATLAS_TEST_POSTGRES_URL`, default the local one's
/// `test` database).
pub fn postgres_admin_url() -> String {
    std::env::var("ATLAS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh PostgreSQL database, dropped (with its connections) when this is dropped.
#[derive(Debug)]
pub struct PgDb {
    /// The database's name.
    pub name: String,
}

impl PgDb {
    /// Creates the database.
    pub async fn new() -> PgDb {
        let name = format!("atlas_t_{}", Uuid::new_v4().simple());
        let admin = Store::connect(&postgres_admin_url())
            .await
            .expect("the test PostgreSQL server");
        admin
            .execute_admin(&format!("create database {name}"))
            .await
            .expect("create database");
        admin.close().await;
        PgDb { name }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        let mut u = url::Url::parse(&postgres_admin_url()).expect("a URL");
        u.set_path(&format!("/{}", self.name));
        u.to_string()
    }

    /// Its URL through another address (a proxy in front of the server, say).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        let mut u = url::Url::parse(&self.url()).expect("a URL");
        u.set_port(Some(addr.port())).expect("a port");
        u.to_string()
    }

    /// Runs `sql` in it (several statements allowed).
    pub async fn sql(&self, sql: &str) {
        run_sql(&self.url(), sql).await;
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                if let Ok(admin) = Store::connect(&postgres_admin_url()).await {
                    let _ = admin
                        .execute_admin(&format!("drop database if exists {name} with (force)"))
                        .await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

/// Runs `sql` (several statements allowed) on the database at `url`.
async fn run_sql(url: &str, sql: &str) {
    let store = Store::connect(url).await.expect("connect");
    store.execute_admin(sql).await.expect("statement");
    store.close().await;
}

/// A fresh database of either backend: a SQLite file in a temporary folder, or a PostgreSQL
/// database dropped at the end of the test.
#[derive(Debug)]
pub enum TestDb {
    /// A SQLite file.
    Sqlite {
        /// Its URL.
        url: String,
        /// The folder holding it, removed when dropped.
        _dir: tempfile::TempDir,
    },
    /// A PostgreSQL database.
    Postgres(PgDb),
}

/// Connects a pool of `db`'s backend as `$pool`, evaluates `$body` with it, closes it and
/// yields the body's value. The body is written once and compiled for each backend, as the
/// rows of the two drivers are different types.
macro_rules! with_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            TestDb::Sqlite { url, .. } => {
                let $pool = sqlx::SqlitePool::connect(url).await.expect("connect");
                let out = $body;
                $pool.close().await;
                out
            }
            TestDb::Postgres(db) => {
                let $pool = sqlx::PgPool::connect(&db.url()).await.expect("connect");
                let out = $body;
                $pool.close().await;
                out
            }
        }
    };
}

impl TestDb {
    /// A SQLite file in a fresh temporary folder.
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        TestDb::Sqlite {
            url: format!("sqlite://{}/atlas.db", dir.path().display()),
            _dir: dir,
        }
    }

    /// A fresh PostgreSQL database.
    pub async fn postgres() -> TestDb {
        TestDb::Postgres(PgDb::new().await)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        match self {
            TestDb::Sqlite { url, .. } => url.clone(),
            TestDb::Postgres(db) => db.url(),
        }
    }

    /// Its URL through another address (a proxy in front of PostgreSQL, say); a SQLite file
    /// has no address, its URL is the same.
    pub fn url_via(&self, addr: SocketAddr) -> String {
        match self {
            TestDb::Sqlite { url, .. } => url.clone(),
            TestDb::Postgres(db) => db.url_via(addr),
        }
    }

    /// Its backend.
    pub fn backend(&self) -> Backend {
        match self {
            TestDb::Sqlite { .. } => Backend::Sqlite,
            TestDb::Postgres(_) => Backend::Postgres,
        }
    }

    /// A store on this database with `migrations` applied.
    pub async fn store_with(&self, migrations: &[Migration]) -> Store {
        let store = Store::connect(&self.url()).await.expect("connect");
        migrate::up(&store, migrations, false)
            .await
            .expect("migrations apply");
        store
    }

    /// A store on this database with every migration applied.
    pub async fn store(&self) -> Store {
        self.store_with(&migrate::embedded(self.backend())).await
    }

    /// Runs SQL (several statements allowed).
    pub async fn sql(&self, sql: &str) {
        run_sql(&self.url(), sql).await;
    }

    /// Every tool-call row, ordered by session and call id (as [`sorted`] orders records).
    pub async fn tool_calls(&self) -> Vec<ToolCallRecord> {
        const Q: &str = "select cast(session_id as text), turn_index, call_id, user_id, name, kind, \
             arguments_bytes, duration_ms, outcome, arguments, result, created_at, mcp_server \
             from voice_tool_calls";
        let calls = with_pool!(self, pool => {
            let rows = sqlx::query(Q).fetch_all(&pool).await.expect("tool calls");
            rows.iter()
                .map(|r| ToolCallRecord {
                    session_id: Uuid::parse_str(&r.get::<String, _>(0)).expect("an id"),
                    turn_index: r.get(1),
                    call_id: r.get(2),
                    user_id: r.get(3),
                    name: r.get(4),
                    kind: r.get(5),
                    mcp_server: r.get(12),
                    arguments_bytes: r.get(6),
                    duration_ms: r.get(7),
                    outcome: r.get(8),
                    arguments: r.get(9),
                    result: r.get(10),
                    // SQLite keeps times as RFC 3339 text.
                    created_at: match self.backend() {
                        Backend::Sqlite => DateTime::parse_from_rfc3339(&r.get::<String, _>(11))
                            .expect("a time")
                            .to_utc(),
                        Backend::Postgres => r.get::<DateTime<Utc>, _>(11),
                    },
                })
                .collect()
        });
        sorted(calls)
    }

    /// `(session id, turn index, tools_ms)` of every turn row.
    pub async fn turn_tools_ms(&self) -> Vec<(String, i32, Option<i32>)> {
        const Q: &str = "select cast(session_id as text), turn_index, tools_ms from voice_turns \
                         order by 1, 2";
        with_pool!(self, pool => sqlx::query_as(Q).fetch_all(&pool).await.expect("turns"))
    }

    /// The rows of `sql`, every column read as optional text (select text columns only).
    pub async fn texts(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        with_pool!(self, pool => {
            let rows = sqlx::query(sql).fetch_all(&pool).await.expect("rows");
            rows.iter()
                .map(|r| (0..r.len()).map(|i| r.get::<Option<String>, _>(i)).collect())
                .collect()
        })
    }

    /// A single count.
    pub async fn count(&self, sql: &str) -> i64 {
        with_pool!(self, pool => sqlx::query_scalar(sql).fetch_one(&pool).await.expect("a count"))
    }

    /// `(id, ended, turns column, turn rows)` of every session, by id; none while the table
    /// does not exist yet.
    pub async fn sessions(&self) -> Vec<(String, bool, i64, i64)> {
        const Q: &str = "select cast(s.id as text), s.ended_at is not null, s.turns, \
                 (select count(*) from voice_turns t where t.session_id = s.id) \
                 from voice_sessions s order by 1";
        with_pool!(self, pool => {
            let rows = sqlx::query(Q).fetch_all(&pool).await.unwrap_or_default();
            rows.iter()
                .map(|r| {
                    (
                        r.get::<String, _>(0),
                        r.get::<bool, _>(1),
                        i64::from(r.get::<i32, _>(2)),
                        r.get::<i64, _>(3),
                    )
                })
                .collect()
        })
    }
}

/// `calls` ordered by session and call id.
pub fn sorted(mut calls: Vec<ToolCallRecord>) -> Vec<ToolCallRecord> {
    calls.sort_by(|a, b| (a.session_id, &a.call_id).cmp(&(b.session_id, &b.call_id)));
    calls
}

/// Now, to the millisecond (what SQLite keeps).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// A finished session of `user` with `turns` turns ("question i", "answer i"), no tool
/// calls, at sequence `seq`: one second long, ten tokens each way, ten characters spoken,
/// three micro-dollars, the default models.
pub fn snapshot(id: Uuid, user: &str, seq: u64, turns: i32) -> Snapshot {
    let now = now();
    Snapshot {
        seq,
        session: SessionRecord {
            id,
            user_id: user.into(),
            conversation_id: None,
            started_at: now,
            ended_at: Some(now),
            duration_ms: 1000,
            end_reason: Some("client_ended".into()),
            turns,
            stt_seconds: 1.0,
            llm_input_tokens: 10,
            llm_output_tokens: 10,
            tts_chars: 10,
            stt_cost_micros: Some(1),
            llm_cost_micros: Some(1),
            tts_cost_micros: Some(1),
            total_cost_micros: Some(3),
            stt_model: Some("nova-3".into()),
            llm_model: Some("claude-haiku-4-5".into()),
            tts_model: Some("tts-1".into()),
            price_catalog_version: Some("test".into()),
            client_name: None,
            client_version: None,
            transport: "websocket".into(),
            call_sid: None,
            caller: None,
        },
        turns: (1..=turns)
            .map(|i| TurnRecord {
                session_id: id,
                turn_index: i,
                user_id: user.into(),
                user_text: format!("question {i}"),
                assistant_text: format!("answer {i}"),
                interrupted: false,
                eos_to_final_ms: Some(100),
                llm_first_token_ms: None,
                tts_first_audio_ms: None,
                to_first_audio_ms: None,
                tools_ms: None,
                created_at: now,
            })
            .collect(),
        tool_calls: vec![],
    }
}

/// A finished server-tool call (`lookup_order`) of `snap`'s session in turn `turn`.
pub fn call(snap: &Snapshot, turn: i32, call_id: &str, outcome: &str) -> ToolCallRecord {
    ToolCallRecord {
        session_id: snap.session.id,
        turn_index: turn,
        call_id: call_id.into(),
        user_id: snap.session.user_id.clone(),
        name: "lookup_order".into(),
        kind: Some("server".into()),
        mcp_server: None,
        arguments_bytes: 18,
        duration_ms: 250,
        outcome: outcome.into(),
        arguments: None,
        result: None,
        created_at: now(),
    }
}
