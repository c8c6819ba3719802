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
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use atlas_core::audio::{AudioClock, pcm_from_le_bytes, pcm_to_le_bytes, validate_chunk};
use atlas_core::history::{History, HistoryLimits, Role};
use atlas_core::latency::Latency;
use atlas_core::resample::StreamResampler;
use atlas_core::splitter::SplitterConfig;
use atlas_core::turns::{Action, Input, TurnConfig, Turns};
use atlas_protocol::{
    AudioFormat, ClientMessage, ErrorCode, LatencyBreakdown, Limits, ServerEvent, SessionStart,
    Usage, close, parse_client_message,
};
use atlas_providers::llm::{ChatMessage, ChatRole, LlmRequest};
use atlas_providers::stt::{SttEvent, SttOptions};

use crate::app::AppState;
use crate::auth::Identity;
use outbound::{OutboundTx, run_writer};
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
/// Consecutive recogniser failures before the session gives up.
const MAX_STT_FAILURES: u32 = 4;

/// Why the session loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The client sent `session.end`.
    ClientEnded,
    /// The connection dropped or the client closed it.
    Disconnected,
    /// The server is draining.
    Draining,
    /// Protocol abuse.
    Policy,
    /// The client does not read.
    SlowConsumer,
    /// A provider failed beyond recovery.
    ProviderFailed,
    /// No `session.start` in time.
    StartTimeout,
}

impl EndReason {
    /// Bounded label for logs, metrics and records.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::ClientEnded => "client_ended",
            EndReason::Disconnected => "disconnected",
            EndReason::Draining => "draining",
            EndReason::Policy => "policy",
            EndReason::SlowConsumer => "slow_consumer",
            EndReason::ProviderFailed => "provider_failed",
            EndReason::StartTimeout => "start_timeout",
        }
    }
}

/// Serves one upgraded connection until it ends.
pub async fn serve_connection(socket: WebSocket, state: AppState, identity: Identity) {
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let writer = tokio::spawn(run_writer(sink, rx, SEND_TIMEOUT));
    let outbound = OutboundTx::new(tx);
    let session_id = uuid::Uuid::new_v4().to_string();
    let span = tracing::info_span!("session", session_id = %session_id);
    let reason = run_session(state, identity, session_id, stream, outbound)
        .instrument(span.clone())
        .await;
    let exit = tokio::time::timeout(Duration::from_secs(3), writer).await;
    span.in_scope(|| info!(reason = reason.label(), writer = ?exit.ok().and_then(Result::ok), "session ended"));
}

async fn run_session<S>(
    state: AppState,
    identity: Identity,
    session_id: String,
    mut stream: S,
    outbound: OutboundTx,
) -> EndReason
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let start = match await_start(&state, &mut stream, &outbound).await {
        Ok(start) => start,
        Err(reason) => {
            let code = if reason == EndReason::StartTimeout {
                close::POLICY
            } else {
                close::NORMAL
            };
            if reason != EndReason::Disconnected {
                outbound.close(code, "no session.start").await;
            }
            return reason;
        }
    };
    let mut session = Session::new(&state, identity, session_id, &start, outbound.clone());
    info!(user_id = %session.identity.user_id, input_rate = start.input_audio.sample_rate,
        output_rate = start.output_audio.sample_rate, "session started");
    session.announce();
    session.stt.connect_now();
    let reason = session.run(&mut stream).await;
    session.finish(reason).await;
    reason
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
            return Err(EndReason::SlowConsumer);
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

/// The state of one started session.
struct Session {
    state: AppState,
    identity: Identity,
    id: String,
    outbound: OutboundTx,
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
    invalid_frames: u32,
    /// Reusable buffers for input resampling.
    scratch_in: Vec<i16>,
    scratch_out: Vec<i16>,
    actions: Vec<Action>,
}

