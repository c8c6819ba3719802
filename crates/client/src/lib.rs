//! Client library for the atlas-voice protocol.
//!
//! # Layout
//! - [`connect`] opens a connection: a clonable [`Sender`] for messages and audio, and a
//!   stream of timestamped [`Incoming`] items (events, reply audio, the close).
//! - [`stream_pcm`] sends 16-bit PCM in fixed-size chunks at real-time pace, as a microphone
//!   would.
//! - [`voice`]: [`voice::VoiceSession`], the resilient session: typed events, heartbeat,
//!   reconnection with exponential backoff and resume.
//! - [`wav`] reads and writes WAV files.

pub mod voice;
pub mod wav;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use atlas_protocol::{
    BEARER_SUBPROTOCOL_PREFIX, ClientMessage, HttpErrorBody, SUBPROTOCOL, ServerEvent,
    parse_server_event,
};

/// How the access token travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCarrier {
    /// `Authorization: Bearer` header.
    Header,
    /// `bearer.<jwt>` subprotocol entry (what browsers use).
    Subprotocol,
    /// `access_token` query parameter.
    Query,
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `ws://host:port/v1/voice`.
    pub url: String,
    /// Access token.
    pub token: String,
    /// How to present the token.
    pub carrier: TokenCarrier,
    /// Resume token of a dropped session.
    pub resume: Option<String>,
    /// Handshake deadline.
    pub timeout: Duration,
}

impl ConnectOptions {
    /// Options with the header carrier and a 10 s deadline.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ConnectOptions {
            url: url.into(),
            token: token.into(),
            carrier: TokenCarrier::Header,
            resume: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the upgrade.
    #[error("refused with HTTP {status}: {code} ({message})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: String,
        /// Message from the body.
        message: String,
    },
    /// Network or protocol failure.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The handshake took too long.
    #[error("connection timed out")]
    Timeout,
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
}

/// Something the server sent, with its arrival time.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A JSON event.
    Event {
        /// The event.
        event: ServerEvent,
        /// Arrival time.
        at: Instant,
    },
    /// Reply audio.
    Audio {
        /// PCM bytes at the session's output rate.
        pcm: Bytes,
        /// Arrival time.
        at: Instant,
    },
    /// The connection ended.
    Closed {
        /// Close code, if the server sent a close frame.
        code: Option<u16>,
        /// Close reason.
        reason: String,
        /// Arrival time.
        at: Instant,
    },
}

/// Sends to the server; clones share the connection.
#[derive(Clone, Debug)]
pub struct Sender {
    tx: mpsc::Sender<Message>,
}

impl Sender {
    /// Sends a protocol message.
    pub async fn send(&self, msg: &ClientMessage) -> Result<(), ClientError> {
        let text = serde_json::to_string(msg).map_err(|e| ClientError::Connect(e.to_string()))?;
        self.send_raw(Message::text(text)).await
    }

    /// Sends a binary audio frame.
    pub async fn audio(&self, pcm: Bytes) -> Result<(), ClientError> {
        self.send_raw(Message::Binary(pcm)).await
    }

    /// Sends any frame (tests use it for malformed input).
    pub async fn send_raw(&self, msg: Message) -> Result<(), ClientError> {
        self.tx.send(msg).await.map_err(|_| ClientError::Closed)
    }

    /// Closes the connection with a normal close frame.
    pub async fn close(&self) {
        let _ = self
            .tx
            .send(Message::Close(Some(CloseFrame {
                code: 1000.into(),
                reason: "bye".into(),
            })))
            .await;
    }
}

/// An open connection.
#[derive(Debug)]
pub struct Connection {
    /// Outgoing half.
    pub sender: Sender,
    /// Incoming items, ending after [`Incoming::Closed`].
    pub incoming: mpsc::Receiver<Incoming>,
    /// The subprotocol the server selected.
    pub protocol: Option<String>,
    /// The reader and writer tasks; aborting both drops the socket without a close frame.
    tasks: [tokio::task::AbortHandle; 2],
}

