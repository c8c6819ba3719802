//! The network edge: accepting connections and bounding what a client can hold before it has
//! authenticated, and how long it may take to finish a WebSocket message.
//!
//! - **Header-read and idle timeout.** Each connection is served by hyper's HTTP/1 server with
//!   a timer: the head of every request, including the first, must arrive within
//!   `ATLAS_HTTP_HEADER_TIMEOUT_S`, counted from when the connection starts waiting for it. A
//!   client that sends nothing, only a request line, or nothing more after a response is closed
//!   then (slowloris).
//! - **Unauthenticated connections.** Every accepted connection takes a place in a fixed pool
//!   (`ATLAS_MAX_PENDING_CONNECTIONS`) and keeps it until it authenticates for a voice session or
//!   closes. When every place is taken, a new connection takes the place of the *oldest* one,
//!   which is closed: an attacker holding thousands of idle sockets cannot lock out a client
//!   that finishes its request promptly (to push it out, the attacker would have to open more
//!   connections than the pool holds within the time that client takes to send its request),
//!   and the server's descriptors stay bounded either way.
//!   Established sessions have given their place back, so idle sockets cannot disturb them.
//! - **Partial WebSocket messages.** After the upgrade, [`EdgeIo`] follows the client's frame
//!   headers (it never buffers payload): a frame or a fragmented message that has started must
//!   be complete within `ATLAS_WS_MESSAGE_TIMEOUT_S`, or the connection ends. Control frames
//!   interleaved in a fragmented message do not extend the deadline.
//!
//! The frame tracking starts when the voice handler accepts the upgrade. RFC 6455 forbids a
//! client to send frames before the server's 101 response; one that does so anyway can skew
//! the tracking, and is then bounded only by the message size limit and the session's idle
//! timeout — and it has authenticated to get that far.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics;

/// Limits applied at the edge, before any request handler runs.
#[derive(Clone, Copy, Debug)]
pub struct EdgeLimits {
    /// A request head must arrive within this, counted from when the connection is idle.
    pub header_timeout: Duration,
    /// Connections that have not authenticated for a session, at most.
    pub max_pending: usize,
    /// A started WebSocket frame or fragmented message must be complete within this.
    pub message_timeout: Duration,
}

impl EdgeLimits {
    /// The limits from the configuration.
    pub fn from_config(config: &crate::Config) -> EdgeLimits {
        EdgeLimits {
            header_timeout: Duration::from_secs(config.http_header_timeout_s),
            max_pending: config.max_pending_connections,
            message_timeout: Duration::from_secs(config.ws_message_timeout_s),
        }
    }
}

/// The largest WebSocket message (and frame) a client may send: the larger of the audio chunk
/// cap and the text message cap, plus one text message's worth of margin so that a slightly
/// oversized frame is answered with the protocol's non-fatal error rather than a closed
/// connection.
pub fn max_ws_message(config: &crate::Config) -> usize {
    config
        .audio_chunk_max_bytes
        .max(atlas_protocol::MAX_TEXT_FRAME_BYTES)
        + atlas_protocol::MAX_TEXT_FRAME_BYTES
}

/// The places of the connections that have not authenticated, oldest first.
struct PendingPool {
    max: usize,
    places: Mutex<Places>,
}

#[derive(Default)]
struct Places {
    next: u64,
    /// Place number → the signal that closes its connection.
    held: BTreeMap<u64, CancellationToken>,
}

