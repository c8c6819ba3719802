//! Fake OpenAI TTS: `POST /v1/audio/speech` with `response_format:"pcm"` returns raw 24 kHz
//! signed 16-bit little-endian mono PCM, streamed in paced chunks.
//!
//! The audio is a deterministic, audible, speech-like signal: every word of the input becomes a
//! voiced segment (a harmonic tone whose pitch depends on the word, with a syllable-rate
//! amplitude modulation and soft attack/release), whitespace becomes silence, and each input
//! character lasts `ms_per_char` (divided by the request's `speed`). Peaks are at about -6 dBFS.
//! Utterances up to 30 s are rendered once and kept in a small cache (under load every
//! simulated client asks for the same few sentences, and synthesising every sample again was
//! the fakes' largest cost); longer ones are computed chunk by chunk, so they never sit in
//! memory whole.

use std::collections::HashMap;
use std::f64::consts::TAU;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use serde_json::Value;
use tokio::time::Instant;

use crate::pacing::{Step, Timed, paced_body};
use crate::state::Shared;
use crate::{Fault, TTS_SAMPLE_RATE, Target, TtsFakeConfig, errors, llm, util};

/// OpenAI's limit on `input`.
const MAX_INPUT_CHARS: usize = 4096;

/// `POST /v1/audio/speech`.
pub(crate) async fn speech(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (started, fault, parsed) = shared.receive(Target::OpenAiTts, &headers, &body);
    if let Some(input) = parsed
        .as_ref()
        .ok()
        .and_then(|v| v.get("input"))
        .and_then(Value::as_str)
    {
        shared.recorder.tts_input(input.to_owned());
    }
    if let Some(Fault::Status {
        status,
        retry_after_s,
    }) = fault
    {
        return errors::openai(status, None, None, None, retry_after_s);
    }
    if let Some(response) = llm::check_bearer(&shared, &headers) {
        return response;
    }
    let body = match parsed {
        Ok(v) => v,
        Err(e) => {
            return *bad_request(
                &format!("We could not parse the JSON body of your request. ({e})"),
                None,
                None,
            );
        }
    };
    let request = match SpeechRequest::parse(&body) {
        Ok(r) => r,
        Err(response) => return *response,
    };

    let config = &shared.config.tts;
    shared
        .recorder
        .usage
        .tts_request(request.input.chars().count());
    let source = PcmSource::new(config, &request.input, request.speed, started, fault);
    let mut response = paced_body(source, shared.shutdown.clone(), None).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/pcm"));
    if let Ok(v) = HeaderValue::from_str(&util::prefixed_id("req_")) {
        headers.insert("x-request-id", v);
    }
    response
}

fn bad_request(message: &str, param: Option<&str>, code: Option<&str>) -> Box<Response> {
    Box::new(errors::openai(400, Some(message), param, code, None))
}

struct SpeechRequest {
    input: String,
    speed: f64,
}

impl SpeechRequest {
    /// Validates the body; `Err` is the 400 to answer with.
    fn parse(v: &Value) -> Result<Self, Box<Response>> {
        let missing = |name: &str| {
            bad_request(
                &format!("Missing required parameter: '{name}'."),
                Some(name),
                Some("missing_required_parameter"),
            )
        };
        if v.get("model").and_then(Value::as_str).is_none() {
            return Err(missing("model"));
        }
        let input = v
            .get("input")
            .and_then(Value::as_str)
            .ok_or_else(|| missing("input"))?;
        let chars = input.chars().count();
        if chars == 0 {
            return Err(bad_request(
                "Invalid 'input': empty string. Expected a string with minimum length 1, but got an empty string instead.",
                Some("input"),
                Some("empty_string"),
            ));
        }
        if chars > MAX_INPUT_CHARS {
            return Err(bad_request(
                &format!(
                    "Invalid 'input': string too long. Expected a string with maximum length {MAX_INPUT_CHARS}, but got a string with length {chars} instead."
                ),
                Some("input"),
                Some("string_above_max_length"),
            ));
        }
        match v.get("voice") {
            Some(Value::String(_)) => {}
            Some(Value::Object(o)) if o.get("id").is_some_and(Value::is_string) => {}
            _ => return Err(missing("voice")),
        }
        let format = v
            .get("response_format")
            .and_then(Value::as_str)
            .unwrap_or("mp3");
        if format != "pcm" {
            return Err(bad_request(
                &format!(
                    "Unsupported response_format '{format}': this fake only produces 'pcm' (24 kHz s16le mono)."
                ),
                Some("response_format"),
                Some("invalid_value"),
            ));
        }
        let speed = match v.get("speed") {
            None | Some(Value::Null) => 1.0,
            Some(s) => s
                .as_f64()
                .filter(|s| (0.25..=4.0).contains(s))
                .ok_or_else(|| {
                    bad_request(
                        "Invalid 'speed': expected a number between 0.25 and 4.0.",
                        Some("speed"),
                        Some("invalid_value"),
                    )
                })?,
        };
        Ok(Self {
            input: input.to_owned(),
            speed,
        })
    }
}

