//! `atlas-voice llm-server`: any GGUF chat model behind an OpenAI-compatible chat endpoint.
//!
//! The step from the small default model to a stronger local one is one command: serve the
//! stronger model here (or with Ollama or llama.cpp's own server) and point the voice server
//! at it with `ATLAS_LLM=openai ATLAS_OPENAI_CHAT_URL=http://127.0.0.1:8081/v1`. The model
//! runs in the same language-model worker as the offline default (llama.cpp, its own
//! process), with the same complete-sentence rule.
//!
//! Serves `POST /v1/chat/completions` (streamed as server-sent events, or one JSON answer)
//! and `GET /v1/models`; listens on loopback unless told otherwise. Requests with tools are
//! refused (the worker has no tool calling).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Args;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use atlas_local::llm::{Decoding, LocalLlm};
use atlas_local::worker::{Worker, WorkerConfig};
use atlas_providers::llm::{ChatMessage, ChatRole, LlmEvent, LlmProvider, LlmRequest};

/// Arguments of `llm-server`.
#[derive(Args)]
pub struct LlmServerArgs {
    /// GGUF chat model (with its chat template). Default: the fetched SmolLM2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Models directory (for the default model).
    #[arg(long, env = "ATLAS_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Threads for the model.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// Context size in tokens.
    #[arg(long, default_value_t = 4096)]
    context: u32,
    /// Longest reply, tokens (requests may ask for less).
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Sentences after which a reply ends.
    #[arg(long, default_value_t = 4)]
    sentences: u32,
    /// Requests queued or running at once; more are refused with 429.
    #[arg(long, default_value_t = 4)]
    queue: usize,
}

/// Largest request body.
const MAX_BODY: usize = 1 << 20;

struct Served {
    llm: LocalLlm,
    name: String,
    max_tokens: u32,
}

/// Runs the server until interrupted.
pub async fn run(args: LlmServerArgs) -> anyhow::Result<()> {
    let model = match args.model {
        Some(path) => path,
        None => atlas_local::models::require(&args.models_dir, "smollm2", "the language model")?,
    };
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local".into());
    let program = std::env::current_exe()?.with_file_name("atlas-voice-llm");
    let worker = Worker::start(WorkerConfig {
        name: "language model",
        program,
        args: vec![
            "--model".into(),
            model.clone().into(),
            "--threads".into(),
            args.threads.max(1).to_string().into(),
            "--context".into(),
            args.context.to_string().into(),
            "--sentences".into(),
            args.sentences.max(1).to_string().into(),
        ],
        queue: args.queue.max(1),
        start_timeout: Duration::from_secs(300),
        nice: 0,
    })
    .await
    .with_context(|| format!("loading {}", model.display()))?;
    let llm = LocalLlm::new(
        worker,
        name.clone(),
        Decoding {
            system: None,
            max_tokens: args.max_tokens,
            soft_max_tokens: args.max_tokens,
            ..Decoding::default()
        },
    );
    let served = Arc::new(Served {
        llm,
        name,
        max_tokens: args.max_tokens,
    });
    let app = router(served);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!(
        "atlas-voice llm-server listening on http://{}/v1",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

fn router(served: Arc<Served>) -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(served)
}

async fn models(State(served): State<Arc<Served>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": served.name, "object": "model", "owned_by": "local"}],
    }))
}

#[derive(Deserialize)]
struct ChatBody {
    #[serde(default)]
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    #[serde(default)]
    tools: Vec<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or a list of parts of which the text ones are used.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn text(self) -> String {
        match self {
            Content::Text(t) => t,
            Content::Parts(parts) => parts.into_iter().filter_map(|p| p.text).collect(),
        }
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_error"
    } else {
        "invalid_request_error"
    };
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind}})),
    )
        .into_response()
}

/// The provider-neutral request for an OpenAI-style body.
fn request(body: ChatBody, cap: u32) -> Result<(LlmRequest, bool), String> {
    if !body.tools.is_empty() {
        return Err("tools are not supported by this server".into());
    }
    let mut system = String::new();
    let mut messages = Vec::with_capacity(body.messages.len());
    for m in body.messages {
        let text = m.content.map(Content::text).unwrap_or_default();
        match m.role.as_str() {
            "system" | "developer" => {
                if !system.is_empty() {
                    system.push('\n');
                }
                system.push_str(&text);
            }
            "user" => messages.push(ChatMessage::user(text)),
            "assistant" => messages.push(ChatMessage::assistant(text)),
            other => return Err(format!("unsupported message role {other:?}")),
        }
    }
    if !messages.last().is_some_and(|m| m.role == ChatRole::User) {
        return Err("the last message must be the user's".into());
    }
    if let Some(t) = body.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
        return Err(format!("temperature {t} is not between 0 and 2"));
    }
    let max_tokens = body
        .max_completion_tokens
        .or(body.max_tokens)
        .unwrap_or(cap)
        .clamp(1, cap);
    let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
    Ok((
        LlmRequest {
            system,
            messages,
            max_tokens,
            temperature: body.temperature,
            ..LlmRequest::default()
        },
        include_usage,
    ))
}

