//! Fake LLMs: Anthropic Messages (`POST /v1/messages`) and OpenAI Chat Completions
//! (`POST /v1/chat/completions`), streaming (SSE) and non-streaming.
//!
//! Both reply the same way (see [`Reply`]): with a scripted reply ([`crate::Fakes::script`]),
//! with the first tool result when the request ends with results, with the configured tool
//! call ([`crate::LlmFakeConfig::tool_call`]), or with text ([`crate::LlmFakeConfig::reply`] or
//! an echo of the last user message). Text is split into whitespace-led tokens released at
//! `first_token`, then every `1 / tokens_per_s`; tool calls follow the text, their arguments
//! streamed in fragments at the same pace, in each API's wire format. Tools, `tool_choice`
//! and the pairing of calls with results are validated as the real APIs do ([`tools`]).

mod tools;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use self::tools::{Tools, Wire};
use crate::pacing::{Bill, Step, Timed, paced_body};

/// Output tokens Anthropic's `message_start` reports (the real API says 1).
const START_OUTPUT_TOKENS: u64 = 1;
use crate::state::{Shared, StreamBill};
use crate::{Fault, LlmFakeConfig, ScriptedCall, ScriptedReply, Target, errors, util};

/// Mid-stream faults fire after this many text tokens.
const FAULT_AFTER_TOKENS: usize = 3;

/// What the two chat APIs have in common once validated.
#[derive(Debug)]
pub(crate) struct ChatRequest {
    model: String,
    max_tokens: Option<u64>,
    stream: bool,
    include_usage: bool,
    /// Characters of the system prompt and of every message's text.
    input_chars: usize,
    /// Text of the last user message ("" when there is none).
    last_user: String,
    /// Declared tools and `tool_choice`.
    tools: Tools,
    /// Contents of the tool results the last message carries (Anthropic `tool_result` blocks
    /// of the last user message; OpenAI `tool` messages at the end, or just before a last user
    /// message).
    last_results: Vec<String>,
    /// The last message is the person's words alone (no tool results).
    ends_with_plain_user: bool,
}

/// A 400 with OpenAI's `param` / `code` detail (Anthropic uses only the message).
#[derive(Debug)]
pub(crate) struct BadRequest {
    message: String,
    param: Option<String>,
    code: Option<&'static str>,
}

impl BadRequest {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
}

/// A mid-stream fault as the token loop sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MidFault {
    Drop,
    Error,
}

fn mid_fault(fault: &Option<Fault>) -> Option<MidFault> {
    match fault {
        Some(Fault::DropMidStream) => Some(MidFault::Drop),
        Some(Fault::MidStreamError) => Some(MidFault::Error),
        _ => None,
    }
}

/// What the fake answers one request with.
#[derive(Debug, PartialEq, Eq)]
struct Reply {
    text: String,
    calls: Vec<ScriptedCall>,
}

impl Reply {
    /// The reply to `req`, in this order: the scripted reply; after tool results, the first
    /// result spoken (`"Here is what I found: {content}."`); the configured tool call when the
    /// request declares (and allows) that tool and ends with the person's words; the
    /// configured text; an echo of the last user message.
    fn choose(config: &LlmFakeConfig, req: &ChatRequest, scripted: Option<ScriptedReply>) -> Self {
        if let Some(s) = scripted {
            return Reply {
                text: s.text,
                calls: s.tool_calls,
            };
        }
        let text = |text: String| Reply {
            text,
            calls: Vec::new(),
        };
        if let Some(first) = req.last_results.first() {
            return text(format!("Here is what I found: {}.", first.trim()));
        }
        if let Some(call) = &config.tool_call
            && req.ends_with_plain_user
            && req.tools.allows(&call.name)
        {
            return Reply {
                text: String::new(),
                calls: vec![call.clone()],
            };
        }
        text(match &config.reply {
            Some(reply) => reply.clone(),
            None => format!(
                "Sure, you asked: {}. This is a reply from the fake model. Is there anything else?",
                req.last_user.trim()
            ),
        })
    }
}

/// A tool call of the reply, ready to stream.
struct PlannedCall {
    /// Id in the provider's style (`toolu_…`, `call_…`).
    id: String,
    name: String,
    arguments: String,
    /// `arguments` cut into the pieces streamed (none for empty arguments).
    fragments: Vec<String>,
}

/// Characters of a streamed argument fragment.
const FRAGMENT_CHARS: usize = 12;

fn fragments(arguments: &str) -> Vec<String> {
    let chars: Vec<char> = arguments.chars().collect();
    chars
        .chunks(FRAGMENT_CHARS)
        .map(|c| c.iter().collect())
        .collect()
}

/// When each token of the reply is released: the text's tokens, then the calls' argument
/// fragments, one step each.
pub(crate) struct Plan {
    tokens: Vec<String>,
    /// Tokens actually emitted (`max_tokens` may cut the reply).
    emitted: usize,
    /// Whether `max_tokens` cut the reply (its calls are then dropped whole).
    truncated: bool,
    /// Tool calls after the text.
    calls: Vec<PlannedCall>,
    input_tokens: u64,
    first: Instant,
    interval: Duration,
}

