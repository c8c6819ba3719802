//! In-process fake servers for the four cloud providers atlas-voice talks to,
//! speaking their real wire protocols over real sockets:
//!
//! * **Deepgram live STT** — WebSocket `GET /v1/listen`: linear16 PCM in,
//!   `Results` / `SpeechStarted` / `UtteranceEnd` / `Metadata` JSON out. The
//!   fake really listens: an energy detector on 10 ms frames finds utterances
//!   and the configured transcripts are returned for them with realistic
//!   timing (interim results, endpointing delay, utterance end).
//! * **Anthropic Messages** — `POST /v1/messages`, SSE stream of
//!   `message_start` … `message_stop` (or a plain `Message` with `stream:false`).
//! * **OpenAI Chat Completions** — `POST /v1/chat/completions`, SSE stream of
//!   `chat.completion.chunk` objects ending in `data: [DONE]`, with the
//!   optional usage chunk (`stream_options.include_usage`).
//! * **OpenAI TTS** — `POST /v1/audio/speech` with `response_format:"pcm"`:
//!   raw 24 kHz s16le mono speech-like audio, streamed and paced.
//!
//! For load runs with traces on, `POST /v1/traces` is an OTLP/HTTP collector that takes every
//! export and keeps nothing.
//!
//! The other way round, [`twilio`] is a fake **Twilio** that calls *us*: [`twilio::place_call`]
//! posts the signed voice webhook to our server, reads the TwiML answer and, for
//! `<Connect><Stream>`, opens the bidirectional Media Stream and plays the caller's side of
//! it — `connected`, `start`, real-time μ-law `media`, `dtmf`, `stop` — while playing out the
//! server's audio in real time, echoing its `mark`s once played and honouring `clear`. It is
//! a client, not part of the [`Fakes`] server.
//!
//! Everything is served by one axum router on one listener, so a single
//! [`Fakes`] instance stands in for all providers. Faults ([`Fault`]) can be
//! queued per provider ([`Target`]) to exercise retry and failure paths, and
//! what the fakes received is kept in [`Recorded`].
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use atlas_fakes::{Fakes, FakesConfig, Fault, ScriptedReply, Target};
//! let fakes = Fakes::start(FakesConfig::default(), "127.0.0.1:0".parse().unwrap()).await?;
//! // Point the providers at the fakes:
//! let _stt = fakes.deepgram_url(); // ws://127.0.0.1:PORT   (+ /v1/listen)
//! let _llm = fakes.anthropic_url(); // http://127.0.0.1:PORT (+ /v1/messages)
//! let _oai = fakes.openai_url(); // http://127.0.0.1:PORT/v1 (+ /chat/completions, /audio/speech)
//! // Make the next Anthropic request fail with a rate limit:
//! fakes.inject(Target::Anthropic, Fault::Status { status: 429, retry_after_s: Some(1) });
//! // Make the next OpenAI chat request answer with a tool call:
//! fakes.script(Target::OpenAiChat, ScriptedReply::call("get_weather", r#"{"city":"Paris"}"#));
//! fakes.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! # Control routes
//!
//! The same listener also serves:
//! * `POST /_fakes/faults` with `{"target":"anthropic","fault":{"kind":"status","status":429,"retry_after_s":1}}`
//!   queues a fault (same as [`Fakes::inject`]);
//! * `POST /_fakes/scripts` with `{"target":"anthropic","reply":{"text":"One moment.","tool_calls":[{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}]}}`
//!   queues a scripted reply (same as [`Fakes::script`]);
//! * `GET /_fakes/recorded` returns [`Recorded`] as JSON; `DELETE /_fakes/recorded` clears it.
//!
//! # Tools
//!
//! Both chat fakes accept `tools` and `tool_choice` and check them, and the pairing of every
//! call in the history with its result, as the real APIs do (400 in the provider's error
//! shape). They call tools in three ways: a [`ScriptedReply`] queued per target, the rule
//! [`LlmFakeConfig::tool_call`] (for load tests), and — when the request ends with tool
//! results — a default reply that speaks the first result, so a test can hear it reach the
//! answer.
//!
//! # Layout
//!
//! * `lib.rs` — public configuration, [`Target`], [`Fault`], [`Recorded`],
//!   [`Fakes`] (listener, router, shutdown).
//! * `state.rs` — state shared by all handlers: config, fault queues, recorder.
//! * `errors.rs` — error responses in each provider's shape (Deepgram
//!   `err_code`/`err_msg`, Anthropic `{"type":"error",…}`, OpenAI `{"error":{…}}`).
//! * `pacing.rs` — timed streaming bodies (paced chunks, injected aborts/stalls).
//! * `stt.rs` — Deepgram `/v1/listen` WebSocket: upgrade checks plus a pure,
//!   socket-free session state machine (energy VAD, audio clock, results).
//! * `llm.rs` — Anthropic Messages and OpenAI Chat Completions.
//! * `tts.rs` — OpenAI `/v1/audio/speech` and the deterministic speech-like synthesiser.
//! * `control.rs` — the `/_fakes/*` routes.
//! * `util.rs` — small helpers (ids, time formatting, token estimates).
//! * `twilio.rs` — the fake Twilio caller (webhook, TwiML, Media Stream, playout, μ-law).

