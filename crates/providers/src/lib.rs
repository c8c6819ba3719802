//! Provider adapters: speech-to-text, language models and text-to-speech, each behind a trait.
//!
//! # Layout
//! - [`stt`]: [`stt::SttProvider`] and the Deepgram live-streaming adapter (`stt/deepgram.rs`).
//! - [`llm`]: [`llm::LlmProvider`], the Anthropic Messages adapter (`llm/anthropic.rs`) and the
//!   OpenAI-compatible Chat Completions adapter (`llm/openai_compat.rs`).
//! - [`tts`]: [`tts::TtsProvider`] and the OpenAI speech adapter (`tts/openai.rs`).
//! - [`turn`]: [`turn::TurnProvider`], the end-of-turn model's seam (its engine is local).
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
pub mod turn;

mod error;
mod http;

pub use error::ProviderError;
pub use http::{HttpSettings, error_chain, trace_headers};

#[cfg(test)]
pub(crate) mod test_support {
    //! Feeding documented payloads to the stream parsers, and the events and requests the
    //! LLM adapters' tests share.

    use futures_util::{Stream, StreamExt};

    use crate::ProviderError;
    use crate::llm::sse::{SseParser, events_from_sse};
    use crate::llm::{
        ChatMessage, LlmEvent, LlmRequest, LlmUsage, ToolCall, ToolChoice, ToolResult, ToolSpec,
    };

    /// The fixture file at `path` (under `tests/fixtures/`) as a byte stream cut into
    /// `piece`-byte chunks, so parsers are tested across arbitrary chunk boundaries.
    pub fn fixture_stream(
        path: &str,
        piece: usize,
    ) -> impl Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static {
        let data = fixture(path);
        let chunks: Vec<Result<bytes::Bytes, ProviderError>> = data
            .chunks(piece)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        futures_util::stream::iter(chunks)
    }

    /// The fixture file at `path` (under `tests/fixtures/`).
    pub fn fixture(path: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// The JSON fixture at `path` (under `tests/fixtures/`).
    pub fn json_fixture(path: &str) -> serde_json::Value {
        serde_json::from_slice(&fixture(path)).unwrap()
    }

    /// Every item the SSE parser `P` makes of `bytes`.
    pub async fn sse_items<P: SseParser>(
        bytes: impl Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
    ) -> Vec<Result<LlmEvent, ProviderError>> {
        events_from_sse::<P, _>(bytes).collect().await
    }

    /// Every item `P` makes of the fixture at `path` cut into `piece`-byte chunks.
    pub async fn fixture_items<P: SseParser>(
        path: &str,
        piece: usize,
    ) -> Vec<Result<LlmEvent, ProviderError>> {
        sse_items::<P>(fixture_stream(path, piece)).await
    }

    /// Every event `P` makes of the fixture at `path` cut into `piece`-byte chunks, none of
    /// them an error.
    pub async fn fixture_events<P: SseParser>(path: &str, piece: usize) -> Vec<LlmEvent> {
        let items = fixture_items::<P>(path, piece).await;
        items.into_iter().map(Result::unwrap).collect()
    }

    /// Checks that `P` makes `expected` of the fixture at `path` however it is chunked (in
    /// pieces of each of the `pieces` sizes).
    pub async fn assert_fixture_events<P: SseParser>(
        path: &str,
        pieces: &[usize],
        expected: &[LlmEvent],
    ) {
        for &piece in pieces {
            assert_eq!(
                fixture_events::<P>(path, piece).await,
                expected,
                "{path} chunked by {piece}"
            );
        }
    }

    /// The text of the deltas among `items`.
    pub fn text_of(items: &[Result<LlmEvent, ProviderError>]) -> String {
        items
            .iter()
            .filter_map(|i| match i {
                Ok(LlmEvent::Delta(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// A tool call event.
    pub fn call(id: &str, name: &str, arguments: &str) -> LlmEvent {
        LlmEvent::ToolCall(ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
        })
    }

    /// A usage event with input and output tokens only.
    pub fn usage(input_tokens: u64, output_tokens: u64) -> LlmEvent {
        LlmEvent::Usage(LlmUsage {
            input_tokens: Some(input_tokens),
            output_tokens: Some(output_tokens),
            ..Default::default()
        })
    }

    /// The end of a completion that stopped for `reason`.
    pub fn done(reason: &str) -> LlmEvent {
        LlmEvent::Done {
            stop_reason: Some(reason.into()),
        }
    }

    /// A history of two tool rounds: a question; `said[0]` with calls `ids[0]` (Paris) and
    /// `ids[1]` (arguments broken on purpose); their results (the second an error); `said[1]`
    /// with call `ids[2]` (Rome); its result with the question "And tomorrow?". Declares
    /// `tool` and lets the model use it per `tool_choice`.
    pub fn tool_rounds(
        ids: [&str; 3],
        said: [&str; 2],
        tool: ToolSpec,
        tool_choice: ToolChoice,
    ) -> LlmRequest {
        let weather = |id: &str, arguments: &str| ToolCall {
            id: id.into(),
            name: "get_weather".into(),
            arguments: arguments.into(),
        };
        let result = |id: &str, content: &str| ToolResult {
            call_id: id.into(),
            content: content.into(),
            is_error: false,
        };
        LlmRequest {
            system: "Be brief.".into(),
            messages: vec![
                ChatMessage::user("Weather in Paris and Rome?"),
                ChatMessage {
                    tool_calls: vec![
                        weather(ids[0], r#"{"city":"Paris"}"#),
                        weather(ids[1], r#"{"city": "Ro"#), // broken on purpose
                    ],
                    ..ChatMessage::assistant(said[0])
                },
                ChatMessage {
                    tool_results: vec![
                        result(ids[0], r#"{"temp_c":21}"#),
                        ToolResult::error(ids[1], "arguments are not valid JSON"),
                    ],
                    ..ChatMessage::user("")
                },
                ChatMessage {
                    tool_calls: vec![weather(ids[2], r#"{"city":"Rome"}"#)],
                    ..ChatMessage::assistant(said[1])
                },
                ChatMessage {
                    tool_results: vec![result(ids[2], r#"{"temp_c":25}"#)],
                    ..ChatMessage::user("And tomorrow?")
                },
            ],
            max_tokens: 300,
            temperature: None,
            tools: vec![tool].into(),
            tool_choice,
        }
    }

    /// Checks the body of a request saying "hi" without tools: only the model, the token cap,
    /// the stream flag and the message go out.
    pub fn assert_plain_body(v: &serde_json::Value) {
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, vec!["max_tokens", "messages", "model", "stream"]);
        assert_eq!(
            v["messages"],
            serde_json::json!([{"role": "user", "content": "hi"}])
        );
    }
}
