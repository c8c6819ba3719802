//! Tool calling end to end: the model (the provider fakes, scripted) calls tools; server tools
//! are signed webhooks answered by a test HTTP server that checks the signature; client tools
//! are answered by the test client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::Sha256;

use atlas_client::Incoming;
use atlas_fakes::{ScriptedCall, ScriptedReply, Target};
use atlas_protocol::{ClientMessage, ServerEvent};
use atlas_server::Config;
use atlas_server::config::{LlmKind, ToolConfig, ToolRunner};

use crate::helpers::*;

const HOOK_SECRET: &str = "webhook-test-secret-0123456789abcdef-xyz";

/// One call the test webhook received.
#[derive(Clone, Debug)]
pub(crate) struct HookCall {
    body: Value,
    /// The signature matched an HMAC-SHA256 computed here, and the timestamp is current.
    signed: bool,
    /// The W3C trace context the call carried.
    pub(crate) traceparent: Option<String>,
}

/// The operator's webhook endpoint: answers per tool name, records every call.
pub(crate) struct Hook {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<HookCall>>>,
}

impl Hook {
    async fn start() -> Hook {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(answer))
            .with_state(calls.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hook { addr, calls }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub(crate) fn calls(&self) -> Vec<HookCall> {
        self.calls.lock().unwrap().clone()
    }
}

async fn answer(
    State(calls): State<Arc<Mutex<Vec<HookCall>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let timestamp = header("x-atlas-timestamp");
    let mut mac = Hmac::<Sha256>::new_from_slice(HOOK_SECRET.as_bytes()).unwrap();
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let fresh = timestamp
        .parse::<u64>()
        .is_ok_and(|t| now.abs_diff(t) < 300);
    let signed = fresh && header("x-atlas-signature") == format!("v1={expected}");
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    calls.lock().unwrap().push(HookCall {
        body: body.clone(),
        signed,
        traceparent: headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    });
    if !signed {
        return (StatusCode::UNAUTHORIZED, "bad signature").into_response();
    }
    let order = body["arguments"]["order_id"].clone();
    match body["tool"].as_str() {
        Some("lookup_order") => {
            axum::Json(json!({"order_id": order, "status": "shipped"})).into_response()
        }
        Some("slow_lookup") => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            axum::Json(json!({"status": "late"})).into_response()
        }
        Some("broken_lookup") => (
            StatusCode::INTERNAL_SERVER_ERROR,
            axum::Json(json!({"error": "database down"})),
        )
            .into_response(),
        Some("big_lookup") => axum::Json(json!({"log": "x".repeat(12_000)})).into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

fn order_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
        "additionalProperties": false
    })
}

fn webhook(name: &str, hook: &Hook, timeout_ms: u64) -> ToolConfig {
    ToolConfig {
        name: name.into(),
        description: format!("{name}: looks up an order by its id."),
        kind: ToolRunner::Webhook,
        url: Some(hook.url()),
        timeout_ms,
        idempotent: false,
        parameters: order_schema(),
    }
}

fn client_tool(name: &str) -> ToolConfig {
    ToolConfig {
        name: name.into(),
        description: "Opens a page of the app.".into(),
        kind: ToolRunner::Client,
        url: None,
        timeout_ms: 2000,
        idempotent: false,
        parameters: json!({
            "type": "object",
            "properties": {"page": {"type": "string", "enum": ["settings", "billing"]}},
            "required": ["page"]
        }),
    }
}

/// Declares `tools` (signed with [`HOOK_SECRET`]).
pub(crate) fn declare(tools: Vec<ToolConfig>) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.tools = tools;
        c.tool_webhook_secret = Some(SecretString::from(HOOK_SECRET));
    }
}

