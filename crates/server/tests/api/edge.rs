//! The network edge: slow and silent clients, the cap on unauthenticated connections, and
//! WebSocket messages that are too large or never finished — each next to a live session that
//! must not notice.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use atlas_protocol::{ClientMessage, SUBPROTOCOL, ServerEvent};

use crate::helpers::*;

/// Reads (and discards) until the server closes the socket; the time that took, or `None` if
/// it was still open after `limit`.
async fn wait_closed(mut socket: TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + limit, socket.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

/// Checks that the server closes `socket` within three seconds (`what`: why it should).
async fn assert_closed_within_3s(socket: TcpStream, what: &str) {
    let took = wait_closed(socket, Duration::from_secs(5))
        .await
        .expect(what);
    assert!(took < Duration::from_secs(3), "{what}: {took:?}");
}

/// A masked client frame (RFC 6455, section 5.2).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x11, 0x22, 0x33, 0x44];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Opens a voice session over a raw socket (handshake, `session.start`, `session.started`), so
/// the test can then write arbitrary bytes.
async fn raw_session(app: &TestApp, user: &str) -> TcpStream {
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /v1/voice HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\nAuthorization: Bearer {}\r\n\r\n",
        app.addr,
        app.token(user)
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let start = serde_json::to_string(&start_message(16_000, 16_000)).unwrap();
    socket
        .write_all(&frame(true, 1, start.as_bytes()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&seen).contains("session.started") {
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, socket.read(&mut buf))
            .await
            .expect("session.started in time")
            .unwrap();
        assert!(n > 0, "closed before session.started");
        seen.extend_from_slice(&buf[..n]);
    }
    socket
}

async fn ping_pong(conn: &mut atlas_client::Connection, id: i64) {
    conn.sender
        .send(&ClientMessage::Ping {
            id: Some(serde_json::json!(id)),
        })
        .await
        .unwrap();
    collect_until(
        conn,
        Duration::from_secs(5),
        |i| matches!(event(i), Some(ServerEvent::Pong { id: Some(v) }) if *v == id),
    )
    .await;
}

#[tokio::test]
async fn slow_and_silent_clients_are_closed_while_a_session_keeps_talking() {
    let app = spawn_app_with(fast_fakes(), |c| c.http_header_timeout_s = 1).await;
    let (mut conn, _) = app.start("live", 16_000).await;
    // Half send only a request line, half send nothing at all.
    let mut sockets = Vec::new();
    for i in 0..100 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        }
        sockets.push(s);
    }
    let question = with_silence(speech("question_16k.wav"), 1.5);
    let streaming = stream(&conn, question, 1.0);
    let closing = futures::future::join_all(
        sockets
            .into_iter()
            .map(|s| wait_closed(s, Duration::from_secs(5))),
    );
    let (closed, items) = tokio::join!(
        closing,
        collect_until(&mut conn, Duration::from_secs(30), is_done(1))
    );
    streaming.abort();
    for (i, c) in closed.iter().enumerate() {
        let took = c.unwrap_or_else(|| panic!("socket {i} still open after 5 s"));
        assert!(
            took < Duration::from_secs(3),
            "socket {i} closed after {took:?}"
        );
    }
    assert!(errors(&items).is_empty(), "{:#?}", summary(&items));
    assert!(audio_bytes(&items) > 0, "the live session got its reply");
}

#[tokio::test]
async fn a_keep_alive_connection_left_idle_is_closed() {
    let app = spawn_app_with(fast_fakes(), |c| c.http_header_timeout_s = 1).await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert_closed_within_3s(s, "closed after the response").await;
}

#[tokio::test]
async fn a_pool_full_of_idle_sockets_does_not_lock_out_a_new_client() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.max_pending_connections = 8;
        c.http_header_timeout_s = 30;
    })
    .await;
    // An authenticated session holds no place in the pool.
    let (mut live, _) = app.start("live", 16_000).await;
    // Every place taken by a socket that never finishes its request (accepted in this order:
    // each connect has completed before the next starts).
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        idle.push(s);
    }
    // A client arriving now still gets its session: the oldest idle socket makes room.
    let (mut late, _) = tokio::time::timeout(Duration::from_secs(5), app.start("late", 16_000))
        .await
        .expect("a new client is served while the pool is full");
    ping_pong(&mut late, 1).await;
    let mut idle = idle.into_iter();
    let took = wait_closed(idle.next().unwrap(), Duration::from_secs(5))
        .await
        .expect("the oldest idle socket was closed");
    assert!(
        took < Duration::from_secs(2),
        "closed at once, not by the 30 s header timeout: {took:?}"
    );
    // The session gave its place back once authenticated: a plain request fits without
    // closing another.
    assert_eq!(app.get_text("/healthz").await, "ok");
    // The newer idle sockets keep their places until their own timeout.
    for s in idle {
        assert!(
            wait_closed(s, Duration::from_millis(300)).await.is_none(),
            "only as many idle sockets are closed as new clients needed room"
        );
    }
    ping_pong(&mut live, 2).await;
    ping_pong(&mut late, 2).await;
}

#[tokio::test]
async fn a_fragmented_message_never_finished_ends_the_connection() {
    let app = spawn_app_with(fast_fakes(), |c| c.ws_message_timeout_s = 1).await;
    let (mut live, _) = app.start("live", 16_000).await;
    let mut socket = raw_session(&app, "slow").await;
    // A complete message split in fragments is fine…
    socket
        .write_all(&frame(false, 1, br#"{"type":"ping","#))
        .await
        .unwrap();
    socket
        .write_all(&frame(true, 0, br#""id":1}"#))
        .await
        .unwrap();
    // …one that never ends is not.
    socket
        .write_all(&frame(false, 1, br#"{"type":"#))
        .await
        .unwrap();
    assert_closed_within_3s(socket, "closed, long before the idle timeout").await;
    ping_pong(&mut live, 1).await;
}

#[tokio::test]
async fn a_frame_never_finished_ends_the_connection() {
    let app = spawn_app_with(fast_fakes(), |c| c.ws_message_timeout_s = 1).await;
    let mut socket = raw_session(&app, "slow").await;
    let whole = frame(true, 2, &[0u8; 3200]);
    // Announces 3,200 bytes, sends 100.
    socket.write_all(&whole[..108]).await.unwrap();
    assert_closed_within_3s(socket, "closed").await;
}

#[tokio::test]
async fn a_message_over_the_websocket_limit_ends_the_connection() {
    let app = spawn_app().await;
    let limit = atlas_server::edge::max_ws_message(&app.config);
    assert!(
        limit < 4 * app.config.audio_chunk_max_bytes,
        "matched to the audio cap"
    );
    let (mut conn, _) = app.start("big", 16_000).await;
    conn.sender
        .send_raw(Message::Binary(Bytes::from(vec![0u8; limit + 2])))
        .await
        .unwrap();
    let items = until_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(audio_bytes(&items) == 0);
}
