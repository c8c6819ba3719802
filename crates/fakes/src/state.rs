//! State shared by every handler: configuration, fault queues and the recorder.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stt::Transcript;
use crate::{FakesConfig, Fault, RECORD_CAP, Recorded, ScriptedReply, Target, Usage};

/// Everything the handlers share.
pub(crate) struct Shared {
    /// The configuration the fakes were started with.
    pub(crate) config: FakesConfig,
    /// Configured STT transcripts, pre-split into words.
    pub(crate) transcripts: Arc<[Transcript]>,
    /// One FIFO of pending faults per target.
    faults: Mutex<[VecDeque<Fault>; 4]>,
    /// One FIFO of scripted replies per target.
    scripts: Mutex<[VecDeque<ScriptedReply>; 4]>,
    /// What was received.
    pub(crate) recorder: Recorder,
    /// Cancelled when the fakes shut down; every stream and session watches it.
    pub(crate) shutdown: CancellationToken,
}

impl Shared {
    pub(crate) fn new(config: FakesConfig) -> Self {
        let transcripts = config
            .stt
            .transcripts
            .iter()
            .map(|t| Transcript::new(t))
            .collect();
        Self {
            config,
            transcripts,
            faults: Mutex::new(Default::default()),
            scripts: Mutex::new(Default::default()),
            recorder: Recorder::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Queues a fault for the next request of `target`.
    pub(crate) fn inject(&self, target: Target, fault: Fault) {
        tracing::debug!(?target, ?fault, "fault queued");
        lock(&self.faults)[index(target)].push_back(fault);
    }

    /// Takes the next queued fault of `target`, if any.
    pub(crate) fn take_fault(&self, target: Target) -> Option<Fault> {
        let fault = lock(&self.faults)[index(target)].pop_front();
        if let Some(fault) = &fault {
            tracing::debug!(?target, ?fault, "fault applied");
        }
        fault
    }

    /// What an HTTP fake first does with a request to `target`: notes when it arrived, takes
    /// the fault armed for `target`, and parses the body as JSON.
    pub(crate) fn receive(
        &self,
        target: Target,
        headers: &axum::http::HeaderMap,
        body: &[u8],
    ) -> (
        Instant,
        Option<Fault>,
        serde_json::Result<serde_json::Value>,
    ) {
        let started = Instant::now();
        self.recorder.trace_context(target, headers);
        let fault = self.take_fault(target);
        (started, fault, serde_json::from_slice(body))
    }
}

impl Shared {
    /// Queues the reply of the next answered request of `target`.
    pub(crate) fn script(&self, target: Target, reply: ScriptedReply) {
        tracing::debug!(?target, calls = reply.tool_calls.len(), "reply scripted");
        lock(&self.scripts)[index(target)].push_back(reply);
    }

    /// Takes the next scripted reply of `target`, if any.
    pub(crate) fn take_script(&self, target: Target) -> Option<ScriptedReply> {
        lock(&self.scripts)[index(target)].pop_front()
    }
}

fn index(target: Target) -> usize {
    match target {
        Target::Stt => 0,
        Target::Anthropic => 1,
        Target::OpenAiChat => 2,
        Target::OpenAiTts => 3,
    }
}

/// Locks a mutex, recovering from poisoning (a panicking handler must not wedge the fakes).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Lists {
    llm_requests: VecDeque<(Target, serde_json::Value)>,
    tts_inputs: VecDeque<String>,
    stt_connections: VecDeque<String>,
    traceparents: VecDeque<(Target, String)>,
}

/// Records requests with bounded memory (each list keeps the last [`RECORD_CAP`] entries).
#[derive(Default)]
pub(crate) struct Recorder {
    lists: Mutex<Lists>,
    pub(crate) stt_keepalives: AtomicU64,
    pub(crate) stt_finalizes: AtomicU64,
    pub(crate) stt_close_streams: AtomicU64,
    pub(crate) stt_audio_bytes: AtomicU64,
    pub(crate) stt_audio_messages: AtomicU64,
    /// What the providers would bill (shared with the streams that are still running).
    pub(crate) usage: Arc<Meter>,
}

/// What the fakes would bill, the way the real providers bill: every accepted model request its
/// prompt, and its output as reported when the stream finished or, when the client went away
/// first, the text generated until then; every accepted speech request its characters; the
/// recogniser the audio it received.
#[derive(Default)]
pub(crate) struct Meter {
    llm_requests: AtomicU64,
    llm_settled: AtomicU64,
    llm_cut: AtomicU64,
    llm_cut_last_tokens: AtomicU64,
    llm_input_tokens: AtomicU64,
    llm_output_tokens: AtomicU64,
    tts_requests: AtomicU64,
    tts_chars: AtomicU64,
    stt_audio_ns: AtomicU64,
}

impl Meter {
    /// A model request was accepted with a prompt of `input_tokens`.
    pub(crate) fn llm_request(&self, input_tokens: u64) {
        Recorder::add(&self.llm_requests, 1);
        Recorder::add(&self.llm_input_tokens, input_tokens);
    }

