//! A resilient voice session: connects, starts (or resumes) the session, forwards audio,
//! delivers typed events, keeps the connection alive with pings, and on an unexpected close
//! reconnects with exponential backoff (1 s, 2 s, 4 s … at most 30 s, at most 5 attempts),
//! resuming the same server-side session with its resume token.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use atlas_protocol::{ClientMessage, ServerEvent, SessionStart, close};

use crate::{ClientError, ConnectOptions, Incoming, connect};

/// When and how often to reconnect.
#[derive(Clone, Copy, Debug)]
pub struct ReconnectPolicy {
    /// First delay.
    pub initial_delay: Duration,
    /// Longest delay.
    pub max_delay: Duration,
    /// Attempts before giving up.
    pub max_attempts: u32,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            max_attempts: 5,
        }
    }
}

impl ReconnectPolicy {
    /// The delay before attempt `n` (from 1): initial × 2^(n−1), capped.
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
        self.initial_delay
            .saturating_mul(factor)
            .min(self.max_delay)
    }
}

/// What the session reports.
#[derive(Debug, Clone)]
pub enum VoiceEvent {
    /// A server event (including `session.started` / `session.resumed`).
    Server(ServerEvent),
    /// Reply audio.
    Audio(Bytes),
    /// The connection dropped; reconnecting after `delay`.
    Reconnecting {
        /// Attempt number, from 1.
        attempt: u32,
        /// Wait before it.
        delay: Duration,
    },
    /// The session ended: the server closed it deliberately or the client ended it.
    Ended {
        /// Close code.
        code: Option<u16>,
        /// Reason.
        reason: String,
    },
    /// Reconnecting failed; the session is lost.
    GaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        error: String,
    },
}

enum Command {
    Audio(Bytes),
    Message(ClientMessage),
}

/// Handle to a running voice session.
pub struct VoiceSession {
    commands: mpsc::Sender<Command>,
    /// Events, ending after `Ended` or `GaveUp`.
    pub events: mpsc::Receiver<VoiceEvent>,
}

/// Close codes after which reconnecting is pointless (the server ended the session, or the
/// client must act first).
fn terminal(code: Option<u16>) -> bool {
    matches!(
        code,
        Some(
            close::NORMAL
                | close::POLICY
                | close::TOKEN_EXPIRED
                | close::BUDGET_EXHAUSTED
                | close::IDLE_TIMEOUT
                | close::REPLACED
                | close::MAX_DURATION
        )
    )
}

impl VoiceSession {
    /// Connects and starts a session with `start`; reconnects per `policy`. `heartbeat` is
    /// the interval of protocol pings (a missing pong after two intervals counts as a drop).
    pub async fn start(
        options: ConnectOptions,
        start: SessionStart,
        policy: ReconnectPolicy,
        heartbeat: Duration,
    ) -> Result<VoiceSession, ClientError> {
        let conn = connect(&options).await?;
        conn.sender
            .send(&ClientMessage::SessionStart(start.clone()))
            .await?;
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let (ev_tx, ev_rx) = mpsc::channel(1024);
        tokio::spawn(run(options, start, policy, heartbeat, conn, cmd_rx, ev_tx));
        Ok(VoiceSession {
            commands: cmd_tx,
            events: ev_rx,
        })
    }

