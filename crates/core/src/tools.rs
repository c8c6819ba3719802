//! Tool calls: what the model asked for, what it was answered, and how a call ended.
//!
//! Arguments and results are opaque text here (JSON, but the core does not parse it): the
//! driver checks a call against the declared tools before the session machine sees it
//! ([`CheckedCall`]), and the machine decides what runs, for how long, and what the model is
//! told.

use std::time::Duration;

/// One call the model asked for.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    /// The provider's id of the call (`toolu_…`, `call_…`), echoed with its result.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments as the model wrote them (a JSON object, unchecked).
    pub arguments: String,
}

/// The answer to one call, as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolResult {
    /// The call answered.
    pub call_id: String,
    /// The result (JSON text), or what went wrong in words the model can act on.
    pub content: String,
    /// The call failed or was refused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
}

impl ToolResult {
    /// A failed or refused call.
    pub fn error(call_id: &str, message: impl Into<String>) -> Self {
        ToolResult {
            call_id: call_id.to_owned(),
            content: message.into(),
            is_error: true,
        }
    }
}

/// Where a tool runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolKind {
    /// The server calls the operator's webhook.
    Server,
    /// The client application answers `tool.call` with `tool.result`.
    Client,
}

impl ToolKind {
    /// Bounded label for records and metrics.
    pub fn label(self) -> &'static str {
        match self {
            ToolKind::Server => "server",
            ToolKind::Client => "client",
        }
    }
}

/// A call checked against the declared tools (by the driver, which knows their schemas).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedCall {
    /// The call.
    pub call: ToolCall,
    /// Where it runs and its time limit, or why it must not run (unknown tool, arguments
    /// that are not JSON or fail the schema) — told to the model as the call's error.
    pub verdict: Result<(ToolKind, Duration), String>,
}

/// How a call ended, for the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolOutcome {
    /// Answered.
    Ok,
    /// The tool answered with an error.
    Failed,
    /// No answer within the tool's time limit.
    TimedOut,
    /// Refused before running: unknown tool or invalid arguments.
    Invalid,
    /// Refused: the turn's call limit was reached.
    OverLimit,
    /// The turn was interrupted or the session ended while it ran.
    Cancelled,
}

impl ToolOutcome {
    /// Bounded label for records and metrics.
    pub fn label(self) -> &'static str {
        match self {
            ToolOutcome::Ok => "ok",
            ToolOutcome::Failed => "failed",
            ToolOutcome::TimedOut => "timed_out",
            ToolOutcome::Invalid => "invalid",
            ToolOutcome::OverLimit => "over_limit",
            ToolOutcome::Cancelled => "cancelled",
        }
    }
}
