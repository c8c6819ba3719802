//! The one place that maps refusals to HTTP statuses and JSON bodies.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use atlas_protocol::{ErrorCode, HttpError, HttpErrorBody};

use crate::auth::AuthError;

/// A refusal before the WebSocket upgrade.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: ErrorCode,
    /// Short message for the client.
    pub message: String,
}

impl ApiError {
    /// Builds a refusal.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match e {
            AuthError::Forbidden => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            AuthError::Expired => (StatusCode::UNAUTHORIZED, ErrorCode::TokenExpired),
            _ => (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = HttpErrorBody {
            error: HttpError {
                code: self.code,
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}