impl Connection {
    /// Drops the connection abruptly, as a lost network would: no close frame.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The WebSocket of an open connection, for callers that drive it themselves.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

/// Opens a connection.
pub async fn connect(options: &ConnectOptions) -> Result<Connection, ClientError> {
    let (socket, protocol) = open_socket(options).await?;
    Ok(spawn_connection(socket, protocol))
}

/// Opens the WebSocket (authenticated as `options` says) without starting the reader and
/// writer tasks of [`connect`]: the caller reads and writes it directly, one task per
/// connection (the load generator does, to keep its own cost per frame small). Returns the
/// socket and the subprotocol the server selected.
pub async fn open_socket(
    options: &ConnectOptions,
) -> Result<(Socket, Option<String>), ClientError> {
    let mut url = url::Url::parse(&options.url).map_err(|e| ClientError::Connect(e.to_string()))?;
    {
        let mut q = url.query_pairs_mut();
        if let Some(resume) = &options.resume {
            q.append_pair("resume", resume);
        }
        if options.carrier == TokenCarrier::Query {
            q.append_pair("access_token", &options.token);
        }
    }
    if url.query() == Some("") {
        url.set_query(None);
    }
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let mut protocols = SUBPROTOCOL.to_owned();
    match options.carrier {
        TokenCarrier::Header => {
            let v = format!("Bearer {}", options.token)
                .parse()
                .map_err(|_| ClientError::Connect("token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", v);
        }
        TokenCarrier::Subprotocol => {
            protocols.push_str(", ");
            protocols.push_str(BEARER_SUBPROTOCOL_PREFIX);
            protocols.push_str(&options.token);
        }
        TokenCarrier::Query => {}
    }
    request.headers_mut().insert(
        "sec-websocket-protocol",
        protocols
            .parse()
            .map_err(|_| ClientError::Connect("token is not a valid subprotocol".into()))?,
    );
    // The server's frames are small (events, 20–100 ms of audio): a 16 KiB read buffer
    // (tungstenite zero-fills the free part of it on every read, so the 128 KiB default
    // costs a large memset per frame), and each message written as soon as it is sent.
    let ws_config = tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0);
    let connecting = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
    let (socket, response) = match tokio::time::timeout(options.timeout, connecting).await {
        Err(_) => return Err(ClientError::Timeout),
        Ok(Err(tungstenite::Error::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice::<HttpErrorBody>(b).ok());
            let (code, message) = match body {
                Some(b) => (b.error.code.as_str().to_owned(), b.error.message),
                None => ("unknown".into(), String::new()),
            };
            return Err(ClientError::Refused {
                status,
                code,
                message,
            });
        }
        Ok(Err(e)) => return Err(ClientError::Connect(e.to_string())),
        Ok(Ok(pair)) => pair,
    };
    let protocol = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((socket, protocol))
}

fn spawn_connection(socket: Socket, protocol: Option<String>) -> Connection {
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(64);
    let (in_tx, in_rx) = mpsc::channel::<Incoming>(1024);
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            let closing = matches!(msg, Message::Close(_));
            if sink.send(msg).await.is_err() || closing {
                break;
            }
        }
    });
    let reader = tokio::spawn(async move {
        loop {
            let item = match stream.next().await {
                Some(Ok(Message::Text(text))) => match parse_server_event(text.as_str()) {
                    Ok(event) => Incoming::Event {
                        event,
                        at: Instant::now(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "unparseable server event");
                        continue;
                    }
                },
                Some(Ok(Message::Binary(pcm))) => Incoming::Audio {
                    pcm,
                    at: Instant::now(),
                },
                Some(Ok(Message::Close(frame))) => Incoming::Closed {
                    code: frame.as_ref().map(|f| u16::from(f.code)),
                    reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    at: Instant::now(),
                },
                Some(Ok(_)) => continue,
                Some(Err(e)) => Incoming::Closed {
                    code: None,
                    reason: e.to_string(),
                    at: Instant::now(),
                },
                None => Incoming::Closed {
                    code: None,
                    reason: "connection ended".into(),
                    at: Instant::now(),
                },
            };
            let end = matches!(item, Incoming::Closed { .. });
            if in_tx.send(item).await.is_err() || end {
                break;
            }
        }
    });
    Connection {
        sender: Sender { tx: out_tx },
        incoming: in_rx,
        protocol,
        tasks: [writer.abort_handle(), reader.abort_handle()],
    }
}