impl Session {
    fn new(
        state: &AppState,
        identity: Identity,
        id: String,
        start: &SessionStart,
        outbound: OutboundTx,
    ) -> Self {
        let config = &state.config;
        let client_rate = start.input_audio.sample_rate;
        let stt_rate = state.engines.stt.input_rate(client_rate);
        let input_resampler = (stt_rate != client_rate)
            .then(|| StreamResampler::new(client_rate, stt_rate).ok())
            .flatten();
        let stt = SttLink::new(
            state.engines.stt.clone(),
            SttOptions {
                sample_rate: if input_resampler.is_some() {
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
        Session {
            state: state.clone(),
            identity,
            id,
            outbound,
            input: start.input_audio,
            output: start.output_audio,
            voice: start.voice.clone(),
            turns: Turns::new(TurnConfig::default(), 0),
            history: History::new(HistoryLimits {
                max_messages: config.history_max_messages,
                max_chars: config.history_max_chars,
            }),
            stt,
            clock: AudioClock::new(client_rate, 600),
            input_resampler,
            response: None,
            usage: Usage {
                cost_usd: None,
                ..Usage::default()
            },
            invalid_frames: 0,
            scratch_in: Vec::new(),
            scratch_out: Vec::new(),
            actions: Vec::new(),
        }
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

    fn announce(&self) {
        let _ = self.outbound.event(ServerEvent::SessionStarted {
            session_id: self.id.clone(),
            resume_token: uuid::Uuid::new_v4().simple().to_string(),
            limits: self.limits(),
            input_audio: self.input,
            output_audio: self.output,
        });
    }

    /// Sends an event; a full queue ends the session as a slow consumer.
    fn emit(&self, event: ServerEvent) -> Result<(), EndReason> {
        self.outbound
            .event(event)
            .map_err(|_| EndReason::SlowConsumer)
    }

    async fn run<S>(&mut self, stream: &mut S) -> EndReason
    where
        S: Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let shutdown = self.state.shutdown.clone();
        loop {
            let step = tokio::select! {
                _ = shutdown.cancelled() => Err(EndReason::Draining),
                msg = stream.next() => match msg {
                    None | Some(Err(_)) => Err(EndReason::Disconnected),
                    Some(Ok(m)) => self.on_client(m).await,
                },
                event = self.stt.next() => self.on_stt(event).await,
                turn_id = response_finished(&mut self.response) => self.on_response_finished(turn_id),
                _ = self.outbound.closed() => Err(EndReason::SlowConsumer),
            };
            if let Err(reason) = step {
                return reason;
            }
        }
    }

    async fn on_client(&mut self, msg: Message) -> Result<(), EndReason> {
        match msg {
            Message::Binary(pcm) => self.on_audio(pcm),
            Message::Text(text) => match parse_client_message(text.as_str()) {
                Ok(m) => self.on_message(m).await,
                Err(e) => {
                    self.count_invalid()?;
                    self.emit(ServerEvent::error(e.code(), e.to_string(), false))
                }
            },
            Message::Close(_) => Err(EndReason::Disconnected),
            Message::Ping(_) | Message::Pong(_) => Ok(()),
        }
    }

    fn count_invalid(&mut self) -> Result<(), EndReason> {
        self.invalid_frames += 1;
        if self.invalid_frames > MAX_INVALID_FRAMES {
            warn!("too many invalid frames; closing");
            let _ = self.outbound.event(ServerEvent::error(
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
            self.count_invalid()?;
            return self.emit(ServerEvent::error(
                ErrorCode::AudioChunkInvalid,
                e.to_string(),
                false,
            ));
        }
        let samples = pcm.len() / 2;
        let position_s = self.clock.total_seconds();
        self.clock.push(samples, Instant::now().into_std());
        self.usage.stt_seconds = self.clock.total_seconds();
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
            ClientMessage::SessionStart(_) => self.emit(ServerEvent::error(
                ErrorCode::SessionAlreadyStarted,
                "the session has already started",
                false,
            )),
            ClientMessage::InputCommit => self.feed(Input::Commit).await,
            ClientMessage::ResponseCancel => self.feed(Input::Cancel).await,
            ClientMessage::AuthRefresh { token } => match self.state.auth.verify(&token) {
                Ok(identity) if identity.user_id == self.identity.user_id => {
                    debug!("access token refreshed");
                    self.identity = identity;
                    Ok(())
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
            },
            ClientMessage::Ping { id } => self.emit(ServerEvent::Pong { id }),
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
            LinkEvent::Lost(e) => {
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
                ))?;
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
        let mut result = Ok(());
        for action in actions.drain(..) {
            result = match action {
                Action::Partial(text) => self.emit(ServerEvent::TranscriptPartial { text }),
                Action::Finalize => {
                    self.stt.finalize();
                    Ok(())
                }
                Action::Interrupt { turn_id } => self.interrupt(turn_id).await,
                Action::EndOfTurn {
                    turn_id,
                    text,
                    end_of_speech,
                } => self.start_response(turn_id, text, end_of_speech),
            };
            if result.is_err() {
                break;
            }
        }
        self.actions = actions;
        result
    }

    fn start_response(
        &mut self,
        turn_id: u64,
        text: String,
        end_of_speech: Option<std::time::Instant>,
    ) -> Result<(), EndReason> {
        self.emit(ServerEvent::TranscriptFinal {
            turn_id,
            text: text.clone(),
        })?;
        self.history.push_user(&text);
        self.emit(ServerEvent::ResponseStarted { turn_id })?;
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
        let mut progress = Progress::default();
        progress.timings.end_of_speech = end_of_speech;
        progress.timings.end_of_turn = Some(Instant::now().into_std());
        let progress = Arc::new(Mutex::new(progress));
        let ctx = ResponseCtx {
            turn_id,
            llm: self.state.engines.llm.clone(),
            tts: self.state.engines.tts.clone(),
            request,
            voice: self.voice.clone(),
            out_rate: self.output.sample_rate,
            outbound: self.outbound.clone(),
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
        Ok(())
    }

    /// Barge-in or cancel: abort the reply at once and keep only what was spoken.
    async fn interrupt(&mut self, turn_id: u64) -> Result<(), EndReason> {
        let Some(active) = self.response.take_if(|r| r.turn_id == turn_id) else {
            return Ok(());
        };
        active.handle.abort();
        let _ = active.handle.await;
        self.emit(ServerEvent::ResponseInterrupted { turn_id })?;
        self.complete(turn_id, &active.progress, true)
    }

    fn on_response_finished(&mut self, turn_id: u64) -> Result<(), EndReason> {
        let Some(active) = self.response.take() else {
            return Ok(());
        };
        let mut out = Vec::new();
        self.turns
            .handle(Input::ResponseFinished { turn_id }, &mut out);
        debug_assert!(out.is_empty());
        let failed = lock(&active.progress).failure.clone();
        if let Some(f) = &failed {
            warn!(turn_id, code = f.code.as_str(), kind = f.label, detail = %f.detail, "reply failed");
            if f.code == ErrorCode::SlowConsumer {
                return Err(EndReason::SlowConsumer);
            }
            self.emit(ServerEvent::error(f.code, failure_message(f.code), false))?;
        }
        self.complete(turn_id, &active.progress, failed.is_some())
    }

    /// Records a finished or cut reply: history, usage, `response.done`.
    fn complete(
        &mut self,
        turn_id: u64,
        progress: &Mutex<Progress>,
        interrupted: bool,
    ) -> Result<(), EndReason> {
        let p = lock(progress);
        self.history.push_assistant(&p.spoken);
        self.usage.llm_input_tokens += p.llm_usage.input_tokens.unwrap_or(0)
            + p.llm_usage.cache_read_input_tokens.unwrap_or(0)
            + p.llm_usage.cache_creation_input_tokens.unwrap_or(0);
        self.usage.llm_output_tokens += p.llm_usage.output_tokens.unwrap_or(0);
        self.usage.tts_chars += p.tts_chars;
        let latency = breakdown(p.timings.latency());
        info!(turn_id, interrupted, spoken_chars = p.spoken.len(), latency_ms = ?latency, "reply done");
        drop(p);
        self.emit(ServerEvent::ResponseDone {
            turn_id,
            interrupted,
            latency_ms: latency,
        })?;
        self.emit(ServerEvent::Usage(self.usage.clone()))
    }

    /// Ends the session: stop the reply, close the recogniser, close the socket.
    async fn finish(&mut self, reason: EndReason) {
        if let Some(active) = self.response.take() {
            active.handle.abort();
            let _ = active.handle.await;
            let p = lock(&active.progress);
            self.history.push_assistant(&p.spoken);
        }
        self.stt.close();
        let (code, text) = match reason {
            EndReason::ClientEnded => (close::NORMAL, "session ended"),
            EndReason::Draining => {
                let _ = self.outbound.event(ServerEvent::SessionEnding {
                    reason: atlas_protocol::EndingReason::Draining,
                    seconds_left: 0,
                });
                (close::GOING_AWAY, "server draining")
            }
            EndReason::Policy => (close::POLICY, "policy violation"),
            EndReason::ProviderFailed => (close::INTERNAL, "provider unavailable"),
            EndReason::SlowConsumer | EndReason::Disconnected | EndReason::StartTimeout => {
                (close::POLICY, "connection closed")
            }
        };
        if !matches!(reason, EndReason::Disconnected | EndReason::SlowConsumer) {
            self.outbound.close(code, text).await;
        }
    }
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
