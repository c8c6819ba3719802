//! Configuration: defaults ← file ← environment, validated at start.
//!
//! Keys are the environment names of the operator interface, lower-cased and without the
//! `ATLAS_` prefix (`ATLAS_MAX_SESSIONS_PER_USER` ↔ `max_sessions_per_user`); the provider
//! keys and `DATABASE_URL` / `REDIS_URL` keep their conventional unprefixed names. A TOML file
//! (`--config` or `ATLAS_CONFIG`) may set the same keys. Every secret may instead be read from
//! a file named by `<NAME>_FILE` (Docker and Fly secrets).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

mod mcp;
pub use mcp::{McpServerConfig, McpTransport};

/// Which speech recogniser to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SttKind {
    /// In-process engine (offline default).
    Local,
    /// Deepgram live streaming.
    Deepgram,
}

/// How the end of the person's turn is decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnPolicyKind {
    /// The recogniser's endpointing (`ATLAS_STT_ENDPOINTING_MS` of silence) ends the turn.
    Silence,
    /// The recogniser's endpointing after `ATLAS_TURN_PAUSE_MS` marks a pause; the local
    /// end-of-turn model decides, with `ATLAS_TURN_MAX_SILENCE_MS` as the fallback.
    Smart,
}

/// Which language model to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmKind {
    /// In-process engine (offline default).
    Local,
    /// Anthropic Messages.
    Anthropic,
    /// Any OpenAI-compatible Chat Completions server.
    Openai,
}

/// Which speech synthesiser to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TtsKind {
    /// In-process engine (offline default).
    Local,
    /// OpenAI speech.
    Openai,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The development-only JWT secret: `/dev/token` signs with it, and only a server in dev mode
/// accepts it. It is public; a production secret must differ.
pub const DEV_JWT_SECRET: &str = "atlas-voice-development-secret-do-not-use-in-production";

/// Most backchannel phrases configured.
pub const MAX_BACKCHANNELS: usize = 100;
/// Longest backchannel phrase, in characters.
pub const MAX_BACKCHANNEL_CHARS: usize = 40;