#![warn(missing_docs)]

mod control;
mod errors;
mod llm;
mod pacing;
pub mod proxy;
mod state;
mod stt;
mod tts;
pub mod twilio;
mod util;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use tokio::task::JoinHandle;

use crate::state::Shared;

/// Maximum number of entries kept in each list of [`Recorded`]; older entries are dropped first.
pub const RECORD_CAP: usize = 10_000;

/// Sample rate of the audio returned by the fake TTS (OpenAI's `pcm` format: 24 kHz s16le mono).
pub const TTS_SAMPLE_RATE: u32 = 24_000;

/// Configuration of all fakes.
#[derive(Clone, Debug, Default)]
pub struct FakesConfig {
    /// Deepgram live STT fake.
    pub stt: SttFakeConfig,
    /// Anthropic / OpenAI chat fakes.
    pub llm: LlmFakeConfig,
    /// OpenAI TTS fake.
    pub tts: TtsFakeConfig,
    /// When `Some`, every request must carry this key (Deepgram `Authorization: Token <key>`,
    /// Anthropic `x-api-key: <key>`, OpenAI `Authorization: Bearer <key>`), otherwise it is
    /// answered with 401 in that provider's error shape. When `None`, credentials are not checked.
    pub api_key: Option<String>,
}

/// Behaviour of the fake Deepgram live transcription endpoint.
///
/// Timing model: audio is cut into 10 ms frames; a frame whose RMS level (dBFS) is above
/// [`energy_threshold_dbfs`](Self::energy_threshold_dbfs) is speech. An utterance starts after
/// [`min_speech`](Self::min_speech) of consecutive speech and ends once
/// [`silence_to_end`](Self::silence_to_end) of non-speech audio followed it. Its final
/// `Results` (`is_final` and `speech_final` true) is sent at
/// `max(now, wall_time(end of speech) + final_delay)`, where the wall time of a sample is the
/// arrival of the message that carried it: audio a client holds back to batch it is heard late,
/// as by any real recogniser. For a real-time client sending each frame as it is captured, the
/// end of speech is therefore *detected* `silence_to_end` after it
/// happened and the final is *sent* `final_delay` after it happened, so `silence_to_end` must
/// be `<= final_delay` for the final to arrive exactly `final_delay` after the end of speech
/// (otherwise it arrives `silence_to_end` after it).
#[derive(Clone, Debug)]
pub struct SttFakeConfig {
    /// Time from the end of speech to the `speech_final` Results. Default 150 ms.
    pub final_delay: Duration,
    /// Amount of non-speech audio that ends an utterance. Default 100 ms; keep it `<= final_delay`.
    pub silence_to_end: Duration,
    /// Audio time between interim (`is_final:false`) Results while an utterance goes on.
    /// Default 250 ms.
    pub interim_interval: Duration,
    /// A 10 ms frame whose RMS level in dBFS is above this is speech. Default -40.0.
    pub energy_threshold_dbfs: f32,
    /// Consecutive speech needed before an utterance counts. Default 60 ms.
    pub min_speech: Duration,
    /// Transcripts returned for successive utterances, cycled per connection.
    /// Default `["What is the weather like in Paris today?"]`.
    pub transcripts: Vec<String>,
    /// With no audio and no text message for this long the connection is closed with
    /// code 1011 and reason `NET-0001`, like Deepgram. Default 10 s.
    pub inactivity_timeout: Duration,
    /// Non-speech audio after which an `is_final` `Results` (not `speech_final`) carries the
    /// words so far — the whole transcript, or up to its next `|` — and the final only later
    /// ones (`None`: one final per utterance). Keep it above the gaps inside the speech.
    pub stable_after: Option<std::time::Duration>,
}