/// Number of samples the fake produces for `input` at the request's `speed`.
pub(crate) fn total_samples(config: &TtsFakeConfig, input: &str, speed: f64) -> u64 {
    let chars = input.chars().count() as f64;
    let ms = chars * f64::from(config.ms_per_char) / speed;
    (ms * f64::from(TTS_SAMPLE_RATE) / 1000.0).round() as u64
}

/// Longest utterance kept whole in the render cache, in samples (30 s).
const CACHE_MAX_SAMPLES: u64 = 30 * TTS_SAMPLE_RATE as u64;
/// Total size of the render cache; it is emptied when a new render would exceed it.
const CACHE_MAX_BYTES: usize = 32 << 20;

#[derive(Default)]
struct RenderCache {
    entries: HashMap<(String, u64), Bytes>,
    bytes: usize,
}

/// The whole rendering of `input` over `total` samples, from the cache when possible; `None`
/// for utterances too long to keep whole.
fn cached_render(input: &str, total: u64) -> Option<Bytes> {
    static CACHE: OnceLock<Mutex<RenderCache>> = OnceLock::new();
    if total > CACHE_MAX_SAMPLES {
        return None;
    }
    let cache = CACHE.get_or_init(Mutex::default);
    let key = (input.to_owned(), total);
    let hit = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entries
        .get(&key)
        .cloned();
    if hit.is_some() {
        return hit;
    }
    let pcm = Synth::new(input, total).render(0, total);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if c.bytes + pcm.len() > CACHE_MAX_BYTES {
        c.entries.clear();
        c.bytes = 0;
    }
    if c.entries.insert(key, pcm.clone()).is_none() {
        c.bytes += pcm.len();
    }
    Some(pcm)
}

/// Where a source's samples come from.
enum Audio {
    /// Rendered whole (and shared through the cache).
    Whole(Bytes),
    /// Rendered chunk by chunk.
    Chunked(Synth),
}

impl Audio {
    fn new(input: &str, total: u64) -> Self {
        match cached_render(input, total) {
            Some(pcm) => Audio::Whole(pcm),
            None => Audio::Chunked(Synth::new(input, total)),
        }
    }

    /// Samples `[pos, pos + n)` as s16le.
    fn samples(&self, pos: u64, n: u64) -> Bytes {
        match self {
            Audio::Whole(pcm) => pcm.slice(pos as usize * 2..(pos + n) as usize * 2),
            Audio::Chunked(synth) => synth.render(pos, n),
        }
    }
}

/// Streams the synthesised PCM as [`Timed`] chunks, applying faults.
struct PcmSource {
    audio: Audio,
    pos: u64,
    total: u64,
    chunk_samples: u64,
    first: Instant,
    interval: Duration,
    sent_chunks: u32,
    fault: Option<Fault>,
    done: bool,
}

impl PcmSource {
    fn new(
        config: &TtsFakeConfig,
        input: &str,
        speed: f64,
        started: Instant,
        fault: Option<Fault>,
    ) -> Self {
        let total = total_samples(config, input, speed);
        let chunk_samples = (config.chunk_bytes / 2).max(1) as u64;
        let chunk_secs = chunk_samples as f64 / f64::from(TTS_SAMPLE_RATE);
        let interval = if config.speed.is_finite() && config.speed > 0.0 {
            Duration::from_secs_f64(chunk_secs / config.speed)
        } else {
            Duration::ZERO
        };
        Self {
            audio: Audio::new(input, total),
            pos: 0,
            total,
            chunk_samples,
            first: started + config.first_byte,
            interval,
            sent_chunks: 0,
            fault,
            done: false,
        }
    }
}

