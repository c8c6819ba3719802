//! What the session tells the person's side, in the session's own terms. Each transport
//! renders an [`Event`] on its wire (protocol v1 as JSON events, a phone call as `clear` and
//! silence) or not at all; the machine never builds a wire message.
//!
//! The payloads still borrow some of protocol v1's plain types (limits, formats, error codes)
//! until the machine has its own for each.

use crate::vocab::{AudioFormat, ErrorCode, Limits};

use super::ledger::Usage;
use crate::latency::Latency;

/// Something for the attached client.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The session is ready on this connection (new, or resumed after `resumed_turns` turns).
    Ready {
        /// Session id.
        session_id: String,
        /// The token that resumes the session after a dropped connection.
        resume_token: String,
        /// Turns completed before this connection, when it resumed the session.
        resumed_turns: Option<u64>,
        /// Limits in force.
        limits: Limits,
        /// Input audio format.
        input_audio: AudioFormat,
        /// Output audio format.
        output_audio: AudioFormat,
    },
    /// The words of the turn in progress so far.
    Hearing {
        /// Text so far.
        text: String,
    },
    /// A turn's words are final.
    Heard {
        /// The turn.
        turn_id: u64,
        /// The words.
        text: String,
    },
    /// The assistant started its reply to a turn.
    ReplyStarted {
        /// The turn.
        turn_id: u64,
    },
    /// Words of a reply as the model writes them (ahead of their audio).
    ReplyText {
        /// The turn.
        turn_id: u64,
        /// The words.
        text: String,
    },
    /// A reply ended (all of its audio was sent, or it was cut).
    ReplyDone {
        /// The turn.
        turn_id: u64,
        /// Whether it was cut short.
        interrupted: bool,
        /// Where its time went.
        latency: Latency,
    },
    /// A reply was cut: whatever of its audio has not been played must not be.
    Interrupted {
        /// The turn.
        turn_id: u64,
    },
    /// Usage and cost so far.
    Usage(Usage),
    /// Spend crossed the budget's warning fraction.
    BudgetWarning {
        /// Dollars spent.
        spent_usd: f64,
        /// The budget.
        budget_usd: f64,
    },
    /// The session will end soon.
    Ending {
        /// Why.
        reason: Ending,
        /// Seconds until it does.
        seconds_left: u64,
    },
    /// Something the client did or the session met went wrong.
    Problem {
        /// What.
        code: ErrorCode,
        /// A short message for people.
        message: String,
        /// The connection closes after it.
        fatal: bool,
    },
    /// Run a tool of the client application.
    ToolCall {
        /// The turn.
        turn_id: u64,
        /// The call's id (its result names it).
        call_id: String,
        /// The tool.
        name: String,
        /// The arguments, a JSON object checked against the tool's schema (opaque here).
        arguments: String,
        /// How long the session waits for the result.
        timeout: std::time::Duration,
    },
    /// The session stopped waiting for a client tool's result.
    ToolCancelled {
        /// The call.
        call_id: String,
        /// `timeout`, `interrupted` or `ended`.
        reason: &'static str,
    },
    /// The answer to a ping, with its id.
    Pong {
        /// The ping's id, handed back unread.
        id: Option<Opaque>,
    },
}

/// Something of the client's the session hands back without reading it (a ping's id, in the
/// transport's own encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opaque(pub Box<str>);

/// Why the session will end soon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Its maximum duration is near.
    MaxDuration,
    /// The server is draining (resume elsewhere).
    Draining,
    /// The budget is spent.
    Budget,
}

impl Event {
    /// A [`Event::Problem`].
    pub fn problem(code: ErrorCode, message: impl Into<String>, fatal: bool) -> Self {
        Event::Problem {
            code,
            message: message.into(),
            fatal,
        }
    }
}
