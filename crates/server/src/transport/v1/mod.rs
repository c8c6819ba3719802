//! Protocol v1: the project's own WebSocket protocol (docs/protocol.md), JSON events and
//! binary PCM frames.
//!
//! - [`handshake`]: `session.start` and what comes before it.
//! - [`inbound`]: client frames → [`FromClient`](super::FromClient).
//! - [`events`]: the session's events → v1 events.

pub mod events;
pub mod handshake;
pub mod inbound;

use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::StreamExt;

use atlas_core::session::{EndReason, Event};
use atlas_protocol::close;

use super::writer::{self, OutboundTx, SendError};
use super::{Link, Reader, Wire, Writer};
use crate::auth::Identity;
use crate::session::{self, Upgrade};
use crate::state::AppState;

/// Serves an upgraded v1 connection: the `session.start` handshake, then the session.
pub async fn accept(socket: WebSocket, state: AppState, identity: Identity, upgrade: Upgrade) {
    let (sink, mut stream) = socket.split();
    let (outbound, task) = writer::spawn(&state.sessions, sink);
    match handshake::await_start(&state, &mut stream, &outbound).await {
        Ok(start) => {
            let link = Link {
                reader: Reader::V1(stream),
                writer: Writer::new(outbound, Wire::V1),
                task,
            };
            link.join(state, start, identity, upgrade).await;
        }
        Err(reason) => {
            match reason {
                EndReason::StartTimeout | EndReason::Policy => {
                    outbound
                        .close(close::POLICY, "no valid session.start")
                        .await
                }
                EndReason::ClientEnded => outbound.close(close::NORMAL, "session ended").await,
                _ => {}
            }
            drop(outbound);
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            session::abandon(&state, upgrade, reason).await;
        }
    }
}

/// Largest audio frame protocol v1 sends, in milliseconds (docs/protocol.md, section 4.3).
pub const MAX_FRAME_MS: u32 = 100;

/// `event` as a v1 text frame.
pub fn render_event(event: Event) -> Message {
    Message::Text(events::server_event(event).to_json().into())
}

/// Queues a piece of reply audio as binary frames of at most [`MAX_FRAME_MS`] at `rate`
/// (whole samples), without copying it.
pub fn send_audio(tx: &OutboundTx, pcm: Bytes, rate: u32) -> Result<(), SendError> {
    let max = (rate * MAX_FRAME_MS / 1000).max(1) as usize * 2;
    let mut offset = 0;
    while offset < pcm.len() {
        let end = (offset + max).min(pcm.len());
        tx.frame(Message::Binary(pcm.slice(offset..end)))?;
        offset = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn a_piece_of_audio_goes_out_as_frames_of_at_most_100_ms() {
        let (tx, mut rx) = mpsc::channel(16);
        let out = OutboundTx::new(tx);
        // 250 ms at 8 kHz: 100 + 100 + 50 ms, whole samples.
        send_audio(&out, Bytes::from(vec![7u8; 4000]), 8000).unwrap();
        drop(out);
        let mut sizes = Vec::new();
        while let Some(super::super::writer::Outbound::Frame(Message::Binary(b))) = rx.recv().await
        {
            sizes.push(b.len());
        }
        assert_eq!(sizes, [1600, 1600, 800]);
    }
}
