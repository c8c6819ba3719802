//! The transports a session can be reached by. Each one owns its wire: how a client connects
//! and starts ([`Start`]), how its frames are parsed ([`FromClient`]), and how the session's
//! [`Event`]s and audio are rendered. The session driver in between speaks neither: it holds
//! a [`Link`] and calls its reader and writer.
//!
//! - [`v1`]: the project's own WebSocket protocol (docs/protocol.md).
//! - [`twilio`]: phone calls through Twilio Media Streams (docs/telephony.md).
//! - [`writer`]: the single writer task every connection's frames go through.

pub mod twilio;
pub mod v1;
pub mod writer;

use axum::extract::ws::WebSocket;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::task::JoinHandle;

use atlas_core::session::{Closing, EndReason, Event, Opaque};
use atlas_core::vocab::{AudioFormat, ErrorCode};
use atlas_protocol::{ClientInfo, close};

use writer::{OutboundTx, SendError, WriterExit};

/// Which transport a connection came by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Protocol v1 over WebSocket.
    WebSocket,
    /// A phone call through Twilio Media Streams.
    Twilio,
}

impl Kind {
    /// The name recorded with the session.
    pub fn label(self) -> &'static str {
        match self {
            Kind::WebSocket => "websocket",
            Kind::Twilio => "twilio",
        }
    }
}

/// A phone call behind a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Call {
    /// The provider's id of the call.
    pub call_sid: String,
    /// The caller's number (recorded masked unless the operator enables it).
    pub caller: String,
}

/// What a connection asked for when it started, in the session's terms.
#[derive(Clone, Debug)]
pub struct Start {
    /// Which transport.
    pub kind: Kind,
    /// Audio the client sends (16-bit PCM once the transport decoded it).
    pub input: AudioFormat,
    /// Audio the client wants.
    pub output: AudioFormat,
    /// Voice for the replies.
    pub voice: Option<String>,
    /// Language of the speech.
    pub language: Option<String>,
    /// The application's conversation id.
    pub conversation_id: Option<String>,
    /// The client application.
    pub client: Option<ClientInfo>,
    /// The client's W3C trace context, checked: the session's trace continues it.
    pub traceparent: Option<String>,
    /// The phone call, for a call.
    pub call: Option<Call>,
}

/// What the client sent, in the session's terms.
#[derive(Debug)]
pub enum FromClient {
    /// Microphone audio: 16-bit little-endian PCM at the input rate.
    Audio(Bytes),
    /// Push-to-talk released.
    Commit,
    /// Stop the reply.
    Cancel,
    /// A typed turn.
    Text(String),
    /// An application-level ping, with its id.
    Ping(Option<Opaque>),
    /// A second start on a started session.
    StartAgain,
    /// The client ends the session.
    End,
    /// A client tool's answer.
    ToolResult {
        /// The call.
        call_id: String,
        /// Its result, or its error.
        result: Result<String, String>,
    },
    /// A new access token.
    Refresh(String),
    /// A frame that breaks the transport's rules.
    Invalid(ErrorCode, String),
    /// The answer to a transport-level ping.
    Pong,
    /// A key pressed on a phone.
    Digit(char),
    /// The listener's side confirms it played the reply to `turn_id` up to `offset` bytes.
    Played {
        /// The turn.
        turn_id: u64,
        /// Bytes of its PCM at the output rate.
        offset: u64,
    },
    /// Nothing for the session (a control frame the transport handled).
    Nothing,
    /// The connection is gone, and why.
    Closed(&'static str),
}

/// The reading half of a connection.
pub enum Reader {
    /// Protocol v1.
    V1(SplitStream<WebSocket>),
    /// A Twilio media stream.
    Twilio(twilio::stream::StreamReader),
}

impl Reader {
    /// The next thing the client sent.
    pub async fn next(&mut self) -> FromClient {
        match self {
            Reader::V1(stream) => match stream.next().await {
                Some(Ok(message)) => v1::inbound::parse(message),
                _ => FromClient::Closed("connection closed"),
            },
            Reader::Twilio(reader) => reader.next().await,
        }
    }
}

/// How the session's output is rendered on a connection's wire.
#[derive(Debug)]
pub enum Wire {
    /// Protocol v1.
    V1,
    /// A Twilio media stream.
    Twilio(twilio::stream::Renderer),
}

/// The writing half of a connection: renders on its wire and queues for the writer task.
#[derive(Debug)]
pub struct Writer {
    tx: OutboundTx,
    wire: Wire,
}

impl Writer {
    /// A writer rendering on `wire` into `tx`.
    pub fn new(tx: OutboundTx, wire: Wire) -> Self {
        Writer { tx, wire }
    }

