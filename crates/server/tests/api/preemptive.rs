//! Preemptive replies over loopback (`ATLAS_PREEMPTIVE_REPLIES`): a reply started on a stable
//! transcript is kept when the turn ends with its words, and discarded — billed, never heard —
//! when it does not.

use std::time::Duration;

use atlas_fakes::{FakesConfig, Recorded};
use atlas_protocol::{ServerEvent, Usage};

use crate::helpers::*;

const QUESTION: &str = "What is the weather like in Paris today?";

/// A 220 Hz tone of `ms` (the fake recogniser hears speech by its level).
fn tone(ms: usize) -> Vec<i16> {
    (0..16 * ms)
        .map(|i| ((i as f64 * std::f64::consts::TAU * 220.0 / 16_000.0).sin() * 8_000.0) as i16)
        .collect()
}

fn silence(ms: usize) -> Vec<i16> {
    vec![0; 16 * ms]
}

/// Fakes whose recogniser hears `transcript` and sends the words so far as `is_final` after
/// 20 ms of silence (up to its next `|`), and its `speech_final` `final_ms` after the end of
/// speech.
fn stable_fakes(transcript: &str, final_ms: u64) -> FakesConfig {
    let mut fakes = fast_fakes();
    fakes.stt.stable_after = Some(Duration::from_millis(20));
    fakes.stt.final_delay = Duration::from_millis(final_ms);
    fakes.stt.transcripts = vec![transcript.into()];
    fakes
}

/// The person's words in each model request the fakes received, in order.
fn questions(app: &TestApp) -> Vec<String> {
    let recorded = app.fakes.recorded();
    recorded
        .llm_requests
        .iter()
        .map(|(_, b)| asked(b))
        .collect()
}

/// The person's words in a recorded model request (its last user message).
fn asked(body: &serde_json::Value) -> String {
    let messages = body["messages"].as_array().expect("messages");
    let last = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .expect("a user message");
    last["content"].as_str().expect("text content").to_owned()
}

fn position(items: &[atlas_client::Incoming], pred: impl Fn(&ServerEvent) -> bool) -> usize {
    items
        .iter()
        .position(|i| event(i).is_some_and(&pred))
        .unwrap_or_else(|| panic!("missing event in {:#?}", summary(items)))
}

/// `/metrics` counts preemptive replies with each of `outcomes`.
async fn assert_counted(app: &TestApp, outcomes: &[&str]) {
    let metrics = app.get_text("/metrics").await;
    for outcome in outcomes {
        let series = format!("atlas_preemptive_replies_total{{outcome=\"{outcome}\"}}");
        assert!(metrics.contains(&series), "no {series} in {metrics}");
    }
}

/// The client's last usage event holds what the provider bills (a stream cut while its last
/// text was on its way may leave that text unread and unbilled), and no reply was reported
/// as interrupted.
fn assert_billed_as_the_provider_bills(items: &[atlas_client::Incoming], recorded: &Recorded) {
    assert!(
        !items
            .iter()
            .any(|i| matches!(event(i), Some(ServerEvent::ResponseInterrupted { .. })))
    );
    let usage: Usage = items
        .iter()
        .rev()
        .find_map(|i| match event(i) {
            Some(ServerEvent::Usage(u)) => Some(u.clone()),
            _ => None,
        })
        .expect("a usage event");
    let billed = &recorded.usage;
    assert_eq!(usage.llm_input_tokens, billed.llm_input_tokens);
    assert!(
        usage.llm_output_tokens <= billed.llm_output_tokens
            && usage.llm_output_tokens + billed.llm_cut_last_tokens >= billed.llm_output_tokens,
        "{usage:?} vs {billed:?}"
    );
    assert_eq!(usage.tts_chars, billed.tts_chars);
}

