//! Integration tests: the real server on a loopback port, wired to the provider fakes, driven
//! by the real client library.

mod faults;
mod helpers;
mod pipeline;
mod protocol;
