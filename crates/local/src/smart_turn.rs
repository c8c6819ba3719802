//! Learned end of turn: the input of Smart Turn v3.2 (an ONNX model from the `pipecat-ai`
//! package, BSD-2-Clause), which scores whether the speech so far is a finished turn.
//!
//! The model takes Whisper log-mel features of the last 8 s of 16 kHz mono audio and returns
//! the probability that the turn is complete (its last node is a sigmoid; above 0.5 means
//! complete). [`Features`] computes that input exactly as the package's own (vendored
//! `WhisperFeatureExtractor(chunk_length=8)`) code does:
//!
//! 1. the last 8 s, **zeros prepended** when shorter (zeros appended would look like trailing
//!    silence and make every cut look complete), as `sample / 32768`;
//! 2. the waveform normalised to zero mean and unit variance over all 8 s;
//! 3. a short-time Fourier transform: reflect-padded by 200 samples, a periodic Hann window
//!    of 400, hop 160, power spectrum;
//! 4. 80 mel bands (Slaney scale and area normalisation, 0–8 kHz), `log10` floored at 1e-10;
//! 5. the last frame dropped, everything raised to at least the maximum minus 8, then
//!    `(x + 4) / 4`.
//!
//! The result is `[80][800]` row-major (band-major), the model's `input_features`. The worker
//! (`atlas-voice-turn`) runs the model; the session decides what to do with the score.

use std::sync::Arc;

use async_trait::async_trait;
use atlas_providers::ProviderError;
use atlas_providers::turn::TurnProvider;
use realfft::{RealFftPlanner, RealToComplex};

use crate::ipc::{Reply, Request};
use crate::worker::Worker;

/// The model's sample rate.
pub const SAMPLE_RATE: u32 = 16_000;
/// Samples the model looks at: the last 8 s.
pub const WINDOW_SAMPLES: usize = 8 * SAMPLE_RATE as usize;
/// Mel bands.
pub const N_MELS: usize = 80;
/// Frames (10 ms each).
pub const FRAMES: usize = 800;
/// Above this score the turn is complete.
pub const COMPLETE_ABOVE: f32 = 0.5;

/// The end-of-turn model behind its worker (`atlas-voice-turn`), shared by every session.
#[derive(Debug, Clone)]
pub struct SmartTurn {
    worker: Arc<Worker>,
    model: String,
}

impl SmartTurn {
    /// An adapter over a started turn worker.
    pub fn new(worker: Arc<Worker>) -> Self {
        SmartTurn {
            worker,
            model: "smart-turn-v3.2".into(),
        }
    }
}

#[async_trait]
impl TurnProvider for SmartTurn {
    local_identity!();

    /// The probability that `pcm` (16 kHz mono, the turn so far; only its last 8 s are sent)
    /// ends a finished turn.
    async fn score(&self, pcm: &[i16]) -> Result<f32, ProviderError> {
        let tail = &pcm[pcm.len().saturating_sub(WINDOW_SAMPLES)..];
        let payload: Vec<u8> = tail.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut ticket = self
            .worker
            .submit(|id| Request::ScoreTurn { id }, &payload)
            .await?;
        match ticket.next().await? {
            Reply::TurnScore { probability, .. } if (0.0..=1.0).contains(&probability) => {
                Ok(probability)
            }
            Reply::Failed { message, .. } => Err(ProviderError::Stream {
                kind: "turn_scoring_failed".into(),
                message,
            }),
            other => Err(ProviderError::Protocol(format!(
                "unexpected reply {other:?}"
            ))),
        }
    }
}

/// The turn worker's arguments: the fetched model and ONNX Runtime under `models_dir`.
pub fn worker_args(
    models_dir: &std::path::Path,
) -> Result<Vec<std::ffi::OsString>, crate::models::ModelError> {
    crate::models::onnx_worker_args(models_dir, "smart-turn", "the end-of-turn model")
}

const N_FFT: usize = 400;
const HOP: usize = 160;
const PAD: usize = N_FFT / 2;
const BINS: usize = N_FFT / 2 + 1;
const MEL_FLOOR: f64 = 1e-10;
const VARIANCE_EPS: f64 = 1e-7;

/// One mel band: the first FFT bin it weighs and its weights.
#[derive(Debug)]
struct Band {
    first: usize,
    weights: Vec<f64>,
}

