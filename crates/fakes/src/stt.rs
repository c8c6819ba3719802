//! Fake Deepgram live transcription: WebSocket `GET /v1/listen`.
//!
//! The upgrade handler checks credentials and query parameters (answering refusals with
//! Deepgram's HTTP error JSON) and then drives a [`Session`], a socket-free state machine that
//! turns audio and control messages into outgoing messages:
//!
//! * audio (linear16 mono at `sample_rate`) is cut into 10 ms frames and classified as speech
//!   when its RMS level is above the configured threshold;
//! * a sample's wall time is the arrival of the message that carried it (a recogniser can act
//!   on audio only once it has it), so the end of speech has a wall time;
//! * utterances produce `SpeechStarted` (with `vad_events=true`), interim `Results`
//!   (with `interim_results=true`), optionally an `is_final` `Results` of the words so far
//!   once a short silence follows them (`stable_after`; the words it carries are not repeated),
//!   a final `Results` at `end-of-speech + final_delay`, and an
//!   `UtteranceEnd` (with `utterance_end_ms` and `interim_results=true`) once that much audio
//!   followed the last word;
//! * `Finalize`, `KeepAlive` and `CloseStream` behave as on Deepgram, and an idle connection is
//!   closed with 1011 `NET-0001`.
//!
//! The connection task waits on the socket and on the session's next deadline at once, so a
//! final is delivered on time even when no more audio arrives.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::state::{Recorder, Shared};
use crate::{Fault, Target, errors, util};

/// Speaking rate used to grow interim transcripts.
const WORDS_PER_SEC: f64 = 2.5;
/// Model version reported in results metadata.
const MODEL_VERSION: &str = "2024-12-20.0";

/// A configured transcript, pre-split into words. A `|` between words marks where a stable
/// stretch ends (see [`crate::SttFakeConfig::stable_after`]); it is not a word.
pub(crate) struct Transcript {
    words: Vec<Word>,
    /// Word counts at the `|` marks, ascending.
    marks: Vec<usize>,
}

/// A word as Deepgram reports it: `word` (lower case, no punctuation) and `punctuated_word`.
struct Word {
    plain: String,
    punctuated: String,
}

impl Transcript {
    pub(crate) fn new(text: &str) -> Self {
        let mut marks = Vec::new();
        let mut count = 0;
        for piece in text.split('|') {
            count += Self::split(piece).count();
            marks.push(count);
        }
        marks.pop();
        Self {
            words: Self::split(&text.replace('|', " ")).collect(),
            marks,
        }
    }

    fn split(text: &str) -> impl Iterator<Item = Word> + '_ {
        text.split_whitespace()
            .map(|w| Word {
                plain: w
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == '\'' || *c == '-')
                    .flat_map(char::to_lowercase)
                    .collect(),
                punctuated: w.to_owned(),
            })
            .filter(|w| !w.plain.is_empty())
    }
}

/// Query parameters of `/v1/listen` that the fake honours.
#[derive(Clone, Debug)]
pub(crate) struct ListenParams {
    sample_rate: u32,
    interim_results: bool,
    vad_events: bool,
    utterance_end_ms: Option<u64>,
    /// `punctuate=true` or `smart_format=true`.
    punctuate: bool,
    model: String,
}

impl ListenParams {
    /// Parses the query string; `Err` is the message of a 400.
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
        let mut params = ListenParams {
            sample_rate: 16_000,
            interim_results: false,
            vad_events: false,
            utterance_end_ms: None,
            punctuate: false,
            model: "nova-3".to_owned(),
        };
        let mut encoding = None;
        let mut channels = 1u32;
        for (key, value) in util::parse_query(raw) {
            match key.as_str() {
                "encoding" => encoding = Some(value),
                "sample_rate" => {
                    params.sample_rate = value
                        .parse()
                        .ok()
                        .filter(|r| (1000..=192_000).contains(r))
                        .ok_or_else(|| format!("Invalid sample_rate '{value}'."))?;
                }
                "channels" => {
                    channels = value
                        .parse()
                        .map_err(|_| format!("Invalid channels '{value}'."))?;
                }
                "interim_results" => params.interim_results = value == "true",
                "vad_events" => params.vad_events = value == "true",
                "utterance_end_ms" => {
                    params.utterance_end_ms = Some(
                        value
                            .parse()
                            .map_err(|_| format!("Invalid utterance_end_ms '{value}'."))?,
                    );
                }
                "punctuate" | "smart_format" if value == "true" => params.punctuate = true,
                "model" => params.model = value,
                _ => {}
            }
        }
        if let Some(encoding) = encoding
            && encoding != "linear16"
        {
            return Err(format!(
                "Unsupported encoding '{encoding}': the fake Deepgram only decodes linear16."
            ));
        }
        if channels != 1 {
            return Err(format!(
                "Unsupported channels '{channels}': the fake Deepgram only decodes mono audio."
            ));
        }
        Ok(params)
    }
}

