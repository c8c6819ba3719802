//! Wire types of the atlas-voice client protocol, version 1.
//!
//! # Layout
//! - [`ClientMessage`]: the JSON text frames a client sends, parsed by [`parse_client_message`].
//! - [`ServerEvent`]: the JSON text frames the server sends.
//! - [`ErrorCode`] and [`close`]: stable error codes and WebSocket close codes.
//!
//! This crate is the only place that knows the JSON shapes of the protocol; the server and the
//! client both depend on it so the two can never drift apart. `docs/protocol.md` documents the
//! same shapes for people.

use serde::{Deserialize, Serialize};

pub use atlas_core::vocab::{AudioEncoding, AudioFormat, ErrorCode, Limits};

/// The WebSocket subprotocol a client offers and the server selects.
pub const SUBPROTOCOL: &str = "atlas-voice.v1";
/// Prefix of the subprotocol entry a browser may use to carry its access token.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";
/// Path of the voice endpoint.
pub const VOICE_PATH: &str = "/v1/voice";
/// Largest text frame the server accepts, in bytes.
pub const MAX_TEXT_FRAME_BYTES: usize = 16 * 1024;

/// Longest `call_id` a `tool.result` may name.
pub const MAX_TOOL_CALL_ID_BYTES: usize = 128;

/// Longest `error` of a `tool.result`, in characters.
pub const MAX_TOOL_ERROR_CHARS: usize = 1000;
/// Longest typed user turn (`input.text`), in characters.
pub const MAX_INPUT_TEXT_CHARS: usize = 4_000;

/// WebSocket close codes used by the server.
pub mod close {
    /// Normal end (`session.end` or server-side completion).
    pub const NORMAL: u16 = 1000;
    /// Server going away (drain); the client should resume elsewhere.
    pub const GOING_AWAY: u16 = 1001;
    /// Policy violation (persistent abuse, protocol misuse).
    pub const POLICY: u16 = 1008;
    /// Internal error on the server.
    pub const INTERNAL: u16 = 1011;
    /// Token expired and was not refreshed.
    pub const TOKEN_EXPIRED: u16 = 4401;
    /// Session budget exhausted.
    pub const BUDGET_EXHAUSTED: u16 = 4402;
    /// No client activity for the idle timeout.
    pub const IDLE_TIMEOUT: u16 = 4408;
    /// Replaced by a resumed connection.
    pub const REPLACED: u16 = 4409;
    /// Maximum session duration reached.
    pub const MAX_DURATION: u16 = 4410;
}

/// Optional description of the client, recorded with the session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Client name, e.g. `atlas-voice-web`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Client version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `session.start`: the first message of every connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionStart {
    /// Format of the binary audio the client will send.
    #[serde(default = "default_input")]
    pub input_audio: AudioFormat,
    /// Format of the binary audio the client wants back.
    #[serde(default = "default_output")]
    pub output_audio: AudioFormat,
    /// Voice for speech synthesis; the server default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    /// BCP-47 language of the user's speech; the server default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// The application's conversation this session belongs to (recorded, not interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation_id: Option<String>,
    /// Client description (recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
    /// A W3C trace context (`00-{trace id}-{parent id}-{flags}`): the session's trace
    /// continues the client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

fn default_input() -> AudioFormat {
    AudioFormat::DEFAULT_INPUT
}
fn default_output() -> AudioFormat {
    AudioFormat::DEFAULT_OUTPUT
}

impl Default for SessionStart {
    fn default() -> Self {
        SessionStart {
            input_audio: AudioFormat::DEFAULT_INPUT,
            output_audio: AudioFormat::DEFAULT_OUTPUT,
            voice: None,
            language: None,
            conversation_id: None,
            client: None,
            traceparent: None,
        }
    }
}

