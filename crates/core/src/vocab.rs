//! The session's vocabulary shared by every transport, the records and the metrics: audio
//! formats, the limits a session runs under, and the stable error codes. Protocol v1 carries
//! them on its wire as they are (`atlas_protocol` re-exports them), which is why they derive
//! serde; the session machine uses them without knowing any wire.

use serde::{Deserialize, Serialize};

/// Audio sample encoding. Only 16-bit little-endian PCM is defined in version 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioEncoding {
    /// Signed 16-bit little-endian PCM, mono.
    #[default]
    PcmS16le,
}

/// An audio stream's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AudioFormat {
    /// Sample encoding.
    #[serde(default)]
    pub encoding: AudioEncoding,
    /// Samples per second.
    pub sample_rate: u32,
}

impl AudioFormat {
    /// Default input format: 16 kHz PCM.
    pub const DEFAULT_INPUT: AudioFormat = AudioFormat {
        encoding: AudioEncoding::PcmS16le,
        sample_rate: 16_000,
    };
    /// Default output format: 24 kHz PCM.
    pub const DEFAULT_OUTPUT: AudioFormat = AudioFormat {
        encoding: AudioEncoding::PcmS16le,
        sample_rate: 24_000,
    };
    /// Sample rates accepted for input and output audio.
    pub const SUPPORTED_RATES: [u32; 4] = [8_000, 16_000, 24_000, 48_000];
}

/// Session limits announced in `session.started`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Maximum session length in seconds.
    pub max_duration_s: u64,
    /// Session budget in dollars; absent when unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
    /// Idle timeout in seconds.
    #[serde(default)]
    pub idle_timeout_s: u64,
    /// How long a dropped session waits for a resume, in seconds.
    #[serde(default)]
    pub resume_window_s: u64,
}

/// Stable error codes carried by `error` events and HTTP refusals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A binary frame of the wrong size or odd length.
    AudioChunkInvalid,
    /// Malformed JSON, missing type or invalid fields.
    InvalidMessage,
    /// A message type this version does not define.
    UnknownMessageType,
    /// A text frame over the size limit.
    MessageTooLarge,
    /// A message that needs a started session arrived before `session.start`.
    SessionNotStarted,
    /// A second `session.start`.
    SessionAlreadyStarted,
    /// Requested audio format not supported.
    UnsupportedAudioFormat,
    /// Too many frames per second.
    RateLimited,
    /// Missing, invalid or expired credentials.
    Unauthorized,
    /// Valid credentials without the right role.
    Forbidden,
    /// Token expired and was not refreshed.
    TokenExpired,
    /// Too many concurrent sessions for this user.
    TooManySessions,
    /// Too many connection attempts from one address.
    TooManyAttempts,
    /// The server is draining.
    Draining,
    /// The server is at capacity.
    AtCapacity,
    /// Resume token unknown or expired.
    ResumeFailed,
    /// Speech recognition failed.
    SttFailed,
    /// The language model failed.
    LlmFailed,
    /// Speech synthesis failed.
    TtsFailed,
    /// Local engines are saturated.
    EnginesBusy,
    /// The session budget is exhausted.
    BudgetExhausted,
    /// The client does not read fast enough.
    SlowConsumer,
    /// No activity for the idle timeout.
    IdleTimeout,
    /// Maximum duration reached.
    MaxDuration,
    /// Something went wrong on the server.
    Internal,
}

impl ErrorCode {
    /// The code's string form.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::AudioChunkInvalid => "audio_chunk_invalid",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownMessageType => "unknown_message_type",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::SessionNotStarted => "session_not_started",
            ErrorCode::SessionAlreadyStarted => "session_already_started",
            ErrorCode::UnsupportedAudioFormat => "unsupported_audio_format",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TooManySessions => "too_many_sessions",
            ErrorCode::TooManyAttempts => "too_many_attempts",
            ErrorCode::Draining => "draining",
            ErrorCode::AtCapacity => "at_capacity",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::SttFailed => "stt_failed",
            ErrorCode::LlmFailed => "llm_failed",
            ErrorCode::TtsFailed => "tts_failed",
            ErrorCode::EnginesBusy => "engines_busy",
            ErrorCode::BudgetExhausted => "budget_exhausted",
            ErrorCode::SlowConsumer => "slow_consumer",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::MaxDuration => "max_duration",
            ErrorCode::Internal => "internal",
        }
    }
}
