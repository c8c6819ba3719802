//! Local speech recognition: the [`Endpointer`] finds utterances in the session's audio and
//! the Whisper worker transcribes each one.
//!
//! Whisper is not a streaming recogniser. The session hears `SpeechStarted` as soon as the
//! detector is sure (for barge-in); while the person goes on speaking, the growing utterance
//! is re-decoded at a bounded cadence ([`PartialCadence`]) for `Partial` transcripts — only
//! when the engine is idle, one at a time, and cancelled (stopped inside the worker) when the
//! utterance ends; at the cut `SpeechEnded` (so the end-of-turn model can judge the pause
//! while Whisper transcribes), then one final transcript per utterance, followed by
//! `UtteranceEnd`.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use atlas_providers::ProviderError;
use atlas_providers::stt::{SttCommand, SttEvent, SttOptions, SttProvider, SttStream};
use tokio::sync::mpsc;

use crate::ipc::{Reply, Request};
use crate::vad::{EndpointConfig, Endpointer, RATE, Utterance, VadEvent};
use crate::worker::Worker;

/// When the growing utterance is decoded for a partial transcript.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialCadence {
    /// Speech (from the utterance's start) before the first partial, ms.
    pub first_ms: u32,
    /// New speech between two partials, ms.
    pub every_ms: u32,
}

impl Default for PartialCadence {
    fn default() -> Self {
        PartialCadence {
            first_ms: 700,
            every_ms: 700,
        }
    }
}

impl PartialCadence {
    /// Whether a partial is due for an utterance of `len` samples when the previous one was
    /// taken at `last` samples (0: none yet).
    pub fn due(&self, len: usize, last: usize) -> bool {
        let samples = |ms: u32| ms as usize * RATE as usize / 1000;
        len >= samples(self.first_ms) && len >= last + samples(self.every_ms)
    }
}

/// Whisper behind a local endpointer.
#[derive(Debug)]
pub struct LocalStt {
    worker: Arc<Worker>,
    model: String,
    endpoint: EndpointConfig,
    partials: Option<PartialCadence>,
}

impl LocalStt {
    /// An adapter over a started Whisper worker; `partials` turns interim transcripts on.
    pub fn new(
        worker: Arc<Worker>,
        model: impl Into<String>,
        endpoint: EndpointConfig,
        partials: Option<PartialCadence>,
    ) -> Self {
        LocalStt {
            worker,
            model: model.into(),
            endpoint,
            partials,
        }
    }

    /// Transcribes 16 kHz audio directly (no endpointing).
    pub async fn transcribe(
        &self,
        audio: &[i16],
        language: Option<String>,
    ) -> Result<String, ProviderError> {
        transcribe(&self.worker, audio, language, false).await
    }
}

async fn transcribe(
    worker: &Worker,
    audio: &[i16],
    language: Option<String>,
    partial: bool,
) -> Result<String, ProviderError> {
    let payload: Vec<u8> = audio.iter().flat_map(|s| s.to_le_bytes()).collect();
    let mut ticket = worker
        .submit(
            |id| Request::Transcribe {
                id,
                language,
                partial,
            },
            &payload,
        )
        .await?;
    match ticket.next().await? {
        Reply::Transcript { text, .. } => Ok(clean(&text)),
        Reply::Failed { message, .. } => Err(ProviderError::Stream {
            kind: "transcription_failed".into(),
            message,
        }),
        other => Err(ProviderError::Protocol(format!(
            "unexpected reply {other:?}"
        ))),
    }
}

/// The most tokens Whisper may produce for `samples` of 16 kHz audio: a fast speaker's rate
/// (about 5 tokens a second) with a wide margin, and never more than 128 (48 for a partial).
/// A decoding loop ("What is 3 times? What is 3 times? …") otherwise runs to the fixed cap
/// and holds the engine for seconds on a two-second question.
pub fn max_tokens(samples: usize, partial: bool) -> i32 {
    let seconds = samples / 16_000 + 1;
    let cap = if partial { 48 } else { 128 };
    (16 + 8 * seconds).min(cap) as i32
}

/// Drops Whisper's non-speech annotations (`[BLANK_AUDIO]`, `(music)`, `*laughs*`) and
/// collapses whitespace.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0i32;
    let mut star = false;
    for c in text.chars() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' => depth = (depth - 1).max(0),
            '*' => star = !star,
            _ if depth == 0 && !star => out.push(c),
            _ => {}
        }
    }
    let text = out.split_whitespace().collect::<Vec<_>>().join(" ");
    without_repeats(&text)
}

