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