impl Iterator for PcmSource {
    type Item = Timed;

    fn next(&mut self) -> Option<Timed> {
        if self.done {
            return None;
        }
        let at = self.first + self.interval * self.sent_chunks;
        match self.fault {
            Some(Fault::Stall) => {
                self.done = true;
                return Some(Timed {
                    at: Instant::now(),
                    step: Step::Stall,
                });
            }
            Some(Fault::DropMidStream | Fault::MidStreamError) if self.sent_chunks == 1 => {
                self.done = true;
                return Some(Timed {
                    at,
                    step: Step::Abort,
                });
            }
            _ => {}
        }
        if self.pos >= self.total {
            self.done = true;
            return None;
        }
        let n = self.chunk_samples.min(self.total - self.pos);
        let data = self.audio.samples(self.pos, n);
        self.pos += n;
        self.sent_chunks += 1;
        Some(Timed::data(at, data))
    }
}

/// One voiced stretch of the output (a word).
struct Segment {
    start: u64,
    end: u64,
    /// Fundamental frequency in Hz.
    f0: f64,
}

/// Deterministic speech-like synthesiser.
pub(crate) struct Synth {
    segments: Vec<Segment>,
}

/// Entries in the wavetables.
const TABLE: usize = 1024;
/// Peak amplitude: -6 dBFS.
const PEAK: f64 = 0.5;
/// Attack/release of each word, in samples (15 ms).
const RAMP: f64 = 360.0;
/// Syllable-rate amplitude modulation, Hz.
const SYLLABLE_HZ: f64 = 4.0;

/// One period of the voice waveform (fundamental plus two harmonics), normalised to peak 1.
fn voice_table() -> &'static [f32; TABLE] {
    static TABLE_CELL: OnceLock<[f32; TABLE]> = OnceLock::new();
    TABLE_CELL.get_or_init(|| {
        let mut t = [0f32; TABLE];
        let mut peak = 0f64;
        let raw: Vec<f64> = (0..TABLE)
            .map(|i| {
                let x = TAU * i as f64 / TABLE as f64;
                let v = x.sin() + 0.5 * (2.0 * x).sin() + 0.25 * (3.0 * x).sin();
                peak = peak.max(v.abs());
                v
            })
            .collect();
        for (slot, v) in t.iter_mut().zip(raw) {
            *slot = (v / peak) as f32;
        }
        t
    })
}

/// One period of a cosine.
fn cosine_table() -> &'static [f32; TABLE] {
    static TABLE_CELL: OnceLock<[f32; TABLE]> = OnceLock::new();
    TABLE_CELL.get_or_init(|| {
        let mut t = [0f32; TABLE];
        for (i, slot) in t.iter_mut().enumerate() {
            *slot = (TAU * i as f64 / TABLE as f64).cos() as f32;
        }
        t
    })
}

fn table_lookup(table: &[f32; TABLE], phase: f64) -> f64 {
    let idx = (phase.fract() * TABLE as f64) as usize % TABLE;
    f64::from(table[idx])
}

