//! The rows a session leaves behind.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Backend, StoreError};

/// One row of `voice_sessions`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// Session id.
    pub id: Uuid,
    /// Owner (`sub` of the access token).
    pub user_id: String,
    /// The application's conversation id, if the client gave one.
    pub conversation_id: Option<String>,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End; `None` in a checkpoint of a session still running.
    pub ended_at: Option<DateTime<Utc>>,
    /// Length so far, in milliseconds.
    pub duration_ms: i64,
    /// Why it ended.
    pub end_reason: Option<String>,
    /// Turns completed.
    pub turns: i32,
    /// Seconds of audio streamed to recognition.
    pub stt_seconds: f64,
    /// LLM input tokens (including cached).
    pub llm_input_tokens: i64,
    /// LLM output tokens.
    pub llm_output_tokens: i64,
    /// Characters synthesised.
    pub tts_chars: i64,
    /// Recognition cost in micro-dollars (`None`: unknown price).
    pub stt_cost_micros: Option<i64>,
    /// LLM cost in micro-dollars.
    pub llm_cost_micros: Option<i64>,
    /// Synthesis cost in micro-dollars.
    pub tts_cost_micros: Option<i64>,
    /// Total cost in micro-dollars.
    pub total_cost_micros: Option<i64>,
    /// Recognition model.
    pub stt_model: Option<String>,
    /// Language model.
    pub llm_model: Option<String>,
    /// Synthesis model.
    pub tts_model: Option<String>,
    /// Price catalog version used for the costs.
    pub price_catalog_version: Option<String>,
    /// Client name.
    pub client_name: Option<String>,
    /// Client version.
    pub client_version: Option<String>,
    /// How the session was reached: `websocket` or `twilio`.
    #[serde(default = "websocket")]
    pub transport: String,
    /// A phone call's id at the provider.
    #[serde(default)]
    pub call_sid: Option<String>,
    /// A phone call's caller (masked unless the operator records numbers in full).
    #[serde(default)]
    pub caller: Option<String>,
}

fn websocket() -> String {
    "websocket".into()
}

/// One row of `voice_turns`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// Session id.
    pub session_id: Uuid,
    /// Turn number, from 1.
    pub turn_index: i32,
    /// Owner (for row-level security).
    pub user_id: String,
    /// What the user said.
    pub user_text: String,
    /// What the assistant said, as far as it was spoken.
    pub assistant_text: String,
    /// Whether the reply was cut off.
    pub interrupted: bool,
    /// End of speech → final transcript, ms.
    pub eos_to_final_ms: Option<i32>,
    /// LLM first token, ms.
    pub llm_first_token_ms: Option<i32>,
    /// TTS first audio, ms.
    pub tts_first_audio_ms: Option<i32>,
    /// End of speech → first audio, ms.
    pub to_first_audio_ms: Option<i32>,
    /// Time the turn waited for its tool calls, ms (`None`: the turn called no tool, or it
    /// was recorded by a version without tools).
    #[serde(default)]
    pub tools_ms: Option<i32>,
    /// When the turn ended.
    pub created_at: DateTime<Utc>,
}

/// One tool call of a turn: one row of `voice_tool_calls`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRecord {
    /// Session id.
    pub session_id: Uuid,
    /// The turn that made the call.
    pub turn_index: i32,
    /// The provider's call id, unique within the session (at most 128 bytes, not empty).
    pub call_id: String,
    /// Owner (for row-level security).
    pub user_id: String,
    /// Tool name as the model wrote it (bounded by the server to 64 characters).
    pub name: String,
    /// `server` or `client`; `None` when the call was refused before running (unknown tool).
    pub kind: Option<String>,
    /// The Model Context Protocol server that answered, for its tools (at most 24 characters).
    #[serde(default)]
    pub mcp_server: Option<String>,
    /// Size of the arguments as the model sent them, bytes.
    pub arguments_bytes: i32,
    /// Time from the call to its outcome, ms.
    pub duration_ms: i32,
    /// `ok`, `failed`, `timed_out`, `invalid`, `over_limit` or `cancelled`.
    pub outcome: String,
    /// The arguments, only when the operator keeps tool content.
    pub arguments: Option<String>,
    /// The result given to the model, only when the operator keeps tool content.
    pub result: Option<String>,
    /// When the call ended.
    pub created_at: DateTime<Utc>,
}

