//! Streaming sample-rate conversion of 16-bit mono PCM, built on `rubato`'s FFT resampler.
//!
//! Audio arrives in frames of any size; the resampler buffers input until it has a full
//! processing chunk, drops the filter's start-up delay, and on [`StreamResampler::flush`]
//! emits exactly `input × out_rate / in_rate` samples in total, so durations are preserved.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};

/// The resampler could not be built for these rates.
#[derive(Debug, thiserror::Error)]
#[error("cannot resample from {from} Hz to {to} Hz: {reason}")]
pub struct ResampleError {
    /// Input rate.
    pub from: u32,
    /// Output rate.
    pub to: u32,
    /// What rubato said.
    pub reason: String,
}

/// Resampler state for one stream.
pub struct StreamResampler {
    from: u32,
    to: u32,
    /// `None` when the rates are equal.
    fft: Option<FftState>,
    /// Samples received since the last flush.
    total_in: u64,
    /// Samples emitted since the last flush.
    total_out: u64,
}

struct FftState {
    resampler: Fft<f32>,
    /// Converted input waiting for a full chunk.
    pending: Vec<f32>,
    /// Output scratch buffer, reused.
    scratch: Vec<f32>,
    /// Start-up delay frames still to drop.
    skip: usize,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler")
            .field("from", &self.from)
            .field("to", &self.to)
            .finish_non_exhaustive()
    }
}

impl StreamResampler {
    /// A resampler from `from` Hz to `to` Hz working in 20 ms chunks.
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let fft = if from == to {
            None
        } else {
            let err = |reason: String| ResampleError { from, to, reason };
            if from == 0 || to == 0 {
                return Err(err("rates must be positive".into()));
            }
            let chunk = (from as usize / 50).max(1);
            let resampler = Fft::<f32>::new(from as usize, to as usize, chunk, 1, FixedSync::Input)
                .map_err(|e| err(e.to_string()))?;
            let skip = resampler.output_delay();
            let scratch = vec![0.0; resampler.output_frames_max()];
            Some(FftState {
                resampler,
                pending: Vec::with_capacity(chunk * 2),
                scratch,
                skip,
            })
        };
        Ok(StreamResampler {
            from,
            to,
            fft,
            total_in: 0,
            total_out: 0,
        })
    }

    /// Input rate.
    pub fn from_rate(&self) -> u32 {
        self.from
    }

    /// Output rate.
    pub fn to_rate(&self) -> u32 {
        self.to
    }

    /// Converts `input`, appending whatever output is ready to `out`.
    pub fn process(&mut self, input: &[i16], out: &mut Vec<i16>) {
        self.total_in += input.len() as u64;
        let Some(state) = self.fft.as_mut() else {
            out.extend_from_slice(input);
            self.total_out += input.len() as u64;
            return;
        };
        state
            .pending
            .extend(input.iter().map(|&s| f32::from(s) / 32768.0));
        let mut pos = 0;
        loop {
            let need = state.resampler.input_frames_next();
            if state.pending.len() - pos < need {
                break;
            }
            let written = run_chunk(state, pos, need, None);
            pos += need;
            self.total_out += emit(state, written, u64::MAX, out);
        }
        state.pending.drain(..pos);
    }

    /// Ends the stream: emits the remaining output so the total matches the input's duration,
    /// then resets for a new stream.
    pub fn flush(&mut self, out: &mut Vec<i16>) {
        if let Some(state) = self.fft.as_mut() {
            let target = (self.total_in * u64::from(self.to) + u64::from(self.from) / 2)
                / u64::from(self.from);
            let mut first = true;
            while self.total_out < target {
                let partial = if first { state.pending.len() } else { 0 };
                first = false;
                let need = state.resampler.input_frames_next();
                state.pending.resize(need.max(state.pending.len()), 0.0);
                let written = run_chunk(state, 0, need, Some(partial));
                state.pending.clear();
                let emitted = emit(state, written, target - self.total_out, out);
                self.total_out += emitted;
                if written == 0 {
                    break;
                }
            }
            state.pending.clear();
            state.resampler.reset();
            state.skip = state.resampler.output_delay();
        }
        self.total_in = 0;
        self.total_out = 0;
    }
}