/// A JSON text frame sent by the client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ClientMessage {
    /// Start the session (first message).
    #[serde(rename = "session.start")]
    SessionStart(SessionStart),
    /// Push-to-talk: the user finished speaking.
    #[serde(rename = "input.commit")]
    InputCommit,
    /// A typed user turn, answered like a spoken one.
    #[serde(rename = "input.text")]
    InputText {
        /// The user's words: not blank, at most [`MAX_INPUT_TEXT_CHARS`] characters, no
        /// control characters except tab and line breaks.
        text: String,
    },
    /// Stop the reply in flight.
    #[serde(rename = "response.cancel")]
    ResponseCancel,
    /// A fresh access token replacing the one the connection was opened with.
    #[serde(rename = "auth.refresh")]
    AuthRefresh {
        /// The new JWT.
        token: String,
    },
    /// Application-level ping; answered with `pong` carrying the same id.
    #[serde(rename = "ping")]
    Ping {
        /// Opaque value echoed in the `pong`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
    /// End the session normally.
    #[serde(rename = "session.end")]
    SessionEnd,
    /// The application's answer to a `tool.call`: exactly one of `result` and `error`.
    #[serde(rename = "tool.result")]
    ToolResult {
        /// The call answered (from `tool.call`).
        call_id: String,
        /// What the tool produced (any JSON value).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result: Option<serde_json::Value>,
        /// Why the tool failed, in words the assistant can relay (at most
        /// [`MAX_TOOL_ERROR_CHARS`] characters).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl ClientMessage {
    /// The message's `type` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::SessionStart(_) => "session.start",
            ClientMessage::InputCommit => "input.commit",
            ClientMessage::InputText { .. } => "input.text",
            ClientMessage::ResponseCancel => "response.cancel",
            ClientMessage::AuthRefresh { .. } => "auth.refresh",
            ClientMessage::Ping { .. } => "ping",
            ClientMessage::SessionEnd => "session.end",
            ClientMessage::ToolResult { .. } => "tool.result",
        }
    }

    /// Checks the bounds serde cannot express; the reason is shown to the client.
    fn validate(&self) -> Result<(), String> {
        if let ClientMessage::SessionStart(start) = self {
            start.check_clean()?;
        }
        if let ClientMessage::ToolResult {
            call_id,
            result,
            error,
        } = self
        {
            if call_id.is_empty()
                || call_id.len() > MAX_TOOL_CALL_ID_BYTES
                || !is_clean_text(call_id)
            {
                return Err(format!(
                    "call_id must be 1 to {MAX_TOOL_CALL_ID_BYTES} bytes without control characters"
                ));
            }
            match (result, error) {
                (Some(_), None) => {}
                (None, Some(e)) if e.chars().count() > MAX_TOOL_ERROR_CHARS => {
                    return Err(format!(
                        "error is longer than {MAX_TOOL_ERROR_CHARS} characters"
                    ));
                }
                (None, Some(_)) => {}
                _ => return Err("exactly one of result and error must be given".into()),
            }
        }
        if let ClientMessage::InputText { text } = self {
            if text.trim().is_empty() {
                return Err("text is empty".into());
            }
            let chars = text.chars().count();
            if chars > MAX_INPUT_TEXT_CHARS {
                return Err(format!(
                    "text has {chars} characters; at most {MAX_INPUT_TEXT_CHARS} are allowed"
                ));
            }
            if text
                .chars()
                .any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
            {
                return Err("text contains control characters".into());
            }
        }
        Ok(())
    }
}

/// Why a client text frame could not be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// The frame exceeds [`MAX_TEXT_FRAME_BYTES`].
    TooLarge {
        /// Size of the frame.
        len: usize,
    },
    /// Not a JSON object.
    MalformedJson,
    /// A JSON object without a string `type`.
    MissingType,
    /// A `type` this protocol version does not define (bounded copy of the value).
    UnknownType(String),
    /// A known type whose fields are wrong.
    InvalidFields {
        /// The message type.
        message_type: &'static str,
        /// What is wrong, for the client.
        detail: String,
    },
}

impl ParseError {
    /// The error code reported to the client.
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::TooLarge { .. } => ErrorCode::MessageTooLarge,
            ParseError::MalformedJson | ParseError::MissingType => ErrorCode::InvalidMessage,
            ParseError::UnknownType(_) => ErrorCode::UnknownMessageType,
            ParseError::InvalidFields { .. } => ErrorCode::InvalidMessage,
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::TooLarge { len } => write!(
                f,
                "text frame of {len} bytes exceeds the limit of {MAX_TEXT_FRAME_BYTES} bytes"
            ),
            ParseError::MalformedJson => f.write_str("text frame is not a JSON object"),
            ParseError::MissingType => f.write_str("message has no string \"type\" field"),
            ParseError::UnknownType(t) => write!(f, "unknown message type \"{t}\""),
            ParseError::InvalidFields {
                message_type,
                detail,
            } => write!(f, "invalid {message_type} message: {detail}"),
        }
    }
}

impl std::error::Error for ParseError {}

