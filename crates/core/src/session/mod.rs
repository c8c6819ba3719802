//! The session machine: every decision about one voice session, without IO.
//!
//! A driver (the WebSocket server, later telephony) feeds [`Input`]s with the time they
//! happened ([`Session::handle`]), wakes the machine at [`Session::poll_timeout`]
//! ([`Session::handle_timeout`]), and carries out what [`Session::poll_output`] returns: events
//! to send, audio to forward, replies to start or abort, records to write, shared state to
//! publish, the close. The driver owns sockets, provider links, tasks and the clock; it
//! decides nothing.
//!
//! The machine owns:
//! - attach / detach / resume, and the resume token's hand-over (the previous token stays valid
//!   until the client has shown it holds the new one);
//! - the abuse limits (invalid frames, frame floods);
//! - the timers: heartbeat, idle (only a person's activity counts), maximum duration, token
//!   expiry, resume window, checkpoints and, with scale-out, the lease;
//! - one [`Ledger`](ledger::Ledger): consumption → cost → session and daily budget;
//! - turn-taking through [`Turns`] and the bounded [`History`];
//! - the reply's playout ([`Playout`]): when each piece of its audio goes out, which of its
//!   words were heard (only those enter the history), and dropping the rest on a barge-in.

mod event;
pub mod ledger;
pub mod prestart;

pub use crate::turns::Heard;
pub use event::{Ending, Event, Opaque};

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::vocab::{AudioFormat, ErrorCode, Limits};

use crate::audio::{ChunkError, rms_dbfs_le, validate_chunk};
use crate::cost::{Micros, Prices};
use crate::history::{History, HistoryLimits, Message, Role};
use crate::latency::Latency;
use crate::playout::Playout;
use crate::timers::{SessionTimers, TimerAction, TimerConfig, TimerEnd};
use crate::tools::{CheckedCall, ToolCall, ToolKind, ToolOutcome, ToolResult};
use crate::turns::{self, Action, TurnConfig, Turns};
use crate::uplink::Uplink;
use ledger::{Ledger, LedgerState, LlmBill, ReportedTokens, SpendDelta, Verdict};

/// Settings of every session on a server.
#[derive(Clone, Debug)]
pub struct Config {
    /// Heartbeat, idle, duration, token and resume-window timers.
    pub timers: TimerConfig,
    /// Turn-taking.
    pub turns: TurnConfig,
    /// Conversation context bounds.
    pub history: HistoryLimits,
    /// Unit prices of the engines in use.
    pub prices: Prices,
    /// Per-session budget.
    pub session_budget: Option<Micros>,
    /// Fraction of the budget at which `budget.warning` is sent.
    pub budget_warn_fraction: f64,
    /// Per-user daily budget.
    pub daily_budget: Option<Micros>,
    /// Smallest accepted audio frame, in bytes.
    pub chunk_min_bytes: usize,
    /// Largest accepted audio frame, in bytes.
    pub chunk_max_bytes: usize,
    /// Frames per second a client may send; more are dropped.
    pub max_frames_per_s: u32,
    /// Invalid frames tolerated before the connection is closed with 1008.
    pub max_invalid_frames: u32,
    /// Seconds in a row over the frame-rate cap before the connection is closed with 1008.
    pub max_flood_seconds: u32,
    /// Consecutive recogniser failures before the session gives up.
    pub max_recogniser_failures: u32,
    /// Most audio held back to reach the recogniser in one message (zero: every frame at
    /// once); see [`crate::uplink`].
    pub recogniser_batch: Duration,
    /// Characters of the system prompt (for the estimate of a reply's cost).
    pub system_prompt_chars: usize,
    /// Output token cap of a reply.
    pub llm_max_tokens: u32,
    /// Most reply audio sent ahead of the listener's playback (see [`crate::playout`]).
    pub playout_lead: Duration,
    /// Interval between record checkpoints.
    pub checkpoint_interval: Duration,
    /// How long a replaced resume token stays valid when the client never uses the new one.
    pub token_handover_grace: Duration,
    /// Scale-out: lifetime of the session's lease without a refresh (refreshed every third).
    pub lease_ttl: Option<Duration>,
    /// Limits as told to the client.
    pub limits: Limits,
    /// How tools are used (`None`: no tools declared).
    pub tools: Option<ToolPolicy>,
}

/// Invalid frames tolerated before the connection is closed.
pub const MAX_INVALID_FRAMES: u32 = 50;
/// Longest tool-call id kept as the model sent it.
pub const MAX_CALL_ID: usize = 128;
/// Keypad digits gathered before `#` at most.
pub const MAX_KEYPAD_DIGITS: usize = 32;
/// Seconds in a row over the frame-rate cap before the connection is closed.
pub const MAX_FLOOD_SECONDS: u32 = 5;
/// Consecutive recogniser failures before the session gives up.
pub const MAX_RECOGNISER_FAILURES: u32 = 4;
/// How long a replaced resume token still resumes the session when the client never shows
/// it received the new one (its `session.resumed` was lost).
pub const TOKEN_HANDOVER_GRACE: Duration = Duration::from_secs(30);

impl Config {
    /// The reference deployment's settings (the server's fixed limits and timer defaults;
    /// nova-3, claude-haiku-4-5 and tts-1 prices; a $5 session budget; a short system prompt
    /// and replies of at most 200 tokens; no tools, no scale-out): the base of the machine's
    /// tests and of the simulation.
    pub fn reference() -> Self {
        const S: Duration = Duration::from_secs(1);
        const MS: Duration = Duration::from_millis(1);
        let timers = TimerConfig {
            heartbeat_interval: 30 * S,
            heartbeat_timeout: 10 * S,
            idle_timeout: 600 * S,
            max_duration: 1800 * S,
            max_duration_warning: 60 * S,
            token_grace: 10 * S,
            resume_window: 60 * S,
        };
        let budget_usd = 5.0;
        Config {
            limits: Limits {
                max_duration_s: timers.max_duration.as_secs(),
                budget_usd: Some(budget_usd),
                idle_timeout_s: timers.idle_timeout.as_secs(),
                resume_window_s: timers.resume_window.as_secs(),
            },
            timers,
            turns: TurnConfig::default(),
            history: HistoryLimits {
                max_messages: 40,
                max_chars: 20_000,
            },
            prices: Prices {
                stt_per_minute: Some(4_300),
                llm_input_per_mtok: Some(1_000_000),
                llm_output_per_mtok: Some(5_000_000),
                llm_cache_read_per_mtok: None,
                llm_cache_write_per_mtok: None,
                tts_per_mchar: Some(15_000_000),
            },
            session_budget: Some(crate::cost::from_usd(budget_usd)),
            budget_warn_fraction: 0.8,
            daily_budget: None,
            chunk_min_bytes: 100,
            chunk_max_bytes: 102_400,
            max_frames_per_s: 100,
            max_invalid_frames: MAX_INVALID_FRAMES,
            max_flood_seconds: MAX_FLOOD_SECONDS,
            max_recogniser_failures: MAX_RECOGNISER_FAILURES,
            recogniser_batch: 100 * MS,
            system_prompt_chars: 100,
            llm_max_tokens: 200,
            playout_lead: 400 * MS,
            checkpoint_interval: 60 * S,
            token_handover_grace: TOKEN_HANDOVER_GRACE,
            lease_ttl: None,
            tools: None,
        }
    }
}

/// How the model's tool calls are handled.
#[derive(Clone, Debug)]
pub struct ToolPolicy {
    /// Most calls in one turn: further calls are refused, and once it is reached the next
    /// request lets the model answer only in words.
    pub max_calls_per_turn: u32,
    /// Said while tools run when the model said nothing before calling ("One moment.").
    pub acknowledgement: Option<String>,
    /// Keep arguments and results in the records (otherwise only sizes and outcomes).
    pub record_content: bool,
    /// Largest result passed to the model, in bytes; a larger one fails the call.
    pub max_result_bytes: usize,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent `session.end`.
    ClientEnded,
    /// The connection dropped before the session started.
    Disconnected,
    /// The server is draining.
    Draining,
    /// Protocol abuse.
    Policy,
    /// A provider failed beyond recovery.
    ProviderFailed,
    /// No `session.start` in time.
    StartTimeout,
    /// No activity of the person for the idle timeout.
    IdleTimeout,
    /// Maximum duration reached.
    MaxDuration,
    /// The session or daily budget is spent.
    BudgetExhausted,
    /// The access token expired without a refresh.
    TokenExpired,
    /// Dropped and not resumed within the window.
    ResumeExpired,
    /// Another connection or instance claimed the session: this owner is stale.
    Moved,
    /// The session's lease lapsed (the shared store was unreachable for its lifetime) and its
    /// place may have been given away.
    LeaseLost,
}

impl EndReason {
    /// Bounded label for logs, metrics and records.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::ClientEnded => "client_ended",
            EndReason::Disconnected => "disconnected",
            EndReason::Draining => "draining",
            EndReason::Policy => "policy",
            EndReason::ProviderFailed => "provider_failed",
            EndReason::StartTimeout => "start_timeout",
            EndReason::IdleTimeout => "idle_timeout",
            EndReason::MaxDuration => "max_duration",
            EndReason::BudgetExhausted => "budget_exhausted",
            EndReason::TokenExpired => "token_expired",
            EndReason::ResumeExpired => "resume_expired",
            EndReason::Moved => "moved",
            EndReason::LeaseLost => "lease_lost",
        }
    }

    /// The fatal error the client is told before the close, if any.
    fn error(self) -> Option<(ErrorCode, &'static str)> {
        Some(match self {
            EndReason::IdleTimeout => (ErrorCode::IdleTimeout, "no activity for the idle timeout"),
            EndReason::BudgetExhausted => (
                ErrorCode::BudgetExhausted,
                "the budget for this session is spent",
            ),
            EndReason::MaxDuration => (
                ErrorCode::MaxDuration,
                "the session reached its maximum duration",
            ),
            EndReason::TokenExpired => (
                ErrorCode::TokenExpired,
                "the access token expired; send auth.refresh before expiry",
            ),
            EndReason::Moved => (
                ErrorCode::ResumeFailed,
                "this session was resumed by another connection",
            ),
            EndReason::LeaseLost => (
                ErrorCode::Internal,
                "the session service lost track of this session; start a new one",
            ),
            _ => return None,
        })
    }
}

