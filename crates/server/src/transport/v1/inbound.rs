//! Protocol v1 client frames after `session.start`, in the session's terms.

use axum::extract::ws::Message;

use atlas_protocol::{ClientMessage, parse_client_message};

use super::events::ping_id;
use crate::metrics;
use crate::transport::FromClient;

/// What a v1 frame says.
pub fn parse(message: Message) -> FromClient {
    match message {
        Message::Pong(_) => FromClient::Pong,
        Message::Ping(_) => FromClient::Nothing,
        Message::Close(_) => FromClient::Closed("client closed the connection"),
        Message::Binary(pcm) => FromClient::Audio(pcm),
        Message::Text(text) => match parse_client_message(text.as_str()) {
            Ok(ClientMessage::SessionStart(_)) => FromClient::StartAgain,
            Ok(ClientMessage::InputCommit) => FromClient::Commit,
            Ok(ClientMessage::ResponseCancel) => FromClient::Cancel,
            Ok(ClientMessage::InputText { text }) => FromClient::Text(text),
            Ok(ClientMessage::Ping { id }) => FromClient::Ping(ping_id(id)),
            Ok(ClientMessage::SessionEnd) => FromClient::End,
            Ok(ClientMessage::ToolResult {
                call_id,
                result,
                error,
            }) => FromClient::ToolResult {
                call_id,
                result: match (result, error) {
                    (Some(value), _) => Ok(value.to_string()),
                    (None, error) => Err(error.unwrap_or_default()),
                },
            },
            Ok(ClientMessage::AuthRefresh { token }) => FromClient::Refresh(token),
            Err(e) => {
                metrics::message_rejected(e.code().as_str());
                FromClient::Invalid(e.code(), e.to_string())
            }
        },
    }
}
