//! The rows a session leaves behind.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::StoreError;

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
    /// When the turn ended.
    pub created_at: DateTime<Utc>,
}

/// A session and its turns, written together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The session row.
    pub session: SessionRecord,
    /// Its turns.
    pub turns: Vec<TurnRecord>,
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

const SESSION_COLUMNS: &str = "id, user_id, conversation_id, started_at, ended_at, duration_ms, \
    end_reason, turns, stt_seconds, llm_input_tokens, llm_output_tokens, tts_chars, \
    stt_cost_micros, llm_cost_micros, tts_cost_micros, total_cost_micros, stt_model, llm_model, \
    tts_model, price_catalog_version, client_name, client_version, updated_at";

const SESSION_UPDATES: &str = "user_id = excluded.user_id, conversation_id = excluded.conversation_id, \
    started_at = excluded.started_at, ended_at = excluded.ended_at, duration_ms = excluded.duration_ms, \
    end_reason = excluded.end_reason, turns = excluded.turns, stt_seconds = excluded.stt_seconds, \
    llm_input_tokens = excluded.llm_input_tokens, llm_output_tokens = excluded.llm_output_tokens, \
    tts_chars = excluded.tts_chars, stt_cost_micros = excluded.stt_cost_micros, \
    llm_cost_micros = excluded.llm_cost_micros, tts_cost_micros = excluded.tts_cost_micros, \
    total_cost_micros = excluded.total_cost_micros, stt_model = excluded.stt_model, \
    llm_model = excluded.llm_model, tts_model = excluded.tts_model, \
    price_catalog_version = excluded.price_catalog_version, client_name = excluded.client_name, \
    client_version = excluded.client_version, updated_at = excluded.updated_at";

const TURN_COLUMNS: &str = "session_id, turn_index, user_id, user_text, assistant_text, interrupted, \
    eos_to_final_ms, llm_first_token_ms, tts_first_audio_ms, to_first_audio_ms, created_at";

const TURN_UPDATES: &str = "user_id = excluded.user_id, user_text = excluded.user_text, \
    assistant_text = excluded.assistant_text, interrupted = excluded.interrupted, \
    eos_to_final_ms = excluded.eos_to_final_ms, llm_first_token_ms = excluded.llm_first_token_ms, \
    tts_first_audio_ms = excluded.tts_first_audio_ms, to_first_audio_ms = excluded.to_first_audio_ms, \
    created_at = excluded.created_at";

fn placeholders(n: usize, dollar: bool) -> String {
    (1..=n)
        .map(|i| {
            if dollar {
                format!("${i}")
            } else {
                format!("?{i}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(feature = "sqlite")]
pub(crate) async fn write_sqlite(
    pool: &sqlx::SqlitePool,
    snap: &Snapshot,
) -> Result<(), StoreError> {
    let s = &snap.session;
    let mut tx = pool.begin().await?;
    let sql = format!(
        "insert into voice_sessions ({SESSION_COLUMNS}) values ({}) on conflict (id) do update set {SESSION_UPDATES}",
        placeholders(23, false)
    );
    sqlx::query(&sql)
        .bind(s.id.to_string())
        .bind(&s.user_id)
        .bind(&s.conversation_id)
        .bind(ts(&s.started_at))
        .bind(s.ended_at.as_ref().map(ts))
        .bind(s.duration_ms)
        .bind(&s.end_reason)
        .bind(s.turns)
        .bind(s.stt_seconds)
        .bind(s.llm_input_tokens)
        .bind(s.llm_output_tokens)
        .bind(s.tts_chars)
        .bind(s.stt_cost_micros)
        .bind(s.llm_cost_micros)
        .bind(s.tts_cost_micros)
        .bind(s.total_cost_micros)
        .bind(&s.stt_model)
        .bind(&s.llm_model)
        .bind(&s.tts_model)
        .bind(&s.price_catalog_version)
        .bind(&s.client_name)
        .bind(&s.client_version)
        .bind(ts(&Utc::now()))
        .execute(&mut *tx)
        .await?;
    let sql = format!(
        "insert into voice_turns ({TURN_COLUMNS}) values ({}) on conflict (session_id, turn_index) do update set {TURN_UPDATES}",
        placeholders(11, false)
    );
    for t in &snap.turns {
        sqlx::query(&sql)
            .bind(t.session_id.to_string())
            .bind(t.turn_index)
            .bind(&t.user_id)
            .bind(&t.user_text)
            .bind(&t.assistant_text)
            .bind(t.interrupted)
            .bind(t.eos_to_final_ms)
            .bind(t.llm_first_token_ms)
            .bind(t.tts_first_audio_ms)
            .bind(t.to_first_audio_ms)
            .bind(ts(&t.created_at))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

#[cfg(feature = "postgres")]
pub(crate) async fn write_postgres(pool: &sqlx::PgPool, snap: &Snapshot) -> Result<(), StoreError> {
    let s = &snap.session;
    let mut tx = pool.begin().await?;
    let sql = format!(
        "insert into public.voice_sessions ({SESSION_COLUMNS}) values ({}) on conflict (id) do update set {SESSION_UPDATES}",
        placeholders(23, true)
    );
    sqlx::query(&sql)
        .bind(s.id)
        .bind(&s.user_id)
        .bind(&s.conversation_id)
        .bind(s.started_at)
        .bind(s.ended_at)
        .bind(s.duration_ms)
        .bind(&s.end_reason)
        .bind(s.turns)
        .bind(s.stt_seconds)
        .bind(s.llm_input_tokens)
        .bind(s.llm_output_tokens)
        .bind(s.tts_chars)
        .bind(s.stt_cost_micros)
        .bind(s.llm_cost_micros)
        .bind(s.tts_cost_micros)
        .bind(s.total_cost_micros)
        .bind(&s.stt_model)
        .bind(&s.llm_model)
        .bind(&s.tts_model)
        .bind(&s.price_catalog_version)
        .bind(&s.client_name)
        .bind(&s.client_version)
        .bind(Utc::now())
        .execute(&mut *tx)
        .await?;
    let sql = format!(
        "insert into public.voice_turns ({TURN_COLUMNS}) values ({}) on conflict (session_id, turn_index) do update set {TURN_UPDATES}",
        placeholders(11, true)
    );
    for t in &snap.turns {
        sqlx::query(&sql)
            .bind(t.session_id)
            .bind(t.turn_index)
            .bind(&t.user_id)
            .bind(&t.user_text)
            .bind(&t.assistant_text)
            .bind(t.interrupted)
            .bind(t.eos_to_final_ms)
            .bind(t.llm_first_token_ms)
            .bind(t.tts_first_audio_ms)
            .bind(t.to_first_audio_ms)
            .bind(t.created_at)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