/// Sends `samples` (16-bit mono at `rate`) in chunks of `chunk_ms`, each one when its last
/// sample would have been captured live (`pace` > 1 goes faster than real time). Returns
/// the instant the stream started.
pub async fn stream_pcm(
    sender: &Sender,
    samples: &[i16],
    rate: u32,
    chunk_ms: u32,
    pace: f64,
) -> Result<Instant, ClientError> {
    let per_chunk = (rate * chunk_ms / 1000).max(1) as usize;
    let start = Instant::now();
    let mut sent = 0usize;
    for chunk in samples.chunks(per_chunk) {
        sent += chunk.len();
        let due = start + Duration::from_secs_f64(sent as f64 / f64::from(rate) / pace.max(0.01));
        tokio::time::sleep_until(due).await;
        let mut bytes = Vec::with_capacity(chunk.len() * 2);
        for s in chunk {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        if bytes.len() < 100 {
            bytes.resize(100, 0); // pad a short last chunk to the server's minimum frame
        }
        sender.audio(Bytes::from(bytes)).await?;
    }
    Ok(start)
}

/// Where speech ends in `samples`: the end of the last 10 ms frame above `threshold_dbfs`.
pub fn speech_end(samples: &[i16], rate: u32, threshold_dbfs: f32) -> Option<Duration> {
    let (frame, mut voiced) = voiced_frames(samples, rate, threshold_dbfs);
    let last = voiced.next_back()?;
    Some(atlas_core::audio::samples_to_duration(
        ((last + 1) * frame).min(samples.len()) as u64,
        rate,
    ))
}

/// Where speech starts in `samples`: the start of the first 10 ms frame above
/// `threshold_dbfs`.
pub fn speech_start(samples: &[i16], rate: u32, threshold_dbfs: f32) -> Option<Duration> {
    let (frame, mut voiced) = voiced_frames(samples, rate, threshold_dbfs);
    let first = voiced.next()?;
    Some(atlas_core::audio::samples_to_duration(
        (first * frame) as u64,
        rate,
    ))
}

/// The length of a 10 ms frame at `rate`, and the indices of the frames above
/// `threshold_dbfs`.
fn voiced_frames(
    samples: &[i16],
    rate: u32,
    threshold_dbfs: f32,
) -> (usize, impl DoubleEndedIterator<Item = usize>) {
    let frame = (rate / 100).max(1) as usize;
    let voiced = samples
        .chunks(frame)
        .enumerate()
        .filter(move |(_, c)| atlas_core::audio::rms_dbfs(c) > threshold_dbfs)
        .map(|(i, _)| i);
    (frame, voiced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speech_starts_and_ends_with_the_loud_frames() {
        // 100 ms of silence, 200 ms of a loud square wave, 55 ms of silence, at 16 kHz.
        let mut samples = vec![0i16; 1_600];
        samples.extend((0..3_200).map(|i| if i % 40 < 20 { 8_000 } else { -8_000 }));
        samples.extend(vec![0i16; 880]);
        let ms = Duration::from_millis;
        assert_eq!(speech_start(&samples, 16_000, -40.0), Some(ms(100)));
        assert_eq!(speech_end(&samples, 16_000, -40.0), Some(ms(300)));
        let silence = vec![0i16; 1_600];
        assert_eq!(speech_start(&silence, 16_000, -40.0), None);
        assert_eq!(speech_end(&silence, 16_000, -40.0), None);
    }
}