impl Synth {
    /// Lays the words of `input` out over `total` samples, one character's worth of time per
    /// character.
    pub(crate) fn new(input: &str, total: u64) -> Self {
        let chars: Vec<char> = input.chars().collect();
        let per_char = if chars.is_empty() {
            0.0
        } else {
            total as f64 / chars.len() as f64
        };
        let mut segments = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_whitespace() {
                i += 1;
                continue;
            }
            let a = i;
            while i < chars.len() && !chars[i].is_whitespace() {
                i += 1;
            }
            let word: String = chars[a..i].iter().collect();
            let hash = util::fnv1a(util::FNV_OFFSET, word.to_lowercase().as_bytes());
            segments.push(Segment {
                start: (a as f64 * per_char).round() as u64,
                end: (i as f64 * per_char).round() as u64,
                f0: 100.0 + (hash % 140) as f64,
            });
        }
        if segments.is_empty() && total > 0 {
            // Whitespace-only input still gets audible audio.
            segments.push(Segment {
                start: 0,
                end: total,
                f0: 150.0,
            });
        }
        Self { segments }
    }

    /// Renders samples `[pos, pos + n)` as s16le.
    pub(crate) fn render(&self, pos: u64, n: u64) -> Bytes {
        let voice = voice_table();
        let cosine = cosine_table();
        let rate = f64::from(TTS_SAMPLE_RATE);
        let mut out = BytesMut::with_capacity(n as usize * 2);
        let mut seg = self.segments.partition_point(|s| s.end <= pos);
        for idx in pos..pos + n {
            while seg < self.segments.len() && self.segments[seg].end <= idx {
                seg += 1;
            }
            let sample = match self.segments.get(seg) {
                Some(s) if s.start <= idx => {
                    let k = (idx - s.start) as f64;
                    let to_end = (s.end - 1 - idx) as f64;
                    let edge = k.min(to_end);
                    // Raised-cosine attack/release (trigonometry only inside the ramps: this
                    // loop runs for every sample of every concurrent reply under load).
                    let envelope = if edge < RAMP {
                        0.5 - 0.5 * (std::f64::consts::PI * edge / RAMP).cos()
                    } else {
                        1.0
                    };
                    let t = k / rate;
                    let syllables = 0.7 + 0.3 * (0.5 + 0.5 * table_lookup(cosine, SYLLABLE_HZ * t));
                    PEAK * envelope * syllables * table_lookup(voice, s.f0 * t)
                }
                _ => 0.0,
            };
            let v = (sample * 32767.0).round().clamp(-32768.0, 32767.0) as i16;
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peak_dbfs(pcm: &[u8]) -> f64 {
        let peak = pcm
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]).unsigned_abs())
            .max()
            .unwrap_or(0);
        20.0 * (f64::from(peak) / 32768.0).log10()
    }

    #[test]
    fn duration_follows_chars_and_speed() {
        let config = TtsFakeConfig::default();
        assert_eq!(total_samples(&config, "hello", 1.0), 5 * 60 * 24);
        assert_eq!(total_samples(&config, "hello", 2.0), 5 * 30 * 24);
    }

    #[test]
    fn synth_is_deterministic_audible_and_has_gaps() {
        let total = total_samples(&TtsFakeConfig::default(), "hello big world", 1.0);
        let synth = Synth::new("hello big world", total);
        let a = synth.render(0, total);
        let b = Synth::new("hello big world", total).render(0, total);
        assert_eq!(a, b);
        assert_eq!(a.len() as u64, total * 2);
        let peak = peak_dbfs(&a);
        assert!((-9.0..=-5.0).contains(&peak), "peak {peak} dBFS");
        // The space after "hello" (chars 5..6) is silent.
        let per_char = total / 15;
        let gap = &a[(5 * per_char as usize + 10) * 2..(6 * per_char as usize - 10) * 2];
        assert!(gap.iter().all(|&b| b == 0));
        // Chunked rendering equals whole rendering.
        let mut chunked = BytesMut::new();
        let mut pos = 0;
        while pos < total {
            let n = 1000.min(total - pos);
            chunked.extend_from_slice(&synth.render(pos, n));
            pos += n;
        }
        assert_eq!(chunked.freeze(), a);
    }

    #[test]
    fn short_utterances_are_rendered_once_and_long_ones_in_chunks() {
        let total = total_samples(&TtsFakeConfig::default(), "cached sentence", 1.0);
        let a = Audio::new("cached sentence", total);
        let b = Audio::new("cached sentence", total);
        let (Audio::Whole(x), Audio::Whole(y)) = (&a, &b) else {
            panic!("a short utterance is kept whole");
        };
        // The second source shares the first one's buffer.
        assert_eq!(x.as_ptr(), y.as_ptr());
        // Slices of the whole equal the chunk-by-chunk rendering.
        let synth = Synth::new("cached sentence", total);
        assert_eq!(a.samples(100, 2_400), synth.render(100, 2_400));
        let long = Audio::new("long", CACHE_MAX_SAMPLES + 1);
        assert!(matches!(long, Audio::Chunked(_)));
        assert_eq!(
            long.samples(0, 1_000),
            Synth::new("long", CACHE_MAX_SAMPLES + 1).render(0, 1_000)
        );
    }

    #[test]
    fn whitespace_input_is_not_silent() {
        let synth = Synth::new("   ", 3000);
        assert!(synth.render(0, 3000).iter().any(|&b| b != 0));
    }
}
