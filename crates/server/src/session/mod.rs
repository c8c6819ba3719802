//! One client connection: the `session.start` handshake, then the session loop.
//!
//! # Layout
//! - `mod.rs`: the loop — client frames, recogniser events, reply completion, shutdown —
//!   feeding the sans-IO [`Turns`] machine and carrying out its actions.
//! - `outbound.rs`: the single writer task and its bounded queue.
//! - `response.rs`: one assistant reply (LLM → splitter → TTS → paced audio).
//! - `stt_link.rs`: the recogniser connection with buffering and reconnection.

pub mod outbound;
pub mod response;
pub mod stt_link;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use atlas_core::audio::{
    AudioClock, ChunkError, pcm_from_le_bytes, pcm_to_le_bytes, validate_chunk,
};
use atlas_core::cost::{Budget, BudgetState, Consumption, Cost, from_usd, to_usd};
use atlas_core::history::{History, HistoryLimits, Role};
use atlas_core::latency::Latency;
use atlas_core::resample::StreamResampler;
use atlas_core::splitter::SplitterConfig;
use atlas_core::timers::{SessionTimers, TimerAction, TimerConfig, TimerEnd};
use atlas_core::turns::{Action, Input, TurnConfig, Turns};
use atlas_protocol::{
    AudioFormat, ClientMessage, EndingReason, ErrorCode, LatencyBreakdown, Limits, ServerEvent,
    SessionStart, Usage, close, parse_client_message,
};
use atlas_providers::llm::{ChatMessage, ChatRole, LlmRequest};
use atlas_providers::stt::{SttEvent, SttOptions};

use crate::app::AppState;
use crate::auth::{Identity, seconds_until};
use crate::metrics;
use crate::registry::{ResumeEntry, SessionPermit};
use outbound::{OutboundTx, WriterExit, run_writer};
use response::{Progress, ResponseCtx, lock};
use stt_link::{LinkEvent, SttLink};

/// Frames queued for one client.
const OUTBOUND_CAPACITY: usize = 256;
/// A single write slower than this marks a slow consumer.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for the first `session.start`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Invalid frames tolerated before the connection is closed with 1008.
const MAX_INVALID_FRAMES: u32 = 50;
/// Seconds in a row over the frame-rate cap before the connection is closed with 1008.
const MAX_FLOOD_SECONDS: u32 = 5;
/// Consecutive recogniser failures before the session gives up.
const MAX_STT_FAILURES: u32 = 4;

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
    /// No client activity for the idle timeout.
    IdleTimeout,
    /// Maximum duration reached.
    MaxDuration,
    /// The session or daily budget is spent.
    BudgetExhausted,
    /// The access token expired without a refresh.
    TokenExpired,
    /// Dropped and not resumed within the window.
    ResumeExpired,
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
        }
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

/// A client connection that completed the `session.start` handshake.
pub struct Connection {
    /// Frames from the client.
    pub stream: SplitStream<WebSocket>,
    /// Queue to the client.
    pub outbound: OutboundTx,
    /// The writer task draining that queue.
    pub writer: JoinHandle<WriterExit>,
    /// The client's `session.start`.
    pub start: SessionStart,
    /// Who connected.
    pub identity: Identity,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("user_id", &self.identity.user_id)
            .finish_non_exhaustive()
    }
}

/// What an upgraded connection is for.
pub enum Upgrade {
    /// A new session, already admitted, with its id.
    New(SessionPermit, String),
    /// Resuming the session behind this entry (on this instance).
    Resume(ResumeEntry),
    /// Resuming a session that was dropped on another instance.
    Adopt(SessionPermit, Box<crate::cluster::ResumeState>),
}

/// Serves one upgraded connection: the handshake, then either a new session (which runs
/// here until it ends) or a hand-over to the session being resumed.
pub async fn handle_upgrade(
    socket: WebSocket,
    state: AppState,
    identity: Identity,
    upgrade: Upgrade,
) {
    let (sink, mut stream) = socket.split();
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let writer = tokio::spawn(run_writer(sink, rx, SEND_TIMEOUT));
    let outbound = OutboundTx::new(tx);
    let start = match await_start(&state, &mut stream, &outbound).await {
        Ok(start) => start,
        Err(reason) => {
            match reason {
                EndReason::StartTimeout | EndReason::Policy => {
                    outbound
                        .close(close::POLICY, "no valid session.start")
                        .await
                }
                EndReason::ClientEnded => outbound.close(close::NORMAL, "session ended").await,
                _ => {}
            }
            drop(outbound);
            let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
            if let Upgrade::New(_, session_id) = &upgrade {
                metrics::session_ended(reason.label());
                if let Some(cluster) = &state.cluster {
                    let _ = cluster.release(&identity.user_id, session_id).await;
                }
            }
            return;
        }
    };
    let conn = Connection {
        stream,
        outbound,
        writer,
        start,
        identity,
    };
    match upgrade {
        Upgrade::New(permit, session_id) => {
            run_session(state, conn, permit, session_id, None).await
        }
        Upgrade::Adopt(permit, moved) => {
            let session_id = moved.session_id.clone();
            run_session(state, conn, permit, session_id, Some(*moved)).await
        }
        Upgrade::Resume(entry) => {
            if let Err(mpsc::error::SendError(conn)) = entry.attach.send(conn).await {
                let _ = conn.outbound.event(ServerEvent::error(
                    ErrorCode::ResumeFailed,
                    "the session has ended; start a new one",
                    true,
                ));
                conn.outbound.close(close::NORMAL, "session ended").await;
            }
        }
    }
}

async fn run_session(
    state: AppState,
    first: Connection,
    permit: SessionPermit,
    session_id: String,
    moved: Option<crate::cluster::ResumeState>,
) {
    let span = tracing::info_span!("session", session_id = %session_id);
    async move {
        let mut session = Session::new(&state, session_id, first, permit, moved);
        info!(user_id = %session.identity.user_id, "session started");
        let reason = session.run().await;
        session.finish(reason).await;
        info!(
            reason = reason.label(),
            turns = session.turns.last_turn(),
            "session ended"
        );
    }
    .instrument(span)
    .await
}

