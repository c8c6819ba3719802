//! The sans-IO heart of atlas-voice: everything about a conversation that can be decided
//! without touching a socket, a file or the clock.
//!
//! # Layout
//! - [`turns`]: the turn state machine — end of turn, barge-in, backchannels.
//! - [`echo`]: telling the assistant's own voice, heard back through the microphone, from the
//!   person.
//! - [`history`]: the bounded conversation history sent to the LLM.
//! - [`splitter`]: cuts streamed LLM text into clauses and sentences for speech synthesis.
//! - [`resample`]: streaming sample-rate conversion of 16-bit PCM.
//! - [`cost`]: integer micro-dollar cost arithmetic and the budget rule.
//! - [`audio`]: PCM helpers, chunk validation and the audio clock that maps stream positions
//!   to arrival times.
//! - [`playout`]: when reply audio goes out (a bounded lead ahead of playback, in few large
//!   pieces) and which of its sentences were heard.
//! - [`uplink`]: which client audio frames may wait to reach the recogniser in one message.
//! - [`latency`]: per-turn timestamps and the latency breakdown derived from them.
//! - [`timers`]: heartbeat, idle, maximum-duration, token-expiry and resume-window deadlines.
//! - [`tools`]: tool calls the model makes and their results (opaque text).
//! - [`session`]: the session machine — every decision about one session (attach, resume,
//!   abuse limits, timers, the cost ledger and budgets), driven by a thin IO driver.
//!
//! # Invariants
//! - No IO and no `Instant::now()`: time is always an argument, so tests are deterministic and
//!   run faster than real time.
//! - No knowledge of JSON or of any provider's wire format (tool arguments and results pass
//!   through as opaque text; the driver checks them against their schemas).

pub mod audio;
pub mod cost;
pub mod echo;
pub mod history;
pub mod latency;
pub mod playout;
pub mod resample;
pub mod session;
pub mod splitter;
pub mod timers;
pub mod tools;
pub mod turns;
pub mod uplink;
pub mod vocab;
