//! OpenTelemetry traces over OTLP, off unless an endpoint is configured the standard way
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true`
//! turns them off again).
//!
//! The exporter speaks HTTP/protobuf, or gRPC when `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` is
//! `grpc`; it reads the other standard variables itself (headers, timeout, compression), and
//! the SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`
//! and `OTEL_BSP_*`. Spans are batched on the SDK's own thread through a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 by default): a collector that is down or slow costs a
//! session nothing, and spans beyond the queue are dropped.
//!
//! The `tracing` spans join the trace ([`Tracing::layer`]): each session's `session` span is
//! the session's span. Each turn adds a `voice.turn` span under it with a child per stage of
//! the latency breakdown ([`turn_spans`]), built from the same instants and durations as the
//! `latency_ms` the client receives and the `voice_turns` row, so the three agree. Spans
//! carry no transcript or reply text and no user id.

use std::time::{Duration, Instant, SystemTime};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use atlas_core::session::{ToolLog, TurnLog};

/// The instrumentation scope of every span.
pub const SCOPE: &str = "atlas-voice";

/// How spans leave the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
    /// OTLP over gRPC.
    Grpc,
}

/// The installed tracer provider.
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Installs tracing when the environment configures an OTLP endpoint (`None` otherwise).
    pub fn from_env() -> anyhow::Result<Option<Tracing>> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
        if disabled
            || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        {
            return Ok(None);
        }
        let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            .unwrap_or_default();
        let transport = match protocol.trim() {
            "grpc" => Transport::Grpc,
            "" | "http/protobuf" => Transport::HttpProtobuf,
            other => anyhow::bail!(
                "OTEL_EXPORTER_OTLP_PROTOCOL {other:?} is not supported: use http/protobuf or grpc"
            ),
        };
        Tracing::install(transport, None).map(Some)
    }

    /// Installs tracing to `endpoint` (the environment's when `None`). Must run inside the
    /// Tokio runtime (gRPC connects lazily on it).
    pub fn install(transport: Transport, endpoint: Option<&str>) -> anyhow::Result<Tracing> {
        let exporter = match transport {
            Transport::HttpProtobuf => {
                let mut b = SpanExporter::builder()
                    .with_http()
                    .with_protocol(Protocol::HttpBinary);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                b.build()?
            }
            Transport::Grpc => {
                let mut b = SpanExporter::builder().with_tonic();
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                b.build()?
            }
        };
        let mut resource = Resource::builder()
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        let named = std::env::var_os("OTEL_SERVICE_NAME").is_some()
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|a| a.contains("service.name="));
        if !named {
            resource = resource.with_service_name("atlas-voice");
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        global::set_tracer_provider(provider.clone());
        global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(Tracing { provider })
    }

    /// The layer that makes `tracing` spans OpenTelemetry spans. Log events are not copied
    /// into them: some name the user.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SCOPE))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| meta.is_span()))
    }

    /// Exports what is queued (blocks up to 5 s: call it off the runtime's threads).
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }

    /// Exports what is queued and stops (blocks up to 5 s).
    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

/// `at` on the wall clock.
fn wall(at: Instant, now: Instant, wall_now: SystemTime) -> SystemTime {
    match now.checked_duration_since(at) {
        Some(ago) => wall_now - ago,
        None => wall_now + at.duration_since(now),
    }
}

/// The turn's spans, under the current `tracing` span (the session's): `voice.turn` from the
/// end of speech (or the reply's start) to the turn's end, and one child per figure of its
/// latency breakdown, each lasting exactly that figure. Costs nothing when tracing is off.
pub fn turn_spans(log: &TurnLog, model: (&'static str, &str)) {
    let parent = tracing::Span::current().context();
    if !parent.span().span_context().is_valid() {
        return;
    }
    let tracer = global::tracer(SCOPE);
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let at = |i: Instant| wall(i, now, wall_now);
    let l = &log.latency;
    let ms = |d: Duration| d.as_millis() as i64;
    let anchor = log.end_of_speech.unwrap_or(log.started);
    let mut attributes = vec![
        KeyValue::new("voice.turn.id", log.turn_id as i64),
        KeyValue::new("voice.turn.outcome", log.outcome),
        KeyValue::new("voice.turn.interrupted", log.interrupted),
    ];
    for (name, figure) in [
        (
            "voice.latency.end_of_speech_to_final_ms",
            l.end_of_speech_to_final,
        ),
        ("voice.latency.llm_first_token_ms", l.llm_first_token),
        ("voice.latency.tts_first_audio_ms", l.tts_first_audio),
        ("voice.latency.to_first_audio_ms", l.to_first_audio),
        ("voice.latency.tools_ms", l.tools),
    ] {
        if let Some(d) = figure {
            attributes.push(KeyValue::new(name, ms(d)));
        }
    }
    let turn = tracer
        .span_builder("voice.turn")
        .with_kind(SpanKind::Internal)
        .with_start_time(at(anchor.min(log.started)))
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    let cx = parent.with_span(turn);
    let child = |name: &'static str, start: Instant, took: Duration, attributes: Vec<KeyValue>| {
        let mut span = tracer
            .span_builder(name)
            .with_start_time(at(start))
            .with_attributes(attributes)
            .start_with_context(&tracer, &cx);
        span.end_with_timestamp(at(start) + took);
    };
    if let (Some(eos), Some(d)) = (log.end_of_speech, l.end_of_speech_to_final) {
        child("voice.stt", eos, d, Vec::new());
    }
    if let Some(d) = l.llm_first_token {
        child(
            "voice.llm",
            log.started,
            d,
            vec![
                KeyValue::new("gen_ai.operation.name", "chat"),
                KeyValue::new("gen_ai.provider.name", model.0),
                KeyValue::new("gen_ai.request.model", model.1.to_owned()),
            ],
        );
    }
    if let (Some(first_audio), Some(d)) = (l.to_first_audio, l.tts_first_audio) {
        // Synthesis of the first piece ends with the first audio.
        let heard = anchor + first_audio;
        child(
            "voice.tts",
            heard.checked_sub(d).unwrap_or(anchor),
            d,
            Vec::new(),
        );
    }
    if let Some(d) = l.tools {
        child("voice.tools", log.started, d, Vec::new());
    }
    cx.span().end_with_timestamp(at(log.ended));
}

/// A tool call's span, under the session's, ending now.
pub fn tool_span(log: &ToolLog, mcp_server: Option<&str>) {
    let parent = tracing::Span::current().context();
    if !parent.span().span_context().is_valid() {
        return;
    }
    let tracer = global::tracer(SCOPE);
    let end = SystemTime::now();
    let mut attributes = vec![
        KeyValue::new("voice.turn.id", log.turn_id as i64),
        KeyValue::new("gen_ai.tool.name", crate::session::truncate(&log.name, 64)),
        KeyValue::new("voice.tool.outcome", log.outcome.label()),
    ];
    if let Some(kind) = log.kind {
        attributes.push(KeyValue::new("voice.tool.kind", kind.label()));
    }
    if let Some(server) = mcp_server {
        attributes.push(KeyValue::new("voice.tool.mcp_server", server.to_owned()));
    }
    let mut span = tracer
        .span_builder("voice.tool")
        .with_start_time(end - log.duration)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    span.end_with_timestamp(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_onto_the_wall_clock_either_side_of_now() {
        let now = Instant::now();
        let wall_now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let s = Duration::from_secs;
        assert_eq!(wall(now - s(3), now, wall_now), wall_now - s(3));
        assert_eq!(wall(now + s(2), now, wall_now), wall_now + s(2));
        assert_eq!(wall(now, now, wall_now), wall_now);
    }
}