/// Waits for a valid `session.start`, answering anything else with a non-fatal error.
async fn await_start<S>(
    state: &AppState,
    stream: &mut S,
    outbound: &OutboundTx,
) -> Result<SessionStart, EndReason>
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let deadline = Instant::now() + START_TIMEOUT;
    let mut invalid = 0u32;
    loop {
        let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                let _ = outbound.event(ServerEvent::error(
                    ErrorCode::SessionNotStarted,
                    "no session.start within 10 seconds",
                    true,
                ));
                return Err(EndReason::StartTimeout);
            }
            Ok(None) | Ok(Some(Err(_))) => return Err(EndReason::Disconnected),
            Ok(Some(Ok(m))) => m,
        };
        let error = match msg {
            Message::Text(text) => match parse_client_message(text.as_str()) {
                Ok(ClientMessage::SessionStart(start)) => match validate_start(state, &start) {
                    Ok(()) => return Ok(start),
                    Err(e) => e,
                },
                Ok(ClientMessage::Ping { id }) => {
                    let _ = outbound.event(ServerEvent::Pong { id });
                    continue;
                }
                Ok(ClientMessage::SessionEnd) => return Err(EndReason::ClientEnded),
                Ok(other) => ServerEvent::error(
                    ErrorCode::SessionNotStarted,
                    format!("{} before session.start", other.type_name()),
                    false,
                ),
                Err(e) => ServerEvent::error(e.code(), e.to_string(), false),
            },
            Message::Binary(_) => ServerEvent::error(
                ErrorCode::SessionNotStarted,
                "audio before session.start is discarded",
                false,
            ),
            Message::Close(_) => return Err(EndReason::Disconnected),
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        invalid += 1;
        if invalid > MAX_INVALID_FRAMES {
            return Err(EndReason::Policy);
        }
        if outbound.event(error).is_err() {
            return Err(EndReason::Disconnected);
        }
    }
}

