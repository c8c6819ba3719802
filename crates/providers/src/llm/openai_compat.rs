//! OpenAI-compatible Chat Completions, streaming (OpenAI, Groq, Ollama, vLLM, llama.cpp server).
//!
//! `POST {base}/chat/completions` with `stream: true`; each SSE `data:` line is a
//! `chat.completion.chunk`, the stream ends with `data: [DONE]`. With
//! `stream_options.include_usage` OpenAI sends one last chunk with empty `choices` and the
//! usage; servers that ignore the option send no usage, which is reported as unknown.
//!
//! Tools: the request declares `tools: [{type:"function", function:{name, description,
//! parameters}}]` and `tool_choice` (`"auto"` / `"none"`; the API refuses `tool_choice`
//! without `tools`, so neither is sent when no tool is declared). Calls stream as
//! `choices[0].delta.tool_calls[]` fragments, each with the call's `index`: the first
//! fragment of a call carries `id`, `type` and `function.name`, the later ones pieces of
//! `function.arguments` (a JSON string); the choice finishes with `finish_reason:
//! "tool_calls"`. Several calls are several indices. The calls go back as the assistant
//! message's `tool_calls` (`content` null when it said nothing) and each result as a `role:
//! "tool"` message with its `tool_call_id` — one per call, right after the assistant message
//! (the API refuses "messages with role 'tool' [that are not] a response to a preceeding
//! message with 'tool_calls'" and an assistant message whose calls are not each answered).

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use std::borrow::Cow;

use super::sse::SseParser;
use super::{
    ChatMessage, ChatRole, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage, ToolCall,
    ToolChoice, ToolSpec,
};
use crate::http::Endpoint;
use crate::{HttpSettings, ProviderError};

/// Settings of the OpenAI-compatible adapter.
#[derive(Clone, Debug)]
pub struct OpenAiChatConfig {
    /// Base URL as the official SDKs take it (`https://api.openai.com/v1`).
    pub base_url: String,
    /// API key; local servers often need none.
    pub api_key: Option<SecretString>,
    /// Model id.
    pub model: String,
    /// Ask for usage in the stream (`stream_options.include_usage`); turn off for servers
    /// that reject the option.
    pub include_usage: bool,
    /// Provider name for the price catalog (`openai`, `groq`, `local` …).
    pub provider: &'static str,
    /// Timeouts and retries.
    pub http: HttpSettings,
}

/// The OpenAI-compatible adapter.
pub struct OpenAiChat {
    config: OpenAiChatConfig,
    endpoint: Endpoint,
}

impl OpenAiChat {
    /// Builds the adapter (no network traffic).
    pub fn new(config: OpenAiChatConfig) -> Self {
        let endpoint = Endpoint::new(
            &config.http,
            &config.base_url,
            "/chat/completions",
            "openai.chat",
            parse_error,
        );
        OpenAiChat { config, endpoint }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Msg<'a>>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    /// Declared only when there are tools (an empty list is not sent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tool<'a>>,
    /// Sent only with tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'static str>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Tool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: Function<'a>,
}

#[derive(Serialize)]
struct Function<'a> {
    name: &'a str,
    description: &'a str,
    parameters: &'a serde_json::Value,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    /// Null only for an assistant message that called tools without saying anything.
    content: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<CallOut<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> Msg<'a> {
    fn text(role: &'static str, text: &'a str) -> Self {
        Msg {
            role,
            content: Some(Cow::Borrowed(text)),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

#[derive(Serialize)]
struct CallOut<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: CallFunction<'a>,
}

#[derive(Serialize)]
struct CallFunction<'a> {
    name: &'a str,
    /// A JSON string, as the model wrote it.
    arguments: &'a str,
}

/// Arguments as sent back: what the model wrote when it is a JSON object, else `{}` (the call
/// was answered with an error and never ran; OpenAI-compatible servers such as Ollama refuse
/// a history whose call arguments are not JSON).
fn arguments_out(arguments: &str) -> &str {
    match serde_json::from_str::<serde_json::Value>(arguments) {
        Ok(serde_json::Value::Object(_)) => arguments,
        _ => "{}",
    }
}

/// Appends the wire messages of one history message.
fn push_message<'a>(out: &mut Vec<Msg<'a>>, m: &'a ChatMessage) {
    match m.role {
        ChatRole::Assistant if !m.tool_calls.is_empty() => out.push(Msg {
            role: "assistant",
            content: (!m.text.is_empty()).then_some(Cow::Borrowed(m.text.as_str())),
            tool_calls: m
                .tool_calls
                .iter()
                .map(|c| CallOut {
                    id: &c.id,
                    kind: "function",
                    function: CallFunction {
                        name: &c.name,
                        arguments: arguments_out(&c.arguments),
                    },
                })
                .collect(),
            tool_call_id: None,
        }),
        ChatRole::Assistant => out.push(Msg::text("assistant", &m.text)),
        ChatRole::User => {
            // One `tool` message per result (the API has no error flag: a failed call's
            // content says so), then the person's words, if any.
            for r in &m.tool_results {
                out.push(Msg {
                    role: "tool",
                    content: Some(if r.is_error {
                        Cow::Owned(format!("Error: {}", r.content))
                    } else {
                        Cow::Borrowed(r.content.as_str())
                    }),
                    tool_calls: Vec::new(),
                    tool_call_id: Some(&r.call_id),
                });
            }
            if m.tool_results.is_empty() || !m.text.is_empty() {
                out.push(Msg::text("user", &m.text));
            }
        }
    }
}

