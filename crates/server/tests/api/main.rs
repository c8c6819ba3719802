//! Integration tests: the real server on a loopback port, wired to the provider fakes, driven
//! by the real client library.

mod auth;
mod browser;
mod budget;
mod client;
mod cluster;
mod durability;
mod edge;
mod faults;
mod gateway;
mod helpers;
mod mcp;
mod observability;
mod pipeline;
mod preemptive;
mod protocol;
mod records;
mod timers;
mod tools;
mod traces;
mod twilio;
