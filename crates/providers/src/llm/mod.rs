//! Language models: the [`LlmProvider`] trait and its adapters.

pub mod anthropic;
pub mod openai_compat;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::ProviderError;

/// Speaker of a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatRole {
    /// The person.
    User,
    /// The assistant.
    Assistant,
}

/// One message of the conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// Speaker.
    pub role: ChatRole,
    /// Text.
    pub text: String,
}

/// A streamed completion request.
#[derive(Clone, Debug)]
pub struct LlmRequest {
    /// Server-configured system prompt.
    pub system: String,
    /// Conversation, oldest first, starting with the user.
    pub messages: Vec<ChatMessage>,
    /// Output token cap.
    pub max_tokens: u32,
    /// Sampling temperature, provider default when `None`.
    pub temperature: Option<f32>,
}

/// Token counts as the provider reported them. Each report carries the latest totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlmUsage {
    /// Input tokens (uncached).
    pub input_tokens: Option<u64>,
    /// Output tokens so far.
    pub output_tokens: Option<u64>,
    /// Input tokens read from the prompt cache.
    pub cache_read_input_tokens: Option<u64>,
    /// Input tokens written to the prompt cache.
    pub cache_creation_input_tokens: Option<u64>,
}

/// One item of a completion stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LlmEvent {
    /// More text.
    Delta(String),
    /// Updated usage totals.
    Usage(LlmUsage),
    /// The completion ended normally.
    Done {
        /// Provider's stop reason (`end_turn`, `max_tokens`, `stop`, `length` …).
        stop_reason: Option<String>,
    },
}

/// A completion in progress; dropping it aborts the request.
pub type LlmStream = BoxStream<'static, Result<LlmEvent, ProviderError>>;

/// A streaming language model.
#[async_trait]
pub trait LlmProvider: Send + Sync + 'static {
    /// Provider name for the price catalog and metrics (`anthropic`, `openai`, `local`).
    fn provider(&self) -> &'static str;
    /// Model id.
    fn model(&self) -> &str;
    /// Starts a completion. Retries happen here, before the stream is returned.
    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, ProviderError>;
}
