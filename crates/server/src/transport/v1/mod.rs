//! Protocol v1: the project's own WebSocket protocol (docs/protocol.md), JSON events and
//! binary PCM frames.

pub mod events;
pub mod writer;
