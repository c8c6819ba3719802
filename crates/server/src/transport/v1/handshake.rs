//! A v1 connection until its `session.start`: frames are classified here, and the core's
//! [`Prestart`] rules decide what each leads to.

use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::time::Instant;

use atlas_core::session::EndReason;
use atlas_core::session::prestart::{Frame, Prestart, StartRequest, Verdict, check_start};
use atlas_protocol::{ClientMessage, ErrorCode, SessionStart, parse_client_message};

use super::events::ping_id;
use super::render_event;
use crate::state::AppState;
use crate::transport::writer::OutboundTx;
use crate::transport::{Kind, Start};

/// Waits for a valid `session.start`, answering anything else with a non-fatal error.
pub async fn await_start(
    state: &AppState,
    stream: &mut SplitStream<WebSocket>,
    outbound: &OutboundTx,
) -> Result<Start, EndReason> {
    let mut rules = Prestart::new(Instant::now().into_std());
    let deadline = Instant::from_std(rules.deadline());
    loop {
        let message = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => {
                let (event, reason) = rules.timed_out();
                let _ = outbound.frame(render_event(event));
                return Err(reason);
            }
            Ok(None | Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                return Err(EndReason::Disconnected);
            }
            Ok(Some(Ok(m))) => m,
        };
        let mut started = None;
        let frame = match message {
            Message::Text(text) => match parse_client_message(text.as_str()) {
                Ok(ClientMessage::SessionStart(start)) => match check(state, &start) {
                    Ok(()) => {
                        started = Some(start);
                        Frame::Start
                    }
                    Err((code, message)) => Frame::BadStart(code, message),
                },
                Ok(ClientMessage::Ping { id }) => {
                    Frame::Ping(atlas_core::session::Event::Pong { id: ping_id(id) })
                }
                Ok(ClientMessage::SessionEnd) => Frame::End,
                Ok(other) => Frame::Other(
                    ErrorCode::SessionNotStarted,
                    format!("{} before session.start", other.type_name()),
                ),
                Err(e) => Frame::Other(e.code(), e.to_string()),
            },
            Message::Binary(_) => Frame::Other(
                ErrorCode::SessionNotStarted,
                "audio before session.start is discarded".into(),
            ),
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => Frame::Control,
        };
        match rules.frame(frame) {
            Verdict::Wait => {}
            Verdict::Answer(event) => {
                if outbound.frame(render_event(event)).is_err() {
                    return Err(EndReason::Disconnected);
                }
            }
            Verdict::Started => {
                if let Some(start) = started {
                    return Ok(start_of(start));
                }
            }
            Verdict::End(reason) => return Err(reason),
        }
    }
}

fn check(state: &AppState, start: &SessionStart) -> Result<(), (ErrorCode, String)> {
    let client = start.client.as_ref();
    check_start(&StartRequest {
        input: start.input_audio,
        output: start.output_audio,
        voice: start
            .voice
            .as_deref()
            .map(|v| (v, state.engines.tts.has_voice(v))),
        language: start.language.as_deref(),
        conversation_id: start.conversation_id.as_deref(),
        client: (
            client.and_then(|c| c.name.as_deref()),
            client.and_then(|c| c.version.as_deref()),
        ),
        traceparent: start.traceparent.as_deref(),
    })
}

fn start_of(s: SessionStart) -> Start {
    Start {
        kind: Kind::WebSocket,
        input: s.input_audio,
        output: s.output_audio,
        voice: s.voice,
        language: s.language,
        conversation_id: s.conversation_id,
        client: s.client,
        traceparent: s.traceparent,
        call: None,
    }
}