    /// A model stream ended: `output_tokens` billed; `cut` when the client left before the end,
    /// its last text event then carrying `last_tokens`.
    pub(crate) fn llm_output(&self, output_tokens: u64, cut: Option<u64>) {
        Recorder::add(&self.llm_output_tokens, output_tokens);
        Recorder::add(&self.llm_settled, 1);
        if let Some(last_tokens) = cut {
            Recorder::add(&self.llm_cut, 1);
            Recorder::add(&self.llm_cut_last_tokens, last_tokens);
        }
    }

    /// A speech request was accepted with `chars` characters.
    pub(crate) fn tts_request(&self, chars: usize) {
        Recorder::add(&self.tts_requests, 1);
        Recorder::add(&self.tts_chars, chars as u64);
    }

    /// `bytes` of 16-bit mono audio at `rate` reached the recogniser.
    pub(crate) fn stt_audio(&self, bytes: usize, rate: u32) {
        let ns = (bytes as u128 / 2) * 1_000_000_000 / u128::from(rate.max(1));
        Recorder::add(&self.stt_audio_ns, u64::try_from(ns).unwrap_or(u64::MAX));
    }

    pub(crate) fn snapshot(&self) -> Usage {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Usage {
            llm_requests: get(&self.llm_requests),
            llm_cut_requests: get(&self.llm_cut),
            llm_cut_last_tokens: get(&self.llm_cut_last_tokens),
            llm_open_streams: get(&self.llm_requests).saturating_sub(get(&self.llm_settled)),
            llm_input_tokens: get(&self.llm_input_tokens),
            llm_output_tokens: get(&self.llm_output_tokens),
            tts_requests: get(&self.tts_requests),
            tts_chars: get(&self.tts_chars),
            stt_audio_seconds: get(&self.stt_audio_ns) as f64 / 1e9,
        }
    }