/// The feature extractor (its FFT plan, window and filterbank are made once).
pub struct Features {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    bands: Vec<Band>,
    padded: Vec<f64>,
    frame: Vec<f64>,
    spectrum: Vec<realfft::num_complex::Complex<f64>>,
    scratch: Vec<realfft::num_complex::Complex<f64>>,
    power: Vec<f64>,
    log_mel: Vec<f64>,
}

impl std::fmt::Debug for Features {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Features").finish_non_exhaustive()
    }
}

impl Default for Features {
    fn default() -> Self {
        Self::new()
    }
}

impl Features {
    /// An extractor.
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(N_FFT);
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        Features {
            fft,
            // Periodic Hann (numpy `hanning(401)[:-1]`).
            window: (0..N_FFT)
                .map(|n| 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos())
                .collect(),
            bands: slaney_filterbank(),
            padded: Vec::with_capacity(WINDOW_SAMPLES + 2 * PAD),
            frame: vec![0.0; N_FFT],
            spectrum,
            scratch,
            power: vec![0.0; BINS],
            log_mel: vec![0.0; N_MELS * FRAMES],
        }
    }

    /// The model's input for `pcm` (16 kHz mono; only the last 8 s count): `N_MELS × FRAMES`
    /// values, band-major.
    pub fn compute(&mut self, pcm: &[i16]) -> Vec<f32> {
        // 1. The last 8 s, zeros in front.
        let tail = &pcm[pcm.len().saturating_sub(WINDOW_SAMPLES)..];
        let zeros = WINDOW_SAMPLES - tail.len();
        let sample = |i: usize| {
            if i < zeros {
                0.0
            } else {
                f64::from(tail[i - zeros]) / 32768.0
            }
        };
        // 2. Zero mean, unit variance (population variance) over all of it.
        let n = WINDOW_SAMPLES as f64;
        let mean = (0..WINDOW_SAMPLES).map(sample).sum::<f64>() / n;
        let var = (0..WINDOW_SAMPLES)
            .map(|i| (sample(i) - mean).powi(2))
            .sum::<f64>()
            / n;
        let scale = 1.0 / (var + VARIANCE_EPS).sqrt();
        let x = |i: usize| (sample(i) - mean) * scale;
        // 3. Reflect padding (the edge sample not repeated).
        self.padded.clear();
        self.padded.extend((1..=PAD).rev().map(x));
        self.padded.extend((0..WINDOW_SAMPLES).map(x));
        self.padded
            .extend((WINDOW_SAMPLES - 1 - PAD..WINDOW_SAMPLES - 1).rev().map(x));
        let mut max = f64::NEG_INFINITY;
        for t in 0..FRAMES {
            let start = t * HOP;
            for (k, out) in self.frame.iter_mut().enumerate() {
                *out = self.padded[start + k] * self.window[k];
            }
            self.fft
                .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.scratch)
                .expect("buffers sized by the plan");
            for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            // 4. Mel bands, log10.
            for (m, band) in self.bands.iter().enumerate() {
                let energy: f64 = band
                    .weights
                    .iter()
                    .zip(&self.power[band.first..])
                    .map(|(w, p)| w * p)
                    .sum();
                let value = energy.max(MEL_FLOOR).log10();
                max = max.max(value);
                self.log_mel[m * FRAMES + t] = value;
            }
        }
        // 5. Dynamic range of 8 (the dropped last frame was never computed), then scaled.
        let floor = max - 8.0;
        self.log_mel
            .iter()
            .map(|&v| ((v.max(floor) + 4.0) / 4.0) as f32)
            .collect()
    }
}