/// A session and its turns, written together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Order of this snapshot among its session's snapshots: a row is only ever replaced by a
    /// snapshot with a higher sequence. Assigned by the server's recorder when the snapshot is
    /// submitted; 0 in records spooled by older versions.
    #[serde(default)]
    pub seq: u64,
    /// The session row.
    pub session: SessionRecord,
    /// Its turns.
    pub turns: Vec<TurnRecord>,
    /// Its tool calls; empty in records spooled by older versions.
    #[serde(default)]
    pub tool_calls: Vec<ToolCallRecord>,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// One value of a row, typed once for both backends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val<'a> {
    Id(Uuid),
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    OptInt(Option<i64>),
    Int32(i32),
    OptInt32(Option<i32>),
    Real(f64),
    Bool(bool),
    Time(DateTime<Utc>),
    OptTime(Option<DateTime<Utc>>),
}

// The statement plan shared by both backends: column lists, the values bound for each row in
// column order, and the SQL built from them.

const SESSION_COLUMNS: [&str; 27] = [
    "id",
    "user_id",
    "conversation_id",
    "started_at",
    "ended_at",
    "duration_ms",
    "end_reason",
    "turns",
    "stt_seconds",
    "llm_input_tokens",
    "llm_output_tokens",
    "tts_chars",
    "stt_cost_micros",
    "llm_cost_micros",
    "tts_cost_micros",
    "total_cost_micros",
    "stt_model",
    "llm_model",
    "tts_model",
    "price_catalog_version",
    "client_name",
    "client_version",
    "transport",
    "call_sid",
    "caller",
    "record_seq",
    "updated_at",
];

const TURN_COLUMNS: [&str; 12] = [
    "session_id",
    "turn_index",
    "user_id",
    "user_text",
    "assistant_text",
    "interrupted",
    "eos_to_final_ms",
    "llm_first_token_ms",
    "tts_first_audio_ms",
    "to_first_audio_ms",
    "tools_ms",
    "created_at",
];

const TOOL_CALL_COLUMNS: [&str; 13] = [
    "session_id",
    "turn_index",
    "call_id",
    "user_id",
    "name",
    "kind",
    "arguments_bytes",
    "duration_ms",
    "outcome",
    "arguments",
    "result",
    "created_at",
    "mcp_server",
];

/// Session rows per statement (27 parameters each).
pub(crate) const SESSION_ROWS: usize = 100;
/// Turn rows per statement (12 parameters each).
pub(crate) const TURN_ROWS: usize = 500;
/// Tool-call rows per statement (13 parameters each).
pub(crate) const TOOL_CALL_ROWS: usize = 500;

pub(crate) fn session_values(snap: &Snapshot, now: DateTime<Utc>) -> [Val<'_>; 27] {
    let s = &snap.session;
    [
        Val::Id(s.id),
        Val::Text(&s.user_id),
        Val::OptText(s.conversation_id.as_deref()),
        Val::Time(s.started_at),
        Val::OptTime(s.ended_at),
        Val::Int(s.duration_ms),
        Val::OptText(s.end_reason.as_deref()),
        Val::Int32(s.turns),
        Val::Real(s.stt_seconds),
        Val::Int(s.llm_input_tokens),
        Val::Int(s.llm_output_tokens),
        Val::Int(s.tts_chars),
        Val::OptInt(s.stt_cost_micros),
        Val::OptInt(s.llm_cost_micros),
        Val::OptInt(s.tts_cost_micros),
        Val::OptInt(s.total_cost_micros),
        Val::OptText(s.stt_model.as_deref()),
        Val::OptText(s.llm_model.as_deref()),
        Val::OptText(s.tts_model.as_deref()),
        Val::OptText(s.price_catalog_version.as_deref()),
        Val::OptText(s.client_name.as_deref()),
        Val::OptText(s.client_version.as_deref()),
        Val::Text(&s.transport),
        Val::OptText(s.call_sid.as_deref()),
        Val::OptText(s.caller.as_deref()),
        Val::Int(i64::try_from(snap.seq).unwrap_or(i64::MAX)),
        Val::Time(now),
    ]
}

pub(crate) fn turn_values(t: &TurnRecord) -> [Val<'_>; 12] {
    [
        Val::Id(t.session_id),
        Val::Int32(t.turn_index),
        Val::Text(&t.user_id),
        Val::Text(&t.user_text),
        Val::Text(&t.assistant_text),
        Val::Bool(t.interrupted),
        Val::OptInt32(t.eos_to_final_ms),
        Val::OptInt32(t.llm_first_token_ms),
        Val::OptInt32(t.tts_first_audio_ms),
        Val::OptInt32(t.to_first_audio_ms),
        Val::OptInt32(t.tools_ms),
        Val::Time(t.created_at),
    ]
}

