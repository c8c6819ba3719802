//! Prometheus metrics. Labels come from bounded sets only: no user ids, no session ids, no
//! error strings.

use std::sync::{LazyLock, OnceLock};
use std::time::Duration;

use metrics::{Counter, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once); `None` if another recorder was
/// installed by an embedding program.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
            ];
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
}

/// Counters touched for every audio frame, resolved once.
pub struct AudioCounters {
    /// Frames received from clients.
    pub frames_in: Counter,
    /// Bytes received from clients.
    pub bytes_in: Counter,
    /// Frames sent to clients.
    pub frames_out: Counter,
    /// Bytes sent to clients.
    pub bytes_out: Counter,
    /// Input frames dropped because the recogniser fell behind or was unreachable for long.
    pub frames_dropped: Counter,
}

/// The audio counters (created after [`install`]).
pub static AUDIO: LazyLock<AudioCounters> = LazyLock::new(|| AudioCounters {
    frames_in: counter!("atlas_audio_frames_in_total"),
    bytes_in: counter!("atlas_audio_bytes_in_total"),
    frames_out: counter!("atlas_audio_frames_out_total"),
    bytes_out: counter!("atlas_audio_bytes_out_total"),
    frames_dropped: counter!("atlas_audio_frames_dropped_total"),
});

/// Live and detached sessions of this instance.
pub fn sessions(active: usize, detached: usize) {
    gauge!("atlas_sessions_active").set(active as f64);
    gauge!("atlas_sessions_detached").set(detached as f64);
}

/// A session ended.
pub fn session_ended(reason: &'static str) {
    counter!("atlas_sessions_ended_total", "reason" => reason).increment(1);
}

/// A connection attempt was refused before the upgrade.
pub fn refused(reason: &'static str) {
    counter!("atlas_connections_refused_total", "reason" => reason).increment(1);
}

/// The edge closed a connection (bounded reasons: `header_timeout`, `message_timeout`,
/// `pending_evicted`).
pub fn edge_closed(reason: &'static str) {
    counter!("atlas_connections_closed_total", "reason" => reason).increment(1);
}

/// A session was resumed on this instance.
pub fn resumed() {
    counter!("atlas_sessions_resumed_total").increment(1);
}

/// A binary frame was rejected.
pub fn chunk_rejected(reason: &'static str) {
    counter!("atlas_audio_chunks_rejected_total", "reason" => reason).increment(1);
}

/// A text frame was rejected.
pub fn message_rejected(code: &'static str) {
    counter!("atlas_messages_rejected_total", "code" => code).increment(1);
}

/// A provider call failed.
pub fn provider_error(stage: &'static str, kind: &'static str) {
    counter!("atlas_provider_errors_total", "stage" => stage, "kind" => kind).increment(1);
}

/// One stage's latency in a turn.
pub fn stage_latency(stage: &'static str, d: Duration) {
    histogram!("atlas_stage_latency_seconds", "stage" => stage).record(d.as_secs_f64());
}

/// A tool call ended (`kind`: `server`, `client`, or `none` when refused before running).
pub fn tool_call(kind: &'static str, outcome: &'static str, d: Duration) {
    counter!("atlas_tool_calls_total", "kind" => kind, "outcome" => outcome).increment(1);
    histogram!("atlas_tool_call_seconds", "kind" => kind).record(d.as_secs_f64());
}

/// An MCP server connected (`up`) or went down.
pub fn mcp_server_up(server: &str, up: bool) {
    gauge!("atlas_mcp_server_up", "server" => server.to_owned()).set(if up { 1.0 } else { 0.0 });
}

/// Tools offered from an MCP server.
pub fn mcp_tools(server: &str, n: usize) {
    gauge!("atlas_mcp_tools", "server" => server.to_owned()).set(n as f64);
}

/// A call to an MCP server's tool answered (`ok`: a result, even one the tool marked as an
/// error) or failed after `d` (the server's own time plus the connection's).
pub fn mcp_call(server: &str, ok: bool, d: Duration) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!("atlas_mcp_calls_total", "server" => server.to_owned(), "outcome" => outcome)
        .increment(1);
    histogram!("atlas_mcp_call_seconds", "server" => server.to_owned()).record(d.as_secs_f64());
}

/// `n` spans left for the trace collector (`exported`), or were dropped: the queue to the
/// exporter was full (`queue_full`) or the collector refused or did not answer
/// (`export_failed`).
pub fn trace_spans(outcome: &'static str, n: usize) {
    counter!("atlas_trace_spans_total", "outcome" => outcome).increment(n as u64);
}

/// The end-of-turn model answered (or failed) after `d`.
pub fn turn_scored(d: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    counter!("atlas_turn_decisions_total", "outcome" => outcome).increment(1);
    histogram!("atlas_turn_decision_seconds").record(d.as_secs_f64());
}

/// A turn's reply ended.
pub fn turn(outcome: &'static str) {
    counter!("atlas_turns_total", "outcome" => outcome).increment(1);
}

/// A preemptive reply was kept as its turn's reply, or discarded.
pub fn preemptive_reply(kept: bool) {
    let outcome = if kept { "kept" } else { "discarded" };
    counter!("atlas_preemptive_replies_total", "outcome" => outcome).increment(1);
}

/// Session records that went to the spool instead of the database.
pub fn records_spooled(n: usize) {
    counter!("atlas_records_spooled_total").increment(n as u64);
}

/// Session records written to the database (checkpoints and final records).
pub fn records_written(n: usize) {
    counter!("atlas_records_written_total").increment(n as u64);
}

/// Session records the database refused for good, moved to the spool's quarantine.
pub fn records_quarantined(n: usize) {
    counter!("atlas_records_quarantined_total").increment(n as u64);
}

/// Whether the last database attempt of the record writer succeeded.
pub fn database_up(up: bool) {
    gauge!("atlas_database_up").set(if up { 1.0 } else { 0.0 });
}

/// Records waiting in the spool.
pub fn spool_records(n: usize) {
    gauge!("atlas_spool_records").set(n as f64);
}

/// Whether the operator allowed models without a price while budgets are set.
pub fn unpriced_models_allowed(allowed: bool) {
    gauge!("atlas_unpriced_models_allowed").set(if allowed { 1.0 } else { 0.0 });
}

/// Spend, in micro-dollars, by stage.
pub fn spend(stage: &'static str, micros: u64) {
    counter!("atlas_spend_microdollars_total", "stage" => stage).increment(micros);
}