impl Plan {
    fn new(
        config: &LlmFakeConfig,
        req: &ChatRequest,
        reply: Reply,
        call_prefix: &str,
        started: Instant,
    ) -> Self {
        let tokens = tokenize(&reply.text);
        let limit = req
            .max_tokens
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let emitted = tokens.len().min(limit);
        let mut calls: Vec<PlannedCall> = reply
            .calls
            .into_iter()
            .map(|c| PlannedCall {
                id: util::prefixed_id(call_prefix),
                fragments: fragments(&c.arguments),
                name: c.name,
                arguments: c.arguments,
            })
            .collect();
        let call_steps: usize = calls.iter().map(|c| c.fragments.len().max(1)).sum();
        let mut truncated = emitted < tokens.len();
        if !calls.is_empty() && emitted.saturating_add(call_steps) > limit {
            truncated = true;
            calls.clear();
        }
        let interval = if config.tokens_per_s.is_finite() && config.tokens_per_s > 0.0 {
            Duration::from_secs_f64(1.0 / config.tokens_per_s)
        } else {
            Duration::ZERO
        };
        Self {
            truncated,
            tokens,
            emitted,
            calls,
            input_tokens: util::estimate_tokens(req.input_chars),
            first: started + config.first_token,
            interval,
        }
    }

    /// When step `i` (text token, then call fragment) is due.
    fn token_at(&self, i: usize) -> Instant {
        self.first + self.interval.mul_f64(i as f64)
    }

    /// Steps of the calls (each call takes at least one).
    fn call_steps(&self) -> usize {
        self.calls.iter().map(|c| c.fragments.len().max(1)).sum()
    }

    /// When the last step is due (the first-token time for an empty reply).
    fn end_at(&self) -> Instant {
        self.token_at((self.emitted + self.call_steps()).saturating_sub(1))
    }

    /// Output tokens reported: text tokens plus call fragments.
    fn output_tokens(&self) -> usize {
        self.emitted + self.call_steps()
    }

    fn text(&self) -> String {
        self.tokens[..self.emitted].concat()
    }

