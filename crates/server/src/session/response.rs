//! One assistant reply's work: LLM stream → splitter → TTS per sentence (the next sentence's
//! request overlapping the current one's playback) → resampling → the session machine.
//!
//! The reply runs as one task made of three cooperating futures joined with `try_join!`:
//! the LLM reader (one model request per round: a round that ends in tool calls is reported
//! to the session, and the reader waits for the session's next request while the words
//! before the calls go on playing), the TTS starter (which spawns one synthesis task per
//! sentence, at most `prefetch` at a time) and the forwarder (which hands the sentences'
//! audio to the session strictly in order, each sentence followed by its end). The session
//! takes audio only while the machine's playout wants it, which is what holds synthesis
//! back; the machine decides when the audio goes out and which words were heard.
//!
//! Barge-in cuts the reply ([`Channels::cut`]): the reader takes in the model's text that has
//! already arrived and drops the stream, and the task stops at once without waiting for
//! anything in flight; a model or synthesis request already issued finishes its handshake on
//! its own and then finds nobody listening (so every request a provider received is billed:
//! see `read_llm` and `synthesize`). Usage and timestamps live in a shared [`Progress`] the
//! session reads after the task has ended, closing the reply's bill.

use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use atlas_core::audio::{pcm_from_le_bytes, pcm_to_le_bytes};
use atlas_core::latency::{TurnTimings, mark};
use atlas_core::playout::PIECE;
use atlas_core::resample::StreamResampler;
use atlas_core::splitter::{SentenceSplitter, SplitterConfig, speakable};
use atlas_core::tools::ToolCall;
use atlas_protocol::ErrorCode;
use atlas_providers::ProviderError;
use atlas_providers::llm::{ChatMessage, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage};
use atlas_providers::tts::{TtsProvider, TtsRequest};

/// Everything a reply needs.
pub struct ResponseCtx {
    /// Turn number.
    pub turn_id: u64,
    /// Language model.
    pub llm: Arc<dyn LlmProvider>,
    /// Speech synthesiser.
    pub tts: Arc<dyn TtsProvider>,
    /// The request (system prompt + bounded history).
    pub request: LlmRequest,
    /// Voice chosen by the client, if any.
    pub voice: Option<String>,
    /// Client's output sample rate.
    pub out_rate: u32,
    /// Sentences synthesised at once.
    pub prefetch: usize,
    /// Splitting rules.
    pub splitter: SplitterConfig,
}

/// Why a reply stopped early.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Code for the client.
    pub code: ErrorCode,
    /// Bounded label for logs and metrics.
    pub label: &'static str,
    /// Detail for the log only.
    pub detail: String,
}

impl Failure {
    fn provider(code: ErrorCode, e: &ProviderError) -> Self {
        Failure {
            code: if e.is_busy() {
                ErrorCode::EnginesBusy
            } else {
                code
            },
            label: e.label(),
            detail: e.to_string(),
        }
    }
}

/// The reply's speech, in order, for the session machine.
#[derive(Debug)]
pub enum Speech {
    /// Audio at the client's output rate (16-bit little-endian, whole samples).
    Audio(Bytes),
    /// All audio of a sentence was handed over.
    Sentence {
        /// The model request it came from, or `None` for words said while tools ran.
        round: Option<u32>,
        /// The sentence.
        text: String,
    },
}

/// What the session tells a running reply.
#[derive(Debug)]
pub enum Control {
    /// Say this now (tools are running).
    Say(String),
    /// The tools answered: the next request of the round trip.
    Continue(LlmRequest),
}

/// A model request that ended asking for tools.
#[derive(Debug)]
pub struct ToolRound {
    /// What the model said before calling.
    pub text: String,
    /// The calls, in the model's order.
    pub calls: Vec<ToolCall>,
    /// That request's usage, as [`Progress`] held it.
    pub usage: LlmUsage,
    /// Characters of that request's prompt.
    pub prompt_chars: usize,
    /// The provider finished the stream.
    pub finished: bool,
}

