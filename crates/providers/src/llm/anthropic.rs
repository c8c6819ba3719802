//! Anthropic Messages API, streaming over server-sent events.
//!
//! `POST {base}/v1/messages` with `x-api-key` and `anthropic-version`; the SSE stream carries
//! `message_start` (input usage), `content_block_delta` (`text_delta`), `message_delta`
//! (stop reason, output usage), `message_stop`, `ping` and `error` events.
//!
//! Tools: the request declares `tools: [{name, description, input_schema}]` and `tool_choice`
//! (`{"type":"auto"}` / `{"type":"none"}`). A call streams as its own content block:
//! `content_block_start` with `content_block.type == "tool_use"` (its `id` and `name`, `input`
//! empty), `content_block_delta`s with `delta.type == "input_json_delta"` carrying
//! `partial_json` fragments, then `content_block_stop`; the message ends with `stop_reason:
//! "tool_use"`. Several calls are several blocks (several indices). The calls go back in the
//! assistant message as `tool_use` blocks (`input` a JSON object), and their results open the
//! next user message as `tool_result` blocks (`tool_use_id`, `content`, `is_error`) — the API
//! refuses a user message after `tool_use` that does not *begin* with a `tool_result` for each
//! call ("Messages following `tool_use` blocks must begin with a matching number of
//! `tool_result` blocks"), so any text comes after the results.

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::sse::SseParser;
use super::{
    ChatMessage, ChatRole, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage, ToolCall,
    ToolChoice, ToolSpec,
};
use crate::http::Endpoint;
use crate::{HttpSettings, ProviderError};

/// The API version this adapter speaks.
pub const API_VERSION: &str = "2023-06-01";

/// Settings of the Anthropic adapter.
#[derive(Clone, Debug)]
pub struct AnthropicConfig {
    /// Base URL as the official SDKs take it (`https://api.anthropic.com`).
    pub base_url: String,
    /// API key.
    pub api_key: SecretString,
    /// Model id, e.g. `claude-haiku-4-5`.
    pub model: String,
    /// Timeouts and retries.
    pub http: HttpSettings,
}

/// The Anthropic adapter.
pub struct Anthropic {
    config: AnthropicConfig,
    endpoint: Endpoint,
}

impl Anthropic {
    /// Builds the adapter (no network traffic).
    pub fn new(config: AnthropicConfig) -> Self {
        let endpoint = Endpoint::new(
            &config.http,
            &config.base_url,
            "/v1/messages",
            "anthropic.messages",
            parse_error,
        );
        Anthropic { config, endpoint }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    system: &'a str,
    messages: Vec<Msg<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    /// Declared only when there are tools (an empty list is not sent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    /// Sent only with tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Choice>,
}

#[derive(Serialize)]
struct Tool<'a> {
    name: &'a str,
    description: &'a str,
    input_schema: &'a serde_json::Value,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Choice {
    Auto,
    None,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    content: Content<'a>,
}

/// A plain string, or content blocks when the message carries tool calls or results.
#[derive(Serialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(&'a str),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        /// Always a JSON object (the API's `input` is a dictionary).
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
}

/// The arguments of a call as the API takes them back: a JSON object. Arguments the model
/// wrote that are not one (broken or non-object JSON; the call was answered with an error
/// and never ran) go back as `{}`.
fn input_object(arguments: &str) -> serde_json::Value {
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(v @ serde_json::Value::Object(_)) => v,
        _ => serde_json::Value::Object(Default::default()),
    }
}

fn message(m: &ChatMessage) -> Msg<'_> {
    let role = match m.role {
        ChatRole::User => "user",
        ChatRole::Assistant => "assistant",
    };
    if m.tool_calls.is_empty() && m.tool_results.is_empty() {
        return Msg {
            role,
            content: Content::Text(&m.text),
        };
    }
    let mut blocks = Vec::with_capacity(m.tool_calls.len() + m.tool_results.len() + 1);
    // Results first: the user message after `tool_use` must begin with them.
    blocks.extend(m.tool_results.iter().map(|r| Block::ToolResult {
        tool_use_id: &r.call_id,
        content: &r.content,
        is_error: r.is_error,
    }));
    // Empty text blocks are refused; the assistant's words come before its calls.
    if !m.text.is_empty() {
        blocks.push(Block::Text { text: &m.text });
    }
    blocks.extend(m.tool_calls.iter().map(|c| Block::ToolUse {
        id: &c.id,
        name: &c.name,
        input: input_object(&c.arguments),
    }));
    Msg {
        role,
        content: Content::Blocks(blocks),
    }
}