/// The whole server configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address the server listens on.
    pub listen: SocketAddr,
    /// Development mode: `/dev/token` and the development-only signing key. Listens only on
    /// a loopback address unless `dev_allow_public` is set. Never in production.
    pub dev: bool,
    /// Lifetime of the development tokens `POST /dev/token` mints, in seconds (10–86,400).
    pub dev_token_ttl_s: u64,
    /// Lets dev mode listen on a non-loopback address (logged loudly at start).
    pub dev_allow_public: bool,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Enables scale-out mode.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (several deployments can share one Redis).
    pub redis_prefix: String,
    /// Seconds a session's lease lasts without a refresh (a crashed instance's sessions
    /// free their places after this).
    pub lease_ttl_s: u64,
    /// HS256 secret for access tokens (Supabase "JWT secret").
    #[serde(serialize_with = "redact")]
    pub jwt_secret: Option<SecretString>,
    /// JWKS endpoint for asymmetric tokens.
    pub jwks_url: Option<String>,
    /// Unknown key ids refetch the JWKS at most this often, in seconds.
    pub jwks_min_refetch_s: u64,
    /// Expected `aud`.
    pub jwt_audience: String,
    /// Expected `iss`; unchecked when unset.
    pub jwt_issuer: Option<String>,
    /// Speech recogniser.
    pub stt: SttKind,
    /// Language model.
    pub llm: LlmKind,
    /// Speech synthesiser.
    pub tts: TtsKind,
    /// Deepgram key.
    #[serde(serialize_with = "redact")]
    pub deepgram_api_key: Option<SecretString>,
    /// Anthropic key.
    #[serde(serialize_with = "redact")]
    pub anthropic_api_key: Option<SecretString>,
    /// OpenAI (or compatible server) key.
    #[serde(serialize_with = "redact")]
    pub openai_api_key: Option<SecretString>,
    /// Deepgram base URL.
    pub deepgram_url: String,
    /// Anthropic base URL.
    pub anthropic_url: String,
    /// OpenAI base URL (speech, and chat unless `openai_chat_url` is set).
    pub openai_url: String,
    /// Base URL of the OpenAI-compatible chat server when it differs from `openai_url`
    /// (e.g. Ollama at `http://127.0.0.1:11434/v1`).
    pub openai_chat_url: Option<String>,
    /// Who serves `openai_chat_url`, for the price catalog: `openai` (priced as OpenAI's
    /// models) or `local` (a model on your own machine, such as Ollama, a llama.cpp server or
    /// `atlas-voice llm-server`: free, so budgets still hold).
    pub openai_chat_provider: String,
    /// Ask OpenAI-compatible servers for usage in the stream (turn off for servers that
    /// reject `stream_options`; usage is then estimated from the text).
    pub openai_include_usage: bool,
    /// Speech model.
    pub stt_model: String,
    /// Language model.
    pub llm_model: String,
    /// Speech synthesis model.
    pub tts_model: String,
    /// Default voice.
    pub tts_voice: String,
    /// Default language of the user's speech.
    pub stt_language: Option<String>,
    /// Phrases that, said alone while the assistant speaks, do not interrupt it ("mm-hm",
    /// "okay"); `None` keeps the built-in English list, an empty list turns the filter off.
    pub backchannels: Option<Vec<String>>,
    /// Silence (ms) after which the recogniser ends an utterance.
    pub stt_endpointing_ms: u32,
    /// Gap (ms) after the last word that ends a turn even without endpointing.
    pub stt_utterance_end_ms: u32,
    /// How the end of a turn is decided: `silence` or `smart`.
    pub turn_policy: TurnPolicyKind,
    /// Under `smart`: silence (ms) after which the recogniser reports a pause and the
    /// end-of-turn model is asked (the recogniser's endpointing).
    pub turn_pause_ms: u32,
    /// Under `smart`: silence (ms) after the end of speech that ends the turn whatever the
    /// model said.
    pub turn_max_silence_ms: u32,
    /// Under `smart`: the model's probability of a finished turn at or above which the turn
    /// ends.
    pub turn_threshold: f32,
    /// Preemptive replies a turn may start before it ends, on words that are likely final (0:
    /// none). A reply kept answers sooner; one discarded is billed like any other.
    pub preemptive_replies: u32,
    /// How long (ms) after the assistant stops speaking a transcript of its own words is
    /// still taken for its echo through the person's microphone, and ignored (0: never; for
    /// clients that cancel their echo).
    pub echo_window_ms: u32,
    /// System prompt (server configuration, never client input).
    pub system_prompt: String,
    /// Where `atlas-voice models fetch` put the local models.
    pub models_dir: std::path::PathBuf,
    /// Directory holding the engine worker binaries; next to the server binary when unset.
    pub engine_dir: Option<std::path::PathBuf>,
    /// Local speech model: `whisper-tiny.en` (default) or `whisper-base`.
    pub local_stt_model: String,
    /// Partial transcripts from the local recogniser: new speech (ms) between two re-decodes
    /// of the growing utterance; 0 turns them off.
    pub local_stt_partial_ms: u32,
    /// System prompt for the local language model, which follows a short one best.
    pub local_system_prompt: String,
    /// Hard reply length cap for the local language model, in tokens: an unfinished sentence
    /// at the cap is dropped, so replies end on a complete sentence.
    pub local_max_tokens: u32,
    /// Soft cap: past this many tokens the local model stops at the next sentence end.
    pub local_soft_max_tokens: u32,
    /// Sampling temperature of the local model; 0 decodes greedily (the measured best for
    /// short factual turns).
    pub local_temperature: f32,
    /// Repetition penalty of the local model (1 = none).
    pub local_repeat_penalty: f32,
    /// Sentences after which the local language model stops.
    pub local_max_sentences: u32,
    /// Local speech synthesis: `piper-joe` (the neural voice, default) or `espeak-ng`.
    pub local_tts_model: String,
    /// Threads of the neural voice's worker.
    pub local_tts_threads: u32,
    /// espeak-ng voice when `local_tts_model` is `espeak-ng`.
    pub local_tts_voice: String,
    /// espeak-ng speaking rate, words per minute.
    pub local_tts_wpm: u32,
    /// Requests each local engine holds (running and waiting); more get `engines_busy`.
    pub local_queue: usize,
    /// Threads of the Whisper worker (0: one per core).
    pub local_stt_threads: u32,
    /// Threads of the language model worker. Two: the stages of a turn mostly run one after
    /// another, and both cores halve the first sentence's time (docs/benchmarks.md).
    pub local_llm_threads: u32,
    /// How much lower the language model worker's scheduling priority is than the other
    /// workers' (0–19): it generates the next sentence while the voice speaks the first, and
    /// the voice should win the cores (docs/benchmarks.md).
    pub local_llm_nice: i32,
    /// Reply length cap in tokens.
    pub llm_max_tokens: u32,
    /// Conversation messages kept for the LLM.
    pub history_max_messages: usize,
    /// Conversation characters kept for the LLM (about four per token).
    pub history_max_chars: usize,
    /// The most reply audio sent ahead of real-time playback, in ms (the playout's high mark).
    pub playback_lead_ms: u64,
    /// Sentences synthesised ahead of the one playing.
    pub tts_prefetch: usize,
    /// A reply's first piece goes to synthesis after this many whole words when no clause
    /// boundary came first (0: it waits for a clause).
    pub eager_first_words: usize,
    /// ... or at its last whole word once the reply's first text is this old, in ms (0: no
    /// deadline).
    pub eager_first_ms: u64,
    /// Deadline for a provider's response headers, in seconds.
    pub provider_timeout_s: u64,
    /// Longest silence inside a provider stream, in seconds.
    pub provider_idle_timeout_s: u64,
    /// Retries for a failed provider request.
    pub provider_max_retries: usize,
    /// Concurrent sessions per user.
    pub max_sessions_per_user: u32,
    /// Sessions this instance holds at most (attached and detached); more get 503.
    pub max_sessions: usize,
    /// Connection attempts allowed per client address per second (sustained).
    pub connect_rate_per_s: u32,
    /// Burst of connection attempts allowed per client address.
    pub connect_burst: u32,
    /// Header carrying the client address when behind a trusted proxy (e.g. `fly-client-ip`,
    /// or `x-forwarded-for`); read only on connections from `trusted_proxies`.
    pub client_ip_header: Option<String>,
    /// Comma-separated addresses or CIDR ranges of the proxies whose `client_ip_header` is
    /// believed; from anywhere else the socket's peer address counts.
    pub trusted_proxies: Option<String>,
    /// A request head must arrive within this many seconds of the connection waiting for it
    /// (slow or silent clients are closed).
    pub http_header_timeout_s: u64,
    /// Connections that have not authenticated for a session, at most; when all places are
    /// taken, a new connection takes the place of the oldest, which is closed.
    pub max_pending_connections: usize,
    /// A started WebSocket frame or fragmented message must be complete within this many
    /// seconds.
    pub ws_message_timeout_s: u64,
    /// Grace after token expiry before the session closes with 4401, in seconds.
    pub token_grace_s: u64,
    /// Warn this many seconds before the maximum duration.
    pub max_duration_warning_s: u64,
    /// Text and binary frames accepted per second before `rate_limited` errors.
    pub max_frames_per_s: u32,
    /// Most client audio, in milliseconds, joined into one message to the recogniser where
    /// no reply waits for it (0: every frame at once); see `atlas_core::uplink`.
    pub stt_batch_ms: u64,
    /// Close a session after this long without client activity.
    pub idle_timeout_s: u64,
    /// Maximum session length.
    pub max_duration_s: u64,
    /// How long a dropped session waits for a resume.
    pub resume_window_s: u64,
    /// WebSocket ping cadence.
    pub heartbeat_interval_s: u64,
    /// Close when a pong is this late.
    pub heartbeat_timeout_s: u64,
    /// Per-session budget in dollars (0 = unlimited).
    pub session_budget_usd: f64,
    /// Fraction of the budget at which `budget.warning` is sent.
    pub budget_warn_fraction: f64,
    /// Optional per-user daily budget in dollars.
    pub user_daily_budget_usd: Option<f64>,
    /// Apply pending migrations at start.
    pub db_auto_migrate: bool,
    /// Where records wait while the database is unreachable.
    pub spool_dir: std::path::PathBuf,
    /// Above this many records waiting in the spool the instance stops reporting ready
    /// (records are still spooled).
    pub spool_max_records: usize,
    /// How often a running session's record is checkpointed, in seconds.
    pub checkpoint_interval_s: u64,
    /// Price catalog file replacing the built-in one.
    pub price_catalog: Option<std::path::PathBuf>,
    /// Start even though a budget is set and a configured model has no price (its cost is
    /// then unknown and budgets cannot stop it).
    pub allow_unpriced: bool,
    /// Smallest accepted binary frame.
    pub audio_chunk_min_bytes: usize,
    /// Largest accepted binary frame.
    pub audio_chunk_max_bytes: usize,
    /// Graceful shutdown deadline.
    pub drain_timeout_s: u64,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Put the turns' words and the user's id in trace spans (otherwise no text, and the
    /// user as a hash of the id).
    pub trace_content: bool,
    /// Tools the assistant may call, declared as `[[tools]]` in the configuration file.
    pub tools: Vec<ToolConfig>,
    /// Signs every webhook call (HMAC-SHA256); required when a webhook tool is declared.
    #[serde(serialize_with = "redact")]
    pub tool_webhook_secret: Option<SecretString>,
    /// Tool calls allowed in one turn; past it calls are refused and the model answers in
    /// words.
    pub tool_max_calls_per_turn: u32,
    /// Said while tools run when the model said nothing before calling (empty: silence).
    pub tool_acknowledgement: String,
    /// Keep tool arguments and results in the records (otherwise only sizes and outcomes).
    pub tool_record_content: bool,
    /// Largest tool result passed to the model, in bytes; larger answers fail the call.
    pub tool_max_result_bytes: usize,
    /// Model Context Protocol servers whose tools the assistant may call, declared as
    /// `[[mcp_servers]]` in the configuration file.
    pub mcp_servers: Vec<McpServerConfig>,
    /// Twilio account's auth token: signs Twilio's webhooks (and, derived, the stream's
    /// credential). Phone calls are off without it.
    #[serde(serialize_with = "redact")]
    pub twilio_auth_token: Option<SecretString>,
    /// The public base URL Twilio reaches this server at (`https://voice.example.com`): the
    /// webhook signature covers it, and the stream URL is built from it.
    pub public_url: Option<String>,
    /// Phone numbers answered, each for a user, declared as `[[twilio_numbers]]`.
    pub twilio_numbers: Vec<TwilioNumber>,
    /// Record callers' numbers in full (otherwise all but the last four digits are masked).
    pub twilio_record_caller: bool,
}

