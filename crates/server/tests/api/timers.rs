//! Session timers with short configured values: heartbeat, idle, maximum duration, token
//! expiry and refresh.

use std::time::Duration;

use futures_util::StreamExt;
use secrecy::SecretString;
use tokio_tungstenite::tungstenite::Message;

use atlas_client::Incoming;
use atlas_protocol::{ClientMessage, EndingReason, ErrorCode, ServerEvent};
use atlas_server::auth;

use crate::helpers::*;

fn closed_with(items: &[Incoming], code: u16) -> bool {
    matches!(items.last(), Some(Incoming::Closed { code: Some(c), .. }) if *c == code)
}

fn fatal_error(items: &[Incoming], code: ErrorCode) -> bool {
    items.iter().any(
        |i| matches!(event(i), Some(ServerEvent::Error { code: c, fatal: true, .. }) if *c == code),
    )
}

#[tokio::test]
async fn idle_sessions_are_closed_with_4408() {
    let app = spawn_app_with(fast_fakes(), |c| c.idle_timeout_s = 1).await;
    let (mut conn, _) = app.start("u", 24_000).await;
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(i, Incoming::Closed { .. })
    })
    .await;
    assert!(fatal_error(&items, ErrorCode::IdleTimeout));
    assert!(closed_with(&items, 4408), "{:#?}", summary(&items));
    // Nothing is kept: the user's place is free again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(app.fakes.recorded().stt_connections.len() <= 1);
}

#[tokio::test]
async fn activity_keeps_a_session_alive() {
    let app = spawn_app_with(fast_fakes(), |c| c.idle_timeout_s = 1).await;
    let (mut conn, _) = app.start("u", 24_000).await;
    // A person with the microphone open: silence is still audio.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        conn.sender
            .audio(bytes::Bytes::from(vec![0u8; 3200]))
            .await
            .unwrap();
    }
    conn.sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(2), |i| {
        matches!(event(i), Some(ServerEvent::Pong { .. }))
    })
    .await;
    assert!(!items.iter().any(|i| matches!(i, Incoming::Closed { .. })));
}

#[tokio::test]
async fn pings_alone_do_not_keep_a_session_alive() {
    let app = spawn_app_with(fast_fakes(), |c| c.idle_timeout_s = 2).await;
    let (mut conn, _) = app.start("u", 24_000).await;
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
    let items = collect_until(&mut conn, Duration::from_secs(6), |i| {
        matches!(i, Incoming::Closed { .. })
    })
    .await;
    pinger.abort();
    assert!(fatal_error(&items, ErrorCode::IdleTimeout));
    assert!(closed_with(&items, 4408), "{:#?}", summary(&items));
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn maximum_duration_warns_then_closes_with_4410() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.max_duration_s = 2;
        c.max_duration_warning_s = 1;
    })
    .await;
    let (mut conn, _) = app.start("u", 24_000).await;
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(i, Incoming::Closed { .. })
    })
    .await;
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

fn short_token(user: &str, ttl_s: u64) -> String {
    auth::mint_token(
        &SecretString::from(SECRET),
        user,
        "authenticated",
        "authenticated",
        ttl_s,
    )
    .unwrap()
}

#[tokio::test]
async fn an_expired_token_closes_with_4401_unless_refreshed() {
    let app = spawn_app_with(fast_fakes(), |c| c.token_grace_s = 1).await;
    // Without refresh: closed at expiry + grace.
    let mut conn = atlas_client::connect(&atlas_client::ConnectOptions::new(
        app.url(),
        short_token("u", 1),
    ))
    .await
    .unwrap();
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    let began = std::time::Instant::now();
    let items = collect_until(&mut conn, Duration::from_secs(6), |i| {
        matches!(i, Incoming::Closed { .. })
    })
    .await;
    assert!(fatal_error(&items, ErrorCode::TokenExpired));
    assert!(closed_with(&items, 4401), "{:#?}", summary(&items));
    assert!(began.elapsed() >= Duration::from_millis(900));
    // With a refresh: still open after the first token's expiry.
    let mut conn = atlas_client::connect(&atlas_client::ConnectOptions::new(
        app.url(),
        short_token("v", 1),
    ))
    .await
    .unwrap();
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    conn.sender
        .send(&ClientMessage::AuthRefresh {
            token: short_token("v", 600),
        })
        .await
        .unwrap();
    // Someone else's token is refused without ending the session.
    conn.sender
        .send(&ClientMessage::AuthRefresh {
            token: short_token("w", 600),
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
    conn.sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(2), |i| {
        matches!(event(i), Some(ServerEvent::Pong { .. })) || matches!(i, Incoming::Closed { .. })
    })
    .await;
    assert!(
        matches!(items.last().and_then(event), Some(ServerEvent::Pong { .. })),
        "{:#?}",
        summary(&items)
    );
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
    good.sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .unwrap();
    let items = collect_until(&mut good, Duration::from_secs(2), |i| {
        matches!(event(i), Some(ServerEvent::Pong { .. })) || matches!(i, Incoming::Closed { .. })
    })
    .await;
    assert!(matches!(
        items.last().and_then(event),
        Some(ServerEvent::Pong { .. })
    ));

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
