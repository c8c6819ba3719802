//! What passes between a connection that completed its handshake and the session it joins.

use crate::auth::Identity;
use crate::cluster::Owned;
use crate::transport::{Link, Start};

/// A client connection that completed its transport's handshake.
pub struct Connection {
    /// The connection's reader and writer.
    pub link: Link,
    /// What it asked for.
    pub start: Start,
    /// Who connected.
    pub identity: Identity,
    /// Scale-out: the pending claim this resume commits once attached.
    pub claim: Option<Owned>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("user_id", &self.identity.user_id)
            .field("transport", &self.start.kind)
            .finish_non_exhaustive()
    }
}