/// A phone number calls are answered on, and the user whose sessions, limits and budgets
/// they count against.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioNumber {
    /// The number in E.164 (`+14155550100`), as Twilio sends it in `To`.
    pub number: String,
    /// The user.
    pub user_id: String,
}

/// Where a declared tool runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolRunner {
    /// The server POSTs the call to the tool's `url`.
    Webhook,
    /// The client application answers `tool.call` with `tool.result`.
    Client,
}

/// One tool the assistant may call.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ToolConfig {
    /// Name the model calls it by: letters, digits, `_` and `-`, at most 64.
    pub name: String,
    /// What it does and when to use it, for the model.
    pub description: String,
    /// `webhook` or `client`.
    pub kind: ToolRunner,
    /// Webhook tools: the HTTPS endpoint (plain HTTP only on a loopback address).
    #[serde(default)]
    pub url: Option<String>,
    /// How long the call is waited for, in milliseconds (100–60,000).
    #[serde(default = "default_tool_timeout_ms")]
    pub timeout_ms: u64,
    /// Webhook tools: repeating the call is harmless, so a 502/503/504 is retried once
    /// within the time limit (a refused connection is always retried: nothing was sent).
    #[serde(default)]
    pub idempotent: bool,
    /// JSON Schema of the arguments (an object schema; checked before anything runs).
    #[serde(default = "empty_object_schema")]
    pub parameters: serde_json::Value,
}

fn default_tool_timeout_ms() -> u64 {
    5_000
}

fn empty_object_schema() -> serde_json::Value {
    serde_json::json!({"type": "object", "properties": {}})
}

/// An `https` URL, or an `http` one on a loopback address.
fn https_or_loopback(url: &str) -> bool {
    let loopback = |u: &url::Url| match u.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    match url::Url::parse(url) {
        Ok(u) => u.scheme() == "https" || (u.scheme() == "http" && loopback(&u)),
        Err(_) => false,
    }
}

fn redact<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("[redacted]"),
        None => s.serialize_none(),
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            dev: false,
            dev_token_ttl_s: 3600,
            dev_allow_public: false,
            database_url: "sqlite://./data/atlas-voice.db".into(),
            redis_url: None,
            redis_prefix: "atlas".into(),
            lease_ttl_s: 15,
            jwt_secret: None,
            jwks_url: None,
            jwks_min_refetch_s: 30,
            jwt_audience: "authenticated".into(),
            jwt_issuer: None,
            stt: SttKind::Local,
            llm: LlmKind::Local,
            tts: TtsKind::Local,
            deepgram_api_key: None,
            anthropic_api_key: None,
            openai_api_key: None,
            deepgram_url: "wss://api.deepgram.com".into(),
            anthropic_url: "https://api.anthropic.com".into(),
            openai_url: "https://api.openai.com/v1".into(),
            openai_chat_url: None,
            openai_chat_provider: "openai".into(),
            openai_include_usage: true,
            stt_model: "nova-3".into(),
            llm_model: "claude-haiku-4-5".into(),
            tts_model: "tts-1".into(),
            tts_voice: "alloy".into(),
            stt_language: None,
            backchannels: None,
            stt_endpointing_ms: 300,
            stt_utterance_end_ms: 1000,
            turn_policy: TurnPolicyKind::Silence,
            turn_pause_ms: 200,
            turn_max_silence_ms: 1500,
            turn_threshold: 0.5,
            preemptive_replies: 0,
            echo_window_ms: 0,
            system_prompt:
                "You are a friendly voice assistant. Answer in one to three short spoken \
                sentences. Use plain words: no lists, markdown, emoji or URLs."
                    .into(),
            llm_max_tokens: 300,
            models_dir: "models".into(),
            engine_dir: None,
            local_stt_model: "whisper-tiny.en".into(),
            local_stt_partial_ms: 700,
            local_system_prompt: "You are a helpful voice assistant. Answer the question directly in one short, correct sentence."
                .into(),
            local_max_tokens: 64,
            local_soft_max_tokens: 32,
            local_temperature: 0.0,
            local_repeat_penalty: 1.1,
            local_max_sentences: 2,
            local_tts_model: "piper-joe".into(),
            local_tts_threads: 2,
            local_tts_voice: "en-us".into(),
            local_tts_wpm: 175,
            local_queue: 4,
            local_stt_threads: 0,
            local_llm_threads: 2,
            local_llm_nice: 10,
            history_max_messages: 40,
            history_max_chars: 24_000,
            playback_lead_ms: 400,
            tts_prefetch: 2,
            eager_first_words: 5,
            eager_first_ms: 300,
            provider_timeout_s: 15,
            provider_idle_timeout_s: 15,
            provider_max_retries: 2,
            max_sessions_per_user: 3,
            max_sessions: 10_000,
            connect_rate_per_s: 5,
            connect_burst: 30,
            client_ip_header: None,
            trusted_proxies: None,
            http_header_timeout_s: 10,
            max_pending_connections: 1024,
            ws_message_timeout_s: 10,
            token_grace_s: 10,
            max_duration_warning_s: 60,
            max_frames_per_s: 100,
            stt_batch_ms: 100,
            idle_timeout_s: 600,
            max_duration_s: 1800,
            resume_window_s: 60,
            heartbeat_interval_s: 30,
            heartbeat_timeout_s: 10,
            session_budget_usd: 5.0,
            budget_warn_fraction: 0.8,
            user_daily_budget_usd: None,
            price_catalog: None,
            allow_unpriced: false,
            db_auto_migrate: true,
            spool_dir: "./data/spool".into(),
            spool_max_records: 100_000,
            checkpoint_interval_s: 60,
            audio_chunk_min_bytes: 100,
            audio_chunk_max_bytes: 102_400,
            drain_timeout_s: 30,
            log_format: LogFormat::Text,
            trace_content: false,
            tools: Vec::new(),
            tool_webhook_secret: None,
            tool_max_calls_per_turn: 5,
            tool_acknowledgement: String::new(),
            tool_record_content: false,
            tool_max_result_bytes: 16 * 1024,
            mcp_servers: Vec::new(),
            twilio_auth_token: None,
            public_url: None,
            twilio_numbers: Vec::new(),
            twilio_record_caller: false,
        }
    }
}

/// Environment variables read without the `ATLAS_` prefix.
const UNPREFIXED: [&str; 5] = [
    "DATABASE_URL",
    "REDIS_URL",
    "DEEPGRAM_API_KEY",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
];