fn run_chunk(state: &mut FftState, pos: usize, need: usize, partial: Option<usize>) -> usize {
    let input = &state.pending[pos..pos + need];
    let frames_out = state.scratch.len();
    let (Ok(adapter_in), Ok(mut adapter_out)) = (
        InterleavedSlice::new(input, 1, need),
        InterleavedSlice::new_mut(&mut state.scratch, 1, frames_out),
    ) else {
        return 0;
    };
    let indexing = partial.map(|p| Indexing::new().partial_len(p));
    state
        .resampler
        .process_into_buffer(&adapter_in, &mut adapter_out, indexing.as_ref())
        .map(|(_, written)| written)
        .unwrap_or(0)
}

fn emit(state: &mut FftState, written: usize, cap: u64, out: &mut Vec<i16>) -> u64 {
    let skip = state.skip.min(written);
    state.skip -= skip;
    let ready = &state.scratch[skip..written];
    let n = ready.len().min(usize::try_from(cap).unwrap_or(usize::MAX));
    out.extend(
        ready[..n]
            .iter()
            .map(|&x| (x * 32768.0).round().clamp(-32768.0, 32767.0) as i16),
    );
    n as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, hz: f32, samples: usize) -> Vec<i16> {
        (0..samples)
            .map(|i| {
                let t = i as f32 / rate as f32;
                ((t * hz * std::f32::consts::TAU).sin() * 12_000.0) as i16
            })
            .collect()
    }

    fn resample_in_pieces(input: &[i16], from: u32, to: u32, piece: usize) -> Vec<i16> {
        let mut r = StreamResampler::new(from, to).unwrap();
        let mut out = Vec::new();
        for c in input.chunks(piece) {
            r.process(c, &mut out);
        }
        r.flush(&mut out);
        out
    }

    #[test]
    fn preserves_duration_for_every_supported_pair() {
        let rates = [8_000, 16_000, 22_050, 24_000, 48_000];
        for &from in &rates {
            for &to in &rates {
                let input = tone(from, 440.0, from as usize * 7 / 10 + 13);
                let out = resample_in_pieces(&input, from, to, 977);
                let expected =
                    (input.len() as u64 * u64::from(to) + u64::from(from) / 2) / u64::from(from);
                assert_eq!(out.len() as u64, expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn keeps_the_signal() {
        // A 440 Hz tone at 24 kHz down to 16 kHz keeps its level and its zero crossings.
        let input = tone(24_000, 440.0, 24_000);
        let out = resample_in_pieces(&input, 24_000, 16_000, 480);
        let rms = |s: &[i16]| {
            (s.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / s.len() as f64).sqrt()
        };
        let mid_in = &input[2_400..21_600];
        let mid_out = &out[1_600..14_400];
        assert!((rms(mid_in) - rms(mid_out)).abs() / rms(mid_in) < 0.05);
        let crossings = mid_out
            .windows(2)
            .filter(|w| (w[0] < 0) != (w[1] < 0))
            .count();
        // 0.8 s of 440 Hz has 704 zero crossings.
        assert!((690..=718).contains(&crossings), "{crossings}");
    }

    #[test]
    fn equal_rates_pass_through() {
        let input = tone(16_000, 300.0, 1_000);
        let out = resample_in_pieces(&input, 16_000, 16_000, 333);
        assert_eq!(out, input);
    }

    #[test]
    fn reusable_after_flush() {
        let mut r = StreamResampler::new(24_000, 16_000).unwrap();
        for _ in 0..3 {
            let mut out = Vec::new();
            r.process(&tone(24_000, 200.0, 2_400), &mut out);
            r.flush(&mut out);
            assert_eq!(out.len(), 1_600);
        }
    }
}