    fn clear(&self) {
        for c in [
            &self.llm_requests,
            &self.llm_settled,
            &self.llm_cut,
            &self.llm_cut_last_tokens,
            &self.llm_input_tokens,
            &self.llm_output_tokens,
            &self.tts_requests,
            &self.tts_chars,
            &self.stt_audio_ns,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The bill of one model stream, settled when the stream ends or is dropped: the reported
/// output when its last event was sent, otherwise the text generated so far at
/// [`estimate_tokens`](crate::util::estimate_tokens)'s rate, and never less than the output
/// count an event already reported (what a provider bills for a cancelled stream is its own
/// count; the fakes' count is this one).
pub(crate) struct StreamBill {
    meter: Arc<Meter>,
    chars: usize,
    /// Characters of the last text event.
    last_chars: usize,
    /// Output tokens an event reported so far (Anthropic's `message_start` says 1).
    reported: u64,
    settled: bool,
}

impl StreamBill {
    pub(crate) fn new(meter: Arc<Meter>) -> Self {
        Self {
            meter,
            chars: 0,
            last_chars: 0,
            reported: 0,
            settled: false,
        }
    }

    /// Text (or call arguments) of `chars` characters was sent.
    pub(crate) fn generated(&mut self, chars: usize) {
        self.chars += chars;
        self.last_chars = chars;
    }

    /// An event reporting `output_tokens` so far was sent.
    pub(crate) fn reported(&mut self, output_tokens: u64) {
        self.reported = self.reported.max(output_tokens);
    }

    /// The stream's last event, reporting `output_tokens`, was sent.
    pub(crate) fn finished(&mut self, output_tokens: u64) {
        if !self.settled {
            self.settled = true;
            self.meter.llm_output(output_tokens, None);
        }
    }
}

impl Drop for StreamBill {
    fn drop(&mut self) {
        if !self.settled {
            let estimate = crate::util::estimate_tokens(self.chars);
            let last = crate::util::estimate_tokens(self.last_chars);
            self.meter
                .llm_output(estimate.max(self.reported), Some(last));
        }
    }
}

fn push_capped<T>(list: &mut VecDeque<T>, item: T) {
    if list.len() >= RECORD_CAP {
        list.pop_front();
    }
    list.push_back(item);
}

impl Recorder {
    pub(crate) fn llm_request(&self, target: Target, body: serde_json::Value) {
        push_capped(&mut lock(&self.lists).llm_requests, (target, body));
    }

    pub(crate) fn tts_input(&self, input: String) {
        push_capped(&mut lock(&self.lists).tts_inputs, input);
    }

    pub(crate) fn stt_connection(&self, query: String) {
        push_capped(&mut lock(&self.lists).stt_connections, query);
    }

    /// Notes the W3C trace context a request to `target` carried, if any.
    pub(crate) fn trace_context(&self, target: Target, headers: &axum::http::HeaderMap) {
        if let Some(t) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
            push_capped(&mut lock(&self.lists).traceparents, (target, t.to_owned()));
        }
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Recorded {
        let lists = lock(&self.lists);
        Recorded {
            llm_requests: lists.llm_requests.iter().cloned().collect(),
            tts_inputs: lists.tts_inputs.iter().cloned().collect(),
            stt_connections: lists.stt_connections.iter().cloned().collect(),
            traceparents: lists.traceparents.iter().cloned().collect(),
            stt_keepalives: self.stt_keepalives.load(Ordering::Relaxed),
            stt_finalizes: self.stt_finalizes.load(Ordering::Relaxed),
            stt_close_streams: self.stt_close_streams.load(Ordering::Relaxed),
            stt_audio_bytes: self.stt_audio_bytes.load(Ordering::Relaxed),
            stt_audio_messages: self.stt_audio_messages.load(Ordering::Relaxed),
            usage: self.usage.snapshot(),
        }
    }

    pub(crate) fn clear(&self) {
        *lock(&self.lists) = Lists::default();
        self.usage.clear();
        for counter in [
            &self.stt_keepalives,
            &self.stt_finalizes,
            &self.stt_close_streams,
            &self.stt_audio_bytes,
            &self.stt_audio_messages,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_billed_once_by_what_it_sent() {
        let meter = Arc::new(Meter::default());
        meter.llm_request(10);
        meter.llm_request(20);
        meter.llm_request(30);
        meter.llm_request(0);
        // Finished: the reported count, once.
        let mut whole = StreamBill::new(meter.clone());
        whole.generated(400);
        whole.finished(7);
        whole.finished(8);
        drop(whole);
        // Cut after 9 characters: three tokens at four characters each.
        let mut cut = StreamBill::new(meter.clone());
        cut.generated(5);
        cut.generated(4);
        drop(cut);
        // Cut after `message_start` reported one token, before any text: that token.
        let mut early = StreamBill::new(meter.clone());
        early.reported(1);
        drop(early);
        let open = meter.snapshot();
        assert_eq!(open.llm_open_streams, 1);
        drop(StreamBill::new(meter.clone()));
        meter.stt_audio(32_000, 16_000);
        meter.tts_request(12);
        let u = meter.snapshot();
        assert_eq!(u.llm_requests, 4);
        assert_eq!(u.llm_input_tokens, 60);
        assert_eq!(u.llm_output_tokens, 7 + 3 + 1);
        assert_eq!(u.llm_cut_requests, 3);
        // What may have been on its way when each was cut: its last text event.
        assert_eq!(u.llm_cut_last_tokens, 1);
        assert_eq!(u.llm_open_streams, 0);
        assert_eq!((u.tts_requests, u.tts_chars), (1, 12));
        assert!((u.stt_audio_seconds - 1.0).abs() < 1e-9);
        meter.clear();
        assert_eq!(meter.snapshot(), Usage::default());
    }

    #[test]
    fn faults_are_fifo_per_target() {
        let shared = Shared::new(FakesConfig::default());
        shared.inject(Target::Anthropic, Fault::Stall);
        shared.inject(
            Target::Anthropic,
            Fault::Status {
                status: 529,
                retry_after_s: None,
            },
        );
        shared.inject(Target::Stt, Fault::DropMidStream);
        assert!(shared.take_fault(Target::OpenAiChat).is_none());
        assert!(matches!(
            shared.take_fault(Target::Anthropic),
            Some(Fault::Stall)
        ));
        assert!(matches!(
            shared.take_fault(Target::Anthropic),
            Some(Fault::Status { status: 529, .. })
        ));
        assert!(shared.take_fault(Target::Anthropic).is_none());
        assert!(matches!(
            shared.take_fault(Target::Stt),
            Some(Fault::DropMidStream)
        ));
    }

    #[test]
    fn scripts_are_fifo_per_target() {
        let shared = Shared::new(FakesConfig::default());
        shared.script(Target::Anthropic, ScriptedReply::text("one"));
        shared.script(Target::Anthropic, ScriptedReply::call("t", "{}"));
        assert!(shared.take_script(Target::OpenAiChat).is_none());
        assert_eq!(
            shared.take_script(Target::Anthropic),
            Some(ScriptedReply::text("one"))
        );
        assert_eq!(
            shared.take_script(Target::Anthropic),
            Some(ScriptedReply::call("t", "{}"))
        );
        assert!(shared.take_script(Target::Anthropic).is_none());
    }

    #[test]
    fn recorder_is_capped() {
        let rec = Recorder::default();
        for i in 0..RECORD_CAP + 5 {
            rec.tts_input(i.to_string());
        }
        let snap = rec.snapshot();
        assert_eq!(snap.tts_inputs.len(), RECORD_CAP);
        assert_eq!(snap.tts_inputs[0], "5");
        rec.clear();
        assert!(rec.snapshot().tts_inputs.is_empty());
    }
}
