//! The protocol's edges: refusals before the upgrade, credentials, bad input, close codes.

use std::time::Duration;

use bytes::Bytes;
use secrecy::SecretString;
use tokio_tungstenite::tungstenite::Message;

use atlas_client::{ClientError, ConnectOptions, Incoming, TokenCarrier, connect};
use atlas_protocol::{ClientMessage, ErrorCode, ServerEvent};
use atlas_server::auth;

use crate::helpers::*;

async fn refusal(app: &TestApp, token: &str) -> (u16, String) {
    match connect(&ConnectOptions::new(app.url(), token)).await {
        Err(ClientError::Refused { status, code, .. }) => (status, code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Starts a session on an open connection and waits for `session.started`.
async fn start_session(conn: &mut atlas_client::Connection) {
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    collect_until(conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionStarted { .. }))
    })
    .await;
}

#[tokio::test]
async fn bad_credentials_are_refused_before_the_upgrade_with_json_errors() {
    let app = spawn_app().await;
    let secret = SecretString::from(SECRET);
    assert_eq!(refusal(&app, "").await, (401, "unauthorized".into()));
    assert_eq!(refusal(&app, "garbage").await, (401, "unauthorized".into()));
    let other_key = auth::mint_token(
        &SecretString::from("not-the-secret"),
        "u",
        "authenticated",
        "authenticated",
        60,
    )
    .unwrap();
    assert_eq!(
        refusal(&app, &other_key).await,
        (401, "unauthorized".into())
    );
    let anon = auth::mint_token(&secret, "u", "authenticated", "anon", 60).unwrap();
    assert_eq!(refusal(&app, &anon).await, (403, "forbidden".into()));
    // A plain HTTP GET (no upgrade) with a good token gets a JSON 400.
    let resp = reqwest::Client::new()
        .get(format!("http://{}/v1/voice", app.addr))
        .bearer_auth(app.token("u"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_message");
    // Health endpoints.
    assert_eq!(app.get("/healthz").await.status(), 200);
    assert_eq!(app.get("/readyz").await.status(), 200);
}

#[tokio::test]
async fn tokens_travel_in_header_subprotocol_or_query_and_v1_is_selected() {
    let app = spawn_app().await;
    for carrier in [
        TokenCarrier::Header,
        TokenCarrier::Subprotocol,
        TokenCarrier::Query,
    ] {
        let mut conn = app.connect_with("u", carrier).await;
        assert_eq!(
            conn.protocol.as_deref(),
            Some("atlas-voice.v1"),
            "{carrier:?}"
        );
        start_session(&mut conn).await;
    }
}

fn error_of(i: &Incoming) -> Option<(ErrorCode, bool)> {
    match event(i) {
        Some(ServerEvent::Error { code, fatal, .. }) => Some((*code, *fatal)),
        _ => None,
    }
}

async fn expect_error(conn: &mut atlas_client::Connection, code: ErrorCode) {
    let items = collect_until(conn, Duration::from_secs(5), |i| error_of(i).is_some()).await;
    assert_eq!(
        error_of(items.last().unwrap()),
        Some((code, false)),
        "{:#?}",
        summary(&items)
    );
}

#[tokio::test]
async fn bad_input_gets_non_fatal_errors_and_loses_nothing() {
    let app = spawn_app().await;
    let mut conn = app.connect("u").await;
    let sender = conn.sender.clone();
    let send_raw = |m: Message| {
        let s = sender.clone();
        async move { s.send_raw(m).await.unwrap() }
    };
    // Before session.start.
    send_raw(Message::Binary(Bytes::from(vec![0u8; 3200]))).await;
    expect_error(&mut conn, ErrorCode::SessionNotStarted).await;
    send_raw(Message::text(
        r#"{"type":"session.start","input_audio":{"sample_rate":44100}}"#,
    ))
    .await;
    expect_error(&mut conn, ErrorCode::UnsupportedAudioFormat).await;
    send_raw(Message::text(
        r#"{"type":"session.start","voice":"nobody"}"#,
    ))
    .await;
    expect_error(&mut conn, ErrorCode::InvalidMessage).await;
    start_session(&mut conn).await;
    // After it.
    let cases: Vec<(Message, ErrorCode)> = vec![
        (Message::text("{not json"), ErrorCode::InvalidMessage),
        (Message::text(r#"{"no_type":1}"#), ErrorCode::InvalidMessage),
        (
            Message::text(r#"{"type":"dance"}"#),
            ErrorCode::UnknownMessageType,
        ),
        (
            Message::text(format!(
                r#"{{"type":"ping","id":"{}"}}"#,
                "x".repeat(20_000)
            )),
            ErrorCode::MessageTooLarge,
        ),
        (
            Message::text(r#"{"type":"session.start"}"#),
            ErrorCode::SessionAlreadyStarted,
        ),
        (
            Message::Binary(Bytes::from(vec![0u8; 101])),
            ErrorCode::AudioChunkInvalid,
        ),
        (
            Message::Binary(Bytes::from(vec![0u8; 98])),
            ErrorCode::AudioChunkInvalid,
        ),
        (
            // Over the audio cap, within the WebSocket message limit.
            Message::Binary(Bytes::from(vec![0u8; 102_400 + 1024])),
            ErrorCode::AudioChunkInvalid,
        ),
    ];
    for (msg, code) in cases {
        send_raw(msg).await;
        expect_error(&mut conn, code).await;
    }
    // Still alive: ping gets its pong with the same id.
    conn.sender
        .send(&ClientMessage::Ping {
            id: Some(serde_json::json!(7)),
        })
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::Pong { .. }))
    })
    .await;
    assert!(
        matches!(event(items.last().unwrap()), Some(ServerEvent::Pong { id: Some(v) }) if v == 7)
    );
    // Rejected chunks were not forwarded to the recogniser.
    assert_eq!(app.fakes.recorded().stt_audio_bytes, 0);
}

#[tokio::test]
async fn persistent_abuse_closes_with_1008() {
    let app = spawn_app().await;
    let (mut conn, _) = app.start("u", 24_000).await;
    for _ in 0..60 {
        conn.sender
            .send_raw(Message::Binary(Bytes::from(vec![0u8; 101])))
            .await
            .unwrap();
    }
    let items = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed_with(&items, 1008), "{:#?}", summary(&items));
}

#[tokio::test]
async fn session_end_closes_normally() {
    let app = spawn_app().await;
    let (mut conn, _) = app.start("u", 24_000).await;
    conn.sender.send(&ClientMessage::SessionEnd).await.unwrap();
    let items = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed_with(&items, 1000), "{:#?}", summary(&items));
}