pub(crate) fn call(name: &str, arguments: &str) -> ScriptedCall {
    ScriptedCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

pub(crate) fn calls(calls: Vec<ScriptedCall>) -> ScriptedReply {
    ScriptedReply {
        text: String::new(),
        tool_calls: calls,
    }
}

pub(crate) fn reply_text(items: &[Incoming], turn: u64) -> String {
    items
        .iter()
        .filter_map(event)
        .filter_map(|e| match e {
            ServerEvent::ResponseTextDelta { turn_id, text } if *turn_id == turn => {
                Some(text.as_str())
            }
            _ => None,
        })
        .collect()
}

pub(crate) fn done(items: &[Incoming], turn: u64) -> (bool, atlas_protocol::LatencyBreakdown) {
    items
        .iter()
        .filter_map(event)
        .find_map(|e| match e {
            ServerEvent::ResponseDone {
                turn_id,
                interrupted,
                latency_ms,
            } if *turn_id == turn => Some((*interrupted, latency_ms.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no response.done: {:#?}", summary(items)))
}

pub(crate) async fn type_turn(
    conn: &mut atlas_client::Connection,
    text: &str,
    turn: u64,
) -> Vec<Incoming> {
    type_text(conn, text).await;
    collect_until(conn, Duration::from_secs(15), is_done(turn)).await
}

/// A server declaring the tools `declared` makes (with the test webhook), a model whose next
/// reply is `script`, and a started session of `user`.
async fn scripted_session(
    user: &str,
    declared: impl FnOnce(&Hook) -> Vec<ToolConfig>,
    tweak: impl FnOnce(&mut Config),
    script: Vec<ScriptedCall>,
) -> (Hook, TestApp, atlas_client::Connection) {
    let hook = Hook::start().await;
    let tools = declared(&hook);
    let app = spawn_app_with(fast_fakes(), |c| {
        declare(tools)(c);
        tweak(c);
    })
    .await;
    app.fakes.script(Target::Anthropic, calls(script));
    let (conn, _) = app.start(user, 24_000).await;
    (hook, app, conn)
}

/// [`scripted_session`] with one webhook tool, `lookup_order` (3 s timeout).
pub(crate) async fn lookup_order_session(
    user: &str,
    tweak: impl FnOnce(&mut Config),
    script: Vec<ScriptedCall>,
) -> (Hook, TestApp, atlas_client::Connection) {
    let declared = |hook: &Hook| vec![webhook("lookup_order", hook, 3000)];
    scripted_session(user, declared, tweak, script).await
}

/// The second model request's body (the one carrying the tool results).
pub(crate) fn continued_request(app: &TestApp) -> Value {
    let recorded = app.fakes.recorded();
    assert!(
        recorded.llm_requests.len() >= 2,
        "the model was asked again: {:#?}",
        recorded.llm_requests
    );
    recorded.llm_requests[1].1.clone()
}

/// Anthropic: the `tool_result` blocks of the last user message.
pub(crate) fn anthropic_results(request: &Value) -> Vec<Value> {
    let messages = request["messages"].as_array().unwrap();
    let last = messages.last().unwrap();
    assert_eq!(last["role"], "user");
    last["content"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["type"] == "tool_result")
        .cloned()
        .collect()
}

/// A spoken question answered with a webhook's result, through either model adapter.
async fn spoken_question_with_a_webhook(llm: LlmKind) {
    let hook = Hook::start().await;
    let tools = vec![webhook("lookup_order", &hook, 3000)];
    let app = spawn_app_with(fast_fakes(), |c| {
        declare(tools)(c);
        c.llm = llm;
        if llm == LlmKind::Openai {
            c.llm_model = "gpt-4o-mini".into();
        }
        c.tool_acknowledgement = "One moment.".into();
    })
    .await;
    let target = match llm {
        LlmKind::Anthropic => Target::Anthropic,
        _ => Target::OpenAiChat,
    };
    app.fakes.script(
        target,
        calls(vec![call("lookup_order", r#"{"order_id":"A123"}"#)]),
    );
    let (mut conn, session_id) = app.start("tool-user", 24_000).await;
    let streaming = stream(&conn, with_silence(speech("question_16k.wav"), 1.5), 1.0);
    let items = collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
    streaming.abort();

    // The webhook got one signed call with the checked arguments and who is asking.
    let hooked = hook.calls();
    assert_eq!(hooked.len(), 1, "{hooked:#?}");
    assert!(hooked[0].signed, "signature checks out");
    let body = &hooked[0].body;
    assert_eq!(body["tool"], "lookup_order");
    assert_eq!(body["arguments"], json!({"order_id": "A123"}));
    assert_eq!(body["user_id"], "tool-user");
    assert_eq!(body["session_id"], session_id);
    assert!(body["call_id"].as_str().is_some_and(|s| !s.is_empty()));

    // The result went back to the model, which spoke it.
    let text = reply_text(&items, 1);
    assert!(
        text.contains(r#"Here is what I found: {"order_id":"A123","status":"shipped"}"#),
        "{text}"
    );
    let (interrupted, latency) = done(&items, 1);
    assert!(!interrupted);
    assert!(
        latency.tools.is_some(),
        "tool time in the breakdown: {latency:?}"
    );
    assert!(audio_bytes(&items) > 0, "spoken");
    // The acknowledgement and the answer were synthesised.
    let tts = app.fakes.recorded().tts_inputs;
    assert_eq!(
        tts.first().map(String::as_str),
        Some("One moment."),
        "{tts:?}"
    );

    // The provider saw the tools, then the call next to its result, in its own format.
    let recorded = app.fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 2);
    let first = &recorded.llm_requests[0].1;
    let second = continued_request(&app);
    match llm {
        LlmKind::Anthropic => {
            assert_eq!(first["tools"][0]["name"], "lookup_order");
            assert_eq!(first["tools"][0]["input_schema"], order_schema());
            let messages = second["messages"].as_array().unwrap();
            let assistant = &messages[messages.len() - 2];
            let tool_use = assistant["content"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["type"] == "tool_use")
                .expect("tool_use block");
            assert_eq!(tool_use["input"], json!({"order_id": "A123"}));
            let results = anthropic_results(&second);
            assert_eq!(results.len(), 1);
            assert_eq!(results[0]["tool_use_id"], tool_use["id"]);
            assert!(results[0]["content"].to_string().contains("shipped"));
        }
        _ => {
            assert_eq!(first["tools"][0]["function"]["name"], "lookup_order");
            let messages = second["messages"].as_array().unwrap();
            let tool = messages.last().unwrap();
            assert_eq!(tool["role"], "tool");
            let assistant = &messages[messages.len() - 2];
            assert_eq!(
                tool["tool_call_id"], assistant["tool_calls"][0]["id"],
                "{second:#}"
            );
            assert!(tool["content"].as_str().unwrap().contains("shipped"));
        }
    }
}

#[tokio::test]
async fn a_spoken_question_is_answered_with_a_webhook_result_through_anthropic() {
    spoken_question_with_a_webhook(LlmKind::Anthropic).await;
}

#[tokio::test]
async fn a_spoken_question_is_answered_with_a_webhook_result_through_an_openai_compatible_server() {
    spoken_question_with_a_webhook(LlmKind::Openai).await;
}

#[tokio::test]
async fn a_client_tool_is_answered_by_the_client() {
    let app = spawn_app_with(fast_fakes(), declare(vec![client_tool("open_page")])).await;
    app.fakes.script(
        Target::Anthropic,
        calls(vec![call("open_page", r#"{"page":"settings"}"#)]),
    );
    let (mut conn, _) = app.start("client-tools", 24_000).await;
    type_text(&conn, "Open my settings").await;
    let items = collect_until(&mut conn, Duration::from_secs(10), |i| {
        matches!(event(i), Some(ServerEvent::ToolCall { .. }))
    })
    .await;
    let Some(ServerEvent::ToolCall {
        turn_id,
        call_id,
        name,
        arguments,
        timeout_ms,
    }) = items.last().and_then(event).cloned()
    else {
        unreachable!()
    };
    assert_eq!((turn_id, name.as_str()), (1, "open_page"));
    assert_eq!(arguments, json!({"page": "settings"}));
    assert_eq!(timeout_ms, 2000);
    // An answer to a call nobody made is refused; the right one goes through.
    conn.sender
        .send(&atlas_client::voice::tool_result(
            "not-a-call".into(),
            Ok(json!(1)),
        ))
        .await
        .unwrap();
    conn.sender
        .send(&atlas_client::voice::tool_result(
            call_id,
            Ok(json!({"opened": true})),
        ))
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(10), is_done(1)).await;
    assert_eq!(
        errors(&items),
        [(atlas_protocol::ErrorCode::InvalidMessage, false)]
    );
    let text = reply_text(&items, 1);
    assert!(
        text.contains(r#"Here is what I found: {"opened":true}"#),
        "{text}"
    );
}

#[tokio::test]
async fn parallel_calls_all_run_and_come_back_in_order() {
    let (hook, app, mut conn) = lookup_order_session(
        "parallel",
        |_| {},
        vec![
            call("lookup_order", r#"{"order_id":"A1"}"#),
            call("lookup_order", r#"{"order_id":"B2"}"#),
        ],
    )
    .await;
    let items = type_turn(&mut conn, "Where are my two orders?", 1).await;
    assert!(!done(&items, 1).0);
    let mut ids: Vec<String> = hook
        .calls()
        .iter()
        .map(|c| c.body["arguments"]["order_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["A1", "B2"]);
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results.len(), 2);
    assert!(results[0]["content"].to_string().contains("A1"));
    assert!(results[1]["content"].to_string().contains("B2"));
}

#[tokio::test]
async fn a_tool_that_times_out_and_a_webhook_that_fails_are_told_to_the_model() {
    let (_hook, app, mut conn) = scripted_session(
        "failing-tools",
        |hook| {
            vec![
                webhook("slow_lookup", hook, 300),
                webhook("broken_lookup", hook, 3000),
            ]
        },
        |_| {},
        vec![
            call("slow_lookup", r#"{"order_id":"A1"}"#),
            call("broken_lookup", r#"{"order_id":"A1"}"#),
        ],
    )
    .await;
    let began = tokio::time::Instant::now();
    let items = type_turn(&mut conn, "Where is my order?", 1).await;
    // The 5 s webhook was not waited for.
    assert!(began.elapsed() < Duration::from_secs(4));
    let (interrupted, latency) = done(&items, 1);
    assert!(!interrupted);
    let tools_ms = latency.tools.unwrap();
    assert!((300..2000).contains(&tools_ms), "{tools_ms}");
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["is_error"], true);
    assert!(
        results[0]["content"].to_string().contains("did not answer"),
        "{results:#?}"
    );
    assert_eq!(results[1]["is_error"], true);
    let failed = results[1]["content"].to_string();
    assert!(
        failed.contains("HTTP 500") && failed.contains("database down"),
        "{failed}"
    );
}

#[tokio::test]
async fn arguments_failing_the_schema_never_reach_the_webhook() {
    let (hook, app, mut conn) = lookup_order_session(
        "bad-arguments",
        |_| {},
        vec![call("lookup_order", r#"{"order_id":42}"#)],
    )
    .await;
    let items = type_turn(&mut conn, "Where is my order?", 1).await;
    assert!(!done(&items, 1).0);
    assert!(hook.calls().is_empty(), "never called");
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results[0]["is_error"], true);
    assert!(
        results[0]["content"].to_string().contains("schema"),
        "{results:#?}"
    );
}

#[tokio::test]
async fn barge_in_during_a_tool_wait_cuts_the_turn_at_once() {
    let (hook, app, mut conn) = scripted_session(
        "barge-in-tools",
        |hook| vec![webhook("slow_lookup", hook, 10_000)],
        |_| {},
        vec![call("slow_lookup", r#"{"order_id":"A1"}"#)],
    )
    .await;
    type_text(&conn, "Where is my order?").await;
    // Wait until the webhook is running.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while hook.calls().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "webhook not called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled_at = tokio::time::Instant::now();
    conn.sender
        .send(&ClientMessage::ResponseCancel)
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(3), is_done(1)).await;
    assert!(cancelled_at.elapsed() < Duration::from_secs(1));
    assert!(
        items.iter().any(|i| matches!(
            event(i),
            Some(ServerEvent::ResponseInterrupted { turn_id: 1 })
        )),
        "{:#?}",
        summary(&items)
    );
    assert!(done(&items, 1).0);
    // The model was not asked again; the session goes on.
    assert_eq!(app.fakes.recorded().llm_requests.len(), 1);
    let items = type_turn(&mut conn, "Never mind.", 2).await;
    assert!(!done(&items, 2).0);
    // The cut round stays in the history next to a result, as the provider requires.
    let recorded = app.fakes.recorded();
    let last = &recorded.llm_requests.last().unwrap().1;
    let results = anthropic_results(last);
    assert_eq!(results.len(), 1, "{last:#}");
    assert!(results[0]["content"].to_string().contains("cancelled"));
}

#[tokio::test]
async fn calls_beyond_the_per_turn_limit_are_refused_and_the_model_answers_in_words() {
    let (hook, app, mut conn) = lookup_order_session(
        "tool-limit",
        |c| c.tool_max_calls_per_turn = 2,
        vec![
            call("lookup_order", r#"{"order_id":"A1"}"#),
            call("lookup_order", r#"{"order_id":"A2"}"#),
            call("lookup_order", r#"{"order_id":"A3"}"#),
        ],
    )
    .await;
    let items = type_turn(&mut conn, "Check all my orders", 1).await;
    assert!(!done(&items, 1).0);
    assert_eq!(hook.calls().len(), 2);
    let second = continued_request(&app);
    let results = anthropic_results(&second);
    assert_eq!(results.len(), 3);
    assert!(results[2]["content"].to_string().contains("limit"));
    assert_eq!(second["tool_choice"], json!({"type": "none"}));
}

#[tokio::test]
async fn a_tool_loop_ends_the_session_when_the_budget_is_spent() {
    let hook = Hook::start().await;
    let app = spawn_app_with(fast_fakes(), |c| {
        declare(vec![webhook("big_lookup", &hook, 3000)])(c);
        c.tool_max_calls_per_turn = 20;
        c.session_budget_usd = 0.03;
        c.history_max_chars = 200_000;
    })
    .await;
    for _ in 0..20 {
        app.fakes.script(
            Target::Anthropic,
            calls(vec![call("big_lookup", r#"{"order_id":"A1"}"#)]),
        );
    }
    let (mut conn, _) = app.start("tool-budget", 24_000).await;
    type_text(&conn, "Keep looking").await;
    let items = until_closed(&mut conn, Duration::from_secs(20)).await;
    let Some(Incoming::Closed { code, .. }) = items.last() else {
        unreachable!()
    };
    assert_eq!(*code, Some(atlas_protocol::close::BUDGET_EXHAUSTED));
    assert!(
        errors(&items).contains(&(atlas_protocol::ErrorCode::BudgetExhausted, true)),
        "{:#?}",
        summary(&items)
    );
    let rounds = hook.calls().len();
    assert!(
        (2..10).contains(&rounds),
        "{rounds} rounds before the budget stopped the loop"
    );
    // Every model request of the loop was paid for and none was sent past the budget.
    assert_eq!(app.fakes.recorded().llm_requests.len(), rounds);
}

/// name, user_id, kind, arguments_bytes, turn_index, outcome, arguments, result
pub(crate) type ToolCallRow = (
    String,
    String,
    Option<String>,
    i64,
    i64,
    String,
    Option<String>,
    Option<String>,
);

#[tokio::test]
async fn tool_calls_are_recorded_with_their_outcomes_and_content_only_when_kept() {
    for keep in [false, true] {
        let hook = Hook::start().await;
        let app = spawn_app_with(fast_fakes(), |c| {
            declare(vec![webhook("lookup_order", &hook, 3000)])(c);
            c.tool_record_content = keep;
        })
        .await;
        app.fakes.script(
            Target::Anthropic,
            calls(vec![
                call("lookup_order", r#"{"order_id":"A1"}"#),
                call("no_such_tool", "{}"),
            ]),
        );
        let (mut conn, session_id) = app.start("tool-records", 24_000).await;
        let items = type_turn(&mut conn, "Where is my order?", 1).await;
        let tools_ms = done(&items, 1).1.tools.unwrap();
        end_session(&mut conn).await;
        let pool = sqlx::SqlitePool::connect(&app.config.database_url)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let rows = loop {
            let rows: Vec<ToolCallRow> =
                sqlx::query_as(
                    "select name, user_id, kind, arguments_bytes, turn_index, outcome, arguments, result \
                     from voice_tool_calls where session_id = ? order by name",
                )
                .bind(&session_id)
                .fetch_all(&pool)
                .await
                .unwrap_or_default();
            if rows.len() == 2 || tokio::time::Instant::now() > deadline {
                break rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(rows.len(), 2, "{rows:?}");
        let (name, user, kind, bytes, turn, outcome, arguments, result) = &rows[0];
        assert_eq!(
            (
                name.as_str(),
                user.as_str(),
                kind.as_deref(),
                *bytes,
                *turn,
                outcome.as_str()
            ),
            (
                "lookup_order",
                "tool-records",
                Some("server"),
                r#"{"order_id":"A1"}"#.len() as i64,
                1,
                "ok"
            )
        );
        assert_eq!(arguments.is_some(), keep);
        assert_eq!(result.as_ref().is_some_and(|r| r.contains("shipped")), keep);
        let (name, _, kind, _, _, outcome, _, _) = &rows[1];
        assert_eq!(
            (name.as_str(), kind.as_deref(), outcome.as_str()),
            ("no_such_tool", None, "invalid")
        );
        let turn_tools_ms: Option<i64> =
            sqlx::query_scalar("select tools_ms from voice_turns where session_id = ?")
                .bind(&session_id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(turn_tools_ms, Some(tools_ms as i64));
    }
}
