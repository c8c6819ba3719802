//! Provider adapters: speech-to-text, language models and text-to-speech, each behind a trait.
//!
//! # Layout
//! - [`stt`]: [`stt::SttProvider`] and the Deepgram live-streaming adapter (`stt/deepgram.rs`).
//! - [`llm`]: [`llm::LlmProvider`], the Anthropic Messages adapter (`llm/anthropic.rs`) and the
//!   OpenAI-compatible Chat Completions adapter (`llm/openai_compat.rs`).
//! - [`tts`]: [`tts::TtsProvider`] and the OpenAI speech adapter (`tts/openai.rs`).
//! - [`ProviderError`], [`HttpSettings`] and the retry policy shared by the HTTP adapters.
//!
//! # Invariants
//! - Each adapter speaks its provider's real wire protocol; nothing outside its module knows
//!   that protocol's shapes.
//! - Every network call has a timeout; streams have an idle timeout between chunks.
//! - Dropping a returned stream aborts the underlying request at once (barge-in relies on it).
//! - API keys are held as `SecretString` and never logged.

pub mod llm;
pub mod stt;
pub mod tts;

mod error;
mod http;

pub use error::ProviderError;
pub use http::HttpSettings;

#[cfg(test)]
pub(crate) mod test_support {
    //! Feeding documented payloads to the stream parsers.

    use futures_util::StreamExt;

    use crate::ProviderError;
    use crate::llm::{LlmEvent, LlmStream};

    /// The fixture file at `path` (under `tests/fixtures/`) as a byte stream cut into
    /// `piece`-byte chunks, so parsers are tested across arbitrary chunk boundaries.
    pub fn fixture_stream(
        path: &str,
        piece: usize,
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static
    {
        let data = std::fs::read(format!(
            "{}/tests/fixtures/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let chunks: Vec<Result<bytes::Bytes, ProviderError>> = data
            .chunks(piece)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(chunks)
    }

    /// Every item of a completion stream.
    pub async fn collect(stream: LlmStream) -> Vec<Result<LlmEvent, ProviderError>> {
        stream.collect().await
    }
}