    /// Sends audio (dropped while reconnecting: live audio cannot wait).
    pub async fn audio(&self, pcm: Bytes) -> Result<(), ClientError> {
        self.commands
            .send(Command::Audio(pcm))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Sends a protocol message.
    pub async fn send(&self, msg: ClientMessage) -> Result<(), ClientError> {
        self.commands
            .send(Command::Message(msg))
            .await
            .map_err(|_| ClientError::Closed)
    }

    /// Answers a `tool.call`: the tool's result, or why it failed.
    pub async fn tool_result(
        &self,
        call_id: impl Into<String>,
        result: Result<serde_json::Value, String>,
    ) -> Result<(), ClientError> {
        self.send(tool_result(call_id.into(), result)).await
    }
}

/// The `tool.result` message answering `call_id`.
pub fn tool_result(call_id: String, result: Result<serde_json::Value, String>) -> ClientMessage {
    let (result, error) = match result {
        Ok(value) => (Some(value), None),
        Err(message) => (None, Some(message)),
    };
    ClientMessage::ToolResult {
        call_id,
        result,
        error,
    }
}

/// Scripted answers to client tools, by tool name (for tests and the `call` command): the
/// file holds a JSON object mapping each name to `{"result": <any JSON>}` or
/// `{"error": "<message>"}`.
#[derive(Clone, Debug, Default)]
pub struct ToolScript {
    answers: std::collections::HashMap<String, Result<serde_json::Value, String>>,
}

impl ToolScript {
    /// Parses the script.
    pub fn from_json(text: &str) -> Result<ToolScript, String> {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        let mut answers = std::collections::HashMap::new();
        for (name, entry) in map {
            let answer = match (entry.get("result"), entry.get("error")) {
                (Some(result), None) => Ok(result.clone()),
                (None, Some(serde_json::Value::String(e))) => Err(e.clone()),
                _ => {
                    return Err(format!(
                        "{name}: give exactly one of \"result\" (any JSON) or \"error\" (a string)"
                    ));
                }
            };
            answers.insert(name, answer);
        }
        Ok(ToolScript { answers })
    }