/// What a reply has done so far, shared with the session.
#[derive(Debug, Default)]
pub struct Progress {
    /// Stage timestamps.
    pub timings: TurnTimings,
    /// Its provider requests, for their trace spans; `None` when the session is not traced
    /// (then nothing is recorded).
    pub traces: Option<Vec<RequestTrace>>,
    /// Model requests that ended in tool calls so far.
    pub round: u32,
    /// Text the model produced in the current round.
    pub generated: String,
    /// The current round's request was sent.
    pub llm_sent: bool,
    /// Characters of the prompt (system + history), to estimate tokens when the provider
    /// reports no usage.
    pub prompt_chars: usize,
    /// The model finished its stream (so its usage report is final).
    pub llm_done: bool,
    /// The model's provider refused the request (an error status: nothing to bill).
    pub llm_refused: bool,
    /// Latest usage reported by the model.
    pub llm_usage: LlmUsage,
    /// Characters of the synthesis requests issued (and not refused).
    pub tts_chars: u64,
    /// The reply's bill was taken (it ended or was cut): no more requests are issued.
    pub settled: bool,
    /// Set when the reply failed.
    pub failure: Option<Failure>,
}

/// Provider requests of one reply traced at most (a reply's requests are bounded by its
/// tool rounds and sentences; past this they go untraced).
const MAX_TRACED: usize = 64;

/// One provider request of a reply, as its trace span shows it.
#[derive(Debug)]
pub struct RequestTrace {
    /// What was asked.
    pub kind: Requested,
    /// When the request was issued.
    pub started: std::time::Instant,
    /// Its first token or first audio.
    pub first: Option<std::time::Instant>,
    /// When its answer ended (unset: cut, or still coming when the reply ended).
    pub ended: Option<std::time::Instant>,
}

/// The kind of a traced request.
#[derive(Debug)]
pub enum Requested {
    /// A model request: the reply's round (0, then one more after each tool round) and the
    /// usage it reported.
    Model { round: u32, usage: LlmUsage },
    /// A synthesis request of this many characters.
    Synthesis { chars: u64 },
}

impl Progress {
    /// Starts tracing a request issued `now`, if the reply is traced; its handle.
    fn trace(&mut self, kind: Requested, now: std::time::Instant) -> Option<usize> {
        let traces = self.traces.as_mut().filter(|t| t.len() < MAX_TRACED)?;
        traces.push(RequestTrace {
            kind,
            started: now,
            first: None,
            ended: None,
        });
        Some(traces.len() - 1)
    }

    /// The traced request `handle`, if there is one.
    fn traced(&mut self, handle: Option<usize>) -> Option<&mut RequestTrace> {
        self.traces.as_mut()?.get_mut(handle?)
    }
}

/// Locks the progress, tolerating a poisoned mutex (the data stays usable).
pub fn lock(progress: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    progress.lock().unwrap_or_else(|e| e.into_inner())
}

/// Characters of a request's prompt (system prompt, text, calls and results).
pub fn prompt_chars(request: &LlmRequest) -> usize {
    request.system.len()
        + request
            .messages
            .iter()
            .map(ChatMessage::chars)
            .sum::<usize>()
}

/// A sentence to speak: the model's, of round `Some(n)`, or an acknowledgement (`None`).
type Sentence = (Option<u32>, String);

/// A sentence being synthesised, handed to the forwarder in order.
struct Job {
    round: Option<u32>,
    text: String,
    audio: mpsc::Receiver<Result<Bytes, ProviderError>>,
    /// Held until the sentence has been played out, bounding synthesis ahead of playback.
    _permit: OwnedSemaphorePermit,
}

/// The reply's links with its session.
pub struct Channels {
    /// What the session tells the reply.
    pub control: mpsc::UnboundedReceiver<Control>,
    /// Rounds that ended in tool calls.
    pub rounds: mpsc::Sender<ToolRound>,
    /// The model's words as they come.
    pub text: mpsc::UnboundedSender<String>,
    /// The speech, taken as the playout wants it.
    pub speech: mpsc::Sender<Speech>,
    /// Cancelled when the session cuts the reply: it stops at once, taking in first what the
    /// model has already sent (see [`read_llm`]).
    pub cut: CancellationToken,
}

