//! One client connection: the `session.start` handshake, then the session loop.
//!
//! # Layout
//! - `mod.rs`: the loop — client frames, recogniser events, reply completion, shutdown —
//!   feeding the sans-IO [`Turns`] machine and carrying out its actions.
//! - `response.rs`: one assistant reply's work (LLM → splitter → TTS → resampled speech for
//!   the machine's playout), its model requests in rounds when the model calls tools.
//! - `stt_link.rs`: the recogniser connection with buffering and reconnection.
//! - `turn_audio.rs`: the last seconds of the person's audio for the end-of-turn model, and
//!   its decisions (the `smart` turn policy).

pub mod response;
pub mod shared;
pub mod stt_link;
pub mod turn_audio;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use atlas_core::audio::{AudioClock, pcm_from_le_bytes, pcm_to_le_bytes};
use atlas_core::cost::{from_usd, to_usd};
use atlas_core::history::HistoryLimits;
use atlas_core::resample::StreamResampler;
use atlas_core::session::ledger::{LlmBill, ReportedTokens, SpendDelta};
use atlas_core::session::{
    Attaching, Closing, Config as MachineConfig, Event, Finish, Heard, Input, LeaseAnswer,
    MAX_FLOOD_SECONDS, MAX_INVALID_FRAMES, MAX_RECOGNISER_FAILURES, Output, ReplyFailure,
    ReplyOutcome, Session as Machine, TOKEN_HANDOVER_GRACE, ToolLog, ToolPolicy, TurnLog,
    VerifiedToken,
};
use atlas_core::splitter::SplitterConfig;
use atlas_core::timers::TimerConfig;
use atlas_core::tools::{CheckedCall, ToolCall, ToolKind};
use atlas_core::turns::TurnConfig;
use atlas_core::vocab::{ErrorCode, Limits};
use atlas_providers::llm::{LlmRequest, ToolChoice};
use atlas_providers::stt::{SttEvent, SttOptions};
use turn_audio::TurnAudio;

pub use atlas_core::session::EndReason;

use crate::auth::{Identity, seconds_until};
use crate::cluster::{Owned, ResumeState};
pub use crate::handoff::Connection;
use crate::metrics;
use crate::registry::{ResumeEntry, SessionPermit};
use crate::state::AppState;
use crate::transport::{Call, FromClient, Kind, Link, Start};
use response::{Channels, Control, Progress, ResponseCtx, Speech, ToolRound, lock};
use shared::{Answer, CLUSTER_QUEUE, ClusterOp, Shared, run_cluster_ops};
use stt_link::{LinkEvent, SttLink};

/// Pieces of a reply's speech waiting for the playout: with the playout's own buffer, how far
/// synthesis may run ahead.
const SPEECH_QUEUE: usize = 4;

/// What an upgraded connection is for.
pub enum Upgrade {
    /// A new session, already admitted, with its id (and, with scale-out, its ownership).
    New(SessionPermit, String, Option<Owned>),
    /// Resuming the session behind this entry (on this instance), with scale-out the claim
    /// to commit once the handshake is done.
    Resume(ResumeEntry, Option<Owned>),
    /// Continuing a session another instance owns (dropped, drained or crashed there): the
    /// claim, committed once the handshake is done.
    Adopt(SessionPermit, Owned),
}

/// A connection whose handshake is done joins its session: a new one (which runs here until
/// it ends), the session being resumed on this instance, or one another instance owned.
pub async fn serve(state: AppState, mut conn: Connection, upgrade: Upgrade) {
    match upgrade {
        Upgrade::New(permit, session_id, owned) => {
            run_session(state, conn, permit, session_id, owned, None).await
        }
        Upgrade::Adopt(permit, claim) => adopt(state, conn, permit, claim).await,
        Upgrade::Resume(entry, claim) => {
            conn.claim = claim;
            if let Err(mpsc::error::SendError(conn)) = entry.attach.send(conn).await {
                let mut link = conn.link;
                let _ = link.writer.event(Event::problem(
                    ErrorCode::ResumeFailed,
                    "the session has ended; start a new one",
                    true,
                ));
                link.writer
                    .close(Closing::Ended(EndReason::Disconnected))
                    .await;
            }
        }
    }
}

/// A connection that never completed its handshake gives back what admission gave it.
pub async fn abandon(state: &AppState, upgrade: Upgrade, reason: EndReason) {
    match (upgrade, &state.cluster) {
        (Upgrade::New(_, _, owned), cluster) => {
            metrics::session_ended(reason.label());
            if let (Some(cluster), Some(owned)) = (cluster, owned) {
                let _ = cluster.release(&owned).await;
            }
        }
        // The resume never completed: the session stays with its owner.
        (Upgrade::Adopt(_, claim) | Upgrade::Resume(_, Some(claim)), Some(cluster)) => {
            let _ = cluster.abandon(&claim).await;
        }
        _ => {}
    }
}

/// Continues a session another instance owns: commits the claim (the client's handshake is
/// done), then runs the session here from the state its owner published last.
async fn adopt(state: AppState, conn: Connection, permit: SessionPermit, claim: Owned) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    match cluster.commit(&claim).await {
        Ok(Some(Some(moved))) => {
            let session_id = moved.session_id.clone();
            run_session(state, conn, permit, session_id, Some(claim), Some(*moved)).await
        }
        outcome => {
            if let Err(e) = outcome {
                warn!(error = %e, "could not complete a resume's hand-over");
            }
            refuse_connection(
                &state.sessions,
                conn,
                ErrorCode::ResumeFailed,
                "this session was resumed by another connection or has ended",
                Closing::ResumeOvertaken,
            );
        }
    }
}

pub(crate) fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// A reply in flight.
struct ActiveResponse {
    turn_id: u64,
    handle: JoinHandle<()>,
    /// Cuts it (it stops at its next step, taking in what the model already sent).
    cut: tokio_util::sync::CancellationToken,
    progress: Arc<Mutex<Progress>>,
    /// Tells the reply what to say and its next request.
    control: mpsc::UnboundedSender<Control>,
    /// Its rounds that ended in tool calls.
    rounds: mpsc::Receiver<ToolRound>,
    /// Its model's words.
    text: mpsc::UnboundedReceiver<String>,
    /// Its speech, taken while the machine's playout wants it.
    speech: mpsc::Receiver<Speech>,
}

/// What a reply in flight reported.
enum ResponseEvent {
    /// It ended.
    Finished(u64),
    /// Its model asked for tools.
    Round(u64, ToolRound),
    /// Its model's words.
    Text(u64, String),
    /// Its speech.
    Speech(u64, Speech),
}

enum LinkInput {
    Client(FromClient),
    WriterGone,
}

