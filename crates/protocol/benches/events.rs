//! Microbenchmarks of event serialisation and message parsing: `cargo bench -p atlas-protocol`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use atlas_protocol::{LatencyBreakdown, ServerEvent, Usage, parse_client_message};

fn events(c: &mut Criterion) {
    let delta = ServerEvent::ResponseTextDelta {
        turn_id: 3,
        text: " weather".into(),
    };
    c.bench_function("serialise response.text.delta", |b| {
        b.iter(|| black_box(&delta).to_json())
    });
    let done = ServerEvent::ResponseDone {
        turn_id: 3,
        interrupted: false,
        latency_ms: LatencyBreakdown {
            end_of_speech_to_final: Some(150),
            llm_first_token: Some(300),
            tts_first_audio: Some(200),
            to_first_audio: Some(655),
            tools: None,
        },
    };
    c.bench_function("serialise response.done", |b| {
        b.iter(|| black_box(&done).to_json())
    });
    let usage = ServerEvent::Usage(Usage {
        cost_usd: Some(0.0123),
        stt_seconds: 12.4,
        llm_input_tokens: 830,
        llm_output_tokens: 64,
        tts_chars: 170,
    });
    c.bench_function("serialise usage", |b| {
        b.iter(|| black_box(&usage).to_json())
    });
    let ping = r#"{"type":"ping","id":42}"#;
    c.bench_function("parse ping", |b| {
        b.iter(|| parse_client_message(black_box(ping)))
    });
    let start = r#"{"type":"session.start","input_audio":{"encoding":"pcm_s16le","sample_rate":16000},"output_audio":{"encoding":"pcm_s16le","sample_rate":24000}}"#;
    c.bench_function("parse session.start", |b| {
        b.iter(|| parse_client_message(black_box(start)))
    });
}

criterion_group!(benches, events);
criterion_main!(benches);
