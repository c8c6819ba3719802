//! Durable records in real SQLite and PostgreSQL databases (a fresh database per test):
//! contents, spooling while the database is unreachable, row-level security.

use std::net::SocketAddr;
use std::time::Duration;

use sqlx::Row;

use atlas_client::Incoming;
use atlas_protocol::{ClientMessage, ServerEvent, Usage};
use atlas_store::Store;
use atlas_testkit::store::snapshot;

use crate::helpers::*;

pub use atlas_testkit::PgDb;

/// A fresh PostgreSQL database, and the server recording into it.
async fn app_on_postgres() -> (PgDb, TestApp) {
    let db = PgDb::new().await;
    let url = db.url();
    let app = spawn_app_with(fast_fakes(), move |c| c.database_url = url).await;
    (db, app)
}

/// One question, one reply, then `session.end`; returns the last usage event and session id.
async fn one_turn_session(app: &TestApp) -> (Usage, String) {
    let (mut conn, id) = app
        .start("0b3a1c52-8d6e-4f61-9a4f-2f5f7d1e9c01", 24_000)
        .await;
    ask(&conn);
    collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    let usage = usage_then_end(&mut conn).await;
    (usage, id)
}

/// The usage event that follows a reply; then `session.end` and the close.
async fn usage_then_end(conn: &mut atlas_client::Connection) -> Usage {
    let items = until_usage(conn).await;
    let Some(ServerEvent::Usage(usage)) = items.last().and_then(event).cloned() else {
        unreachable!()
    };
    end_session(conn).await;
    usage
}

/// Polls until `f` returns Some, for up to `secs`.
async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn assert_row_matches(row: &SessionRow, usage: &Usage) {
    assert_eq!(row.llm_input_tokens as u64, usage.llm_input_tokens);
    assert_eq!(row.llm_output_tokens as u64, usage.llm_output_tokens);
    assert_eq!(row.tts_chars as u64, usage.tts_chars);
    assert!((row.stt_seconds - usage.stt_seconds).abs() < 0.01);
    // nova-3 $0.0048/min, claude-haiku-4-5 $1/$5 per MTok, tts-1 $15/MChar.
    let stt = ((row.stt_seconds * 1000.0) as i64 * 4_800 + 30_000) / 60_000;
    let llm = (row.llm_input_tokens * 1_000_000 + row.llm_output_tokens * 5_000_000 + 500_000)
        / 1_000_000;
    let tts = row.tts_chars * 15;
    assert_eq!(row.stt_cost_micros, Some(stt));
    assert_eq!(row.llm_cost_micros, Some(llm));
    assert_eq!(row.tts_cost_micros, Some(tts));
    assert_eq!(row.total_cost_micros, Some(stt + llm + tts));
    assert_eq!(row.end_reason.as_deref(), Some("client_ended"));
    assert_eq!(row.turns, 1);
    assert_eq!(row.llm_model.as_deref(), Some("claude-haiku-4-5"));
    assert!(row.price_catalog_version.is_some());
}

#[derive(Debug)]
struct SessionRow {
    stt_seconds: f64,
    llm_input_tokens: i64,
    llm_output_tokens: i64,
    tts_chars: i64,
    stt_cost_micros: Option<i64>,
    llm_cost_micros: Option<i64>,
    tts_cost_micros: Option<i64>,
    total_cost_micros: Option<i64>,
    end_reason: Option<String>,
    turns: i64,
    llm_model: Option<String>,
    price_catalog_version: Option<String>,
}

const SESSION_QUERY: &str = "select stt_seconds, llm_input_tokens, llm_output_tokens, tts_chars, stt_cost_micros, \
    llm_cost_micros, tts_cost_micros, total_cost_micros, end_reason, turns, llm_model, price_catalog_version \
    from voice_sessions";

macro_rules! session_row {
    ($r:expr) => {
        SessionRow {
            stt_seconds: $r.get(0),
            llm_input_tokens: $r.get(1),
            llm_output_tokens: $r.get(2),
            tts_chars: $r.get(3),
            stt_cost_micros: $r.get(4),
            llm_cost_micros: $r.get(5),
            tts_cost_micros: $r.get(6),
            total_cost_micros: $r.get(7),
            end_reason: $r.get(8),
            turns: i64::from($r.get::<i32, _>(9)),
            llm_model: $r.get(10),
            price_catalog_version: $r.get(11),
        }
    };
}