    /// The provider's stop reason: `(max_tokens, tool_use, end_turn)` style names given.
    fn stop_reason(&self, names: [&'static str; 3]) -> &'static str {
        if self.truncated {
            names[0]
        } else if !self.calls.is_empty() {
            names[1]
        } else {
            names[2]
        }
    }

    /// Pushes one step per emitted token (made by `delta`), or the fault's step after
    /// [`FAULT_AFTER_TOKENS`] tokens: an abort, or the in-band `error_event`. Returns true when
    /// a fault was pushed (the stream must end there).
    fn push_tokens(
        &self,
        steps: &mut Vec<Timed>,
        fault: Option<MidFault>,
        delta: impl Fn(&str) -> String,
        error_event: &str,
    ) -> bool {
        let fault_step = |f, at| match f {
            MidFault::Drop => Timed {
                at,
                step: Step::Abort,
            },
            MidFault::Error => Timed::data(at, error_event.to_owned()),
        };
        for i in 0..self.emitted {
            if i == FAULT_AFTER_TOKENS
                && let Some(f) = fault
            {
                steps.push(fault_step(f, self.token_at(i)));
                return true;
            }
            let token = &self.tokens[i];
            steps.push(Timed::generated(
                self.token_at(i),
                delta(token),
                token.chars().count(),
            ));
        }
        if let Some(f) = fault {
            steps.push(fault_step(f, self.token_at(self.emitted)));
            return true;
        }
        false
    }

    /// Pushes the stream's last step, `tail`, when the last token is due; it bills the output.
    fn push_last(&self, steps: &mut Vec<Timed>, tail: String) {
        steps.push(Timed::last(
            self.end_at(),
            tail,
            self.output_tokens() as u64,
        ));
    }

    /// Pushes the calls' steps: `start(call index, call)` with the call's first fragment (or
    /// none), then `fragment(call index, piece)` for each later one.
    fn push_calls(
        &self,
        steps: &mut Vec<Timed>,
        start: impl Fn(usize, &PlannedCall, Option<&str>) -> String,
        fragment: impl Fn(usize, &str) -> String,
    ) {
        let mut step = self.emitted;
        for (k, call) in self.calls.iter().enumerate() {
            let mut pieces = call.fragments.iter();
            let first = pieces.next().map(String::as_str);
            steps.push(Timed::generated(
                self.token_at(step),
                start(k, call, first),
                first.map_or(0, |p| p.chars().count()),
            ));
            step += 1;
            for piece in pieces {
                steps.push(Timed::generated(
                    self.token_at(step),
                    fragment(k, piece),
                    piece.chars().count(),
                ));
                step += 1;
            }
        }
    }
}

/// Splits text into tokens: each token is a run of non-whitespace together with the whitespace
/// before it (so punctuation stays attached and concatenating the tokens gives the text back).
pub(crate) fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for ch in text.chars() {
        if ch.is_whitespace() {
            if in_word {
                tokens.push(std::mem::take(&mut current));
                in_word = false;
            }
        } else {
            in_word = true;
        }
        current.push(ch);
    }
    if !current.is_empty() {
        match tokens.last_mut() {
            // Trailing whitespace belongs to the last token.
            Some(last) if !in_word => last.push_str(&current),
            _ => tokens.push(current),
        }
    }
    tokens
}

fn sse_event(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

fn sse_response(steps: Vec<Timed>, shared: &Shared, id_header: (&'static str, String)) -> Response {
    let bill = StreamBill::new(shared.recorder.usage.clone());
    let mut response =
        paced_body(steps.into_iter(), shared.shutdown.clone(), Some(bill)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&id_header.1) {
        headers.insert(id_header.0, v);
    }
    response
}

/// Sleeps until `at`; false if the fakes shut down first.
async fn sleep_until(shared: &Shared, at: Instant) -> bool {
    tokio::select! {
        _ = tokio::time::sleep_until(at) => true,
        _ = shared.shutdown.cancelled() => false,
    }
}

/// A 200 whose body aborts at `at` (non-streaming `DropMidStream`).
fn aborted_response(shared: &Shared, at: Instant) -> Response {
    let steps = vec![Timed {
        at,
        step: Step::Abort,
    }];
    let mut response = paced_body(steps.into_iter(), shared.shutdown.clone(), None).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

// ---------------------------------------------------------------------------------------------
// The endpoint

/// What differs between the two chat APIs' endpoints; [`chat`] serves both.
pub(crate) trait ChatApi: Send + Sync + 'static {
    /// Which fake this is.
    const TARGET: Target;
    /// Prefix of the ids of the calls it makes (`toolu_`, `call_`).
    const CALL_PREFIX: &'static str;
    /// Status of a non-streamed answer failed by a [`Fault::MidStreamError`].
    const FAULT_STATUS: u16;
    /// The 400 message for a body that is not an object.
    const NOT_AN_OBJECT: &'static str;
    /// The 400 message for a body without `model`.
    const NO_MODEL: &'static str;

    /// The API's error response for `status`: `bad`'s detail, or the status's default.
    fn error(status: u16, bad: Option<&BadRequest>, retry_after_s: Option<u64>) -> Response;
    /// Checks the credentials (and any required header); `Some` is the refusal.
    fn check_headers(shared: &Shared, headers: &HeaderMap) -> Option<Response>;
    /// The 400 for a body that is not JSON.
    fn unparsable(e: &serde_json::Error) -> BadRequest;
    /// Validates the body's fields after `model`.
    fn parse_fields(obj: &Map<String, Value>, model: &str) -> Result<ChatRequest, BadRequest>;
    /// The streamed answer.
    fn stream(shared: &Shared, req: &ChatRequest, plan: &Plan, fault: Option<Fault>) -> Response;
    /// The non-streamed answer's response, once it is due.
    fn completion(req: &ChatRequest, plan: &Plan) -> Response;
}

/// The Anthropic Messages API (`POST /v1/messages`).
pub(crate) struct AnthropicMessages;

/// The OpenAI Chat Completions API (`POST /v1/chat/completions`).
pub(crate) struct OpenAiChat;

/// `POST /v1/messages` and `POST /v1/chat/completions`, per `A`.
pub(crate) async fn chat<A: ChatApi>(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (started, fault, parsed) = shared.receive(A::TARGET, &headers, &body);
    if let Ok(v) = &parsed {
        shared.recorder.llm_request(A::TARGET, v.clone());
    }
    if let Some(Fault::Status {
        status,
        retry_after_s,
    }) = fault
    {
        return A::error(status, None, retry_after_s);
    }
    if let Some(response) = A::check_headers(&shared, &headers) {
        return response;
    }
    let req = match parsed
        .map_err(|e| A::unparsable(&e))
        .and_then(|body| parse::<A>(&body))
    {
        Ok(req) => req,
        Err(bad) => return A::error(400, Some(&bad), None),
    };
    // A scripted reply is used up only by a request that is answered.
    let reply = Reply::choose(&shared.config.llm, &req, shared.take_script(A::TARGET));
    let plan = Plan::new(&shared.config.llm, &req, reply, A::CALL_PREFIX, started);
    if req.stream {
        shared.recorder.usage.llm_request(plan.input_tokens);
        A::stream(&shared, &req, &plan, fault)
    } else {
        complete::<A>(&shared, &req, &plan, fault).await
    }
}

/// Validates a request body: an object naming its model, then the API's own rules.
fn parse<A: ChatApi>(v: &Value) -> Result<ChatRequest, BadRequest> {
    let obj = v
        .as_object()
        .ok_or_else(|| BadRequest::new(A::NOT_AN_OBJECT))?;
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .ok_or_else(|| BadRequest::new(A::NO_MODEL))?;
    A::parse_fields(obj, model)
}

/// The non-streamed answer, whole when the streamed one would have ended (or the fault's).
async fn complete<A: ChatApi>(
    shared: &Shared,
    req: &ChatRequest,
    plan: &Plan,
    fault: Option<Fault>,
) -> Response {
    match fault {
        Some(Fault::Stall) => {
            shared.shutdown.cancelled().await;
            return A::error(500, None, None);
        }
        Some(Fault::MidStreamError) => return A::error(A::FAULT_STATUS, None, None),
        Some(Fault::DropMidStream) => return aborted_response(shared, plan.first),
        _ => {}
    }
    if !sleep_until(shared, plan.end_at()).await {
        return A::error(500, None, None);
    }
    shared.recorder.usage.llm_request(plan.input_tokens);
    shared
        .recorder
        .usage
        .llm_output(plan.output_tokens() as u64, None);
    A::completion(req, plan)
}

// ---------------------------------------------------------------------------------------------
// Anthropic

impl ChatApi for AnthropicMessages {
    const TARGET: Target = Target::Anthropic;
    const CALL_PREFIX: &'static str = "toolu_";
    const FAULT_STATUS: u16 = 529;
    const NOT_AN_OBJECT: &'static str = "body: Input should be a valid dictionary";
    const NO_MODEL: &'static str = "model: Field required";

    fn error(status: u16, bad: Option<&BadRequest>, retry_after_s: Option<u64>) -> Response {
        errors::anthropic(status, bad.map(|b| b.message.as_str()), retry_after_s)
    }

    fn check_headers(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
        if let Some(key) = &shared.config.api_key {
            let given = headers.get("x-api-key").and_then(|v| v.to_str().ok());
            if given != Some(key.as_str()) {
                return Some(errors::anthropic(401, Some("invalid x-api-key"), None));
            }
        }
        if !headers.contains_key("anthropic-version") {
            return Some(errors::anthropic(
                400,
                Some("anthropic-version: header is required"),
                None,
            ));
        }
        None
    }

    fn unparsable(e: &serde_json::Error) -> BadRequest {
        BadRequest::new(format!("There was an error parsing the body: {e}"))
    }

    fn parse_fields(obj: &Map<String, Value>, model: &str) -> Result<ChatRequest, BadRequest> {
        let max_tokens = match obj.get("max_tokens") {
            None => return Err(BadRequest::new("max_tokens: Field required")),
            Some(m) => m.as_u64().filter(|&m| m >= 1).ok_or_else(|| {
                BadRequest::new("max_tokens: Input should be an integer greater than or equal to 1")
            })?,
        };
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| BadRequest::new("messages: Field required"))?;
        if messages.is_empty() {
            return Err(BadRequest::new(
                "messages: at least one message is required",
            ));
        }
        let mut input_chars = 0;
        match obj.get("system") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => input_chars += s.chars().count(),
            Some(Value::Array(blocks)) => {
                input_chars += blocks_text(blocks, "system")?.chars().count();
            }
            Some(_) => {
                return Err(BadRequest::new(
                    "system: Input should be a valid string or a list of text blocks",
                ));
            }
        }
        let tools = tools::anthropic_tools(obj)?;
        let mut last_user = String::new();
        let mut rounds = Vec::with_capacity(messages.len());
        let mut last_results = Vec::new();
        let mut ends_with_plain_user = false;
        for (i, m) in messages.iter().enumerate() {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| BadRequest::new(format!("messages.{i}.role: Field required")))?;
            if role != "user" && role != "assistant" {
                return Err(BadRequest::new(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )));
            }
            let blocks = match m.get("content") {
                Some(Value::String(s)) => tools::Blocks {
                    text: s.clone(),
                    ..Default::default()
                },
                Some(Value::Array(blocks)) => {
                    tools::anthropic_blocks(blocks, &format!("messages.{i}.content"))?
                }
                Some(_) => {
                    return Err(BadRequest::new(format!(
                        "messages.{i}.content: Input should be a valid string or a list of content blocks"
                    )));
                }
                None => {
                    return Err(BadRequest::new(format!(
                        "messages.{i}.content: Field required"
                    )));
                }
            };
            input_chars += blocks.text.chars().count() + blocks.tool_chars;
            last_results = blocks.result_texts;
            ends_with_plain_user = role == "user" && last_results.is_empty();
            if role == "user" {
                last_user = blocks.text;
            } else {
                last_results.clear();
            }
            rounds.push(blocks.round);
        }
        tools::check_anthropic_rounds(&rounds, &tools)?;
        Ok(ChatRequest {
            model: model.to_owned(),
            max_tokens: Some(max_tokens),
            stream: obj.get("stream").and_then(Value::as_bool).unwrap_or(false),
            include_usage: true,
            input_chars,
            last_user,
            tools,
            last_results,
            ends_with_plain_user,
        })
    }

    fn stream(shared: &Shared, req: &ChatRequest, plan: &Plan, fault: Option<Fault>) -> Response {
        let id = util::prefixed_id("msg_");
        let now = Instant::now();
        let message_start = sse_event(
            "message_start",
            &json!({
                "type": "message_start",
                "message": {
                    "id": id,
                    "type": "message",
                    "role": "assistant",
                    "model": req.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {
                        "input_tokens": plan.input_tokens,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": START_OUTPUT_TOKENS,
                    },
                },
            }),
        );
        let request_id = ("request-id", util::prefixed_id("req_"));
        let mut steps = Vec::with_capacity(plan.emitted + 3);
        if matches!(fault, Some(Fault::Stall)) {
            steps.push(Timed {
                at: now,
                step: Step::Data(message_start.into(), Bill::Reported(START_OUTPUT_TOKENS)),
            });
            steps.push(Timed {
                at: now,
                step: Step::Stall,
            });
            return sse_response(steps, shared, request_id);
        }
        // A reply of calls alone has no text block; the calls' blocks follow any text block.
        let text_block = plan.calls.is_empty() || plan.emitted > 0;
        let mut head = message_start;
        if text_block {
            head.push_str(&sse_event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
        }
        head.push_str(&sse_event("ping", &json!({"type": "ping"})));
        steps.push(Timed {
            at: now,
            step: Step::Data(head.into(), Bill::Reported(START_OUTPUT_TOKENS)),
        });

        let faulted = plan.push_tokens(
            &mut steps,
            mid_fault(&fault),
            |text| {
                sse_event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
                )
            },
            &sse_event(
                "error",
                &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
        );
        if !faulted {
            let first_call = usize::from(text_block);
            let block_stop = |index: usize| {
                sse_event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": index}),
                )
            };
            let input_delta = |index: usize, partial: &str| {
                sse_event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": partial}}),
                )
            };
            plan.push_calls(
                &mut steps,
                |k, call, first| {
                    let index = first_call + k;
                    // The block before this one ends first.
                    let mut out = if index > 0 {
                        block_stop(index - 1)
                    } else {
                        String::new()
                    };
                    out.push_str(&sse_event(
                        "content_block_start",
                        &json!({"type": "content_block_start", "index": index, "content_block": {
                            "type": "tool_use", "id": call.id, "name": call.name, "input": {},
                        }}),
                    ));
                    out.push_str(&input_delta(index, ""));
                    if let Some(piece) = first {
                        out.push_str(&input_delta(index, piece));
                    }
                    out
                },
                |k, piece| input_delta(first_call + k, piece),
            );
            let last_block = (first_call + plan.calls.len()).saturating_sub(1);
            let mut tail = block_stop(last_block);
            tail.push_str(&sse_event(
                "message_delta",
                &json!({
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": plan.stop_reason(["max_tokens", "tool_use", "end_turn"]),
                        "stop_sequence": null,
                    },
                    "usage": {"output_tokens": plan.output_tokens()},
                }),
            ));
            tail.push_str(&sse_event("message_stop", &json!({"type": "message_stop"})));
            plan.push_last(&mut steps, tail);
        }
        sse_response(steps, shared, request_id)
    }

    fn completion(req: &ChatRequest, plan: &Plan) -> Response {
        let mut content = Vec::with_capacity(plan.calls.len() + 1);
        if plan.calls.is_empty() || plan.emitted > 0 {
            content.push(json!({"type": "text", "text": plan.text()}));
        }
        // A non-streamed `input` is an object; arguments that are not one come back as `{}`.
        content.extend(plan.calls.iter().map(|c| {
            json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input_object(&c.arguments)})
        }));
        let body = json!({
            "id": util::prefixed_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": req.model,
            "content": content,
            "stop_reason": plan.stop_reason(["max_tokens", "tool_use", "end_turn"]),
            "stop_sequence": null,
            "usage": {
                "input_tokens": plan.input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": plan.output_tokens(),
            },
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&util::prefixed_id("req_")) {
            headers.insert("request-id", v);
        }
        (headers, body.to_string()).into_response()
    }
}

