//! Phone calls through Twilio Media Streams, placed by the fake Twilio over loopback: the
//! signed webhook, the TwiML, the stream at real-time pace with its marks, `clear` and DTMF,
//! against the server with the provider fakes.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use secrecy::SecretString;
use tokio_tungstenite::tungstenite::Message;

use atlas_fakes::twilio::{CallConfig, CallEnd, place_call, sign};
use atlas_server::config::TwilioNumber;

use crate::helpers::*;

const AUTH_TOKEN: &str = "twilio-test-auth-token-0123456789";
const PUBLIC: &str = "https://voice.example.com";
const NUMBER: &str = "+12025550199";

async fn phone_app(tweak: impl FnOnce(&mut atlas_server::config::Config)) -> TestApp {
    spawn_app_with(fast_fakes(), |c| {
        c.twilio_auth_token = Some(SecretString::from(AUTH_TOKEN));
        c.public_url = Some(PUBLIC.into());
        c.twilio_numbers = vec![TwilioNumber {
            number: NUMBER.into(),
            user_id: "phone-user".into(),
        }];
        tweak(c);
    })
    .await
}

fn call(app: &TestApp) -> CallConfig {
    let mut cfg = CallConfig::new(format!("http://{}", app.addr), PUBLIC, AUTH_TOKEN);
    cfg.to = NUMBER.into();
    cfg
}

/// The test question as a phone line carries it.
fn question_8k() -> Vec<i16> {
    atlas_testkit::phone_line(&speech("question_16k.wav"))
}