impl PendingPool {
    fn new(max: usize) -> Arc<PendingPool> {
        Arc::new(PendingPool {
            max: max.max(1),
            places: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Places> {
        self.places.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place for a new connection; when all are taken, the oldest holder is told to close.
    fn admit(self: &Arc<Self>) -> Place {
        let mut places = self.lock();
        if places.held.len() >= self.max
            && let Some((_, oldest)) = places.held.pop_first()
        {
            oldest.cancel();
            metrics::edge_closed("pending_evicted");
        }
        let id = places.next;
        places.next += 1;
        let evicted = CancellationToken::new();
        places.held.insert(id, evicted.clone());
        Place {
            pool: self.clone(),
            id,
            evicted,
        }
    }
}

/// A connection's place in the [`PendingPool`], given back when dropped.
struct Place {
    pool: Arc<PendingPool>,
    id: u64,
    /// Cancelled when a newer connection took this place.
    evicted: CancellationToken,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.pool.lock().held.remove(&self.id);
    }
}

/// One accepted connection, found in the extensions of each of its requests.
#[derive(Clone)]
pub struct Conn(Arc<ConnShared>);

struct ConnShared {
    /// The connection's place among the unauthenticated ones, until it authenticates.
    pending: Mutex<Option<Place>>,
    /// Set when the voice handler accepts the WebSocket upgrade.
    websocket: AtomicBool,
}

impl Conn {
    fn new(place: Place) -> Conn {
        Conn(Arc::new(ConnShared {
            pending: Mutex::new(Some(place)),
            websocket: AtomicBool::new(false),
        }))
    }

    /// The client authenticated and is upgrading to a session: the connection leaves the
    /// unauthenticated pool, and its WebSocket frames are tracked from now on.
    pub fn upgrading(&self) {
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.0.websocket.store(true, Ordering::Release);
    }

    /// Whether the connection still holds a place among the unauthenticated ones.
    pub fn is_pending(&self) -> bool {
        self.0
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then stops accepting and waits
/// for the connections still doing HTTP (upgraded WebSocket connections are the sessions',
/// which the caller drains).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: EdgeLimits,
) -> io::Result<()> {
    let pending = PendingPool::new(limits.max_pending);
    let connections = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: give the system a moment.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let place = pending.admit();
        let evicted = place.evicted.clone();
        // Small frames (audio chunks, events) must not wait for Nagle's algorithm.
        let _ = tcp.set_nodelay(true);
        let conn = Conn::new(place);
        let io = TokioIo::new(EdgeIo::new(tcp, conn.clone(), limits.message_timeout));
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            req.extensions_mut().insert(conn.clone());
            router.clone().oneshot(req)
        });
        let connection = http.serve_connection(io, service).with_upgrades();
        let stop = shutdown.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                // A newer connection needed the place: close without a response.
                _ = evicted.cancelled() => return,
                _ = stop.cancelled() => {
                    // Finish the request in progress, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics::edge_closed("header_timeout");
                }
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The TCP stream of one connection, following WebSocket frame boundaries once upgraded.
pub struct EdgeIo {
    tcp: TcpStream,
    conn: Conn,
    frames: FrameTracker,
    message_timeout: Duration,
    /// Fires when the message in progress is late; allocated on the first one.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl EdgeIo {
    fn new(tcp: TcpStream, conn: Conn, message_timeout: Duration) -> EdgeIo {
        EdgeIo {
            tcp,
            conn,
            frames: FrameTracker::default(),
            message_timeout,
            deadline: None,
        }
    }

    fn tracking(&self) -> bool {
        self.conn.0.websocket.load(Ordering::Acquire)
    }
}

impl AsyncRead for EdgeIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.tracking() {
            return Pin::new(&mut this.tcp).poll_read(cx, buf);
        }
        if this.frames.in_progress()
            && let Some(deadline) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            metrics::edge_closed("message_timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "WebSocket message not completed in time",
            )));
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.tcp).poll_read(cx, buf))?;
        let was = this.frames.in_progress();
        this.frames.feed(&buf.filled()[before..]);
        let restarted = this.frames.take_restarted();
        if this.frames.in_progress() && (!was || restarted) {
            let at = Instant::now() + this.message_timeout;
            match this.deadline.as_mut() {
                Some(d) => d.as_mut().reset(at),
                None => this.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for EdgeIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// Follows the frame structure of a client's WebSocket stream (RFC 6455, section 5.2) from
/// the headers alone, to tell whether a frame or a fragmented message is incomplete.
#[derive(Debug, Default)]
pub struct FrameTracker {
    /// Header bytes of the frame being read (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// A data message was started without FIN and is not finished yet.
    fragmented: bool,
    /// Set when a new message started while the previous one just ended in the same read.
    restarted: bool,
}

impl FrameTracker {
    /// Whether a frame or a fragmented data message has started and is not complete.
    pub fn in_progress(&self) -> bool {
        self.header_len > 0 || self.payload_left > 0 || self.fragmented
    }

    /// Whether, in the bytes fed last, a message completed and another one began (the
    /// deadline then starts again); clears the flag.
    pub fn take_restarted(&mut self) -> bool {
        std::mem::take(&mut self.restarted)
    }

    /// Takes the next bytes the client sent.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = (bytes.len() as u64).min(self.payload_left);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            if self.header_len == 0 && !self.fragmented {
                // A new message begins here.
                self.restarted = true;
            }
            self.header[self.header_len] = bytes[0];
            self.header_len += 1;
            bytes = &bytes[1..];
            if let Some(total) = self.header_size()
                && self.header_len == total
            {
                self.end_header();
            }
        }
        if !self.in_progress() {
            self.restarted = false;
        }
    }

    /// The full header length, once its first two bytes are known.
    fn header_size(&self) -> Option<usize> {
        if self.header_len < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let length = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        Some(2 + length + if masked { 4 } else { 0 })
    }

    fn end_header(&mut self) {
        let fin = self.header[0] & 0x80 != 0;
        let opcode = self.header[0] & 0x0f;
        self.payload_left = match self.header[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => u64::from_be_bytes(self.header[2..10].try_into().unwrap_or_default()),
            n => u64::from(n),
        };
        self.header_len = 0;
        // Control frames (0x8..=0xf) are never fragmented and do not affect a data message.
        if opcode < 0x8 {
            self.fragmented = !fin;
        }
    }
}