/// Text of Anthropic content blocks (text blocks joined by a space).
fn blocks_text(blocks: &[Value], path: &str) -> Result<String, BadRequest> {
    tools::anthropic_blocks(blocks, path).map(|b| b.text)
}

/// The arguments of a call as a JSON object (`{}` when they are not one).
fn input_object(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({}),
    }
}

// ---------------------------------------------------------------------------------------------
// OpenAI

impl ChatApi for OpenAiChat {
    const TARGET: Target = Target::OpenAiChat;
    const CALL_PREFIX: &'static str = "call_";
    const FAULT_STATUS: u16 = 500;
    const NOT_AN_OBJECT: &'static str = "Invalid request body: expected a JSON object.";
    const NO_MODEL: &'static str = "you must provide a model parameter";

    fn error(status: u16, bad: Option<&BadRequest>, retry_after_s: Option<u64>) -> Response {
        errors::openai(
            status,
            bad.map(|b| b.message.as_str()),
            bad.and_then(|b| b.param.as_deref()),
            bad.and_then(|b| b.code),
            retry_after_s,
        )
    }

    fn check_headers(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
        check_bearer(shared, headers)
    }

    fn unparsable(e: &serde_json::Error) -> BadRequest {
        BadRequest::new(format!(
            "We could not parse the JSON body of your request. ({e})"
        ))
    }