impl Default for SttFakeConfig {
    fn default() -> Self {
        Self {
            final_delay: Duration::from_millis(150),
            silence_to_end: Duration::from_millis(100),
            interim_interval: Duration::from_millis(250),
            energy_threshold_dbfs: -40.0,
            min_speech: Duration::from_millis(60),
            transcripts: vec!["What is the weather like in Paris today?".to_owned()],
            inactivity_timeout: Duration::from_secs(10),
            stable_after: None,
        }
    }
}

/// Behaviour of the fake LLMs (Anthropic Messages and OpenAI Chat Completions).
#[derive(Clone, Debug)]
pub struct LlmFakeConfig {
    /// Delay from the request to the first text token. Default 300 ms.
    pub first_token: Duration,
    /// Tokens per second after the first one. Default 50. Non-positive or non-finite means
    /// no delay between tokens.
    pub tokens_per_s: f64,
    /// Fixed reply. `None` (default) replies
    /// `"Sure, you asked: {last user text}. This is a reply from the fake model. Is there anything else?"`.
    ///
    /// Whatever this says, a request whose last message carries tool results is answered
    /// `"Here is what I found: {first result}."`, and a [`ScriptedReply`] comes first of all.
    pub reply: Option<String>,
    /// A tool call made instead of the text reply whenever the request declares this tool
    /// (and `tool_choice` allows it) and ends with the person's words (no tool results), as a
    /// load test's model would. Default `None`.
    pub tool_call: Option<ScriptedCall>,
}

impl Default for LlmFakeConfig {
    fn default() -> Self {
        Self {
            first_token: Duration::from_millis(300),
            tokens_per_s: 50.0,
            reply: None,
            tool_call: None,
        }
    }
}

/// A tool call a fake LLM makes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ScriptedCall {
    /// The tool's name (not checked against the request's tools, so a test can make the model
    /// call a tool that does not exist).
    pub name: String,
    /// The arguments exactly as streamed (may be invalid JSON on purpose). A non-streamed
    /// Anthropic reply carries them as an object, `{}` when they are not one.
    pub arguments: String,
}

/// The reply to one request, instead of the fake's own: text, then tool calls (each with a
/// fresh provider-style id), ending with the tool stop reason (`tool_use` / `tool_calls`)
/// when there are calls. `max_tokens` may cut the text; calls that do not fit whole are
/// dropped (the stop reason is then the token limit's).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct ScriptedReply {
    /// What the model says before calling (may be empty).
    #[serde(default)]
    pub text: String,
    /// The calls, in order (several make parallel calls).
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
}

impl ScriptedReply {
    /// A reply that is text only.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            tool_calls: Vec::new(),
        }
    }

    /// A reply that is one tool call and nothing else.
    pub fn call(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self {
            text: String::new(),
            tool_calls: vec![ScriptedCall::new(name, arguments)],
        }
    }
}

impl ScriptedCall {
    /// A call of tool `name` with `arguments` (streamed as they are).
    pub fn new(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            arguments: arguments.into(),
        }
    }
}

