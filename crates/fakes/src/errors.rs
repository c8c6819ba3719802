//! Error responses in each provider's shape.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::util;

fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn json_response(
    status: u16,
    mut headers: HeaderMap,
    body: &Value,
    retry_after: Option<u64>,
) -> Response {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(secs) = retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    (status_code(status), headers, body.to_string()).into_response()
}

/// Anthropic's error `type` and a default message for an HTTP status.
pub(crate) fn anthropic_type(status: u16) -> (&'static str, &'static str) {
    match status {
        401 => ("authentication_error", "invalid x-api-key"),
        402 => (
            "billing_error",
            "Your credit balance is too low to access the Anthropic API.",
        ),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        404 => (
            "not_found_error",
            "The requested resource could not be found.",
        ),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        429 => (
            "rate_limit_error",
            "This request would exceed the rate limit for your organization.",
        ),
        529 => ("overloaded_error", "Overloaded"),
        504 => ("timeout_error", "Request timed out"),
        s if s >= 500 => ("api_error", "Internal server error"),
        _ => ("invalid_request_error", "Invalid request"),
    }
}

/// An Anthropic error: `{"type":"error","error":{"type":…,"message":…},"request_id":…}`.
pub(crate) fn anthropic(status: u16, message: Option<&str>, retry_after: Option<u64>) -> Response {
    let (kind, default_message) = anthropic_type(status);
    let request_id = util::prefixed_id("req_");
    let body = json!({
        "type": "error",
        "error": {"type": kind, "message": message.unwrap_or(default_message)},
        "request_id": request_id,
    });
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("request-id", v);
    }
    json_response(status, headers, &body, retry_after)
}

/// An OpenAI error: `{"error":{"message":…,"type":…,"param":…,"code":…}}`.
///
/// Without an explicit message, type and code follow the status (401 `invalid_api_key`,
/// 429 `rate_limit_exceeded`, 5xx `server_error`, …).
pub(crate) fn openai(
    status: u16,
    message: Option<&str>,
    param: Option<&str>,
    code: Option<&str>,
    retry_after: Option<u64>,
) -> Response {
    let (kind, default_message, default_code) = openai_type(status);
    let body = json!({
        "error": {
            "message": message.unwrap_or(default_message),
            "type": kind,
            "param": param,
            "code": code.or(default_code),
        }
    });
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&util::prefixed_id("req_")) {
        headers.insert("x-request-id", v);
    }
    json_response(status, headers, &body, retry_after)
}

/// OpenAI's error `type`, default message and default `code` for an HTTP status.
pub(crate) fn openai_type(status: u16) -> (&'static str, &'static str, Option<&'static str>) {
    match status {
        401 => (
            "invalid_request_error",
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            Some("invalid_api_key"),
        ),
        403 => (
            "invalid_request_error",
            "You are not allowed to access this resource.",
            None,
        ),
        404 => (
            "invalid_request_error",
            "The requested resource does not exist.",
            None,
        ),
        429 => (
            "requests",
            "Rate limit reached for requests. Please try again later.",
            Some("rate_limit_exceeded"),
        ),
        503 => (
            "server_error",
            "The engine is currently overloaded, please try again later.",
            None,
        ),
        s if s >= 500 => (
            "server_error",
            "The server had an error while processing your request. Sorry about that!",
            None,
        ),
        _ => ("invalid_request_error", "Invalid request.", None),
    }
}

/// A Deepgram error (refused WebSocket upgrade or HTTP error):
/// `{"err_code":…,"err_msg":…,"request_id":…}` plus the `dg-request-id` and `dg-error` headers.
pub(crate) fn deepgram(status: u16, message: Option<&str>, retry_after: Option<u64>) -> Response {
    let (code, default_message) = match status {
        400 => ("Bad Request", "Bad Request"),
        401 => ("INVALID_AUTH", "Invalid credentials."),
        402 => (
            "ASR_PAYMENT_REQUIRED",
            "Project does not have enough credits for an ASR request.",
        ),
        403 => (
            "INSUFFICIENT_PERMISSIONS",
            "Project does not have access to the requested model.",
        ),
        404 => ("NOT_FOUND", "Not found."),
        429 => (
            "TOO_MANY_REQUESTS",
            "Too many requests. Please try again later.",
        ),
        s if s >= 500 => ("INTERNAL_SERVER_ERROR", "Internal server error."),
        _ => ("Bad Request", "Bad Request"),
    };
    let message = message.unwrap_or(default_message);
    let request_id = util::uuid();
    let body = json!({"err_code": code, "err_msg": message, "request_id": request_id});
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert("dg-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(message) {
        headers.insert("dg-error", v);
    }
    json_response(status, headers, &body, retry_after)
}
