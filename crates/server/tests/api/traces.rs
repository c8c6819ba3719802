//! OpenTelemetry traces: exported over OTLP/HTTP to a receiver on loopback that decodes the
//! protobuf bodies with the OpenTelemetry protocol's own types.
//!
//! Each test runs on a current-thread runtime, so the session's tasks run under the
//! thread-local subscriber that carries the OpenTelemetry layer.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use sha2::Digest as _;

use atlas_client::{Connection, Incoming};
use atlas_fakes::Target;
use atlas_protocol::{ClientMessage, LatencyBreakdown, ServerEvent};
use atlas_server::telemetry::{Tracing, Transport};
use opentelemetry_sdk::trace::Sampler;

use crate::helpers::*;
use crate::tools::{call, done, lookup_order_session, type_turn};

/// What the receiver does with an export.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Collector {
    /// Takes it.
    Up,
    /// Answers 503.
    Refusing,
    /// Never answers.
    Hanging,
}

/// An OTLP/HTTP receiver: every span it was sent.
#[derive(Clone)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    /// Listens on loopback; returns the receiver and its traces endpoint.
    async fn start(mode: Collector) -> (Receiver, String) {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| async move {
                match mode {
                    Collector::Up => {}
                    Collector::Refusing => return StatusCode::SERVICE_UNAVAILABLE,
                    Collector::Hanging => std::future::pending().await,
                }
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut spans = kept.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
                StatusCode::OK
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (Receiver { spans }, format!("http://{addr}/v1/traces"))
    }

    fn named(&self, name: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }

    fn all(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// Tracing installed towards a receiver, with the OpenTelemetry layer as this thread's
/// subscriber while the guard lives.
struct Traced {
    receiver: Receiver,
    tracing: Arc<Tracing>,
    _subscriber: tracing::subscriber::DefaultGuard,
}

/// `sampler`: which sessions are traced (`None`: the environment's choice, every one here).
async fn traced(mode: Collector, max_queue: usize, sampler: Option<Sampler>) -> Traced {
    let (receiver, endpoint) = Receiver::start(mode).await;
    let tracing =
        Tracing::install(Transport::HttpProtobuf, Some(&endpoint), max_queue, sampler).unwrap();
    // The server's subscriber with RUST_LOG=warn, which turns the session spans off for the
    // log: the traces must still have them.
    let subscriber = tracing::subscriber::set_default(atlas_server::telemetry::subscriber(
        atlas_server::config::LogFormat::Text,
        tracing_subscriber::EnvFilter::new("warn"),
        Some(&tracing),
    ));
    Traced {
        receiver,
        tracing: Arc::new(tracing),
        _subscriber: subscriber,
    }
}

impl Traced {
    /// Flushes (on a blocking thread: the export runs on the SDK's own) until `names` have
    /// all arrived.
    async fn wait_for(&self, names: &[&str]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while names.iter().any(|n| self.receiver.named(n).is_empty()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "spans missing: {names:?} wanted, {:?} arrived",
                self.receiver
                    .all()
                    .iter()
                    .map(|s| s.name.clone())
                    .collect::<Vec<_>>()
            );
            let t = self.tracing.clone();
            tokio::task::spawn_blocking(move || t.flush())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The session span carrying `session_id`.
    fn session(&self, session_id: &str) -> Span {
        self.receiver
            .named("session")
            .into_iter()
            .find(|s| texts(s).iter().any(|t| t == session_id))
            .expect("the session's span, with its id")
    }

    /// The children of `parent` named `name`.
    fn children(&self, parent: &Span, name: &str) -> Vec<Span> {
        let mut spans: Vec<Span> = self
            .receiver
            .named(name)
            .into_iter()
            .filter(|s| s.parent_span_id == parent.span_id)
            .collect();
        spans.sort_by_key(|s| s.start_time_unix_nano);
        spans
    }

    /// The one child of `parent` named `name`.
    fn child(&self, parent: &Span, name: &str) -> Span {
        let spans = self.children(parent, name);
        assert_eq!(spans.len(), 1, "one {name} under {}", parent.name);
        spans.into_iter().next().unwrap()
    }
}

fn ms(span: &Span) -> f64 {
    (span.end_time_unix_nano - span.start_time_unix_nano) as f64 / 1e6
}

/// From `a`'s start to `b`'s start, in milliseconds.
fn offset(a: &Span, b: &Span) -> f64 {
    (b.start_time_unix_nano as f64 - a.start_time_unix_nano as f64) / 1e6
}

/// Every text in the span's attributes and events.
fn texts(span: &Span) -> Vec<String> {
    let values = span
        .attributes
        .iter()
        .chain(span.events.iter().flat_map(|e| e.attributes.iter()));
    values
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a Any> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Any::IntValue(n)) => *n,
        other => panic!("{} {key}: {other:?}", span.name),
    }
}

fn string(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(Any::StringValue(s)) => s.clone(),
        other => panic!("{} {key}: {other:?}", span.name),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `response.done` figures of `turn`.
fn latency_of(items: &[Incoming], turn: u64) -> LatencyBreakdown {
    done(items, turn).1
}

/// Within a millisecond (the client's figures are whole milliseconds).
fn assert_close(what: &str, span_ms: f64, figure: u64) {
    assert!(
        (span_ms - figure as f64).abs() <= 1.0,
        "{what}: {span_ms:.1} ms in the trace, the client was told {figure} ms"
    );
}

fn within(inner: &Span, outer: &Span) -> bool {
    inner.start_time_unix_nano >= outer.start_time_unix_nano
        && inner.end_time_unix_nano <= outer.end_time_unix_nano
}

/// Neither `words` nor `user` is in any span.
fn assert_no_content(spans: &[Span], words: &str, user: &str) {
    assert!(!words.trim().is_empty());
    for span in spans {
        for text in texts(span) {
            assert!(
                !text.contains(user) && !text.contains(words.trim()),
                "span {} carries {text:?}",
                span.name
            );
        }
    }
}

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// Starts a session whose `session.start` carries the client's trace context.
async fn start_in_trace(app: &TestApp, user: &str) -> (Connection, String) {
    let mut conn = app.connect(user).await;
    let ClientMessage::SessionStart(mut start) = start_message(16_000, 24_000) else {
        unreachable!()
    };
    start.traceparent = Some(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"));
    let id = start_with(&mut conn, ClientMessage::SessionStart(start)).await;
    (conn, id)
}

#[tokio::test]
async fn a_spoken_turn_continues_the_clients_trace_with_its_stages_as_the_client_sees_them() {
    let t = traced(Collector::Up, 2_048, None).await;
    let app = spawn_app().await;
    let (mut conn, session_id) = start_in_trace(&app, "trace-user").await;
    let streaming = stream(&conn, with_silence(speech("question_16k.wav"), 1.5), 1.0);
    let items = collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
    streaming.abort();
    end_session(&mut conn).await;
    let heard = items
        .iter()
        .filter_map(event)
        .find_map(|e| match e {
            ServerEvent::TranscriptFinal { text, .. } => Some(text.clone()),
            _ => None,
        })
        .expect("a final transcript");
    let latency = latency_of(&items, 1);
    t.wait_for(&["session", "voice.turn", "voice.playout"])
        .await;

    // The session continues the client's trace, under the client's span.
    let session = t.session(&session_id);
    assert_eq!(hex(&session.trace_id), CLIENT_TRACE);
    assert_eq!(hex(&session.parent_span_id), CLIENT_SPAN);
    // The user as a hash of the id, never the id.
    let hashed = hex(&sha2::Sha256::digest(b"trace-user")[..16]);
    assert_eq!(string(&session, "enduser.pseudo.id"), hashed);

    let turn = t.child(&session, "voice.turn");
    assert_eq!(string(&turn, "voice.turn.outcome"), "completed");
    assert_eq!(
        attribute(&turn, "voice.turn.spoken"),
        Some(&Any::BoolValue(true))
    );
    // Each stage lasts what the client was told, and lies within its turn.
    let stt = t.child(&turn, "voice.stt");
    let llm = t.child(&turn, "voice.llm");
    let tts = t.child(&turn, "voice.tts");
    let playout = t.child(&turn, "voice.playout");
    for (span, figure) in [
        (&stt, latency.end_of_speech_to_final),
        (&llm, latency.llm_first_token),
        (&tts, latency.tts_first_audio),
    ] {
        let figure = figure.unwrap_or_else(|| panic!("{}: no figure in {latency:?}", span.name));
        assert_close(&span.name, ms(span), figure);
        assert!(within(span, &turn), "{} within the turn", span.name);
    }
    // The turn starts at the end of speech; the first audio (the end of the first synthesis
    // and the start of the playout) comes when the client was told it did.
    let first_audio = latency.to_first_audio.expect("to_first_audio");
    assert_close(
        "end of speech → playout",
        offset(&turn, &playout),
        first_audio,
    );
    assert_close(
        "end of speech → end of the first synthesis",
        offset(&turn, &tts) + ms(&tts),
        first_audio,
    );
    assert_eq!(
        offset(&turn, &stt),
        0.0,
        "recognition starts at the end of speech"
    );
    assert!(within(&playout, &turn) && ms(&playout) > 0.0);
    assert_eq!(
        int(&playout, "voice.playout.heard_ms"),
        ms(&playout).floor() as i64
    );
    // The model's span follows the GenAI conventions, with the tokens billed.
    assert_eq!(string(&llm, "gen_ai.operation.name"), "chat");
    assert!(!string(&llm, "gen_ai.request.model").is_empty());
    assert!(int(&llm, "gen_ai.usage.input_tokens") > 0);
    assert!(int(&llm, "gen_ai.usage.output_tokens") > 0);
    assert!(int(&tts, "voice.tts.characters") > 0);
    // Each provider request is a span of its own in the turn: one model request, with the
    // usage billed and its time to first token as the client was told; the synthesis
    // requests, whose characters add up to the turn's, the first one's first audio as told.
    let model = string(&llm, "gen_ai.request.model");
    let chats = t.children(&turn, &format!("chat {model}"));
    assert_eq!(chats.len(), 1, "one model request");
    let chat = &chats[0];
    assert_eq!(int(chat, "voice.llm.round"), 0);
    for key in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
        assert_eq!(int(chat, key), int(&llm, key), "{key}");
    }
    assert_close(
        "time to first token",
        int(chat, "voice.llm.first_token_ms") as f64,
        latency.llm_first_token.unwrap(),
    );
    let mut syntheses = t.children(&turn, "voice.tts.request");
    syntheses.sort_by_key(|s| s.start_time_unix_nano);
    assert!(!syntheses.is_empty(), "synthesis requests traced");
    assert_eq!(
        syntheses
            .iter()
            .map(|s| int(s, "voice.tts.characters"))
            .sum::<i64>(),
        int(&tts, "voice.tts.characters")
    );
    assert_close(
        "time to first audio",
        int(&syntheses[0], "voice.tts.first_audio_ms") as f64,
        latency.tts_first_audio.unwrap(),
    );
    for span in chats.iter().chain(&syntheses) {
        assert!(within(span, &turn), "{} within the turn", span.name);
        assert_eq!(
            attribute(span, "voice.request.complete"),
            Some(&Any::BoolValue(true))
        );
    }

    // The providers' requests carried the session's trace.
    let carried = app.fakes.recorded().traceparents;
    for target in [Target::Stt, Target::Anthropic, Target::OpenAiTts] {
        let (_, traceparent) = carried
            .iter()
            .find(|(t, _)| *t == target)
            .unwrap_or_else(|| panic!("no traceparent to {target:?}: {carried:?}"));
        assert!(
            traceparent.starts_with(&format!("00-{CLIENT_TRACE}-")),
            "{target:?}: {traceparent}"
        );
    }
    // No words and no user in any span.
    assert_no_content(&t.receiver.all(), &heard, "trace-user");
}

#[tokio::test]
async fn a_session_the_sampler_leaves_out_is_not_traced_and_carries_no_trace_onwards() {
    // Traced only when the client's own trace is sampled.
    let t = traced(
        Collector::Up,
        2_048,
        Some(Sampler::ParentBased(Box::new(Sampler::AlwaysOff))),
    )
    .await;
    let app = spawn_app().await;
    let mut sessions = Vec::new();
    for (user, flags) in [
        ("kept", Some("01")),
        ("root", None),
        ("unsampled", Some("00")),
    ] {
        let mut conn = app.connect(user).await;
        let ClientMessage::SessionStart(mut start) = start_message(16_000, 24_000) else {
            unreachable!()
        };
        start.traceparent = flags.map(|f| format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-{f}"));
        let id = start_with(&mut conn, ClientMessage::SessionStart(start)).await;
        let items = type_turn(&mut conn, "What time does the museum open?", 1).await;
        assert!(
            latency_of(&items, 1).to_first_audio.is_some(),
            "{user}: answered"
        );
        end_session(&mut conn).await;
        sessions.push(id);
    }
    t.wait_for(&["session", "voice.turn"]).await;

    let kept = t.session(&sessions[0]);
    assert_eq!(hex(&kept.trace_id), CLIENT_TRACE);
    let all = t.receiver.all();
    let sessions_traced: Vec<_> = all.iter().filter(|s| s.name == "session").collect();
    assert_eq!(sessions_traced.len(), 1, "only the sampled session");
    assert!(
        all.iter().all(|s| s.trace_id == kept.trace_id),
        "every span is the kept session's: {:?}",
        all.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(t.children(&kept, "voice.turn").len(), 1);
    // Only the kept session's requests carried a trace context: one model request and its
    // syntheses.
    let carried = app.fakes.recorded().traceparents;
    let llm = carried
        .iter()
        .filter(|(target, _)| *target == Target::Anthropic)
        .count();
    assert_eq!(llm, 1, "{carried:?}");
    for (target, traceparent) in &carried {
        assert!(
            traceparent.starts_with(&format!("00-{CLIENT_TRACE}-")) && traceparent.ends_with("-01"),
            "{target:?}: {traceparent}"
        );
    }
}

#[tokio::test]
async fn a_typed_turn_starts_at_the_request_and_has_no_recognition() {
    let t = traced(Collector::Up, 2_048, None).await;
    let app = spawn_app().await;
    let (mut conn, session_id) = app.start("typing-user", 24_000).await;
    let items = type_turn(&mut conn, "What time does the museum open?", 1).await;
    end_session(&mut conn).await;
    let latency = latency_of(&items, 1);
    t.wait_for(&["session", "voice.turn", "voice.playout"])
        .await;

    let session = t.session(&session_id);
    let turn = t.child(&session, "voice.turn");
    assert_eq!(
        attribute(&turn, "voice.turn.spoken"),
        Some(&Any::BoolValue(false))
    );
    assert!(t.children(&turn, "voice.stt").is_empty(), "no recognition");
    assert_eq!(latency.end_of_speech_to_final, None);
    let llm = t.child(&turn, "voice.llm");
    assert_eq!(
        offset(&turn, &llm),
        0.0,
        "the model is asked when the turn starts"
    );
    assert_close("voice.llm", ms(&llm), latency.llm_first_token.unwrap());
    let playout = t.child(&turn, "voice.playout");
    assert_close(
        "request → playout",
        offset(&turn, &playout),
        latency.to_first_audio.unwrap(),
    );
    assert_no_content(&t.receiver.all(), "museum open", "typing-user");
}

#[tokio::test]
async fn a_tool_turn_traces_each_call_inside_the_time_spent_on_tools() {
    let t = traced(Collector::Up, 2_048, None).await;
    let (hook, app, mut conn) = lookup_order_session(
        "tool-trace-user",
        |_| {},
        vec![call("lookup_order", r#"{"order_id":"A-17"}"#)],
    )
    .await;
    let items = type_turn(&mut conn, "Where is my order A-17?", 1).await;
    end_session(&mut conn).await;
    let latency = latency_of(&items, 1);
    t.wait_for(&["session", "voice.turn", "voice.tool"]).await;

    let turn = t.receiver.named("voice.turn").remove(0);
    let tools = t.child(&turn, "voice.tools");
    assert_close("voice.tools", ms(&tools), latency.tools.expect("tools"));
    let call = t.child(&turn, "voice.tool");
    assert_eq!(string(&call, "gen_ai.tool.name"), "lookup_order");
    assert_eq!(string(&call, "gen_ai.operation.name"), "execute_tool");
    assert_eq!(string(&call, "voice.tool.outcome"), "ok");
    assert_eq!(string(&call, "voice.tool.kind"), "server");
    // The call lies within the time the turn spent on tools (to the millisecond the client's
    // figure is rounded to), and within the turn.
    assert!(
        call.start_time_unix_nano + 1_000_000 >= tools.start_time_unix_nano
            && call.end_time_unix_nano <= tools.end_time_unix_nano + 1_000_000,
        "the call within voice.tools"
    );
    assert!(within(&call, &turn));
    // Two model requests: the one that asked for the tool, and the one after its answer,
    // which starts once the tools are done; together they are billed what the turn was.
    let llm = t.child(&turn, "voice.llm");
    let mut chats = t.children(
        &turn,
        &format!("chat {}", string(&llm, "gen_ai.request.model")),
    );
    chats.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(chats.len(), 2, "two model requests");
    assert_eq!(
        chats
            .iter()
            .map(|c| int(c, "voice.llm.round"))
            .collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(chats[0].end_time_unix_nano <= call.start_time_unix_nano + 1_000_000);
    assert!(chats[1].start_time_unix_nano + 1_000_000 >= tools.end_time_unix_nano);
    for key in ["gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens"] {
        assert_eq!(
            chats.iter().map(|c| int(c, key)).sum::<i64>(),
            int(&llm, key),
            "{key}"
        );
    }
    // The webhook was called within the session's trace.
    let calls = hook.calls();
    assert_eq!(calls.len(), 1);
    let traceparent = calls[0].traceparent.clone().expect("a traceparent");
    assert!(
        traceparent.starts_with(&format!("00-{}-", hex(&turn.trace_id))),
        "{traceparent}"
    );
    assert_no_content(&t.receiver.all(), "A-17", "tool-trace-user");
    drop(app);
}

/// A typed turn that cuts a reply waits, once heard, until the cut reply has reported (its
/// bill is in): that wait is the turn's `voice.queued` span, just before its model request.
#[tokio::test]
async fn a_turn_waiting_for_the_reply_it_cut_shows_the_wait_as_queued() {
    let t = traced(Collector::Up, 2_048, None).await;
    let app = spawn_app_with(barge_in_fakes(), |_| {}).await;
    let (mut conn, session_id) = app.start("queue-user", 24_000).await;
    type_text(&conn, "Tell me about Paris").await;
    collect_until(&mut conn, Duration::from_secs(10), |i| {
        matches!(i, Incoming::Audio { .. })
    })
    .await;
    type_text(&conn, "Tell me about Rome instead").await;
    collect_until(&mut conn, Duration::from_secs(20), is_done(2)).await;
    end_session(&mut conn).await;
    t.wait_for(&["session", "voice.turn", "voice.queued"]).await;

    let session = t.session(&session_id);
    let turns = t.children(&session, "voice.turn");
    assert_eq!(turns.len(), 2, "two turns under the session");
    assert!(
        t.children(&turns[0], "voice.queued").is_empty(),
        "turn 1 waited for nothing"
    );
    let queued = t.child(&turns[1], "voice.queued");
    let llm = t.child(&turns[1], "voice.llm");
    let chat = t.child(
        &turns[1],
        &format!("chat {}", string(&llm, "gen_ai.request.model")),
    );
    assert!(within(&queued, &turns[1]));
    assert!(
        queued.end_time_unix_nano <= chat.start_time_unix_nano,
        "the wait ends before the model is asked"
    );
    assert!(queued.end_time_unix_nano > queued.start_time_unix_nano);
}

/// A session that moves to another instance (its connection drops, it resumes there) stays
/// one trace: the new owner's session span continues the first one's, and its turns are
/// under it.
#[tokio::test]
async fn a_session_moved_to_another_instance_stays_in_its_trace() {
    let t = traced(Collector::Up, 2_048, None).await;
    let prefix = format!("atlas-traces-{}", uuid::Uuid::new_v4());
    let shared = |c: &mut atlas_server::Config| {
        c.redis_url = Some("redis://127.0.0.1:6379".into());
        c.redis_prefix = prefix.clone();
    };
    let a = spawn_app_with(fast_fakes(), &shared).await;
    let b = spawn_app_with(fast_fakes(), &shared).await;
    let mut conn = a.connect("moving-user").await;
    let ClientMessage::SessionStart(mut start) = start_message(16_000, 24_000) else {
        unreachable!()
    };
    start.traceparent = Some(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"));
    conn.sender
        .send(&ClientMessage::SessionStart(start))
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionStarted { .. }))
    })
    .await;
    let Some(ServerEvent::SessionStarted {
        session_id,
        resume_token: token,
        ..
    }) = items.last().and_then(event).cloned()
    else {
        unreachable!()
    };
    type_turn(&mut conn, "What time does the museum open?", 1).await;
    // The network drops; the client comes back through another instance.
    conn.abort();
    let mut options = atlas_client::ConnectOptions::new(b.url(), b.token("moving-user"));
    options.resume = Some(token);
    let mut conn = atlas_client::connect(&options).await.unwrap();
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    collect_until(&mut conn, Duration::from_secs(10), |i| {
        matches!(event(i), Some(ServerEvent::SessionResumed { .. }))
    })
    .await;
    type_turn(&mut conn, "And on Sundays?", 2).await;
    end_session(&mut conn).await;
    t.wait_for(&["session", "voice.turn"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let sessions = loop {
        let sessions: Vec<Span> = t
            .receiver
            .named("session")
            .into_iter()
            .filter(|s| texts(s).contains(&session_id))
            .collect();
        if sessions.len() == 2 || tokio::time::Instant::now() > deadline {
            break sessions;
        }
        let tracing = t.tracing.clone();
        tokio::task::spawn_blocking(move || tracing.flush())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sessions.len(), 2, "a session span on each instance");
    let (first, moved) = if sessions[0].parent_span_id == sessions[1].span_id {
        (&sessions[1], &sessions[0])
    } else {
        (&sessions[0], &sessions[1])
    };
    assert_eq!(
        hex(&first.parent_span_id),
        CLIENT_SPAN,
        "the first continues the client's"
    );
    assert_eq!(
        moved.parent_span_id, first.span_id,
        "the moved one continues the first"
    );
    for span in [first, moved] {
        assert_eq!(hex(&span.trace_id), CLIENT_TRACE);
    }
    let turn_ids = |session: &Span| -> Vec<i64> {
        t.children(session, "voice.turn")
            .iter()
            .map(|s| int(s, "voice.turn.id"))
            .collect()
    };
    assert_eq!(turn_ids(first), [1]);
    assert_eq!(turn_ids(moved), [2]);
}

#[tokio::test]
async fn a_barge_in_ends_the_turn_with_what_was_heard() {
    let t = traced(Collector::Up, 2_048, None).await;
    let app = spawn_app_with(barge_in_fakes(), |_| {}).await;
    let (mut conn, session_id) = app.start("barge-user", 24_000).await;
    let items = question_then_interruption(&mut conn, 2).await;
    end_session(&mut conn).await;
    let sent_of_turn_1 = {
        let cut = items
            .iter()
            .position(|i| {
                matches!(
                    event(i),
                    Some(ServerEvent::ResponseInterrupted { turn_id: 1 })
                )
            })
            .expect("turn 1 interrupted");
        audio_bytes(&items[..cut]) as f64 / 2.0 / 24.0
    };
    t.wait_for(&["session", "voice.turn"]).await;

    let session = t.session(&session_id);
    let turns = t.children(&session, "voice.turn");
    assert_eq!(turns.len(), 2, "two turns under the session");
    let (first, second) = (&turns[0], &turns[1]);
    assert_eq!(int(first, "voice.turn.id"), 1);
    assert_eq!(string(first, "voice.turn.outcome"), "interrupted");
    assert_eq!(
        attribute(first, "voice.turn.interrupted"),
        Some(&Any::BoolValue(true))
    );
    assert_eq!(string(second, "voice.turn.outcome"), "completed");
    // The first reply was heard only in part: less than what was sent of it, and the turn
    // ended before the second began.
    let heard = t.child(first, "voice.playout");
    assert!(
        ms(&heard) > 0.0 && ms(&heard) <= sent_of_turn_1 + 1.0,
        "heard {:.0} ms of {sent_of_turn_1:.0} ms sent",
        ms(&heard)
    );
    assert!(first.end_time_unix_nano <= second.start_time_unix_nano);
}

/// The `atlas_trace_spans_total` count of `outcome` on the server's metrics.
async fn spans_counted(app: &TestApp, outcome: &str) -> u64 {
    let body = app.get_text("/metrics").await;
    let needle = format!("atlas_trace_spans_total{{outcome=\"{outcome}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Sessions whose collector fails: each turn is answered, and the spans lost are counted.
async fn turns_despite(collector: Collector, max_queue: usize, lost_as: &str) -> Arc<Tracing> {
    let t = traced(collector, max_queue, None).await;
    let app = spawn_app().await;
    for user in ["collector-a", "collector-b"] {
        let (mut conn, _) = app.start(user, 24_000).await;
        for turn in 1..=2 {
            let items = type_turn(&mut conn, "Is the collector up?", turn).await;
            let latency = latency_of(&items, turn);
            assert!(latency.to_first_audio.is_some(), "turn {turn} answered");
        }
        end_session(&mut conn).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let t2 = t.tracing.clone();
        // A flush waits for the export in flight; with a hanging collector it gives up.
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::task::spawn_blocking(move || t2.flush()),
        )
        .await;
        if spans_counted(&app, lost_as).await > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no span counted as {lost_as}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(spans_counted(&app, "exported").await, 0);
    assert!(t.receiver.all().is_empty());
    t.tracing.clone()
}

#[tokio::test]
async fn a_refusing_collector_costs_sessions_nothing_and_its_losses_are_counted() {
    let tracing = turns_despite(Collector::Refusing, 2_048, "export_failed").await;
    drop(tracing);
}

#[tokio::test]
async fn a_hanging_collector_costs_sessions_nothing_and_spans_beyond_the_queue_are_counted() {
    // Four spans wait at most; the first export never returns.
    let tracing = turns_despite(Collector::Hanging, 4, "queue_full").await;
    // Shutting down would wait for the hung export.
    std::mem::forget(tracing);
}