    fn parse_fields(obj: &Map<String, Value>, model: &str) -> Result<ChatRequest, BadRequest> {
        let messages = obj
            .get("messages")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                BadRequest::new("Missing required parameter: 'messages'.")
                    .param("messages")
                    .code("missing_required_parameter")
            })?;
        if messages.is_empty() {
            return Err(BadRequest::new(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            )
            .param("messages")
            .code("empty_array"));
        }
        let tools = tools::openai_tools(obj)?;
        let mut input_chars = 0;
        let mut last_user = String::new();
        let mut wires = Vec::with_capacity(messages.len());
        let mut texts = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                BadRequest::new(format!("Missing required parameter: 'messages[{i}].role'."))
                    .param(format!("messages[{i}].role"))
                    .code("missing_required_parameter")
            })?;
            if !matches!(
                role,
                "system" | "developer" | "user" | "assistant" | "tool" | "function"
            ) {
                return Err(BadRequest::new(format!(
                    "Invalid value: '{role}'. Supported values are: 'system', 'developer', 'assistant', 'user', 'tool', and 'function'."
                ))
                .param(format!("messages[{i}].role"))
                .code("invalid_value"));
            }
            let text = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut texts = Vec::new();
                    for part in parts {
                        if part.get("type").and_then(Value::as_str) == Some("text") {
                            let text =
                                part.get("text").and_then(Value::as_str).ok_or_else(|| {
                                    BadRequest::new(format!(
                                    "Missing required parameter: 'messages[{i}].content[].text'."
                                ))
                                .param(format!("messages[{i}].content"))
                                .code("missing_required_parameter")
                                })?;
                            texts.push(text);
                        }
                    }
                    texts.join(" ")
                }
                Some(Value::Null) | None if role == "assistant" => String::new(),
                _ => {
                    return Err(BadRequest::new(format!(
                        "Missing required parameter: 'messages[{i}].content'."
                    ))
                    .param(format!("messages[{i}].content"))
                    .code("missing_required_parameter"));
                }
            };
            input_chars += text.chars().count();
            wires.push(match role {
                "assistant" => {
                    let (ids, chars) = tools::openai_calls(m, i)?;
                    input_chars += chars;
                    Wire::Assistant(ids)
                }
                "tool" => {
                    let id = m
                        .get("tool_call_id")
                        .and_then(Value::as_str)
                        .ok_or_else(|| {
                            BadRequest::new(format!(
                                "Missing required parameter: 'messages[{i}].tool_call_id'."
                            ))
                            .param(format!("messages[{i}].tool_call_id"))
                            .code("missing_required_parameter")
                        })?;
                    Wire::Tool(id.to_owned())
                }
                _ => Wire::Other,
            });
            texts.push(text.clone());
            if role == "user" {
                last_user = text;
            }
        }
        tools::check_openai_rounds(&wires)?;
        // The results the last message carries: the tool messages at the end, or right before a
        // last user message.
        let last_role = |k: usize| messages[k].get("role").and_then(Value::as_str);
        let n = messages.len();
        let end = if last_role(n - 1) == Some("user") {
            n - 1
        } else {
            n
        };
        let mut first_result = end;
        while first_result > 0 && matches!(wires[first_result - 1], Wire::Tool(_)) {
            first_result -= 1;
        }
        let last_results = texts[first_result..end].to_vec();
        let ends_with_plain_user = last_role(n - 1) == Some("user") && last_results.is_empty();
        let max_tokens = match obj
            .get("max_completion_tokens")
            .filter(|v| !v.is_null())
            .map(|v| ("max_completion_tokens", v))
            .or_else(|| {
                obj.get("max_tokens")
                    .filter(|v| !v.is_null())
                    .map(|v| ("max_tokens", v))
            }) {
            None => None,
            Some((name, v)) => Some(v.as_u64().filter(|&m| m >= 1).ok_or_else(|| {
                BadRequest::new(format!(
                    "Invalid '{name}': expected an integer greater than or equal to 1."
                ))
                .param(name)
                .code("invalid_value")
            })?),
        };
        let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let stream_options = obj.get("stream_options").filter(|v| !v.is_null());
        if stream_options.is_some() && !stream {
            return Err(BadRequest::new(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            )
            .param("stream_options")
            .code("invalid_value"));
        }
        let include_usage = stream_options
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(ChatRequest {
            model: model.to_owned(),
            max_tokens,
            stream,
            include_usage,
            input_chars,
            last_user,
            tools,
            last_results,
            ends_with_plain_user,
        })
    }

    fn stream(shared: &Shared, req: &ChatRequest, plan: &Plan, fault: Option<Fault>) -> Response {
        let id = util::prefixed_id("chatcmpl-");
        let request_id = ("x-request-id", util::prefixed_id("req_"));
        if matches!(fault, Some(Fault::Stall)) {
            let steps = vec![Timed {
                at: Instant::now(),
                step: Step::Stall,
            }];
            return sse_response(steps, shared, request_id);
        }
        let created = util::unix_secs();
        let include_usage = req.include_usage;
        let chunk = |delta: Value, finish_reason: Value| {
            let mut c = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            });
            if include_usage {
                c["usage"] = Value::Null;
            }
            format!("data: {c}\n\n")
        };

        let mut steps = Vec::with_capacity(plan.emitted + 3);
        // A reply of calls alone starts with `content: null`, as in OpenAI's recorded streams.
        let content = if plan.emitted == 0 && !plan.calls.is_empty() {
            Value::Null
        } else {
            json!("")
        };
        steps.push(Timed::data(
            plan.first,
            chunk(
                json!({"role": "assistant", "content": content, "refusal": null}),
                Value::Null,
            ),
        ));
        let faulted = plan.push_tokens(
            &mut steps,
            mid_fault(&fault),
            |text| chunk(json!({"content": text}), Value::Null),
            &format!(
                "data: {}\n\n",
                json!({"error": {
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error",
                    "param": null,
                    "code": null,
                }})
            ),
        );
        if !faulted {
            // Each call: its first fragment with `id`, `type` and `function.name`, then pieces of
            // `function.arguments`, all under the call's `index`.
            plan.push_calls(
                &mut steps,
                |k, call, first| {
                    chunk(
                        json!({"tool_calls": [{
                            "index": k,
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name, "arguments": first.unwrap_or("")},
                        }]}),
                        Value::Null,
                    )
                },
                |k, piece| {
                    chunk(
                        json!({"tool_calls": [{"index": k, "function": {"arguments": piece}}]}),
                        Value::Null,
                    )
                },
            );
            let finish = plan.stop_reason(["length", "tool_calls", "stop"]);
            let mut tail = chunk(json!({}), json!(finish));
            if include_usage {
                let usage = json!({
                    "id": id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "system_fingerprint": null,
                    "choices": [],
                    "usage": openai_usage(plan),
                });
                tail.push_str(&format!("data: {usage}\n\n"));
            }
            tail.push_str("data: [DONE]\n\n");
            plan.push_last(&mut steps, tail);
        }
        sse_response(steps, shared, request_id)
    }

    fn completion(req: &ChatRequest, plan: &Plan) -> Response {
        let mut message = json!({"role": "assistant", "content": plan.text(), "refusal": null});
        if !plan.calls.is_empty() {
            if plan.emitted == 0 {
                message["content"] = Value::Null;
            }
            message["tool_calls"] = plan
                .calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                .collect();
        }
        let body = json!({
            "id": util::prefixed_id("chatcmpl-"),
            "object": "chat.completion",
            "created": util::unix_secs(),
            "model": req.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": message,
                "logprobs": null,
                "finish_reason": plan.stop_reason(["length", "tool_calls", "stop"]),
            }],
            "usage": openai_usage(plan),
        });
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        (headers, body.to_string()).into_response()
    }
}