/// `GET /v1/listen` (WebSocket upgrade).
pub(crate) async fn listen(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let raw = raw.unwrap_or_default();
    shared.recorder.stt_connection(raw.clone());
    shared.recorder.trace_context(Target::Stt, &headers);
    let fault = shared.take_fault(Target::Stt);
    if let Some(Fault::Status {
        status,
        retry_after_s,
    }) = fault
    {
        return errors::deepgram(status, None, retry_after_s);
    }

    // Browsers authenticate with `Sec-WebSocket-Protocol: token, <key>`.
    let protocols: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .collect();
    let token_protocol = protocols.first().is_some_and(|p| p == "token");
    if let Some(key) = &shared.config.api_key {
        let header_ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .is_some_and(|(scheme, value)| {
                (scheme.eq_ignore_ascii_case("token") || scheme.eq_ignore_ascii_case("bearer"))
                    && value.trim() == key
            });
        let protocol_ok = token_protocol && protocols.get(1) == Some(key);
        if !header_ok && !protocol_ok {
            return errors::deepgram(401, None, None);
        }
    }

    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return rejection.into_response(),
    };
    let params = match ListenParams::parse(&raw) {
        Ok(params) => params,
        Err(message) => return errors::deepgram(400, Some(&message), None),
    };
    let ws = if token_protocol {
        ws.protocols(["token"])
    } else {
        ws
    };
    let session = Session::new(&shared, params, fault, Instant::now());
    ws.read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(16 << 20)
        .on_upgrade(move |socket| run(socket, session, shared))
}

/// Drives one connection until it ends.
async fn run(mut socket: WebSocket, mut session: Session, shared: Arc<Shared>) {
    loop {
        let deadline = session.next_deadline();
        let actions = tokio::select! {
            () = shared.shutdown.cancelled() => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1001,
                        reason: Utf8Bytes::from_static("fake server shutting down"),
                    })))
                    .await;
                return;
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    Recorder::add(&shared.recorder.stt_audio_bytes, data.len() as u64);
                    Recorder::add(&shared.recorder.stt_audio_messages, 1);
                    shared.recorder.usage.stt_audio(data.len(), session.sample_rate());
                    if data.is_empty() {
                        Recorder::add(&shared.recorder.stt_close_streams, 1);
                    }
                    session.on_audio(&data, Instant::now())
                }
                Some(Ok(Message::Text(text))) => on_text(&shared, &mut session, text.as_str()),
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => Vec::new(),
            },
            () = sleep_until(deadline) => session.on_timer(Instant::now()),
        };
        for action in actions {
            match action {
                Action::Send(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Action::Close(code, reason) => {
                    let frame = CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    };
                    if socket.send(Message::Close(Some(frame))).await.is_ok() {
                        // Let the client answer the close handshake.
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            while let Some(Ok(msg)) = socket.recv().await {
                                if matches!(msg, Message::Close(_)) {
                                    break;
                                }
                            }
                        })
                        .await;
                    }
                    return;
                }
                // Dropping the socket closes TCP without a close frame.
                Action::Drop => return,
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn on_text(shared: &Shared, session: &mut Session, text: &str) -> Vec<Action> {
    let now = Instant::now();
    session.touch(now);
    let kind = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_owned));
    match kind.as_deref() {
        Some("KeepAlive") => {
            Recorder::add(&shared.recorder.stt_keepalives, 1);
            Vec::new()
        }
        Some("Finalize") => {
            Recorder::add(&shared.recorder.stt_finalizes, 1);
            session.finalize(now)
        }
        Some("CloseStream") => {
            Recorder::add(&shared.recorder.stt_close_streams, 1);
            session.close_stream(now)
        }
        _ => Vec::new(),
    }
}

