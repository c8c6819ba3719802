//! The transports a session can be reached by. Each one owns its wire: how a client connects
//! and starts, how its frames are parsed, and how the session's [`Event`]s and audio are
//! written. The session driver in between speaks neither.
//!
//! [`Event`]: atlas_core::session::Event

pub mod twilio;
pub mod v1;