    /// Tells the client `event` (a transport may have nothing to say for some).
    pub fn event(&mut self, event: Event) -> Result<(), SendError> {
        match &mut self.wire {
            Wire::V1 => self.tx.frame(v1::render_event(event)),
            Wire::Twilio(r) => match r.event(&event) {
                Some(frame) => self.tx.frame(frame),
                None => Ok(()),
            },
        }
    }

    /// Sends a piece of reply audio of `turn_id` (16-bit PCM at `rate`).
    pub fn audio(&mut self, turn_id: u64, pcm: Bytes, rate: u32) -> Result<(), SendError> {
        match &mut self.wire {
            Wire::V1 => v1::send_audio(&self.tx, pcm, rate),
            Wire::Twilio(r) => r.audio(&self.tx, turn_id, &pcm),
        }
    }

    /// A transport-level ping (heartbeat).
    pub fn ping(&self) -> Result<(), SendError> {
        if let Wire::Twilio(r) = &self.wire {
            r.pinged();
        }
        self.tx.ping()
    }

    /// The queue to the writer task.
    pub fn queue(&self) -> &OutboundTx {
        &self.tx
    }

    /// Closes the connection for `closing` (after what is queued).
    pub async fn close(&self, closing: Closing) {
        let (code, reason) = close_frame(closing);
        self.tx.close(code, reason).await;
    }
}

/// The WebSocket close code and reason for `closing`. Both transports are WebSockets; a
/// Twilio media stream ends the call whatever the code.
pub fn close_frame(closing: Closing) -> (u16, &'static str) {
    match closing {
        Closing::Ended(reason) => match reason {
            EndReason::ClientEnded => (close::NORMAL, "session ended"),
            EndReason::Draining => (close::GOING_AWAY, "server draining"),
            EndReason::Policy | EndReason::StartTimeout => (close::POLICY, "policy violation"),
            EndReason::ProviderFailed => (close::INTERNAL, "provider unavailable"),
            EndReason::IdleTimeout => (close::IDLE_TIMEOUT, "idle timeout"),
            EndReason::MaxDuration => (close::MAX_DURATION, "maximum duration reached"),
            EndReason::BudgetExhausted => (close::BUDGET_EXHAUSTED, "budget exhausted"),
            EndReason::TokenExpired => (close::TOKEN_EXPIRED, "token expired"),
            EndReason::Moved => (close::REPLACED, "session continued elsewhere"),
            EndReason::LeaseLost => (close::INTERNAL, "session lost its place"),
            EndReason::ResumeExpired | EndReason::Disconnected => (close::NORMAL, "session ended"),
        },
        Closing::HeartbeatTimeout => (close::GOING_AWAY, "heartbeat timeout"),
        Closing::Replaced => (close::REPLACED, "replaced by a resumed connection"),
        Closing::ResumeOvertaken => (close::REPLACED, "resume refused"),
    }
}

/// A connection a session is attached to.
pub struct Link {
    /// What the client sends.
    pub reader: Reader,
    /// What the session sends.
    pub writer: Writer,
    /// The task writing the frames.
    pub task: JoinHandle<WriterExit>,
}

impl Link {
    /// The connection, its handshake done, joins its session.
    pub async fn join(
        self,
        state: crate::state::AppState,
        start: Start,
        identity: crate::auth::Identity,
        upgrade: crate::session::Upgrade,
    ) {
        let conn = crate::session::Connection {
            link: self,
            start,
            identity,
            claim: None,
        };
        crate::session::serve(state, conn, upgrade).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ending_has_its_documented_close_code() {
        let code = |c| close_frame(c).0;
        assert_eq!(code(Closing::Ended(EndReason::IdleTimeout)), 4408);
        assert_eq!(code(Closing::Ended(EndReason::BudgetExhausted)), 4402);
        assert_eq!(code(Closing::Ended(EndReason::Policy)), 1008);
        assert_eq!(code(Closing::Ended(EndReason::StartTimeout)), 1008);
        assert_eq!(code(Closing::Ended(EndReason::Moved)), 4409);
        assert_eq!(code(Closing::Ended(EndReason::Draining)), 1001);
        assert_eq!(code(Closing::Ended(EndReason::MaxDuration)), 4410);
        assert_eq!(code(Closing::Ended(EndReason::TokenExpired)), 4401);
        assert_eq!(code(Closing::Ended(EndReason::ProviderFailed)), 1011);
        assert_eq!(code(Closing::Ended(EndReason::ClientEnded)), 1000);
        assert_eq!(code(Closing::HeartbeatTimeout), 1001);
        assert_eq!(code(Closing::Replaced), 4409);
        assert_eq!(code(Closing::ResumeOvertaken), 4409);
    }
}