pub(crate) fn tool_call_values(c: &ToolCallRecord) -> [Val<'_>; 13] {
    [
        Val::Id(c.session_id),
        Val::Int32(c.turn_index),
        Val::Text(&c.call_id),
        Val::Text(&c.user_id),
        Val::Text(&c.name),
        Val::OptText(c.kind.as_deref()),
        Val::Int32(c.arguments_bytes),
        Val::Int32(c.duration_ms),
        Val::Text(&c.outcome),
        Val::OptText(c.arguments.as_deref()),
        Val::OptText(c.result.as_deref()),
        Val::Time(c.created_at),
        Val::OptText(c.mcp_server.as_deref()),
    ]
}

fn values_clause(backend: Backend, rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=width)
                .map(|c| match backend {
                    Backend::Postgres => format!("${}", r * width + c),
                    Backend::Sqlite => format!("?{}", r * width + c),
                })
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn updates(columns: &[&str], key: &[&str]) -> String {
    columns
        .iter()
        .filter(|c| !key.contains(c))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn table(backend: Backend, name: &str) -> String {
    match backend {
        Backend::Postgres => format!("public.{name}"),
        Backend::Sqlite => name.to_owned(),
    }
}

/// What one user's ended sessions consumed, from their records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserUsage {
    /// Sessions recorded (ended or not).
    pub sessions: i64,
    /// Of those, sessions with a final record.
    pub ended: i64,
    /// Turns recorded for the ended sessions.
    pub turns: i64,
    /// Audio streamed to recognition, seconds.
    pub stt_seconds: f64,
    /// Model prompt tokens.
    pub llm_input_tokens: i64,
    /// Model output tokens.
    pub llm_output_tokens: i64,
    /// Characters sent to synthesis.
    pub tts_chars: i64,
}

/// The row [`usage_sql`] returns.
pub(crate) type UsageRow = (i64, i64, i64, f64, i64, i64, i64);

impl From<UsageRow> for UserUsage {
    fn from(r: UsageRow) -> Self {
        Self {
            sessions: r.0,
            ended: r.1,
            turns: r.2,
            stt_seconds: r.3,
            llm_input_tokens: r.4,
            llm_output_tokens: r.5,
            tts_chars: r.6,
        }
    }
}

/// Sums of one user's records (the user id is the one parameter).
pub(crate) fn usage_sql(backend: Backend) -> String {
    let (param, int, real) = match backend {
        Backend::Postgres => ("$1", "bigint", "double precision"),
        Backend::Sqlite => ("?", "integer", "real"),
    };
    let ended = "ended_at is not null";
    format!(
        "select cast(count(*) as {int}), \
         cast(coalesce(sum(case when {ended} then 1 else 0 end), 0) as {int}), \
         cast(coalesce(sum(case when {ended} then turns else 0 end), 0) as {int}), \
         cast(coalesce(sum(case when {ended} then stt_seconds else 0 end), 0) as {real}), \
         cast(coalesce(sum(case when {ended} then llm_input_tokens else 0 end), 0) as {int}), \
         cast(coalesce(sum(case when {ended} then llm_output_tokens else 0 end), 0) as {int}), \
         cast(coalesce(sum(case when {ended} then tts_chars else 0 end), 0) as {int}) \
         from {} where user_id = {param}",
        table(backend, "voice_sessions")
    )
}

/// Upserts `rows` sessions, replacing a stored row only with a newer sequence; returns the
/// ids of the rows written.
pub(crate) fn sessions_sql(backend: Backend, rows: usize) -> String {
    format!(
        "insert into {} ({}) values {} on conflict (id) do update set {} \
         where voice_sessions.record_seq is null or voice_sessions.record_seq < excluded.record_seq \
         returning id",
        table(backend, "voice_sessions"),
        SESSION_COLUMNS.join(", "),
        values_clause(backend, rows, SESSION_COLUMNS.len()),
        updates(&SESSION_COLUMNS, &["id"]),
    )
}

/// Upserts `rows` turns.
pub(crate) fn turns_sql(backend: Backend, rows: usize) -> String {
    format!(
        "insert into {} ({}) values {} on conflict (session_id, turn_index) do update set {}",
        table(backend, "voice_turns"),
        TURN_COLUMNS.join(", "),
        values_clause(backend, rows, TURN_COLUMNS.len()),
        updates(&TURN_COLUMNS, &["session_id", "turn_index"]),
    )
}