/// Waits for the session record in the pool `$pool` and checks that it is the only one;
/// yields it.
macro_rules! the_one_session_row {
    ($pool:expr) => {{
        let rows = eventually(5, || async {
            let rows = sqlx::query(SESSION_QUERY).fetch_all($pool).await.ok()?;
            (!rows.is_empty()).then_some(rows)
        })
        .await
        .expect("a record");
        assert_eq!(rows.len(), 1);
        session_row!(rows[0])
    }};
}

#[tokio::test]
async fn sqlite_a_session_leaves_exactly_one_matching_record() {
    let app = spawn_app().await;
    let (usage, id) = one_turn_session(&app).await;
    let pool = sqlx::SqlitePool::connect(&app.config.database_url)
        .await
        .unwrap();
    assert_row_matches(&the_one_session_row!(&pool), &usage);
    let turn =
        sqlx::query("select session_id, user_text, assistant_text, interrupted from voice_turns")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(turn.len(), 1);
    assert_eq!(turn[0].get::<String, _>(0), id);
    assert_eq!(
        turn[0].get::<String, _>(1),
        "What is the weather like in Paris today?"
    );
    assert!(turn[0].get::<String, _>(2).starts_with("Sure, you asked"));
    assert!(!turn[0].get::<bool, _>(3));
}

#[tokio::test]
async fn postgres_a_session_leaves_exactly_one_matching_record() {
    let (db, app) = app_on_postgres().await;
    let (usage, id) = one_turn_session(&app).await;
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    assert_row_matches(&the_one_session_row!(&pool), &usage);
    let n: i64 = sqlx::query_scalar("select count(*) from voice_turns where session_id = $1::uuid")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    pool.close().await;
}