fn tools(specs: &[ToolSpec]) -> Vec<Tool<'_>> {
    specs
        .iter()
        .map(|t| Tool {
            kind: "function",
            function: Function {
                name: &t.name,
                description: &t.description,
                parameters: &t.parameters,
            },
        })
        .collect()
}

/// The request body (shared with the tests).
fn body<'a>(config: &'a OpenAiChatConfig, request: &'a LlmRequest) -> Body<'a> {
    let mut messages = Vec::with_capacity(request.messages.len() + 1);
    if !request.system.is_empty() {
        messages.push(Msg::text("system", &request.system));
    }
    for m in &request.messages {
        push_message(&mut messages, m);
    }
    let tools = tools(&request.tools);
    let tool_choice = (!tools.is_empty()).then_some(match request.tool_choice {
        ToolChoice::Auto => "auto",
        ToolChoice::None => "none",
    });
    Body {
        model: &config.model,
        messages,
        stream: true,
        stream_options: config.include_usage.then_some(StreamOptions {
            include_usage: true,
        }),
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        tools,
        tool_choice,
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<DeltaBody>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaBody {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Deserialize)]
struct ToolCallDelta {
    /// Which call this fragment belongs to (required by the API; a server that omits it
    /// streams one call at a time).
    #[serde(default)]
    index: u64,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// A call being assembled from its fragments.
struct PendingCall {
    index: u64,
    id: String,
    name: String,
    arguments: String,
}

/// What the parser remembers between chunks.
#[derive(Default)]
struct StreamState {
    finish: Option<String>,
    /// Calls in the order their first fragment arrived.
    calls: Vec<PendingCall>,
}

impl StreamState {
    fn add_fragment(&mut self, fragment: ToolCallDelta) {
        let id = fragment.id.filter(|id| !id.is_empty());
        // The call this fragment continues: the latest one at its index, unless the fragment
        // brings another id (some OpenAI-compatible servers reuse one index for every call).
        let slot = self
            .calls
            .iter()
            .rposition(|c| c.index == fragment.index)
            .filter(|&i| {
                id.as_ref()
                    .is_none_or(|id| self.calls[i].id.is_empty() || *id == self.calls[i].id)
            });
        let call = match slot {
            Some(i) => &mut self.calls[i],
            None => {
                self.calls.push(PendingCall {
                    index: fragment.index,
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
                self.calls.last_mut().expect("just pushed")
            }
        };
        if let Some(id) = id {
            call.id = id;
        }
        if let Some(function) = fragment.function {
            if let Some(name) = function.name.filter(|n| !n.is_empty()) {
                call.name = name;
            }
            if let Some(arguments) = function.arguments {
                call.arguments.push_str(&arguments);
            }
        }
    }

    /// The assembled calls in index order (a stable sort keeps calls sharing an index in
    /// arrival order).
    fn take_calls(&mut self, out: &mut Vec<LlmEvent>) {
        let mut calls = std::mem::take(&mut self.calls);
        calls.sort_by_key(|c| c.index);
        out.extend(calls.into_iter().map(|c| {
            LlmEvent::ToolCall(ToolCall {
                id: c.id,
                name: c.name,
                arguments: if c.arguments.trim().is_empty() {
                    "{}".to_owned()
                } else {
                    c.arguments
                },
            })
        }));
    }
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: String,
}

fn parse_error(v: &serde_json::Value) -> Option<(String, String)> {
    let e = v.get("error")?;
    let kind = e
        .get("type")
        .and_then(|t| t.as_str())
        .or_else(|| e.get("code").and_then(|c| c.as_str()))
        .unwrap_or("error");
    let message = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
    Some((kind.to_owned(), message.to_owned()))
}

/// Turns one `data:` payload into stream items, appended to `out`.
fn map_chunk(
    data: &str,
    state: &mut StreamState,
    out: &mut Vec<LlmEvent>,
) -> Result<(), ProviderError> {
    let chunk: Chunk = serde_json::from_str(data)
        .map_err(|e| ProviderError::Protocol(format!("bad chunk: {e}")))?;
    if let Some(error) = chunk.error {
        let kind = error
            .kind
            .or_else(|| error.code.map(|c| c.to_string()))
            .unwrap_or_else(|| "error".into());
        return Err(ProviderError::Stream {
            kind,
            message: error.message,
        });
    }
    for choice in chunk.choices {
        if let Some(delta) = choice.delta {
            if let Some(text) = delta.content
                && !text.is_empty()
            {
                out.push(LlmEvent::Delta(text));
            }
            for fragment in delta.tool_calls.into_iter().flatten() {
                state.add_fragment(fragment);
            }
        }
        if let Some(reason) = choice.finish_reason {
            // The calls are complete when the choice finishes — unless the token limit cut
            // them: then which of them are whole is unknown, and none may run.
            if reason == "length" {
                state.calls.clear();
            } else {
                state.take_calls(out);
            }
            state.finish = Some(reason);
        }
    }
    if let Some(u) = chunk.usage {
        let cached = u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        out.push(LlmEvent::Usage(LlmUsage {
            input_tokens: u.prompt_tokens.map(|p| p.saturating_sub(cached)),
            output_tokens: u.completion_tokens,
            cache_read_input_tokens: (cached > 0).then_some(cached),
            cache_creation_input_tokens: None,
        }));
    }
    Ok(())
}

impl SseParser for StreamState {
    const END: &'static str = "[DONE]";

    fn feed(&mut self, data: &str, out: &mut Vec<LlmEvent>) -> Result<bool, ProviderError> {
        let data = data.trim();
        if data == "[DONE]" {
            // Calls of a server that never sent a finish reason end with the stream.
            self.take_calls(out);
            out.push(LlmEvent::Done {
                stop_reason: self.finish.take(),
            });
            return Ok(true);
        }
        if !data.is_empty() {
            map_chunk(data, self, out)?;
        }
        Ok(false)
    }
}

#[async_trait]
impl LlmProvider for OpenAiChat {
    fn provider(&self) -> &'static str {
        self.config.provider
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, ProviderError> {
        let body = body(&self.config, &request);
        self.endpoint
            .post_for_events::<StreamState>(&body, |post| match &self.config.api_key {
                Some(key) => post.bearer_auth(key.expose_secret()),
                None => post,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;

    #[tokio::test]
    async fn documented_stream_with_usage() {
        for piece in [3, 100, 100_000] {
            let items =
                fixture_items::<StreamState>("openai/chat_stream_with_usage.sse", piece).await;
            assert!(text_of(&items).starts_with("I'm unable to provide real-time updates"));
            assert!(text_of(&items).ends_with("local San Francisco news station."));
            let n = items.len();
            assert_eq!(items[n - 2].as_ref().unwrap(), &usage(14, 47));
            assert_eq!(items[n - 1].as_ref().unwrap(), &done("stop"));
        }
    }

    #[tokio::test]
    async fn stream_without_usage() {
        let items = fixture_items::<StreamState>("openai/chat_stream_no_usage.sse", 50).await;
        assert_eq!(text_of(&items), "My name is Neo Vim.");
        assert!(!items.iter().any(|i| matches!(i, Ok(LlmEvent::Usage(_)))));
        assert_eq!(items.last().unwrap().as_ref().unwrap(), &done("stop"));
    }

    #[test]
    fn quota_429_is_not_retried() {
        let v = json_fixture("openai/error_429.json");
        let (kind, message) = parse_error(&v).unwrap();
        assert_eq!(kind, "insufficient_quota");
        let e = ProviderError::Status {
            status: 429,
            kind,
            message,
            retry_after: None,
        };
        assert!(!e.is_retryable());
    }

    #[test]
    fn maps_chunks() {
        let mut state = StreamState::default();
        let mut out = Vec::new();
        map_chunk(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            &mut state,
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
        map_chunk(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            &mut state,
            &mut out,
        )
        .unwrap();
        map_chunk(
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            &mut state,
            &mut out,
        )
        .unwrap();
        map_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22,"prompt_tokens_details":{"cached_tokens":4}}}"#,
            &mut state,
            &mut out,
        )
        .unwrap();
        assert_eq!(state.finish.as_deref(), Some("stop"));
        assert_eq!(
            out,
            vec![
                LlmEvent::Delta("Hi".into()),
                LlmEvent::Usage(LlmUsage {
                    input_tokens: Some(16),
                    output_tokens: Some(2),
                    cache_read_input_tokens: Some(4),
                    cache_creation_input_tokens: None
                })
            ]
        );
        let e = map_chunk(
            r#"{"error":{"message":"boom","type":"server_error","param":null,"code":null}}"#,
            &mut state,
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::Stream { ref kind, .. } if kind == "server_error"));
    }

    #[tokio::test]
    async fn documented_tool_call_stream_in_any_chunking() {
        assert_fixture_events::<StreamState>(
            "openai/chat_stream_tool_call.sse",
            &[5, 200, 100_000],
            &[
                call(
                    "call_c91SqDXlYFuETYv8mUHzz6pp",
                    "GetWeatherArgs",
                    r#"{"city":"Edinburgh","country":"UK","units":"c"}"#,
                ),
                usage(76, 24),
                done("tool_calls"),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn documented_parallel_tool_calls() {
        assert_eq!(
            fixture_events::<StreamState>("openai/chat_stream_tool_calls_parallel.sse", 333).await,
            vec![
                call(
                    "call_JMW1whyEaYG438VE1OIflxA2",
                    "GetWeatherArgs",
                    r#"{"city": "Edinburgh", "country": "GB", "units": "c"}"#
                ),
                call(
                    "call_DNYTawLBoN8fj3KN6qU9N1Ou",
                    "get_stock_price",
                    r#"{"ticker": "AAPL", "exchange": "NASDAQ"}"#
                ),
                usage(149, 60),
                done("tool_calls"),
            ]
        );
    }

    fn feed(chunks: &[&str]) -> (StreamState, Vec<LlmEvent>) {
        let mut state = StreamState::default();
        let mut out = Vec::new();
        for c in chunks {
            map_chunk(c, &mut state, &mut out).unwrap();
        }
        (state, out)
    }

    #[test]
    fn interleaved_fragments_are_assembled_per_index_and_reported_in_index_order() {
        // The documented fragment shapes, with two calls' fragments interleaved and the
        // second index opened first.
        let (state, out) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"One moment."},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b","type":"function","function":{"name":"get_time","arguments":""}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":"{\"ci"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\"tz\":\"CET\"}"}},{"index":0,"function":{"arguments":"ty\":\"Paris\"}"}}]},"finish_reason":null}]}"#,
        ]);
        assert_eq!(out, vec![LlmEvent::Delta("One moment.".into())]);
        assert_eq!(state.calls.len(), 2);
        let (state, out) = {
            let mut state = state;
            let mut out = Vec::new();
            map_chunk(
                r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
                &mut state,
                &mut out,
            )
            .unwrap();
            (state, out)
        };
        assert_eq!(
            out,
            vec![
                call("call_a", "get_weather", r#"{"city":"Paris"}"#),
                call("call_b", "get_time", r#"{"tz":"CET"}"#),
            ]
        );
        assert!(state.calls.is_empty());
        assert_eq!(state.finish.as_deref(), Some("tool_calls"));
    }

    #[test]
    fn a_new_id_at_a_used_index_is_another_call() {
        // Some OpenAI-compatible servers send every call whole at index 0.
        let (_, out) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"","tool_calls":[{"id":"call_1","index":0,"type":"function","function":{"name":"a","arguments":"{\"x\":1}"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"","tool_calls":[{"id":"call_2","index":0,"type":"function","function":{"name":"b","arguments":""}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":"tool_calls"}]}"#,
        ]);
        assert_eq!(
            out,
            vec![call("call_1", "a", r#"{"x":1}"#), call("call_2", "b", "{}")]
        );
    }

    #[test]
    fn calls_cut_by_the_token_limit_are_dropped() {
        let (state, out) = feed(&[
            r#"{"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Par"}}]},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
        ]);
        assert!(out.is_empty());
        assert!(state.calls.is_empty());
        assert_eq!(state.finish.as_deref(), Some("length"));
    }

    #[tokio::test]
    async fn calls_without_a_finish_reason_end_with_the_stream() {
        let data = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"now\",\"arguments\":\"{}\"}}]},\"finish_reason\":null}]}\n\n",
            "data: [DONE]\n\n",
        );
        let stream =
            futures_util::stream::iter(vec![Ok(bytes::Bytes::from_static(data.as_bytes()))]);
        let items: Vec<LlmEvent> = sse_items::<StreamState>(stream)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            items,
            vec![
                call("call_a", "now", "{}"),
                LlmEvent::Done { stop_reason: None }
            ]
        );
    }

    fn config(include_usage: bool) -> OpenAiChatConfig {
        OpenAiChatConfig {
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key: None,
            model: "gpt-4o-mini".into(),
            include_usage,
            provider: "openai",
            http: HttpSettings::default(),
        }
    }

    #[test]
    fn request_declares_tools_and_maps_the_tool_rounds() {
        let request = tool_rounds(
            ["call_a", "call_b", "call_c"],
            ["", "Trying again."],
            ToolSpec {
                name: "get_weather".into(),
                description: "Current weather".into(),
                parameters: serde_json::json!({"type": "object", "properties": {"city": {"type": "string"}}}),
            },
            ToolChoice::Auto,
        );
        let config = config(true);
        let v = serde_json::to_value(body(&config, &request)).unwrap();
        assert_eq!(
            v["tools"],
            serde_json::json!([{"type": "function", "function": {
                "name": "get_weather",
                "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            }}])
        );
        assert_eq!(v["tool_choice"], "auto");
        assert_eq!(
            v["messages"],
            serde_json::json!([
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp_c\":21}"},
                {"role": "tool", "tool_call_id": "call_b", "content": "Error: arguments are not valid JSON"},
                {"role": "assistant", "content": "Trying again.", "tool_calls": [
                    {"id": "call_c", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_c", "content": "{\"temp_c\":25}"},
                {"role": "user", "content": "And tomorrow?"},
            ])
        );
        let none = LlmRequest {
            tool_choice: ToolChoice::None,
            ..request
        };
        assert_eq!(
            serde_json::to_value(body(&config, &none)).unwrap()["tool_choice"],
            "none"
        );
    }

    #[test]
    fn request_without_tools_sends_neither_tools_nor_tool_choice() {
        let request = LlmRequest {
            messages: vec![ChatMessage::user("hi")],
            max_tokens: 10,
            ..Default::default()
        };
        let config = config(false);
        assert_plain_body(&serde_json::to_value(body(&config, &request)).unwrap());
    }
}