/// Behaviour of the fake OpenAI TTS.
#[derive(Clone, Debug)]
pub struct TtsFakeConfig {
    /// Delay from the request to the first audio chunk. Default 200 ms.
    pub first_byte: Duration,
    /// Real-time factor of the streaming after the first chunk: 4.0 (default) delivers one
    /// second of audio every 250 ms. Non-positive or non-finite means unpaced.
    pub speed: f64,
    /// Audio duration per input character (before the request's `speed`). Default 60 ms.
    pub ms_per_char: u32,
    /// Size of each streamed chunk in bytes (rounded down to whole samples). Default 4800
    /// (100 ms at 24 kHz).
    pub chunk_bytes: usize,
}

impl Default for TtsFakeConfig {
    fn default() -> Self {
        Self {
            first_byte: Duration::from_millis(200),
            speed: 4.0,
            ms_per_char: 60,
            chunk_bytes: 4800,
        }
    }
}

/// One of the faked providers; used to address fault queues and recorded requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Deepgram live STT (`/v1/listen`).
    Stt,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    OpenAiChat,
    /// OpenAI TTS (`/v1/audio/speech`).
    OpenAiTts,
}

/// A one-shot fault applied to the next request (or WebSocket connection) of a [`Target`].
///
/// Serialized with a `kind` tag, e.g. `{"kind":"status","status":529,"retry_after_s":null}` or
/// `{"kind":"drop_mid_stream"}`.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Abort the connection abruptly mid-stream: LLMs after 3 tokens, TTS after the first
    /// chunk, STT (without a close frame) after the first interim result of the first utterance.
    DropMidStream,
    /// Answer with this HTTP status and the provider's error body for it (Deepgram: refuse the
    /// WebSocket upgrade), with a `retry-after` header when `retry_after_s` is given.
    Status {
        /// HTTP status code, e.g. 429, 500, 529.
        status: u16,
        /// Value of the `retry-after` header, in seconds.
        #[serde(default)]
        retry_after_s: Option<u64>,
    },
    /// Fail in-band mid-stream: Anthropic `event: error` (overloaded_error) after 3 tokens,
    /// OpenAI `data: {"error":…}` after 3 tokens, TTS same as [`Fault::DropMidStream`],
    /// STT close frame 1011 `DATA-0000` after the first interim result.
    MidStreamError,
    /// Accept the request and then go silent: LLMs send headers (Anthropic also
    /// `message_start`) and nothing more, TTS sends headers only, STT accepts audio but never
    /// answers. Stalled streams end only when the client goes away or the fakes shut down.
    Stall,
}

/// What the fakes have received so far (snapshot; each list keeps the last [`RECORD_CAP`] entries).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// JSON bodies of LLM requests (Anthropic and OpenAI chat), in arrival order, refused ones
    /// included (tool calls and results as sent: Anthropic `tool_use` / `tool_result` blocks,
    /// OpenAI `tool_calls` and `role: "tool"` messages). Bodies that are not valid JSON are not
    /// recorded.
    pub llm_requests: Vec<(Target, serde_json::Value)>,
    /// `input` texts of TTS requests, in arrival order.
    pub tts_inputs: Vec<String>,
    /// Raw query strings of STT connection attempts, in arrival order.
    pub stt_connections: Vec<String>,
    /// The `traceparent` headers requests carried (W3C trace context), in arrival order.
    pub traceparents: Vec<(Target, String)>,
    /// `{"type":"KeepAlive"}` messages received.
    pub stt_keepalives: u64,
    /// `{"type":"Finalize"}` messages received.
    pub stt_finalizes: u64,
    /// `{"type":"CloseStream"}` messages (and empty binary messages) received.
    pub stt_close_streams: u64,
    /// Audio bytes received over all STT connections.
    pub stt_audio_bytes: u64,
    /// Binary messages received over all STT connections.
    pub stt_audio_messages: u64,
    /// What the fakes would bill for all of it.
    pub usage: Usage,
}

