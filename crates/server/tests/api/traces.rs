//! OpenTelemetry traces: exported over OTLP/HTTP to a receiver on loopback that decodes the
//! protobuf bodies with the OpenTelemetry protocol's own types.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tracing_subscriber::layer::SubscriberExt as _;

use atlas_protocol::ServerEvent;
use atlas_server::telemetry::{Tracing, Transport};

use crate::helpers::*;

/// An OTLP/HTTP receiver: every span it was sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    /// Listens on loopback; returns the traces endpoint.
    async fn start(&self) -> String {
        let spans = self.spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut spans = spans.lock().unwrap();
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans);
                    }
                }
                axum::http::StatusCode::OK
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/v1/traces")
    }

    fn named(&self, name: &str) -> Vec<Span> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }
}

fn ms(span: &Span) -> f64 {
    (span.end_time_unix_nano - span.start_time_unix_nano) as f64 / 1e6
}

/// Every text in the span's attributes and events.
fn texts(span: &Span) -> Vec<String> {
    let values = span
        .attributes
        .iter()
        .chain(span.events.iter().flat_map(|e| e.attributes.iter()));
    values
        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Any::StringValue(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_spoken_turn_is_a_span_under_its_session_with_its_stages_as_the_client_sees_them() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let tracing = Tracing::install(Transport::HttpProtobuf, Some(&endpoint)).unwrap();
    // This test's runtime has one thread: the session's tasks run on it, under this subscriber.
    let _subscriber =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(tracing.layer()));

    let app = spawn_app().await;
    let (mut conn, session_id) = app.start("trace-user", 24_000).await;
    let streaming = stream(&conn, with_silence(speech("question_16k.wav"), 1.5), 1.0);
    let items = collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
    streaming.abort();
    end_session(&mut conn).await;
    let (heard, latency) =
        items
            .iter()
            .filter_map(event)
            .fold((String::new(), None), |(heard, latency), e| match e {
                ServerEvent::TranscriptFinal { text, .. } => (text.clone(), latency),
                ServerEvent::ResponseDone { latency_ms, .. } => (heard, Some(latency_ms.clone())),
                _ => (heard, latency),
            });
    let latency = latency.expect("response.done");

    // The batch leaves on the exporter's own thread; a flush waits for it (off this one).
    let tracing = Arc::new(tracing);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while receiver.named("session").is_empty() || receiver.named("voice.turn").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no spans arrived");
        let t = tracing.clone();
        tokio::task::spawn_blocking(move || t.flush())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let session = receiver
        .named("session")
        .into_iter()
        .find(|s| texts(s).contains(&session_id))
        .expect("the session's span, with its id");
    let turns = receiver.named("voice.turn");
    assert_eq!(turns.len(), 1, "one span per turn");
    let turn = &turns[0];
    assert_eq!(
        (&turn.trace_id, &turn.parent_span_id),
        (&session.trace_id, &session.span_id),
        "the turn is a child of its session"
    );
    // Each stage lasts what the client was told, and lies within its turn.
    for (name, figure) in [
        ("voice.stt", latency.end_of_speech_to_final),
        ("voice.llm", latency.llm_first_token),
        ("voice.tts", latency.tts_first_audio),
    ] {
        let spans = receiver.named(name);
        assert_eq!(spans.len(), 1, "{name}");
        let stage = &spans[0];
        assert_eq!(
            stage.parent_span_id, turn.span_id,
            "{name} is a child of the turn"
        );
        let figure = figure.unwrap_or_else(|| panic!("{name}: no figure in {latency:?}")) as f64;
        assert!(
            (ms(stage) - figure).abs() <= 1.0,
            "{name} lasts {:.1} ms, the client was told {figure} ms",
            ms(stage)
        );
        assert!(
            stage.start_time_unix_nano >= turn.start_time_unix_nano
                && stage.end_time_unix_nano <= turn.end_time_unix_nano,
            "{name} within the turn"
        );
    }
    let llm = &receiver.named("voice.llm")[0];
    assert!(
        texts(llm).contains(&"chat".to_owned()),
        "{:?}",
        llm.attributes
    );
    // No words and no user: neither the transcript nor the user id is in any span.
    assert!(!heard.trim().is_empty());
    for span in receiver.spans.lock().unwrap().iter() {
        for text in texts(span) {
            assert!(
                !text.contains("trace-user") && !text.contains(heard.trim()),
                "span {} carries {text:?}",
                span.name
            );
        }
    }
}