fn tools(specs: &[ToolSpec]) -> Vec<Tool<'_>> {
    specs
        .iter()
        .map(|t| Tool {
            name: &t.name,
            description: &t.description,
            input_schema: &t.parameters,
        })
        .collect()
}

/// The request body (shared with the tests).
fn body<'a>(model: &'a str, request: &'a LlmRequest) -> Body<'a> {
    let tools = tools(&request.tools);
    let tool_choice = (!tools.is_empty()).then_some(match request.tool_choice {
        ToolChoice::Auto => Choice::Auto,
        ToolChoice::None => Choice::None,
    });
    Body {
        model,
        max_tokens: request.max_tokens,
        system: &request.system,
        messages: request.messages.iter().map(message).collect(),
        stream: true,
        temperature: request.temperature,
        tools,
        tool_choice,
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u64,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: u64,
        delta: BlockDelta,
    },
    ContentBlockStop {
        index: u64,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<Usage>,
    },
    MessageStop,
    Error {
        error: ErrorBody,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    ToolUse {
        id: String,
        name: String,
        /// Empty (`{}`) when streamed: the input arrives as `input_json_delta` fragments.
        #[serde(default)]
        input: Option<serde_json::Value>,
    },
    #[serde(other)]
    Other,
}

/// A `content_block_delta`'s delta (`text_delta`, `input_json_delta`).
#[derive(Deserialize)]
#[serde(tag = "type")]
enum BlockDelta {
    #[serde(rename = "text_delta")]
    Text { text: String },
    #[serde(rename = "input_json_delta")]
    InputJson { partial_json: String },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

fn parse_error(v: &serde_json::Value) -> Option<(String, String)> {
    let e = v.get("error")?;
    Some((
        e.get("type")?.as_str()?.to_owned(),
        e.get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_owned(),
    ))
}

impl From<Usage> for LlmUsage {
    fn from(u: Usage) -> Self {
        LlmUsage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_input_tokens: u.cache_read_input_tokens,
            cache_creation_input_tokens: u.cache_creation_input_tokens,
        }
    }
}

/// A `tool_use` block being streamed.
struct PendingCall {
    id: String,
    name: String,
    /// `partial_json` fragments so far.
    arguments: String,
    /// The start event's `input`, used when no fragment arrives.
    initial: Option<serde_json::Value>,
}

impl PendingCall {
    fn finish(self) -> ToolCall {
        let arguments = if !self.arguments.trim().is_empty() {
            self.arguments
        } else {
            match self.initial {
                Some(v @ serde_json::Value::Object(_)) => v.to_string(),
                _ => "{}".to_owned(),
            }
        };
        ToolCall {
            id: self.id,
            name: self.name,
            arguments,
        }
    }
}

/// What the parser remembers between events.
#[derive(Default)]
struct StreamState {
    stop_reason: Option<String>,
    usage: LlmUsage,
    /// Open `tool_use` blocks by content-block index.
    calls: BTreeMap<u64, PendingCall>,
}

impl SseParser for StreamState {
    const END: &'static str = "message_stop";

    fn feed(&mut self, data: &str, out: &mut Vec<LlmEvent>) -> Result<bool, ProviderError> {
        let event = map_event(data, self)?;
        let done = matches!(event, Some(LlmEvent::Done { .. }));
        out.extend(event);
        Ok(done)
    }
}

/// Turns one SSE event's data into stream items; `Ok(None)` for events that carry nothing.
fn map_event(data: &str, state: &mut StreamState) -> Result<Option<LlmEvent>, ProviderError> {
    let event: Event = serde_json::from_str(data)
        .map_err(|e| ProviderError::Protocol(format!("bad event: {e}")))?;
    Ok(match event {
        Event::MessageStart { message } => {
            let u: LlmUsage = message.usage.unwrap_or_default().into();
            state.usage = u;
            Some(LlmEvent::Usage(u))
        }
        Event::ContentBlockStart {
            index,
            content_block: StartBlock::ToolUse { id, name, input },
        } => {
            state.calls.insert(
                index,
                PendingCall {
                    id,
                    name,
                    arguments: String::new(),
                    initial: input,
                },
            );
            None
        }
        Event::ContentBlockDelta {
            delta: BlockDelta::Text { text },
            ..
        } => Some(LlmEvent::Delta(text)),
        Event::ContentBlockDelta {
            index,
            delta: BlockDelta::InputJson { partial_json },
        } => {
            // Input of a block that is not one of our tools (a server tool's) is ignored.
            if let Some(call) = state.calls.get_mut(&index) {
                call.arguments.push_str(&partial_json);
            }
            None
        }
        // A call is complete when its block stops. A call cut by `max_tokens` never stops
        // and is never reported: it was not finished, so it must not run.
        Event::ContentBlockStop { index } => state
            .calls
            .remove(&index)
            .map(|call| LlmEvent::ToolCall(call.finish())),
        Event::MessageDelta { delta, usage: u } => {
            state.stop_reason = delta.stop_reason;
            // message_delta usage is cumulative; fields it omits keep their earlier values.
            let u = u.unwrap_or_default();
            let usage = &mut state.usage;
            usage.output_tokens = u.output_tokens.or(usage.output_tokens);
            usage.input_tokens = u.input_tokens.or(usage.input_tokens);
            usage.cache_read_input_tokens =
                u.cache_read_input_tokens.or(usage.cache_read_input_tokens);
            usage.cache_creation_input_tokens = u
                .cache_creation_input_tokens
                .or(usage.cache_creation_input_tokens);
            Some(LlmEvent::Usage(*usage))
        }
        Event::MessageStop => Some(LlmEvent::Done {
            stop_reason: state.stop_reason.take(),
        }),
        Event::Error { error } => {
            return Err(ProviderError::Stream {
                kind: error.kind,
                message: error.message,
            });
        }
        Event::ContentBlockStart { .. } | Event::ContentBlockDelta { .. } | Event::Other => None,
    })
}

#[async_trait]
impl LlmProvider for Anthropic {
    fn provider(&self) -> &'static str {
        "anthropic"
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, ProviderError> {
        let body = body(&self.config.model, &request);
        self.endpoint
            .post_for_events::<StreamState>(&body, |post| {
                post.header("x-api-key", self.config.api_key.expose_secret())
                    .header("anthropic-version", API_VERSION)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[tokio::test]
    async fn documented_stream_in_any_chunking() {
        assert_fixture_events::<StreamState>(
            "anthropic/stream_basic.sse",
            &[1, 7, 64, 4096],
            &[
                usage(11, 1),
                LlmEvent::Delta("Hello".into()),
                LlmEvent::Delta(" there".into()),
                LlmEvent::Delta("!".into()),
                usage(11, 6),
                done("end_turn"),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn documented_mid_stream_error() {
        let items = fixture_items::<StreamState>("anthropic/stream_error.sse", 13).await;
        let last = items.last().unwrap();
        assert!(
            matches!(last, Err(ProviderError::Stream { kind, .. }) if kind == "overloaded_error")
        );
        assert_eq!(text_of(&items), "Hello there");
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let data = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n";
        let stream = futures_util::stream::iter(vec![Ok(bytes::Bytes::from_static(data))]);
        let items = sse_items::<StreamState>(stream).await;
        assert!(matches!(items.last(), Some(Err(ProviderError::Closed(_)))));
    }

    #[test]
    fn documented_error_bodies() {
        for (file, kind) in [
            ("error_429.json", "rate_limit_error"),
            ("error_529.json", "overloaded_error"),
        ] {
            let v = json_fixture(&format!("anthropic/{file}"));
            assert_eq!(parse_error(&v).unwrap().0, kind);
        }
    }

    #[test]
    fn maps_events() {
        let mut state = StreamState::default();
        let e = map_event(
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-haiku-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
            &mut state,
        )
        .unwrap();
        assert_eq!(e, Some(usage(25, 1)));
        let e = map_event(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            &mut state,
        )
        .unwrap();
        assert_eq!(e, Some(LlmEvent::Delta("Hello".into())));
        let e = map_event(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            &mut state,
        )
        .unwrap();
        assert_eq!(e, Some(usage(25, 15)));
        let e = map_event(r#"{"type":"message_stop"}"#, &mut state).unwrap();
        assert_eq!(e, Some(done("end_turn")));
        assert_eq!(map_event(r#"{"type":"ping"}"#, &mut state).unwrap(), None);
        assert_eq!(
            map_event(r#"{"type":"brand_new_event","x":1}"#, &mut state).unwrap(),
            None
        );
        let e = map_event(
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &mut state,
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::Stream { ref kind, .. } if kind == "overloaded_error"));
    }

    async fn events(path: &str, piece: usize) -> Vec<LlmEvent> {
        fixture_events::<StreamState>(path, piece).await
    }

    #[tokio::test]
    async fn documented_tool_use_stream_in_any_chunking() {
        assert_fixture_events::<StreamState>(
            "anthropic/stream_tool_use.sse",
            &[1, 9, 100, 4096],
            &[
                LlmEvent::Usage(LlmUsage {
                    input_tokens: Some(377),
                    output_tokens: Some(1),
                    cache_read_input_tokens: Some(0),
                    cache_creation_input_tokens: Some(0),
                }),
                LlmEvent::Delta("I".into()),
                LlmEvent::Delta("'ll check the current weather in Paris for you.".into()),
                call(
                    "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                    "get_weather",
                    r#"{"location": "Paris"}"#,
                ),
                LlmEvent::Usage(LlmUsage {
                    input_tokens: Some(377),
                    output_tokens: Some(65),
                    cache_read_input_tokens: Some(0),
                    cache_creation_input_tokens: Some(0),
                }),
                done("tool_use"),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn parallel_tool_use_blocks_each_make_a_call_in_order() {
        let items = events("anthropic/stream_tool_use_parallel.sse", 17).await;
        let calls: Vec<&LlmEvent> = items
            .iter()
            .filter(|e| matches!(e, LlmEvent::ToolCall(_)))
            .collect();
        assert_eq!(
            calls,
            vec![
                &call(
                    "toolu_01NRLabsLyVHZPKxbKvkfSMn",
                    "get_weather",
                    r#"{"location": "Paris"}"#
                ),
                &call(
                    "toolu_01NRLabsLyVHZPKxbKvkfSMo",
                    "get_weather",
                    r#"{"location": "Rome"}"#
                ),
            ]
        );
        // Both calls come before the end, which says why the message stopped.
        assert!(matches!(items[items.len() - 3], LlmEvent::ToolCall(_)));
        assert_eq!(items.last(), Some(&done("tool_use")));
    }

    #[tokio::test]
    async fn a_call_cut_by_max_tokens_is_not_reported() {
        let items = events("anthropic/stream_tool_use_max_tokens.sse", 64).await;
        assert!(!items.iter().any(|e| matches!(e, LlmEvent::ToolCall(_))));
        assert!(items.iter().any(|e| matches!(e, LlmEvent::Delta(_))));
        assert_eq!(items.last(), Some(&done("max_tokens")));
    }

    #[test]
    fn a_call_without_input_fragments_has_empty_object_arguments() {
        let mut state = StreamState::default();
        for data in [
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","id":"toolu_1","name":"now","input":{}}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":""}}"#,
        ] {
            assert_eq!(map_event(data, &mut state).unwrap(), None);
        }
        assert_eq!(
            map_event(r#"{"type":"content_block_stop","index":0}"#, &mut state).unwrap(),
            Some(call("toolu_1", "now", "{}"))
        );
        // A text block's stop is not a call.
        assert_eq!(
            map_event(r#"{"type":"content_block_stop","index":1}"#, &mut state).unwrap(),
            None
        );
    }

    fn spec(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: format!("{name} tool"),
            parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
        }
    }

    fn tool_round_request(tool_choice: ToolChoice) -> LlmRequest {
        tool_rounds(
            ["toolu_a", "toolu_b", "toolu_c"],
            ["Let me check.", ""],
            spec("get_weather"),
            tool_choice,
        )
    }

    #[test]
    fn request_declares_tools_and_maps_the_tool_rounds() {
        let request = tool_round_request(ToolChoice::Auto);
        let v = serde_json::to_value(body("claude-haiku-4-5", &request)).unwrap();
        assert_eq!(
            v["tools"],
            serde_json::json!([{
                "name": "get_weather",
                "description": "get_weather tool",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            }])
        );
        assert_eq!(v["tool_choice"], serde_json::json!({"type": "auto"}));
        assert_eq!(
            v["messages"],
            serde_json::json!([
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_a", "content": "{\"temp_c\":21}"},
                    {"type": "tool_result", "tool_use_id": "toolu_b", "content": "arguments are not valid JSON", "is_error": true},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_c", "name": "get_weather", "input": {"city": "Rome"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_c", "content": "{\"temp_c\":25}"},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ])
        );
        let none = tool_round_request(ToolChoice::None);
        let v = serde_json::to_value(body("claude-haiku-4-5", &none)).unwrap();
        assert_eq!(v["tool_choice"], serde_json::json!({"type": "none"}));
        assert_eq!(v["tools"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn request_without_tools_sends_neither_tools_nor_tool_choice() {
        let request = LlmRequest {
            messages: vec![ChatMessage::user("hi")],
            max_tokens: 10,
            tool_choice: ToolChoice::None,
            ..Default::default()
        };
        assert_plain_body(&serde_json::to_value(body("m", &request)).unwrap());
    }
}