/// Drops a sentence that repeats the one before it: Whisper sometimes loops on a short
/// stretch of audio ("What is 3 times? What is 3 times? …"), which no one said.
fn without_repeats(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = "";
    // `text` has single spaces: a sentence ends at a mark followed by a space (so "3.5" is
    // one word).
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        let end = i + 1 == bytes.len();
        let boundary =
            matches!(b, b'.' | b'?' | b'!') && bytes.get(i + 1).is_none_or(|n| *n == b' ');
        if !(boundary || end) {
            continue;
        }
        let sentence = text[start..=i].trim();
        start = i + 1;
        if sentence.is_empty() || sentence.eq_ignore_ascii_case(last) {
            continue;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(sentence);
        last = sentence;
    }
    out
}

#[async_trait]
impl SttProvider for LocalStt {
    local_identity!();

    fn input_rate(&self, _client_rate: u32) -> u32 {
        RATE
    }

    fn partials(&self) -> bool {
        // Its partials come after `ATLAS_LOCAL_STT_PARTIAL_MS` of new speech plus an
        // inference: too late to decide a barge-in by the words.
        false
    }

    async fn connect(&self, options: SttOptions) -> Result<SttStream, ProviderError> {
        if options.sample_rate != RATE {
            return Err(ProviderError::Protocol(format!(
                "the local recogniser takes {RATE} Hz audio, not {}",
                options.sample_rate
            )));
        }
        let (commands, command_rx) = mpsc::channel(64);
        let (event_tx, events) = mpsc::channel(64);
        let session = StreamTask {
            worker: self.worker.clone(),
            language: options.language.or_else(|| Some("en".into())),
            endpointer: Endpointer::new(self.endpoint.clone()),
            events: event_tx,
            carry: None,
            samples: Vec::with_capacity(4096),
            vad: Vec::new(),
            cadence: self.partials,
            partial: None,
            partial_at: 0,
            partial_text: String::new(),
        };
        tokio::spawn(session.run(command_rx));
        Ok(SttStream { commands, events })
    }
}

type Transcription =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, ProviderError>> + Send>>;

/// The transcription in progress, the stream sample where its speech ended, and whether it
/// answers a `Finalize`.
type Running = (Transcription, u64, bool);

struct Job {
    utterance: Utterance,
    from_finalize: bool,
}

struct StreamTask {
    worker: Arc<Worker>,
    language: Option<String>,
    endpointer: Endpointer,
    events: mpsc::Sender<Result<SttEvent, ProviderError>>,
    /// Odd byte left from the previous chunk.
    carry: Option<u8>,
    samples: Vec<i16>,
    vad: Vec<VadEvent>,
    cadence: Option<PartialCadence>,
    /// The partial decode in flight (dropping it cancels it in the worker).
    partial: Option<Transcription>,
    /// Utterance length when the last partial was taken.
    partial_at: usize,
    /// The last partial sent, so an unchanged one is not repeated.
    partial_text: String,
}

fn seconds(sample: u64) -> f64 {
    sample as f64 / RATE as f64
}

