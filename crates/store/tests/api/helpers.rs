//! Fresh databases and records for the tests.

use chrono::{DateTime, SubsecRound, Utc};
use sqlx::Row;
use uuid::Uuid;

use atlas_store::migrate::{self, Migration};
use atlas_store::{Backend, SessionRecord, Snapshot, Store, ToolCallRecord, TurnRecord};

pub fn admin_url() -> String {
    std::env::var("ATLAS_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh database: a SQLite file in a temporary folder, or a Postgres database dropped at
/// the end of the test.
pub enum Db {
    Sqlite {
        url: String,
        _dir: tempfile::TempDir,
    },
    Postgres {
        name: String,
    },
}

impl Db {
    pub fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        Db::Sqlite {
            url: format!("sqlite://{}/atlas.db", dir.path().display()),
            _dir: dir,
        }
    }

    pub async fn postgres() -> Db {
        let name = format!("atlas_store_{}", Uuid::new_v4().simple());
        let admin = Store::connect(&admin_url()).await.unwrap();
        admin
            .execute_admin(&format!("create database {name}"))
            .await
            .unwrap();
        admin.close().await;
        Db::Postgres { name }
    }

    pub fn url(&self) -> String {
        match self {
            Db::Sqlite { url, .. } => url.clone(),
            Db::Postgres { name } => {
                let mut u = url::Url::parse(&admin_url()).unwrap();
                u.set_path(&format!("/{name}"));
                u.to_string()
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Sqlite { .. } => Backend::Sqlite,
            Db::Postgres { .. } => Backend::Postgres,
        }
    }

    /// A store on this database with `migrations` applied.
    pub async fn store_with(&self, migrations: &[Migration]) -> Store {
        let store = Store::connect(&self.url()).await.unwrap();
        migrate::up(&store, migrations, false).await.unwrap();
        store
    }

    /// A store on this database with every migration applied.
    pub async fn store(&self) -> Store {
        self.store_with(&migrate::embedded(self.backend())).await
    }

    /// Runs SQL (several statements allowed).
    pub async fn sql(&self, sql: &str) {
        let store = Store::connect(&self.url()).await.unwrap();
        store.execute_admin(sql).await.unwrap();
        store.close().await;
    }

    /// Every tool-call row, ordered by session and call id (as `sorted` orders records).
    pub async fn tool_calls(&self) -> Vec<ToolCallRecord> {
        const Q: &str = "select cast(session_id as text), turn_index, call_id, user_id, name, kind, \
             arguments_bytes, duration_ms, outcome, arguments, result, created_at \
             from voice_tool_calls";
        macro_rules! read {
            ($pool:expr, $time:expr) => {{
                let pool = $pool;
                let time = $time;
                let rows = sqlx::query(Q).fetch_all(&pool).await.unwrap();
                pool.close().await;
                let calls: Vec<ToolCallRecord> = rows
                    .iter()
                    .map(|r| ToolCallRecord {
                        session_id: Uuid::parse_str(&r.get::<String, _>(0)).unwrap(),
                        turn_index: r.get(1),
                        call_id: r.get(2),
                        user_id: r.get(3),
                        name: r.get(4),
                        kind: r.get(5),
                        arguments_bytes: r.get(6),
                        duration_ms: r.get(7),
                        outcome: r.get(8),
                        arguments: r.get(9),
                        result: r.get(10),
                        created_at: time(r),
                    })
                    .collect();
                sorted(calls)
            }};
        }
        match self {
            Db::Sqlite { url, .. } => read!(
                sqlx::SqlitePool::connect(url).await.unwrap(),
                |r: &sqlx::sqlite::SqliteRow| {
                    DateTime::parse_from_rfc3339(&r.get::<String, _>(11))
                        .unwrap()
                        .to_utc()
                }
            ),
            Db::Postgres { .. } => read!(
                sqlx::PgPool::connect(&self.url()).await.unwrap(),
                |r: &sqlx::postgres::PgRow| r.get::<DateTime<Utc>, _>(11)
            ),
        }
    }

    /// `(session id, turn index, tools_ms)` of every turn row.
    pub async fn turn_tools_ms(&self) -> Vec<(String, i32, Option<i32>)> {
        const Q: &str = "select cast(session_id as text), turn_index, tools_ms from voice_turns \
                         order by 1, 2";
        match self {
            Db::Sqlite { url, .. } => {
                let pool = sqlx::SqlitePool::connect(url).await.unwrap();
                let rows = sqlx::query_as(Q).fetch_all(&pool).await.unwrap();
                pool.close().await;
                rows
            }
            Db::Postgres { .. } => {
                let pool = sqlx::PgPool::connect(&self.url()).await.unwrap();
                let rows = sqlx::query_as(Q).fetch_all(&pool).await.unwrap();
                pool.close().await;
                rows
            }
        }
    }

    /// The rows of `sql`, every column read as optional text (select text columns only).
    pub async fn texts(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        macro_rules! read {
            ($pool:expr) => {{
                let pool = $pool;
                let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap();
                pool.close().await;
                rows.iter()
                    .map(|r| {
                        (0..r.len())
                            .map(|i| r.get::<Option<String>, _>(i))
                            .collect()
                    })
                    .collect()
            }};
        }
        match self {
            Db::Sqlite { url, .. } => read!(sqlx::SqlitePool::connect(url).await.unwrap()),
            Db::Postgres { .. } => read!(sqlx::PgPool::connect(&self.url()).await.unwrap()),
        }
    }

    /// A single count.
    pub async fn count(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite { url, .. } => {
                let pool = sqlx::SqlitePool::connect(url).await.unwrap();
                let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                n
            }
            Db::Postgres { .. } => {
                let pool = sqlx::PgPool::connect(&self.url()).await.unwrap();
                let n = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
                pool.close().await;
                n
            }
        }
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let Db::Postgres { name } = self else { return };
        let name = name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(admin) = Store::connect(&admin_url()).await {
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

/// `calls` ordered by session and call id.
pub fn sorted(mut calls: Vec<ToolCallRecord>) -> Vec<ToolCallRecord> {
    calls.sort_by(|a, b| (a.session_id, &a.call_id).cmp(&(b.session_id, &b.call_id)));
    calls
}

/// Now, to the millisecond (what SQLite keeps).
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(3)
}

/// A session of `user` with `turns` turns, no tool calls, at sequence `seq`.
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

/// A finished server-tool call of `snap`'s session in turn `turn`.
pub fn call(snap: &Snapshot, turn: i32, call_id: &str, outcome: &str) -> ToolCallRecord {
    ToolCallRecord {
        session_id: snap.session.id,
        turn_index: turn,
        call_id: call_id.into(),
        user_id: snap.session.user_id.clone(),
        name: "lookup_order".into(),
        kind: Some("server".into()),
        arguments_bytes: 18,
        duration_ms: 250,
        outcome: outcome.into(),
        arguments: None,
        result: None,
        created_at: now(),
    }
}