const KNOWN_TYPES: [&str; 8] = [
    "session.start",
    "input.commit",
    "input.text",
    "response.cancel",
    "auth.refresh",
    "ping",
    "session.end",
    "tool.result",
];

/// Parses one client text frame, telling malformed JSON, unknown types and bad fields apart.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ParseError> {
    if text.len() > MAX_TEXT_FRAME_BYTES {
        return Err(ParseError::TooLarge { len: text.len() });
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|_| ParseError::MalformedJson)?;
    if !value.is_object() {
        return Err(ParseError::MalformedJson);
    }
    let ty = match value.get("type") {
        Some(serde_json::Value::String(s)) => s.as_str(),
        _ => return Err(ParseError::MissingType),
    };
    let Some(known) = KNOWN_TYPES.iter().find(|k| **k == ty) else {
        let mut shown: String = ty.chars().take(64).collect();
        if shown.len() < ty.len() {
            shown.push('…');
        }
        return Err(ParseError::UnknownType(shown));
    };
    let msg: ClientMessage =
        serde_json::from_value(value).map_err(|e| ParseError::InvalidFields {
            message_type: known,
            detail: e.to_string(),
        })?;
    msg.validate().map_err(|detail| ParseError::InvalidFields {
        message_type: known,
        detail,
    })?;
    Ok(msg)
}

/// Whether `s` is free of control characters (NUL, C0, DEL, C1), which storage refuses or
/// mangles and no legitimate identifier holds.
pub fn is_clean_text(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

impl SessionStart {
    /// Refuses control characters in the strings the server records or echoes
    /// (`conversation_id`, `client.name`, `client.version`, `voice`, `language`).
    pub fn check_clean(&self) -> Result<(), String> {
        let client = self.client.as_ref();
        for (field, value) in [
            ("conversation_id", self.conversation_id.as_deref()),
            ("client.name", client.and_then(|c| c.name.as_deref())),
            ("client.version", client.and_then(|c| c.version.as_deref())),
            ("voice", self.voice.as_deref()),
            ("language", self.language.as_deref()),
        ] {
            if value.is_some_and(|v| !is_clean_text(v)) {
                return Err(format!("{field} must not contain control characters"));
            }
        }
        Ok(())
    }
}

/// The fuzzing property, shared by the fuzz target and the corpus replay test: parsing
/// arbitrary bytes never panics, oversized frames are refused, and every accepted message
/// survives a serialise/parse round trip unchanged.
#[doc(hidden)]
pub fn fuzz_check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_client_message(text) {
        Ok(msg) => {
            assert!(text.len() <= MAX_TEXT_FRAME_BYTES);
            let again = serde_json::to_string(&msg).expect("messages serialise");
            assert_eq!(
                parse_client_message(&again).as_ref(),
                Ok(&msg),
                "round trip of {text:?}"
            );
        }
        Err(ParseError::TooLarge { len }) => assert!(len > MAX_TEXT_FRAME_BYTES),
        Err(ParseError::UnknownType(t)) => assert!(t.chars().count() <= 65),
        Err(e) => {
            // Every refusal renders a message.
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Per-turn latency breakdown in milliseconds; a stage that did not run is absent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyBreakdown {
    /// End of the user's speech → final transcript.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_of_speech_to_final: Option<u64>,
    /// LLM request sent → first token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_first_token: Option<u64>,
    /// First TTS request sent → first audio byte.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tts_first_audio: Option<u64>,
    /// End of the user's speech (or end of turn) → first reply audio sent to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_first_audio: Option<u64>,
    /// Time the turn waited for tools (all rounds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<u64>,
}

/// Body of an HTTP refusal before the upgrade: `{"error":{"code","message"}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpErrorBody {
    /// The error.
    pub error: HttpError,
}

/// The error inside [`HttpErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpError {
    /// Stable code.
    pub code: ErrorCode,
    /// Short human-readable message.
    pub message: String,
}

/// Why the server is ending a session (`session.ending`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndingReason {
    /// Maximum duration approaching or reached.
    MaxDuration,
    /// The server is draining; resume elsewhere.
    Draining,
    /// Budget exhausted.
    Budget,
    /// Token expiring without refresh.
    TokenExpiring,
    /// Idle timeout approaching or reached.
    Idle,
}