/// How a reply stopped before its end.
enum Stop {
    /// It failed.
    Failed(Failure),
    /// The session cut it.
    Cut,
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Self {
        Stop::Failed(f)
    }
}

/// Runs the reply to completion (or failure, recorded in `progress`).
pub async fn run(ctx: ResponseCtx, progress: Arc<Mutex<Progress>>, channels: Channels) {
    if let Err(Stop::Failed(failure)) = run_inner(&ctx, &progress, channels).await {
        lock(&progress).failure = Some(failure);
    }
}

async fn run_inner(
    ctx: &ResponseCtx,
    progress: &Arc<Mutex<Progress>>,
    channels: Channels,
) -> Result<(), Stop> {
    // Unbounded (a reply's sentences are bounded by its token cap) so that the model's stream
    // is read as fast as it comes, whatever playback is doing: a provider bills what it
    // generated, and text it sent that we had not read when the reply was cut would be on its
    // bill and not on ours.
    let (sentence_tx, sentence_rx) = mpsc::unbounded_channel::<Sentence>();
    let (job_tx, job_rx) = mpsc::channel::<Job>(ctx.prefetch);
    let speech = channels.speech.clone();
    let cut = channels.cut.clone();
    // On a cut, the model's reader takes in what has arrived and stops; synthesis and speech
    // stop too, once the reader is over (so the cut never ends the task before it).
    let llm_over = CancellationToken::new();
    let reader = async {
        let _over = llm_over.clone().drop_guard();
        read_llm(ctx, progress, channels, sentence_tx).await
    };
    let stopped = || async {
        cut.cancelled().await;
        llm_over.cancelled().await;
        Stop::Cut
    };
    tokio::try_join!(
        reader,
        async {
            tokio::select! {
                r = start_tts(ctx, progress, sentence_rx, job_tx) => r.map_err(Stop::from),
                stop = stopped() => Err(stop),
            }
        },
        async {
            tokio::select! {
                r = forward_audio(ctx, job_rx, speech) => r.map_err(Stop::from),
                stop = stopped() => Err(stop),
            }
        }
    )?;
    Ok(())
}

