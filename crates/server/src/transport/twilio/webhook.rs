//! `POST /v1/twilio/voice`: Twilio asks what to do with a call to one of the account's
//! numbers. A request without a valid `X-Twilio-Signature` is refused (403); a valid one is
//! always answered with TwiML, never an HTTP error (Twilio would play its generic error
//! message): a call that can be taken is connected to the media stream with a credential
//! for it, any other is told why and hung up.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use secrecy::ExposeSecret;
use sha2::Sha256;
use tracing::{info, warn};

use super::stream::{CALLER, CREDENTIAL};
use super::{credential, signature, twiml};
use crate::admission::{self, Refusal};
use crate::metrics;
use crate::state::AppState;

/// The webhook's path.
pub const VOICE_PATH: &str = "/v1/twilio/voice";
/// The media stream's path.
pub const STREAM_PATH: &str = "/v1/twilio/stream";
/// Largest webhook body accepted (Twilio's are about 1 KiB).
pub const MAX_BODY: usize = 16 * 1024;
/// How long the credential in the TwiML stays valid: Twilio opens the stream at once.
const CREDENTIAL_TTL_S: u64 = 60;

/// The key that signs stream credentials, derived from the auth token (every instance of a
/// deployment shares it); `None` while calls are not enabled.
pub fn credential_secret(state: &AppState) -> Option<Vec<u8>> {
    let token = state.config.twilio_auth_token.as_ref()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(token.expose_secret().as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"atlas-voice twilio stream credential v1");
    Some(mac.finalize().into_bytes().to_vec())
}

/// The public base URL, without a trailing slash.
fn public_base(state: &AppState) -> Option<&str> {
    state
        .config
        .public_url
        .as_deref()
        .map(|u| u.trim_end_matches('/'))
}

/// The voice webhook.
pub async fn voice(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (Some(token), Some(base)) = (state.config.twilio_auth_token.as_ref(), public_base(&state))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let params: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
    let signed = headers
        .get(signature::HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|sig| {
            signature::verify(
                token.expose_secret(),
                &format!("{base}{VOICE_PATH}"),
                &params,
                sig,
            )
        });
    if !signed {
        metrics::refused("twilio_signature");
        warn!("voice webhook with a missing or bad signature");
        return (StatusCode::FORBIDDEN, "bad signature").into_response();
    }
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let (Some(call_sid), Some(to)) = (param("CallSid"), param("To")) else {
        return answer(twiml::refuse("Sorry, this call cannot be taken."));
    };
    let caller = param("From").unwrap_or_default();
    let Some(number) = state.config.twilio_numbers.iter().find(|n| n.number == to) else {
        info!(to, "call to a number that is not configured");
        return answer(twiml::refuse("Sorry, this number is not in service."));
    };
    if state.shutdown.is_cancelled() {
        return answer(twiml::refuse(
            "Sorry, we cannot take your call right now. Please call again in a moment.",
        ));
    }
    if let Err(refusal) = admission::check(&state, &number.user_id).await {
        metrics::refused(refusal.label());
        info!(reason = refusal.label(), "call refused");
        return answer(twiml::refuse(said(&refusal)));
    }
    let Some(secret) = credential_secret(&state) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let credential = credential::issue(&secret, call_sid, &number.user_id, now + CREDENTIAL_TTL_S);
    let stream_url = format!("{}{STREAM_PATH}", websocket_base(base));
    let caller: String = caller.chars().take(32).collect();
    answer(twiml::connect_stream(
        &stream_url,
        &[(CREDENTIAL, credential.as_str()), (CALLER, caller.as_str())],
    ))
}

/// What a caller who cannot be served hears.
fn said(refusal: &Refusal) -> &'static str {
    match refusal {
        Refusal::TooManySessions => {
            "Sorry, all the lines for this number are busy. Please call again later."
        }
        Refusal::BudgetExhausted => {
            "Sorry, this line has reached its limit for today. Please call again tomorrow."
        }
        _ => "Sorry, we cannot take your call right now. Please call again in a moment.",
    }
}

/// `https://host/x` → `wss://host/x` (`http` → `ws` for a loopback test deployment).
fn websocket_base(base: &str) -> String {
    match base.split_once("://") {
        Some(("http", rest)) => format!("ws://{rest}"),
        Some((_, rest)) => format!("wss://{rest}"),
        None => format!("wss://{base}"),
    }
}

fn answer(twiml: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], twiml).into_response()
}

/// `GET /v1/twilio/stream`: the media stream's WebSocket. Anyone may open it; only a stream
/// whose `start` brings a valid credential for its call gets a session.
pub async fn stream(
    State(state): State<AppState>,
    upgrade: axum::extract::WebSocketUpgrade,
) -> Response {
    if credential_secret(&state).is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let sessions = state.sessions.clone();
    upgrade
        .read_buffer_size(8 * 1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(super::wire::MAX_MESSAGE_LEN)
        .max_frame_size(super::wire::MAX_MESSAGE_LEN)
        .on_upgrade(move |socket| sessions.track_future(super::stream::accept(socket, state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_url_follows_the_public_scheme() {
        assert_eq!(
            websocket_base("https://voice.example.com"),
            "wss://voice.example.com"
        );
        assert_eq!(
            websocket_base("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080"
        );
    }
}