/// Checks `Authorization: Bearer <key>` when a key is configured (OpenAI chat and TTS);
/// `Some` is the 401 to answer with.
pub(crate) fn check_bearer(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let Some(key) = &shared.config.api_key else {
        return None;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match given.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) if token.trim() == key => None,
        Some(_) => Some(errors::openai(401, None, None, None, None)),
        None => Some(errors::openai(
            401,
            Some(
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            ),
            None,
            None,
            None,
        )),
    }
}

fn openai_usage(plan: &Plan) -> Value {
    let completion = plan.output_tokens() as u64;
    json!({
        "prompt_tokens": plan.input_tokens,
        "completion_tokens": completion,
        "total_tokens": plan.input_tokens + completion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_keeps_leading_space_and_punctuation() {
        let toks = tokenize("Sure, you asked: hi.  Bye!");
        assert_eq!(toks, vec!["Sure,", " you", " asked:", " hi.", "  Bye!"]);
        assert_eq!(toks.concat(), "Sure, you asked: hi.  Bye!");
        assert_eq!(tokenize(" lead trail "), vec![" lead", " trail "]);
        assert!(tokenize("").is_empty());
        assert_eq!(tokenize("   "), vec!["   "]);
    }

    #[test]
    fn anthropic_parsing_counts_chars_and_finds_last_user() {
        let body = json!({
            "model": "claude-x",
            "max_tokens": 100,
            "system": "abcd",
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "text", "text": "second"}, {"type": "image", "source": {}}]},
            ],
            "stream": true,
        });
        let req = parse::<AnthropicMessages>(&body).unwrap();
        assert_eq!(req.last_user, "second");
        assert_eq!(req.input_chars, 4 + 5 + 2 + 6);
        assert!(req.stream);
        assert_eq!(req.max_tokens, Some(100));
        assert!(parse::<AnthropicMessages>(&json!({"model": "m", "messages": []})).is_err());
        assert!(
            parse::<AnthropicMessages>(&json!({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}))
                .is_err()
        );
    }

    #[test]
    fn openai_parsing_reads_limits_and_usage_flag() {
        let body = json!({
            "model": "gpt",
            "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hey"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 7,
        });
        let req = parse::<OpenAiChat>(&body).unwrap();
        assert_eq!(req.max_tokens, Some(7));
        assert!(req.include_usage);
        assert_eq!(req.input_chars, 6);
        let bad = parse::<OpenAiChat>(&json!({"model": "gpt", "messages": []})).unwrap_err();
        assert_eq!(bad.code, Some("empty_array"));
        let bad = parse::<OpenAiChat>(&json!({"model": "gpt", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}})).unwrap_err();
        assert_eq!(bad.param.as_deref(), Some("stream_options"));
    }

    #[test]
    fn plan_honours_max_tokens_and_timing() {
        let config = LlmFakeConfig {
            first_token: Duration::from_millis(100),
            tokens_per_s: 10.0,
            reply: Some("a b c d e".into()),
            ..LlmFakeConfig::default()
        };
        let req = ChatRequest {
            max_tokens: Some(3),
            input_chars: 9,
            ..request()
        };
        let t0 = Instant::now();
        let reply = Reply::choose(&config, &req, None);
        let plan = Plan::new(&config, &req, reply, "call_", t0);
        assert_eq!(plan.emitted, 3);
        assert!(plan.truncated);
        assert_eq!(plan.text(), "a b c");
        assert_eq!(plan.input_tokens, 3);
        assert_eq!(plan.token_at(0), t0 + Duration::from_millis(100));
        assert_eq!(plan.end_at(), t0 + Duration::from_millis(300));
    }

    fn request() -> ChatRequest {
        ChatRequest {
            model: "m".into(),
            max_tokens: None,
            stream: true,
            include_usage: false,
            input_chars: 0,
            last_user: "What is the weather?".into(),
            tools: Tools {
                names: vec!["get_weather".into()],
                choice: tools::Choice::Auto,
            },
            last_results: Vec::new(),
            ends_with_plain_user: true,
        }
    }

    fn weather_call() -> ScriptedCall {
        ScriptedCall {
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }
    }

    #[test]
    fn reply_order_script_then_results_then_tool_rule_then_text() {
        let config = LlmFakeConfig {
            tool_call: Some(weather_call()),
            reply: Some("Fixed.".into()),
            ..LlmFakeConfig::default()
        };
        let req = request();
        let script = ScriptedReply {
            text: "Scripted.".into(),
            tool_calls: Vec::new(),
        };
        assert_eq!(
            Reply::choose(&config, &req, Some(script)),
            Reply {
                text: "Scripted.".into(),
                calls: Vec::new()
            }
        );
        // The rule: the tool is declared and the request ends with the person's words.
        assert_eq!(
            Reply::choose(&config, &req, None),
            Reply {
                text: String::new(),
                calls: vec![weather_call()]
            }
        );
        // After results: the first one is spoken.
        let after = ChatRequest {
            last_results: vec![r#"{"temp_c":21}"#.into(), "second".into()],
            ends_with_plain_user: false,
            ..request()
        };
        assert_eq!(
            Reply::choose(&config, &after, None).text,
            r#"Here is what I found: {"temp_c":21}."#
        );
        // Not declared, or not allowed: the configured text.
        for tools in [
            Tools::default(),
            Tools {
                names: vec!["get_weather".into()],
                choice: tools::Choice::None,
            },
            Tools {
                names: vec!["get_weather".into(), "other".into()],
                choice: tools::Choice::Named("other".into()),
            },
        ] {
            let req = ChatRequest { tools, ..request() };
            assert_eq!(Reply::choose(&config, &req, None).text, "Fixed.");
        }
    }

    #[test]
    fn plan_streams_call_fragments_after_the_text_and_drops_calls_that_do_not_fit() {
        let config = LlmFakeConfig {
            first_token: Duration::from_millis(100),
            tokens_per_s: 10.0,
            ..LlmFakeConfig::default()
        };
        let arguments = r#"{"city":"Paris","unit":"celsius"}"#; // 33 chars: 3 fragments
        let reply = || Reply {
            text: "One moment.".into(),
            calls: vec![
                ScriptedCall {
                    name: "get_weather".into(),
                    arguments: arguments.into(),
                },
                ScriptedCall {
                    name: "get_time".into(),
                    arguments: String::new(),
                },
            ],
        };
        let t0 = Instant::now();
        let plan = Plan::new(&config, &request(), reply(), "toolu_", t0);
        assert_eq!(plan.calls.len(), 2);
        assert!(plan.calls[0].id.starts_with("toolu_"));
        assert_eq!(plan.calls[0].fragments.concat(), arguments);
        assert_eq!(plan.calls[0].fragments.len(), 3);
        assert!(plan.calls[1].fragments.is_empty());
        // 2 text tokens, 3 + 1 call steps.
        assert_eq!(plan.output_tokens(), 6);
        assert_eq!(plan.end_at(), t0 + Duration::from_millis(600));
        assert_eq!(
            plan.stop_reason(["length", "tool_calls", "stop"]),
            "tool_calls"
        );
        let mut steps = Vec::new();
        plan.push_calls(
            &mut steps,
            |k, call, first| format!("start {k} {} {}", call.name, first.unwrap_or("-")),
            |k, piece| format!("piece {k} {piece}"),
        );
        assert_eq!(steps.len(), 4);
        assert_eq!(steps[0].at, t0 + Duration::from_millis(300));
        assert_eq!(steps[3].at, t0 + Duration::from_millis(600));
        let short = ChatRequest {
            max_tokens: Some(4),
            ..request()
        };
        let plan = Plan::new(&config, &short, reply(), "toolu_", t0);
        assert!(plan.calls.is_empty());
        assert!(plan.truncated);
        assert_eq!(plan.stop_reason(["length", "tool_calls", "stop"]), "length");
    }

    #[test]
    fn anthropic_parsing_finds_tool_results_and_checks_their_calls() {
        let tools = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
        let body = json!({
            "model": "m",
            "max_tokens": 50,
            "tools": tools,
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
                    {"type": "text", "text": "thanks"},
                ]},
            ],
        });
        let req = parse::<AnthropicMessages>(&body).unwrap();
        assert_eq!(req.last_results, vec!["21 C"]);
        assert!(!req.ends_with_plain_user);
        assert_eq!(req.tools.names, vec!["get_weather"]);
        // A result for a call that was never made (next to the right one).
        let mut stray = body.clone();
        stray["messages"][2]["content"]
            .as_array_mut()
            .unwrap()
            .insert(
                1,
                json!({"type": "tool_result", "tool_use_id": "toolu_9", "content": "?"}),
            );
        let e = parse::<AnthropicMessages>(&stray).unwrap_err();
        assert!(
            e.message.contains("unexpected `tool_use_id`"),
            "{}",
            e.message
        );
        let mut untooled = body.clone();
        untooled.as_object_mut().unwrap().remove("tools");
        let e = parse::<AnthropicMessages>(&untooled).unwrap_err();
        assert!(e.message.contains("must define tools"), "{}", e.message);
    }

    #[test]
    fn openai_parsing_finds_tool_results_and_checks_their_calls() {
        let body = json!({
            "model": "m",
            "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
            "tool_choice": "auto",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
            ],
        });
        let req = parse::<OpenAiChat>(&body).unwrap();
        assert_eq!(req.last_results, vec!["21 C"]);
        assert!(!req.ends_with_plain_user);
        let mut with_text = body.clone();
        with_text["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "user", "content": "and tomorrow?"}));
        let req = parse::<OpenAiChat>(&with_text).unwrap();
        assert_eq!(req.last_results, vec!["21 C"]);
        assert_eq!(req.last_user, "and tomorrow?");
        let mut missing = body.clone();
        missing["messages"].as_array_mut().unwrap().pop();
        let e = parse::<OpenAiChat>(&missing).unwrap_err();
        assert!(
            e.message.contains("did not have response messages: call_1"),
            "{}",
            e.message
        );
        let plain = parse::<OpenAiChat>(
            &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .unwrap();
        assert!(plain.ends_with_plain_user);
        assert!(plain.last_results.is_empty());
    }
}
