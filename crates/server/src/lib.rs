//! The atlas-voice server: HTTP and WebSocket front, sessions, and the glue between the
//! sans-IO core and the provider adapters.
//!
//! # Layout
//! - [`config`]: layered configuration and its validation.
//! - [`auth`]: access-token verification and credential extraction.
//! - [`catalog`]: the price catalog.
//! - [`cluster`]: scale-out through Redis: leases, fenced ownership, replicated resume state,
//!   daily budget.
//! - [`engines`]: builds the provider adapters from the configuration.
//! - [`admission`]: before the upgrade, whether a connection may start or resume a session.
//! - [`state`]: the shared state handed to handlers and sessions.
//! - [`app`]: router, listener, the checks before the upgrade, graceful drain.
//! - [`handoff`]: a connection that completed its handshake, on its way to its session.
//! - [`client_addr`]: the client's address behind trusted proxies, and the per-address
//!   connection limiter.
//! - [`edge`]: accepting connections: header timeout, unauthenticated-connection cap,
//!   WebSocket message size and completion limits.
//! - [`registry`]: per-user admission, capacity and the resume directory.
//! - [`recorder`]: session records to the database, or the spool while it is down.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`session`]: the driver of one session — handshake, then the loop that feeds the core's
//!   session machine and carries out its decisions; replies; the outbound writer.
//! - [`error`]: refusals before the upgrade, as HTTP statuses with JSON bodies.

pub mod admission;
pub mod app;
pub mod auth;
pub mod catalog;
pub mod client_addr;
pub mod cluster;
pub mod config;
pub mod edge;
pub mod engines;
pub mod error;
pub mod handoff;
pub mod mcp;
pub mod metrics;
pub mod recorder;
pub mod registry;
pub mod session;
pub mod state;
pub mod telemetry;
pub mod tools;
pub mod transport;

pub use app::Application;
pub use config::Config;
pub use engines::Engines;