impl From<TimerEnd> for EndReason {
    fn from(t: TimerEnd) -> Self {
        match t {
            TimerEnd::Idle => EndReason::IdleTimeout,
            TimerEnd::MaxDuration => EndReason::MaxDuration,
            TimerEnd::TokenExpired => EndReason::TokenExpired,
            TimerEnd::ResumeWindowExpired => EndReason::ResumeExpired,
        }
    }
}

/// Why a reply stopped early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyFailure {
    /// A provider failed (code for the client: `llm_failed`, `tts_failed`, `engines_busy`).
    Provider(ErrorCode),
}

/// What a reply's work cost and how it went, reported by the driver when its task ended (or
/// was aborted). Its audio and words reached the machine on their way
/// ([`Input::ReplyAudio`], [`Input::ReplySentence`]).
#[derive(Clone, Debug)]
pub struct ReplyOutcome {
    /// The turn.
    pub turn_id: u64,
    /// The language-model request's bill.
    pub llm: LlmBill,
    /// Characters sent to synthesis.
    pub tts_chars: u64,
    /// Stage latencies up to the first synthesised audio (the machine adds the time to the
    /// first audio sent).
    pub latency: Latency,
    /// Set when it stopped early on its own.
    pub failure: Option<ReplyFailure>,
}

/// Why a connection is closed; each transport renders it on its wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closing {
    /// The session ended.
    Ended(EndReason),
    /// The connection missed its heartbeat (the session waits for a resume).
    HeartbeatTimeout,
    /// Another connection resumed the session.
    Replaced,
    /// A resume that cannot attach: a later connection resumed the session.
    ResumeOvertaken,
}

/// Answer of the shared store to a lease refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseAnswer {
    /// Extended.
    Extended,
    /// Extended, after the store had lost the session's entry (a restart without
    /// persistence, a failover, an eviction) and took this owner's word for it: the session's
    /// state and tokens must be published again.
    Reasserted,
    /// Another owner holds the session now (the store holds a higher epoch).
    Stale,
    /// The lease had lapsed and the user's places are taken.
    NoPlace,
    /// The store did not answer.
    Unreachable,
}

/// A connection that completed its start and asks to be attached (the first, or a resume).
#[derive(Clone, Debug)]
pub struct Attaching {
    /// A resume (`session.resumed`) rather than a new session.
    pub resumed: bool,
    /// A resume whose hand-over a later resume overtook (scale-out): it is refused.
    pub overtaken: bool,
    /// The user the connection authenticated as.
    pub user_id: String,
    /// The connection's resume token (fresh, generated by the driver).
    pub token: String,
    /// When the connection's access token expires.
    pub token_expiry: Instant,
    /// Input audio format.
    pub input: AudioFormat,
    /// Output audio format.
    pub output: AudioFormat,
}

/// An access token from `auth.refresh`, verified by the driver.
#[derive(Clone, Debug)]
pub struct VerifiedToken {
    /// Its user.
    pub user_id: String,
    /// When it expires.
    pub expiry: Instant,
}

/// Something that happened.
#[derive(Clone, Debug)]
pub enum Input<'a> {
    /// A connection completed its `session.start` and is attached (the first, or a resume,
    /// replacing any connection still attached).
    Attach(Attaching),
    /// The attached connection is gone (closed, stopped reading, missed its pong).
    Detach,
    /// A binary audio frame.
    Audio(Bytes),
    /// Push-to-talk released.
    Commit,
    /// Stop the reply.
    Cancel,
    /// A typed user turn.
    Text(&'a str),
    /// Application ping with its opaque id.
    Ping(Option<Opaque>),
    /// `session.start` on a started session.
    StartAgain,
    /// End the session.
    End,
    /// A message that could not be parsed (code and message for the client).
    Invalid(ErrorCode, String),
    /// The transport's heartbeat answer.
    Pong,
    /// `auth.refresh`: a new access token to verify ([`Output::VerifyToken`]).
    Refresh(String),
    /// A refreshed access token, verified by the driver: whose it is and when it expires,
    /// or why it was refused.
    TokenRefreshed(Result<VerifiedToken, String>),
    /// Recognition.
    Heard(Heard<'a>),
    /// The end-of-turn model's answer to [`Output::ScoreTurn`].
    TurnScored {
        /// The pause it judged.
        pause: u64,
        /// Its probability that the turn is complete.
        probability: f32,
    },
    /// The end-of-turn model will not answer [`Output::ScoreTurn`] (busy, or failed): the
    /// pause ends as the silence policy would end it.
    TurnUnjudged {
        /// The pause it was asked about.
        pause: u64,
    },
    /// The recogniser connection failed (`busy`: the engine queue was full; `failures`: in a
    /// row).
    RecogniserLost {
        /// The engine was busy (the utterance was dropped; not a failure of the link).
        busy: bool,
        /// Consecutive failures.
        failures: u32,
    },
    /// A reply's task ended (finished, failed, or aborted on request).
    ReplyEnded(ReplyOutcome),
    /// Audio forwarded to the recogniser that it will never receive (its queue was full, or
    /// the backlog kept while reconnecting overflowed): the provider does not bill it.
    RecognitionDropped {
        /// Its length.
        seconds: f64,
    },
    /// A key pressed on a phone's keypad (`0`–`9`, `*`, `#`, `A`–`D`).
    Digit(char),
    /// The listener's side confirms it played the reply to `turn_id` up to `offset` bytes of
    /// its PCM, as a telephony provider does by echoing marks.
    Played {
        /// The turn.
        turn_id: u64,
        /// Bytes of its audio at the output rate.
        offset: u64,
    },
    /// Words of the reply to `turn_id` as the model writes them.
    ReplyText {
        /// The turn.
        turn_id: u64,
        /// The words.
        text: String,
    },
    /// Synthesised audio of the reply to `turn_id`, following what came before it, at the
    /// output rate (16-bit little-endian, whole samples). Pushed while
    /// [`Session::wants_reply_audio`] says so.
    ReplyAudio {
        /// The turn.
        turn_id: u64,
        /// The audio.
        pcm: &'a [u8],
    },
    /// All audio of a sentence of the reply to `turn_id` was pushed.
    ReplySentence {
        /// The turn.
        turn_id: u64,
        /// The model request it came from (0, then one more after each tool round), or
        /// `None` for words said while tools ran.
        round: Option<u32>,
        /// The sentence.
        text: String,
    },
    /// A lease refresh sent at `sent_at` was answered.
    Lease {
        /// The answer.
        answer: LeaseAnswer,
        /// When the refresh was sent (the lease runs from then at the latest).
        sent_at: Instant,
    },
    /// The model's request ended asking for tools (its words so far go on playing).
    ToolCalls {
        /// The turn.
        turn_id: u64,
        /// What the model said before calling.
        text: String,
        /// The calls, in the model's order, checked against the declared tools.
        calls: Vec<CheckedCall>,
        /// That request's bill.
        llm: LlmBill,
    },
    /// The client application answered a `tool.call` (`Ok`: the result as JSON text;
    /// `Err`: its error).
    ToolResult {
        /// The call.
        call_id: &'a str,
        /// The answer.
        result: Result<String, String>,
    },
    /// A server tool's webhook answered (`Ok`: the result as JSON text; `Err`: why it
    /// failed).
    ToolFinished {
        /// The call.
        call_id: String,
        /// The answer.
        result: Result<String, String>,
    },
    /// Another connection or instance claimed the session.
    OwnershipLost,
    /// The user's spend today across sessions.
    DailySpent(Micros),
    /// The server is shutting down.
    Shutdown,
}

/// A completed (or cut, or refused) turn, for the record.
#[derive(Clone, Debug, PartialEq)]
pub struct TurnLog {
    /// Turn number.
    pub turn_id: u64,
    /// What the person said.
    pub user_text: String,
    /// What the assistant said, as far as it was heard.
    pub assistant_text: String,
    /// Cut off, failed or not answered.
    pub interrupted: bool,
    /// Where the turn's time went.
    pub latency: Latency,
    /// Bounded outcome label: `completed`, `interrupted`, `failed`, `refused`.
    pub outcome: &'static str,
    /// When the person stopped speaking, if known; the latency figures count from it.
    pub end_of_speech: Option<Instant>,
    /// When the reply started (the model was asked), or the turn was refused.
    pub started: Instant,
    /// When the turn ended.
    pub ended: Instant,
    /// Tokens billed for the turn's language-model requests (reported, or measured where
    /// the provider did not say).
    pub tokens: ReportedTokens,
    /// Characters sent to synthesis.
    pub tts_chars: u64,
    /// When the reply's first audio was sent.
    pub first_audio: Option<Instant>,
    /// Length of the reply's audio the listener heard (all that was sent, for a reply that
    /// ended on its own).
    pub audio_heard: Duration,
    /// How long the turn, once heard, waited for the reply before it to report (a barge-in
    /// waits for the reply it cut): time queued in the server, just before `started`.
    pub queued: Duration,
}

/// A tool call that ended, for the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolLog {
    /// Turn number.
    pub turn_id: u64,
    /// The provider's call id.
    pub call_id: String,
    /// The tool's name as the model wrote it.
    pub name: String,
    /// Where it ran (`None`: refused before running).
    pub kind: Option<ToolKind>,
    /// Size of the arguments, in bytes.
    pub arguments_bytes: usize,
    /// When the model's request for it was taken (its round started).
    pub started: Instant,
    /// From the model's request to the answer.
    pub duration: Duration,
    /// How it ended.
    pub outcome: ToolOutcome,
    /// The arguments, when the operator keeps content.
    pub arguments: Option<String>,
    /// The result or error told to the model, when the operator keeps content.
    pub result: Option<String>,
}

