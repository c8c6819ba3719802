//! Anthropic Messages API, streaming over server-sent events.
//!
//! `POST {base}/v1/messages` with `x-api-key` and `anthropic-version`; the SSE stream carries
//! `message_start` (input usage), `content_block_delta` (`text_delta`), `message_delta`
//! (stop reason, output usage), `message_stop`, `ping` and `error` events.

use async_trait::async_trait;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{ChatRole, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage};
use crate::http::body_with_idle_timeout;
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
    client: reqwest::Client,
    url: String,
}

impl Anthropic {
    /// Builds the adapter (no network traffic).
    pub fn new(config: AnthropicConfig) -> Self {
        let client = config.http.client();
        let url = format!("{}/v1/messages", config.base_url.trim_end_matches('/'));
        Anthropic {
            config,
            client,
            url,
        }
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
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockDelta {
        delta: Delta,
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
enum Delta {
    TextDelta {
        text: String,
    },
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

/// Turns one SSE event's data into stream items; `Ok(None)` for events that carry nothing.
fn map_event(
    data: &str,
    stop_reason: &mut Option<String>,
    usage: &mut LlmUsage,
) -> Result<Option<LlmEvent>, ProviderError> {
    let event: Event = serde_json::from_str(data)
        .map_err(|e| ProviderError::Protocol(format!("bad event: {e}")))?;
    Ok(match event {
        Event::MessageStart { message } => {
            let u: LlmUsage = message.usage.unwrap_or_default().into();
            *usage = u;
            Some(LlmEvent::Usage(u))
        }
        Event::ContentBlockDelta {
            delta: Delta::TextDelta { text },
        } => Some(LlmEvent::Delta(text)),
        Event::MessageDelta { delta, usage: u } => {
            *stop_reason = delta.stop_reason;
            // message_delta usage is cumulative; fields it omits keep their earlier values.
            let u = u.unwrap_or_default();
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
            stop_reason: stop_reason.take(),
        }),
        Event::Error { error } => {
            return Err(ProviderError::Stream {
                kind: error.kind,
                message: error.message,
            });
        }
        Event::ContentBlockDelta { .. } | Event::Other => None,
    })
}

/// Maps a stream of SSE bytes to completion events (shared with the tests).
pub(crate) fn events_from_sse<S>(bytes: S) -> LlmStream
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, ProviderError>> + Send + 'static,
{
    Box::pin(async_stream::stream! {
        let mut sse = std::pin::pin!(bytes.eventsource());
        let mut stop_reason = None;
        let mut usage = LlmUsage::default();
        while let Some(item) = sse.next().await {
            let event = match item {
                Ok(e) => e,
                Err(eventsource_stream::EventStreamError::Transport(e)) => { yield Err(e); return; }
                Err(e) => { yield Err(ProviderError::Protocol(e.to_string())); return; }
            };
            match map_event(&event.data, &mut stop_reason, &mut usage) {
                Ok(Some(LlmEvent::Done { stop_reason })) => {
                    yield Ok(LlmEvent::Done { stop_reason });
                    return;
                }
                Ok(Some(e)) => yield Ok(e),
                Ok(None) => {}
                Err(e) => { yield Err(e); return; }
            }
        }
        yield Err(ProviderError::Closed("stream ended before message_stop".into()));
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
        let body = Body {
            model: &self.config.model,
            max_tokens: request.max_tokens,
            system: &request.system,
            messages: request
                .messages
                .iter()
                .map(|m| Msg {
                    role: match m.role {
                        ChatRole::User => "user",
                        ChatRole::Assistant => "assistant",
                    },
                    content: &m.text,
                })
                .collect(),
            stream: true,
            temperature: request.temperature,
        };
        let body = serde_json::to_vec(&body).map_err(|e| ProviderError::Protocol(e.to_string()))?;
        let http = &self.config.http;
        let response = http
            .send_with_retry(
                "anthropic.messages",
                || {
                    self.client
                        .post(&self.url)
                        .header("x-api-key", self.config.api_key.expose_secret())
                        .header("anthropic-version", API_VERSION)
                        .header("content-type", "application/json")
                        .header("accept", "text/event-stream")
                        .body(body.clone())
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

    #[tokio::test]
    async fn documented_stream_in_any_chunking() {
        for piece in [1, 7, 64, 4096] {
            let items = collect(events_from_sse(fixture_stream(
                "anthropic/stream_basic.sse",
                piece,
            )))
            .await;
            let items: Vec<LlmEvent> = items.into_iter().map(Result::unwrap).collect();
            assert_eq!(
                items,
                vec![
                    LlmEvent::Usage(LlmUsage {
                        input_tokens: Some(11),
                        output_tokens: Some(1),
                        ..Default::default()
                    }),
                    LlmEvent::Delta("Hello".into()),
                    LlmEvent::Delta(" there".into()),
                    LlmEvent::Delta("!".into()),
                    LlmEvent::Usage(LlmUsage {
                        input_tokens: Some(11),
                        output_tokens: Some(6),
                        ..Default::default()
                    }),
                    LlmEvent::Done {
                        stop_reason: Some("end_turn".into())
                    },
                ],
                "chunked by {piece}"
            );
        }
    }

    #[tokio::test]
    async fn documented_mid_stream_error() {
        let items = collect(events_from_sse(fixture_stream(
            "anthropic/stream_error.sse",
            13,
        )))
        .await;
        let last = items.last().unwrap();
        assert!(
            matches!(last, Err(ProviderError::Stream { kind, .. }) if kind == "overloaded_error")
        );
        let text: String = items
            .iter()
            .filter_map(|i| match i {
                Ok(LlmEvent::Delta(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(text, "Hello there");
    }

    #[tokio::test]
    async fn truncated_stream_is_an_error() {
        let data = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n";
        let stream = futures_util::stream::iter(vec![Ok(bytes::Bytes::from_static(data))]);
        let items = collect(events_from_sse(stream)).await;
        assert!(matches!(items.last(), Some(Err(ProviderError::Closed(_)))));
    }

    #[test]
    fn documented_error_bodies() {
        for (file, kind) in [
            ("error_429.json", "rate_limit_error"),
            ("error_529.json", "overloaded_error"),
        ] {
            let body = std::fs::read(format!(
                "{}/tests/fixtures/anthropic/{file}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(parse_error(&v).unwrap().0, kind);
        }
    }

    #[test]
    fn maps_events() {
        let mut stop = None;
        let mut usage = LlmUsage::default();
        let e = map_event(
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-haiku-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#,
            &mut stop,
            &mut usage,
        )
        .unwrap();
        assert_eq!(
            e,
            Some(LlmEvent::Usage(LlmUsage {
                input_tokens: Some(25),
                output_tokens: Some(1),
                ..Default::default()
            }))
        );
        let e = map_event(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
            &mut stop,
            &mut usage,
        )
        .unwrap();
        assert_eq!(e, Some(LlmEvent::Delta("Hello".into())));
        let e = map_event(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            &mut stop,
            &mut usage,
        )
        .unwrap();
        assert_eq!(
            e,
            Some(LlmEvent::Usage(LlmUsage {
                input_tokens: Some(25),
                output_tokens: Some(15),
                ..Default::default()
            }))
        );
        let e = map_event(r#"{"type":"message_stop"}"#, &mut stop, &mut usage).unwrap();
        assert_eq!(
            e,
            Some(LlmEvent::Done {
                stop_reason: Some("end_turn".into())
            })
        );
        assert_eq!(
            map_event(r#"{"type":"ping"}"#, &mut stop, &mut usage).unwrap(),
            None
        );
        assert_eq!(
            map_event(r#"{"type":"brand_new_event","x":1}"#, &mut stop, &mut usage).unwrap(),
            None
        );
        let e = map_event(
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            &mut stop,
            &mut usage,
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::Stream { ref kind, .. } if kind == "overloaded_error"));
    }
}