#[tokio::test]
async fn a_reply_started_on_stable_words_is_kept_when_the_turn_ends_with_them() {
    // The endpoint comes a whole second after the speech: long after the stable words.
    let app = spawn_app_with(stable_fakes(QUESTION, 1_000), |c| c.preemptive_replies = 2).await;
    let (mut conn, _) = app.start("early", 24_000).await;
    let mut audio = tone(2_800);
    audio.extend(silence(2_500));
    let streaming = stream(&conn, audio, 1.0);
    let fakes = &app.fakes;
    let mut asked_before_the_turn_ended = None;
    let mut done = is_done(1);
    let mut items = collect_until(&mut conn, Duration::from_secs(20), |i| {
        if let Some(ServerEvent::TranscriptFinal { .. }) = event(i) {
            asked_before_the_turn_ended = Some(fakes.recorded().llm_requests.len());
        }
        done(i)
    })
    .await;
    items.extend(until_usage(&mut conn).await);
    streaming.abort();

    assert_eq!(
        asked_before_the_turn_ended,
        Some(1),
        "the model was asked before the turn ended"
    );
    let recorded = app.fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 1, "kept, not asked again");
    assert_eq!(asked(&recorded.llm_requests[0].1), QUESTION);
    // The client sees an ordinary turn: its words, then the reply.
    let heard = position(
        &items,
        |e| matches!(e, ServerEvent::TranscriptFinal { turn_id: 1, text } if text == QUESTION),
    );
    let started = position(&items, |e| {
        matches!(e, ServerEvent::ResponseStarted { turn_id: 1 })
    });
    let first_audio = items
        .iter()
        .position(|i| matches!(i, atlas_client::Incoming::Audio { .. }))
        .expect("reply audio");
    assert!(
        heard < started && started < first_audio,
        "{:#?}",
        summary(&items)
    );
    // Billed once, as the provider bills it.
    assert_billed_as_the_provider_bills(&items, &recorded);
    assert_eq!(recorded.usage.llm_cut_requests, 0);
    assert_counted(&app, &["kept"]).await;
}

#[tokio::test]
async fn a_reply_to_words_the_person_went_on_from_is_discarded_and_billed() {
    let transcript = "What is the | weather like in Paris today?";
    let app = spawn_app_with(stable_fakes(transcript, 150), |c| c.preemptive_replies = 2).await;
    let (mut conn, _) = app.start("early", 24_000).await;
    // Three words, a 60 ms breath (stable words, a draft), then the rest.
    let mut audio = tone(1_200);
    audio.extend(silence(60));
    audio.extend(tone(1_600));
    audio.extend(silence(2_500));
    let streaming = stream(&conn, audio, 1.0);
    let mut items = collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    items.extend(until_usage(&mut conn).await);
    streaming.abort();

    let recorded = app.fakes.recorded();
    assert_eq!(
        questions(&app),
        ["What is the", QUESTION],
        "a draft on the first words (discarded when more came), then one on the whole question"
    );
    // The client sees one turn with the whole question and one reply, never the draft's.
    let starts = items
        .iter()
        .filter(|i| matches!(event(i), Some(ServerEvent::ResponseStarted { .. })))
        .count();
    assert_eq!(starts, 1, "{:#?}", summary(&items));
    position(
        &items,
        |e| matches!(e, ServerEvent::TranscriptFinal { turn_id: 1, text } if text == QUESTION),
    );
    // Both requests are paid for.
    assert_billed_as_the_provider_bills(&items, &recorded);
    assert_counted(&app, &["discarded", "kept"]).await;
}

#[tokio::test]
async fn a_barge_in_on_a_kept_reply_cuts_it_and_is_answered() {
    let mut fakes = barge_in_fakes();
    fakes.stt.stable_after = Some(Duration::from_millis(60));
    let app = spawn_app_with(fakes, |c| c.preemptive_replies = 2).await;
    let (mut conn, _) = app.start("early", 24_000).await;
    let items = question_then_interruption(&mut conn, 2).await;
    position(&items, |e| {
        matches!(e, ServerEvent::ResponseInterrupted { turn_id: 1 })
    });
    assert_eq!(
        questions(&app).last().map(String::as_str),
        Some("Please tell me about Rome instead")
    );
}