#[tokio::test]
async fn drain_tells_sessions_to_resume_elsewhere_and_stops_in_time() {
    let app = spawn_app_with(fast_fakes(), |c| c.drain_timeout_s = 5).await;
    let (mut a, _) = app.start("a", 24_000).await;
    let (mut b, _) = app.start("b", 24_000).await;
    let began = std::time::Instant::now();
    app.shutdown.cancel();
    for conn in [&mut a, &mut b] {
        let items = until_closed(conn, Duration::from_secs(5)).await;
        assert!(items.iter().any(|i| matches!(
            event(i),
            Some(ServerEvent::SessionEnding {
                reason: atlas_protocol::EndingReason::Draining,
                ..
            })
        )));
        assert!(closed_with(&items, 1001), "{:#?}", summary(&items));
    }
    let stopped = tokio::time::timeout(Duration::from_secs(6), app.server).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))));
    assert!(began.elapsed() < Duration::from_secs(6));
    // New connections are refused once draining.
    assert!(
        connect(&ConnectOptions::new(
            format!("ws://{}/v1/voice", app.addr),
            "t"
        ))
        .await
        .is_err()
    );
}

#[tokio::test]
async fn frame_floods_are_dropped_with_an_error_then_closed_with_1008() {
    let app = spawn_app_with(fast_fakes(), |c| c.max_frames_per_s = 20).await;
    let (mut conn, _) = app.start("u", 24_000).await;
    // 60 pings in well under a second: the 21st onwards is dropped, with one error.
    for _ in 0..60 {
        conn.sender
            .send(&ClientMessage::Ping { id: None })
            .await
            .unwrap();
    }
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| error_of(i).is_some()).await;
    assert_eq!(
        error_of(items.last().unwrap()),
        Some((ErrorCode::RateLimited, false))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pongs = items
        .iter()
        .filter(|i| matches!(event(i), Some(ServerEvent::Pong { .. })))
        .count();
    while let Ok(Some(i)) =
        tokio::time::timeout(Duration::from_millis(200), conn.incoming.recv()).await
    {
        if matches!(event(&i), Some(ServerEvent::Pong { .. })) {
            pongs += 1;
        }
    }
    assert_eq!(pongs, 20, "only frames within the cap were answered");
    // Keep flooding for several seconds: the connection is closed for abuse.
    let sender = conn.sender.clone();
    let flood = tokio::spawn(async move {
        for _ in 0..400 {
            let sent = sender.send(&ClientMessage::Ping { id: None }).await;
            if sent.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let items = until_closed(&mut conn, Duration::from_secs(12)).await;
    flood.abort();
    assert!(
        items
            .iter()
            .any(|i| error_of(i) == Some((ErrorCode::RateLimited, true)))
    );
    assert!(
        closed_with(&items, 1008),
        "{:#?}",
        summary(&items[items.len().saturating_sub(3)..])
    );
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_its_session_detached() {
    // A very long reply, synthesised as fast as possible and sent without pacing, to a client
    // whose socket receive buffer is tiny and who never reads.
    let mut fakes = fast_fakes();
    fakes.llm.reply = Some("This sentence is long enough to be spoken for a while. ".repeat(70));
    fakes.llm.tokens_per_s = 0.0;
    fakes.tts.speed = 0.0;
    fakes.tts.ms_per_char = 60;
    let app = spawn_app_with(fakes, |c| {
        c.playback_lead_ms = 3_600_000;
        c.llm_max_tokens = 4000;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(app.addr).await.unwrap();
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(app.url())
            .unwrap();
    let bearer = format!("Bearer {}", app.token("slow"));
    request
        .headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let (mut sink, _stream) = futures_util::StreamExt::split(ws);
    use futures_util::SinkExt;
    sink.send(Message::text(r#"{"type":"session.start"}"#))
        .await
        .unwrap();
    // Speak, at 4× real time, without ever reading.
    let question = with_silence(speech("question_16k.wav"), 1.0);
    for chunk in question.chunks(1600) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
        sink.send(Message::Binary(Bytes::from(bytes)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The server's writer stalls, gives up after its send deadline, and the session detaches.
    let metrics_url = format!("http://{}/metrics", app.addr);
    let mut detached = false;
    for _ in 0..60 {
        let body = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if body.lines().any(|l| l == "atlas_sessions_detached 1") {
            detached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(detached, "the slow consumer was not dropped");
}

#[tokio::test]
async fn control_characters_in_recorded_strings_are_refused_at_start() {
    let app = spawn_app().await;
    let mut conn = app.connect("u").await;
    for field in [
        r#""conversation_id":"a\u0000b""#,
        r#""client":{"name":"web\u0000"}"#,
        r#""client":{"name":"web","version":"1\u0000"}"#,
        r#""voice":"alloy\u0000""#,
        r#""language":"en\u0000""#,
    ] {
        conn.sender
            .send_raw(Message::text(format!(
                r#"{{"type":"session.start",{field}}}"#
            )))
            .await
            .unwrap();
        expect_error(&mut conn, ErrorCode::InvalidMessage).await;
    }
    // The connection is still usable: a clean start succeeds.
    start_session(&mut conn).await;
}

#[tokio::test]
async fn a_malformed_traceparent_is_refused_at_start_and_a_valid_one_starts() {
    let app = spawn_app().await;
    let mut conn = app.connect("u").await;
    for bad in [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ] {
        conn.sender
            .send_raw(Message::text(format!(
                r#"{{"type":"session.start","traceparent":"{bad}"}}"#
            )))
            .await
            .unwrap();
        expect_error(&mut conn, ErrorCode::InvalidMessage).await;
    }
    let start = atlas_protocol::SessionStart {
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        ..Default::default()
    };
    start_with(&mut conn, ClientMessage::SessionStart(start)).await;
}