/// Usage and running cost of a session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Running cost in dollars; `null` ("cost unknown") when a model in use is missing from
    /// the price catalog.
    pub cost_usd: Option<f64>,
    /// Seconds of audio streamed to speech recognition.
    pub stt_seconds: f64,
    /// LLM input tokens.
    pub llm_input_tokens: u64,
    /// LLM output tokens.
    pub llm_output_tokens: u64,
    /// Characters synthesised.
    pub tts_chars: u64,
}

/// A JSON text frame sent by the server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ServerEvent {
    /// The session is ready.
    #[serde(rename = "session.started")]
    SessionStarted {
        /// Session id.
        session_id: String,
        /// Token to resume this session after a dropped connection.
        resume_token: String,
        /// Limits in force.
        limits: Limits,
        /// Input format in use.
        input_audio: AudioFormat,
        /// Output format in use.
        output_audio: AudioFormat,
    },
    /// A dropped session was resumed.
    #[serde(rename = "session.resumed")]
    SessionResumed {
        /// Session id (same as before).
        session_id: String,
        /// Fresh resume token.
        resume_token: String,
        /// Limits in force.
        limits: Limits,
        /// Input format in use.
        input_audio: AudioFormat,
        /// Output format in use.
        output_audio: AudioFormat,
        /// Turns completed so far.
        turns: u64,
    },
    /// Interim transcript of the turn in progress.
    #[serde(rename = "transcript.partial")]
    TranscriptPartial {
        /// Text so far.
        text: String,
    },
    /// Final transcript of a user turn.
    #[serde(rename = "transcript.final")]
    TranscriptFinal {
        /// Turn number, from 1.
        turn_id: u64,
        /// The user's words.
        text: String,
    },
    /// The assistant started replying.
    #[serde(rename = "response.started")]
    ResponseStarted {
        /// Turn number.
        turn_id: u64,
    },
    /// More reply text.
    #[serde(rename = "response.text.delta")]
    ResponseTextDelta {
        /// Turn number.
        turn_id: u64,
        /// The new text.
        text: String,
    },
    /// The reply finished (or was interrupted).
    #[serde(rename = "response.done")]
    ResponseDone {
        /// Turn number.
        turn_id: u64,
        /// Whether the reply was cut off.
        interrupted: bool,
        /// Latency breakdown.
        latency_ms: LatencyBreakdown,
    },
    /// The assistant calls a tool of the application: answer with `tool.result` before the
    /// tool's time limit.
    #[serde(rename = "tool.call")]
    ToolCall {
        /// Turn number.
        turn_id: u64,
        /// Id to answer with.
        call_id: String,
        /// The tool's name, as declared in the server's configuration.
        name: String,
        /// Arguments, checked against the tool's JSON Schema.
        arguments: serde_json::Value,
        /// Milliseconds the server waits for the answer.
        timeout_ms: u64,
    },
    /// A `tool.call` is no longer awaited (its time ran out, or the turn was interrupted):
    /// a late `tool.result` for it is refused.
    #[serde(rename = "tool.cancelled")]
    ToolCancelled {
        /// The call.
        call_id: String,
        /// `timeout`, `interrupted` or `ended`.
        reason: String,
    },
    /// The reply was cut off: flush playback; no more audio for this turn follows.
    #[serde(rename = "response.interrupted")]
    ResponseInterrupted {
        /// Turn number.
        turn_id: u64,
    },
    /// Running usage and cost.
    #[serde(rename = "usage")]
    Usage(Usage),
    /// Spend crossed the warning fraction of the budget.
    #[serde(rename = "budget.warning")]
    BudgetWarning {
        /// Dollars spent.
        spent_usd: f64,
        /// The budget.
        budget_usd: f64,
    },
    /// The server will end the session soon.
    #[serde(rename = "session.ending")]
    SessionEnding {
        /// Why.
        reason: EndingReason,
        /// Seconds until the close.
        seconds_left: u64,
    },
    /// Something went wrong.
    #[serde(rename = "error")]
    Error {
        /// Stable code.
        code: ErrorCode,
        /// Short message.
        message: String,
        /// Whether the connection closes after this.
        fatal: bool,
    },
    /// Answer to `ping`.
    #[serde(rename = "pong")]
    Pong {
        /// The ping's id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<serde_json::Value>,
    },
}

impl ServerEvent {
    /// Builds an `error` event.
    pub fn error(code: ErrorCode, message: impl Into<String>, fatal: bool) -> Self {
        ServerEvent::Error {
            code,
            message: message.into(),
            fatal,
        }
    }

