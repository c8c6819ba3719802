//! What passes between a connection that completed its handshake and the session it joins.

use axum::extract::ws::WebSocket;
use futures_util::stream::SplitStream;
use tokio::task::JoinHandle;

use atlas_protocol::SessionStart;

use crate::auth::Identity;
use crate::cluster::Owned;
use crate::transport::v1::writer::{OutboundTx, WriterExit};

/// A client connection that completed the `session.start` handshake.
pub struct Connection {
    /// Frames from the client.
    pub stream: SplitStream<WebSocket>,
    /// Queue to the client.
    pub outbound: OutboundTx,
    /// The writer task draining that queue.
    pub writer: JoinHandle<WriterExit>,
    /// The client's `session.start`.
    pub start: SessionStart,
    /// Who connected.
    pub identity: Identity,
    /// Scale-out: the pending claim this resume commits once attached.
    pub claim: Option<Owned>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("user_id", &self.identity.user_id)
            .finish_non_exhaustive()
    }
}
