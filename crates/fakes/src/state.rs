//! State shared by every handler: configuration, fault queues and the recorder.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

use crate::stt::Transcript;
use crate::{FakesConfig, Fault, RECORD_CAP, Recorded, ScriptedReply, Target};

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

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Recorded {
        let lists = lock(&self.lists);
        Recorded {
            llm_requests: lists.llm_requests.iter().cloned().collect(),
            tts_inputs: lists.tts_inputs.iter().cloned().collect(),
            stt_connections: lists.stt_connections.iter().cloned().collect(),
            stt_keepalives: self.stt_keepalives.load(Ordering::Relaxed),
            stt_finalizes: self.stt_finalizes.load(Ordering::Relaxed),
            stt_close_streams: self.stt_close_streams.load(Ordering::Relaxed),
            stt_audio_bytes: self.stt_audio_bytes.load(Ordering::Relaxed),
            stt_audio_messages: self.stt_audio_messages.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn clear(&self) {
        *lock(&self.lists) = Lists::default();
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
