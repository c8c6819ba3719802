//! The local language model: streams text from the llama.cpp worker.

use std::sync::Arc;

use async_trait::async_trait;
use atlas_providers::ProviderError;
use atlas_providers::llm::{ChatRole, LlmEvent, LlmProvider, LlmRequest, LlmStream, LlmUsage};

use crate::ipc::{Message, Reply, Request};
use crate::worker::Worker;

/// How the local model decodes.
#[derive(Clone, Debug)]
pub struct Decoding {
    /// Replaces the server's system prompt: small models follow a short one better.
    pub system: Option<String>,
    /// Hard output cap; an unfinished sentence there is dropped.
    pub max_tokens: u32,
    /// Past this many tokens the reply ends at the next sentence end.
    pub soft_max_tokens: u32,
    /// Sampling temperature when the request sets none; 0 decodes greedily.
    pub temperature: f32,
    /// Repetition penalty (1: none).
    pub repeat_penalty: f32,
}

impl Default for Decoding {
    /// The measured defaults for SmolLM2-135M (docs/benchmarks.md).
    fn default() -> Self {
        Decoding {
            system: None,
            max_tokens: 64,
            soft_max_tokens: 32,
            temperature: 0.0,
            repeat_penalty: 1.1,
        }
    }
}

/// SmolLM2 (or any GGUF chat model) in the language model worker.
#[derive(Debug)]
pub struct LocalLlm {
    worker: Arc<Worker>,
    model: String,
    decoding: Decoding,
}

impl LocalLlm {
    /// An adapter over a started language model worker.
    pub fn new(worker: Arc<Worker>, model: impl Into<String>, decoding: Decoding) -> Self {
        LocalLlm {
            worker,
            model: model.into(),
            decoding,
        }
    }
}

#[async_trait]
impl LlmProvider for LocalLlm {
    local_identity!();

    async fn stream(&self, request: LlmRequest) -> Result<LlmStream, ProviderError> {
        let d = &self.decoding;
        let system = d.system.clone().unwrap_or(request.system);
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
        let max_tokens = request.max_tokens.min(d.max_tokens).max(1);
        let soft_max_tokens = d.soft_max_tokens.min(max_tokens);
        let temperature = request.temperature.unwrap_or(d.temperature);
        let repeat_penalty = d.repeat_penalty;
        let mut ticket = self
            .worker
            .submit(
                |id| Request::Generate {
                    id,
                    messages,
                    max_tokens,
                    soft_max_tokens,
                    temperature,
                    repeat_penalty,
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