/// What the connection task must do.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Send this JSON text message.
    Send(String),
    /// Send a close frame with this code and reason, then end.
    Close(u16, &'static str),
    /// End abruptly: drop the TCP connection without a close frame.
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultMode {
    None,
    Drop,
    Error,
    Stall,
}

/// Voice activity state.
enum Vad {
    /// No utterance; `run` samples of consecutive speech began at `candidate`.
    Idle {
        run: u64,
        candidate: u64,
    },
    Speaking(Utterance),
}

struct Utterance {
    /// First sample of the utterance's speech.
    start: u64,
    /// End (exclusive) of the last speech frame.
    last_speech_end: u64,
    /// Wall-clock estimate of `last_speech_end`.
    last_speech_end_wall: Instant,
    /// Non-speech samples since `last_speech_end`.
    silence_run: u64,
    /// Sample offset at which the next interim result is due.
    next_interim: u64,
    /// Index into the transcripts (`None` when none are configured).
    transcript: Option<usize>,
    /// Words of the transcript already sent in an `is_final` result.
    finalised: usize,
    /// The silence since `last_speech_end` has made the words so far stable (sent).
    stable_sent: bool,
}

struct PendingFinal {
    due: Instant,
    message: String,
}

struct PendingUtteranceEnd {
    /// Audio offset (samples) after which `UtteranceEnd` is due.
    threshold: u64,
    last_word_end: f64,
}

/// One Deepgram streaming session, independent of the socket.
pub(crate) struct Session {
    params: ListenParams,
    rate: f64,
    /// Samples per 10 ms frame.
    frame: u64,
    min_speech: u64,
    silence_to_end: u64,
    stable_after: Option<u64>,
    interim_interval: u64,
    utterance_end: Option<u64>,
    threshold_dbfs: f32,
    final_delay: Duration,
    inactivity: Duration,
    transcripts: Arc<[Transcript]>,
    next_transcript: usize,
    request_id: String,
    model_uuid: String,
    /// Received bytes not yet consumed as whole frames.
    carry: Vec<u8>,
    received_bytes: u64,
    /// Samples consumed by the detector (a multiple of `frame`).
    processed: u64,
    vad: Vad,
    /// Start of the audio not yet covered by a final result.
    window_start: u64,
    pending: VecDeque<PendingFinal>,
    utterance_end_pending: Option<PendingUtteranceEnd>,
    last_activity: Instant,
    fault: FaultMode,
    digest: u64,
    ended: bool,
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

impl Session {
    /// The audio's sample rate.
    pub(crate) fn sample_rate(&self) -> u32 {
        self.params.sample_rate
    }

    pub(crate) fn new(
        shared: &Shared,
        params: ListenParams,
        fault: Option<Fault>,
        now: Instant,
    ) -> Self {
        let config = &shared.config.stt;
        let rate = f64::from(params.sample_rate);
        let samples = |d: Duration| (d.as_secs_f64() * rate).round() as u64;
        let frame = u64::from(params.sample_rate / 100).max(1);
        let fault = match fault {
            Some(Fault::DropMidStream) => FaultMode::Drop,
            Some(Fault::MidStreamError) => FaultMode::Error,
            Some(Fault::Stall) => FaultMode::Stall,
            _ => FaultMode::None,
        };
        let model_hash = util::fnv1a(util::FNV_OFFSET, params.model.as_bytes());
        let model_uuid =
            uuid::Uuid::from_u64_pair(model_hash, util::fnv1a(model_hash, b"uuid")).to_string();
        Self {
            rate,
            frame,
            min_speech: samples(config.min_speech),
            silence_to_end: samples(config.silence_to_end),
            stable_after: config.stable_after.map(samples),
            interim_interval: samples(config.interim_interval).max(frame),
            utterance_end: params
                .utterance_end_ms
                .filter(|_| params.interim_results)
                .map(|ms| samples(Duration::from_millis(ms))),
            threshold_dbfs: config.energy_threshold_dbfs,
            final_delay: config.final_delay,
            inactivity: config.inactivity_timeout,
            transcripts: shared.transcripts.clone(),
            next_transcript: 0,
            request_id: util::uuid(),
            model_uuid,
            carry: Vec::new(),
            received_bytes: 0,
            processed: 0,
            vad: Vad::Idle {
                run: 0,
                candidate: 0,
            },
            window_start: 0,
            pending: VecDeque::new(),
            utterance_end_pending: None,
            last_activity: now,
            fault,
            digest: util::FNV_OFFSET,
            ended: false,
            params,
        }
    }

    fn secs(&self, samples: u64) -> f64 {
        samples as f64 / self.rate
    }

    /// The next instant at which [`Session::on_timer`] has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.ended || self.fault == FaultMode::Stall {
            return None;
        }
        let idle = self.last_activity + self.inactivity;
        Some(self.pending.front().map_or(idle, |p| p.due.min(idle)))
    }

    /// Any message from the client counts as activity.
    pub(crate) fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }

    /// Deadlines: due finals, then the inactivity timeout.
    pub(crate) fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.ended || self.fault == FaultMode::Stall {
            return out;
        }
        self.flush_due(now, &mut out);
        if now >= self.last_activity + self.inactivity {
            self.ended = true;
            out.push(Action::Close(1011, "NET-0001"));
        }
        out
    }

    /// A binary message (audio) arrived at `now`. An empty message closes the stream, as on
    /// Deepgram's legacy protocol.
    pub(crate) fn on_audio(&mut self, data: &[u8], now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.ended {
            return out;
        }
        self.last_activity = now;
        if data.is_empty() {
            return self.close_stream(now);
        }
        self.digest = util::fnv1a(self.digest, data);
        self.received_bytes += data.len() as u64;
        if self.fault == FaultMode::Stall {
            return out;
        }
        let frame_bytes = self.frame as usize * 2;
        let mut carry = std::mem::take(&mut self.carry);
        carry.extend_from_slice(data);
        let mut offset = 0;
        while carry.len() - offset >= frame_bytes && !self.ended {
            let level = util::rms_dbfs(&carry[offset..offset + frame_bytes]);
            offset += frame_bytes;
            let s0 = self.processed;
            let s1 = s0 + self.frame;
            self.processed = s1;
            // Every sample of the message is heard now, when it arrived: a recogniser cannot
            // act on audio before it has it (however early the client captured it).
            self.on_frame(s0, s1, level > self.threshold_dbfs, now, &mut out);
        }
        carry.drain(..offset);
        if carry.capacity() > 64 * 1024 {
            carry.shrink_to(frame_bytes * 2);
        }
        self.carry = carry;
        if !self.ended {
            self.flush_due(now, &mut out);
        }
        out
    }

    fn on_frame(&mut self, s0: u64, s1: u64, speech: bool, now: Instant, out: &mut Vec<Action>) {
        let (interim_due, stable_due, ended) = match &mut self.vad {
            Vad::Idle { run, candidate } => {
                if speech {
                    if *run == 0 {
                        *candidate = s0;
                    }
                    *run += self.frame;
                    if *run >= self.min_speech {
                        let start = *candidate;
                        self.start_utterance(start, s1, now, out);
                    }
                } else {
                    *run = 0;
                }
                self.check_utterance_end(out);
                return;
            }
            Vad::Speaking(u) => {
                if speech {
                    u.silence_run = 0;
                    u.last_speech_end = s1;
                    u.last_speech_end_wall = now;
                    u.stable_sent = false;
                } else {
                    u.silence_run += self.frame;
                }
                let interim_due = s1 >= u.next_interim;
                if interim_due {
                    u.next_interim += self.interim_interval;
                }
                let stable_due = !u.stable_sent
                    && u.silence_run > 0
                    && self.stable_after.is_some_and(|n| u.silence_run >= n);
                if stable_due {
                    u.stable_sent = true;
                }
                (
                    interim_due,
                    stable_due,
                    u.silence_run > 0 && u.silence_run >= self.silence_to_end,
                )
            }
        };
        if interim_due {
            self.interim(s1, out);
            if self.ended {
                return;
            }
        }
        if stable_due && !ended {
            self.stable(s1, out);
        }
        if ended {
            self.end_utterance(s1, now, out);
        }
    }

    fn start_utterance(&mut self, start: u64, s1: u64, now: Instant, out: &mut Vec<Action>) {
        let transcript = if self.transcripts.is_empty() {
            None
        } else {
            let i = self.next_transcript % self.transcripts.len();
            self.next_transcript += 1;
            Some(i)
        };
        // Speech resumed: no UtteranceEnd for the previous utterance.
        self.utterance_end_pending = None;
        self.vad = Vad::Speaking(Utterance {
            start,
            last_speech_end: s1,
            last_speech_end_wall: now,
            silence_run: 0,
            next_interim: start + self.interim_interval,
            transcript,
            finalised: 0,
            stable_sent: false,
        });
        if self.params.vad_events {
            let msg =
                json!({"type": "SpeechStarted", "channel": [0], "timestamp": r3(self.secs(start))});
            out.push(Action::Send(msg.to_string()));
        }
    }

    fn words(&self, transcript: Option<usize>) -> &[Word] {
        match transcript {
            Some(i) => &self.transcripts[i].words,
            None => &[],
        }
    }

    /// An interim result for the utterance in progress, then any mid-stream fault.
    fn interim(&mut self, s1: u64, out: &mut Vec<Action>) {
        let Vad::Speaking(u) = &self.vad else {
            return;
        };
        if self.params.interim_results {
            let words = self.words(u.transcript);
            let spoken = (self.secs(s1 - u.start) * WORDS_PER_SEC).floor() as usize;
            let shown = spoken.clamp(1.min(words.len()), words.len());
            // An interim covers the words after the last `is_final` result.
            let msg = self.results(
                &words[u.finalised.min(shown)..shown],
                (u.start, s1),
                (self.window_start, s1),
                [true, false, false],
            );
            out.push(Action::Send(msg));
        }
        match self.fault {
            FaultMode::Drop => {
                self.ended = true;
                out.push(Action::Drop);
            }
            FaultMode::Error => {
                self.ended = true;
                out.push(Action::Close(1011, "DATA-0000"));
            }
            FaultMode::None | FaultMode::Stall => {}
        }
    }

    /// A short silence made the words spoken so far stable: an `is_final` result of those not
    /// sent yet (up to the transcript's next `|` mark, or all of them), before the
    /// endpointing's `speech_final`.
    fn stable(&mut self, s1: u64, out: &mut Vec<Action>) {
        let Vad::Speaking(u) = &self.vad else {
            return;
        };
        let Some(t) = u.transcript.map(|i| &self.transcripts[i]) else {
            return;
        };
        let words = &t.words;
        // Up to the transcript's next mark, or all of it.
        let upto = t
            .marks
            .iter()
            .copied()
            .find(|&m| m > u.finalised)
            .unwrap_or(words.len());
        if upto <= u.finalised {
            return;
        }
        let msg = self.results(
            &words[u.finalised..upto],
            (u.start, u.last_speech_end),
            (self.window_start, s1),
            [false, false, false],
        );
        out.push(Action::Send(msg));
        self.window_start = s1;
        if let Vad::Speaking(u) = &mut self.vad {
            u.finalised = upto;
        }
    }

    /// End of speech detected at audio offset `s1`: schedule the final.
    fn end_utterance(&mut self, s1: u64, now: Instant, out: &mut Vec<Action>) {
        let Vad::Speaking(u) = std::mem::replace(
            &mut self.vad,
            Vad::Idle {
                run: 0,
                candidate: 0,
            },
        ) else {
            return;
        };
        let message = self.utterance_final(&u, s1, [false, true, false]);
        let due = (u.last_speech_end_wall + self.final_delay).max(now);
        self.pending.push_back(PendingFinal { due, message });
        self.check_utterance_end(out);
    }

    /// The final `Results` of utterance `u`, its window ending at `end` (`flags` as in
    /// [`Session::results`]); arms the `UtteranceEnd` that follows it.
    fn utterance_final(&mut self, u: &Utterance, end: u64, flags: [bool; 3]) -> String {
        let words = self.words(u.transcript);
        // The words an `is_final` result already carried are not repeated.
        let message = self.results(
            &words[u.finalised.min(words.len())..],
            (u.start, u.last_speech_end),
            (self.window_start, end),
            flags,
        );
        let has_words = !words.is_empty();
        self.window_start = end;
        self.arm_utterance_end(has_words, u.last_speech_end);
        message
    }

    fn arm_utterance_end(&mut self, has_words: bool, last_word_end: u64) {
        if let (Some(gap), true) = (self.utterance_end, has_words) {
            self.utterance_end_pending = Some(PendingUtteranceEnd {
                threshold: last_word_end + gap,
                last_word_end: r3(self.secs(last_word_end)),
            });
        }
    }

    /// Sends the finals that are due, then a due `UtteranceEnd`.
    fn flush_due(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self.pending.front().is_some_and(|p| p.due <= now) {
            if let Some(p) = self.pending.pop_front() {
                out.push(Action::Send(p.message));
            }
        }
        self.check_utterance_end(out);
    }

    /// `UtteranceEnd` goes out once its final was sent, no new utterance started and enough
    /// audio followed the last word.
    fn check_utterance_end(&mut self, out: &mut Vec<Action>) {
        if !self.pending.is_empty() || matches!(self.vad, Vad::Speaking(_)) {
            return;
        }
        if let Some(p) = &self.utterance_end_pending
            && self.processed >= p.threshold
        {
            let msg = json!({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": p.last_word_end});
            out.push(Action::Send(msg.to_string()));
            self.utterance_end_pending = None;
        }
    }

    /// `{"type":"Finalize"}`: flush everything now.
    pub(crate) fn finalize(&mut self, now: Instant) -> Vec<Action> {
        self.flush_all(now, true).unwrap_or_default()
    }

    /// Flushes everything now (see `finalize_into`); `None` when the stream ended or stalls.
    fn flush_all(&mut self, now: Instant, from_finalize: bool) -> Option<Vec<Action>> {
        if self.ended || self.fault == FaultMode::Stall {
            return None;
        }
        self.last_activity = now;
        let mut out = Vec::new();
        self.finalize_into(from_finalize, &mut out);
        Some(out)
    }

    fn finalize_into(&mut self, from_finalize: bool, out: &mut Vec<Action>) {
        while let Some(p) = self.pending.pop_front() {
            out.push(Action::Send(p.message));
        }
        let end = self.processed;
        let vad = std::mem::replace(
            &mut self.vad,
            Vad::Idle {
                run: 0,
                candidate: 0,
            },
        );
        match vad {
            Vad::Speaking(u) => {
                let message = self.utterance_final(&u, end, [false, false, from_finalize]);
                out.push(Action::Send(message));
            }
            Vad::Idle { .. } => {
                if from_finalize || end > self.window_start {
                    let message = self.results(
                        &[],
                        (end, end),
                        (self.window_start, end),
                        [false, false, from_finalize],
                    );
                    self.window_start = end;
                    out.push(Action::Send(message));
                }
            }
        }
        self.check_utterance_end(out);
    }

    /// `{"type":"CloseStream"}`: final results, `Metadata`, normal close.
    pub(crate) fn close_stream(&mut self, now: Instant) -> Vec<Action> {
        let Some(mut out) = self.flush_all(now, false) else {
            return Vec::new();
        };
        out.push(Action::Send(self.metadata()));
        out.push(Action::Close(1000, ""));
        self.ended = true;
        out
    }

    fn model_info(&self) -> Value {
        let model = &self.params.model;
        let name = if model.starts_with("general") {
            model.clone()
        } else {
            format!("general-{model}")
        };
        json!({"name": name, "version": MODEL_VERSION, "arch": model})
    }

    /// A `Results` message. `words` are spread over the audio span `speech` (samples);
    /// `window` is the audio the result covers (`start` / `duration`).
    /// `flags` = `[interim, speech_final, from_finalize]`.
    fn results(
        &self,
        words: &[Word],
        speech: (u64, u64),
        window: (u64, u64),
        flags: [bool; 3],
    ) -> String {
        let [interim, speech_final, from_finalize] = flags;
        let (a, b) = (self.secs(speech.0), self.secs(speech.1.max(speech.0)));
        let n = words.len();
        let step = if n > 0 { (b - a) / n as f64 } else { 0.0 };
        let mut transcript = String::new();
        let mut words_json = Vec::with_capacity(n);
        for (i, word) in words.iter().enumerate() {
            let start = a + step * i as f64;
            let end = if i + 1 == n { b } else { start + 0.9 * step };
            let confidence = 0.9 + ((i * 37) % 10) as f64 / 100.0;
            let mut w = Map::new();
            w.insert("word".into(), json!(word.plain));
            w.insert("start".into(), json!(r3(start)));
            w.insert("end".into(), json!(r3(end)));
            w.insert("confidence".into(), json!(confidence));
            let shown = if self.params.punctuate {
                w.insert("punctuated_word".into(), json!(word.punctuated));
                &word.punctuated
            } else {
                &word.plain
            };
            if i > 0 {
                transcript.push(' ');
            }
            transcript.push_str(shown);
            words_json.push(Value::Object(w));
        }
        json!({
            "type": "Results",
            "channel_index": [0, 1],
            "duration": r3(self.secs(window.1.saturating_sub(window.0))),
            "start": r3(self.secs(window.0)),
            "is_final": !interim,
            "speech_final": speech_final,
            "channel": {
                "alternatives": [{
                    "transcript": transcript,
                    "confidence": if n > 0 { 0.98 } else { 0.0 },
                    "words": words_json,
                }],
            },
            "metadata": {
                "request_id": self.request_id,
                "model_info": self.model_info(),
                "model_uuid": self.model_uuid,
            },
            "from_finalize": from_finalize,
        })
        .to_string()
    }

    /// The `Metadata` message sent before closing on `CloseStream`. `sha256` is a stand-in
    /// digest of the received audio (64 hex digits), not a real SHA-256.
    fn metadata(&self) -> String {
        let d = self.digest;
        let digest = format!(
            "{d:016x}{:016x}{:016x}{:016x}",
            util::fnv1a(d, b"1"),
            util::fnv1a(d, b"2"),
            util::fnv1a(d, b"3")
        );
        let mut model_info = Map::new();
        model_info.insert(self.model_uuid.clone(), self.model_info());
        json!({
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": digest,
            "created": util::rfc3339_now(),
            "duration": r3(self.secs(self.received_bytes / 2)),
            "channels": 1,
            "models": [self.model_uuid],
            "model_info": model_info,
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FakesConfig, SttFakeConfig};

    const RATE: u32 = 16_000;

    fn tone(ms: u64, amplitude: f64) -> Vec<u8> {
        let n = ms * u64::from(RATE) / 1000;
        (0..n)
            .flat_map(|i| {
                let t = i as f64 / f64::from(RATE);
                let v = (amplitude * 32767.0 * (std::f64::consts::TAU * 220.0 * t).sin()) as i16;
                v.to_le_bytes()
            })
            .collect()
    }

    fn shared(transcripts: &[&str]) -> Shared {
        Shared::new(FakesConfig {
            stt: SttFakeConfig {
                transcripts: transcripts.iter().map(|t| t.to_string()).collect(),
                ..SttFakeConfig::default()
            },
            ..FakesConfig::default()
        })
    }

    fn params(query: &str) -> ListenParams {
        ListenParams::parse(query).unwrap()
    }

    /// A session over `transcripts` for the listen `query`, started at the returned instant.
    fn session(transcripts: &[&str], query: &str, fault: Option<Fault>) -> (Session, Instant) {
        let t0 = Instant::now();
        (
            Session::new(&shared(transcripts), params(query), fault, t0),
            t0,
        )
    }

    /// Streams `audio` in 20 ms messages at real-time pace starting at `t0`; returns every
    /// message sent with its (simulated) send time in ms since `t0`.
    fn stream(session: &mut Session, audio: &[u8], t0: Instant) -> Vec<(u64, Value)> {
        let mut out = Vec::new();
        for (k, chunk) in audio.chunks(640).enumerate() {
            let ms = (k as u64 + 1) * 20;
            let now = t0 + Duration::from_millis(ms);
            for action in session.on_timer(now) {
                if let Action::Send(s) = action {
                    out.push((ms, serde_json::from_str(&s).unwrap()));
                }
            }
            for action in session.on_audio(chunk, now) {
                match action {
                    Action::Send(s) => out.push((ms, serde_json::from_str(&s).unwrap())),
                    other => out.push((ms, json!({"action": format!("{other:?}")}))),
                }
            }
        }
        out
    }

    fn speech_then_silence() -> Vec<u8> {
        let mut audio = vec![0u8; 300 * 32]; // 300 ms silence
        audio.extend(tone(1000, 0.3));
        audio.extend(vec![0u8; 1500 * 32]);
        audio
    }

    /// A session whose words become stable after `stable_ms` of silence.
    fn stable_session(transcript: &str, stable_ms: u64) -> (Session, Instant) {
        let t0 = Instant::now();
        let shared = Shared::new(FakesConfig {
            stt: SttFakeConfig {
                transcripts: vec![transcript.to_owned()],
                stable_after: Some(Duration::from_millis(stable_ms)),
                ..SttFakeConfig::default()
            },
            ..FakesConfig::default()
        });
        let params = params("interim_results=true&punctuate=true&utterance_end_ms=1000");
        (Session::new(&shared, params, None, t0), t0)
    }

    fn finals(msgs: &[(u64, Value)]) -> Vec<(u64, String, bool)> {
        msgs.iter()
            .filter(|(_, m)| m["is_final"] == true)
            .map(|(ms, m)| {
                let text = m["channel"]["alternatives"][0]["transcript"]
                    .as_str()
                    .unwrap();
                (*ms, text.to_owned(), m["speech_final"] == true)
            })
            .collect()
    }

    #[test]
    fn a_short_silence_makes_the_words_so_far_stable_before_the_endpoint() {
        // 2.8 s of speech, then silence.
        let (mut s, t0) = stable_session("What is the weather like in Paris?", 20);
        let mut audio = vec![0u8; 300 * 32];
        audio.extend(tone(2800, 0.3));
        audio.extend(vec![0u8; 1500 * 32]);
        let f = finals(&stream(&mut s, &audio, t0));
        assert_eq!(f.len(), 2, "{f:?}");
        // Speech ends at 3100 ms: the stable words after 20 ms of silence (in the message
        // that brings it), the endpoint's final 150 ms after the end of speech with nothing
        // new.
        assert_eq!(
            (f[0].1.as_str(), f[0].2),
            ("What is the weather like in Paris?", false)
        );
        assert!((3120..=3140).contains(&f[0].0), "{f:?}");
        assert_eq!((f[1].1.as_str(), f[1].2), ("", true));
        assert!((3240..=3280).contains(&f[1].0), "{f:?}");
    }

    #[test]
    fn words_after_a_stable_stretch_are_not_repeated() {
        // 1.2 s of speech, 60 ms of silence, 1.6 s more, then silence.
        let (mut s, t0) = stable_session("What is the | weather like in Paris?", 30);
        let mut audio = tone(1200, 0.3);
        audio.extend(vec![0u8; 60 * 32]);
        audio.extend(tone(1600, 0.3));
        audio.extend(vec![0u8; 1500 * 32]);
        let msgs = stream(&mut s, &audio, t0);
        let f = finals(&msgs);
        assert_eq!(
            f.iter()
                .map(|(_, t, sf)| (t.as_str(), *sf))
                .collect::<Vec<_>>(),
            [
                ("What is the", false),
                ("weather like in Paris?", false),
                ("", true)
            ]
        );
        // Interim results after the stable stretch cover only the words after it.
        let interims: Vec<&str> = msgs
            .iter()
            .filter(|(ms, m)| m["is_final"] == false && *ms > f[0].0)
            .map(|(_, m)| {
                m["channel"]["alternatives"][0]["transcript"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert!(
            interims.iter().all(|t| !t.starts_with("What")),
            "{interims:?}"
        );
    }

    #[test]
    fn params_validation() {
        assert!(ListenParams::parse("encoding=opus").is_err());
        assert!(ListenParams::parse("encoding=linear16&channels=2").is_err());
        assert!(ListenParams::parse("sample_rate=abc").is_err());
        let p =
            params("encoding=linear16&sample_rate=8000&smart_format=true&utterance_end_ms=1000");
        assert_eq!(p.sample_rate, 8000);
        assert!(p.punctuate);
        assert_eq!(p.utterance_end_ms, Some(1000));
    }

    #[test]
    fn utterance_lifecycle_and_timing() {
        let (mut s, t0) = session(
            &["Hello there, world!"],
            "interim_results=true&vad_events=true&utterance_end_ms=1000&punctuate=true",
            None,
        );
        let msgs = stream(&mut s, &speech_then_silence(), t0);
        let kinds: Vec<&str> = msgs
            .iter()
            .map(|(_, m)| m["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds[0], "SpeechStarted");
        assert!((msgs[0].1["timestamp"].as_f64().unwrap() - 0.3).abs() < 0.011);
        // SpeechStarted after min_speech (60 ms) of speech.
        assert!(msgs[0].0 >= 360 && msgs[0].0 <= 400, "{}", msgs[0].0);

        let interims: Vec<_> = msgs
            .iter()
            .filter(|(_, m)| m["is_final"] == false)
            .collect();
        assert!(interims.len() >= 3, "{kinds:?}");
        let first_words = interims[0].1["channel"]["alternatives"][0]["words"]
            .as_array()
            .unwrap()
            .len();
        let last_words = interims.last().unwrap().1["channel"]["alternatives"][0]["words"]
            .as_array()
            .unwrap()
            .len();
        assert!(first_words >= 1 && last_words >= first_words);

        let (final_ms, fin) = msgs.iter().find(|(_, m)| m["is_final"] == true).unwrap();
        assert_eq!(fin["speech_final"], true);
        assert_eq!(fin["from_finalize"], false);
        let alt = &fin["channel"]["alternatives"][0];
        assert_eq!(alt["transcript"], "Hello there, world!");
        let words = alt["words"].as_array().unwrap();
        assert_eq!(words.len(), 3);
        assert_eq!(words[0]["word"], "hello");
        assert_eq!(words[1]["punctuated_word"], "there,");
        assert!((words[0]["start"].as_f64().unwrap() - 0.3).abs() < 0.011);
        assert!((words[2]["end"].as_f64().unwrap() - 1.3).abs() < 0.011);
        // Speech ends at 1300 ms; final due at 1300 + 150 ms, sent with the next message.
        assert!(
            *final_ms >= 1450 && *final_ms <= 1480,
            "final at {final_ms}"
        );
        // The final covers the audio from the start of the stream.
        assert_eq!(fin["start"], 0.0);

        let (ue_ms, ue) = msgs
            .iter()
            .find(|(_, m)| m["type"] == "UtteranceEnd")
            .unwrap();
        assert!((ue["last_word_end"].as_f64().unwrap() - 1.3).abs() < 0.011);
        assert!(*ue_ms >= 2300 && *ue_ms <= 2340, "utterance end at {ue_ms}");
        assert_eq!(kinds.last(), Some(&"UtteranceEnd"));
    }

    #[test]
    fn final_fires_from_timer_without_more_audio() {
        let (mut s, t0) = session(&["one two"], "", None);
        let mut audio = tone(500, 0.3);
        audio.extend(vec![0u8; 100 * 32]); // exactly silence_to_end
        let msgs = stream(&mut s, &audio, t0);
        assert!(
            msgs.is_empty(),
            "no interim_results, final not yet due: {msgs:?}"
        );
        let deadline = s.next_deadline().unwrap();
        // Speech ended at 500 ms (wall), final at +150 ms.
        assert_eq!(deadline, t0 + Duration::from_millis(650));
        let out = s.on_timer(deadline);
        assert_eq!(out.len(), 1);
        let Action::Send(msg) = &out[0] else { panic!() };
        let v: Value = serde_json::from_str(msg).unwrap();
        assert_eq!(v["speech_final"], true);
        assert_eq!(v["channel"]["alternatives"][0]["transcript"], "one two");
    }

    #[test]
    fn audio_is_heard_when_its_message_arrives_not_before() {
        // Speech ends at 600 ms; the client batches: a 50 ms message, then 100 ms ones, each
        // sent when its last sample is captured, so the last voiced audio (580–600 ms) only
        // arrives with the message sent at 650 ms. A recogniser cannot end the turn before it
        // has that audio: the final is due 150 ms after 650 ms, not after 600 ms.
        let (mut s, t0) = session(&["one two"], "", None);
        let mut audio = vec![0u8; 300 * 32];
        audio.extend(tone(300, 0.3));
        audio.extend(vec![0u8; 500 * 32]);
        let (first, rest) = audio.split_at(50 * 32);
        let mut sent_at = 50;
        let mut finals = Vec::new();
        for chunk in std::iter::once(first).chain(rest.chunks(100 * 32)) {
            let now = t0 + Duration::from_millis(sent_at);
            for action in s.on_timer(now).into_iter().chain(s.on_audio(chunk, now)) {
                if let Action::Send(m) = action
                    && m.contains("speech_final\":true")
                {
                    finals.push(sent_at);
                }
            }
            if let Some(due) = s.next_deadline() {
                assert!(
                    due >= t0 + Duration::from_millis(800),
                    "final due at {due:?}"
                );
            }
            sent_at += 100;
        }
        assert_eq!(finals.len(), 1, "{finals:?}");
        assert!(finals[0] >= 800, "{finals:?}");
    }

    #[test]
    fn finalize_flushes_and_transcripts_cycle() {
        let (mut s, t0) = session(&["first", "second"], "", None);
        stream(&mut s, &tone(400, 0.3), t0);
        let out = s.finalize(t0 + Duration::from_millis(500));
        let Action::Send(msg) = &out[0] else { panic!() };
        let v: Value = serde_json::from_str(msg).unwrap();
        assert_eq!(v["is_final"], true);
        assert_eq!(v["speech_final"], false);
        assert_eq!(v["from_finalize"], true);
        assert_eq!(v["channel"]["alternatives"][0]["transcript"], "first");
        // Nothing in progress: an empty from_finalize result.
        let out = s.finalize(t0 + Duration::from_millis(600));
        let Action::Send(msg) = &out[0] else { panic!() };
        let v: Value = serde_json::from_str(msg).unwrap();
        assert_eq!(v["from_finalize"], true);
        assert_eq!(v["channel"]["alternatives"][0]["transcript"], "");
        // The next utterance gets the next transcript.
        stream(&mut s, &tone(400, 0.3), t0 + Duration::from_secs(1));
        let out = s.close_stream(t0 + Duration::from_secs(2));
        let Action::Send(msg) = &out[0] else { panic!() };
        let v: Value = serde_json::from_str(msg).unwrap();
        assert_eq!(v["channel"]["alternatives"][0]["transcript"], "second");
        assert_eq!(v["from_finalize"], false);
        let Action::Send(meta) = &out[1] else {
            panic!()
        };
        let meta: Value = serde_json::from_str(meta).unwrap();
        assert_eq!(meta["type"], "Metadata");
        assert_eq!(meta["duration"], 0.8);
        assert_eq!(meta["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(out[2], Action::Close(1000, ""));
        assert!(
            s.on_audio(&tone(100, 0.3), t0 + Duration::from_secs(3))
                .is_empty()
        );
    }

    #[test]
    fn quiet_audio_is_not_speech_and_idle_times_out() {
        let (mut s, t0) = session(&["x"], "vad_events=true&interim_results=true", None);
        // -50 dBFS RMS tone: below the -40 dBFS threshold.
        assert!(stream(&mut s, &tone(1000, 0.0045), t0).is_empty());
        let deadline = s.next_deadline().unwrap();
        assert_eq!(
            deadline,
            t0 + Duration::from_millis(1000) + Duration::from_secs(10)
        );
        assert_eq!(s.on_timer(deadline), vec![Action::Close(1011, "NET-0001")]);
    }

    #[test]
    fn faults_fire_after_first_interim() {
        let (mut s, t0) = session(
            &["a b c"],
            "interim_results=true",
            Some(Fault::DropMidStream),
        );
        let msgs = stream(&mut s, &tone(1000, 0.3), t0);
        assert_eq!(msgs.len(), 2, "{msgs:?}");
        assert_eq!(msgs[0].1["is_final"], false);
        assert_eq!(msgs[1].1["action"], "Drop");

        let (mut s, t0) = session(&["a b c"], "", Some(Fault::MidStreamError));
        let mut out = Vec::new();
        for chunk in tone(1000, 0.3).chunks(640) {
            out.extend(s.on_audio(chunk, t0));
        }
        assert_eq!(out, vec![Action::Close(1011, "DATA-0000")]);

        let (mut s, t0) = session(&["a b c"], "vad_events=true", Some(Fault::Stall));
        assert!(stream(&mut s, &speech_then_silence(), t0).is_empty());
        assert!(s.close_stream(t0).is_empty());
        assert!(s.next_deadline().is_none());
    }

    #[test]
    fn odd_sized_messages_are_reassembled() {
        let (mut s, t0) = session(&["odd"], "vad_events=true", None);
        let audio = tone(300, 0.3);
        let mut started = false;
        for chunk in audio.chunks(333) {
            for a in s.on_audio(chunk, t0) {
                started |= matches!(a, Action::Send(ref m) if m.contains("SpeechStarted"));
            }
        }
        assert!(started);
        assert_eq!(s.processed, 300 * 16);
    }
}