/// How the session finished and what the driver still owes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finish {
    /// Why.
    pub reason: EndReason,
    /// Write the final record and release the session's place.
    pub record: bool,
    /// Keep the session's place and publish it for a resume on another instance (drain with
    /// scale-out) instead of releasing it.
    pub handover: bool,
}

/// What the driver must do.
#[derive(Clone, Debug)]
pub enum Output {
    /// Tell the attached client (each transport renders it on its wire).
    Event(Event),
    /// Send reply audio of `turn_id` to the attached client now (16-bit little-endian PCM at
    /// the output rate).
    Audio {
        /// The turn.
        turn_id: u64,
        /// The audio.
        pcm: Bytes,
    },
    /// Send a transport-level ping.
    Ping,
    /// Verify an access token from `auth.refresh` off the session's loop (answer with
    /// [`Input::TokenRefreshed`]); one at a time.
    VerifyToken(String),
    /// Forward accepted audio to the recogniser.
    Forward {
        /// The frame.
        pcm: Bytes,
        /// It may wait to go in one message with the frames after it (until a frame that is
        /// not held, [`Output::SendHeld`], a finalise or a close).
        hold: bool,
    },
    /// Send the audio held for the recogniser now.
    SendHeld,
    /// An audio frame was refused (bounded label for metrics).
    Rejected(&'static str),
    /// Ask the recogniser to finalise what it has (push-to-talk).
    Finalize,
    /// Ask the end-of-turn model whether the person's turn is complete, judging the last
    /// seconds of audio forwarded to the recogniser; answer with [`Input::TurnScored`], or
    /// [`Input::TurnUnjudged`] when the model will not answer (or not at all: the turn
    /// policy's maximum silence ends the turn anyway).
    ScoreTurn {
        /// The pause it judges.
        pause: u64,
    },
    /// Close the recogniser connection (detached or ending).
    CloseRecogniser,
    /// Start replying to `turn_id` with the conversation so far ([`Session::prompt`]). A draft
    /// (a reply to words that may not be the whole turn) starts the same way: until its turn
    /// ends with its words the machine keeps its text and audio from the client.
    StartReply {
        /// The turn.
        turn_id: u64,
        /// When the person stopped speaking, if known.
        end_of_speech: Option<Instant>,
    },
    /// A draft reply (started before its turn ended) was settled: `kept` as the turn's reply,
    /// or discarded (its work is billed all the same).
    DraftSettled {
        /// Kept.
        kept: bool,
    },
    /// Abort the reply to `turn_id` at once and report its outcome ([`Input::ReplyEnded`]).
    AbortReply {
        /// The turn.
        turn_id: u64,
    },
    /// Run a tool: a server tool's webhook (answer with [`Input::ToolFinished`]), or a
    /// `tool.call` to the client application for a client tool (it answers itself).
    CallTool {
        /// The turn.
        turn_id: u64,
        /// The call (arguments checked).
        call: ToolCall,
        /// Where it runs.
        kind: ToolKind,
        /// How long it is waited for.
        timeout: Duration,
    },
    /// Stop waiting for a call: abort a server tool's request; tell the client
    /// (`tool.cancelled`).
    CancelTool {
        /// The call.
        call_id: String,
        /// Where it runs.
        kind: ToolKind,
        /// `timeout`, `interrupted` or `ended`.
        reason: &'static str,
    },
    /// Say `text` in the reply to `turn_id` now, while its tools run.
    Acknowledge {
        /// The turn.
        turn_id: u64,
        /// The words.
        text: String,
    },
    /// Send the reply's next request with the current history (its tools answered).
    ContinueReply {
        /// The turn.
        turn_id: u64,
        /// Whether the model may call tools again (the turn's limit is not reached).
        tools_allowed: bool,
    },
    /// A tool call ended.
    ToolLog(ToolLog),
    /// A turn is complete.
    Turn(TurnLog),
    /// Spend to meter and to add to the user's daily total (answer with
    /// [`Input::DailySpent`]).
    Spend(SpendDelta),
    /// Write a checkpoint of the record.
    Checkpoint,
    /// Publish the session's resume state to the shared store (scale-out).
    Publish,
    /// Refresh the lease (answer with [`Input::Lease`]).
    RefreshLease,
    /// Make `token` resume this session.
    RegisterToken(String),
    /// `token` no longer resumes this session.
    RetireToken(String),
    /// Close the attached connection (the session itself goes on, detached).
    CloseConnection(Closing),
    /// Attach the connection that asked ([`Input::Attach`]), in place of the one closed just
    /// before, if any.
    AttachConnection,
    /// Refuse the connection that asked ([`Input::Attach`]): tell it `code` and `message`
    /// (fatal), then close it.
    RefuseConnection {
        /// The error it is told.
        code: ErrorCode,
        /// Why.
        message: &'static str,
        /// How it is closed.
        closing: Closing,
    },
    /// The session is over: close the connection with the reason's code and finish.
    Finish(Finish),
}

/// What another instance needs to continue the session (apart from the record's own data).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Carried {
    /// Turns so far.
    pub last_turn: u64,
    /// Conversation, oldest first.
    pub history: Vec<CarriedMessage>,
    /// Consumption and budget state.
    pub ledger: LedgerState,
}

/// One message of a carried history.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CarriedMessage {
    /// Who said it.
    pub role: CarriedRole,
    /// What was said.
    pub text: String,
    /// The assistant's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The results of the previous message's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_results: Vec<ToolResult>,
}

/// Speaker of a carried message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CarriedRole {
    /// The person.
    User,
    /// The assistant.
    Assistant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Live,
    /// Ending; waiting for the aborted reply's outcome.
    Ending(EndReason),
    Ended,
}

/// Frame accounting for the abuse limits.
#[derive(Clone, Copy, Debug)]
struct Abuse {
    invalid: u32,
    window_start: Instant,
    frames: u32,
    flood_windows: u32,
}

/// The reply in flight.
#[derive(Debug)]
struct Reply {
    turn_id: u64,
    /// When it started, and when the person stopped speaking, if known.
    started: Instant,
    end_of_speech: Option<Instant>,
    /// When its first audio went out.
    first_audio: Option<Instant>,
    /// Its audio on the way to the listener.
    playout: Playout,
    /// Model requests that ended in tool calls so far.
    rounds: u32,
    /// The driver's report, held while its audio plays out.
    outcome: Option<ReplyOutcome>,
    /// What the person said in the turn being answered.
    user_text: String,
    /// The machine asked for it to be aborted.
    aborted: bool,
    /// Tool calls made this turn (against the limit).
    calls_made: u32,
    /// What the model said before its tool calls, this turn.
    said: String,
    /// Time spent waiting for tools, this turn.
    tool_time: Duration,
    /// Tokens billed for its model requests so far.
    tokens: ReportedTokens,
    /// Characters billed for synthesis so far.
    tts_chars: u64,
    acknowledged: bool,
    /// The tool calls being waited for.
    round: Option<ToolRound>,
    /// A draft: its turn has not ended yet (`user_text` is the words so far). Nothing of it
    /// reaches the client and none of its tools run until the turn ends with its words.
    draft: bool,
    /// A draft's words, held until it is kept.
    held_text: Vec<String>,
    /// A draft's tool calls, held until it is kept.
    parked: Option<(String, Vec<CheckedCall>)>,
    /// How long its turn waited to start, once heard.
    queued: Duration,
}

/// A turn that ended while a cut reply had not yet reported its outcome: it starts once
/// that reply has been billed and its spoken words entered the history.
#[derive(Debug)]
struct WaitingTurn {
    turn_id: u64,
    text: String,
    end_of_speech: Option<Instant>,
    /// When it was heard.
    heard: Instant,
}

#[derive(Debug)]
struct ToolRound {
    text: String,
    started: Instant,
    calls: Vec<PendingCall>,
}

#[derive(Debug)]
struct PendingCall {
    call: ToolCall,
    kind: Option<ToolKind>,
    deadline: Option<Instant>,
    result: Option<ToolResult>,
}

#[derive(Debug, Default)]
struct Refresh {
    verifying: bool,
    next: Option<String>,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    ttl: Duration,
    next_refresh: Instant,
    valid_until: Instant,
    in_flight: bool,
}

/// One session's state.
#[derive(Debug)]
pub struct Session {
    id: String,
    config: Config,
    phase: Phase,
    attached: bool,
    /// The user the attached connections authenticate as.
    user_id: String,
    /// Resume token of the attached connection.
    token: String,
    /// The token it replaced, valid until the client shows it has the new one or the grace
    /// runs out.
    previous_token: Option<(String, Instant)>,
    input: AudioFormat,
    output: AudioFormat,
    turns: Turns,
    history: History,
    timers: SessionTimers,
    ledger: Ledger,
    abuse: Abuse,
    uplink: Uplink,
    /// The reply in flight (or cut and not yet reported): one at a time.
    reply: Option<Reply>,
    /// The turn waiting for the cut reply's outcome.
    waiting: Option<WaitingTurn>,
    /// Words to draft a reply to once the discarded draft before it has reported.
    draft_wanted: Option<(String, Option<Instant>)>,
    /// Token refreshes: one is being verified; the latest of those sent meanwhile waits.
    refresh: Refresh,
    /// When the input being handled happened.
    now: Instant,
    next_checkpoint: Instant,
    lease: Option<Lease>,
    /// Keypad digits pressed since the last `#`.
    keypad: String,
    out: VecDeque<Output>,
    actions: Vec<Action>,
}

