//! Language models: the [`LlmProvider`] trait and its adapters.

pub mod anthropic;
pub mod openai_compat;
pub(crate) mod sse;

use std::sync::Arc;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::ProviderError;

pub use atlas_core::history::{Message as ChatMessage, Role as ChatRole};
pub use atlas_core::tools::{ToolCall, ToolResult};

/// A tool the model may call, as declared to it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ToolSpec {
    /// Name (letters, digits, `_` and `-`, at most 64).
    pub name: String,
    /// What it does and when to use it, for the model.
    pub description: String,
    /// JSON Schema of its arguments (an object schema).
    pub parameters: serde_json::Value,
}

/// Whether the model may call tools in this request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides.
    #[default]
    Auto,
    /// Answer in words only (the tools stay declared, as the history may hold calls).
    None,
}

/// A streamed completion request.
#[derive(Clone, Debug, Default)]
pub struct LlmRequest {
    /// Server-configured system prompt.
    pub system: String,
    /// Conversation, oldest first, starting with the user.
    pub messages: Vec<ChatMessage>,
    /// Output token cap.
    pub max_tokens: u32,
    /// Sampling temperature, provider default when `None`.
    pub temperature: Option<f32>,
    /// Tools the model may call (empty: none declared).
    pub tools: Arc<[ToolSpec]>,
    /// Whether it may call them now.
    pub tool_choice: ToolChoice,
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
    /// A complete tool call (its argument fragments assembled), in the order the model made
    /// them; the stream then ends with the provider's tool stop reason.
    ToolCall(ToolCall),
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
