use std::time::Duration;

/// A provider call failed. Messages are for logs; clients see only stable codes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// Could not reach the provider.
    #[error("connection failed: {0}")]
    Connect(String),
    /// A deadline passed.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The provider answered with an HTTP error.
    #[error("HTTP {status} ({kind}): {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Provider's error type, e.g. `rate_limit_error`.
        kind: String,
        /// Provider's message.
        message: String,
        /// `retry-after`, when given.
        retry_after: Option<Duration>,
    },
    /// The provider reported an error inside a stream that had started.
    #[error("stream error ({kind}): {message}")]
    Stream {
        /// Provider's error type.
        kind: String,
        /// Provider's message.
        message: String,
    },
    /// The connection ended unexpectedly.
    #[error("connection closed: {0}")]
    Closed(String),
    /// The provider sent something this adapter does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A local engine's queue is full; the request was not started.
    #[error("engine busy: {0}")]
    Busy(String),
}

impl ProviderError {
    /// Whether retrying the same request may succeed (429, 529, 5xx, network, timeouts
    /// before the response started).
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Connect(_) | ProviderError::Timeout(_) => true,
            // A 429 for an exhausted quota (OpenAI `insufficient_quota`) will not clear by waiting.
            ProviderError::Status {
                status: 429, kind, ..
            } => kind != "insufficient_quota",
            ProviderError::Status { status, .. } => {
                *status == 408 || *status == 409 || *status >= 500
            }
            _ => false,
        }
    }

    /// Whether a local engine turned the request away because its queue is full.
    pub fn is_busy(&self) -> bool {
        matches!(self, ProviderError::Busy(_))
    }

    /// The provider's `retry-after`, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A bounded label for metrics and logs (never the message).
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::Connect(_) => "connect",
            ProviderError::Timeout(_) => "timeout",
            ProviderError::Status { status, .. } => match *status {
                400 => "http_400",
                401 | 403 => "http_auth",
                404 => "http_404",
                429 => "http_429",
                529 => "http_529",
                500..=599 => "http_5xx",
                _ => "http_other",
            },
            ProviderError::Stream { .. } => "stream_error",
            ProviderError::Closed(_) => "closed",
            ProviderError::Protocol(_) => "protocol",
            ProviderError::Busy(_) => "busy",
        }
    }
}
