//! Provider faults injected through the fakes: the session recovers (retry) or the turn ends
//! with a clear error, and the session goes on.

use std::time::Duration;

use atlas_client::Incoming;
use atlas_fakes::{Fault, Target};
use atlas_protocol::{ErrorCode, ServerEvent};

use crate::helpers::*;

/// Asks the question once (4× real time) and collects until `response.done` of `turn`.
async fn ask(conn: &mut atlas_client::Connection, turn: u64) -> Vec<Incoming> {
    let question = with_silence(speech("question_16k.wav"), 1.0);
    let streaming = stream(conn, question, 4.0);
    let items = collect_until(conn, Duration::from_secs(20), is_done(turn)).await;
    streaming.abort();
    items
}

/// Asks (see [`ask`]) and checks that the turn went through without an error.
async fn ask_ok(conn: &mut atlas_client::Connection, turn: u64) -> Vec<Incoming> {
    let items = ask(conn, turn).await;
    assert!(
        errors(&items).is_empty(),
        "turn {turn}: {:#?}",
        summary(&items)
    );
    items
}

/// Asks (see [`ask`]) and checks that the turn ended with one non-fatal `code` error.
async fn ask_failing(
    conn: &mut atlas_client::Connection,
    turn: u64,
    code: ErrorCode,
) -> Vec<Incoming> {
    let items = ask(conn, turn).await;
    assert_eq!(
        errors(&items),
        vec![(code, false)],
        "turn {turn}: {:#?}",
        summary(&items)
    );
    items
}

/// Queues `times` answers with HTTP `status` (no `retry-after`) for `target`.
fn inject_status(app: &TestApp, target: Target, status: u16, times: usize) {
    for _ in 0..times {
        app.fakes.inject(
            target,
            Fault::Status {
                status,
                retry_after_s: None,
            },
        );
    }
}

fn done_interrupted(items: &[Incoming], turn: u64) -> bool {
    items.iter().any(|i| {
        matches!(event(i), Some(ServerEvent::ResponseDone { turn_id, interrupted: true, .. }) if *turn_id == turn)
    })
}

#[tokio::test]
async fn llm_429_with_retry_after_and_529_are_retried() {
    let app = spawn_app().await;
    app.fakes.inject(
        Target::Anthropic,
        Fault::Status {
            status: 429,
            retry_after_s: Some(1),
        },
    );
    inject_status(&app, Target::Anthropic, 529, 1);
    let (mut conn, _) = app.start("u", 24_000).await;
    let items = ask_ok(&mut conn, 1).await;
    assert!(!done_interrupted(&items, 1));
    assert!(audio_bytes(&items) > 0);
    assert_eq!(
        app.fakes.recorded().llm_requests.len(),
        3,
        "two failures, then success"
    );
}

#[tokio::test]
async fn llm_failing_past_the_retries_gives_a_clear_error_and_the_session_goes_on() {
    let app = spawn_app().await;
    inject_status(&app, Target::Anthropic, 500, 3);
    let (mut conn, _) = app.start("u", 24_000).await;
    let items = ask_failing(&mut conn, 1, ErrorCode::LlmFailed).await;
    assert!(done_interrupted(&items, 1));
    // The next turn works.
    let items = ask_ok(&mut conn, 2).await;
    assert!(audio_bytes(&items) > 0);
}

#[tokio::test]
async fn llm_mid_stream_error_and_dropped_stream_end_the_turn_only() {
    let app = spawn_app().await;
    app.fakes.inject(Target::Anthropic, Fault::MidStreamError);
    app.fakes.inject(Target::Anthropic, Fault::DropMidStream);
    let (mut conn, _) = app.start("u", 24_000).await;
    for turn in 1..=2 {
        let items = ask_failing(&mut conn, turn, ErrorCode::LlmFailed).await;
        assert!(done_interrupted(&items, turn));
    }
    let items = ask_ok(&mut conn, 3).await;
    assert!(!done_interrupted(&items, 3));
}

#[tokio::test]
async fn tts_stall_times_out_with_a_clear_error() {
    let app = spawn_app_with(fast_fakes(), |c| c.provider_idle_timeout_s = 1).await;
    app.fakes.inject(Target::OpenAiTts, Fault::Stall);
    let (mut conn, _) = app.start("u", 24_000).await;
    let items = ask_failing(&mut conn, 1, ErrorCode::TtsFailed).await;
    assert!(done_interrupted(&items, 1));
    ask_ok(&mut conn, 2).await;
}

#[tokio::test]
async fn tts_failure_mid_audio_and_http_error_end_the_turn_only() {
    // One sentence synthesised at a time, so the injected failures hit one request and its
    // retries deterministically.
    let app = spawn_app_with(fast_fakes(), |c| c.tts_prefetch = 1).await;
    app.fakes.inject(Target::OpenAiTts, Fault::DropMidStream);
    let (mut conn, _) = app.start("u", 24_000).await;
    ask_failing(&mut conn, 1, ErrorCode::TtsFailed).await;
    inject_status(&app, Target::OpenAiTts, 503, 3);
    ask_failing(&mut conn, 2, ErrorCode::TtsFailed).await;
    ask_ok(&mut conn, 3).await;
}

#[tokio::test]
async fn stt_drop_mid_utterance_reconnects_and_the_session_goes_on() {
    let app = spawn_app().await;
    app.fakes.inject(Target::Stt, Fault::DropMidStream);
    let (mut conn, _) = app.start("u", 24_000).await;
    let question = with_silence(speech("question_16k.wav"), 1.0);
    let streaming = stream(&conn, question, 4.0);
    let items = collect_until(&mut conn, Duration::from_secs(10), |i| {
        matches!(event(i), Some(ServerEvent::Error { .. }))
    })
    .await;
    assert_eq!(errors(&items), vec![(ErrorCode::SttFailed, false)]);
    streaming.await.unwrap();
    // Speaking again reaches a fresh recogniser connection and gets a reply.
    let items = ask(&mut conn, 1).await;
    assert!(
        items
            .iter()
            .any(|i| matches!(event(i), Some(ServerEvent::TranscriptFinal { .. })))
    );
    assert!(app.fakes.recorded().stt_connections.len() >= 2);
}

#[tokio::test]
async fn stt_refusing_connections_ends_the_session_with_a_fatal_error() {
    let app = spawn_app().await;
    inject_status(&app, Target::Stt, 503, 10);
    let (mut conn, _) = app.start("u", 24_000).await;
    let question = with_silence(speech("question_16k.wav"), 6.0);
    let streaming = stream(&conn, question, 2.0);
    let items = until_closed(&mut conn, Duration::from_secs(20)).await;
    streaming.abort();
    let errs = errors(&items);
    assert!(
        errs.iter().all(|(c, _)| *c == ErrorCode::SttFailed),
        "{errs:?}"
    );
    assert_eq!(errs.last(), Some(&(ErrorCode::SttFailed, true)));
    assert!(closed_with(&items, 1011));
}