#[tokio::test]
async fn postgres_down_mid_session_spools_then_replays_exactly_once() {
    let db = PgDb::new().await;
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 5432)))
        .await
        .unwrap();
    let url = db.url_via(proxy.addr);
    let app = spawn_app_with(fast_fakes(), move |c| c.database_url = url).await;
    let (mut conn, _) = app
        .start("0b3a1c52-8d6e-4f61-9a4f-2f5f7d1e9c01", 24_000)
        .await;
    ask(&conn);
    collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    // The database goes away mid-session.
    proxy.cut();
    conn.sender.send(&ClientMessage::SessionEnd).await.unwrap();
    until_closed(&mut conn, Duration::from_secs(5)).await;
    let spool = app.config.spool_dir.clone();
    let spooled = eventually(10, || {
        let spool = spool.clone();
        async move {
            let n = std::fs::read_dir(&spool)
                .ok()?
                .filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count();
            (n == 1).then_some(())
        }
    })
    .await;
    assert!(spooled.is_some(), "the record was spooled");
    // The database comes back: the spool is replayed, exactly one row.
    proxy.restore();
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    let n = eventually(20, || async {
        let n: i64 = sqlx::query_scalar("select count(*) from voice_sessions")
            .fetch_one(&pool)
            .await
            .ok()?;
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(n, Some(1));
    tokio::time::sleep(Duration::from_secs(6)).await; // another replay round changes nothing
    let n: i64 = sqlx::query_scalar("select count(*) from voice_sessions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let turns: i64 = sqlx::query_scalar("select count(*) from voice_turns")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(turns, 1);
    let left = std::fs::read_dir(&app.config.spool_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count();
    assert_eq!(left, 0, "the spool is empty again");
    pool.close().await;
}

/// Runs `sql` as `role` in a transaction of its own, rolled back; the rows it changed, or the
/// refusal.
async fn update_as(pool: &sqlx::PgPool, role: &str, sql: &str) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(&format!("set local role {role}"))
        .execute(&mut *tx)
        .await
        .unwrap();
    let result = sqlx::query(sql).execute(&mut *tx).await;
    result.map(|r| r.rows_affected())
}

#[tokio::test]
async fn postgres_row_level_security_isolates_users() {
    let db = PgDb::new().await;
    let store = Store::connect(&db.url()).await.unwrap();
    let applied = atlas_store::migrate::up(
        &store,
        &atlas_store::migrate::embedded(atlas_store::Backend::Postgres),
        false,
    )
    .await
    .unwrap();
    assert_eq!(applied.len(), 7);
    let a = "11111111-1111-4111-8111-111111111111";
    let b = "22222222-2222-4222-8222-222222222222";
    for user in [a, a, b] {
        store
            .write(&snapshot(uuid::Uuid::new_v4(), user, 1, 0))
            .await
            .unwrap();
    }
    let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
    let count_as = |role: &'static str, sub: &'static str| {
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query(&format!("set local role {role}"))
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("select set_config('request.jwt.claims', $1, true)")
                .bind(format!(r#"{{"sub":"{sub}","role":"{role}"}}"#))
                .execute(&mut *tx)
                .await
                .unwrap();
            let r: Result<i64, _> = sqlx::query_scalar("select count(*) from voice_sessions")
                .fetch_one(&mut *tx)
                .await;
            r.ok()
        }
    };
    assert_eq!(
        count_as("authenticated", a).await,
        Some(2),
        "A reads only A's rows"
    );
    assert_eq!(
        count_as("authenticated", b).await,
        Some(1),
        "B reads only B's rows"
    );
    assert_eq!(count_as("anon", a).await, None, "anon reads nothing");
    // Only the service role writes.
    let denied = update_as(
        &pool,
        "authenticated",
        "update voice_sessions set turns = 99",
    )
    .await;
    assert!(denied.is_err(), "authenticated users cannot write");
    let updated = update_as(&pool, "service_role", "update voice_sessions set turns = 5").await;
    assert_eq!(updated.unwrap(), 3, "the service role writes every row");
    pool.close().await;
    store.close().await;
}

#[tokio::test]
async fn postgres_db_status_lint_and_diff_report_each_state() {
    use atlas_store::migrate::{self, State};
    let db = PgDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../supabase/migrations");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
    }
    let store = Store::connect(&db.url()).await.unwrap();
    let (_, ms) = migrate::load_dir(dir.path()).unwrap();
    migrate::up(&store, &ms, false).await.unwrap();
    // Change one applied file, delete another, add a new one.
    let shim = dir.path().join("20261124000001_auth_shim.sql");
    let mut text = std::fs::read_to_string(&shim).unwrap();
    text.push_str("\ngrant usage on schema auth to public;\n");
    std::fs::write(&shim, text).unwrap();
    std::fs::remove_file(dir.path().join("20261124000003_row_level_security.sql")).unwrap();
    std::fs::write(
        dir.path().join("20261125000000_add_notes.sql"),
        "-- Purpose: free-text notes on sessions.\nalter table public.voice_sessions add column notes text;\n",
    )
    .unwrap();
    let (names, ms) = migrate::load_dir(dir.path()).unwrap();
    let states: Vec<(String, State)> = migrate::status(&store, &ms)
        .await
        .unwrap()
        .into_iter()
        .map(|s| (s.version, s.state))
        .collect();
    assert_eq!(
        states,
        vec![
            ("20261124000001".into(), State::Changed),
            ("20261124000002".into(), State::Applied),
            ("20261124000003".into(), State::MissingFromDisk),
            ("20261125000000".into(), State::Pending),
            ("20261126000000".into(), State::Applied),
            ("20261202000000".into(), State::Applied),
            ("20261207000000".into(), State::Applied),
            ("20261208000000".into(), State::Applied),
        ]
    );
    // Lint: the new migration is not idempotent.
    let issues = migrate::lint(atlas_store::Backend::Postgres, &names, &ms);
    assert!(issues.iter().any(|i| i.file.contains("add_notes") && i.message.contains("ADD COLUMN IF NOT EXISTS")), "{issues:#?}");
    // Diff: a column added by hand shows up.
    sqlx::raw_sql("alter table voice_sessions add column added_by_hand integer")
        .execute(&sqlx::PgPool::connect(&db.url()).await.unwrap())
        .await
        .unwrap();
    let embedded = migrate::embedded(atlas_store::Backend::Postgres);
    let live = atlas_store::schema::introspect(&store).await.unwrap();
    let expected = atlas_store::schema::expected(&db.url(), &embedded)
        .await
        .unwrap();
    let diff = atlas_store::schema::diff(&expected, &live);
    assert_eq!(
        diff,
        vec!["+ column voice_sessions.added_by_hand (integer)".to_string()]
    );
    store.close().await;
}

#[tokio::test]
async fn long_sessions_are_checkpointed_while_they_run() {
    let app = spawn_app_with(fast_fakes(), |c| c.checkpoint_interval_s = 1).await;
    let (_conn, id) = app
        .start("0b3a1c52-8d6e-4f61-9a4f-2f5f7d1e9c01", 24_000)
        .await;
    let pool = sqlx::SqlitePool::connect(&app.config.database_url)
        .await
        .unwrap();
    let row = eventually(5, || async {
        sqlx::query("select id, ended_at from voice_sessions")
            .fetch_optional(&pool)
            .await
            .ok()?
    })
    .await
    .expect("a checkpoint");
    assert_eq!(row.get::<String, _>(0), id);
    assert_eq!(row.get::<Option<String>, _>(1), None, "still running");
}

/// Five typed turns, each sent once the reply before it has started speaking (issue 25,
/// finding 1): every reply cut by the next turn is billed and recorded as its own turn.
/// Returns the session id and the last usage event.
async fn typed_turns_cutting_replies(app: &TestApp) -> (String, Usage) {
    let (mut conn, id) = app
        .start("0b3a1c52-8d6e-4f61-9a4f-2f5f7d1e9c01", 24_000)
        .await;
    for turn in 1..=5u64 {
        type_text(&conn, &format!("Question number {turn}?")).await;
        let until_text = move |i: &Incoming| matches!(event(i), Some(ServerEvent::ResponseTextDelta { turn_id, .. }) if *turn_id == turn);
        collect_until(&mut conn, Duration::from_secs(10), until_text).await;
    }
    collect_until(&mut conn, Duration::from_secs(20), is_done(5)).await;
    let usage = usage_then_end(&mut conn).await;
    (id, usage)
}

fn assert_every_cut_reply_billed(app: &TestApp, usage: &Usage, turns: &[(bool, String)]) {
    // Five requests reached the model, and five turns were recorded: four cut, one whole.
    let requests = app.fakes.recorded().llm_requests.len();
    assert_eq!(requests, 5);
    assert_eq!(turns.len(), 5, "{turns:?}");
    assert_eq!(turns.iter().filter(|(cut, _)| *cut).count(), 4, "{turns:?}");
    // Each request paid for its prompt and for the words it produced before it was cut.
    assert!(usage.llm_input_tokens >= 5, "{usage:?}");
    assert!(usage.llm_output_tokens >= 5, "{usage:?}");
}

/// The turns recorded for `id` (interrupted, user text), once there are five.
async fn five_turns(url: &str, id: &str) -> Vec<(bool, String)> {
    eventually(5, || async {
        let rows: Vec<(bool, String)> = if url.starts_with("sqlite") {
            let pool = sqlx::SqlitePool::connect(url).await.ok()?;
            let q = "select interrupted, user_text from voice_turns where session_id = ? order by turn_index";
            sqlx::query_as(q).bind(id).fetch_all(&pool).await.ok()?
        } else {
            let pool = sqlx::PgPool::connect(url).await.ok()?;
            let q = "select interrupted, user_text from voice_turns where session_id = $1::uuid order by turn_index";
            let rows = sqlx::query_as(q).bind(id).fetch_all(&pool).await.ok()?;
            pool.close().await;
            rows
        };
        (rows.len() >= 5).then_some(rows)
    })
    .await
    .unwrap_or_default()
}

#[tokio::test]
async fn sqlite_typed_turns_during_replies_bill_and_record_every_cut_reply() {
    let app = spawn_app().await;
    let (id, usage) = typed_turns_cutting_replies(&app).await;
    let turns = five_turns(&app.config.database_url, &id).await;
    assert_every_cut_reply_billed(&app, &usage, &turns);
}

#[tokio::test]
async fn postgres_typed_turns_during_replies_bill_and_record_every_cut_reply() {
    let (db, app) = app_on_postgres().await;
    let (id, usage) = typed_turns_cutting_replies(&app).await;
    let turns = five_turns(&db.url(), &id).await;
    assert_every_cut_reply_billed(&app, &usage, &turns);
}