/// A masked client frame.
#[cfg(test)]
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
    out.extend_from_slice(&[1, 2, 3, 4]);
    out.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frames_leave_nothing_in_progress() {
        let mut t = FrameTracker::default();
        for payload in [&b"hi"[..], &[0u8; 300][..], &vec![7u8; 70_000][..]] {
            t.feed(&frame(true, 2, payload));
            assert!(!t.in_progress(), "{} bytes", payload.len());
        }
    }

    #[test]
    fn a_frame_split_anywhere_is_in_progress_until_its_last_byte() {
        let bytes = frame(true, 2, &[9u8; 200]);
        for split in 1..bytes.len() {
            let mut t = FrameTracker::default();
            t.feed(&bytes[..split]);
            assert!(t.in_progress(), "split at {split}");
            t.feed(&bytes[split..]);
            assert!(!t.in_progress(), "split at {split}");
        }
    }

    #[test]
    fn a_fragmented_message_is_in_progress_until_its_final_fragment() {
        let mut t = FrameTracker::default();
        t.feed(&frame(false, 1, b"{\"type\":"));
        assert!(t.in_progress());
        // A ping in between neither ends nor restarts the message.
        t.feed(&frame(true, 0x9, b"p"));
        assert!(t.in_progress());
        t.feed(&frame(false, 0, b"\"ping\""));
        assert!(t.in_progress());
        t.feed(&frame(true, 0, b"}"));
        assert!(!t.in_progress());
    }

    #[test]
    fn a_message_starting_right_after_another_restarts_the_clock() {
        let mut t = FrameTracker::default();
        let mut bytes = frame(true, 2, &[1u8; 10]);
        let next = frame(true, 2, &[2u8; 10]);
        bytes.extend_from_slice(&next[..5]);
        t.feed(&bytes);
        assert!(t.in_progress());
        assert!(t.take_restarted());
        t.feed(&next[5..]);
        assert!(!t.in_progress());
        assert!(!t.take_restarted());
    }

    #[test]
    fn continuing_a_message_does_not_restart_the_clock() {
        let mut t = FrameTracker::default();
        t.feed(&frame(false, 2, &[1u8; 10]));
        assert!(t.take_restarted());
        t.feed(&frame(false, 0, &[1u8; 10]));
        assert!(!t.take_restarted(), "a continuation is the same message");
    }
}