    /// Serialises the event to its JSON text.
    pub fn to_json(&self) -> String {
        // Serialising these plain data types cannot fail.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{\"type\":\"error\"}"))
    }
}

/// Parses one server text frame (used by clients).
pub fn parse_server_event(text: &str) -> Result<ServerEvent, serde_json::Error> {
    serde_json::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_start_uses_defaults() {
        let m = parse_client_message(r#"{"type":"session.start"}"#).unwrap();
        assert_eq!(m, ClientMessage::SessionStart(SessionStart::default()));
    }

    #[test]
    fn session_start_spec_example_parses() {
        let m = parse_client_message(
            r#"{"type":"session.start","input_audio":{"encoding":"pcm_s16le","sample_rate":16000},
               "output_audio":{"encoding":"pcm_s16le","sample_rate":24000}}"#,
        )
        .unwrap();
        let ClientMessage::SessionStart(s) = m else {
            panic!("wrong variant")
        };
        assert_eq!(s.input_audio.sample_rate, 16_000);
        assert_eq!(s.output_audio.sample_rate, 24_000);
    }

    #[test]
    fn errors_are_told_apart() {
        assert_eq!(
            parse_client_message("{not json"),
            Err(ParseError::MalformedJson)
        );
        assert_eq!(
            parse_client_message("[1,2]"),
            Err(ParseError::MalformedJson)
        );
        assert_eq!(
            parse_client_message(r#"{"kind":"x"}"#),
            Err(ParseError::MissingType)
        );
        assert_eq!(
            parse_client_message(r#"{"type":"dance"}"#),
            Err(ParseError::UnknownType("dance".into()))
        );
        let e = parse_client_message(r#"{"type":"auth.refresh"}"#).unwrap_err();
        assert!(matches!(
            e,
            ParseError::InvalidFields {
                message_type: "auth.refresh",
                ..
            }
        ));
        assert_eq!(e.code(), ErrorCode::InvalidMessage);
        let e = parse_client_message(
            r#"{"type":"session.start","input_audio":{"encoding":"opus","sample_rate":16000}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ParseError::InvalidFields { .. }));
    }

    #[test]
    fn input_text_is_parsed_and_bounded() {
        assert_eq!(
            parse_client_message(r#"{"type":"input.text","text":"What is the weather?"}"#),
            Ok(ClientMessage::InputText {
                text: "What is the weather?".into()
            })
        );
        let m = ClientMessage::InputText {
            text: "two\nlines\tand é".into(),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"type":"input.text","text":"two\nlines\tand é"}"#);
        assert_eq!(parse_client_message(&json), Ok(m));
        // Exactly the limit in characters (multi-byte ones count once) is fine.
        let longest = "é".repeat(MAX_INPUT_TEXT_CHARS);
        assert!(
            parse_client_message(&format!(r#"{{"type":"input.text","text":"{longest}"}}"#)).is_ok()
        );
        for (bad, why) in [
            (r#"{"type":"input.text"}"#.to_owned(), "missing field"),
            (
                r#"{"type":"input.text","text":42}"#.to_owned(),
                "invalid type",
            ),
            (
                r#"{"type":"input.text","text":"  \n "}"#.to_owned(),
                "text is empty",
            ),
            (
                format!(
                    r#"{{"type":"input.text","text":"{}"}}"#,
                    "a".repeat(MAX_INPUT_TEXT_CHARS + 1)
                ),
                "at most 4000",
            ),
            (
                r#"{"type":"input.text","text":"hi\u0000there"}"#.to_owned(),
                "control characters",
            ),
        ] {
            let e = parse_client_message(&bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    ParseError::InvalidFields {
                        message_type: "input.text",
                        ..
                    }
                ),
                "{bad}: {e:?}"
            );
            assert_eq!(e.code(), ErrorCode::InvalidMessage);
            assert!(e.to_string().contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn control_characters_in_recorded_strings_are_refused_per_field() {
        for (field, json) in [
            ("conversation_id", r#""conversation_id":"a\u0000b""#),
            ("client.name", r#""client":{"name":"web\u0007"}"#),
            (
                "client.version",
                r#""client":{"name":"web","version":"1.0\n"}"#,
            ),
            ("voice", r#""voice":"alloy\u001b[31m""#),
            ("language", r#""language":"en\u0085""#),
        ] {
            let e =
                parse_client_message(&format!(r#"{{"type":"session.start",{json}}}"#)).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidMessage, "{field}");
            assert!(
                e.to_string()
                    .contains(&format!("{field} must not contain control characters")),
                "{field}: {e}"
            );
        }
        // Ordinary text, including non-ASCII, passes.
        let ok = parse_client_message(
            r#"{"type":"session.start","conversation_id":"conv-é-42","client":{"name":"atlas web","version":"1.2.3"}}"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn unknown_type_is_bounded() {
        let long = "x".repeat(10_000);
        let e = parse_client_message(&format!(r#"{{"type":"{long}"}}"#)).unwrap_err();
        let ParseError::UnknownType(t) = e else {
            panic!("wrong error")
        };
        assert!(t.chars().count() <= 65);
    }

    #[test]
    fn oversized_frame_is_refused_before_parsing() {
        let big = format!(
            r#"{{"type":"ping","id":"{}"}}"#,
            "a".repeat(MAX_TEXT_FRAME_BYTES)
        );
        assert!(matches!(
            parse_client_message(&big),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn tool_messages_round_trip_and_are_bounded() {
        let ok = parse_client_message(
            r#"{"type":"tool.result","call_id":"call_1","result":{"opened":true}}"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            ClientMessage::ToolResult {
                call_id: "call_1".into(),
                result: Some(serde_json::json!({"opened": true})),
                error: None,
            }
        );
        assert!(
            parse_client_message(r#"{"type":"tool.result","call_id":"c","error":"no"}"#).is_ok()
        );
        for bad in [
            r#"{"type":"tool.result","call_id":"c"}"#,
            r#"{"type":"tool.result","call_id":"c","result":1,"error":"x"}"#,
            r#"{"type":"tool.result","call_id":"","result":1}"#,
            r#"{"type":"tool.result","result":1}"#,
        ] {
            assert!(
                matches!(
                    parse_client_message(bad),
                    Err(ParseError::InvalidFields {
                        message_type: "tool.result",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        let long = format!(
            r#"{{"type":"tool.result","call_id":"c","error":"{}"}}"#,
            "x".repeat(MAX_TOOL_ERROR_CHARS + 1)
        );
        assert!(parse_client_message(&long).is_err());
        let call = ServerEvent::ToolCall {
            turn_id: 2,
            call_id: "call_1".into(),
            name: "open_page".into(),
            arguments: serde_json::json!({"page": "settings"}),
            timeout_ms: 5000,
        };
        let v: serde_json::Value = serde_json::from_str(&call.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"tool.call","turn_id":2,"call_id":"call_1","name":"open_page",
                "arguments":{"page":"settings"},"timeout_ms":5000})
        );
        let cancelled = ServerEvent::ToolCancelled {
            call_id: "call_1".into(),
            reason: "timeout".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&cancelled.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"tool.cancelled","call_id":"call_1","reason":"timeout"})
        );
    }

    #[test]
    fn server_events_match_spec_shapes() {
        let done = ServerEvent::ResponseDone {
            turn_id: 1,
            interrupted: false,
            latency_ms: LatencyBreakdown {
                end_of_speech_to_final: Some(150),
                llm_first_token: Some(300),
                tts_first_audio: Some(200),
                to_first_audio: Some(662),
                ..LatencyBreakdown::default()
            },
        };
        let v: serde_json::Value = serde_json::from_str(&done.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"response.done","turn_id":1,"interrupted":false,
                "latency_ms":{"end_of_speech_to_final":150,"llm_first_token":300,"tts_first_audio":200,"to_first_audio":662}})
        );
        let err = ServerEvent::error(ErrorCode::AudioChunkInvalid, "odd length", false);
        let v: serde_json::Value = serde_json::from_str(&err.to_json()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":"audio_chunk_invalid","message":"odd length","fatal":false})
        );
        let usage = ServerEvent::Usage(Usage {
            cost_usd: Some(0.0123),
            stt_seconds: 12.4,
            llm_input_tokens: 830,
            llm_output_tokens: 64,
            tts_chars: 170,
        });
        let v: serde_json::Value = serde_json::from_str(&usage.to_json()).unwrap();
        assert_eq!(v["type"], "usage");
        assert_eq!(v["llm_input_tokens"], 830);
        assert_eq!(parse_server_event(&usage.to_json()).unwrap(), usage);
    }

    #[test]
    fn error_code_strings_match_serde() {
        for code in [
            ErrorCode::AudioChunkInvalid,
            ErrorCode::TooManySessions,
            ErrorCode::SttFailed,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::String(code.as_str().into())
            );
        }
    }
}