/// Secrets that may be given as `<NAME>_FILE`.
const SECRET_FILES: [(&str, &str); 6] = [
    ("ATLAS_JWT_SECRET_FILE", "jwt_secret"),
    ("ATLAS_TOOL_WEBHOOK_SECRET_FILE", "tool_webhook_secret"),
    ("ATLAS_TWILIO_AUTH_TOKEN_FILE", "twilio_auth_token"),
    ("DEEPGRAM_API_KEY_FILE", "deepgram_api_key"),
    ("ANTHROPIC_API_KEY_FILE", "anthropic_api_key"),
    ("OPENAI_API_KEY_FILE", "openai_api_key"),
];

/// Every environment variable the server reads (deployment files are checked against it).
pub fn known_env_vars() -> Vec<String> {
    let mut names: Vec<String> = serde_json::to_value(Config::default())
        .ok()
        .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
        .unwrap_or_default()
        .into_iter()
        .map(|k| {
            let upper = k.to_uppercase();
            if UNPREFIXED.contains(&upper.as_str()) {
                upper
            } else {
                format!("ATLAS_{upper}")
            }
        })
        .collect();
    names.extend(SECRET_FILES.iter().map(|(env, _)| (*env).to_owned()));
    names.push("ATLAS_CONFIG".into());
    names.push("RUST_LOG".into());
    names.sort();
    names
}

