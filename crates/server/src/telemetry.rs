//! OpenTelemetry traces over OTLP, off unless an endpoint is configured the standard way
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SDK_DISABLED=true`
//! turns them off again).
//!
//! The exporter speaks HTTP/protobuf, or gRPC when `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` is
//! `grpc`; it reads the other standard variables itself (headers, timeout, compression), and
//! the SDK reads `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`
//! and `OTEL_BSP_*`. Spans are batched on the SDK's own thread through a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, 2,048 by default): a collector that is down or slow costs a
//! session nothing, and spans beyond the queue are dropped. The SDK counts none of this, so
//! the queue is bounded here too ([`Bounded`], [`Counted`]): every span is counted in
//! `atlas_trace_spans_total` as exported, dropped at a full queue, or lost in a failed export.
//!
//! Sampling is decided once per session, when it starts ([`session_span`]), by the sampler
//! the environment configures (`OTEL_TRACES_SAMPLER`; by default every session, or as the
//! client's `traceparent` says). The `tracing` spans join the trace ([`Tracing::layer`]): a
//! traced session's `session` span is the session's span, the child of the client's trace
//! when `session.start` carried a `traceparent`; its provider requests carry its trace
//! context onwards. A session the sampler leaves out has a span the trace layer never sees,
//! so tracing costs it nothing.
//!
//! Each turn adds a `voice.turn` span under it with a child per stage of the
//! latency breakdown ([`turn_spans`]), built from the same instants and durations as the
//! `latency_ms` the client receives and the `voice_turns` row, so the three agree. Spans
//! carry no transcript or reply text, and the user only as a hash, unless the operator
//! enables content (`ATLAS_TRACE_CONTENT`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, IdGenerator as _, RandomIdGenerator, Sampler,
    SamplingDecision, SdkTracerProvider, ShouldSample, SpanData, SpanProcessor,
};
use sha2::Digest as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use atlas_core::session::{ToolLog, TurnLog};

use crate::session::response::{RequestTrace, Requested};

/// The instrumentation scope of every span.
pub const SCOPE: &str = "atlas-voice";

/// The target of the spans of traced sessions: the trace layer sees no other.
const TRACED: &str = "atlas_server::session::traced";

/// Decides, when a session starts, whether it is traced; `None` while tracing is off.
static HEAD: RwLock<Option<Box<dyn ShouldSample>>> = RwLock::new(None);

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
        let max_queue = match std::env::var("OTEL_BSP_MAX_QUEUE_SIZE") {
            Ok(v) => v.trim().parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                anyhow::anyhow!("OTEL_BSP_MAX_QUEUE_SIZE {v:?} is not a positive number")
            })?,
            Err(_) => DEFAULT_MAX_QUEUE,
        };
        Tracing::install(transport, None, max_queue, None).map(Some)
    }

    /// Installs tracing to `endpoint` (the environment's when `None`), holding at most
    /// `max_queue` spans that wait for the collector, and tracing the sessions `sampler`
    /// keeps (the environment's `OTEL_TRACES_SAMPLER` when `None`). Must run inside the Tokio
    /// runtime (gRPC connects lazily on it).
    pub fn install(
        transport: Transport,
        endpoint: Option<&str>,
        max_queue: usize,
        sampler: Option<Sampler>,
    ) -> anyhow::Result<Tracing> {
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
        let waiting = Arc::new(AtomicUsize::new(0));
        let exporter = Counted {
            inner: exporter,
            waiting: waiting.clone(),
        };
        let batch = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(max_queue)
                    .with_max_export_batch_size(max_queue.min(DEFAULT_MAX_BATCH))
                    .build(),
            )
            .build();
        let head: Box<dyn ShouldSample> = match sampler {
            Some(s) => Box::new(s),
            None => opentelemetry_sdk::trace::Config::default().sampler,
        };
        *HEAD.write().unwrap_or_else(PoisonError::into_inner) = Some(head);
        let provider = SdkTracerProvider::builder()
            // The session's sampling was decided when it started: all its spans are kept.
            .with_sampler(Sampler::AlwaysOn)
            .with_span_processor(Bounded {
                inner: batch,
                waiting,
                max_queue,
            })
            .with_resource(resource.build())
            .build();
        global::set_tracer_provider(provider.clone());
        global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        Ok(Tracing { provider })
    }

    /// The layer that makes the spans of traced sessions OpenTelemetry spans, with a filter
    /// of its own: the log level (`RUST_LOG`) must filter only the log's layer, or
    /// `RUST_LOG=warn` would disable the session spans and with them every trace. Log events
    /// are not copied into spans: some name the user.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        // A session's span is entered at every poll of its task: keeping busy and idle time
        // (and thread and source location), or making its context current for
        // OpenTelemetry's own API, on every enter costs more than exporting. Spans are
        // parented and propagated through `tracing` alone.
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(SCOPE))
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_threads(false)
            .with_location(false)
            .with_filter(
                tracing_subscriber::filter::filter_fn(|meta| {
                    meta.is_span() && meta.target() == TRACED
                })
                // Without a hint the subscriber's level would be `trace`, and every `debug`
                // and `trace` callsite (and `log` record) in the process a runtime check.
                .with_max_level_hint(tracing::Level::INFO),
            )
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

/// The process's subscriber: the log in `format`, filtered by `filter` (`RUST_LOG`), and with
/// `traces` the trace layer beside it, which the log's filter does not touch.
pub fn subscriber(
    format: crate::config::LogFormat,
    filter: tracing_subscriber::EnvFilter,
    traces: Option<&Tracing>,
) -> impl tracing::Subscriber + Send + Sync + use<> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let fmt = tracing_subscriber::fmt::layer();
    let fmt = match format {
        crate::config::LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        crate::config::LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(traces.map(|t| t.layer()))
}

/// The SDK's default bound on spans waiting for the collector (`OTEL_BSP_MAX_QUEUE_SIZE`).
const DEFAULT_MAX_QUEUE: usize = 2_048;
/// The SDK's default largest export (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
const DEFAULT_MAX_BATCH: usize = 512;

/// The batch processor behind a count of the spans it holds: a span that would exceed
/// `max_queue` is dropped here, and counted, before the SDK's own queue (of the same size,
/// which therefore never overflows) could drop it uncounted.
#[derive(Debug)]
struct Bounded {
    inner: BatchSpanProcessor,
    /// Spans handed to `inner` and not yet exported or lost ([`Counted`] settles them).
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
}

impl SpanProcessor for Bounded {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            crate::metrics::trace_spans("queue_full", 1);
            return;
        }
        self.inner.on_end(span);
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The exporter, settling [`Bounded`]'s count for every batch it was given: exported, or
/// lost when the collector refused it, failed or the export was abandoned.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    waiting: Arc<AtomicUsize>,
}

/// Settles a batch when dropped, so an abandoned export is counted too.
struct Settle<'a> {
    waiting: &'a AtomicUsize,
    spans: usize,
    exported: bool,
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        self.waiting.fetch_sub(self.spans, Ordering::AcqRel);
        let outcome = if self.exported {
            "exported"
        } else {
            "export_failed"
        };
        crate::metrics::trace_spans(outcome, self.spans);
    }
}

impl<E: opentelemetry_sdk::trace::SpanExporter> opentelemetry_sdk::trace::SpanExporter
    for Counted<E>
{
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut settle = Settle {
            waiting: &self.waiting,
            spans: batch.len(),
            exported: false,
        };
        let result = self.inner.export(batch).await;
        settle.exported = result.is_ok();
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// One `traceparent` value, read as the W3C propagator reads headers.
struct Traceparent<'a>(&'a str);

impl Extractor for Traceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// A session's span, and what it carries when it moves.
pub struct SessionSpan {
    /// The span the session's task runs in.
    pub span: tracing::Span,
    /// For a session the sampler left out (while tracing is on): its trace as a W3C
    /// `traceparent` that says so, for the instance it may move to (a traced session's span
    /// gives its own, [`traceparent`]).
    pub left_out: Option<String>,
}

/// A session's span, under `parent` (a W3C `traceparent`: the client's, or the session's own
/// on the instance it moved from) when that is valid. Whether the session is traced is
/// decided here, once: a session the sampler leaves out gets a span the trace layer never
/// sees (the span is entered at every poll of the session's task), whose work is not traced
/// and carries no trace context onwards.
pub fn session_span(session_id: &str, parent: Option<&str>) -> SessionSpan {
    let parent = parent.and_then(context_of);
    let head = HEAD.read().unwrap_or_else(PoisonError::into_inner);
    let decision = head
        .as_ref()
        .map(|sampler| judge(sampler.as_ref(), parent.as_ref()));
    drop(head);
    let untraced = || tracing::info_span!(target: "atlas_server::session", "session", session_id = %session_id);
    let (span, left_out) = match decision {
        Some(Decision::Traced) => {
            let span = tracing::info_span!(target: TRACED, "session", session_id = %session_id);
            if let Some(cx) = parent {
                let _ = span.set_parent(cx);
            }
            (span, None)
        }
        Some(Decision::LeftOut(trace_id)) => (untraced(), Some(left_out(trace_id))),
        None => (untraced(), None),
    };
    SessionSpan { span, left_out }
}

/// What the sampler decided for a session.
#[derive(Debug, PartialEq)]
enum Decision {
    Traced,
    /// Not traced; its trace's id (the parent's, or one made up for the decision).
    LeftOut(opentelemetry::trace::TraceId),
}

/// Whether `sampler` keeps a session under `parent`.
fn judge(sampler: &dyn ShouldSample, parent: Option<&Context>) -> Decision {
    let trace_id = parent.map_or_else(
        || RandomIdGenerator::default().new_trace_id(),
        |cx| cx.span().span_context().trace_id(),
    );
    let result = sampler.should_sample(parent, trace_id, "session", &SpanKind::Internal, &[], &[]);
    if result.decision == SamplingDecision::RecordAndSample {
        Decision::Traced
    } else {
        Decision::LeftOut(trace_id)
    }
}

/// A `traceparent` of trace `trace_id` that says it is not sampled.
fn left_out(trace_id: opentelemetry::trace::TraceId) -> String {
    format!(
        "00-{trace_id}-{}-00",
        RandomIdGenerator::default().new_span_id()
    )
}

/// The trace context a W3C `traceparent` names, when it is valid.
fn context_of(traceparent: &str) -> Option<Context> {
    use opentelemetry::propagation::TextMapPropagator as _;
    let cx = opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .extract(&Traceparent(traceparent));
    cx.span().span_context().is_valid().then_some(cx)
}

/// `span`'s trace context as a W3C `traceparent`, when it is traced (for the session's span
/// on another instance).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut fields = std::collections::HashMap::new();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut fields));
    fields.remove("traceparent")
}

/// Names the session's user on its span: a hash of the id (the same for the same user
/// everywhere, so an operator who knows the id can find the sessions), or the id itself
/// when the operator enables content.
pub fn identify(span: &tracing::Span, user_id: &str, content: bool) {
    if !recorded(&span.context()) {
        return;
    }
    if content {
        span.set_attribute("user.id", user_id.to_owned());
    } else {
        let digest = sha2::Sha256::digest(user_id.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        span.set_attribute("enduser.pseudo.id", hex);
    }
}

/// Whether the current session's spans are kept (see [`recorded`]).
pub fn traced() -> bool {
    recorded(&tracing::Span::current().context())
}

/// Whether spans under `cx` are kept: tracing is on and the session's trace was sampled (a
/// session left out by the sampler costs its turns nothing).
fn recorded(cx: &Context) -> bool {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid() && sc.is_sampled()
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
/// latency breakdown, each lasting exactly that figure, and `voice.playout` for the reply's
/// audio as the listener heard it; under it too, each provider request the turn made and each
/// tool call (held until now, see [`HeldSpans`]). The turn's words only when `content` is on.
/// Costs nothing when tracing is off.
pub fn turn_spans(
    log: &TurnLog,
    model: (&'static str, &str),
    content: bool,
    tools: &mut HeldSpans,
) {
    let parent = tracing::Span::current().context();
    if !recorded(&parent) {
        return;
    }
    tools.ended = tools.ended.max(log.turn_id);
    let tracer = global::tracer(SCOPE);
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let at = |i: Instant| wall(i, now, wall_now);
    let l = &log.latency;
    let ms = |d: Duration| d.as_millis() as i64;
    let anchor = log.end_of_speech.unwrap_or(log.started);
    // When the turn was heard: its reply started then, or after waiting in the server.
    let heard = log.started.checked_sub(log.queued).unwrap_or(log.started);
    let mut attributes = vec![
        KeyValue::new("voice.turn.id", log.turn_id as i64),
        KeyValue::new("voice.turn.outcome", log.outcome),
        KeyValue::new("voice.turn.interrupted", log.interrupted),
        KeyValue::new("voice.turn.spoken", log.end_of_speech.is_some()),
    ];
    if content {
        attributes.push(KeyValue::new("voice.user.text", log.user_text.clone()));
        attributes.push(KeyValue::new(
            "voice.assistant.text",
            log.assistant_text.clone(),
        ));
    }
    for (stage, figure) in l.stages() {
        if let Some(d) = figure {
            attributes.push(KeyValue::new(format!("voice.latency.{stage}_ms"), ms(d)));
        }
    }
    let turn = tracer
        .span_builder("voice.turn")
        .with_kind(SpanKind::Internal)
        .with_start_time(at(anchor.min(heard)))
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
    if !log.queued.is_zero() {
        child("voice.queued", heard, log.queued, Vec::new());
    }
    if let Some(d) = l.llm_first_token {
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.provider.name", model.0),
            KeyValue::new("gen_ai.request.model", model.1.to_owned()),
        ];
        let t = &log.tokens;
        for (name, count) in [
            ("gen_ai.usage.input_tokens", t.input),
            ("gen_ai.usage.output_tokens", t.output),
            ("gen_ai.usage.cache_read.input_tokens", t.cache_read),
            ("gen_ai.usage.cache_creation.input_tokens", t.cache_write),
        ] {
            if let Some(n) = count {
                attributes.push(KeyValue::new(name, n as i64));
            }
        }
        child("voice.llm", log.started, d, attributes);
    }
    if let (Some(first_audio), Some(d)) = (l.to_first_audio, l.tts_first_audio) {
        // Synthesis of the first piece ends with the first audio.
        let heard = anchor + first_audio;
        child(
            "voice.tts",
            heard.checked_sub(d).unwrap_or(anchor),
            d,
            vec![KeyValue::new("voice.tts.characters", log.tts_chars as i64)],
        );
    }
    if let Some(first_audio) = log.first_audio {
        child(
            "voice.playout",
            first_audio,
            log.audio_heard,
            vec![KeyValue::new("voice.playout.heard_ms", ms(log.audio_heard))],
        );
    }
    for (_, request) in tools.requests.extract_if(.., |(t, _)| *t <= log.turn_id) {
        request_span(&request, model, &tracer, &cx, at(log.ended), at);
    }
    let calls: Vec<ToolTrace> = tools
        .calls
        .extract_if(.., |c| c.turn_id <= log.turn_id)
        .collect();
    if let Some(d) = l.tools {
        // From the first call's request, as long as all rounds' waits together.
        let first = calls
            .iter()
            .filter(|c| c.turn_id == log.turn_id)
            .map(|c| c.started)
            .min();
        child("voice.tools", first.unwrap_or(log.started), d, Vec::new());
    }
    for call in calls {
        let mut span = tracer
            .span_builder("voice.tool")
            .with_start_time(at(call.started))
            .with_attributes(call.attributes)
            .start_with_context(
                &tracer,
                if call.turn_id == log.turn_id {
                    &cx
                } else {
                    &parent
                },
            );
        span.end_with_timestamp(at(call.started + call.took));
    }
    // The turn lasts until its reply was heard, which may be after the reply was sent.
    let heard_until = log.first_audio.map(|f| f + log.audio_heard);
    cx.span()
        .end_with_timestamp(at(heard_until.map_or(log.ended, |h| h.max(log.ended))));
}

/// One provider request's span under its turn's: a model request (`chat {model}`, from the
/// request to the end of its answer, with the usage it reported and its time to first token)
/// or a synthesis request (`voice.tts.request`: characters, time to first audio). One still
/// going when its reply ended lasts until its turn ends (`turn_end`).
fn request_span(
    request: &RequestTrace,
    model: (&'static str, &str),
    tracer: &global::BoxedTracer,
    cx: &Context,
    turn_end: SystemTime,
    at: impl Fn(Instant) -> SystemTime,
) {
    let first_ms = |first: Option<Instant>| {
        first.map(|f| f.saturating_duration_since(request.started).as_millis() as i64)
    };
    let (name, mut attributes) = match &request.kind {
        Requested::Model { round, usage } => {
            let mut attributes = vec![
                KeyValue::new("gen_ai.operation.name", "chat"),
                KeyValue::new("gen_ai.provider.name", model.0),
                KeyValue::new("gen_ai.request.model", model.1.to_owned()),
                KeyValue::new("voice.llm.round", i64::from(*round)),
            ];
            for (name, count) in [
                ("gen_ai.usage.input_tokens", usage.input_tokens),
                ("gen_ai.usage.output_tokens", usage.output_tokens),
            ] {
                if let Some(n) = count {
                    attributes.push(KeyValue::new(name, n as i64));
                }
            }
            if let Some(ms) = first_ms(request.first) {
                attributes.push(KeyValue::new("voice.llm.first_token_ms", ms));
            }
            (format!("chat {}", model.1), attributes)
        }
        Requested::Synthesis { chars } => {
            let mut attributes = vec![KeyValue::new("voice.tts.characters", *chars as i64)];
            if let Some(ms) = first_ms(request.first) {
                attributes.push(KeyValue::new("voice.tts.first_audio_ms", ms));
            }
            ("voice.tts.request".to_owned(), attributes)
        }
    };
    attributes.push(KeyValue::new(
        "voice.request.complete",
        request.ended.is_some(),
    ));
    let start = at(request.started);
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Client)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, cx);
    span.end_with_timestamp(request.ended.map_or(turn_end, &at).max(start));
}

/// Spans waiting for their turn to end, to be traced as its children: tool calls, and the
/// provider requests of its reply.
#[derive(Debug, Default)]
pub struct HeldSpans {
    calls: Vec<ToolTrace>,
    requests: Vec<(u64, RequestTrace)>,
    /// The last turn traced.
    ended: u64,
}

impl HeldSpans {
    /// The provider requests of the reply to `turn_id` (a preemptive reply discarded counts
    /// for the turn it was made for), within [`MAX_HELD_CALLS`] a turn.
    pub fn requests(&mut self, turn_id: u64, requests: Vec<RequestTrace>) {
        if turn_id <= self.ended {
            return;
        }
        let room = MAX_HELD_CALLS.saturating_sub(self.requests.len());
        self.requests
            .extend(requests.into_iter().take(room).map(|r| (turn_id, r)));
    }
}

/// Calls a turn holds at most; beyond it (or once the turn is traced) a call is traced under
/// the session at once.
const MAX_HELD_CALLS: usize = 64;

#[derive(Debug)]
struct ToolTrace {
    turn_id: u64,
    attributes: Vec<KeyValue>,
    started: Instant,
    took: Duration,
}

/// A tool call's span: held for its turn's span (see [`HeldSpans`]).
pub fn tool_span(log: &ToolLog, mcp_server: Option<&str>, tools: &mut HeldSpans) {
    let parent = tracing::Span::current().context();
    if !recorded(&parent) {
        return;
    }
    let mut attributes = vec![
        KeyValue::new("voice.turn.id", log.turn_id as i64),
        KeyValue::new("gen_ai.operation.name", "execute_tool"),
        KeyValue::new("gen_ai.tool.name", crate::session::truncate(&log.name, 64)),
        KeyValue::new("voice.tool.outcome", log.outcome.label()),
    ];
    if let Some(kind) = log.kind {
        attributes.push(KeyValue::new("voice.tool.kind", kind.label()));
    }
    if let Some(server) = mcp_server {
        attributes.push(KeyValue::new("voice.tool.mcp_server", server.to_owned()));
    }
    let call = ToolTrace {
        turn_id: log.turn_id,
        attributes,
        started: log.started,
        took: log.duration,
    };
    if log.turn_id > tools.ended && tools.calls.len() < MAX_HELD_CALLS {
        tools.calls.push(call);
        return;
    }
    let tracer = global::tracer(SCOPE);
    let (now, wall_now) = (Instant::now(), SystemTime::now());
    let start = wall(call.started, now, wall_now);
    let mut span = tracer
        .span_builder("voice.tool")
        .with_start_time(start)
        .with_attributes(call.attributes)
        .start_with_context(&tracer, &parent);
    span.end_with_timestamp(start + call.took);
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

    #[test]
    fn a_session_left_out_is_left_out_again_where_it_moves() {
        // Half the traces, by their id: a new random id on the next instance would give the
        // session a second chance.
        let sampler = Sampler::TraceIdRatioBased(0.5);
        let (mut traced, mut left) = (0, 0);
        for _ in 0..64 {
            let Decision::LeftOut(trace_id) = judge(&sampler, None) else {
                traced += 1;
                continue;
            };
            left += 1;
            let carried = context_of(&left_out(trace_id)).expect("a valid traceparent");
            let sc = carried.span().span_context().clone();
            assert_eq!(sc.trace_id(), trace_id);
            assert!(!sc.is_sampled());
            assert_eq!(judge(&sampler, Some(&carried)), Decision::LeftOut(trace_id));
            // A parent-based sampler follows the flag.
            let parent_based = Sampler::ParentBased(Box::new(Sampler::AlwaysOn));
            assert_eq!(
                judge(&parent_based, Some(&carried)),
                Decision::LeftOut(trace_id)
            );
        }
        assert!(traced > 0 && left > 0, "{traced} traced, {left} left out");
        assert!(context_of("00-00000000000000000000000000000000-0000000000000000-01").is_none());
        assert!(context_of("not a traceparent").is_none());
    }
}