async fn chat(
    State(served): State<Arc<Served>>,
    body: Result<Json<ChatBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let body = match body {
        Ok(Json(body)) => body,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let streaming = body.stream;
    let (request, include_usage) = match request(body, served.max_tokens) {
        Ok(r) => r,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
    };
    let mut stream = match served.llm.stream(request).await {
        Ok(s) => s,
        Err(e) if e.is_busy() => return refuse(StatusCode::TOO_MANY_REQUESTS, e.to_string()),
        Err(e) => {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
        }
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let model = served.name.clone();
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    if !streaming {
        let mut text = String::new();
        let mut usage = (0, 0);
        while let Some(event) = stream.next().await {
            match event {
                Ok(LlmEvent::Delta(t)) => text.push_str(&t),
                Ok(LlmEvent::Usage(u)) => {
                    usage = (u.input_tokens.unwrap_or(0), u.output_tokens.unwrap_or(0))
                }
                Ok(_) => {}
                Err(e) => return refuse(StatusCode::BAD_GATEWAY, e.to_string()),
            }
        }
        let mut answer = chunk(Value::Null, Some("stop"));
        answer["object"] = json!("chat.completion");
        answer["choices"][0] = json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        });
        answer["usage"] = usage_json(usage);
        return Json(answer).into_response();
    }
    let events = async_stream::stream! {
        yield Ok::<_, std::convert::Infallible>(Event::default().data(
            chunk(json!({"role": "assistant", "content": ""}), None).to_string(),
        ));
        let mut usage = (0, 0);
        while let Some(event) = stream.next().await {
            match event {
                Ok(LlmEvent::Delta(t)) => {
                    yield Ok(Event::default().data(chunk(json!({"content": t}), None).to_string()));
                }
                Ok(LlmEvent::Usage(u)) => {
                    usage = (u.input_tokens.unwrap_or(0), u.output_tokens.unwrap_or(0));
                }
                Ok(_) => {}
                Err(e) => {
                    // The stream has started: the error goes in-band, then the stream ends
                    // without [DONE] so the client sees it was cut.
                    yield Ok(Event::default().data(
                        json!({"error": {"message": e.to_string(), "type": "server_error"}}).to_string(),
                    ));
                    return;
                }
            }
        }
        yield Ok(Event::default().data(chunk(json!({}), Some("stop")).to_string()));
        if include_usage {
            let mut last = chunk(json!({}), None);
            last["choices"] = json!([]);
            last["usage"] = usage_json(usage);
            yield Ok(Event::default().data(last.to_string()));
        }
        yield Ok(Event::default().data("[DONE]"));
    };
    Sse::new(events).into_response()
}

fn usage_json((input, output): (u64, u64)) -> Value {
    json!({"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(v: Value) -> ChatBody {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_chat_body_becomes_a_request() {
        let (r, usage) = request(
            body(json!({
                "model": "x", "stream": true, "stream_options": {"include_usage": true},
                "max_tokens": 1000, "temperature": 0.2,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": [{"type": "text", "text": "Sky colour?"}]},
                ],
            })),
            256,
        )
        .unwrap();
        assert!(usage);
        assert_eq!(r.system, "Be brief.");
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.messages[2].text, "Sky colour?");
        assert_eq!(r.max_tokens, 256, "capped by the server");
        assert_eq!(r.temperature, Some(0.2));
    }

    #[test]
    fn what_the_worker_cannot_do_is_refused() {
        let cases = [
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
                "tools",
            ),
            (json!({"messages": []}), "last message"),
            (
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}),
                "last message",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "role",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": 9}),
                "temperature",
            ),
        ];
        for (b, needle) in cases {
            let Err(err) = request(body(b), 64) else {
                panic!("not refused")
            };
            assert!(err.contains(needle), "{err}");
        }
    }
}
