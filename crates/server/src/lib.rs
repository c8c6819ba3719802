//! The atlas-voice server: HTTP and WebSocket front, sessions, and the glue between the
//! sans-IO core and the provider adapters.
//!
//! # Layout
//! - [`config`]: layered configuration and its validation.
//! - [`auth`]: access-token verification and credential extraction.
//! - [`catalog`]: the price catalog.
//! - [`client_addr`]: the client's address behind trusted proxies, and the per-address
//!   connection limiter.
//! - [`cluster`]: scale-out through Redis: leases, daily budget, resume directory.
//! - [`engines`]: builds the provider adapters from the configuration.
//! - [`app`]: application state, router, listener and graceful drain.
//! - [`edge`]: accepting connections: header timeout, unauthenticated-connection cap,
//!   WebSocket message size and completion limits.
//! - [`registry`]: per-user admission, capacity and the resume directory.
//! - [`recorder`]: session records to the database, or the spool while it is down.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`session`]: one session — handshake, session loop (which outlives connections for
//!   resume), replies, the outbound writer.
//! - [`error`]: refusals before the upgrade, as HTTP statuses with JSON bodies.

pub mod app;
pub mod auth;
pub mod catalog;
pub mod client_addr;
pub mod cluster;
pub mod config;
pub mod edge;
pub mod engines;
pub mod error;
pub mod metrics;
pub mod recorder;
pub mod registry;
pub mod session;

pub use app::Application;
pub use config::Config;
pub use engines::Engines;
