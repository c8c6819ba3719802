//! The local language model: streams text from the llama.cpp worker.

use std::sync::Arc;

use async_trait::async_trait;
use atlas_providers::ProviderError;
use atlas_providers::llm::{ChatRole, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage};

use crate::ipc::{Message, Reply, Request};
use crate::worker::Worker;

/// SmolLM2 (or any GGUF chat model) in the language model worker.
#[derive(Debug)]
pub struct LocalLlm {
    worker: Arc<Worker>,
    model: String,
    /// Replaces the server's system prompt: small models follow a short one better.
    system: Option<String>,
    /// Output cap; small models wander in long replies.
    max_tokens: u32,
    temperature: f32,
}

impl LocalLlm {
    /// An adapter over a started language model worker.
    pub fn new(
        worker: Arc<Worker>,
        model: impl Into<String>,
        system: Option<String>,
        max_tokens: u32,
        temperature: f32,
    ) -> Self {
        LocalLlm {
            worker,
            model: model.into(),
            system,
            max_tokens,
            temperature,
        }
    }
}

#[async_trait]
impl LlmProvider for LocalLlm {
    fn provider(&self) -> &'static str {
        "local"
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, ProviderError> {
        let system = self.system.clone().unwrap_or(request.system);
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        messages.push(Message {
            role: "system".into(),
            text: system,
        });
        messages.extend(request.messages.into_iter().map(|m| {
            Message {
                role: match m.role {
                    ChatRole::User => "user",
                    ChatRole::Assistant => "assistant",
                }
                .into(),
                text: m.text,
            }
        }));
        let max_tokens = request.max_tokens.min(self.max_tokens).max(1);
        let temperature = request.temperature.unwrap_or(self.temperature);
        let mut ticket = self
            .worker
            .submit(
                |id| Request::Generate {
                    id,
                    messages,
                    max_tokens,
                    temperature,
                },
                &[],
            )
            .await?;
        Ok(Box::pin(crate::task_stream(32, move |tx| async move {
            loop {
                let event = match ticket.next().await {
                    Ok(Reply::Delta { text, .. }) => Ok(LlmEvent::Delta(text)),
                    Ok(Reply::Done {
                        stop_reason,
                        input_tokens,
                        output_tokens,
                        ..
                    }) => {
                        let usage = LlmUsage {
                            input_tokens: Some(input_tokens),
                            output_tokens: Some(output_tokens),
                            ..LlmUsage::default()
                        };
                        if tx.send(Ok(LlmEvent::Usage(usage))).await.is_err() {
                            return;
                        }
                        let _ = tx
                            .send(Ok(LlmEvent::Done {
                                stop_reason: Some(stop_reason),
                            }))
                            .await;
                        return;
                    }
                    Ok(Reply::Failed { message, .. }) => Err(ProviderError::Stream {
                        kind: "generation_failed".into(),
                        message,
                    }),
                    Ok(other) => Err(ProviderError::Protocol(format!(
                        "unexpected reply {other:?}"
                    ))),
                    Err(e) => Err(e),
                };
                let stop = event.is_err();
                if tx.send(event).await.is_err() || stop {
                    return;
                }
            }
        })))
    }
}
