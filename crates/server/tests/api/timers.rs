//! Session timers with short configured values: heartbeat, idle, maximum duration, token
//! expiry and refresh.

use std::time::Duration;

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use atlas_client::Incoming;
use atlas_protocol::{ClientMessage, EndingReason, ErrorCode, ServerEvent};
use atlas_testkit::token_for;

use crate::helpers::*;

fn fatal_error(items: &[Incoming], code: ErrorCode) -> bool {
    items.iter().any(
        |i| matches!(event(i), Some(ServerEvent::Error { code: c, fatal: true, .. }) if *c == code),
    )
}

/// A session of user `u` on a server configured by `tweak`.
async fn session_with(
    tweak: impl FnOnce(&mut atlas_server::Config),
) -> (TestApp, atlas_client::Connection) {
    let app = spawn_app_with(fast_fakes(), tweak).await;
    let (conn, _) = app.start("u", 24_000).await;
    (app, conn)
}

#[tokio::test]
async fn idle_sessions_are_closed_with_4408() {
    let (app, mut conn) = session_with(|c| c.idle_timeout_s = 1).await;
    let items = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(fatal_error(&items, ErrorCode::IdleTimeout));
    assert!(closed_with(&items, 4408), "{:#?}", summary(&items));
    // Nothing is kept: the user's place is free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(app.fakes.recorded().stt_connections.len() <= 1);
}

#[tokio::test]
async fn activity_keeps_a_session_alive() {
    let (_app, mut conn) = session_with(|c| c.idle_timeout_s = 1).await;
    // A person with the microphone open: silence is still audio.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        conn.sender
            .audio(bytes::Bytes::from(vec![0u8; 3200]))
            .await
            .unwrap();
    }
    assert_answers_ping(&mut conn).await;
}

#[tokio::test]
async fn pings_alone_do_not_keep_a_session_alive() {
    let (_app, mut conn) = session_with(|c| c.idle_timeout_s = 2).await;
    let started = tokio::time::Instant::now();
    let pinger = {
        let sender = conn.sender.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                if sender
                    .send(&ClientMessage::Ping { id: None })
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let items = until_closed(&mut conn, Duration::from_secs(6)).await;
    pinger.abort();
    assert!(fatal_error(&items, ErrorCode::IdleTimeout));
    assert!(closed_with(&items, 4408), "{:#?}", summary(&items));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn maximum_duration_warns_then_closes_with_4410() {
    let (_app, mut conn) = session_with(|c| {
        c.max_duration_s = 2;
        c.max_duration_warning_s = 1;
    })
    .await;
    let items = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(items.iter().any(|i| matches!(
        event(i),
        Some(ServerEvent::SessionEnding {
            reason: EndingReason::MaxDuration,
            seconds_left: 1
        })
    )));
    assert!(fatal_error(&items, ErrorCode::MaxDuration));
    assert!(closed_with(&items, 4410), "{:#?}", summary(&items));
}

/// Connects with `token` and starts a session, without waiting for it to start.
async fn start_with_token(app: &TestApp, token: String) -> atlas_client::Connection {
    let conn = atlas_client::connect(&atlas_client::ConnectOptions::new(app.url(), token))
        .await
        .unwrap();
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    conn
}

#[tokio::test]
async fn an_expired_token_closes_with_4401_unless_refreshed() {
    let app = spawn_app_with(fast_fakes(), |c| c.token_grace_s = 1).await;
    // Without refresh: closed at expiry + grace.
    let mut conn = start_with_token(&app, token_for("u", 1)).await;
    let began = std::time::Instant::now();
    let items = until_closed(&mut conn, Duration::from_secs(6)).await;
    assert!(fatal_error(&items, ErrorCode::TokenExpired));
    assert!(closed_with(&items, 4401), "{:#?}", summary(&items));
    assert!(began.elapsed() >= Duration::from_millis(900));
    // With a refresh: still open after the first token's expiry.
    let mut conn = start_with_token(&app, token_for("v", 1)).await;
    conn.sender
        .send(&ClientMessage::AuthRefresh {
            token: token_for("v", 600),
        })
        .await
        .unwrap();
    // Someone else's token is refused without ending the session.
    conn.sender
        .send(&ClientMessage::AuthRefresh {
            token: token_for("w", 600),
        })
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(3), |i| {
        matches!(event(i), Some(ServerEvent::Error { .. }))
    })
    .await;
    assert!(items.iter().any(|i| matches!(
        event(i),
        Some(ServerEvent::Error {
            code: ErrorCode::Unauthorized,
            fatal: false,
            ..
        })
    )));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_answers_ping(&mut conn).await;
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_and_one_that_does_not_is_dropped() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.heartbeat_interval_s = 1;
        c.heartbeat_timeout_s = 1;
    })
    .await;
    // The client library reads continuously, so its WebSocket layer answers pings.
    let (mut good, _) = app.start("good", 24_000).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_answers_ping(&mut good).await;

    // A raw client that never reads never answers pings.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(app.url())
            .unwrap();
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", app.token("mute")).parse().unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    futures_util::SinkExt::send(&mut ws, Message::text(r#"{"type":"session.start"}"#))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    // Reading now drains the pings and then finds the server's close.
    let mut close = None;
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
        match msg {
            Ok(Message::Close(frame)) => {
                close = frame.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(
        close,
        Some(1001),
        "heartbeat timeout closes with going-away"
    );
}