/// What the fakes would bill, counted the way the providers bill (see each field). The ledger
/// of a server wired to the fakes can be checked against it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Model requests accepted (answered with a 200), streaming or not.
    pub llm_requests: u64,
    /// Of those, streams the client left before their last event.
    pub llm_cut_requests: u64,
    /// Output tokens of the last text event of each cut stream: text that may still have been
    /// on its way when the client left (sent, billed, and never read — no provider reports
    /// usage for a stream the client left, so no client can count it).
    pub llm_cut_last_tokens: u64,
    /// Of those, streams still running (not billed yet).
    pub llm_open_streams: u64,
    /// Prompt tokens reported for every accepted request.
    pub llm_input_tokens: u64,
    /// Output tokens: as reported for a stream that finished; for a cut stream, the text sent
    /// before the client left at one token per four characters (the fakes' own count, as a
    /// provider bills a cancelled stream by its own count).
    pub llm_output_tokens: u64,
    /// Speech requests accepted.
    pub tts_requests: u64,
    /// Characters of their input.
    pub tts_chars: u64,
    /// Seconds of audio the recogniser received.
    pub stt_audio_seconds: f64,
}

/// A running set of fake providers on one listener. Dropping it stops the fakes too (without
/// waiting); [`Fakes::shutdown`] stops them and waits.
pub struct Fakes {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Fakes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fakes")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Fakes {
    /// Binds `addr` (port 0 picks a free port) and serves all fakes from a spawned task.
    pub async fn start(config: FakesConfig, addr: SocketAddr) -> std::io::Result<Fakes> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A deep backlog so that ~1000 clients connecting at once are not refused.
        let listener = socket.listen(4096)?;
        let local = listener.local_addr()?;
        let listener = listener.tap_io(|tcp| {
            // Small SSE/WebSocket writes must not wait for Nagle.
            let _ = tcp.set_nodelay(true);
        });

        let shared = Arc::new(Shared::new(config));
        let app = router(shared.clone());
        let token = shared.shutdown.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled_owned().await });
            if let Err(err) = serve.await {
                tracing::warn!(%err, "fake providers server stopped with an error");
            }
        });
        tracing::debug!(addr = %local, "fake providers listening");
        Ok(Fakes {
            addr: local,
            shared,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Deepgram base URL, `ws://ADDR` (the client appends `/v1/listen?…`).
    pub fn deepgram_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Anthropic base URL, `http://ADDR` (the client appends `/v1/messages`).
    pub fn anthropic_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// OpenAI base URL, `http://ADDR/v1` (the client appends `/chat/completions` or `/audio/speech`).
    pub fn openai_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues a one-shot fault for the next request/connection of `target` (FIFO per target).
    pub fn inject(&self, target: Target, fault: Fault) {
        self.shared.inject(target, fault);
    }

    /// Queues the reply of the next answered request of `target` (FIFO per target; only
    /// [`Target::Anthropic`] and [`Target::OpenAiChat`] use them). A request refused before it
    /// is answered (an injected [`Fault::Status`], a 400) leaves the script queued.
    pub fn script(&self, target: Target, reply: ScriptedReply) {
        self.shared.script(target, reply);
    }

    /// Snapshot of what the fakes have received so far.
    pub fn recorded(&self) -> Recorded {
        self.shared.recorder.snapshot()
    }

    /// Forgets everything recorded so far.
    pub fn clear_recorded(&self) {
        self.shared.recorder.clear();
    }

    /// Stops accepting connections, ends every open stream and WebSocket session, and waits
    /// (at most 5 s) for the server task to finish.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// The router serving every fake and the control routes.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/listen", get(stt::listen))
        .route("/v1/messages", post(llm::chat::<llm::AnthropicMessages>))
        .route("/v1/chat/completions", post(llm::chat::<llm::OpenAiChat>))
        .route("/v1/audio/speech", post(tts::speech))
        .route("/v1/traces", post(control::traces))
        .route(
            "/_fakes/faults",
            post(control::queue::<control::FaultRequest>),
        )
        .route(
            "/_fakes/scripts",
            post(control::queue::<control::ScriptRequest>),
        )
        .route(
            "/_fakes/recorded",
            get(control::recorded).delete(control::clear),
        )
        .fallback(control::not_found)
        .with_state(shared)
}
