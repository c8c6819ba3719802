//! OpenAI-compatible Chat Completions, streaming (OpenAI, Groq, Ollama, vLLM, llama.cpp server).
//!
//! `POST {base}/chat/completions` with `stream: true`; each SSE `data:` line is a
//! `chat.completion.chunk`, the stream ends with `data: [DONE]`. With
//! `stream_options.include_usage` OpenAI sends one last chunk with empty `choices` and the
//! usage; servers that ignore the option send no usage, which is reported as unknown.

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{ChatRole, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage};
use crate::http::body_with_idle_timeout;
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
    client: reqwest::Client,
    url: String,
}

impl OpenAiChat {
    /// Builds the adapter (no network traffic).
    pub fn new(config: OpenAiChatConfig) -> Self {
        let client = config.http.client();
        let url = format!("{}/chat/completions", config.base_url.trim_end_matches('/'));
        OpenAiChat {
            config,
            client,
            url,
        }
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
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    content: &'a str,
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
    finish: &mut Option<String>,
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
        if let Some(text) = choice.delta.and_then(|d| d.content)
            && !text.is_empty()
        {
            out.push(LlmEvent::Delta(text));
        }
        if choice.finish_reason.is_some() {
            *finish = choice.finish_reason;
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

/// Maps a stream of SSE bytes to completion events.
pub(crate) fn events_from_sse<S>(bytes: S) -> LlmStream
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
{
    Box::pin(async_stream::stream! {
        let mut sse = std::pin::pin!(bytes.eventsource());
        let mut finish = None;
        let mut items = Vec::new();
        while let Some(item) = sse.next().await {
            let event = match item {
                Ok(e) => e,
                Err(eventsource_stream::EventStreamError::Transport(e)) => { yield Err(e); return; }
                Err(e) => { yield Err(ProviderError::Protocol(e.to_string())); return; }
            };
            let data = event.data.trim();
            if data == "[DONE]" {
                yield Ok(LlmEvent::Done { stop_reason: finish.take() });
                return;
            }
            if data.is_empty() {
                continue;
            }
            if let Err(e) = map_chunk(data, &mut finish, &mut items) {
                yield Err(e);
                return;
            }
            for e in items.drain(..) {
                yield Ok(e);
            }
        }
        yield Err(ProviderError::Closed("stream ended before [DONE]".into()));
    })
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
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        if !request.system.is_empty() {
            messages.push(Msg {
                role: "system",
                content: &request.system,
            });
        }
        messages.extend(request.messages.iter().map(|m| Msg {
            role: match m.role {
                ChatRole::User => "user",
                ChatRole::Assistant => "assistant",
            },
            content: &m.text,
        }));
        let body = Body {
            model: &self.config.model,
            messages,
            stream: true,
            stream_options: self.config.include_usage.then_some(StreamOptions {
                include_usage: true,
            }),
            max_tokens: request.max_tokens,
            temperature: request.temperature,
        };
        let body = serde_json::to_vec(&body).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let http = &self.config.http;
        let response = http
            .send_with_retry(
                "openai.chat",
                || {
                    let req = self
                        .client
                        .post(&self.url)
                        .header("content-type", "application/json")
                        .header("accept", "text/event-stream")
                        .body(body.clone());
                    match &self.config.api_key {
                        Some(key) => req.bearer_auth(key.expose_secret()),
                        None => req,
                    }
                },
                parse_error,
            )
            .await?;
        Ok(events_from_sse(body_with_idle_timeout(
            response,
            http.idle_timeout,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{collect, fixture_stream};

    fn text_of(items: &[Result<LlmEvent, ProviderError>]) -> String {
        items
            .iter()
            .filter_map(|i| match i {
                Ok(LlmEvent::Delta(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn documented_stream_with_usage() {
        for piece in [3, 100, 100_000] {
            let items = collect(events_from_sse(fixture_stream(
                "openai/chat_stream_with_usage.sse",
                piece,
            )))
            .await;
            assert!(text_of(&items).starts_with("I'm unable to provide real-time updates"));
            assert!(text_of(&items).ends_with("local San Francisco news station."));
            let n = items.len();
            assert_eq!(
                items[n - 2].as_ref().unwrap(),
                &LlmEvent::Usage(LlmUsage {
                    input_tokens: Some(14),
                    output_tokens: Some(47),
                    ..Default::default()
                })
            );
            assert_eq!(
                items[n - 1].as_ref().unwrap(),
                &LlmEvent::Done {
                    stop_reason: Some("stop".into())
                }
            );
        }
    }

    #[tokio::test]
    async fn stream_without_usage() {
        let items = collect(events_from_sse(fixture_stream(
            "openai/chat_stream_no_usage.sse",
            50,
        )))
        .await;
        assert_eq!(text_of(&items), "My name is Neo Vim.");
        assert!(!items.iter().any(|i| matches!(i, Ok(LlmEvent::Usage(_)))));
        assert_eq!(
            items.last().unwrap().as_ref().unwrap(),
            &LlmEvent::Done {
                stop_reason: Some("stop".into())
            }
        );
    }

    #[test]
    fn quota_429_is_not_retried() {
        let body = std::fs::read(format!(
            "{}/tests/fixtures/openai/error_429.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
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
        let mut finish = None;
        let mut out = Vec::new();
        map_chunk(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            &mut finish,
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
        map_chunk(
            r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
            &mut finish,
            &mut out,
        )
        .unwrap();
        map_chunk(
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            &mut finish,
            &mut out,
        )
        .unwrap();
        map_chunk(
            r#"{"choices":[],"usage":{"prompt_tokens":20,"completion_tokens":2,"total_tokens":22,"prompt_tokens_details":{"cached_tokens":4}}}"#,
            &mut finish,
            &mut out,
        )
        .unwrap();
        assert_eq!(finish.as_deref(), Some("stop"));
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
            &mut finish,
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::Stream { ref kind, .. } if kind == "server_error"));
    }
}