/// Upserts `rows` tool calls.
pub(crate) fn tool_calls_sql(backend: Backend, rows: usize) -> String {
    format!(
        "insert into {} ({}) values {} on conflict (session_id, call_id) do update set {}",
        table(backend, "voice_tool_calls"),
        TOOL_CALL_COLUMNS.join(", "),
        values_clause(backend, rows, TOOL_CALL_COLUMNS.len()),
        updates(&TOOL_CALL_COLUMNS, &["session_id", "call_id"]),
    )
}

#[cfg(feature = "sqlite")]
pub(crate) fn bind_sqlite<'q>(
    q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    v: Val<'q>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    // SQLite keeps ids and timestamps as text (RFC 3339, UTC).
    match v {
        Val::Id(x) => q.bind(x.to_string()),
        Val::Text(x) => q.bind(x),
        Val::OptText(x) => q.bind(x),
        Val::Int(x) => q.bind(x),
        Val::OptInt(x) => q.bind(x),
        Val::Int32(x) => q.bind(x),
        Val::OptInt32(x) => q.bind(x),
        Val::Real(x) => q.bind(x),
        Val::Bool(x) => q.bind(x),
        Val::Time(x) => q.bind(ts(&x)),
        Val::OptTime(x) => q.bind(x.as_ref().map(ts)),
    }
}

#[cfg(feature = "postgres")]
pub(crate) fn bind_postgres<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    v: Val<'q>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match v {
        Val::Id(x) => q.bind(x),
        Val::Text(x) => q.bind(x),
        Val::OptText(x) => q.bind(x),
        Val::Int(x) => q.bind(x),
        Val::OptInt(x) => q.bind(x),
        Val::Int32(x) => q.bind(x),
        Val::OptInt32(x) => q.bind(x),
        Val::Real(x) => q.bind(x),
        Val::Bool(x) => q.bind(x),
        Val::Time(x) => q.bind(x),
        Val::OptTime(x) => q.bind(x),
    }
}

/// The rows of `rows` with the last of each key, in their order. One upsert statement may not
/// touch a row twice (PostgreSQL refuses it with SQLSTATE 21000, which is no data error, so
/// the record would block the writer instead of being quarantined): a snapshot naming one
/// tool call twice keeps the later entry, as a later snapshot would replace the earlier row.
pub(crate) fn last_per_key<'a, T, K: Eq + std::hash::Hash>(
    rows: impl Iterator<Item = &'a T>,
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a T> {
    let rows: Vec<&T> = rows.collect();
    let mut last = std::collections::HashMap::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        last.insert(key(r), i);
    }
    rows.iter()
        .enumerate()
        .filter(|(i, r)| last.get(&key(r)) == Some(i))
        .map(|(_, r)| *r)
        .collect()
}