    /// The answer to a call of `name` (a tool without a script fails).
    pub fn answer(&self, name: &str) -> Result<serde_json::Value, String> {
        self.answers
            .get(name)
            .cloned()
            .unwrap_or_else(|| Err(format!("the client has no answer for {name}")))
    }
}

async fn run(
    mut options: ConnectOptions,
    start: SessionStart,
    policy: ReconnectPolicy,
    heartbeat: Duration,
    mut conn: crate::Connection,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<VoiceEvent>,
) {
    let mut resume_token: Option<String> = None;
    let mut ping = tokio::time::interval(heartbeat);
    ping.reset();
    let mut last_pong = Instant::now();
    let mut ended_by_client = false;
    loop {
        // Pump one connection until it ends.
        let drop_reason = loop {
            tokio::select! {
                item = conn.incoming.recv() => match item {
                    Some(Incoming::Event { event, .. }) => {
                        match &event {
                            ServerEvent::SessionStarted { resume_token: t, .. }
                            | ServerEvent::SessionResumed { resume_token: t, .. } => resume_token = Some(t.clone()),
                            ServerEvent::Pong { .. } => last_pong = Instant::now(),
                            _ => {}
                        }
                        if events.send(VoiceEvent::Server(event)).await.is_err() {
                            conn.sender.close().await;
                            return;
                        }
                    }
                    Some(Incoming::Audio { pcm, .. }) => {
                        if events.send(VoiceEvent::Audio(pcm)).await.is_err() {
                            conn.sender.close().await;
                            return;
                        }
                    }
                    Some(Incoming::Closed { code, reason, .. }) => {
                        if ended_by_client || terminal(code) {
                            let _ = events.send(VoiceEvent::Ended { code, reason }).await;
                            return;
                        }
                        break reason;
                    }
                    None => break "connection ended".to_owned(),
                },
                cmd = commands.recv() => match cmd {
                    Some(Command::Audio(pcm)) => { let _ = conn.sender.audio(pcm).await; }
                    Some(Command::Message(msg)) => {
                        ended_by_client |= matches!(msg, ClientMessage::SessionEnd);
                        let _ = conn.sender.send(&msg).await;
                    }
                    None => {
                        let _ = conn.sender.send(&ClientMessage::SessionEnd).await;
                        return;
                    }
                },
                _ = ping.tick() => {
                    if last_pong.elapsed() > heartbeat * 2 + heartbeat / 2 {
                        conn.abort();
                        break "heartbeat: no pong".to_owned();
                    }
                    let _ = conn.sender.send(&ClientMessage::Ping { id: None }).await;
                }
            }
        };
        conn.abort();
        // Reconnect with backoff, resuming the session.
        let mut attempt = 0;
        let mut last_error = drop_reason;
        conn = loop {
            attempt += 1;
            if attempt > policy.max_attempts {
                let _ = events
                    .send(VoiceEvent::GaveUp {
                        attempts: policy.max_attempts,
                        error: last_error,
                    })
                    .await;
                return;
            }
            let delay = policy.delay(attempt);
            let _ = events
                .send(VoiceEvent::Reconnecting { attempt, delay })
                .await;
            tokio::time::sleep(delay).await;
            options.resume = resume_token.clone();
            match connect(&options).await {
                Ok(c) => {
                    if c.sender
                        .send(&ClientMessage::SessionStart(start.clone()))
                        .await
                        .is_ok()
                    {
                        break c;
                    }
                    last_error = "connection closed during the handshake".into();
                }
                // The session is gone (resume window passed, or another instance): no retry helps.
                Err(ClientError::Refused {
                    status: 404,
                    code,
                    message,
                }) => {
                    let _ = events
                        .send(VoiceEvent::GaveUp {
                            attempts: attempt,
                            error: format!("{code}: {message}"),
                        })
                        .await;
                    return;
                }
                Err(e) => last_error = e.to_string(),
            }
        };
        last_pong = Instant::now();
        ping.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_script_answers_by_name() {
        let script = ToolScript::from_json(
            r#"{"open_page": {"result": {"opened": true}}, "pay": {"error": "declined"}}"#,
        )
        .unwrap();
        assert_eq!(
            script.answer("open_page"),
            Ok(serde_json::json!({"opened": true}))
        );
        assert_eq!(script.answer("pay"), Err("declined".into()));
        assert!(script.answer("other").unwrap_err().contains("no answer"));
        assert!(ToolScript::from_json(r#"{"x": {}}"#).is_err());
        assert!(ToolScript::from_json("[]").is_err());
        assert_eq!(
            tool_result("c1".into(), Err("no".into())),
            ClientMessage::ToolResult {
                call_id: "c1".into(),
                result: None,
                error: Some("no".into())
            }
        );
    }

    #[test]
    fn backoff_schedule() {
        let p = ReconnectPolicy::default();
        let d: Vec<u64> = (1..=7).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 16, 30, 30]);
    }

    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

    /// Accepts the handshake selecting the protocol (the signature is tungstenite's).
    #[allow(clippy::result_large_err)]
    fn select_protocol(_req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
        resp.headers_mut()
            .insert("sec-websocket-protocol", "atlas-voice.v1".parse().unwrap());
        Ok(resp)
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_after_five_attempts_on_the_backoff_schedule() {
        // A server that accepts one connection, then vanishes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_hdr_async(tcp, select_protocol)
                .await
                .unwrap();
            use futures_util::StreamExt;
            let _ = ws.next().await; // session.start
            drop(ws); // drop without a close frame; the listener goes with this task
        });
        let options = ConnectOptions::new(format!("ws://{addr}/v1/voice"), "t");
        let mut session = VoiceSession::start(
            options,
            SessionStart::default(),
            ReconnectPolicy::default(),
            Duration::from_secs(3600),
        )
        .await
        .unwrap();
        server.await.unwrap();
        let began = Instant::now();
        let mut delays = Vec::new();
        let gave_up = loop {
            match session.events.recv().await.unwrap() {
                VoiceEvent::Reconnecting { attempt, delay } => {
                    delays.push((attempt, delay.as_secs(), began.elapsed().as_secs()))
                }
                VoiceEvent::GaveUp { attempts, error } => break (attempts, error),
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(gave_up.0, 5);
        assert!(!gave_up.1.is_empty(), "a clear error");
        let schedule: Vec<(u32, u64)> = delays.iter().map(|(a, d, _)| (*a, *d)).collect();
        assert_eq!(schedule, vec![(1, 1), (2, 2), (3, 4), (4, 8), (5, 16)]);
        // Virtual time: the attempts happened 0, 1, 3, 7, 15 s in, and the give-up at 31 s.
        let at: Vec<u64> = delays.iter().map(|(_, _, t)| *t).collect();
        assert_eq!(at, vec![0, 1, 3, 7, 15]);
        assert_eq!(began.elapsed().as_secs(), 31);
    }
}
