//! Microbenchmarks of the per-frame and per-token paths: `cargo bench -p atlas-core`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use atlas_core::audio::{pcm_from_le_bytes, rms_dbfs, validate_chunk};
use atlas_core::resample::StreamResampler;
use atlas_core::splitter::{SentenceSplitter, SplitterConfig};

fn frames(c: &mut Criterion) {
    let bytes: Vec<u8> = (0..3200u32).map(|i| (i % 251) as u8).collect();
    c.bench_function("validate 100 ms frame", |b| {
        b.iter(|| validate_chunk(black_box(bytes.len()), 100, 102_400))
    });
    let mut samples = Vec::with_capacity(1600);
    c.bench_function("decode 100 ms frame to i16", |b| {
        b.iter(|| {
            samples.clear();
            pcm_from_le_bytes(black_box(&bytes), &mut samples);
        })
    });
    let tone: Vec<i16> = (0..160)
        .map(|i| ((i as f32 * 0.3).sin() * 8000.0) as i16)
        .collect();
    c.bench_function("rms of a 10 ms frame", |b| {
        b.iter(|| rms_dbfs(black_box(&tone)))
    });
}

fn resampling(c: &mut Criterion) {
    let input: Vec<i16> = (0..2400)
        .map(|i| ((i as f32 * 0.05).sin() * 8000.0) as i16)
        .collect();
    let mut out = Vec::with_capacity(4096);
    let mut r = StreamResampler::new(24_000, 16_000).unwrap();
    c.bench_function("resample 100 ms 24 kHz -> 16 kHz", |b| {
        b.iter(|| {
            out.clear();
            r.process(black_box(&input), &mut out);
        })
    });
    let mut same = StreamResampler::new(24_000, 24_000).unwrap();
    c.bench_function("pass through 100 ms at 24 kHz", |b| {
        b.iter(|| {
            out.clear();
            same.process(black_box(&input), &mut out);
        })
    });
}

fn splitting(c: &mut Criterion) {
    let reply = "Sure, the weather in Paris is mild today, about eighteen degrees. Bring a light \
        jacket for the evening! Is there anything else I can help you with?";
    let tokens: Vec<String> = reply.split_inclusive(' ').map(str::to_owned).collect();
    c.bench_function("split a 3-sentence reply streamed as tokens", |b| {
        b.iter(|| {
            let mut s = SentenceSplitter::new(SplitterConfig::default());
            let mut out = Vec::new();
            for t in &tokens {
                s.push(black_box(t), std::time::Instant::now(), &mut out);
            }
            out.extend(s.finish());
            out
        })
    });
}

criterion_group!(benches, frames, resampling, splitting);
criterion_main!(benches);