/// Writes `snaps` (at most one per session) in one transaction with the shared plan: the
/// sessions first, then the turns and tool calls of the sessions whose rows were written (an
/// older snapshot changes nothing).
macro_rules! write_with_plan {
    ($pool:expr, $snaps:expr, $backend:expr, $bind:path, $id:ty, $parse:expr) => {{
        use sqlx::Row as _;
        let now = Utc::now();
        let mut tx = $pool.begin().await?;
        let mut written = std::collections::HashSet::new();
        for chunk in $snaps.chunks(SESSION_ROWS) {
            let sql = sessions_sql($backend, chunk.len());
            let mut q = sqlx::query(&sql).persistent(false);
            for snap in chunk {
                for v in session_values(snap, now) {
                    q = $bind(q, v);
                }
            }
            for row in q.fetch_all(&mut *tx).await? {
                let id: $id = row.try_get(0)?;
                written.insert($parse(id));
            }
        }
        let fresh: Vec<&Snapshot> = $snaps
            .iter()
            .copied()
            .filter(|s| written.contains(&Some(s.session.id)))
            .collect();
        let turns = last_per_key(fresh.iter().flat_map(|s| s.turns.iter()), |t| {
            (t.session_id, t.turn_index)
        });
        for chunk in turns.chunks(TURN_ROWS) {
            let sql = turns_sql($backend, chunk.len());
            let mut q = sqlx::query(&sql).persistent(false);
            for t in chunk {
                for v in turn_values(t) {
                    q = $bind(q, v);
                }
            }
            q.execute(&mut *tx).await?;
        }
        let calls = last_per_key(fresh.iter().flat_map(|s| s.tool_calls.iter()), |c| {
            (c.session_id, c.call_id.as_str())
        });
        for chunk in calls.chunks(TOOL_CALL_ROWS) {
            let sql = tool_calls_sql($backend, chunk.len());
            let mut q = sqlx::query(&sql).persistent(false);
            for c in chunk {
                for v in tool_call_values(c) {
                    q = $bind(q, v);
                }
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }};
}

#[cfg(feature = "sqlite")]
pub(crate) async fn write_sqlite(
    pool: &sqlx::SqlitePool,
    snaps: &[&Snapshot],
) -> Result<(), StoreError> {
    write_with_plan!(
        pool,
        snaps,
        Backend::Sqlite,
        bind_sqlite,
        String,
        |id: String| { Uuid::parse_str(&id).ok() }
    )
}

#[cfg(feature = "postgres")]
pub(crate) async fn write_postgres(
    pool: &sqlx::PgPool,
    snaps: &[&Snapshot],
) -> Result<(), StoreError> {
    write_with_plan!(pool, snaps, Backend::Postgres, bind_postgres, Uuid, Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_plan_serves_both_backends() {
        let pg = sessions_sql(Backend::Postgres, 2);
        let lite = sessions_sql(Backend::Sqlite, 2);
        assert!(
            pg.contains("($28, $29,") && pg.ends_with("returning id"),
            "{pg}"
        );
        assert!(lite.contains("(?28, ?29,") && lite.starts_with("insert into voice_sessions "));
        for sql in [&pg, &lite] {
            assert!(sql.contains("voice_sessions.record_seq < excluded.record_seq"));
            assert!(!sql.contains("id = excluded.id"));
        }
        let t = turns_sql(Backend::Postgres, 1);
        assert!(t.contains("user_text = excluded.user_text"));
        assert!(t.contains("tools_ms = excluded.tools_ms"));
        assert!(!t.contains("turn_index = excluded"));
        let c = tool_calls_sql(Backend::Sqlite, 2);
        assert!(c.starts_with("insert into voice_tool_calls (session_id, turn_index, call_id,"));
        assert!(c.contains("(?14, ?15,") && c.contains("on conflict (session_id, call_id)"));
        assert!(c.contains("outcome = excluded.outcome"));
        assert!(!c.contains("call_id = excluded") && !c.contains("session_id = excluded"));
        assert!(tool_calls_sql(Backend::Postgres, 1).contains("into public.voice_tool_calls"));
    }

    #[test]
    fn last_per_key_keeps_the_last_of_each_key_in_order() {
        let rows = [(1, 'a'), (2, 'b'), (1, 'c'), (3, 'd'), (2, 'e')];
        let kept: Vec<char> = last_per_key(rows.iter(), |r| r.0)
            .into_iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(kept, ['c', 'd', 'e']);
    }

    #[test]
    fn records_spooled_before_tool_calls_still_load() {
        // A snapshot as version 0.1 wrote it: no `tool_calls`, no `tools_ms`.
        let old = r#"{"seq":3,"session":{"id":"7b6f1b52-3f0c-4a57-9a4e-0d8f3b2a1c10",
            "user_id":"u","conversation_id":null,"started_at":"2026-11-27T08:00:00Z",
            "ended_at":null,"duration_ms":10,"end_reason":null,"turns":1,"stt_seconds":1.0,
            "llm_input_tokens":1,"llm_output_tokens":1,"tts_chars":1,"stt_cost_micros":null,
            "llm_cost_micros":null,"tts_cost_micros":null,"total_cost_micros":null,
            "stt_model":null,"llm_model":null,"tts_model":null,"price_catalog_version":null,
            "client_name":null,"client_version":null},
            "turns":[{"session_id":"7b6f1b52-3f0c-4a57-9a4e-0d8f3b2a1c10","turn_index":1,
            "user_id":"u","user_text":"q","assistant_text":"a","interrupted":false,
            "eos_to_final_ms":5,"llm_first_token_ms":null,"tts_first_audio_ms":null,
            "to_first_audio_ms":null,"created_at":"2026-11-27T08:00:01Z"}]}"#;
        let snap: Snapshot = serde_json::from_str(old).unwrap();
        assert_eq!(snap.seq, 3);
        assert!(snap.tool_calls.is_empty());
        assert_eq!(snap.turns[0].tools_ms, None);
        assert_eq!(snap.turns[0].eos_to_final_ms, Some(5));
        // And a new one round-trips whole.
        let mut new = snap.clone();
        new.turns[0].tools_ms = Some(120);
        new.tool_calls.push(ToolCallRecord {
            session_id: new.session.id,
            turn_index: 1,
            call_id: "toolu_01".into(),
            user_id: "u".into(),
            name: "lookup_order".into(),
            kind: Some("server".into()),
            mcp_server: Some("time".into()),
            arguments_bytes: 17,
            duration_ms: 120,
            outcome: "ok".into(),
            arguments: None,
            result: None,
            created_at: new.turns[0].created_at,
        });
        let back: Snapshot = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }
}