/// The webhook of a call to our number, signed with `signature` (or unsigned).
async fn post_webhook(
    app: &TestApp,
    params: &[(String, String)],
    signature: Option<String>,
) -> reqwest::Response {
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish();
    let mut request = reqwest::Client::new()
        .post(format!("http://{}/v1/twilio/voice", app.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body);
    if let Some(s) = signature {
        request = request.header("x-twilio-signature", s);
    }
    request.send().await.unwrap()
}

fn call_params(call_sid: &str) -> Vec<(String, String)> {
    vec![
        ("CallSid".to_owned(), call_sid.to_owned()),
        ("From".to_owned(), "+12025550101".to_owned()),
        ("To".to_owned(), NUMBER.to_owned()),
    ]
}

async fn session_rows(app: &TestApp) -> Vec<(String, Option<String>, Option<String>)> {
    let pool = sqlx::SqlitePool::connect(&app.config.database_url)
        .await
        .unwrap();
    sqlx::query_as("select transport, call_sid, caller from voice_sessions")
        .fetch_all(&pool)
        .await
        .unwrap()
}

async fn turn_rows(app: &TestApp) -> Vec<(String, String, bool)> {
    let pool = sqlx::SqlitePool::connect(&app.config.database_url)
        .await
        .unwrap();
    sqlx::query_as(
        "select user_text, assistant_text, interrupted from voice_turns order by turn_index",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
}

/// Polls until `f` holds (records are written after the session ends).
async fn eventually<T>(mut f: impl AsyncFnMut() -> Option<T>) -> T {
    for _ in 0..100 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition never held");
}

#[tokio::test]
async fn a_spoken_question_on_a_call_gets_a_spoken_answer_and_a_record() {
    let app = phone_app(|_| {}).await;
    let mut cfg = call(&app);
    cfg.audio = question_8k();
    cfg.trailing_silence = Duration::from_secs(6);
    // The answer was played: more than a second of speech, with marks echoed after it.
    let report = atlas_testkit::answered_call(cfg, Duration::from_secs(1)).await;
    assert!(report.media_messages > 0);
    assert!(
        report.marks_sent_back.iter().any(|m| !m.cleared),
        "no mark was echoed after playout"
    );
    let heard_energy: f64 = report
        .heard
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / report.heard.len().max(1) as f64;
    assert!(heard_energy > 1e4, "the answer is silence");
    // The caller hung up: the session ended and was recorded as a call.
    let rows = eventually(async || {
        let rows = session_rows(&app).await;
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows.len(), 1);
    let (transport, call_sid, caller) = &rows[0];
    assert_eq!(transport, "twilio");
    assert_eq!(call_sid.as_deref(), Some(report.call_sid.as_str()));
    // Masked unless the operator records numbers in full.
    assert_eq!(caller.as_deref(), Some("+*******0101"));
    let turns = turn_rows(&app).await;
    assert!(!turns.is_empty());
    assert!(!turns[0].1.is_empty(), "the answer is not in the record");
}

#[tokio::test]
async fn webhooks_without_a_valid_signature_are_refused() {
    let app = phone_app(|_| {}).await;
    let params = call_params("CA0123456789abcdef0123456789abcdef");
    let good = sign(AUTH_TOKEN, &format!("{PUBLIC}/v1/twilio/voice"), &params);
    let other_token = sign(
        "another-token",
        &format!("{PUBLIC}/v1/twilio/voice"),
        &params,
    );
    let other_url = sign(
        AUTH_TOKEN,
        "https://elsewhere.example.com/v1/twilio/voice",
        &params,
    );
    for bad in [
        None,
        Some("garbage".to_owned()),
        Some(other_token),
        Some(other_url),
    ] {
        let response = post_webhook(&app, &params, bad.clone()).await;
        assert_eq!(response.status(), 403, "{bad:?}");
    }
    let response = post_webhook(&app, &params, Some(good)).await;
    assert_eq!(response.status(), 200);
    let twiml = response.text().await.unwrap();
    assert!(twiml.contains("<Connect><Stream url=\"wss://voice.example.com/v1/twilio/stream\">"));
    let url_start = twiml.find("url=\"").unwrap() + 5;
    let stream_url = &twiml[url_start..url_start + twiml[url_start..].find('"').unwrap()];
    assert!(
        !stream_url.contains('?'),
        "no query string in the stream URL: {stream_url}"
    );
    // Each parameter is under 500 characters.
    for value in twiml.split("value=\"").skip(1) {
        assert!(value.find('"').unwrap() < 500);
    }
}

/// Opens the media stream as Twilio would and sends `connected` and a `start` carrying
/// `credential` for `call_sid`; returns what the server sent before closing.
async fn stream_with(app: &TestApp, call_sid: &str, credential: &str) -> Vec<Message> {
    let url = format!("ws://{}/v1/twilio/stream", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(
        r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#,
    ))
    .await
    .unwrap();
    let start = serde_json::json!({
        "event": "start", "sequenceNumber": "1", "streamSid": "MZ0123456789abcdef0123456789abcdef",
        "start": {
            "streamSid": "MZ0123456789abcdef0123456789abcdef",
            "accountSid": "AC0123456789abcdef0123456789abcdef",
            "callSid": call_sid, "tracks": ["inbound"],
            "customParameters": {"credential": credential, "caller": "+12025550101"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
        }
    });
    ws.send(Message::text(start.to_string())).await.unwrap();
    let mut got = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        let closed = matches!(m, Message::Close(_));
        got.push(m);
        if closed {
            break;
        }
    }
    got
}

/// The credential the webhook gives `call_sid`.
async fn credential_for(app: &TestApp, call_sid: &str) -> String {
    let params = call_params(call_sid);
    let signature = sign(AUTH_TOKEN, &format!("{PUBLIC}/v1/twilio/voice"), &params);
    let twiml = post_webhook(app, &params, Some(signature))
        .await
        .text()
        .await
        .unwrap();
    let start = twiml.find(r#"name="credential" value=""#).unwrap() + 26;
    let end = start + twiml[start..].find('"').unwrap();
    twiml[start..end].to_owned()
}

#[tokio::test]
async fn a_stream_without_a_valid_credential_for_its_call_is_closed_without_audio() {
    let app = phone_app(|_| {}).await;
    let sid = "CA0123456789abcdef0123456789abcdef";
    let credential = credential_for(&app, sid).await;
    let mut altered = credential.clone().into_bytes();
    let i = altered.len() / 2;
    altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    for (call_sid, credential) in [
        (sid, altered.as_str()),
        ("CAffffffffffffffffffffffffffffffff", credential.as_str()),
        (sid, ""),
    ] {
        let got = stream_with(&app, call_sid, credential).await;
        assert!(
            matches!(got.last(), Some(Message::Close(Some(f))) if u16::from(f.code) == 1008),
            "{got:?}"
        );
        assert!(
            got.iter().all(|m| !m.to_string().contains("\"media\"")),
            "audio sent to a refused stream"
        );
    }
    // No session was started for any of them.
    assert!(session_rows(&app).await.is_empty());
}

#[tokio::test]
async fn a_call_over_the_users_limit_is_told_and_hung_up() {
    let app = phone_app(|c| c.max_sessions_per_user = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut cfg = call(&app);
        cfg.trailing_silence = Duration::from_secs(60);
        cfg.hangup_after = Some(Duration::from_secs(6));
        held.push(tokio::spawn(place_call(cfg)));
    }
    // Wait until the three calls hold their sessions.
    let metrics_url = format!("http://{}/metrics", app.addr);
    eventually(async || {
        let body = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        body.lines()
            .any(|l| l == "atlas_sessions_active 3")
            .then_some(())
    })
    .await;
    let report = place_call(call(&app)).await.unwrap();
    let said = report.refused.expect("the fourth call is refused");
    assert!(said.contains("busy"), "{said}");
    assert!(report.twiml.contains("<Hangup/>"), "{}", report.twiml);
    assert_eq!(report.ended, CallEnd::Refused);
    for call in held {
        let report = call.await.unwrap().unwrap();
        assert_eq!(report.refused, None);
    }
}

#[tokio::test]
async fn barge_in_clears_the_playback_and_the_record_keeps_only_what_was_played() {
    let mut fakes = fast_fakes();
    fakes.llm.reply = Some("This is the first sentence of a long answer. ".repeat(12));
    let app = {
        let mut c = fakes;
        c.tts.speed = 20.0;
        spawn_app_with(c, |c| {
            c.twilio_auth_token = Some(SecretString::from(AUTH_TOKEN));
            c.public_url = Some(PUBLIC.into());
            c.twilio_numbers = vec![TwilioNumber {
                number: NUMBER.into(),
                user_id: "phone-user".into(),
            }];
        })
        .await
    };
    let question = question_8k();
    let mut cfg = call(&app);
    // Ask, let the answer play for a while, then ask again over it.
    let mut audio = question.clone();
    audio.extend(std::iter::repeat_n(0, 8000 * 5));
    audio.extend(question);
    cfg.audio = audio;
    cfg.trailing_silence = Duration::from_secs(4);
    let report = place_call(cfg).await.unwrap();
    assert!(report.clears >= 1, "no clear on barge-in");
    assert!(
        report.marks_sent_back.iter().any(|m| m.cleared),
        "the clear did not flush pending marks"
    );
    let turns = eventually(async || {
        let turns = turn_rows(&app).await;
        (turns.len() >= 2).then_some(turns)
    })
    .await;
    let (_, said, interrupted) = &turns[0];
    assert!(*interrupted, "{turns:?}");
    let full = "This is the first sentence of a long answer. ".repeat(12);
    assert!(
        said.len() < full.trim().len() / 2,
        "the record claims more than was played: {said:?}"
    );
}

#[tokio::test]
async fn keypad_digits_reach_the_session_as_a_turn() {
    let app = phone_app(|_| {}).await;
    let mut cfg = call(&app);
    cfg.dtmf = vec![
        (Duration::from_millis(500), '4'),
        (Duration::from_millis(700), '2'),
        (Duration::from_millis(900), '#'),
    ];
    cfg.trailing_silence = Duration::from_secs(5);
    let report = place_call(cfg).await.unwrap();
    assert!(report.heard_duration() > Duration::from_millis(500));
    let turns = eventually(async || {
        let turns = turn_rows(&app).await;
        (!turns.is_empty()).then_some(turns)
    })
    .await;
    assert_eq!(turns[0].0, "keypad: 42");
}