/// The next thing from the attached connection; pending forever while detached.
async fn link_next(link: &mut Option<Link>) -> LinkInput {
    match link {
        None => std::future::pending().await,
        Some(l) => tokio::select! {
            m = l.reader.next() => LinkInput::Client(m),
            _ = l.writer.queue().closed() => LinkInput::WriterGone,
        },
    }
}

/// The driver of one session: owns its sockets, provider links, tasks and clock, feeds the
/// [`Machine`] and carries out what it decides.
struct Driver {
    state: AppState,
    machine: Machine,
    identity: Identity,
    permit: SessionPermit,
    /// A connection asking to attach, while the machine decides ([`Input::Attach`]), and
    /// whether it resumes.
    arriving: Option<(Connection, bool)>,
    /// Connections resuming this session.
    attach_rx: mpsc::Receiver<Connection>,
    link: Option<Link>,
    /// The client stopped reading; detach after the current step.
    link_broken: bool,
    voice: Option<String>,
    stt: SttLink,
    /// Maps input audio positions to capture times (at the client's input rate).
    clock: AudioClock,
    /// Converts client audio to the recogniser's rate when they differ.
    input_resampler: Option<StreamResampler>,
    /// The end-of-turn model's view of the audio (the `smart` turn policy).
    turn_audio: Option<TurnAudio>,
    response: Option<ActiveResponse>,
    /// Server tools running, by call id.
    tool_tasks: std::collections::HashMap<String, tokio::task::AbortHandle>,
    /// Tool calls ended, for the record.
    tool_records: Vec<atlas_store::ToolCallRecord>,
    /// The MCP server of each call to an MCP tool not yet recorded, by call id.
    mcp_servers: std::collections::HashMap<String, Arc<str>>,
    /// Tool calls traced when their turn ends.
    held_spans: crate::telemetry::HeldSpans,
    /// The trace of a session the sampler left out, carried when it moves (so the next
    /// instance leaves it out too).
    left_out_trace: Option<String>,
    /// Wall-clock start, for the record.
    started_wall: chrono::DateTime<chrono::Utc>,
    /// Completed turns, for the record.
    turn_records: Vec<atlas_store::TurnRecord>,
    conversation_id: Option<String>,
    client: Option<atlas_protocol::ClientInfo>,
    /// How the session was reached.
    kind: Kind,
    /// The phone call, when the session is one.
    call: Option<Call>,
    shared: Option<Shared>,
    answers_rx: mpsc::Receiver<Answer>,
    answers_tx: mpsc::Sender<Answer>,
    /// Reusable buffers for input resampling.
    scratch_in: Vec<i16>,
    scratch_out: Vec<i16>,
}