impl Session {
    /// A new session created at `now` (attach its first connection with [`Input::Attach`]).
    /// `age` moves the start back for a session continued from elsewhere.
    pub fn new(
        id: String,
        config: Config,
        now: Instant,
        carried: Option<(Carried, Duration)>,
    ) -> Self {
        let ledger = Ledger::new(
            config.prices,
            config.session_budget,
            config.budget_warn_fraction,
        )
        .with_daily_limit(config.daily_budget);
        let lease = config.lease_ttl.map(|ttl| Lease {
            ttl,
            // Claimed just now by the driver.
            next_refresh: now + ttl / 3,
            valid_until: now + ttl,
            in_flight: false,
        });
        let mut session = Session {
            id,
            turns: Turns::new(config.turns.clone(), 0),
            history: History::new(config.history),
            timers: SessionTimers::new(config.timers, now, now + Duration::from_secs(3600)),
            ledger,
            uplink: Uplink::new(config.recogniser_batch),
            abuse: Abuse {
                invalid: 0,
                window_start: now,
                frames: 0,
                flood_windows: 0,
            },
            phase: Phase::Live,
            attached: false,
            user_id: String::new(),
            token: String::new(),
            previous_token: None,
            input: AudioFormat::DEFAULT_INPUT,
            output: AudioFormat::DEFAULT_OUTPUT,
            reply: None,
            waiting: None,
            draft_wanted: None,
            refresh: Refresh::default(),
            now,
            next_checkpoint: now + config.checkpoint_interval,
            lease,
            keypad: String::new(),
            out: VecDeque::new(),
            actions: Vec::new(),
            config,
        };
        if let Some((carried, age)) = carried {
            session.restore(carried, age);
        }
        session
    }

    fn restore(&mut self, c: Carried, age: Duration) {
        self.history = History::restored(
            self.config.history,
            c.history.into_iter().map(|m| Message {
                role: match m.role {
                    CarriedRole::User => Role::User,
                    CarriedRole::Assistant => Role::Assistant,
                },
                text: m.text,
                tool_calls: m.tool_calls,
                tool_results: m.tool_results,
            }),
        );
        self.turns = Turns::new(self.config.turns.clone(), c.last_turn);
        self.ledger.restore(c.ledger);
        // A continued session keeps its age: moving never extends the maximum duration.
        self.timers.started_earlier(age);
    }

    /// What another instance needs to continue this session.
    pub fn carried(&self) -> Carried {
        Carried {
            last_turn: self.turns.last_turn(),
            history: self
                .history
                .messages()
                .map(|m| CarriedMessage {
                    role: match m.role {
                        Role::User => CarriedRole::User,
                        Role::Assistant => CarriedRole::Assistant,
                    },
                    text: m.text.clone(),
                    tool_calls: m.tool_calls.clone(),
                    tool_results: m.tool_results.clone(),
                })
                .collect(),
            ledger: self.ledger.state(),
        }
    }

    /// The session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The conversation as heard: the turns that ended and the replies as far as they were
    /// heard.
    pub fn history(&self) -> impl ExactSizeIterator<Item = &Message> {
        self.history.messages()
    }

    /// The messages for the model's next request: the history and, while a draft is in
    /// flight, its words as the person's last message.
    pub fn prompt(&self) -> Vec<Message> {
        match self.reply.as_ref().filter(|r| r.draft) {
            Some(draft) => {
                let mut history = self.history.clone();
                history.push_user(&draft.user_text);
                history.messages().cloned().collect()
            }
            None => self.history.messages().cloned().collect(),
        }
    }

    /// The cost ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Turns started so far.
    pub fn last_turn(&self) -> u64 {
        self.turns.last_turn()
    }

    /// Whether a connection is attached.
    pub fn is_attached(&self) -> bool {
        self.attached
    }

    /// Whether the session is over.
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The attached connection's resume token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The input audio format in use.
    pub fn input_format(&self) -> AudioFormat {
        self.input
    }

    /// The output audio format in use.
    pub fn output_format(&self) -> AudioFormat {
        self.output
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must run next (`None` once ended).
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Ending waits only for the aborted reply's outcome, which the driver reports at once.
        if self.phase != Phase::Live {
            return None;
        }
        let mut t = self.timers.next_deadline().min(self.next_checkpoint);
        if let Some(held) = self.uplink.deadline() {
            t = t.min(held);
        }
        if let Some(pause) = self.turns.deadline() {
            t = t.min(pause);
        }
        if let Some(lease) = &self.lease {
            t = t.min(lease.valid_until);
            if !lease.in_flight {
                t = t.min(lease.next_refresh);
            }
        }
        if let Some((_, until)) = &self.previous_token {
            t = t.min(*until);
        }
        if let Some(due) = self.reply.as_ref().and_then(|r| r.playout.next_due()) {
            t = t.min(due);
        }
        if let Some(round) = self.reply.as_ref().and_then(|r| r.round.as_ref()) {
            for c in round.calls.iter().filter(|c| c.result.is_none()) {
                if let Some(deadline) = c.deadline {
                    t = t.min(deadline);
                }
            }
        }
        Some(t)
    }