/// A configuration problem, with a message that says what to change.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads defaults, then `file` (or `ATLAS_CONFIG`) if given, then the environment, and
    /// validates the result.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::load_unvalidated(file)?;
        config.validate()?;
        Ok(config)
    }

    /// Like [`Config::load`] without the final validation, for callers that adjust the
    /// configuration first (they must call [`Config::validate`]).
    pub fn load_unvalidated(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let from_env = std::env::var_os("ATLAS_CONFIG").map(std::path::PathBuf::from);
        if let Some(path) = file.map(Path::to_path_buf).or(from_env) {
            if !path.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment
            .merge(
                Env::prefixed("ATLAS_")
                    .ignore(&[
                        "CONFIG",
                        "JWT_SECRET_FILE",
                        "TOOL_WEBHOOK_SECRET_FILE",
                        "TWILIO_AUTH_TOKEN_FILE",
                    ])
                    .lowercase(true),
            )
            .merge(Env::raw().only(&UNPREFIXED).lowercase(true));
        for (env, key) in SECRET_FILES {
            if let Some(path) = std::env::var_os(env) {
                let value = std::fs::read_to_string(&path).map_err(|e| {
                    ConfigError(format!(
                        "{env} names {}, which cannot be read: {e}",
                        Path::new(&path).display()
                    ))
                })?;
                figment = figment.merge(Serialized::default(key, value.trim().to_owned()));
            }
        }
        let config: Config = figment
            .extract()
            .map_err(|e| ConfigError(describe_figment_error(e)))?;
        Ok(config)
    }

    /// Checks values and combinations, failing with a message naming the variable to fix.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        self.validate_twilio()?;
        if self.jwt_secret.is_none() && self.jwks_url.is_none() && !self.dev {
            return fail(
                "set ATLAS_JWT_SECRET (your Supabase project's JWT secret) or ATLAS_JWKS_URL; \
                 ATLAS_DEV=true uses a built-in development secret"
                    .into(),
            );
        }
        if self.dev && !self.listen.ip().is_loopback() && !self.dev_allow_public {
            return fail(format!(
                "ATLAS_DEV=true serves development tokens and listens only on a loopback address, \
                 not {}: set ATLAS_LISTEN=127.0.0.1:PORT (or, to expose a development server on \
                 purpose, ATLAS_DEV_ALLOW_PUBLIC=true)",
                self.listen
            ));
        }
        if !self.dev
            && self
                .jwt_secret
                .as_ref()
                .is_some_and(|s| s.expose_secret() == DEV_JWT_SECRET)
        {
            return fail(
                "ATLAS_JWT_SECRET is the public development secret; set your project's secret"
                    .into(),
            );
        }
        let need = |kind: &str, key: &Option<SecretString>, var: &str| {
            if key.is_none() {
                Err(ConfigError(format!("{kind} needs {var} (or {var}_FILE)")))
            } else {
                Ok(())
            }
        };
        if self.stt == SttKind::Deepgram {
            need(
                "ATLAS_STT=deepgram",
                &self.deepgram_api_key,
                "DEEPGRAM_API_KEY",
            )?;
        }
        if self.llm == LlmKind::Anthropic {
            need(
                "ATLAS_LLM=anthropic",
                &self.anthropic_api_key,
                "ANTHROPIC_API_KEY",
            )?;
        }
        if self.tts == TtsKind::Openai {
            need("ATLAS_TTS=openai", &self.openai_api_key, "OPENAI_API_KEY")?;
        }
        if !matches!(
            self.local_stt_model.as_str(),
            "whisper-tiny.en" | "whisper-base"
        ) {
            return fail(format!(
                "ATLAS_LOCAL_STT_MODEL must be whisper-tiny.en or whisper-base, not {:?}",
                self.local_stt_model
            ));
        }
        if !matches!(self.openai_chat_provider.as_str(), "openai" | "local") {
            return fail(format!(
                "ATLAS_OPENAI_CHAT_PROVIDER must be openai or local, not {:?}",
                self.openai_chat_provider
            ));
        }
        if self.local_stt_partial_ms != 0 && !(200..=10_000).contains(&self.local_stt_partial_ms) {
            return fail("ATLAS_LOCAL_STT_PARTIAL_MS must be 0 (off) or 200 to 10000".into());
        }
        if !(10..=86_400).contains(&self.dev_token_ttl_s) {
            return fail("ATLAS_DEV_TOKEN_TTL_S must be between 10 and 86400".into());
        }
        if self.local_queue == 0 || self.local_queue > 1024 {
            return fail("ATLAS_LOCAL_QUEUE must be between 1 and 1024".into());
        }
        if self.local_max_tokens == 0 || self.local_max_sentences == 0 {
            return fail(
                "ATLAS_LOCAL_MAX_TOKENS and ATLAS_LOCAL_MAX_SENTENCES must be at least 1".into(),
            );
        }
        if self.local_soft_max_tokens == 0 || self.local_soft_max_tokens > self.local_max_tokens {
            return fail(format!(
                "ATLAS_LOCAL_SOFT_MAX_TOKENS ({}) must be between 1 and ATLAS_LOCAL_MAX_TOKENS ({})",
                self.local_soft_max_tokens, self.local_max_tokens
            ));
        }
        if !(0.0..=2.0).contains(&self.local_temperature) {
            return fail("ATLAS_LOCAL_TEMPERATURE must be between 0 and 2".into());
        }
        if !(1.0..=2.0).contains(&self.local_repeat_penalty) {
            return fail("ATLAS_LOCAL_REPEAT_PENALTY must be between 1 and 2".into());
        }
        if !matches!(self.local_tts_model.as_str(), "piper-joe" | "espeak-ng") {
            return fail(format!(
                "ATLAS_LOCAL_TTS_MODEL must be piper-joe or espeak-ng, not {:?}",
                self.local_tts_model
            ));
        }
        if !(0..=19).contains(&self.local_llm_nice) {
            return fail("ATLAS_LOCAL_LLM_NICE must be between 0 and 19".into());
        }
        if !(1..=16).contains(&self.local_tts_threads) {
            return fail("ATLAS_LOCAL_TTS_THREADS must be between 1 and 16".into());
        }
        if !(80..=450).contains(&self.local_tts_wpm) {
            return fail("ATLAS_LOCAL_TTS_WPM must be between 80 and 450".into());
        }
        if self.audio_chunk_min_bytes < 2 || self.audio_chunk_min_bytes > self.audio_chunk_max_bytes
        {
            return fail(format!(
                "ATLAS_AUDIO_CHUNK_MIN_BYTES ({}) must be at least 2 and at most ATLAS_AUDIO_CHUNK_MAX_BYTES ({})",
                self.audio_chunk_min_bytes, self.audio_chunk_max_bytes
            ));
        }
        if self.audio_chunk_max_bytes > 1024 * 1024 {
            return fail("ATLAS_AUDIO_CHUNK_MAX_BYTES must be at most 1 MiB".into());
        }
        if !(self.session_budget_usd.is_finite() && self.session_budget_usd >= 0.0) {
            return fail("ATLAS_SESSION_BUDGET_USD must be a non-negative number".into());
        }
        if !(self.budget_warn_fraction > 0.0 && self.budget_warn_fraction <= 1.0) {
            return fail("ATLAS_BUDGET_WARN_FRACTION must be in (0, 1]".into());
        }
        if let Some(b) = self.user_daily_budget_usd
            && !(b.is_finite() && b >= 0.0)
        {
            return fail("ATLAS_USER_DAILY_BUDGET_USD must be a non-negative number".into());
        }
        if let Some(phrases) = &self.backchannels
            && (phrases.len() > MAX_BACKCHANNELS
                || phrases
                    .iter()
                    .any(|p| p.trim().is_empty() || p.chars().count() > MAX_BACKCHANNEL_CHARS))
        {
            return fail(format!(
                "ATLAS_BACKCHANNELS must hold at most {MAX_BACKCHANNELS} phrases of 1 to \
                 {MAX_BACKCHANNEL_CHARS} characters"
            ));
        }
        for (name, v) in [
            ("ATLAS_MAX_DURATION_S", self.max_duration_s),
            ("ATLAS_IDLE_TIMEOUT_S", self.idle_timeout_s),
            ("ATLAS_HEARTBEAT_INTERVAL_S", self.heartbeat_interval_s),
            ("ATLAS_HEARTBEAT_TIMEOUT_S", self.heartbeat_timeout_s),
            ("ATLAS_PROVIDER_TIMEOUT_S", self.provider_timeout_s),
            ("ATLAS_HTTP_HEADER_TIMEOUT_S", self.http_header_timeout_s),
            ("ATLAS_WS_MESSAGE_TIMEOUT_S", self.ws_message_timeout_s),
            (
                "ATLAS_PROVIDER_IDLE_TIMEOUT_S",
                self.provider_idle_timeout_s,
            ),
        ] {
            if v == 0 {
                return fail(format!("{name} must be at least 1"));
            }
        }
        if self.max_sessions == 0
            || self.connect_rate_per_s == 0
            || self.connect_burst == 0
            || self.max_pending_connections == 0
        {
            return fail(
                "ATLAS_MAX_SESSIONS, ATLAS_CONNECT_RATE_PER_S, ATLAS_CONNECT_BURST and \
                 ATLAS_MAX_PENDING_CONNECTIONS must be at least 1"
                    .into(),
            );
        }
        if self.stt_batch_ms > 250 {
            return fail(
                "ATLAS_STT_BATCH_MS must be at most 250 (the largest message recognisers recommend)"
                    .into(),
            );
        }
        if self.max_frames_per_s < 10 {
            return fail(
                "ATLAS_MAX_FRAMES_PER_S must be at least 10 (20 ms audio needs 50)".into(),
            );
        }
        atlas_store::backend_of(&self.database_url).map_err(|e| ConfigError(e.to_string()))?;
        crate::client_addr::ClientAddr::from_config(self)?;
        if self.lease_ttl_s < 2 {
            return fail("ATLAS_LEASE_TTL_S must be at least 2".into());
        }
        if self.spool_max_records == 0 {
            return fail("ATLAS_SPOOL_MAX_RECORDS must be at least 1".into());
        }
        if self.checkpoint_interval_s == 0 {
            return fail("ATLAS_CHECKPOINT_INTERVAL_S must be at least 1".into());
        }
        if self.max_sessions_per_user == 0 {
            return fail("ATLAS_MAX_SESSIONS_PER_USER must be at least 1".into());
        }
        if self.tts_prefetch == 0 || self.tts_prefetch > 8 {
            return fail("ATLAS_TTS_PREFETCH must be between 1 and 8".into());
        }
        if self.eager_first_words > 50 {
            return fail("ATLAS_EAGER_FIRST_WORDS must be at most 50".into());
        }
        if self.preemptive_replies > 4 {
            return fail("ATLAS_PREEMPTIVE_REPLIES must be at most 4".into());
        }
        if self.echo_window_ms > 5_000 {
            return fail("ATLAS_ECHO_WINDOW_MS must be at most 5000".into());
        }
        if self.eager_first_ms > 5_000 {
            return fail("ATLAS_EAGER_FIRST_MS must be at most 5000".into());
        }
        if !(50..=2_000).contains(&self.turn_pause_ms) {
            return fail("ATLAS_TURN_PAUSE_MS must be between 50 and 2000".into());
        }
        if self.turn_max_silence_ms < self.turn_pause_ms || self.turn_max_silence_ms > 10_000 {
            return fail(
                "ATLAS_TURN_MAX_SILENCE_MS must be between ATLAS_TURN_PAUSE_MS and 10000".into(),
            );
        }
        if !(self.turn_threshold > 0.0 && self.turn_threshold < 1.0) {
            return fail("ATLAS_TURN_THRESHOLD must be between 0 and 1 (exclusive)".into());
        }
        if self.llm_max_tokens == 0 {
            return fail("ATLAS_LLM_MAX_TOKENS must be at least 1".into());
        }
        if self.system_prompt.len() > 32 * 1024 {
            return fail("ATLAS_SYSTEM_PROMPT is longer than 32 KiB".into());
        }
        self.validate_tools()?;
        for (name, url, schemes) in [
            ("ATLAS_DEEPGRAM_URL", &self.deepgram_url, &["ws", "wss"][..]),
            (
                "ATLAS_ANTHROPIC_URL",
                &self.anthropic_url,
                &["http", "https"][..],
            ),
            ("ATLAS_OPENAI_URL", &self.openai_url, &["http", "https"][..]),
        ] {
            match url::Url::parse(url) {
                Ok(u) if schemes.contains(&u.scheme()) => {}
                _ => {
                    return fail(format!(
                        "{name} must be a {} URL, got {url:?}",
                        schemes.join("/")
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the phone settings: a token needs an https public URL, numbers need a token, each
    /// number is E.164, declared once, for a user.
    fn validate_twilio(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        if self.twilio_auth_token.is_none() {
            if !self.twilio_numbers.is_empty() {
                return fail("[[twilio_numbers]] needs ATLAS_TWILIO_AUTH_TOKEN".into());
            }
            return Ok(());
        }
        match self.public_url.as_deref().map(url::Url::parse) {
            // Twilio connects media streams only to wss:// URLs.
            Some(Ok(u)) if u.scheme() == "https" && u.query().is_none() => {}
            _ => {
                return fail(
                    "ATLAS_TWILIO_AUTH_TOKEN needs ATLAS_PUBLIC_URL, the https:// base URL Twilio \
                     reaches this server at (no query string)"
                        .into(),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in &self.twilio_numbers {
            let digits = n.number.strip_prefix('+').unwrap_or("");
            if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return fail(format!(
                    "twilio number {:?} is not in E.164 form (+ and up to 15 digits)",
                    n.number
                ));
            }
            if n.user_id.is_empty() || n.user_id.len() > 128 {
                return fail(format!(
                    "twilio number {}: user_id must be 1-128 characters",
                    n.number
                ));
            }
            if !seen.insert(&n.number) {
                return fail(format!("twilio number {} is declared twice", n.number));
            }
        }
        Ok(())
    }

    /// Checks the declared tools (their schemas are compiled by the tool catalog at start).
    fn validate_tools(&self) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        if self.tools.is_empty() && self.mcp_servers.is_empty() {
            return Ok(());
        }
        if self.llm == LlmKind::Local {
            return fail(
                "tools need a model that can call them: the local model (SmolLM2) cannot; set \
                 ATLAS_LLM=anthropic, or ATLAS_LLM=openai for an OpenAI-compatible server \
                 (Ollama, llama.cpp server) with a tool-calling model"
                    .into(),
            );
        }
        if self.tools.len() > 64 {
            return fail("at most 64 tools may be declared".into());
        }
        if !(1..=32).contains(&self.tool_max_calls_per_turn) {
            return fail("ATLAS_TOOL_MAX_CALLS_PER_TURN must be between 1 and 32".into());
        }
        if !(64..=1024 * 1024).contains(&self.tool_max_result_bytes) {
            return fail("ATLAS_TOOL_MAX_RESULT_BYTES must be between 64 and 1048576".into());
        }
        if self.tool_acknowledgement.len() > 200 {
            return fail("ATLAS_TOOL_ACKNOWLEDGEMENT is longer than 200 bytes".into());
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tools {
            let valid_name = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !valid_name {
                return fail(format!(
                    "tool name {:?} must be 1 to 64 letters, digits, '_' or '-'",
                    t.name
                ));
            }
            if !names.insert(t.name.as_str()) {
                return fail(format!("tool {:?} is declared twice", t.name));
            }
            if t.description.trim().is_empty() || t.description.len() > 4096 {
                return fail(format!(
                    "tool {:?} needs a description (at most 4096 bytes): the model reads it to \
                     decide when to call the tool",
                    t.name
                ));
            }
            if !(100..=60_000).contains(&t.timeout_ms) {
                return fail(format!(
                    "tool {:?}: timeout_ms must be between 100 and 60000",
                    t.name
                ));
            }
            if t.parameters.get("type").and_then(|v| v.as_str()) != Some("object") {
                return fail(format!(
                    "tool {:?}: parameters must be a JSON Schema with \"type\": \"object\"",
                    t.name
                ));
            }
            match (t.kind, &t.url) {
                (ToolRunner::Webhook, None) => {
                    return fail(format!("webhook tool {:?} needs a url", t.name));
                }
                (ToolRunner::Webhook, Some(url)) => {
                    if !https_or_loopback(url) {
                        return fail(format!(
                            "webhook tool {:?}: url must be https (http only on a loopback \
                             address), got {url:?}",
                            t.name
                        ));
                    }
                    if self.tool_webhook_secret.is_none() {
                        return fail(format!(
                            "webhook tool {:?} needs ATLAS_TOOL_WEBHOOK_SECRET (or \
                             ATLAS_TOOL_WEBHOOK_SECRET_FILE) to sign its calls",
                            t.name
                        ));
                    }
                }
                (ToolRunner::Client, Some(_)) => {
                    return fail(format!(
                        "client tool {:?} has a url: client tools are answered by the \
                         application, not called by the server",
                        t.name
                    ));
                }
                (ToolRunner::Client, None) => {}
            }
        }
        if self
            .tool_webhook_secret
            .as_ref()
            .is_some_and(|s| s.expose_secret().len() < 32)
        {
            return fail("ATLAS_TOOL_WEBHOOK_SECRET must be at least 32 characters".into());
        }
        mcp::validate_all(&self.mcp_servers)
    }

    /// Uses the cloud adapters against the given base URLs (the provider fakes in development
    /// and tests) with placeholder keys, in dev mode.
    pub fn use_provider_urls(&mut self, deepgram: String, anthropic: String, openai: String) {
        let key = || Some(SecretString::from("fake-key"));
        self.dev = true;
        self.stt = SttKind::Deepgram;
        self.llm = LlmKind::Anthropic;
        self.tts = TtsKind::Openai;
        self.deepgram_url = deepgram;
        self.anthropic_url = anthropic;
        self.openai_url = openai;
        self.deepgram_api_key = key();
        self.anthropic_api_key = key();
        self.openai_api_key = key();
    }

    /// Silence (ms) after which the recogniser reports the end of speech: the end of the turn
    /// under the `silence` policy, a pause under `smart`.
    pub fn recogniser_endpointing_ms(&self) -> u32 {
        match self.turn_policy {
            TurnPolicyKind::Silence => self.stt_endpointing_ms,
            TurnPolicyKind::Smart => self.turn_pause_ms,
        }
    }

    /// The session machine's turn policy.
    pub fn session_turn_policy(&self) -> atlas_core::turns::TurnPolicy {
        match self.turn_policy {
            TurnPolicyKind::Silence => atlas_core::turns::TurnPolicy::Silence,
            TurnPolicyKind::Smart => atlas_core::turns::TurnPolicy::Smart {
                threshold: self.turn_threshold,
                max_silence: Duration::from_millis(self.turn_max_silence_ms.into()),
                // What the silence policy would wait, for a pause the model cannot judge.
                unjudged: Duration::from_millis(
                    self.stt_endpointing_ms.min(self.turn_max_silence_ms).into(),
                ),
            },
        }
    }

    /// Per-call timeouts and retries for the HTTP providers.
    pub fn http_settings(&self) -> atlas_providers::HttpSettings {
        atlas_providers::HttpSettings {
            response_timeout: Duration::from_secs(self.provider_timeout_s),
            idle_timeout: Duration::from_secs(self.provider_idle_timeout_s),
            max_retries: self.provider_max_retries,
            ..atlas_providers::HttpSettings::default()
        }
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    let mut parts = Vec::new();
    for err in e {
        let key = err.path.join(".");
        let var = if key.is_empty() {
            String::new()
        } else if UNPREFIXED.contains(&key.to_uppercase().as_str()) {
            key.to_uppercase()
        } else {
            format!("ATLAS_{}", key.to_uppercase())
        };
        match &err.kind {
            figment::error::Kind::UnknownField(field, _) => {
                parts.push(format!("unknown setting {field:?}"))
            }
            kind if var.is_empty() => parts.push(kind.to_string()),
            kind => parts.push(format!("{var}: {kind}")),
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_operator_interface() {
        let c = Config::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.max_sessions_per_user, 3);
        assert_eq!(
            (c.idle_timeout_s, c.max_duration_s, c.resume_window_s),
            (600, 1800, 60)
        );
        assert_eq!((c.heartbeat_interval_s, c.heartbeat_timeout_s), (30, 10));
        assert_eq!(c.session_budget_usd, 5.0);
        assert_eq!(
            (c.audio_chunk_min_bytes, c.audio_chunk_max_bytes),
            (100, 102_400)
        );
        assert_eq!(c.stt_model, "nova-3");
        assert_eq!(c.llm_model, "claude-haiku-4-5");
    }

    #[test]
    fn tools_are_validated_at_start() {
        let hook = |url: &str| ToolConfig {
            name: "lookup_order".into(),
            description: "Looks up an order.".into(),
            kind: ToolRunner::Webhook,
            url: Some(url.into()),
            timeout_ms: 5000,
            idempotent: false,
            parameters: empty_object_schema(),
        };
        let base = || Config {
            dev: true,
            llm: LlmKind::Anthropic,
            anthropic_api_key: Some(SecretString::from("k")),
            tools: vec![hook("https://api.example.com/hook")],
            tool_webhook_secret: Some(SecretString::from("s".repeat(32))),
            ..Config::default()
        };
        base().validate().unwrap();
        let refused = |c: Config, expect: &str| {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(expect), "{expect}: {e}");
        };
        refused(
            Config {
                llm: LlmKind::Local,
                ..base()
            },
            "the local model (SmolLM2) cannot",
        );
        refused(
            Config {
                tool_webhook_secret: None,
                ..base()
            },
            "ATLAS_TOOL_WEBHOOK_SECRET",
        );
        refused(
            Config {
                tool_webhook_secret: Some(SecretString::from("short")),
                ..base()
            },
            "at least 32 characters",
        );
        for url in ["http://api.example.com/hook", "ftp://x/", "not a url"] {
            refused(
                Config {
                    tools: vec![hook(url)],
                    ..base()
                },
                "must be https",
            );
        }
        let mut loopback = base();
        loopback.tools = vec![hook("http://127.0.0.1:9000/hook")];
        loopback.validate().unwrap();
        let mut twice = base();
        twice.tools.push(twice.tools[0].clone());
        refused(twice, "declared twice");
        let mut bad_name = base();
        bad_name.tools[0].name = "look up".into();
        refused(bad_name, "letters, digits");
        let mut not_object = base();
        not_object.tools[0].parameters = serde_json::json!({"type": "string"});
        refused(not_object, "\"type\": \"object\"");
        let mut client_with_url = base();
        client_with_url.tools[0].kind = ToolRunner::Client;
        refused(client_with_url, "client tools are answered by the");
        let mut slow = base();
        slow.tools[0].timeout_ms = 120_000;
        refused(slow, "timeout_ms");
    }

    /// The configuration loaded from a file holding `toml` (not validated).
    fn from_file(toml: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("atlas.toml");
        std::fs::write(&path, toml).unwrap();
        Config::load_unvalidated(Some(&path)).unwrap()
    }

    #[test]
    fn backchannels_come_from_the_config_file_and_are_bounded() {
        let c = from_file("backchannels = [\"mm-hm\", \"d'accord\", \"ja genau\"]\n");
        assert_eq!(
            c.backchannels.as_deref(),
            Some(&["mm-hm".to_owned(), "d'accord".into(), "ja genau".into()][..])
        );
        let with = |phrases: Vec<String>| Config {
            dev: true,
            backchannels: Some(phrases),
            ..Config::default()
        };
        assert!(
            with(vec![]).validate().is_ok(),
            "an empty list turns the filter off"
        );
        for bad in [
            vec![" ".to_owned()],
            vec!["x".repeat(MAX_BACKCHANNEL_CHARS + 1)],
            vec!["ok".to_owned(); MAX_BACKCHANNELS + 1],
        ] {
            let e = with(bad).validate().unwrap_err().to_string();
            assert!(e.contains("ATLAS_BACKCHANNELS"), "{e}");
        }
    }

    #[test]
    fn tools_come_from_the_config_file() {
        let c = from_file(
            r#"
tool_acknowledgement = "One moment."

[[tools]]
name = "open_page"
description = "Opens a page of the app."
kind = "client"
parameters = { type = "object", required = ["page"], properties = { page = { type = "string", enum = ["settings"] } } }
"#,
        );
        assert_eq!(c.tools.len(), 1);
        assert_eq!(c.tools[0].kind, ToolRunner::Client);
        assert_eq!(c.tools[0].timeout_ms, 5000);
        assert_eq!(c.tools[0].parameters["required"][0], "page");
        assert_eq!(c.tool_acknowledgement, "One moment.");
    }

    #[test]
    fn local_engine_settings_are_checked() {
        let dev = || Config {
            dev: true,
            ..Config::default()
        };
        assert!(dev().validate().is_ok());
        let cases: [(Config, &str); 6] = [
            (
                Config {
                    local_tts_model: "festival".into(),
                    ..dev()
                },
                "ATLAS_LOCAL_TTS_MODEL",
            ),
            (
                Config {
                    local_soft_max_tokens: 100,
                    local_max_tokens: 64,
                    ..dev()
                },
                "ATLAS_LOCAL_SOFT_MAX_TOKENS",
            ),
            (
                Config {
                    local_temperature: 3.0,
                    ..dev()
                },
                "ATLAS_LOCAL_TEMPERATURE",
            ),
            (
                Config {
                    local_repeat_penalty: 0.5,
                    ..dev()
                },
                "ATLAS_LOCAL_REPEAT_PENALTY",
            ),
            (
                Config {
                    local_stt_partial_ms: 50,
                    ..dev()
                },
                "ATLAS_LOCAL_STT_PARTIAL_MS",
            ),
            (
                Config {
                    openai_chat_provider: "acme".into(),
                    ..dev()
                },
                "ATLAS_OPENAI_CHAT_PROVIDER",
            ),
        ];
        for (config, variable) in cases {
            let e = config.validate().unwrap_err().to_string();
            assert!(e.contains(variable), "{e}");
        }
        // Partials off and the fallback voice are valid choices.
        let c = Config {
            local_stt_partial_ms: 0,
            local_tts_model: "espeak-ng".into(),
            ..dev()
        };
        assert!(c.validate().is_ok());
    }

    #[test]
    fn phone_settings_are_checked() {
        let phone = |public_url: Option<&str>, number: &str| Config {
            dev: true,
            twilio_auth_token: Some(SecretString::from("token")),
            public_url: public_url.map(str::to_owned),
            twilio_numbers: vec![TwilioNumber {
                number: number.into(),
                user_id: "u".into(),
            }],
            ..Config::default()
        };
        assert!(
            phone(Some("https://voice.example.com"), "+14155550100")
                .validate()
                .is_ok()
        );
        for (url, number, says) in [
            (None, "+14155550100", "ATLAS_PUBLIC_URL"),
            (
                Some("http://voice.example.com"),
                "+14155550100",
                "ATLAS_PUBLIC_URL",
            ),
            (
                Some("https://voice.example.com/?a=b"),
                "+14155550100",
                "ATLAS_PUBLIC_URL",
            ),
            (Some("https://voice.example.com"), "4155550100", "E.164"),
            (Some("https://voice.example.com"), "+1415555010x", "E.164"),
        ] {
            let e = phone(url, number).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{url:?} {number}: {e}");
        }
        let numbers_without_token = Config {
            twilio_auth_token: None,
            ..phone(Some("https://voice.example.com"), "+14155550100")
        };
        let e = numbers_without_token.validate().unwrap_err().to_string();
        assert!(e.contains("ATLAS_TWILIO_AUTH_TOKEN"), "{e}");
    }

    #[test]
    fn validation_names_the_variable() {
        let c = Config::default();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("ATLAS_JWT_SECRET"), "{e}");
        let c = Config {
            dev: true,
            stt: SttKind::Deepgram,
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("DEEPGRAM_API_KEY"), "{e}");
        let c = Config {
            dev: true,
            audio_chunk_min_bytes: 500,
            audio_chunk_max_bytes: 100,
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("ATLAS_AUDIO_CHUNK_MIN_BYTES")
        );
        let c = Config {
            dev: true,
            deepgram_url: "http://x".into(),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("ATLAS_DEEPGRAM_URL")
        );
        for (c, name) in [
            (
                Config {
                    eager_first_words: 51,
                    ..Config::default()
                },
                "ATLAS_EAGER_FIRST_WORDS",
            ),
            (
                Config {
                    eager_first_ms: 5_001,
                    ..Config::default()
                },
                "ATLAS_EAGER_FIRST_MS",
            ),
            (
                Config {
                    preemptive_replies: 5,
                    ..Config::default()
                },
                "ATLAS_PREEMPTIVE_REPLIES",
            ),
            (
                Config {
                    echo_window_ms: 5_001,
                    ..Config::default()
                },
                "ATLAS_ECHO_WINDOW_MS",
            ),
            (
                Config {
                    turn_pause_ms: 10,
                    ..Config::default()
                },
                "ATLAS_TURN_PAUSE_MS",
            ),
            (
                Config {
                    turn_max_silence_ms: 100,
                    ..Config::default()
                },
                "ATLAS_TURN_MAX_SILENCE_MS",
            ),
            (
                Config {
                    turn_threshold: f32::NAN,
                    ..Config::default()
                },
                "ATLAS_TURN_THRESHOLD",
            ),
        ] {
            let c = Config { dev: true, ..c };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
    }

    #[test]
    fn dev_mode_refuses_a_public_address_unless_forced() {
        let public = Config {
            dev: true,
            listen: "0.0.0.0:8080".parse().unwrap(),
            ..Config::default()
        };
        let e = public.validate().unwrap_err().to_string();
        assert!(e.contains("ATLAS_DEV_ALLOW_PUBLIC"), "{e}");
        let v6 = Config {
            listen: "[::]:8080".parse().unwrap(),
            ..public.clone()
        };
        assert!(v6.validate().is_err());
        let loopback = Config {
            listen: "[::1]:8080".parse().unwrap(),
            ..public.clone()
        };
        loopback.validate().unwrap();
        let forced = Config {
            dev_allow_public: true,
            ..public
        };
        forced.validate().unwrap();
        // Without dev mode a public address is the normal case.
        let production = Config {
            listen: "0.0.0.0:8080".parse().unwrap(),
            jwks_url: Some("https://example.invalid/jwks.json".into()),
            ..Config::default()
        };
        production.validate().unwrap();
    }

    #[test]
    fn dev_mode_keeps_real_provider_keys_on_loopback() {
        let c = Config {
            dev: true,
            stt: SttKind::Deepgram,
            deepgram_api_key: Some(SecretString::from("real-key")),
            jwt_secret: Some(SecretString::from("the-project-secret-0123456789")),
            ..Config::default()
        };
        c.validate().unwrap();
    }

    #[test]
    fn the_development_secret_is_refused_outside_dev_mode() {
        let c = Config {
            jwt_secret: Some(SecretString::from(DEV_JWT_SECRET)),
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("public development secret"), "{e}");
    }

    #[test]
    fn secrets_are_redacted_when_serialised() {
        let c = Config {
            jwt_secret: Some(SecretString::from("hunter2")),
            ..Config::default()
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(!s.contains("hunter2"));
        assert!(s.contains("[redacted]"));
    }

    #[test]
    fn env_var_list_covers_the_spec_names() {
        let names = known_env_vars();
        for n in [
            "ATLAS_LISTEN",
            "DATABASE_URL",
            "REDIS_URL",
            "ATLAS_JWT_SECRET",
            "ATLAS_JWKS_URL",
            "ATLAS_STT",
            "DEEPGRAM_API_KEY",
            "ATLAS_DEEPGRAM_URL",
            "ATLAS_TTS_VOICE",
            "ATLAS_MAX_SESSIONS_PER_USER",
            "ATLAS_USER_DAILY_BUDGET_USD",
            "ATLAS_DRAIN_TIMEOUT_S",
            "ATLAS_LOG_FORMAT",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
    }
}

#[cfg(test)]
mod deployment_files {
    //! The deployment files set only variables the server knows.

    use super::known_env_vars;

    fn root(file: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(file);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn is_var(name: &str) -> bool {
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    }

    fn check(file: &str, names: Vec<String>) {
        let known = known_env_vars();
        assert!(!names.is_empty(), "{file} sets no variables?");
        for n in names {
            assert!(
                known.contains(&n),
                "{file} sets {n}, which the server does not read"
            );
        }
    }

    #[test]
    fn env_example_uses_known_variables() {
        let names = root(".env.example")
            .lines()
            .map(|l| l.trim_start_matches('#').trim())
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
            .filter(|k| is_var(k))
            .collect();
        check(".env.example", names);
    }

    #[test]
    fn fly_toml_uses_known_variables() {
        let text = root("fly.toml");
        let env = text
            .split("[env]")
            .nth(1)
            .expect("an [env] section")
            .split("\n[")
            .next()
            .unwrap_or("");
        let names = env
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
            .filter(|k| is_var(k))
            .collect();
        check("fly.toml", names);
        assert!(text.contains("kill_signal = \"SIGTERM\""));
        assert!(text.contains("path = \"/healthz\"") && text.contains("path = \"/readyz\""));
    }

    #[test]
    fn dockerfile_uses_known_variables() {
        let text = root("Dockerfile");
        let mut names = Vec::new();
        for env_block in text.split("\nENV ").skip(1) {
            for line in env_block.lines() {
                let l = line.trim().trim_end_matches('\\').trim();
                if let Some((k, _)) = l.split_once('=') {
                    names.push(k.trim().to_owned());
                }
                if !line.trim_end().ends_with('\\') {
                    break;
                }
            }
        }
        check("Dockerfile", names);
        assert!(text.contains("USER atlas"), "runs as a non-root user");
    }
}