impl StreamTask {
    async fn run(mut self, mut commands: mpsc::Receiver<SttCommand>) {
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut closing = false;
        let mut running: Option<Running> = None;
        loop {
            if running.is_none() {
                if let Some(job) = queue.pop_front() {
                    let worker = self.worker.clone();
                    let language = self.language.clone();
                    let end = job.utterance.speech_end;
                    let audio = job.utterance.audio;
                    running = Some((
                        Box::pin(async move { transcribe(&worker, &audio, language, false).await }),
                        end,
                        job.from_finalize,
                    ));
                } else if closing {
                    return;
                }
            }
            tokio::select! {
                command = commands.recv(), if !closing => match command {
                    Some(SttCommand::Audio(pcm)) => {
                        self.decode(&pcm);
                        let samples = std::mem::take(&mut self.samples);
                        self.endpointer.push(&samples, &mut self.vad);
                        self.samples = samples;
                        for event in std::mem::take(&mut self.vad) {
                            self.reset_partial();
                            match event {
                                VadEvent::SpeechStarted { at } => {
                                    let e = SttEvent::SpeechStarted { at_s: Some(seconds(at)) };
                                    if self.events.send(Ok(e)).await.is_err() {
                                        return;
                                    }
                                }
                                VadEvent::Utterance(utterance) => {
                                    // The cut first: an end-of-turn decision can start while
                                    // Whisper transcribes.
                                    let e = SttEvent::SpeechEnded { at_s: Some(seconds(utterance.speech_end)) };
                                    if self.events.send(Ok(e)).await.is_err() {
                                        return;
                                    }
                                    queue.push_back(Job { utterance, from_finalize: false });
                                }
                            }
                        }
                        if running.is_none() && queue.is_empty() {
                            self.maybe_partial();
                        }
                    }
                    Some(SttCommand::Finalize) => {
                        self.reset_partial();
                        if let Some(utterance) = self.endpointer.flush() {
                            queue.push_back(Job { utterance, from_finalize: true });
                        } else if let Some(job) = queue.back_mut() {
                            job.from_finalize = true;
                        } else if let Some((_, _, from_finalize)) = running.as_mut() {
                            *from_finalize = true;
                        } else {
                            let e = SttEvent::Final { text: String::new(), speech_final: true, from_finalize: true, speech_end_s: None };
                            if self.events.send(Ok(e)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(SttCommand::Close) | None => {
                        closing = true;
                        self.reset_partial();
                        if let Some(utterance) = self.endpointer.flush() {
                            queue.push_back(Job { utterance, from_finalize: false });
                        }
                    }
                },
                result = async { self.partial.as_mut().expect("guarded").as_mut().await }, if self.partial.is_some() => {
                    self.partial = None;
                    match result {
                        Ok(text) if !text.is_empty() && text != self.partial_text => {
                            self.partial_text.clone_from(&text);
                            if self.events.send(Ok(SttEvent::Partial { text })).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        // A partial is a courtesy: the final transcript still comes.
                        Err(e) => tracing::debug!(error = %e, "partial transcription failed"),
                    }
                }
                result = async { running.as_mut().expect("guarded").0.as_mut().await }, if running.is_some() => {
                    let (_, end, from_finalize) = running.take().expect("guarded");
                    let end_s = Some(seconds(end));
                    match result {
                        Ok(text) => {
                            let fin = SttEvent::Final { text, speech_final: true, from_finalize, speech_end_s: end_s };
                            if self.events.send(Ok(fin)).await.is_err()
                                || self.events.send(Ok(SttEvent::UtteranceEnd { last_word_end_s: end_s })).await.is_err()
                            {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = self.events.send(Err(e)).await;
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Forgets the current utterance's partial (cancelling one in flight).
    fn reset_partial(&mut self) {
        self.partial = None;
        self.partial_at = 0;
        self.partial_text.clear();
    }

    /// Starts a partial decode of the utterance so far if one is due and the engine is idle
    /// (so partials never delay anyone's final transcript).
    fn maybe_partial(&mut self) {
        let Some(cadence) = self.cadence else { return };
        if self.partial.is_some() || self.worker.in_flight() > 0 {
            return;
        }
        let Some(audio) = self.endpointer.utterance_so_far() else {
            return;
        };
        if !cadence.due(audio.len(), self.partial_at) {
            return;
        }
        self.partial_at = audio.len();
        let audio = audio.to_vec();
        let worker = self.worker.clone();
        let language = self.language.clone();
        self.partial = Some(Box::pin(async move {
            transcribe(&worker, &audio, language, true).await
        }));
    }

    fn decode(&mut self, pcm: &[u8]) {
        self.samples.clear();
        let mut bytes = pcm;
        if let Some(first) = self.carry.take() {
            if let Some((&b, rest)) = bytes.split_first() {
                self.samples.push(i16::from_le_bytes([first, b]));
                bytes = rest;
            } else {
                self.carry = Some(first);
            }
        }
        let mut chunks = bytes.chunks_exact(2);
        self.samples
            .extend((&mut chunks).map(|c| i16::from_le_bytes([c[0], c[1]])));
        if let [b] = chunks.remainder() {
            self.carry = Some(*b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{PartialCadence, clean, max_tokens};

    #[test]
    fn the_token_cap_follows_the_audio() {
        // Two seconds of speech: room for ~40 tokens, three times a fast speaker's.
        assert_eq!(max_tokens(2 * 16_000, false), 40);
        assert!(max_tokens(2 * 16_000, false) >= 3 * 2 * 5);
        // Long utterances and partials keep their fixed caps.
        assert_eq!(max_tokens(30 * 16_000, false), 128);
        assert_eq!(max_tokens(10 * 16_000, true), 48);
        assert_eq!(max_tokens(0, false), 24);
    }

    #[test]
    fn partials_come_at_a_bounded_cadence() {
        let c = PartialCadence {
            first_ms: 700,
            every_ms: 500,
        };
        let ms = |n: usize| n * 16;
        assert!(!c.due(ms(600), 0));
        assert!(c.due(ms(700), 0));
        assert!(!c.due(ms(1100), ms(700)));
        assert!(c.due(ms(1200), ms(700)));
    }

    #[test]
    fn annotations_are_removed() {
        assert_eq!(clean(" [BLANK_AUDIO]"), "");
        assert_eq!(
            clean(" Hello (music) there  *laughs* friend."),
            "Hello there friend."
        );
        assert_eq!(
            clean("What is the capital of France?"),
            "What is the capital of France?"
        );
        assert_eq!(clean("unbalanced ] bracket"), "unbalanced bracket");
    }

    #[test]
    fn a_decoding_loop_is_cut_to_one_sentence() {
        assert_eq!(
            clean("What is 3 times? What is 3 times? what is 3 times? What is 3 time"),
            "What is 3 times? What is 3 time"
        );
        assert_eq!(clean("No. No. Really, no."), "No. Really, no.");
        assert_eq!(clean("It costs 3.5 dollars."), "It costs 3.5 dollars.");
        assert_eq!(clean("Hello there"), "Hello there");
    }
}