fn hz_to_mel(hz: f64) -> f64 {
    const LOG_STEP: f64 = 0.068_751_777_420_949_12; // ln(6.4) / 27
    if hz < 1000.0 {
        hz * 3.0 / 200.0
    } else {
        15.0 + (hz / 1000.0).ln() / LOG_STEP
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    const LOG_STEP: f64 = 0.068_751_777_420_949_12;
    if mel < 15.0 {
        mel * 200.0 / 3.0
    } else {
        1000.0 * (LOG_STEP * (mel - 15.0)).exp()
    }
}

/// Triangular filters on the Slaney mel scale with Slaney (area) normalisation, as librosa
/// builds them (`htk=False, norm="slaney"`), over 0–8 kHz.
fn slaney_filterbank() -> Vec<Band> {
    let top = hz_to_mel(f64::from(SAMPLE_RATE) / 2.0);
    let points: Vec<f64> = (0..N_MELS + 2)
        .map(|i| mel_to_hz(top * i as f64 / (N_MELS + 1) as f64))
        .collect();
    let bin_hz = |k: usize| f64::from(SAMPLE_RATE) / 2.0 * k as f64 / (BINS - 1) as f64;
    (0..N_MELS)
        .map(|m| {
            let (lo, mid, hi) = (points[m], points[m + 1], points[m + 2]);
            let norm = 2.0 / (hi - lo);
            let weights: Vec<(usize, f64)> = (0..BINS)
                .filter_map(|k| {
                    let f = bin_hz(k);
                    let w = ((f - lo) / (mid - lo)).min((hi - f) / (hi - mid)).max(0.0) * norm;
                    (w > 0.0).then_some((k, w))
                })
                .collect();
            let first = weights.first().map_or(0, |&(k, _)| k);
            let last = weights.last().map_or(0, |&(k, _)| k);
            let mut dense = vec![0.0; weights.len().max(1).max(last + 1 - first)];
            for (k, w) in weights {
                dense[k - first] = w;
            }
            Band {
                first,
                weights: dense,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filterbank_matches_librosa_s_slaney_filters() {
        // Check values from librosa / transformers (mel_filter_bank, slaney scale and norm).
        let bands = slaney_filterbank();
        assert_eq!(bands[0].first, 1);
        assert_eq!(bands[0].weights.len(), 1);
        assert!((bands[0].weights[0] - 0.024_862_593_984_176_087).abs() < 1e-12);
        assert_eq!(bands[40].first, 42);
        let expected = [
            0.005_411_105_098_683_228,
            0.014_735_565_741_439_144,
            0.006_518_189_694_660_887,
        ];
        assert_eq!(bands[40].weights.len(), 3);
        for (w, e) in bands[40].weights.iter().zip(expected) {
            assert!((w - e).abs() < 1e-12, "{w} vs {e}");
        }
        assert_eq!(bands[79].first, 186);
        assert_eq!(bands[79].weights.len(), 14);
        let sum: f64 = bands.iter().flat_map(|b| &b.weights).sum();
        assert!((sum - 1.999_024_102_917_857_7).abs() < 1e-9, "{sum}");
    }

    /// 16-bit mono samples of a WAV file under the repository's `tests/audio`.
    fn test_audio(name: &str) -> Vec<i16> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/audio")
            .join(name);
        let bytes = std::fs::read(&path).unwrap();
        let data = bytes
            .windows(4)
            .position(|w| w == b"data")
            .expect("a data chunk")
            + 8;
        bytes[data..]
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect()
    }

    #[test]
    fn features_match_the_reference_implementation() {
        // pipecat-ai 1.14.0's vendored WhisperFeatureExtractor(chunk_length=8) on the same
        // samples: the whole matrix's range and mean, one value and where the maximum is.
        let out = Features::new().compute(&test_audio("question_16k.wav"));
        let min = out.iter().copied().fold(f32::INFINITY, f32::min);
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / out.len() as f64;
        assert!((min - -0.088_064_76).abs() < 1e-4, "min {min}");
        assert!((max - 1.911_935_2).abs() < 1e-4, "max {max}");
        assert!((mean - 0.138_857_93).abs() < 1e-4, "mean {mean}");
        assert!((out[790] - 0.329_528_72).abs() < 1e-4, "band 0, frame 790");
        let argmax = out
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| (i / FRAMES, i % FRAMES));
        assert_eq!(argmax, Some((10, 551)));
    }

    #[test]
    fn silence_gives_the_floor_everywhere_and_short_audio_is_padded_in_front() {
        let mut f = Features::new();
        let out = f.compute(&[]);
        assert_eq!(out.len(), N_MELS * FRAMES);
        // All zeros: every band at the floor, log10(1e-10) = -10, scaled (-10 + 4) / 4.
        assert!(
            out.iter().all(|&v| (v - -1.5).abs() < 1e-6),
            "{:?}",
            &out[..4]
        );
        // A tone at the very end lights up the last frames only: the zeros went in front.
        let tone: Vec<i16> = (0..1600)
            .map(|i| ((i as f64 * 0.2).sin() * 8000.0) as i16)
            .collect();
        let out = f.compute(&tone);
        let frame_energy = |t: usize| (0..N_MELS).map(|m| out[m * FRAMES + t]).sum::<f32>();
        assert!(frame_energy(FRAMES - 5) > frame_energy(10) + 10.0);
    }
}