fn expiry_instant(exp: u64) -> std::time::Instant {
    // Clamped so that an absurd `exp` can never overflow the clock arithmetic.
    let secs = seconds_until(exp).min(10 * 365 * 86_400);
    Instant::now().into_std() + Duration::from_secs(secs)
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The machine's settings from the server's configuration.
pub fn machine_config(state: &AppState) -> MachineConfig {
    let c = &state.config;
    let budget = (c.session_budget_usd > 0.0).then(|| from_usd(c.session_budget_usd));
    MachineConfig {
        timers: TimerConfig {
            heartbeat_interval: Duration::from_secs(c.heartbeat_interval_s),
            heartbeat_timeout: Duration::from_secs(c.heartbeat_timeout_s),
            idle_timeout: Duration::from_secs(c.idle_timeout_s),
            max_duration: Duration::from_secs(c.max_duration_s),
            max_duration_warning: Duration::from_secs(c.max_duration_warning_s),
            token_grace: Duration::from_secs(c.token_grace_s),
            resume_window: Duration::from_secs(c.resume_window_s),
        },
        turns: turn_config(state),
        history: HistoryLimits {
            max_messages: c.history_max_messages,
            max_chars: c.history_max_chars,
        },
        prices: state.prices,
        session_budget: budget,
        budget_warn_fraction: c.budget_warn_fraction,
        daily_budget: c.user_daily_budget_usd.map(from_usd),
        chunk_min_bytes: c.audio_chunk_min_bytes,
        chunk_max_bytes: c.audio_chunk_max_bytes,
        max_frames_per_s: c.max_frames_per_s,
        max_invalid_frames: MAX_INVALID_FRAMES,
        max_flood_seconds: MAX_FLOOD_SECONDS,
        max_recogniser_failures: MAX_RECOGNISER_FAILURES,
        recogniser_batch: Duration::from_millis(c.stt_batch_ms),
        system_prompt_chars: c.system_prompt.len(),
        llm_max_tokens: c.llm_max_tokens,
        playout_lead: Duration::from_millis(c.playback_lead_ms),
        checkpoint_interval: Duration::from_secs(c.checkpoint_interval_s),
        token_handover_grace: TOKEN_HANDOVER_GRACE,
        lease_ttl: state.cluster.as_ref().map(|c| c.lease_ttl()),
        tools: state.tools.as_ref().map(|_| ToolPolicy {
            max_calls_per_turn: c.tool_max_calls_per_turn,
            acknowledgement: Some(c.tool_acknowledgement.trim().to_owned())
                .filter(|a| !a.is_empty()),
            record_content: c.tool_record_content,
            max_result_bytes: c.tool_max_result_bytes,
        }),
        limits: Limits {
            max_duration_s: c.max_duration_s,
            budget_usd: budget.map(to_usd),
            idle_timeout_s: c.idle_timeout_s,
            resume_window_s: c.resume_window_s,
        },
    }
}

async fn run_session(
    state: AppState,
    first: Connection,
    permit: SessionPermit,
    session_id: String,
    owned: Option<Owned>,
    moved: Option<ResumeState>,
) {
    // A session moved from another instance continues its own trace; a new one, the
    // client's.
    let parent = moved
        .as_ref()
        .and_then(|m| m.trace.as_deref())
        .or(first.start.traceparent.as_deref());
    let crate::telemetry::SessionSpan { span, left_out } =
        crate::telemetry::session_span(&session_id, parent);
    async move {
        let resumed = moved.is_some();
        let mut driver = Driver::new(&state, session_id, &first, permit, owned, moved);
        driver.left_out_trace = left_out;
        info!(user_id = %driver.identity.user_id, resumed, "session started");
        crate::telemetry::identify(
            &tracing::Span::current(),
            &driver.identity.user_id,
            state.config.trace_content,
        );
        let finish = match driver.attach(first, resumed).await {
            Ok(()) => driver.run().await,
            Err(f) => f,
        };
        driver.finish(finish).await;
        info!(
            reason = finish.reason.label(),
            turns = driver.machine.last_turn(),
            "session ended"
        );
    }
    .instrument(span)
    .await
}

impl Driver {
    fn new(
        state: &AppState,
        id: String,
        first: &Connection,
        permit: SessionPermit,
        owned: Option<Owned>,
        moved: Option<ResumeState>,
    ) -> Self {
        let carried = moved.as_ref().map(|m| {
            // The session keeps its age: moving never extends the maximum duration.
            let age = (chrono::Utc::now() - m.started_wall)
                .to_std()
                .unwrap_or_default();
            (m.carried.clone(), age)
        });
        let machine = Machine::new(id.clone(), machine_config(state), now(), carried);
        let (attach_tx, attach_rx) = mpsc::channel(4);
        let (answers_tx, answers_rx) = mpsc::channel(CLUSTER_QUEUE);
        let shared = match (&state.cluster, owned) {
            (Some(cluster), Some(owned)) => {
                let owned = Arc::new(Mutex::new(owned));
                let (ops, ops_rx) = mpsc::channel(CLUSTER_QUEUE);
                let writer = state.sessions.spawn(
                    run_cluster_ops(cluster.clone(), owned.clone(), ops_rx, answers_tx.clone())
                        .in_current_span(),
                );
                Some(Shared {
                    cluster: cluster.clone(),
                    owned,
                    ops,
                    writer,
                })
            }
            _ => None,
        };
        state.registry.register_session(
            &id,
            ResumeEntry {
                session_id: id.clone(),
                user_id: first.identity.user_id.clone(),
                attach: attach_tx,
            },
        );
        let mut driver = Driver {
            state: state.clone(),
            machine,
            identity: first.identity.clone(),
            permit,
            attach_rx,
            link: None,
            link_broken: false,
            arriving: None,
            voice: None,
            stt: SttLink::new(
                state.engines.stt.clone(),
                SttOptions {
                    sample_rate: 16_000,
                    language: None,
                },
            ),
            clock: AudioClock::new(16_000, 600),
            input_resampler: None,
            turn_audio: None,
            response: None,
            tool_tasks: std::collections::HashMap::new(),
            tool_records: Vec::new(),
            mcp_servers: std::collections::HashMap::new(),
            held_spans: crate::telemetry::HeldSpans::default(),
            left_out_trace: None,
            started_wall: chrono::Utc::now(),
            turn_records: Vec::new(),
            conversation_id: first.start.conversation_id.clone(),
            client: first.start.client.clone(),
            kind: first.start.kind,
            call: first.start.call.clone(),
            shared,
            answers_rx,
            answers_tx,
            scratch_in: Vec::new(),
            scratch_out: Vec::new(),
        };
        if let Some(m) = moved {
            driver.started_wall = m.started_wall;
            driver.turn_records = m.turn_records;
            driver.tool_records = m.tool_records;
            driver.conversation_id = m.conversation_id;
            driver.client = m.client;
        }
        // The machine learns the user's spend today (the shared counter answers through the
        // session's write queue).
        match &driver.shared {
            Some(shared) => {
                let _ = shared.ops.try_send(ClusterOp::Spend(0));
            }
            None => {
                let today = driver.state.registry.spent_today(&driver.identity.user_id);
                driver.machine.handle(Input::DailySpent(today), now());
            }
        }
        driver
    }

    /// What another instance needs to continue this session.
    fn resume_state(&self) -> ResumeState {
        ResumeState {
            session_id: self.machine.id().to_owned(),
            user_id: self.identity.user_id.clone(),
            started_wall: self.started_wall,
            carried: self.machine.carried(),
            turn_records: self.turn_records.clone(),
            tool_records: self.tool_records.clone(),
            conversation_id: self.conversation_id.clone(),
            client: self.client.clone(),
            trace: crate::telemetry::traceparent(&tracing::Span::current())
                .or_else(|| self.left_out_trace.clone()),
        }
    }

    /// Sets up audio for a connection's `session.start` (a resume may change formats).
    fn configure_media(&mut self, start: &Start) {
        self.stt.close();
        self.unbill_dropped_audio();
        let config = &self.state.config;
        let client_rate = start.input.sample_rate;
        let stt_rate = self.state.engines.stt.input_rate(client_rate);
        self.input_resampler = (stt_rate != client_rate)
            .then(|| StreamResampler::new(client_rate, stt_rate).ok())
            .flatten();
        let forwarded_rate = if self.input_resampler.is_some() {
            stt_rate
        } else {
            client_rate
        };
        self.turn_audio = self.state.engines.turn.clone().map(|model| {
            let pause_s = f64::from(config.turn_pause_ms) / 1000.0;
            TurnAudio::new(model, forwarded_rate, pause_s)
        });
        self.stt = SttLink::new(
            self.state.engines.stt.clone(),
            SttOptions {
                sample_rate: forwarded_rate,
                language: start
                    .language
                    .clone()
                    .or_else(|| config.stt_language.clone()),
            },
        );
        self.clock = AudioClock::new(client_rate, 600);
        self.voice = start.voice.clone();
    }

    /// Attaches a connection (the first, or a resume), replacing any still attached. With
    /// scale-out, the ownership claimed for it is confirmed first: a connection whose claim
    /// was overtaken by a later one is refused.
    async fn attach(&mut self, conn: Connection, resumed: bool) -> Result<(), Finish> {
        let mut overtaken = false;
        if resumed
            && let Some(shared) = &self.shared
            && let Some(claim) = &conn.claim
        {
            // The client's handshake is done: the hand-over completes now, or this connection
            // lost to a later claim (or the store cannot say).
            let committed = match shared.cluster.commit_here(claim).await {
                Ok(committed) => committed,
                Err(e) => {
                    warn!(error = %e, "could not complete a resume's hand-over");
                    false
                }
            };
            if committed {
                let mut owned = shared.owned.lock().unwrap_or_else(|e| e.into_inner());
                owned.epoch = owned.epoch.max(claim.epoch);
            }
            overtaken = !committed;
        }
        let input = Input::Attach(Attaching {
            resumed,
            overtaken,
            user_id: conn.identity.user_id.clone(),
            token: new_resume_token(),
            token_expiry: expiry_instant(conn.identity.expires_at),
            input: conn.start.input,
            output: conn.start.output,
        });
        self.arriving = Some((conn, resumed));
        self.feed(input).await;
        // The recogniser connection opens with the first audio frame (buffered meanwhile), so
        // idle sessions hold no provider connection.
        let finish = self.drain_outputs().await;
        debug_assert!(self.arriving.is_none(), "the machine attaches or refuses");
        match finish {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    /// Carries out [`Output::AttachConnection`]: the arriving connection becomes the link.
    fn attach_arriving(&mut self) {
        let Some((conn, resumed)) = self.arriving.take() else {
            return;
        };
        self.configure_media(&conn.start);
        self.identity = conn.identity;
        self.link = Some(conn.link);
        self.link_broken = false;
        self.permit.set_detached(false);
        if resumed {
            metrics::resumed();
            info!(turns = self.machine.last_turn(), "session resumed");
        }
    }

    /// Feeds the machine one input, now.
    async fn feed(&mut self, input: Input<'_>) {
        self.machine.handle(input, now());
    }

    /// The connection is gone: tell the machine (which cuts the reply and starts the resume
    /// window).
    async fn detach(&mut self, why: &'static str) {
        let Some(link) = self.link.take() else {
            return;
        };
        info!(why, "connection lost; waiting for a resume");
        // The writer drains what is queued (a close frame, say) and stops by itself once
        // every sender is gone; a dead socket ends it through the send timeout.
        drop(link.writer);
        drop(link.task);
        self.permit.set_detached(true);
        self.machine.handle(Input::Detach, now());
    }

    async fn run(&mut self) -> Finish {
        let shutdown = self.state.shutdown.clone();
        // The loop runs once per audio frame: its timer and the shutdown wait are created once
        // and only reset when the deadline moves, instead of registering new ones per frame.
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        let far = || Instant::now() + Duration::from_secs(86_400);
        let timer = tokio::time::sleep_until(far());
        tokio::pin!(timer);
        loop {
            self.pull_speech();
            if let Some(finish) = self.drain_outputs().await {
                return finish;
            }
            if std::mem::take(&mut self.link_broken) {
                warn!("client queue full; dropping the connection");
                self.detach("slow consumer").await;
                continue;
            }
            // Only an earlier deadline needs a reset: a later one (activity postponing the idle
            // timeout on every frame) is caught when the timer fires early and finds nothing due.
            let deadline = self
                .machine
                .poll_timeout()
                .map_or_else(far, Instant::from_std);
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
            // Polled in this order (not at random): a wake-up is almost always the client's
            // next audio frame, and each branch polled before the ready one costs a channel
            // check and a waker registration, 50 times a second per session. A client that
            // floods its own connection can only delay its own session's other events, and
            // the frame-rate limit ends that.
            tokio::select! {
                biased;
                _ = &mut cancelled, if !self.machine.is_ended() => self.feed(Input::Shutdown).await,
                input = link_next(&mut self.link) => match input {
                    LinkInput::Client(FromClient::Closed(why)) => self.detach(why).await,
                    LinkInput::Client(m) => self.on_client(m).await,
                    LinkInput::WriterGone => self.detach("client stopped reading").await,
                },
                Some(conn) = self.attach_rx.recv() => {
                    if let Err(finish) = self.attach(conn, true).await {
                        return finish;
                    }
                }
                event = self.stt.next() => self.on_stt(event).await,
                event = response_event(&mut self.response, self.machine.wants_reply_audio()) => match event {
                    ResponseEvent::Finished(turn_id) => self.on_response_finished(turn_id).await,
                    ResponseEvent::Round(turn_id, round) => self.on_tool_round(turn_id, round),
                    ResponseEvent::Text(turn_id, text) => {
                        self.machine.handle(Input::ReplyText { turn_id, text }, now());
                    }
                    ResponseEvent::Speech(turn_id, speech) => self.on_speech(turn_id, speech),
                },
                Some(answer) = self.answers_rx.recv() => self.on_answer(answer).await,
                _ = &mut timer => {
                    self.machine.handle_timeout(now());
                    // Never spin on a deadline that did not move.
                    let next = self
                        .machine
                        .poll_timeout()
                        .map_or_else(far, Instant::from_std)
                        .max(Instant::now() + Duration::from_millis(10));
                    timer.as_mut().reset(next);
                }
            }
        }
    }

    async fn on_answer(&mut self, answer: Answer) {
        let input = match answer {
            Answer::Lease(answer, sent_at) => Input::Lease { answer, sent_at },
            Answer::DailySpent(total) => {
                // The local cache the admission check reads.
                self.state
                    .registry
                    .set_spent_today(&self.identity.user_id, total);
                Input::DailySpent(total)
            }
            Answer::Stale => {
                info!("another claim owns the session now");
                Input::OwnershipLost
            }
            Answer::TokenRefreshed(Ok(identity)) => Input::TokenRefreshed(Ok(VerifiedToken {
                expiry: expiry_instant(identity.expires_at),
                user_id: identity.user_id,
            })),
            Answer::TokenRefreshed(Err(message)) => Input::TokenRefreshed(Err(message)),
            Answer::TurnScored(pause, Some(probability)) => {
                Input::TurnScored { pause, probability }
            }
            Answer::TurnScored(pause, None) => Input::TurnUnjudged { pause },
            Answer::ToolFinished(call_id, result) => {
                if self.tool_tasks.remove(&call_id).is_none() {
                    // Cancelled meanwhile.
                    return;
                }
                Input::ToolFinished { call_id, result }
            }
        };
        self.feed(input).await;
    }

    /// Carries out everything the machine decided; returns the finish once it is over.
    async fn drain_outputs(&mut self) -> Option<Finish> {
        while let Some(output) = self.machine.poll_output() {
            match output {
                Output::Event(event) => {
                    if let (Some(ear), Event::Heard { .. }) = (&mut self.turn_audio, &event) {
                        ear.turn_ended();
                    }
                    self.emit(event)
                }
                Output::Audio { turn_id, pcm } => {
                    let rate = self.machine.output_format().sample_rate;
                    if let Some(link) = &mut self.link
                        && link.writer.audio(turn_id, pcm, rate).is_err()
                    {
                        self.link_broken = true;
                    }
                }
                Output::Ping => {
                    if let Some(link) = &self.link
                        && link.writer.ping().is_err()
                    {
                        self.link_broken = true;
                    }
                }
                Output::VerifyToken(token) => {
                    // Verified off the loop (a key fetch must not stall audio).
                    let (auth, answers) = (self.state.clone(), self.answers_tx.clone());
                    self.state.sessions.spawn(
                        async move {
                            let result = auth.auth.verify(&token).await.map_err(|e| e.to_string());
                            let _ = answers.send(Answer::TokenRefreshed(result)).await;
                        }
                        .in_current_span(),
                    );
                }
                Output::Forward { pcm, hold } => self.forward_audio(pcm, hold),
                Output::SendHeld => {
                    self.stt.send_held();
                    self.unbill_dropped_audio();
                }
                Output::Rejected(reason) => metrics::chunk_rejected(reason),
                Output::Finalize => self.stt.finalize(),
                Output::ScoreTurn { pause } => {
                    if let Some(ear) = &mut self.turn_audio {
                        ear.score(pause, &self.answers_tx);
                    }
                }
                Output::CloseRecogniser => {
                    self.stt.close();
                    self.unbill_dropped_audio();
                }
                Output::StartReply {
                    turn_id,
                    end_of_speech,
                } => self.start_response(turn_id, end_of_speech),
                Output::AbortReply { turn_id } => self.abort_response(turn_id).await,
                Output::DraftSettled { kept } => metrics::preemptive_reply(kept),
                Output::CallTool {
                    turn_id,
                    call,
                    kind,
                    timeout,
                } => self.call_tool(turn_id, call, kind, timeout),
                Output::CancelTool {
                    call_id,
                    kind,
                    reason,
                } => match kind {
                    ToolKind::Server => {
                        if let Some(task) = self.tool_tasks.remove(&call_id) {
                            task.abort();
                        }
                    }
                    ToolKind::Client => self.emit(Event::ToolCancelled { call_id, reason }),
                },
                Output::Acknowledge { turn_id, text } => {
                    self.control_reply(turn_id, Control::Say(text));
                }
                Output::ContinueReply {
                    turn_id,
                    tools_allowed,
                } => {
                    let choice = if tools_allowed {
                        ToolChoice::Auto
                    } else {
                        ToolChoice::None
                    };
                    let request = self.llm_request(choice);
                    self.control_reply(turn_id, Control::Continue(request));
                }
                Output::ToolLog(log) => self.record_tool_call(log),
                Output::Turn(log) => self.record_turn(log),
                Output::Spend(delta) => self.spend(delta),
                Output::Checkpoint => self.state.recorder.submit(self.snapshot(None)),
                Output::Publish => {
                    let state = Box::new(self.resume_state());
                    self.cluster_op(ClusterOp::Publish(state));
                }
                Output::RefreshLease => {
                    let sent_at = now();
                    if !self.cluster_op(ClusterOp::Refresh(sent_at)) {
                        self.machine.handle(
                            Input::Lease {
                                answer: LeaseAnswer::Unreachable,
                                sent_at,
                            },
                            now(),
                        );
                    }
                }
                Output::RegisterToken(token) => {
                    if self.shared.is_some() {
                        self.cluster_op(ClusterOp::RegisterToken(token));
                    } else {
                        self.state
                            .registry
                            .register_token(&token, self.machine.id());
                    }
                }
                Output::RetireToken(token) => {
                    if self.shared.is_some() {
                        self.cluster_op(ClusterOp::RetireToken(token));
                    } else {
                        self.state.registry.remove_token(&token);
                    }
                }
                Output::CloseConnection(closing) => {
                    if let Some(link) = self.link.take() {
                        info!(?closing, "closing the attached connection");
                        // Closed off the loop: a connection that stopped reading holds
                        // nothing up.
                        self.state.sessions.spawn(async move {
                            link.writer.close(closing).await;
                        });
                        self.permit.set_detached(true);
                    }
                }
                Output::AttachConnection => self.attach_arriving(),
                Output::RefuseConnection {
                    code,
                    message,
                    closing,
                } => {
                    if let Some((conn, _)) = self.arriving.take() {
                        info!(?closing, "refusing a resumed connection");
                        refuse_connection(&self.state.sessions, conn, code, message, closing);
                    }
                }
                Output::Finish(finish) => return Some(finish),
            }
        }
        None
    }

    /// Queues a shared-store write; false when there is no room (or no shared store).
    fn cluster_op(&self, op: ClusterOp) -> bool {
        match &self.shared {
            Some(shared) => match shared.ops.try_send(op) {
                Ok(()) => true,
                Err(_) => {
                    warn!("shared-store write queue full; write dropped");
                    false
                }
            },
            None => false,
        }
    }

    fn spend(&mut self, delta: SpendDelta) {
        for (stage, micros) in [("stt", delta.stt), ("llm", delta.llm), ("tts", delta.tts)] {
            if micros > 0 {
                metrics::spend(stage, micros);
            }
        }
        if delta.daily == 0 {
            return;
        }
        if self.shared.is_some() {
            // Across instances: the total comes back from Redis.
            if !self.cluster_op(ClusterOp::Spend(delta.daily)) {
                self.state
                    .registry
                    .add_spend(&self.identity.user_id, delta.daily);
            }
        } else {
            let user = &self.identity.user_id;
            self.state.registry.add_spend(user, delta.daily);
            let today = self.state.registry.spent_today(user);
            self.machine.handle(Input::DailySpent(today), now());
        }
    }

    /// Sends an event to the attached client, if any; a full queue marks a slow consumer.
    fn emit(&mut self, event: Event) {
        if let Some(link) = &mut self.link
            && link.writer.event(event).is_err()
        {
            self.link_broken = true;
        }
    }

    async fn on_client(&mut self, msg: FromClient) {
        let input = match msg {
            FromClient::Audio(pcm) => Input::Audio(pcm),
            FromClient::Commit => Input::Commit,
            FromClient::Cancel => Input::Cancel,
            FromClient::Text(text) => return self.feed(Input::Text(&text)).await,
            FromClient::Ping(id) => Input::Ping(id),
            FromClient::StartAgain => Input::StartAgain,
            FromClient::End => Input::End,
            FromClient::ToolResult { call_id, result } => {
                return self
                    .feed(Input::ToolResult {
                        call_id: &call_id,
                        result,
                    })
                    .await;
            }
            FromClient::Refresh(token) => Input::Refresh(token),
            FromClient::Invalid(code, message) => Input::Invalid(code, message),
            FromClient::Pong => Input::Pong,
            FromClient::Digit(digit) => Input::Digit(digit),
            FromClient::Played { turn_id, offset } => Input::Played { turn_id, offset },
            FromClient::Nothing => return,
            FromClient::Closed(why) => return self.detach(why).await,
        };
        self.feed(input).await;
    }

    fn forward_audio(&mut self, pcm: Bytes, hold: bool) {
        metrics::AUDIO.frames_in.increment(1);
        metrics::AUDIO.bytes_in.increment(pcm.len() as u64);
        let position_s = self.clock.total_seconds();
        self.clock.push(pcm.len() / 2, now());
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
            if let Some(ear) = &mut self.turn_audio {
                ear.push(&forwarded);
            }
            self.stt.send_audio(forwarded, position_s, hold);
        }
        self.unbill_dropped_audio();
    }

    /// Audio the recogniser link dropped comes off the bill (the provider never got it).
    fn unbill_dropped_audio(&mut self) {
        let seconds = self.stt.take_dropped_seconds();
        if seconds > 0.0 {
            self.machine
                .handle(Input::RecognitionDropped { seconds }, now());
        }
    }

    async fn on_stt(&mut self, event: LinkEvent) {
        // Audio held while connecting may have overflowed.
        self.unbill_dropped_audio();
        match event {
            LinkEvent::Event(event) => {
                let at = |s: Option<f64>| s.and_then(|s| self.clock.instant_at(s));
                if let Some(ear) = &mut self.turn_audio {
                    match event {
                        SttEvent::Final {
                            speech_end_s: Some(end),
                            ..
                        }
                        | SttEvent::UtteranceEnd {
                            last_word_end_s: Some(end),
                        }
                        | SttEvent::SpeechEnded { at_s: Some(end) } => ear.speech_ended(end),
                        SttEvent::SpeechStarted { at_s } => {
                            ear.speech_started(at_s.unwrap_or_else(|| self.clock.total_seconds()))
                        }
                        _ => {}
                    }
                }
                let heard = match &event {
                    SttEvent::Partial { text } => Heard::Partial(text),
                    SttEvent::Final {
                        text,
                        speech_final,
                        speech_end_s,
                        ..
                    } => Heard::Final {
                        text,
                        speech_final: *speech_final,
                        end_of_speech: at(*speech_end_s),
                    },
                    SttEvent::UtteranceEnd { last_word_end_s } => Heard::UtteranceEnd {
                        end_of_speech: at(*last_word_end_s),
                    },
                    SttEvent::SpeechStarted { .. } => Heard::SpeechStarted,
                    SttEvent::SpeechEnded { at_s } => Heard::SpeechEnded {
                        end_of_speech: at(*at_s),
                    },
                };
                self.machine.handle(Input::Heard(heard), now());
            }
            LinkEvent::Lost(e) => {
                metrics::provider_error("stt", e.label());
                warn!(error = %e, kind = e.label(), failures = self.stt.failures(), "speech recognition connection lost");
                let input = Input::RecogniserLost {
                    busy: e.is_busy(),
                    failures: self.stt.failures(),
                };
                self.feed(input).await;
            }
        }
    }

    /// The model request for the conversation so far.
    fn llm_request(&self, tool_choice: ToolChoice) -> LlmRequest {
        let config = &self.state.config;
        LlmRequest {
            system: config.system_prompt.clone(),
            messages: self.machine.prompt(),
            max_tokens: config.llm_max_tokens,
            temperature: None,
            tools: self
                .state
                .tools
                .as_ref()
                .map(|t| t.specs())
                .unwrap_or_default(),
            tool_choice,
        }
    }

    fn start_response(&mut self, turn_id: u64, end_of_speech: Option<std::time::Instant>) {
        if self.link.is_none() {
            return;
        }
        let request = self.llm_request(ToolChoice::Auto);
        let config = &self.state.config;
        let mut progress = Progress {
            prompt_chars: response::prompt_chars(&request),
            traces: crate::telemetry::traced().then(Vec::new),
            ..Progress::default()
        };
        progress.timings.end_of_speech = end_of_speech;
        progress.timings.end_of_turn = Some(now());
        let progress = Arc::new(Mutex::new(progress));
        let ctx = ResponseCtx {
            turn_id,
            llm: self.state.engines.llm.clone(),
            tts: self.state.engines.tts.clone(),
            request,
            voice: self.voice.clone(),
            out_rate: self.machine.output_format().sample_rate,
            prefetch: config.tts_prefetch,
            splitter: SplitterConfig {
                eager_words: config.eager_first_words,
                eager_after: (config.eager_first_ms > 0)
                    .then(|| Duration::from_millis(config.eager_first_ms)),
                ..SplitterConfig::default()
            },
        };
        let (control_tx, control) = mpsc::unbounded_channel();
        let (rounds_tx, rounds) = mpsc::channel(1);
        // Unbounded, so that reading the model's stream never waits for the loop: a provider
        // bills what it generated, and text left unread when a reply is cut would be billed
        // by the provider and not by the ledger. A reply's text is bounded by its token cap.
        let (text_tx, text) = mpsc::unbounded_channel();
        let (speech_tx, speech) = mpsc::channel(SPEECH_QUEUE);
        let cut = tokio_util::sync::CancellationToken::new();
        let channels = Channels {
            control,
            rounds: rounds_tx,
            text: text_tx,
            speech: speech_tx,
            cut: cut.clone(),
        };
        let handle = self
            .state
            .sessions
            .spawn(response::run(ctx, progress.clone(), channels).in_current_span());
        self.response = Some(ActiveResponse {
            turn_id,
            handle,
            cut,
            progress,
            control: control_tx,
            rounds,
            text,
            speech,
        });
    }

    /// Hands the playout the speech already waiting, as long as it wants more: in the same
    /// wake-up that sent a piece, not one wake-up per chunk.
    fn pull_speech(&mut self) {
        while self.machine.wants_reply_audio() {
            let Some(active) = &mut self.response else {
                return;
            };
            let turn_id = active.turn_id;
            let Ok(speech) = active.speech.try_recv() else {
                return;
            };
            self.on_speech(turn_id, speech);
        }
    }

    /// A reply's speech reaches the machine's playout.
    fn on_speech(&mut self, turn_id: u64, speech: Speech) {
        let now = now();
        match speech {
            Speech::Audio(pcm) => self
                .machine
                .handle(Input::ReplyAudio { turn_id, pcm: &pcm }, now),
            Speech::Sentence { round, text } => self.machine.handle(
                Input::ReplySentence {
                    turn_id,
                    round,
                    text,
                },
                now,
            ),
        }
    }

    fn control_reply(&mut self, turn_id: u64, control: Control) {
        if let Some(active) = self.response.as_ref().filter(|r| r.turn_id == turn_id) {
            // A reply that already ended has nothing more to say.
            let _ = active.control.send(control);
        }
    }

    /// The model asked for tools: check each call against the declared tools, then let the
    /// machine decide.
    fn on_tool_round(&mut self, turn_id: u64, round: ToolRound) {
        let calls: Vec<CheckedCall> = round
            .calls
            .into_iter()
            .map(|call| match &self.state.tools {
                Some(tools) => tools.check(call),
                None => CheckedCall {
                    call,
                    verdict: Err("no tools are available".into()),
                },
            })
            .collect();
        let llm = LlmBill {
            billable: true,
            finished: round.finished,
            prompt_chars: round.prompt_chars,
            generated_chars: round.text.len(),
            reported: reported_tokens(&round.usage),
        };
        self.machine.handle(
            Input::ToolCalls {
                turn_id,
                text: round.text,
                calls,
                llm,
            },
            now(),
        );
    }

    /// Runs a call the machine started: a server tool's webhook on a task of its own, or
    /// `tool.call` to the client.
    fn call_tool(&mut self, turn_id: u64, call: ToolCall, kind: ToolKind, timeout: Duration) {
        match kind {
            ToolKind::Client => {
                self.emit(Event::ToolCall {
                    turn_id,
                    call_id: call.id,
                    name: call.name,
                    arguments: call.arguments,
                    timeout,
                });
            }
            ToolKind::Server => {
                let Some(tools) = self.state.tools.clone() else {
                    return;
                };
                let answers = self.answers_tx.clone();
                let session_id = self.machine.id().to_owned();
                let user_id = self.identity.user_id.clone();
                let call_id = call.id.clone();
                if let Some(server) = tools.mcp_server_of(&call.name) {
                    self.mcp_servers.insert(call_id.clone(), server);
                }
                let task = self.state.sessions.spawn(
                    async move {
                        // The machine cancels the call at its deadline; this bound only keeps
                        // a lost cancel from leaking the task.
                        let result = tokio::time::timeout(
                            timeout + Duration::from_secs(1),
                            tools.call_server(&call, &session_id, &user_id),
                        )
                        .await
                        .unwrap_or_else(|_| Err("the tool did not answer in time".into()));
                        let _ = answers.send(Answer::ToolFinished(call.id, result)).await;
                    }
                    .in_current_span(),
                );
                self.tool_tasks.insert(call_id, task.abort_handle());
            }
        }
    }

    /// Barge-in, cancel, detach or end: cut the reply at once and report what it achieved.
    async fn abort_response(&mut self, turn_id: u64) {
        let Some(mut active) = self.response.take_if(|r| r.turn_id == turn_id) else {
            // Never started (no connection): nothing was spent.
            let outcome = outcome_of(turn_id, &Progress::default());
            self.machine.handle(Input::ReplyEnded(outcome), now());
            return;
        };
        active.cut.cancel();
        let _ = (&mut active.handle).await;
        // A round the loop had not taken yet is still the reply's to pay.
        while let Ok(round) = active.rounds.try_recv() {
            response::unreported(&active.progress, round);
        }
        let outcome = self.settle(turn_id, &active.progress);
        self.machine.handle(Input::ReplyEnded(outcome), now());
    }

    async fn on_response_finished(&mut self, turn_id: u64) {
        let Some(mut active) = self.response.take() else {
            return;
        };
        // What it handed over before it ended reaches the machine first.
        while let Ok(text) = active.text.try_recv() {
            self.machine
                .handle(Input::ReplyText { turn_id, text }, now());
        }
        while let Ok(speech) = active.speech.try_recv() {
            self.on_speech(turn_id, speech);
        }
        let outcome = self.settle(turn_id, &active.progress);
        if let Some(f) = &lock(&active.progress).failure {
            warn!(turn_id, code = f.code.as_str(), kind = f.label, detail = %f.detail, "reply failed");
            metrics::provider_error(
                if f.code == ErrorCode::LlmFailed {
                    "llm"
                } else {
                    "tts"
                },
                f.label,
            );
        }
        self.feed(Input::ReplyEnded(outcome)).await;
    }

    /// What a reply achieved: its bill is closed here, so a synthesis request not issued yet
    /// is never issued (see `response::synthesize`); its requests' spans wait for its turn's.
    fn settle(&mut self, turn_id: u64, progress: &Mutex<Progress>) -> ReplyOutcome {
        let mut p = lock(progress);
        p.settled = true;
        if let Some(requests) = p.traces.take() {
            self.held_spans.requests(turn_id, requests);
        }
        outcome_of(turn_id, &p)
    }

    fn record_turn(&mut self, log: TurnLog) {
        metrics::turn(log.outcome);
        for (stage, ms) in log.latency.stages() {
            if let Some(d) = ms {
                metrics::stage_latency(stage, d);
            }
        }
        info!(turn_id = log.turn_id, outcome = log.outcome, spoken_chars = log.assistant_text.len(), latency = ?log.latency, "turn done");
        let llm = &self.state.engines.llm;
        let content = self.state.config.trace_content;
        crate::telemetry::turn_spans(
            &log,
            (llm.provider(), llm.model()),
            content,
            &mut self.held_spans,
        );
        let ms = |d: Option<Duration>| d.and_then(|d| i32::try_from(d.as_millis()).ok());
        self.turn_records.push(atlas_store::TurnRecord {
            session_id: self.record_id(),
            turn_index: i32::try_from(log.turn_id).unwrap_or(i32::MAX),
            user_id: self.identity.user_id.clone(),
            user_text: log.user_text,
            assistant_text: log.assistant_text,
            interrupted: log.interrupted,
            eos_to_final_ms: ms(log.latency.end_of_speech_to_final),
            llm_first_token_ms: ms(log.latency.llm_first_token),
            tts_first_audio_ms: ms(log.latency.tts_first_audio),
            to_first_audio_ms: ms(log.latency.to_first_audio),
            tools_ms: ms(log.latency.tools),
            created_at: chrono::Utc::now(),
        });
    }

    fn record_tool_call(&mut self, log: ToolLog) {
        let kind = log.kind.map(ToolKind::label);
        metrics::tool_call(kind.unwrap_or("none"), log.outcome.label(), log.duration);
        info!(turn_id = log.turn_id, tool = %truncate(&log.name, 64), outcome = log.outcome.label(), duration_ms = log.duration.as_millis() as u64, "tool call");
        let mcp_server = self.mcp_servers.remove(&log.call_id).map(|s| s.to_string());
        crate::telemetry::tool_span(&log, mcp_server.as_deref(), &mut self.held_spans);
        self.tool_records.push(atlas_store::ToolCallRecord {
            session_id: self.record_id(),
            turn_index: i32::try_from(log.turn_id).unwrap_or(i32::MAX),
            call_id: log.call_id,
            user_id: self.identity.user_id.clone(),
            name: truncate(&log.name, 64),
            kind: kind.map(str::to_owned),
            mcp_server,
            arguments_bytes: i32::try_from(log.arguments_bytes).unwrap_or(i32::MAX),
            duration_ms: i32::try_from(log.duration.as_millis()).unwrap_or(i32::MAX),
            outcome: log.outcome.label().to_owned(),
            arguments: log.arguments,
            result: log.result,
            created_at: chrono::Utc::now(),
        });
    }

    /// A caller's number as recorded: masked to its last four digits unless the operator
    /// records numbers in full.
    fn recorded_caller(&self, caller: &str) -> String {
        if self.state.config.twilio_record_caller {
            caller.to_owned()
        } else {
            crate::transport::twilio::mask_number(caller)
        }
    }

    fn record_id(&self) -> uuid::Uuid {
        uuid::Uuid::parse_str(self.machine.id()).unwrap_or_default()
    }

    /// The session's record as it stands (`ended`: the final one).
    fn snapshot(&self, ended: Option<EndReason>) -> atlas_store::Snapshot {
        let micros = |v: Option<u64>| v.and_then(|v| i64::try_from(v).ok());
        let count = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let now = chrono::Utc::now();
        let models = &self.state.models;
        let usage = self.machine.ledger().usage();
        let cost = self.machine.ledger().cost();
        atlas_store::Snapshot {
            // The ownership epoch; the recorder completes the sequence.
            seq: self.shared.as_ref().map_or(0, |s| {
                s.owned.lock().unwrap_or_else(|e| e.into_inner()).epoch
            }),
            session: atlas_store::SessionRecord {
                id: self.record_id(),
                user_id: self.identity.user_id.clone(),
                conversation_id: self.conversation_id.clone(),
                started_at: self.started_wall,
                ended_at: ended.map(|_| now),
                duration_ms: (now - self.started_wall).num_milliseconds().max(0),
                end_reason: ended.map(|r| r.label().to_owned()),
                turns: i32::try_from(self.machine.last_turn()).unwrap_or(i32::MAX),
                stt_seconds: usage.stt_seconds,
                llm_input_tokens: count(usage.llm_input_tokens),
                llm_output_tokens: count(usage.llm_output_tokens),
                tts_chars: count(usage.tts_chars),
                stt_cost_micros: micros(cost.stt),
                llm_cost_micros: micros(cost.llm),
                tts_cost_micros: micros(cost.tts),
                total_cost_micros: micros(cost.total),
                stt_model: Some(models.stt.1.clone()),
                llm_model: Some(models.llm.1.clone()),
                tts_model: Some(models.tts.1.clone()),
                price_catalog_version: Some(self.state.catalog_version.clone()),
                client_name: self.client.as_ref().and_then(|c| c.name.clone()),
                client_version: self.client.as_ref().and_then(|c| c.version.clone()),
                transport: self.kind.label().to_owned(),
                call_sid: self.call.as_ref().map(|c| c.call_sid.clone()),
                caller: self.call.as_ref().map(|c| self.recorded_caller(&c.caller)),
            },
            turns: self.turn_records.clone(),
            tool_calls: self.tool_records.clone(),
        }
    }

    /// Carries out the machine's finish: record, hand-over or release, close.
    async fn finish(&mut self, finish: Finish) {
        // No resume can reach this session any more; one already on its way is told so.
        self.attach_rx.close();
        self.state.registry.remove_session(self.machine.id());
        let mut waiting: Vec<Connection> =
            self.arriving.take().map(|(c, _)| c).into_iter().collect();
        while let Ok(conn) = self.attach_rx.try_recv() {
            waiting.push(conn);
        }
        for conn in waiting {
            refuse_connection(
                &self.state.sessions,
                conn,
                ErrorCode::ResumeFailed,
                "the session has ended; start a new one",
                Closing::Ended(EndReason::Disconnected),
            );
        }
        let reason = finish.reason;
        if finish.record {
            self.state.recorder.submit(self.snapshot(Some(reason)));
        }
        // The last shared-store writes go behind the ones queued so far (tokens, spend), in
        // order. A hand-over (drain) is awaited so the next owner finds the latest state.
        if let Some(shared) = self.shared.take() {
            let last = if finish.handover {
                Some(ClusterOp::Publish(Box::new(self.resume_state())))
            } else if finish.record {
                Some(ClusterOp::Release)
            } else {
                None
            };
            if let Some(op) = last
                && shared.ops.send(op).await.is_err()
            {
                warn!("shared-store writer gone; last write dropped");
            }
            drop(shared.ops);
            if finish.handover
                && tokio::time::timeout(Duration::from_secs(5), shared.writer)
                    .await
                    .is_err()
            {
                warn!("could not hand the session over for resume elsewhere in time");
            }
        }
        metrics::session_ended(reason.label());
        if let Some(link) = self.link.take() {
            link.writer.close(Closing::Ended(reason)).await;
            drop(link.writer);
            let _ = tokio::time::timeout(Duration::from_secs(2), link.task).await;
        }
    }
}

/// Tells a connection that cannot attach why, and closes it.
fn refuse_connection(
    tasks: &TaskTracker,
    conn: Connection,
    code: ErrorCode,
    message: &'static str,
    closing: Closing,
) {
    tasks.spawn(async move {
        let Link {
            mut writer, task, ..
        } = conn.link;
        let _ = writer.event(Event::problem(code, message, true));
        writer.close(closing).await;
        drop(writer);
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    });
}

fn reported_tokens(u: &atlas_providers::llm::LlmUsage) -> ReportedTokens {
    ReportedTokens {
        input: u.input_tokens,
        output: u.output_tokens,
        cache_read: u.cache_read_input_tokens,
        cache_write: u.cache_creation_input_tokens,
    }
}

/// What a reply achieved, from its progress.
fn outcome_of(turn_id: u64, p: &Progress) -> ReplyOutcome {
    ReplyOutcome {
        turn_id,
        llm: LlmBill {
            billable: p.llm_sent && !p.llm_refused,
            finished: p.llm_done,
            prompt_chars: p.prompt_chars,
            generated_chars: p.generated.len(),
            reported: reported_tokens(&p.llm_usage),
        },
        tts_chars: p.tts_chars,
        latency: p.timings.latency(),
        failure: p.failure.as_ref().map(|f| ReplyFailure::Provider(f.code)),
    }
}

fn new_resume_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The next thing the reply in flight reports; its speech only while the machine's playout
/// wants more (`wants_speech`), which holds synthesis back.
async fn response_event(
    response: &mut Option<ActiveResponse>,
    wants_speech: bool,
) -> ResponseEvent {
    match response {
        Some(active) => tokio::select! {
            Some(text) = active.text.recv() => ResponseEvent::Text(active.turn_id, text),
            Some(speech) = active.speech.recv(), if wants_speech => {
                ResponseEvent::Speech(active.turn_id, speech)
            }
            Some(round) = active.rounds.recv() => ResponseEvent::Round(active.turn_id, round),
            _ = &mut active.handle => ResponseEvent::Finished(active.turn_id),
        },
        None => std::future::pending().await,
    }
}

/// Turn-taking settings for the configured recogniser.
fn turn_config(state: &AppState) -> TurnConfig {
    let defaults = TurnConfig::default();
    TurnConfig {
        // With the echo guard on, a barge-in waits for words: speech alone may be the echo.
        partials: state.engines.stt.partials() || state.config.echo_window_ms > 0,
        policy: state.config.session_turn_policy(),
        drafts: state.config.preemptive_replies,
        echo_window: Duration::from_millis(state.config.echo_window_ms.into()),
        backchannels: state
            .config
            .backchannels
            .clone()
            .unwrap_or(defaults.backchannels),
        ..defaults
    }
}