/// Streams the model's rounds: text to the splitter (and the client), tool calls to the
/// session, until a round ends without calls.
async fn read_llm(
    ctx: &ResponseCtx,
    progress: &Arc<Mutex<Progress>>,
    mut channels: Channels,
    sentences: mpsc::UnboundedSender<Sentence>,
) -> Result<(), Stop> {
    let mut request = ctx.request.clone();
    let mut ready = Vec::new();
    let cut = channels.cut.clone();
    loop {
        let (round, traced) = {
            let mut p = lock(progress);
            let now = Instant::now().into_std();
            mark(&mut p.timings.llm_request, now);
            p.llm_sent = true;
            let round = p.round;
            let usage = LlmUsage::default();
            (round, p.trace(Requested::Model { round, usage }, now))
        };
        // Billed from here on, as the provider bills every request it receives: so once
        // issued, the request is sent whole even if the reply is cut meanwhile.
        let llm = ctx.llm.clone();
        let mut sending = tokio::spawn(async move { llm.stream(request).await }.in_current_span());
        let sent = tokio::select! {
            biased;
            _ = cut.cancelled() => {
                // Connected just now: what came with the answer counts too.
                if sending.is_finished()
                    && let Ok(Ok(mut stream)) = sending.await
                {
                    take_arrived(&mut stream, progress);
                }
                return Err(Stop::Cut);
            }
            sent = &mut sending => {
                sent.unwrap_or_else(|e| Err(ProviderError::Protocol(e.to_string())))
            }
        };
        let mut stream = sent.map_err(|e| {
            lock(progress).llm_refused = true;
            Failure::provider(ErrorCode::LlmFailed, &e)
        })?;
        let mut splitter = SentenceSplitter::new(ctx.splitter.clone());
        let mut calls = Vec::new();
        loop {
            let due = splitter.due();
            let item = tokio::select! {
                biased;
                _ = cut.cancelled() => {
                    take_arrived(&mut stream, progress);
                    return Err(Stop::Cut);
                }
                item = stream.next() => item,
                // The first piece is due at a word boundary (eager first audio).
                _ = sleep_until_due(due), if due.is_some() => {
                    splitter.expire(Instant::now().into_std(), &mut ready);
                    if !send_ready(&mut ready, &sentences, round) {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some(item) = item else {
                break;
            };
            match item {
                Ok(LlmEvent::Delta(text)) => {
                    let now = Instant::now().into_std();
                    {
                        let mut p = lock(progress);
                        mark(&mut p.timings.llm_first_token, now);
                        p.generated.push_str(&text);
                        if let Some(t) = p.traced(traced) {
                            t.first.get_or_insert(now);
                        }
                    }
                    splitter.push(&text, now, &mut ready);
                    if channels.text.send(text).is_err() {
                        // The session dropped the reply.
                        return Ok(());
                    }
                    if !send_ready(&mut ready, &sentences, round) {
                        return Ok(());
                    }
                }
                Ok(LlmEvent::ToolCall(call)) => calls.push(call),
                Ok(LlmEvent::Usage(u)) => {
                    let mut p = lock(progress);
                    p.llm_usage = u;
                    if let Some(RequestTrace {
                        kind: Requested::Model { usage, .. },
                        ..
                    }) = p.traced(traced)
                    {
                        *usage = u;
                    }
                }
                Ok(LlmEvent::Done { .. }) => {
                    let mut p = lock(progress);
                    p.llm_done = true;
                    if let Some(t) = p.traced(traced) {
                        t.ended = Some(Instant::now().into_std());
                    }
                    break;
                }
                Err(e) => return Err(Failure::provider(ErrorCode::LlmFailed, &e).into()),
            }
        }
        // The round's last words are spoken now (while any tools run).
        if let Some(rest) = splitter.finish() {
            let _ = sentences.send((Some(round), rest));
        }
        if calls.is_empty() {
            return Ok(());
        }
        let report = {
            let mut p = lock(progress);
            p.round += 1;
            p.llm_sent = false;
            ToolRound {
                text: std::mem::take(&mut p.generated),
                calls,
                usage: std::mem::take(&mut p.llm_usage),
                prompt_chars: p.prompt_chars,
                finished: std::mem::take(&mut p.llm_done),
            }
        };
        let room = tokio::select! {
            _ = cut.cancelled() => {
                unreported(progress, report);
                return Err(Stop::Cut);
            }
            room = channels.rounds.reserve() => room,
        };
        match room {
            Ok(room) => room.send(report),
            Err(_) => return Ok(()),
        }
        request = loop {
            let control = tokio::select! {
                _ = cut.cancelled() => return Err(Stop::Cut),
                c = channels.control.recv() => c,
            };
            match control {
                Some(Control::Say(text)) => {
                    if sentences.send((None, text)).is_err() {
                        return Ok(());
                    }
                }
                Some(Control::Continue(next)) => break next,
                // The session dropped the reply.
                None => return Ok(()),
            }
        };
        lock(progress).prompt_chars = prompt_chars(&request);
    }
}

/// Hands the pieces cut so far to synthesis; false when the reply was dropped.
fn send_ready(
    ready: &mut Vec<String>,
    sentences: &mpsc::UnboundedSender<Sentence>,
    round: u32,
) -> bool {
    ready
        .drain(..)
        .all(|piece| sentences.send((Some(round), piece)).is_ok())
}

/// Sleeps until `due` (pending forever without one).
async fn sleep_until_due(due: Option<std::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(Instant::from_std(due)).await,
        None => std::future::pending().await,
    }
}

/// A round's request the session never took (the reply was cut first) goes back on the reply's
/// bill.
pub fn unreported(progress: &Mutex<Progress>, round: ToolRound) {
    let mut p = lock(progress);
    p.llm_sent = true;
    p.generated = round.text;
    p.llm_usage = round.usage;
    p.llm_done = round.finished;
    p.prompt_chars = round.prompt_chars;
}

/// Takes in what the model's stream has already delivered, without waiting for more: the
/// provider bills the text it sent, so the ledger counts what reached the server before the
/// stream is dropped.
fn take_arrived(stream: &mut LlmStream, progress: &Mutex<Progress>) {
    while let Some(Some(item)) = stream.next().now_or_never() {
        let mut p = lock(progress);
        match item {
            Ok(LlmEvent::Delta(text)) => p.generated.push_str(&text),
            Ok(LlmEvent::Usage(u)) => p.llm_usage = u,
            Ok(LlmEvent::Done { .. }) => p.llm_done = true,
            Ok(LlmEvent::ToolCall(_)) => {}
            Err(_) => return,
        }
    }
}

async fn start_tts(
    ctx: &ResponseCtx,
    progress: &Arc<Mutex<Progress>>,
    mut sentences: mpsc::UnboundedReceiver<Sentence>,
    jobs: mpsc::Sender<Job>,
) -> Result<(), Failure> {
    let permits = Arc::new(Semaphore::new(ctx.prefetch));
    while let Some((round, text)) = sentences.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (audio_tx, audio_rx) = mpsc::channel(32);
        let request = TtsRequest {
            text: speakable(&text),
            voice: ctx.voice.clone(),
        };
        // Not aborted with the reply: an issued request runs until the provider answers, so
        // every request the provider receives is one the bill counted (see `synthesize`).
        tokio::spawn(
            synthesize(ctx.tts.clone(), request, audio_tx, progress.clone()).in_current_span(),
        );
        let job = Job {
            round,
            text,
            audio: audio_rx,
            _permit: permit,
        };
        if jobs.send(job).await.is_err() {
            break;
        }
    }
    Ok(())
}

async fn synthesize(
    tts: Arc<dyn TtsProvider>,
    request: TtsRequest,
    audio: mpsc::Sender<Result<Bytes, ProviderError>>,
    progress: Arc<Mutex<Progress>>,
) {
    // Billed as the provider bills: every request it receives, none it refused. A request is
    // issued only while the reply's bill is open, and once issued it is not dropped before the
    // provider answers, so what the provider received and what the bill counts are the same.
    let chars = request.text.chars().count() as u64;
    let traced = {
        let mut p = lock(&progress);
        if p.settled {
            return;
        }
        let now = Instant::now().into_std();
        mark(&mut p.timings.tts_request, now);
        p.tts_chars += chars;
        p.trace(Requested::Synthesis { chars }, now)
    };
    let mut stream = match tts.synthesize(request).await {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, ProviderError::Status { .. } | ProviderError::Connect(_)) {
                let mut p = lock(&progress);
                p.tts_chars = p.tts_chars.saturating_sub(chars);
            }
            let _ = audio.send(Err(e)).await;
            return;
        }
    };
    while let Some(chunk) = stream.next().await {
        let failed = chunk.is_err();
        if chunk.is_ok() {
            let now = Instant::now().into_std();
            let mut p = lock(&progress);
            mark(&mut p.timings.tts_first_audio, now);
            if let Some(t) = p.traced(traced) {
                t.first.get_or_insert(now);
            }
        }
        if audio.send(chunk).await.is_err() || failed {
            return;
        }
    }
    if let Some(t) = lock(&progress).traced(traced) {
        t.ended = Some(Instant::now().into_std());
    }
}