    /// Acts on every deadline that has passed at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.phase != Phase::Live {
            return;
        }
        self.now = now;
        self.play(now);
        self.expire_tools(now);
        if self.uplink.expired(now) {
            self.out.push_back(Output::SendHeld);
        }
        if self.turns.deadline().is_some_and(|d| now >= d) {
            let mut actions = std::mem::take(&mut self.actions);
            self.turns.expire(now, &mut actions);
            self.turn_actions(actions);
        }
        while let Some(action) = self.timers.poll(now) {
            match action {
                TimerAction::Ping => self.out.push_back(Output::Ping),
                TimerAction::HeartbeatTimeout => {
                    self.out
                        .push_back(Output::CloseConnection(Closing::HeartbeatTimeout));
                    self.detach(now);
                }
                TimerAction::WarnMaxDuration { seconds_left } => self.send(Event::Ending {
                    reason: Ending::MaxDuration,
                    seconds_left,
                }),
                TimerAction::End(end) => return self.end(end.into()),
            }
        }
        if self
            .previous_token
            .as_ref()
            .is_some_and(|(_, until)| now >= *until)
        {
            self.retire_previous_token();
        }
        if let Some(lease) = &mut self.lease {
            if now >= lease.valid_until {
                // The store may have given this place away: fail closed.
                return self.end(EndReason::LeaseLost);
            }
            if !lease.in_flight && now >= lease.next_refresh {
                lease.in_flight = true;
                self.out.push_back(Output::RefreshLease);
            }
        }
        if now >= self.next_checkpoint {
            self.next_checkpoint = now + self.config.checkpoint_interval;
            self.out.push_back(Output::Checkpoint);
        }
    }

    /// Feeds one input that happened at `now`.
    pub fn handle(&mut self, input: Input<'_>, now: Instant) {
        self.now = now;
        if let Input::Attach(attaching) = input {
            return self.attach(attaching, now);
        }
        match self.phase {
            Phase::Ended => return,
            // Ending: only the aborted reply's outcome is still awaited.
            Phase::Ending(_) => {
                if let Input::ReplyEnded(outcome) = input {
                    self.reply_ended(outcome, now);
                }
                return;
            }
            Phase::Live => {}
        }
        if self.is_client_frame(&input) {
            if self.attached && self.previous_token.is_some() {
                // The client speaks on the new connection: it has the new token.
                self.retire_previous_token();
            }
            if !self.within_frame_rate(&input, now) {
                return;
            }
        }
        match input {
            Input::Attach(_) => unreachable!("attached above"),
            Input::Detach => self.detach(now),
            Input::Audio(pcm) => self.audio(pcm, now),
            Input::Commit => {
                self.timers.activity(now);
                self.turn(turns::Input::Commit);
            }
            Input::Cancel => {
                self.timers.activity(now);
                self.turn(turns::Input::Cancel);
            }
            Input::Text(text) => {
                self.timers.activity(now);
                self.turn(turns::Input::Text { text });
            }
            Input::Ping(id) => self.send(Event::Pong { id }),
            Input::StartAgain => {
                self.timers.activity(now);
                self.send(Event::problem(
                    ErrorCode::SessionAlreadyStarted,
                    "the session has already started",
                    false,
                ));
            }
            Input::End => self.end(EndReason::ClientEnded),
            Input::Invalid(code, message) => {
                if self.count_invalid() {
                    self.send(Event::problem(code, message, false));
                }
            }
            Input::Pong => self.timers.pong(),
            Input::Refresh(token) => {
                if self.refresh.verifying {
                    self.refresh.next = Some(token);
                } else {
                    self.refresh.verifying = true;
                    self.out.push_back(Output::VerifyToken(token));
                }
            }
            Input::TokenRefreshed(answer) => {
                match answer {
                    Ok(token) if token.user_id == self.user_id => {
                        self.timers.token_refreshed(token.expiry)
                    }
                    Ok(_) => self.send(Event::problem(
                        ErrorCode::Unauthorized,
                        "the new token belongs to another user",
                        false,
                    )),
                    Err(message) => {
                        self.send(Event::problem(ErrorCode::Unauthorized, message, false))
                    }
                }
                match self.refresh.next.take() {
                    Some(token) => self.out.push_back(Output::VerifyToken(token)),
                    None => self.refresh.verifying = false,
                }
            }
            Input::RecognitionDropped { seconds } => self.ledger.remove_audio(seconds),
            Input::Heard(heard) => {
                if matches!(
                    heard,
                    Heard::Final {
                        speech_final: true,
                        ..
                    } | Heard::UtteranceEnd { .. }
                ) {
                    self.uplink.end_heard();
                }
                self.turn(turns::Input::Heard(heard));
            }
            Input::TurnUnjudged { pause } => self.turn(turns::Input::TurnUnjudged { pause }),
            Input::TurnScored { pause, probability } => {
                self.turn(turns::Input::TurnScored { pause, probability })
            }
            Input::RecogniserLost { busy: true, .. } => self.send(Event::problem(
                ErrorCode::EnginesBusy,
                "the speech engine is busy and missed that; please say it again in a moment",
                false,
            )),
            Input::RecogniserLost { failures, .. } => {
                let fatal = failures >= self.config.max_recogniser_failures;
                self.send(Event::problem(
                    ErrorCode::SttFailed,
                    if fatal {
                        "speech recognition is unavailable"
                    } else {
                        "speech recognition connection lost; reconnecting"
                    },
                    fatal,
                ));
                if fatal {
                    self.end(EndReason::ProviderFailed);
                }
            }
            Input::ReplyEnded(outcome) => self.reply_ended(outcome, now),
            Input::Digit(digit) => self.digit(digit, now),
            Input::Played { turn_id, offset } => {
                if let Some(reply) = self.live_reply(turn_id) {
                    reply.playout.confirm(offset);
                }
            }
            Input::ReplyText { turn_id, text } => match self.live_reply(turn_id) {
                Some(reply) if reply.draft => reply.held_text.push(text),
                Some(_) => {
                    self.turns.said(&text, now);
                    self.send(Event::ReplyText { turn_id, text });
                }
                None => {}
            },
            Input::ReplyAudio { turn_id, pcm } => {
                if let Some(reply) = self.live_reply(turn_id) {
                    reply.playout.push(pcm);
                    self.play(now);
                }
            }
            Input::ReplySentence {
                turn_id,
                round,
                text,
            } => {
                if let Some(reply) = self.live_reply(turn_id) {
                    reply.playout.end_sentence(round, text);
                }
            }
            Input::ToolCalls {
                turn_id,
                text,
                calls,
                llm,
            } => self.tool_calls(turn_id, text, calls, &llm, now),
            Input::ToolResult { call_id, result } => {
                self.tool_answered(call_id, result, ToolKind::Client, now)
            }
            Input::ToolFinished { call_id, result } => {
                self.tool_answered(&call_id, result, ToolKind::Server, now)
            }
            Input::Lease { answer, sent_at } => self.lease_answered(answer, sent_at, now),
            Input::OwnershipLost => self.end(EndReason::Moved),
            Input::DailySpent(total) => {
                self.ledger.set_daily_spent(total);
                if self.ledger.check(0) == Verdict::Exhausted {
                    self.end(EndReason::BudgetExhausted);
                }
            }
            Input::Shutdown => self.end(EndReason::Draining),
        }
    }

    fn is_client_frame(&self, input: &Input<'_>) -> bool {
        matches!(
            input,
            Input::Audio(_)
                | Input::Commit
                | Input::Cancel
                | Input::Text(_)
                | Input::Ping(_)
                | Input::StartAgain
                | Input::Invalid(..)
                | Input::End
                | Input::Refresh(_)
                | Input::ToolResult { .. }
                | Input::Digit(_)
                | Input::Played { .. }
        )
    }

    /// Counts a client frame against the per-second cap: frames over it are dropped with a
    /// `rate_limited` error; `max_flood_seconds` seconds in a row over it close with 1008.
    /// An explicit end of session always gets through.
    fn within_frame_rate(&mut self, input: &Input<'_>, now: Instant) -> bool {
        let cap = self.config.max_frames_per_s;
        let a = &mut self.abuse;
        if now.saturating_duration_since(a.window_start) >= Duration::from_secs(1) {
            if a.frames > cap {
                a.flood_windows += 1;
            } else {
                a.flood_windows = 0;
            }
            a.window_start = now;
            a.frames = 0;
        }
        a.frames += 1;
        if a.frames <= cap || matches!(input, Input::End) {
            return true;
        }
        if a.flood_windows >= self.config.max_flood_seconds {
            self.send(Event::problem(
                ErrorCode::RateLimited,
                "too many frames per second",
                true,
            ));
            self.end(EndReason::Policy);
            return false;
        }
        if a.frames == cap + 1 {
            self.send(Event::problem(
                ErrorCode::RateLimited,
                format!("more than {cap} frames per second; extra frames are dropped"),
                false,
            ));
        }
        self.out.push_back(Output::Rejected("rate"));
        false
    }

    /// Counts an invalid frame; false when the session ends for it.
    fn count_invalid(&mut self) -> bool {
        self.abuse.invalid += 1;
        if self.abuse.invalid > self.config.max_invalid_frames {
            self.send(Event::problem(
                ErrorCode::InvalidMessage,
                "too many invalid frames",
                true,
            ));
            self.end(EndReason::Policy);
            return false;
        }
        true
    }

    fn send(&mut self, event: Event) {
        if self.attached {
            self.out.push_back(Output::Event(event));
        }
    }

    fn attach(&mut self, a: Attaching, now: Instant) {
        if !matches!(self.phase, Phase::Live) {
            self.out.push_back(Output::RefuseConnection {
                code: ErrorCode::ResumeFailed,
                message: "the session has ended; start a new one",
                closing: Closing::Ended(EndReason::Disconnected),
            });
            return;
        }
        if a.overtaken {
            self.out.push_back(Output::RefuseConnection {
                code: ErrorCode::ResumeFailed,
                message: "this session was resumed by another connection",
                closing: Closing::ResumeOvertaken,
            });
            return;
        }
        let Attaching {
            resumed,
            user_id,
            token,
            token_expiry,
            input,
            output,
            ..
        } = a;
        if self.attached {
            self.send(Event::problem(
                ErrorCode::Internal,
                "this connection was replaced by a resumed one",
                true,
            ));
            self.out
                .push_back(Output::CloseConnection(Closing::Replaced));
        }
        self.out.push_back(Output::AttachConnection);
        self.user_id = user_id;
        if self.attached {
            // The reply was playing on the replaced connection: cut it (recorded as cut).
            self.abort_reply();
        }
        self.input = input;
        self.output = output;
        self.timers.token_refreshed(token_expiry);
        self.timers.attached(now);
        self.attached = true;
        if let Some((old, _)) = self.previous_token.take() {
            // Two resumes in a row: the older token is useless now.
            self.out.push_back(Output::RetireToken(old));
        }
        let previous = std::mem::replace(&mut self.token, token.clone());
        if !previous.is_empty() {
            self.previous_token = Some((previous, now + self.config.token_handover_grace));
        }
        self.out.push_back(Output::RegisterToken(token.clone()));
        let limits = self.config.limits.clone();
        self.send(Event::Ready {
            session_id: self.id.clone(),
            resume_token: token,
            resumed_turns: resumed.then(|| self.turns.last_turn()),
            limits,
            input_audio: input,
            output_audio: output,
        });
        if resumed {
            self.send(Event::Usage(self.ledger.usage()));
        }
        if self.lease.is_some() {
            self.out.push_back(Output::Publish);
        }
    }

    fn retire_previous_token(&mut self) {
        if let Some((old, _)) = self.previous_token.take() {
            self.out.push_back(Output::RetireToken(old));
        }
    }

    fn detach(&mut self, now: Instant) {
        if !self.attached {
            return;
        }
        self.abort_reply();
        self.attached = false;
        self.timers.detached(now);
        self.close_recogniser();
        if self.lease.is_some() {
            self.out.push_back(Output::Publish);
        }
    }

    /// Closes the recogniser connection (the driver sends held audio first).
    fn close_recogniser(&mut self) {
        self.uplink.released();
        self.out.push_back(Output::CloseRecogniser);
    }

    fn audio(&mut self, pcm: Bytes, now: Instant) {
        let c = &self.config;
        if let Err(e) = validate_chunk(pcm.len(), c.chunk_min_bytes, c.chunk_max_bytes) {
            self.out.push_back(Output::Rejected(match e {
                ChunkError::TooSmall { .. } => "too_small",
                ChunkError::TooLarge { .. } => "too_large",
                ChunkError::OddLength { .. } => "odd_length",
            }));
            if self.count_invalid() {
                self.send(Event::problem(
                    ErrorCode::AudioChunkInvalid,
                    e.to_string(),
                    false,
                ));
            }
            return;
        }
        self.timers.activity(now);
        let seconds = (pcm.len() / 2) as f64 / f64::from(self.input.sample_rate);
        if self.ledger.add_audio(seconds) {
            // Recognition is billed while the person talks: re-check the budget every second.
            self.settle();
            if self.ledger.check(0) == Verdict::Exhausted {
                return self.end(EndReason::BudgetExhausted);
            }
        }
        let hold = self
            .uplink
            .hold(|| rms_dbfs_le(&pcm), Duration::from_secs_f64(seconds), now);
        self.out.push_back(Output::Forward { pcm, hold });
    }

    /// Feeds the turn machine and acts on what it decides.
    fn turn(&mut self, input: turns::Input<'_>) {
        let mut actions = std::mem::take(&mut self.actions);
        self.turns.handle(input, self.now, &mut actions);
        self.turn_actions(actions);
    }

    /// Carries out what turn-taking decided (`actions` is the reusable buffer, handed back).
    fn turn_actions(&mut self, mut actions: Vec<Action>) {
        for action in actions.drain(..) {
            match action {
                Action::Partial(text) => self.send(Event::Hearing { text }),
                Action::Finalize => {
                    // The driver sends held audio before the finalise.
                    self.uplink.released();
                    self.out.push_back(Output::Finalize);
                }
                Action::ScoreTurn { pause } => self.out.push_back(Output::ScoreTurn { pause }),
                Action::Interrupt { turn_id } => {
                    if self.reply.as_ref().is_some_and(|r| r.turn_id == turn_id) {
                        self.abort_reply();
                    }
                }
                Action::Draft {
                    text,
                    end_of_speech,
                } => self.draft(text, end_of_speech),
                Action::DropDraft => {
                    self.draft_wanted = None;
                    self.discard_draft();
                }
                Action::EndOfTurn {
                    turn_id,
                    text,
                    end_of_speech,
                } => self.end_of_turn(turn_id, text, end_of_speech),
            }
        }
        self.actions = actions;
    }

    fn abort_reply(&mut self) {
        let reason = if self.phase == Phase::Live {
            "interrupted"
        } else {
            "ended"
        };
        self.cancel_tools(reason);
        if let Some(reply) = &mut self.reply
            && !reply.aborted
        {
            reply.aborted = true;
            if reply.draft {
                self.out.push_back(Output::DraftSettled { kept: false });
            }
            // What the listener holds and has not played is thrown away on the
            // `Interrupted` that follows.
            reply.playout.stop(self.now);
            let turn_id = reply.turn_id;
            self.out.push_back(Output::AbortReply { turn_id });
        }
    }

    /// A keypad digit: digits gather until `#`, which sends them as a typed turn
    /// (`keypad: 1234`); `*` clears them. Past [`MAX_KEYPAD_DIGITS`] the oldest are dropped.
    fn digit(&mut self, digit: char, now: Instant) {
        if !matches!(digit, '0'..='9' | '*' | '#' | 'A'..='D') {
            return;
        }
        self.timers.activity(now);
        match digit {
            '*' => self.keypad.clear(),
            '#' => {
                if !self.keypad.is_empty() {
                    let text = format!("keypad: {}", std::mem::take(&mut self.keypad));
                    self.turn(turns::Input::Text { text: &text });
                }
            }
            d => {
                if self.keypad.len() >= MAX_KEYPAD_DIGITS {
                    self.keypad.remove(0);
                }
                self.keypad.push(d);
            }
        }
    }

    /// The reply to `turn_id`, if it is in flight and not cut.
    fn live_reply(&mut self, turn_id: u64) -> Option<&mut Reply> {
        self.reply
            .as_mut()
            .filter(|r| r.turn_id == turn_id && !r.aborted)
    }

    /// Whether the driver may push more of the reply's audio ([`Input::ReplyAudio`]): the
    /// playout holds less than its lead. Holding back is what paces synthesis.
    pub fn wants_reply_audio(&self) -> bool {
        self.reply
            .as_ref()
            .is_some_and(|r| !r.aborted && r.playout.wants_audio())
    }

    /// Sends the reply audio due at `now`; completes a reply whose task ended once all of
    /// its audio is out.
    fn play(&mut self, now: Instant) {
        let Some(reply) = self.reply.as_mut().filter(|r| !r.aborted && !r.draft) else {
            return;
        };
        let turn_id = reply.turn_id;
        while let Some(pcm) = reply.playout.poll(now) {
            reply.first_audio.get_or_insert(now);
            self.out.push_back(Output::Audio { turn_id, pcm });
        }
        if reply.playout.is_drained()
            && let Some(outcome) = reply.outcome.take()
        {
            self.reply_ended(outcome, now);
        }
    }

    /// The model asked for tools: refuse what must not run, start the rest.
    fn tool_calls(
        &mut self,
        turn_id: u64,
        text: String,
        calls: Vec<CheckedCall>,
        llm: &LlmBill,
        now: Instant,
    ) {
        // Every request the provider served is paid for, whatever happens next.
        self.ledger.add_reply(llm, 0);
        if let Some(reply) = self.reply.as_mut().filter(|r| r.turn_id == turn_id) {
            reply.tokens = reply.tokens.plus(llm.tokens());
        }
        self.run_tools(turn_id, text, calls, now);
    }

    /// Runs the calls of a paid model request (a draft's wait until it is kept).
    fn run_tools(&mut self, turn_id: u64, text: String, calls: Vec<CheckedCall>, now: Instant) {
        let (max_calls, acknowledgement) = self.config.tools.as_ref().map_or((0, None), |p| {
            (p.max_calls_per_turn, p.acknowledgement.clone())
        });
        let Some(reply) = self
            .reply
            .as_mut()
            .filter(|r| r.turn_id == turn_id && !r.aborted && r.round.is_none())
        else {
            return;
        };
        if reply.draft {
            // Tools act on the world: not for words that may not be the turn.
            reply.parked = Some((text, calls));
            return;
        }
        reply.rounds += 1;
        let mut round = ToolRound {
            text,
            started: now,
            calls: Vec::with_capacity(calls.len()),
        };
        let mut refused = Vec::new();
        let mut seen = std::collections::HashSet::with_capacity(calls.len());
        for (i, CheckedCall { mut call, verdict }) in calls.into_iter().enumerate() {
            // Results are matched to calls by id: a model that sends none, a repeated one or an
            // oversized one gets ids of ours (the history carries them back to it).
            if call.id.is_empty() || call.id.len() > MAX_CALL_ID || !seen.insert(call.id.clone()) {
                call.id = format!("call_{turn_id}_{}_{i}", reply.rounds);
                seen.insert(call.id.clone());
            }
            let mut pending = PendingCall {
                call,
                kind: None,
                deadline: None,
                result: None,
            };
            let id = &pending.call.id;
            if reply.calls_made >= max_calls {
                pending.result = Some(ToolResult::error(
                    id,
                    "not run: the limit of tool calls for this turn is reached; answer with what you have",
                ));
                refused.push((round.calls.len(), ToolOutcome::OverLimit));
            } else {
                reply.calls_made += 1;
                match verdict {
                    Err(reason) => {
                        pending.result = Some(ToolResult::error(id, format!("not run: {reason}")));
                        refused.push((round.calls.len(), ToolOutcome::Invalid));
                    }
                    Ok((kind, timeout)) => {
                        pending.kind = Some(kind);
                        pending.deadline = Some(now + timeout);
                        self.out.push_back(Output::CallTool {
                            turn_id,
                            call: pending.call.clone(),
                            kind,
                            timeout,
                        });
                    }
                }
            }
            round.calls.push(pending);
        }
        let waiting = round.calls.iter().any(|c| c.result.is_none());
        if waiting
            && round.text.trim().is_empty()
            && !reply.acknowledged
            && let Some(text) = acknowledgement
        {
            reply.acknowledged = true;
            self.out.push_back(Output::Acknowledge { turn_id, text });
        }
        reply.round = Some(round);
        for (index, outcome) in refused {
            self.log_tool(index, outcome, now);
        }
        self.continue_when_answered(now);
    }

    /// A tool answered.
    fn tool_answered(
        &mut self,
        call_id: &str,
        result: Result<String, String>,
        kind: ToolKind,
        now: Instant,
    ) {
        let max_bytes = self.config.tools.as_ref().map_or(0, |p| p.max_result_bytes);
        let index = self
            .reply
            .as_ref()
            .and_then(|r| r.round.as_ref())
            .and_then(|round| {
                round.calls.iter().position(|c| {
                    c.call.id == call_id && c.result.is_none() && c.kind == Some(kind)
                })
            });
        let Some(index) = index else {
            // A late or unknown answer: a server tool's is dropped silently (it was
            // cancelled); a client's is a protocol error.
            if kind == ToolKind::Client && self.count_invalid() {
                self.send(Event::problem(
                    ErrorCode::InvalidMessage,
                    "no tool call with this call_id is waiting for a result",
                    false,
                ));
            }
            return;
        };
        let (result, outcome) = match result {
            Ok(json) if json.len() > max_bytes => (
                ToolResult::error(
                    call_id,
                    format!("the tool's result is larger than {max_bytes} bytes"),
                ),
                ToolOutcome::Failed,
            ),
            Ok(json) => (
                ToolResult {
                    call_id: call_id.to_owned(),
                    content: json,
                    is_error: false,
                },
                ToolOutcome::Ok,
            ),
            Err(message) => (ToolResult::error(call_id, message), ToolOutcome::Failed),
        };
        if let Some(call) = self.pending_mut(index) {
            call.result = Some(result);
        }
        self.log_tool(index, outcome, now);
        self.continue_when_answered(now);
    }

    fn pending_mut(&mut self, index: usize) -> Option<&mut PendingCall> {
        self.reply
            .as_mut()
            .and_then(|r| r.round.as_mut())
            .and_then(|round| round.calls.get_mut(index))
    }

    /// Calls past their time limit are answered with an error.
    fn expire_tools(&mut self, now: Instant) {
        let Some(round) = self.reply.as_mut().and_then(|r| r.round.as_mut()) else {
            return;
        };
        let mut expired = Vec::new();
        for (index, c) in round.calls.iter_mut().enumerate() {
            if c.result.is_none()
                && let (Some(deadline), Some(kind)) = (c.deadline, c.kind)
                && now >= deadline
            {
                let waited = deadline.saturating_duration_since(round.started);
                c.result = Some(ToolResult::error(
                    &c.call.id,
                    format!("the tool did not answer within {} ms", waited.as_millis()),
                ));
                self.out.push_back(Output::CancelTool {
                    call_id: c.call.id.clone(),
                    kind,
                    reason: "timeout",
                });
                expired.push(index);
            }
        }
        if expired.is_empty() {
            return;
        }
        for index in expired {
            self.log_tool(index, ToolOutcome::TimedOut, now);
        }
        self.continue_when_answered(now);
    }

    /// The turn is cut or the session ends while tools run: stop waiting, answer every call
    /// with the reason (the history keeps each call next to its result).
    fn cancel_tools(&mut self, reason: &'static str) {
        let now = self.now;
        let Some(round) = self.reply.as_mut().and_then(|r| r.round.as_mut()) else {
            return;
        };
        let mut cancelled = Vec::new();
        for (index, c) in round.calls.iter_mut().enumerate() {
            if c.result.is_none() {
                c.result = Some(ToolResult::error(
                    &c.call.id,
                    format!("cancelled: the turn was {reason}"),
                ));
                if let Some(kind) = c.kind {
                    self.out.push_back(Output::CancelTool {
                        call_id: c.call.id.clone(),
                        kind,
                        reason,
                    });
                }
                cancelled.push(index);
            }
        }
        for index in cancelled {
            self.log_tool(index, ToolOutcome::Cancelled, now);
        }
        self.close_round(now);
    }

    fn log_tool(&mut self, index: usize, outcome: ToolOutcome, now: Instant) {
        let record_content = self.config.tools.as_ref().is_some_and(|p| p.record_content);
        let Some(reply) = &self.reply else {
            return;
        };
        let Some(round) = &reply.round else {
            return;
        };
        let Some(c) = round.calls.get(index) else {
            return;
        };
        self.out.push_back(Output::ToolLog(ToolLog {
            turn_id: reply.turn_id,
            call_id: c.call.id.clone(),
            name: c.call.name.clone(),
            kind: c.kind,
            arguments_bytes: c.call.arguments.len(),
            started: round.started,
            duration: now.saturating_duration_since(round.started),
            outcome,
            arguments: record_content.then(|| c.call.arguments.clone()),
            result: record_content
                .then(|| c.result.as_ref().map(|r| r.content.clone()))
                .flatten(),
        }));
    }

    /// Once every call of the round is answered: the round enters the history and, budget
    /// permitting, the model is asked again.
    fn continue_when_answered(&mut self, now: Instant) {
        let answered = self
            .reply
            .as_ref()
            .and_then(|r| r.round.as_ref())
            .is_some_and(|round| round.calls.iter().all(|c| c.result.is_some()));
        if !answered {
            return;
        }
        let Some((turn_id, calls_made)) = self.close_round(now) else {
            return;
        };
        // The next request carries the results: stop before it would exceed the budget.
        let prompt_chars = self.config.system_prompt_chars + self.history.chars();
        let estimate = self
            .ledger
            .reply_estimate(prompt_chars, u64::from(self.config.llm_max_tokens));
        if self.budget_verdict(estimate) == Verdict::Exhausted {
            return self.end(EndReason::BudgetExhausted);
        }
        let max_calls = self
            .config
            .tools
            .as_ref()
            .map_or(0, |p| p.max_calls_per_turn);
        self.out.push_back(Output::ContinueReply {
            turn_id,
            tools_allowed: calls_made < max_calls,
        });
    }

    /// Moves the round (every call answered) into the history.
    fn close_round(&mut self, now: Instant) -> Option<(u64, u32)> {
        let reply = self.reply.as_mut()?;
        let round = reply.round.take()?;
        reply.tool_time += now.saturating_duration_since(round.started);
        let text = round.text.trim();
        if !text.is_empty() {
            if !reply.said.is_empty() {
                reply.said.push(' ');
            }
            reply.said.push_str(text);
        }
        let (calls, results) = round
            .calls
            .into_iter()
            .map(|c| {
                let result = c
                    .result
                    .unwrap_or_else(|| ToolResult::error(&c.call.id, "not answered"));
                (c.call, result)
            })
            .unzip();
        let ids = (reply.turn_id, reply.calls_made);
        self.history.push_tool_round(&round.text, calls, results);
        Some(ids)
    }

    /// The person's turn is complete. Architecture invariant: one reply at a time — a turn
    /// that ends while a reply is in flight cuts it and waits for its outcome, so every
    /// request started is billed and the history keeps the order things were said in.
    fn end_of_turn(&mut self, turn_id: u64, text: String, end_of_speech: Option<Instant>) {
        self.draft_wanted = None;
        self.send(Event::Heard {
            turn_id,
            text: text.clone(),
        });
        if self
            .reply
            .as_ref()
            .is_some_and(|r| r.draft && !r.aborted && r.turn_id == turn_id && r.user_text == text)
        {
            return self.keep_draft(end_of_speech);
        }
        if self.reply.is_none() {
            return self.start_reply(turn_id, text, end_of_speech);
        }
        // A reply in flight, or a draft of other words: cut (discarded).
        self.abort_reply();
        let waiting = WaitingTurn {
            turn_id,
            text,
            end_of_speech,
            heard: self.now,
        };
        if let Some(superseded) = self.waiting.replace(waiting) {
            // Said or typed, then overtaken before its reply could start.
            self.drop_waiting(superseded, "interrupted");
        }
    }

    fn start_reply(&mut self, turn_id: u64, text: String, end_of_speech: Option<Instant>) {
        self.history.push_user(&text);
        // Stop before starting work that would exceed the budget.
        if self.budget_verdict(self.reply_estimate(0)) == Verdict::Exhausted {
            // Heard but not answered: kept in the record.
            self.unanswered(turn_id, text);
            return self.end(EndReason::BudgetExhausted);
        }
        if !self.attached {
            return self.unanswered(turn_id, text);
        }
        self.send(Event::ReplyStarted { turn_id });
        self.begin_reply(turn_id, text, end_of_speech, false);
    }

    /// The most a reply to the history, with `extra_chars` more of the person's words, can
    /// cost.
    fn reply_estimate(&self, extra_chars: usize) -> Micros {
        let prompt_chars = self.config.system_prompt_chars
            + extra_chars
            + self.history.messages().map(|m| m.text.len()).sum::<usize>();
        self.ledger
            .reply_estimate(prompt_chars, u64::from(self.config.llm_max_tokens))
    }

    fn begin_reply(
        &mut self,
        turn_id: u64,
        user_text: String,
        end_of_speech: Option<Instant>,
        draft: bool,
    ) {
        self.reply = Some(Reply {
            turn_id,
            started: self.now,
            end_of_speech,
            first_audio: None,
            playout: Playout::new(self.output.sample_rate, self.config.playout_lead),
            rounds: 0,
            outcome: None,
            user_text,
            aborted: false,
            calls_made: 0,
            said: String::new(),
            tool_time: Duration::ZERO,
            tokens: ReportedTokens::default(),
            tts_chars: 0,
            acknowledged: false,
            round: None,
            draft,
            held_text: Vec::new(),
            parked: None,
            queued: Duration::ZERO,
        });
        self.out.push_back(Output::StartReply {
            turn_id,
            end_of_speech,
        });
    }

    /// The turn-taker offers the words so far as a draft: answer them now if nothing else is
    /// in flight (a reply being cut is answered first; a draft of other words is discarded).
    fn draft(&mut self, text: String, end_of_speech: Option<Instant>) {
        match &self.reply {
            // (A turn waits only behind a reply in flight.)
            None => self.start_draft(text, end_of_speech),
            Some(r) if r.draft && !r.aborted && r.user_text == text => {}
            Some(r) if r.draft || (r.aborted && self.waiting.is_none()) => {
                self.discard_draft();
                self.draft_wanted = Some((text, end_of_speech));
            }
            _ => {}
        }
    }

    /// Starts a draft reply to the next turn, within the budget like any other reply.
    fn start_draft(&mut self, text: String, end_of_speech: Option<Instant>) {
        if !self.attached
            || self.phase != Phase::Live
            || self.budget_verdict(self.reply_estimate(text.len() + 1)) == Verdict::Exhausted
        {
            return;
        }
        let turn_id = self.turns.last_turn() + 1;
        self.begin_reply(turn_id, text, end_of_speech, true);
    }

    /// Cuts the draft in flight, if there is one: its work is billed, none of it is heard.
    fn discard_draft(&mut self) {
        if self.reply.as_ref().is_some_and(|r| r.draft) {
            self.abort_reply();
        }
    }

    /// The turn ended with the draft's words: it becomes the turn's reply, and what it held
    /// back goes out now.
    fn keep_draft(&mut self, end_of_speech: Option<Instant>) {
        let Some(reply) = self.reply.as_mut() else {
            return;
        };
        reply.draft = false;
        reply.end_of_speech = end_of_speech;
        let turn_id = reply.turn_id;
        let held = std::mem::take(&mut reply.held_text);
        let parked = reply.parked.take();
        self.history.push_user(&reply.user_text);
        self.out.push_back(Output::DraftSettled { kept: true });
        self.send(Event::ReplyStarted { turn_id });
        for text in held {
            self.turns.said(&text, self.now);
            self.send(Event::ReplyText { turn_id, text });
        }
        if let Some((text, calls)) = parked {
            self.run_tools(turn_id, text, calls, self.now);
        }
        self.play(self.now);
    }

    /// What follows a reply that has reported: the turn that waited for it, or a draft.
    fn next_reply(&mut self) {
        if let Some(next) = self.waiting.take() {
            self.start_reply(next.turn_id, next.text, next.end_of_speech);
            if let Some(reply) = self.reply.as_mut().filter(|r| r.turn_id == next.turn_id) {
                reply.queued = self.now.saturating_duration_since(next.heard);
            }
        } else if let Some((text, end_of_speech)) = self.draft_wanted.take() {
            self.start_draft(text, end_of_speech);
        }
    }

    fn unanswered(&mut self, turn_id: u64, text: String) {
        let mut ignored = Vec::new();
        self.turns.handle(
            turns::Input::ResponseFinished { turn_id },
            self.now,
            &mut ignored,
        );
        self.log_unanswered(turn_id, text, "refused");
    }

    /// A turn that waited for the reply before it and will not get its own: heard (in the
    /// history, in the order said), recorded as not answered.
    fn drop_waiting(&mut self, w: WaitingTurn, outcome: &'static str) {
        self.history.push_user(&w.text);
        self.log_unanswered(w.turn_id, w.text, outcome);
    }

    fn log_unanswered(&mut self, turn_id: u64, user_text: String, outcome: &'static str) {
        self.out.push_back(Output::Turn(TurnLog {
            turn_id,
            user_text,
            assistant_text: String::new(),
            interrupted: true,
            latency: Latency::default(),
            outcome,
            end_of_speech: None,
            started: self.now,
            ended: self.now,
            tokens: ReportedTokens::default(),
            tts_chars: 0,
            first_audio: None,
            audio_heard: Duration::ZERO,
            queued: Duration::ZERO,
        }));
    }

    /// Settles the ledger, then checks the budgets with `next` on top; sends the warning.
    fn budget_verdict(&mut self, next: Micros) -> Verdict {
        self.settle();
        let verdict = self.ledger.check(next);
        if let Verdict::Warn { spent, limit } = verdict {
            self.send(Event::BudgetWarning {
                spent_usd: crate::cost::to_usd(spent),
                budget_usd: crate::cost::to_usd(limit),
            });
        }
        verdict
    }

    fn settle(&mut self) {
        let delta = self.ledger.settle();
        if !delta.is_zero() && self.writes_allowed() {
            self.out.push_back(Output::Spend(delta));
        }
    }

    /// A stale owner writes nothing more for the session.
    fn writes_allowed(&self) -> bool {
        self.phase != Phase::Ending(EndReason::Moved)
    }

    fn reply_ended(&mut self, o: ReplyOutcome, now: Instant) {
        let Some(reply) = self.reply.as_mut().filter(|r| r.turn_id == o.turn_id) else {
            return;
        };
        if !reply.aborted && (reply.draft || !reply.playout.is_drained()) {
            // Its work is done and paid for now; its audio is still going out, and the turn
            // ends when the last piece has (see `play`) — for a draft, once it is kept.
            self.ledger.add_reply(&o.llm, o.tts_chars);
            reply.tokens = reply.tokens.plus(o.llm.tokens());
            reply.tts_chars += o.tts_chars;
            reply.outcome = Some(ReplyOutcome {
                llm: LlmBill::default(),
                tts_chars: 0,
                ..o
            });
            return;
        }
        if reply.draft {
            // Discarded: paid for, heard by no one.
            self.ledger.add_reply(&o.llm, o.tts_chars);
            self.reply = None;
            self.settle();
            return match self.phase {
                Phase::Ending(reason) => self.finish(reason),
                Phase::Ended => {}
                Phase::Live => self.next_reply(),
            };
        }
        // Cut after its work was done: the report held is the one that counts (the driver's
        // answer to the abort has nothing more).
        let o = reply.outcome.take().unwrap_or(o);
        // Ended on its own while tools ran (a provider failed, say).
        self.cancel_tools("ended");
        let Some(reply) = self.reply.take() else {
            return;
        };
        let (turn_id, aborted) = (reply.turn_id, reply.aborted);
        // A reply that ended on its own was sent whole and plays whole; a cut one was heard
        // as far as the playout had played it.
        let spoken = reply.playout.heard(Some(reply.rounds), now, !aborted);
        let mut ignored = Vec::new();
        self.turns.handle(
            turns::Input::ResponseFinished { turn_id },
            self.now,
            &mut ignored,
        );
        let outcome = if aborted {
            self.send(Event::Interrupted { turn_id });
            "interrupted"
        } else {
            match o.failure {
                Some(ReplyFailure::Provider(code)) => {
                    self.send(Event::problem(code, failure_message(code), false));
                    "failed"
                }
                None => "completed",
            }
        };
        let interrupted = aborted || o.failure.is_some();
        self.ledger.add_reply(&o.llm, o.tts_chars);
        self.history.push_assistant(&spoken);
        let mut latency = o.latency;
        latency.to_first_audio = reply
            .first_audio
            .map(|at| at.saturating_duration_since(reply.end_of_speech.unwrap_or(reply.started)));
        if reply.calls_made > 0 {
            latency.tools = Some(reply.tool_time);
        }
        let mut assistant_text = reply.said;
        if !spoken.is_empty() {
            if !assistant_text.is_empty() {
                assistant_text.push(' ');
            }
            assistant_text.push_str(&spoken);
        }
        self.out.push_back(Output::Turn(TurnLog {
            turn_id,
            user_text: reply.user_text,
            assistant_text,
            interrupted,
            latency,
            outcome,
            end_of_speech: reply.end_of_speech,
            started: reply.started,
            ended: now,
            tokens: reply.tokens.plus(o.llm.tokens()),
            tts_chars: reply.tts_chars + o.tts_chars,
            first_audio: reply.first_audio,
            audio_heard: reply.playout.heard_for(now, !aborted),
            queued: reply.queued,
        }));
        if self.phase == Phase::Live && self.lease.is_some() && self.attached {
            // Replicated after every turn, so the session survives its instance; queued
            // before the client hears the turn is done.
            self.out.push_back(Output::Publish);
        }
        self.send(Event::ReplyDone {
            turn_id,
            interrupted,
            latency,
        });
        let verdict = self.budget_verdict(0);
        self.send(Event::Usage(self.ledger.usage()));
        match self.phase {
            Phase::Ending(reason) => return self.finish(reason),
            Phase::Ended => return,
            Phase::Live => {}
        }
        if verdict == Verdict::Exhausted {
            return self.end(EndReason::BudgetExhausted);
        }
        self.next_reply();
    }

    fn lease_answered(&mut self, answer: LeaseAnswer, sent_at: Instant, now: Instant) {
        let Some(lease) = &mut self.lease else {
            return;
        };
        lease.in_flight = false;
        match answer {
            LeaseAnswer::Extended | LeaseAnswer::Reasserted => {
                lease.valid_until = lease.valid_until.max(sent_at + lease.ttl);
                lease.next_refresh = sent_at + lease.ttl / 3;
                if answer == LeaseAnswer::Reasserted {
                    // Losing the store's data is not losing the session: make it resumable
                    // again.
                    self.out.push_back(Output::Publish);
                    if !self.token.is_empty() {
                        self.out
                            .push_back(Output::RegisterToken(self.token.clone()));
                    }
                    if let Some((old, _)) = &self.previous_token {
                        self.out.push_back(Output::RegisterToken(old.clone()));
                    }
                }
            }
            LeaseAnswer::Unreachable => {
                // Try again soon; the session ends if the lease runs out meanwhile.
                lease.next_refresh = now + (lease.ttl / 6).max(Duration::from_millis(100));
            }
            LeaseAnswer::Stale => self.end(EndReason::Moved),
            LeaseAnswer::NoPlace => self.end(EndReason::LeaseLost),
        }
    }

    /// Decides that the session ends; a reply in flight is aborted first (and recorded as
    /// cut) unless another owner took over.
    fn end(&mut self, reason: EndReason) {
        if self.phase != Phase::Live {
            return;
        }
        self.phase = Phase::Ending(reason);
        if self.reply.is_some() {
            self.abort_reply();
        } else {
            self.finish(reason);
        }
    }

    fn finish(&mut self, reason: EndReason) {
        self.phase = Phase::Ended;
        if let Some(w) = self.waiting.take() {
            self.drop_waiting(w, "refused");
        }
        let handover = reason == EndReason::Draining && self.lease.is_some();
        // A handed-over session stays resumable by its tokens on another instance.
        if !handover {
            if let Some((old, _)) = self.previous_token.take() {
                self.out.push_back(Output::RetireToken(old));
            }
            if !self.token.is_empty() {
                self.out
                    .push_back(Output::RetireToken(std::mem::take(&mut self.token)));
            }
        }
        self.close_recogniser();
        let record = reason != EndReason::Moved;
        if record {
            let delta = self.ledger.settle();
            if !delta.is_zero() {
                self.out.push_back(Output::Spend(delta));
            }
        }
        match reason {
            EndReason::Draining => self.send(Event::Ending {
                reason: Ending::Draining,
                seconds_left: 0,
            }),
            EndReason::BudgetExhausted => {
                self.send(Event::Ending {
                    reason: Ending::Budget,
                    seconds_left: 0,
                });
                self.send(Event::Usage(self.ledger.usage()));
            }
            _ => {}
        }
        if let Some((code, message)) = reason.error() {
            self.send(Event::problem(code, message, true));
        }
        self.out.push_back(Output::Finish(Finish {
            reason,
            record,
            handover,
        }));
    }
}

fn failure_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::LlmFailed => "the language model failed; please try again",
        ErrorCode::TtsFailed => "speech synthesis failed; the reply was cut short",
        ErrorCode::EnginesBusy => "the local engines are busy; please try again in a moment",
        _ => "the reply failed",
    }
}

#[cfg(test)]
mod tests;