fn validate_start(state: &AppState, start: &SessionStart) -> Result<(), ServerEvent> {
    let unsupported = |what: &str, f: &AudioFormat| {
        ServerEvent::error(
            ErrorCode::UnsupportedAudioFormat,
            format!(
                "{what} sample rate {} is not supported (use 8000, 16000, 24000 or 48000)",
                f.sample_rate
            ),
            false,
        )
    };
    if !AudioFormat::SUPPORTED_RATES.contains(&start.input_audio.sample_rate) {
        return Err(unsupported("input", &start.input_audio));
    }
    if !AudioFormat::SUPPORTED_RATES.contains(&start.output_audio.sample_rate) {
        return Err(unsupported("output", &start.output_audio));
    }
    let invalid = |m: String| Err(ServerEvent::error(ErrorCode::InvalidMessage, m, false));
    if let Some(voice) = &start.voice
        && !state.engines.tts.has_voice(voice)
    {
        return invalid(format!("unknown voice {:?}", truncate(voice, 40)));
    }
    if let Some(lang) = &start.language
        && (lang.is_empty()
            || lang.len() > 35
            || !lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return invalid("language must be a BCP-47 tag such as en-US".into());
    }
    if start
        .conversation_id
        .as_ref()
        .is_some_and(|c| c.len() > 128)
    {
        return invalid("conversation_id is longer than 128 characters".into());
    }
    if let Some(client) = &start.client
        && (client.name.as_ref().is_some_and(|n| n.len() > 64)
            || client.version.as_ref().is_some_and(|v| v.len() > 64))
    {
        return invalid("client name and version must be at most 64 characters".into());
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A reply in flight.
struct ActiveResponse {
    turn_id: u64,
    handle: JoinHandle<()>,
    progress: Arc<Mutex<Progress>>,
}

/// The attached connection.
struct Link {
    stream: SplitStream<WebSocket>,
    outbound: OutboundTx,
    writer: JoinHandle<WriterExit>,
}

enum LinkInput {
    Frame(Option<Result<Message, axum::Error>>),
    WriterGone,
}

/// The next thing from the attached connection; pending forever while detached.
async fn link_next(link: &mut Option<Link>) -> LinkInput {
    match link {
        None => std::future::pending().await,
        Some(l) => tokio::select! {
            m = l.stream.next() => LinkInput::Frame(m),
            _ = l.outbound.closed() => LinkInput::WriterGone,
        },
    }
}

/// The state of one session. It outlives connections: when the client drops, the session
/// detaches and waits for a resume.
struct Session {
    state: AppState,
    identity: Identity,
    id: String,
    permit: SessionPermit,
    /// Current resume token (rotated on every resume).
    resume_token: String,
    /// New connections resuming this session.
    attach_rx: mpsc::Receiver<Connection>,
    attach_tx: mpsc::Sender<Connection>,
    link: Option<Link>,
    /// The client stopped reading; detach after the current step.
    link_broken: bool,
    input: AudioFormat,
    output: AudioFormat,
    voice: Option<String>,
    turns: Turns,
    history: History,
    stt: SttLink,
    /// Maps input audio positions to capture times (at the client's input rate).
    clock: AudioClock,
    /// Converts client audio to the recogniser's rate when they differ.
    input_resampler: Option<StreamResampler>,
    response: Option<ActiveResponse>,
    usage: Usage,
    /// What the session used, for costing.
    consumption: Consumption,
    /// Its cost so far.
    cost: Cost,
    /// Spend already added to the user's daily total.
    reported_spend: u64,
    budget: Budget,
    /// Set when a check decides the session must end (acted on after the current step).
    pending_end: Option<EndReason>,
    /// Wall-clock start, for the record.
    started_wall: chrono::DateTime<chrono::Utc>,
    /// Completed turns, for the record.
    turn_records: Vec<atlas_store::TurnRecord>,
    /// What the user said in the turn being answered.
    current_user_text: String,
    conversation_id: Option<String>,
    client: Option<atlas_protocol::ClientInfo>,
    /// Next checkpoint of the record.
    next_checkpoint: Instant,
    /// Spend per stage already counted in the metrics.
    metered: [u64; 3],
    /// Another instance took the session over (scale-out): end without a record.
    moved: bool,
    /// The publication of this session's resume state (scale-out), which a later cleanup of
    /// the same token must wait for.
    resume_publish: Option<JoinHandle<()>>,
    timers: SessionTimers,
    invalid_frames: u32,
    /// Frame-rate accounting: the current one-second window, frames in it, and how many
    /// windows in a row went over the cap.
    rate_window: Instant,
    rate_frames: u32,
    flood_windows: u32,
    /// Reusable buffers for input resampling.
    scratch_in: Vec<i16>,
    scratch_out: Vec<i16>,
    actions: Vec<Action>,
}

fn expiry_instant(exp: u64) -> std::time::Instant {
    // Clamped so that an absurd `exp` can never overflow the clock arithmetic.
    let secs = seconds_until(exp).min(10 * 365 * 86_400);
    Instant::now().into_std() + Duration::from_secs(secs)
}

impl Session {
    fn new(
        state: &AppState,
        id: String,
        first: Connection,
        permit: SessionPermit,
        moved: Option<crate::cluster::ResumeState>,
    ) -> Self {
        let config = &state.config;
        let now = Instant::now().into_std();
        let timers = SessionTimers::new(
            TimerConfig {
                heartbeat_interval: Duration::from_secs(config.heartbeat_interval_s),
                heartbeat_timeout: Duration::from_secs(config.heartbeat_timeout_s),
                idle_timeout: Duration::from_secs(config.idle_timeout_s),
                max_duration: Duration::from_secs(config.max_duration_s),
                max_duration_warning: Duration::from_secs(config.max_duration_warning_s),
                token_grace: Duration::from_secs(config.token_grace_s),
                resume_window: Duration::from_secs(config.resume_window_s),
            },
            now,
            expiry_instant(first.identity.expires_at),
        );
        let (attach_tx, attach_rx) = mpsc::channel(4);
        let mut session = Session {
            state: state.clone(),
            identity: first.identity.clone(),
            id,
            permit,
            resume_token: String::new(),
            attach_rx,
            attach_tx,
            link: None,
            link_broken: false,
            input: first.start.input_audio,
            output: first.start.output_audio,
            voice: None,
            turns: Turns::new(turn_config(state), 0),
            history: History::new(HistoryLimits {
                max_messages: config.history_max_messages,
                max_chars: config.history_max_chars,
            }),
            stt: SttLink::new(
                state.engines.stt.clone(),
                SttOptions {
                    sample_rate: 16_000,
                    language: None,
                },
            ),
            clock: AudioClock::new(16_000, 600),
            input_resampler: None,
            response: None,
            usage: Usage::default(),
            consumption: Consumption::default(),
            cost: Cost::default(),
            reported_spend: 0,
            budget: Budget::new(
                (config.session_budget_usd > 0.0).then(|| from_usd(config.session_budget_usd)),
                config.budget_warn_fraction,
            ),
            pending_end: None,
            started_wall: chrono::Utc::now(),
            turn_records: Vec::new(),
            current_user_text: String::new(),
            conversation_id: first.start.conversation_id.clone(),
            client: first.start.client.clone(),
            next_checkpoint: Instant::now() + Duration::from_secs(config.checkpoint_interval_s),
            metered: [0; 3],
            moved: false,
            resume_publish: None,
            timers,
            invalid_frames: 0,
            rate_window: Instant::now(),
            rate_frames: 0,
            flood_windows: 0,
            scratch_in: Vec::new(),
            scratch_out: Vec::new(),
            actions: Vec::new(),
        };
        let resumed = moved.is_some();
        if let Some(m) = moved {
            session.restore(m);
        }
        if let Some(cluster) = session.state.cluster.clone() {
            let (user, sid) = (session.identity.user_id.clone(), session.id.clone());
            let ttl = Duration::from_secs(config.resume_window_s) + cluster.lease_ttl();
            tokio::spawn(async move {
                let _ = cluster.set_owner(&sid, ttl).await;
                let _ = cluster.refresh(&user, &sid).await;
            });
        }
        session.attach(first, resumed);
        session
    }

    /// Continues a session moved from another instance: conversation, usage, budget, turns.
    fn restore(&mut self, m: crate::cluster::ResumeState) {
        for (is_user, text) in &m.history {
            if *is_user {
                self.history.push_user(text);
            } else {
                self.history.push_assistant(text);
            }
        }
        self.usage = m.usage;
        let [stt_ms, input, output, read, write, tts] = m.consumption;
        self.consumption = Consumption {
            stt_ms,
            llm_input_tokens: input,
            llm_output_tokens: output,
            llm_cache_read_tokens: read,
            llm_cache_write_tokens: write,
            tts_chars: tts,
        };
        self.reported_spend = m.reported_spend;

        if m.budget_warned {
            self.budget.mark_warned();
        }
        self.turns = Turns::new(turn_config(&self.state), m.last_turn);
        self.turn_records = m.turn_records;
        self.started_wall = m.started_wall;
        // The session keeps its age: moving never extends the maximum duration.
        if let Ok(age) = (chrono::Utc::now() - m.started_wall).to_std() {
            self.timers.started_earlier(age);
        }
        self.conversation_id = m.conversation_id;
        self.client = m.client;
        self.cost = self.state.prices.cost(&self.consumption);
        // The first instance counted the spend so far in its metrics.
        self.metered = [self.cost.stt, self.cost.llm, self.cost.tts].map(|c| c.unwrap_or(0));
    }

    /// What another instance needs to continue this session.
    fn resume_state(&self) -> crate::cluster::ResumeState {
        let c = &self.consumption;
        crate::cluster::ResumeState {
            session_id: self.id.clone(),
            user_id: self.identity.user_id.clone(),
            started_wall: self.started_wall,
            history: self
                .history
                .messages()
                .map(|m| (m.role == Role::User, m.text.clone()))
                .collect(),
            usage: self.usage.clone(),
            consumption: [
                c.stt_ms,
                c.llm_input_tokens,
                c.llm_output_tokens,
                c.llm_cache_read_tokens,
                c.llm_cache_write_tokens,
                c.tts_chars,
            ],
            reported_spend: self.reported_spend,
            budget_warned: self.budget.warned(),
            last_turn: self.turns.last_turn(),
            turn_records: self.turn_records.clone(),
            conversation_id: self.conversation_id.clone(),
            client: self.client.clone(),
        }
    }

    /// Sets up audio for a connection's `session.start` (a resume may change formats).
    fn configure_media(&mut self, start: &SessionStart) {
        let config = &self.state.config;
        let client_rate = start.input_audio.sample_rate;
        let stt_rate = self.state.engines.stt.input_rate(client_rate);
        self.input_resampler = (stt_rate != client_rate)
            .then(|| StreamResampler::new(client_rate, stt_rate).ok())
            .flatten();
        self.stt.close();
        self.stt = SttLink::new(
            self.state.engines.stt.clone(),
            SttOptions {
                sample_rate: if self.input_resampler.is_some() {
                    stt_rate
                } else {
                    client_rate
                },
                language: start
                    .language
                    .clone()
                    .or_else(|| config.stt_language.clone()),
            },
        );
        self.clock = AudioClock::new(client_rate, 600);
        self.input = start.input_audio;
        self.output = start.output_audio;
        self.voice = start.voice.clone();
    }

    fn limits(&self) -> Limits {
        let c = &self.state.config;
        Limits {
            max_duration_s: c.max_duration_s,
            budget_usd: (c.session_budget_usd > 0.0).then_some(c.session_budget_usd),
            idle_timeout_s: c.idle_timeout_s,
            resume_window_s: c.resume_window_s,
        }
    }

    /// Attaches a connection (the first, or a resume), replacing any still attached.
    fn attach(&mut self, conn: Connection, resumed: bool) {
        if let Some(old) = self.link.take() {
            info!("replacing the attached connection with a resumed one");
            let outbound = old.outbound.clone();
            tokio::spawn(async move {
                let _ = outbound.event(ServerEvent::error(
                    ErrorCode::Internal,
                    "this connection was replaced by a resumed one",
                    true,
                ));
                outbound
                    .close(close::REPLACED, "replaced by a resumed connection")
                    .await;
            });
            drop(old.writer);
        }
        self.configure_media(&conn.start);
        if conn.identity.expires_at != self.identity.expires_at {
            self.timers
                .token_refreshed(expiry_instant(conn.identity.expires_at));
        }
        self.identity = conn.identity;
        self.link = Some(Link {
            stream: conn.stream,
            outbound: conn.outbound,
            writer: conn.writer,
        });
        self.link_broken = false;
        self.timers.attached(Instant::now().into_std());
        self.permit.set_detached(false);
        // A fresh resume token for every connection: an old token is useless once used.
        let registry = &self.state.registry;
        if !self.resume_token.is_empty() {
            registry.remove_resume(&self.resume_token);
            if let Some(cluster) = self.state.cluster.clone() {
                let old = self.resume_token.clone();
                // The delete must not overtake the publication of the same token.
                let published = self.resume_publish.take();
                tokio::spawn(async move {
                    if let Some(p) = published {
                        let _ = p.await;
                    }
                    let _ = cluster.remove_resume(&old).await;
                });
            }
        }
        self.resume_token = new_resume_token();
        registry.register_resume(
            &self.resume_token,
            ResumeEntry {
                session_id: self.id.clone(),
                user_id: self.identity.user_id.clone(),
                attach: self.attach_tx.clone(),
            },
        );
        let event = if resumed {
            metrics::resumed();
            info!(turns = self.turns.last_turn(), "session resumed");
            ServerEvent::SessionResumed {
                session_id: self.id.clone(),
                resume_token: self.resume_token.clone(),
                limits: self.limits(),
                input_audio: self.input,
                output_audio: self.output,
                turns: self.turns.last_turn(),
            }
        } else {
            ServerEvent::SessionStarted {
                session_id: self.id.clone(),
                resume_token: self.resume_token.clone(),
                limits: self.limits(),
                input_audio: self.input,
                output_audio: self.output,
            }
        };
        self.emit(event);
        if resumed {
            self.emit(ServerEvent::Usage(self.usage.clone()));
        }
        // The recogniser connection opens with the first audio frame (buffered meanwhile), so
        // idle sessions hold no provider connection.
    }

    /// The connection is gone: cut the reply (recorded as cut), stop the recogniser, and wait
    /// for a resume.
    async fn detach(&mut self, why: &'static str) {
        let Some(link) = self.link.take() else {
            return;
        };
        info!(why, "connection lost; waiting for a resume");
        // The writer drains what is queued (a close frame, say) and stops by itself once
        // every sender is gone; a dead socket ends it through the send timeout.
        drop(link.outbound);
        drop(link.writer);
        if let Some(turn_id) = self.turns.responding() {
            let _ = self.feed(Input::Cancel).await;
            debug!(turn_id, "reply cut by the disconnect");
        }
        self.stt.close();
        self.timers.detached(Instant::now().into_std());
        self.permit.set_detached(true);
        // Another instance may take the session over within the resume window.
        if let Some(cluster) = self.state.cluster.clone() {
            let state = self.resume_state();
            let token = self.resume_token.clone();
            let window = Duration::from_secs(self.state.config.resume_window_s);
            self.resume_publish = Some(tokio::spawn(async move {
                if let Err(e) = cluster.publish_resume(&token, &state, window).await {
                    warn!(error = %e, "could not publish the session for resume elsewhere");
                }
            }));
        }
    }

    /// Sends an event to the attached client, if any; a full queue marks a slow consumer.
    fn emit(&mut self, event: ServerEvent) {
        if let Some(link) = &self.link
            && link.outbound.event(event).is_err()
        {
            self.link_broken = true;
        }
    }

    async fn run(&mut self) -> EndReason {
        let shutdown = self.state.shutdown.clone();
        let cluster = self.state.cluster.clone();
        let lease_every = cluster
            .as_ref()
            .map_or(Duration::from_secs(3600), |c| c.lease_ttl() / 3);
        let mut lease_tick = tokio::time::interval(lease_every);
        lease_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The loop runs once per audio frame: its timers and the shutdown wait are created once
        // and only reset when their deadline moves, instead of registering new ones per frame.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let timer = tokio::time::sleep_until(Instant::from_std(self.timers.next_deadline()));
        tokio::pin!(timer);
        let checkpoint = tokio::time::sleep_until(self.next_checkpoint);
        tokio::pin!(checkpoint);
        loop {
            // Only an earlier deadline needs a reset: a later one (activity postponing the idle
            // timeout on every frame) is caught when the timer fires early and finds nothing due.
            let deadline = Instant::from_std(self.timers.next_deadline());
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            let step = tokio::select! {
                _ = &mut cancelled => Err(EndReason::Draining),
                input = link_next(&mut self.link) => match input {
                    LinkInput::Frame(Some(Ok(m))) => self.on_client(m).await,
                    LinkInput::Frame(_) => {
                        self.detach("connection closed").await;
                        Ok(())
                    }
                    LinkInput::WriterGone => {
                        self.detach("client stopped reading").await;
                        Ok(())
                    }
                },
                Some(conn) = self.attach_rx.recv() => {
                    // A reply still playing on the old connection is cut (and recorded as
                    // cut) before the new connection takes over.
                    let cut = if self.link.is_some() && self.turns.responding().is_some() {
                        self.feed(Input::Cancel).await
                    } else {
                        Ok(())
                    };
                    self.attach(conn, true);
                    cut
                }
                event = self.stt.next() => self.on_stt(event).await,
                turn_id = response_finished(&mut self.response) => self.on_response_finished(turn_id),
                _ = &mut timer => {
                    let step = self.on_timers().await;
                    // Never spin on a deadline that did not move.
                    let next = Instant::from_std(self.timers.next_deadline())
                        .max(Instant::now() + Duration::from_millis(10));
                    timer.as_mut().reset(next);
                    step
                }
                _ = lease_tick.tick(), if cluster.is_some() => self.on_lease_tick().await,
                _ = &mut checkpoint => {
                    self.state.recorder.submit(self.snapshot(None));
                    self.next_checkpoint = Instant::now() + Duration::from_secs(self.state.config.checkpoint_interval_s);
                    checkpoint.as_mut().reset(self.next_checkpoint);
                    Ok(())
                }
            };
            if let Err(reason) = step {
                return reason;
            }
            if let Some(reason) = self.pending_end.take() {
                return reason;
            }
            if std::mem::take(&mut self.link_broken) {
                warn!("client queue full; dropping the connection");
                self.detach("slow consumer").await;
            }
        }
    }

    /// Scale-out: refresh the lease; while detached, notice a takeover by another instance.
    async fn on_lease_tick(&mut self) -> Result<(), EndReason> {
        let Some(cluster) = self.state.cluster.clone() else {
            return Ok(());
        };
        if self.link.is_none()
            && let Ok(Some(owner)) = cluster.owner(&self.id).await
            && owner != cluster.instance
        {
            info!("the session resumed on another instance");
            self.moved = true;
            return Err(EndReason::ResumeExpired);
        }
        let (user, sid) = (self.identity.user_id.clone(), self.id.clone());
        tokio::spawn(async move {
            if let Err(e) = cluster.refresh(&user, &sid).await {
                warn!(error = %e, "lease refresh failed");
            }
        });
        Ok(())
    }

    async fn on_timers(&mut self) -> Result<(), EndReason> {
        while let Some(action) = self.timers.poll(Instant::now().into_std()) {
            match action {
                TimerAction::Ping => {
                    if let Some(link) = &self.link
                        && link.outbound.ping().is_err()
                    {
                        self.link_broken = true;
                    }
                }
                TimerAction::HeartbeatTimeout => {
                    warn!("heartbeat pong overdue; dropping the connection");
                    if let Some(link) = &self.link {
                        link.outbound
                            .close(close::GOING_AWAY, "heartbeat timeout")
                            .await;
                    }
                    self.detach("heartbeat timeout").await;
                }
                TimerAction::WarnMaxDuration { seconds_left } => {
                    self.emit(ServerEvent::SessionEnding {
                        reason: EndingReason::MaxDuration,
                        seconds_left,
                    });
                }
                TimerAction::End(end) => return Err(end.into()),
            }
        }
        Ok(())
    }

    async fn on_client(&mut self, msg: Message) -> Result<(), EndReason> {
        let now = Instant::now().into_std();
        if let Message::Pong(_) = msg {
            self.timers.pong();
            return Ok(());
        }
        self.timers.activity(now);
        if matches!(msg, Message::Binary(_) | Message::Text(_)) && !self.within_frame_rate()? {
            // Over the cap frames are dropped unread, except an explicit end of session.
            if let Message::Text(text) = &msg
                && text.len() < 256
                && matches!(
                    parse_client_message(text.as_str()),
                    Ok(ClientMessage::SessionEnd)
                )
            {
                return Err(EndReason::ClientEnded);
            }
            return Ok(());
        }
        match msg {
            Message::Binary(pcm) => self.on_audio(pcm),
            Message::Text(text) => match parse_client_message(text.as_str()) {
                Ok(m) => self.on_message(m).await,
                Err(e) => {
                    metrics::message_rejected(e.code().as_str());
                    self.count_invalid()?;
                    self.emit(ServerEvent::error(e.code(), e.to_string(), false));
                    Ok(())
                }
            },
            Message::Close(_) => {
                self.detach("client closed the connection").await;
                Ok(())
            }
            Message::Ping(_) | Message::Pong(_) => Ok(()),
        }
    }

    /// Counts the frame against the per-second cap: frames over it are dropped with a
    /// `rate_limited` error; `MAX_FLOOD_SECONDS` seconds in a row over it close with 1008.
    fn within_frame_rate(&mut self) -> Result<bool, EndReason> {
        let now = Instant::now();
        if now.duration_since(self.rate_window) >= Duration::from_secs(1) {
            if self.rate_frames > self.state.config.max_frames_per_s {
                self.flood_windows += 1;
            } else {
                self.flood_windows = 0;
            }
            self.rate_window = now;
            self.rate_frames = 0;
        }
        self.rate_frames += 1;
        let cap = self.state.config.max_frames_per_s;
        if self.rate_frames <= cap {
            return Ok(true);
        }
        if self.flood_windows >= MAX_FLOOD_SECONDS {
            warn!("frame flood; closing");
            self.emit(ServerEvent::error(
                ErrorCode::RateLimited,
                "too many frames per second",
                true,
            ));
            return Err(EndReason::Policy);
        }
        if self.rate_frames == cap + 1 {
            self.emit(ServerEvent::error(
                ErrorCode::RateLimited,
                format!("more than {cap} frames per second; extra frames are dropped"),
                false,
            ));
        }
        metrics::chunk_rejected("rate");
        Ok(false)
    }

    fn count_invalid(&mut self) -> Result<(), EndReason> {
        self.invalid_frames += 1;
        if self.invalid_frames > MAX_INVALID_FRAMES {
            warn!("too many invalid frames; closing");
            self.emit(ServerEvent::error(
                ErrorCode::InvalidMessage,
                "too many invalid frames",
                true,
            ));
            return Err(EndReason::Policy);
        }
        Ok(())
    }

    fn on_audio(&mut self, pcm: Bytes) -> Result<(), EndReason> {
        let c = &self.state.config;
        if let Err(e) = validate_chunk(pcm.len(), c.audio_chunk_min_bytes, c.audio_chunk_max_bytes)
        {
            metrics::chunk_rejected(match e {
                ChunkError::TooSmall { .. } => "too_small",
                ChunkError::TooLarge { .. } => "too_large",
                ChunkError::OddLength { .. } => "odd_length",
            });
            self.count_invalid()?;
            self.emit(ServerEvent::error(
                ErrorCode::AudioChunkInvalid,
                e.to_string(),
                false,
            ));
            return Ok(());
        }
        metrics::AUDIO.frames_in.increment(1);
        metrics::AUDIO.bytes_in.increment(pcm.len() as u64);
        let samples = pcm.len() / 2;
        let position_s = self.clock.total_seconds();
        self.clock.push(samples, Instant::now().into_std());
        self.usage.stt_seconds += samples as f64 / f64::from(self.input.sample_rate);
        let stt_ms = (self.usage.stt_seconds * 1000.0) as u64;
        // Recognition is billed while the user talks: re-check the budget every second.
        if stt_ms / 1000 != self.consumption.stt_ms / 1000 {
            self.consumption.stt_ms = stt_ms;
            self.update_cost(0);
        } else {
            self.consumption.stt_ms = stt_ms;
        }
        let forwarded = match self.input_resampler.as_mut() {
            None => pcm,
            Some(r) => {
                self.scratch_in.clear();
                self.scratch_out.clear();
                pcm_from_le_bytes(&pcm, &mut self.scratch_in);
                r.process(&self.scratch_in, &mut self.scratch_out);
                let mut bytes = Vec::with_capacity(self.scratch_out.len() * 2);
                pcm_to_le_bytes(&self.scratch_out, &mut bytes);
                Bytes::from(bytes)
            }
        };
        if !forwarded.is_empty() {
            self.stt.send_audio(forwarded, position_s);
        }
        Ok(())
    }

    async fn on_message(&mut self, msg: ClientMessage) -> Result<(), EndReason> {
        match msg {
            ClientMessage::SessionStart(_) => {
                self.emit(ServerEvent::error(
                    ErrorCode::SessionAlreadyStarted,
                    "the session has already started",
                    false,
                ));
                Ok(())
            }
            ClientMessage::InputCommit => self.feed(Input::Commit).await,
            ClientMessage::ResponseCancel => self.feed(Input::Cancel).await,
            ClientMessage::AuthRefresh { token } => {
                match self.state.auth.verify(&token).await {
                    Ok(identity) if identity.user_id == self.identity.user_id => {
                        debug!("access token refreshed");
                        self.timers
                            .token_refreshed(expiry_instant(identity.expires_at));
                        self.identity = identity;
                    }
                    Ok(_) => self.emit(ServerEvent::error(
                        ErrorCode::Unauthorized,
                        "the new token belongs to another user",
                        false,
                    )),
                    Err(e) => self.emit(ServerEvent::error(
                        ErrorCode::Unauthorized,
                        e.to_string(),
                        false,
                    )),
                }
                Ok(())
            }
            ClientMessage::Ping { id } => {
                self.emit(ServerEvent::Pong { id });
                Ok(())
            }
            ClientMessage::SessionEnd => Err(EndReason::ClientEnded),
        }
    }

    async fn on_stt(&mut self, event: LinkEvent) -> Result<(), EndReason> {
        match event {
            LinkEvent::Event(event) => {
                let at = |s: Option<f64>| s.and_then(|s| self.clock.instant_at(s));
                match event {
                    SttEvent::Partial { text } => self.feed(Input::Partial { text: &text }).await,
                    SttEvent::Final {
                        text,
                        speech_final,
                        speech_end_s,
                        ..
                    } => {
                        let end_of_speech = at(speech_end_s);
                        self.feed(Input::Final {
                            text: &text,
                            speech_final,
                            end_of_speech,
                        })
                        .await
                    }
                    SttEvent::UtteranceEnd { last_word_end_s } => {
                        let end_of_speech = at(last_word_end_s);
                        self.feed(Input::UtteranceEnd { end_of_speech }).await
                    }
                    SttEvent::SpeechStarted { .. } => self.feed(Input::SpeechStarted).await,
                }
            }
            LinkEvent::Lost(e) if e.is_busy() => {
                metrics::provider_error("stt", e.label());
                warn!(error = %e, "speech recognition queue full; utterance dropped");
                self.emit(ServerEvent::error(
                    ErrorCode::EnginesBusy,
                    "the speech engine is busy and missed that; please say it again in a moment",
                    false,
                ));
                Ok(())
            }
            LinkEvent::Lost(e) => {
                metrics::provider_error("stt", e.label());
                warn!(error = %e, kind = e.label(), failures = self.stt.failures(), "speech recognition connection lost");
                let fatal = self.stt.failures() >= MAX_STT_FAILURES;
                self.emit(ServerEvent::error(
                    ErrorCode::SttFailed,
                    if fatal {
                        "speech recognition is unavailable"
                    } else {
                        "speech recognition connection lost; reconnecting"
                    },
                    fatal,
                ));
                if fatal {
                    Err(EndReason::ProviderFailed)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Feeds the turn machine and carries out its actions in order.
    async fn feed(&mut self, input: Input<'_>) -> Result<(), EndReason> {
        let mut actions = std::mem::take(&mut self.actions);
        self.turns.handle(input, &mut actions);
        for action in actions.drain(..) {
            match action {
                Action::Partial(text) => self.emit(ServerEvent::TranscriptPartial { text }),
                Action::Finalize => self.stt.finalize(),
                Action::Interrupt { turn_id } => self.interrupt(turn_id).await,
                Action::EndOfTurn {
                    turn_id,
                    text,
                    end_of_speech,
                } => self.start_response(turn_id, text, end_of_speech),
            }
        }
        self.actions = actions;
        Ok(())
    }

    fn start_response(
        &mut self,
        turn_id: u64,
        text: String,
        end_of_speech: Option<std::time::Instant>,
    ) {
        self.emit(ServerEvent::TranscriptFinal {
            turn_id,
            text: text.clone(),
        });
        self.history.push_user(&text);
        self.current_user_text = text.clone();
        // Stop before starting work that would exceed the budget.
        let prompt_chars: usize = self.history.messages().map(|m| m.text.len()).sum::<usize>()
            + self.state.config.system_prompt.len();
        let estimate = self
            .state
            .prices
            .reply_estimate(
                prompt_chars as u64 / 4,
                u64::from(self.state.config.llm_max_tokens),
            )
            .unwrap_or(0);
        if self.update_cost(estimate) {
            // The turn was heard but not answered: keep it in the record.
            self.turn_records.push(atlas_store::TurnRecord {
                session_id: self.record_id(),
                turn_index: i32::try_from(turn_id).unwrap_or(i32::MAX),
                user_id: self.identity.user_id.clone(),
                user_text: std::mem::take(&mut self.current_user_text),
                assistant_text: String::new(),
                interrupted: true,
                eos_to_final_ms: None,
                llm_first_token_ms: None,
                tts_first_audio_ms: None,
                to_first_audio_ms: None,
                created_at: chrono::Utc::now(),
            });
            return;
        }
        self.emit(ServerEvent::ResponseStarted { turn_id });
        let config = &self.state.config;
        let request = LlmRequest {
            system: config.system_prompt.clone(),
            messages: self
                .history
                .messages()
                .map(|m| ChatMessage {
                    role: match m.role {
                        Role::User => ChatRole::User,
                        Role::Assistant => ChatRole::Assistant,
                    },
                    text: m.text.clone(),
                })
                .collect(),
            max_tokens: config.llm_max_tokens,
            temperature: None,
        };
        let mut progress = Progress {
            prompt_chars: request.system.len()
                + request.messages.iter().map(|m| m.text.len()).sum::<usize>(),
            ..Progress::default()
        };
        progress.timings.end_of_speech = end_of_speech;
        progress.timings.end_of_turn = Some(Instant::now().into_std());
        let progress = Arc::new(Mutex::new(progress));
        let Some(link) = &self.link else {
            return;
        };
        let ctx = ResponseCtx {
            turn_id,
            llm: self.state.engines.llm.clone(),
            tts: self.state.engines.tts.clone(),
            request,
            voice: self.voice.clone(),
            out_rate: self.output.sample_rate,
            outbound: link.outbound.clone(),
            lead: Duration::from_millis(config.playback_lead_ms),
            prefetch: config.tts_prefetch,
            splitter: SplitterConfig::default(),
        };
        let handle = tokio::spawn(response::run(ctx, progress.clone()).in_current_span());
        self.response = Some(ActiveResponse {
            turn_id,
            handle,
            progress,
        });
    }

    /// Barge-in or cancel: abort the reply at once and keep only what was spoken.
    async fn interrupt(&mut self, turn_id: u64) {
        let Some(active) = self.response.take_if(|r| r.turn_id == turn_id) else {
            return;
        };
        active.handle.abort();
        let _ = active.handle.await;
        self.emit(ServerEvent::ResponseInterrupted { turn_id });
        metrics::turn("interrupted");
        self.complete(turn_id, &active.progress, true);
    }

    fn on_response_finished(&mut self, turn_id: u64) -> Result<(), EndReason> {
        let Some(active) = self.response.take() else {
            return Ok(());
        };
        let mut out = Vec::new();
        self.turns
            .handle(Input::ResponseFinished { turn_id }, &mut out);
        let failed = lock(&active.progress).failure.clone();
        match &failed {
            Some(f) if f.code == ErrorCode::SlowConsumer => {
                self.link_broken = true;
                metrics::turn("client_gone");
            }
            Some(f) => {
                warn!(turn_id, code = f.code.as_str(), kind = f.label, detail = %f.detail, "reply failed");
                metrics::provider_error(
                    if f.code == ErrorCode::LlmFailed {
                        "llm"
                    } else {
                        "tts"
                    },
                    f.label,
                );
                metrics::turn("failed");
                self.emit(ServerEvent::error(f.code, failure_message(f.code), false));
            }
            None => metrics::turn("completed"),
        }
        self.complete(turn_id, &active.progress, failed.is_some());
        Ok(())
    }

    /// Records a finished or cut reply: history, usage, `response.done`.
    fn complete(&mut self, turn_id: u64, progress: &Mutex<Progress>, interrupted: bool) {
        let mut p = lock(progress);
        // Servers that report no usage (some OpenAI-compatible ones) are measured instead:
        // about four characters per token.
        // Usage the provider did not (finally) report is measured from the text, about four
        // characters a token: servers that report nothing, and replies cut before the final
        // report (Anthropic sends the output count at the end of the stream).
        if !p.generated.is_empty() {
            let generated = p.generated.len().div_ceil(4) as u64;
            let output = p.llm_usage.output_tokens;
            p.llm_usage.output_tokens = match (output, p.llm_done) {
                (Some(reported), true) => Some(reported),
                (reported, _) => Some(reported.unwrap_or(0).max(generated)),
            };
            if p.llm_usage.input_tokens.is_none() {
                p.llm_usage.input_tokens = Some(p.prompt_chars.div_ceil(4) as u64);
            }
        }
        self.history.push_assistant(&p.spoken);
        self.usage.llm_input_tokens += p.llm_usage.input_tokens.unwrap_or(0)
            + p.llm_usage.cache_read_input_tokens.unwrap_or(0)
            + p.llm_usage.cache_creation_input_tokens.unwrap_or(0);
        self.usage.llm_output_tokens += p.llm_usage.output_tokens.unwrap_or(0);
        self.usage.tts_chars += p.tts_chars;
        self.consumption.llm_input_tokens += p.llm_usage.input_tokens.unwrap_or(0);
        self.consumption.llm_output_tokens += p.llm_usage.output_tokens.unwrap_or(0);
        self.consumption.llm_cache_read_tokens += p.llm_usage.cache_read_input_tokens.unwrap_or(0);
        self.consumption.llm_cache_write_tokens +=
            p.llm_usage.cache_creation_input_tokens.unwrap_or(0);
        self.consumption.tts_chars += p.tts_chars;
        let latency = p.timings.latency();
        for (stage, d) in [
            ("stt_final", latency.end_of_speech_to_final),
            ("llm_first_token", latency.llm_first_token),
            ("tts_first_audio", latency.tts_first_audio),
            ("first_audio", latency.to_first_audio),
        ] {
            if let Some(d) = d {
                metrics::stage_latency(stage, d);
            }
        }
        let latency = breakdown(latency);
        info!(turn_id, interrupted, spoken_chars = p.spoken.len(), latency_ms = ?latency, "reply done");
        let ms = |v: Option<u64>| v.and_then(|v| i32::try_from(v).ok());
        self.turn_records.push(atlas_store::TurnRecord {
            session_id: self.record_id(),
            turn_index: i32::try_from(turn_id).unwrap_or(i32::MAX),
            user_id: self.identity.user_id.clone(),
            user_text: std::mem::take(&mut self.current_user_text),
            assistant_text: p.spoken.clone(),
            interrupted,
            eos_to_final_ms: ms(latency.end_of_speech_to_final),
            llm_first_token_ms: ms(latency.llm_first_token),
            tts_first_audio_ms: ms(latency.tts_first_audio),
            to_first_audio_ms: ms(latency.to_first_audio),
            created_at: chrono::Utc::now(),
        });
        drop(p);
        self.emit(ServerEvent::ResponseDone {
            turn_id,
            interrupted,
            latency_ms: latency,
        });
        self.update_cost(0);
        self.emit(ServerEvent::Usage(self.usage.clone()));
    }

    /// Recomputes the cost from the usage totals, adds the increase to the user's daily
    /// spend, and applies the session and daily budgets to `spent + next` (the estimate of the
    /// work about to start). Returns true when the session must end.
    fn update_cost(&mut self, next: u64) -> bool {
        self.cost = self.state.prices.cost(&self.consumption);
        for (i, (stage, value)) in [
            ("stt", self.cost.stt),
            ("llm", self.cost.llm),
            ("tts", self.cost.tts),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some(v) = value
                && v > self.metered[i]
            {
                metrics::spend(stage, v - self.metered[i]);
                self.metered[i] = v;
            }
        }
        self.usage.cost_usd = self.cost.total.map(to_usd);
        let Some(spent) = self.cost.total else {
            return false; // unknown cost: budgets cannot apply (warned at start)
        };
        if spent > self.reported_spend {
            let delta = spent - self.reported_spend;
            self.reported_spend = spent;
            match self.state.cluster.clone() {
                // Across instances: the total comes back from Redis into the local cache the
                // budget check reads.
                Some(cluster) => {
                    let (state, user) = (self.state.clone(), self.identity.user_id.clone());
                    tokio::spawn(async move {
                        match cluster.add_spend(&user, delta).await {
                            Ok(total) => state.registry.set_spent_today(&user, total),
                            Err(e) => {
                                warn!(error = %e, "could not record spend in the shared store");
                                state.registry.add_spend(&user, delta);
                            }
                        }
                    });
                }
                None => self.state.registry.add_spend(&self.identity.user_id, delta),
            }
        }
        let mut state = self.budget.check(spent, next);
        if let Some(daily) = self.state.config.user_daily_budget_usd {
            let today = self.state.registry.spent_today(&self.identity.user_id);
            if today.saturating_add(next) > from_usd(daily) || today >= from_usd(daily) {
                state = BudgetState::Exhausted;
            }
        }
        match state {
            BudgetState::Ok => false,
            BudgetState::Warn => {
                if let Some(limit) = self.budget.limit() {
                    self.emit(ServerEvent::BudgetWarning {
                        spent_usd: to_usd(spent),
                        budget_usd: to_usd(limit),
                    });
                }
                false
            }
            BudgetState::Exhausted => {
                info!(
                    spent_usd = to_usd(spent),
                    next_usd = to_usd(next),
                    "budget exhausted"
                );
                self.pending_end = Some(EndReason::BudgetExhausted);
                true
            }
        }
    }

    fn record_id(&self) -> uuid::Uuid {
        uuid::Uuid::parse_str(&self.id).unwrap_or_default()
    }

    /// The session's record as it stands (`ended`: the final one).
    fn snapshot(&self, ended: Option<EndReason>) -> atlas_store::Snapshot {
        let micros = |v: Option<u64>| v.and_then(|v| i64::try_from(v).ok());
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let now = chrono::Utc::now();
        let models = &self.state.models;
        atlas_store::Snapshot {
            seq: 0, // numbered by the recorder
            session: atlas_store::SessionRecord {
                id: self.record_id(),
                user_id: self.identity.user_id.clone(),
                conversation_id: self.conversation_id.clone(),
                started_at: self.started_wall,
                ended_at: ended.map(|_| now),
                duration_ms: (now - self.started_wall).num_milliseconds().max(0),
                end_reason: ended.map(|r| r.label().to_owned()),
                turns: i32::try_from(self.turns.last_turn()).unwrap_or(i32::MAX),
                stt_seconds: self.usage.stt_seconds,
                llm_input_tokens: count(self.usage.llm_input_tokens),
                llm_output_tokens: count(self.usage.llm_output_tokens),
                tts_chars: count(self.usage.tts_chars),
                stt_cost_micros: micros(self.cost.stt),
                llm_cost_micros: micros(self.cost.llm),
                tts_cost_micros: micros(self.cost.tts),
                total_cost_micros: micros(self.cost.total),
                stt_model: Some(models.stt.1.clone()),
                llm_model: Some(models.llm.1.clone()),
                tts_model: Some(models.tts.1.clone()),
                price_catalog_version: Some(self.state.catalog_version.clone()),
                client_name: self.client.as_ref().and_then(|c| c.name.clone()),
                client_version: self.client.as_ref().and_then(|c| c.version.clone()),
            },
            turns: self.turn_records.clone(),
        }
    }

    /// Ends the session: stop the reply, close the recogniser, tell the client why, close.
    async fn finish(&mut self, reason: EndReason) {
        // No resume can reach this session any more; one already on its way is told so.
        self.state.registry.remove_resume(&self.resume_token);
        self.attach_rx.close();
        while let Ok(conn) = self.attach_rx.try_recv() {
            tokio::spawn(async move {
                let _ = conn.outbound.event(ServerEvent::error(
                    ErrorCode::ResumeFailed,
                    "the session has ended; start a new one",
                    true,
                ));
                conn.outbound.close(close::NORMAL, "session ended").await;
            });
        }
        if self.turns.responding().is_some() {
            let _ = self.feed(Input::Cancel).await;
        }
        // A takeover may have happened after the last ownership check.
        if !self.moved
            && let Some(cluster) = self.state.cluster.clone()
            && let Ok(Some(owner)) = cluster.owner(&self.id).await
            && owner != cluster.instance
        {
            self.moved = true;
        }
        if self.moved {
            // Another instance owns the session now: it writes the record and holds the lease.
            self.state.registry.remove_resume(&self.resume_token);
            return;
        }
        self.update_cost(0);
        self.state.recorder.submit(self.snapshot(Some(reason)));
        // Draining with scale-out: hand the session to whichever instance the client
        // reconnects to (its final record will replace this one), keeping its place.
        if reason == EndReason::Draining
            && let Some(cluster) = self.state.cluster.clone()
        {
            let state = self.resume_state();
            let window = Duration::from_secs(self.state.config.resume_window_s);
            if let Err(e) = cluster
                .publish_resume(&self.resume_token, &state, window)
                .await
            {
                warn!(error = %e, "could not hand the session over for resume elsewhere");
            }
        } else if let Some(cluster) = self.state.cluster.clone() {
            let (user, sid, token) = (
                self.identity.user_id.clone(),
                self.id.clone(),
                self.resume_token.clone(),
            );
            tokio::spawn(async move {
                let _ = cluster.release(&user, &sid).await;
                let _ = cluster.remove_resume(&token).await;
            });
        }
        self.stt.close();
        self.state.registry.remove_resume(&self.resume_token);
        metrics::session_ended(reason.label());
        let (code, text, error) = match reason {
            EndReason::ClientEnded => (close::NORMAL, "session ended", None),
            EndReason::Draining => {
                self.emit(ServerEvent::SessionEnding {
                    reason: EndingReason::Draining,
                    seconds_left: 0,
                });
                (close::GOING_AWAY, "server draining", None)
            }
            EndReason::Policy => (close::POLICY, "policy violation", None),
            EndReason::ProviderFailed => (close::INTERNAL, "provider unavailable", None),
            EndReason::IdleTimeout => (
                close::IDLE_TIMEOUT,
                "idle timeout",
                Some((ErrorCode::IdleTimeout, "no activity for the idle timeout")),
            ),
            EndReason::BudgetExhausted => {
                self.emit(ServerEvent::SessionEnding {
                    reason: EndingReason::Budget,
                    seconds_left: 0,
                });
                self.emit(ServerEvent::Usage(self.usage.clone()));
                (
                    close::BUDGET_EXHAUSTED,
                    "budget exhausted",
                    Some((
                        ErrorCode::BudgetExhausted,
                        "the budget for this session is spent",
                    )),
                )
            }
            EndReason::MaxDuration => (
                close::MAX_DURATION,
                "maximum duration reached",
                Some((
                    ErrorCode::MaxDuration,
                    "the session reached its maximum duration",
                )),
            ),
            EndReason::TokenExpired => (
                close::TOKEN_EXPIRED,
                "token expired",
                Some((
                    ErrorCode::TokenExpired,
                    "the access token expired; send auth.refresh before expiry",
                )),
            ),
            EndReason::ResumeExpired | EndReason::Disconnected | EndReason::StartTimeout => {
                (close::NORMAL, "session ended", None)
            }
        };
        if let Some((code, message)) = error {
            self.emit(ServerEvent::error(code, message, true));
        }
        if let Some(link) = self.link.take() {
            link.outbound.close(code, text).await;
            drop(link.outbound);
            let _ = tokio::time::timeout(Duration::from_secs(2), link.writer).await;
        }
    }
}

fn new_resume_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

async fn response_finished(response: &mut Option<ActiveResponse>) -> u64 {
    match response {
        Some(active) => {
            let _ = (&mut active.handle).await;
            active.turn_id
        }
        None => std::future::pending().await,
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

fn breakdown(l: Latency) -> LatencyBreakdown {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
    LatencyBreakdown {
        end_of_speech_to_final: ms(l.end_of_speech_to_final),
        llm_first_token: ms(l.llm_first_token),
        tts_first_audio: ms(l.tts_first_audio),
        to_first_audio: ms(l.to_first_audio),
    }
}

/// Turn-taking settings for the configured recogniser: without interim transcripts (the
/// local recogniser) the user barges in as soon as the voice detector hears speech.
fn turn_config(state: &AppState) -> TurnConfig {
    TurnConfig {
        interrupt_on_speech_start: state.engines.stt.provider() == "local",
        ..TurnConfig::default()
    }
}