/// Hands the sentences' audio to the session in order, at the client's rate, each followed by
/// its end; returns when the session drops the reply.
async fn forward_audio(
    ctx: &ResponseCtx,
    mut jobs: mpsc::Receiver<Job>,
    speech: mpsc::Sender<Speech>,
) -> Result<(), Failure> {
    let mut pcm = ToClientRate::new(ctx.tts.sample_rate(), ctx.out_rate).map_err(|e| Failure {
        code: ErrorCode::Internal,
        label: "resampler",
        detail: e.to_string(),
    })?;
    // Audio that has already arrived goes to the session together, up to one playout piece:
    // one message for the session loop instead of one per synthesis chunk, at no cost in
    // latency (nothing waits for audio still to come).
    let piece_bytes = (ctx.out_rate as usize * PIECE.as_millis() as usize) / 1000 * 2;
    while let Some(mut job) = jobs.recv().await {
        while let Some(chunk) = job.audio.recv().await {
            let mut chunk = Some(chunk);
            while let Some(next) = chunk.take() {
                pcm.push(&next.map_err(|e| Failure::provider(ErrorCode::TtsFailed, &e))?);
                if pcm.ready_bytes() < piece_bytes {
                    chunk = job.audio.try_recv().ok();
                }
            }
            if !hand_over(&speech, pcm.take()).await {
                return Ok(());
            }
        }
        pcm.end();
        let sentence = Speech::Sentence {
            round: job.round,
            text: job.text,
        };
        if !hand_over(&speech, pcm.take()).await || speech.send(sentence).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// The synthesiser's 16-bit PCM at the client's rate: passed through as it came when the rates
/// agree (no decoding, converting or re-encoding), resampled otherwise. Either way it hands
/// out whole samples only.
enum ToClientRate {
    /// The rates agree.
    Same(BytesMut),
    /// Resampled.
    Resampled {
        resampler: Box<StreamResampler>,
        /// The low byte of a sample split between two chunks.
        carry: Option<u8>,
        samples_in: Vec<i16>,
        samples_out: Vec<i16>,
    },
}

impl ToClientRate {
    fn new(from: u32, to: u32) -> Result<Self, atlas_core::resample::ResampleError> {
        if from == to {
            return Ok(ToClientRate::Same(BytesMut::new()));
        }
        Ok(ToClientRate::Resampled {
            resampler: Box::new(StreamResampler::new(from, to)?),
            carry: None,
            samples_in: Vec::new(),
            samples_out: Vec::new(),
        })
    }

    /// A chunk of the synthesiser's PCM (any length).
    fn push(&mut self, chunk: &[u8]) {
        match self {
            ToClientRate::Same(pending) => pending.extend_from_slice(chunk),
            ToClientRate::Resampled {
                resampler,
                carry,
                samples_in,
                samples_out,
            } => {
                decode(chunk, carry, samples_in);
                resampler.process(samples_in, samples_out);
            }
        }
    }

    /// Bytes of whole samples ready.
    fn ready_bytes(&self) -> usize {
        match self {
            ToClientRate::Same(pending) => pending.len() & !1,
            ToClientRate::Resampled { samples_out, .. } => samples_out.len() * 2,
        }
    }

    /// The whole samples ready, as little-endian bytes (empty when none).
    fn take(&mut self) -> Bytes {
        match self {
            ToClientRate::Same(pending) => {
                let whole = pending.len() & !1;
                pending.split_to(whole).freeze()
            }
            ToClientRate::Resampled { samples_out, .. } => {
                let mut bytes = Vec::with_capacity(samples_out.len() * 2);
                pcm_to_le_bytes(samples_out, &mut bytes);
                samples_out.clear();
                Bytes::from(bytes)
            }
        }
    }

    /// The sentence's audio ended: the resampler's tail is ready; a lone byte is dropped.
    fn end(&mut self) {
        match self {
            ToClientRate::Same(pending) => pending.truncate(pending.len() & !1),
            ToClientRate::Resampled {
                resampler,
                carry,
                samples_out,
                ..
            } => {
                *carry = None;
                resampler.flush(samples_out);
            }
        }
    }
}

/// Decodes 16-bit little-endian PCM into `samples` (cleared first), carrying an odd byte over
/// to the next chunk.
fn decode(chunk: &[u8], carry: &mut Option<u8>, samples: &mut Vec<i16>) {
    samples.clear();
    let mut rest = chunk;
    if let Some(low) = carry.take() {
        match rest.split_first() {
            Some((&high, tail)) => {
                samples.push(i16::from_le_bytes([low, high]));
                rest = tail;
            }
            None => *carry = Some(low),
        }
    }
    pcm_from_le_bytes(rest, samples);
    if rest.len() % 2 == 1 {
        *carry = rest.last().copied();
    }
}

/// Hands `pcm` to the session (waiting while its playout is full); false once the session
/// dropped the reply.
async fn hand_over(speech: &mpsc::Sender<Speech>, pcm: Bytes) -> bool {
    pcm.is_empty() || speech.send(Speech::Audio(pcm)).await.is_ok()
}
