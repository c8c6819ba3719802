//! PCM helpers, chunk validation and the audio clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Appends the samples of little-endian 16-bit PCM bytes to `out` (a trailing odd byte is ignored).
pub fn pcm_from_le_bytes(bytes: &[u8], out: &mut Vec<i16>) {
    out.reserve(bytes.len() / 2);
    out.extend(
        bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]])),
    );
}

/// Appends samples as little-endian bytes to `out`.
pub fn pcm_to_le_bytes(samples: &[i16], out: &mut Vec<u8>) {
    out.reserve(samples.len() * 2);
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
}

/// Root-mean-square level in dBFS (−∞ for digital silence is reported as −120).
pub fn rms_dbfs(samples: &[i16]) -> f32 {
    dbfs(samples.iter().copied(), samples.len())
}

/// [`rms_dbfs`] of 16-bit little-endian PCM bytes, read in place (a trailing odd byte is
/// ignored).
pub fn rms_dbfs_le(pcm: &[u8]) -> f32 {
    let samples = pcm.chunks_exact(2);
    let n = samples.len();
    dbfs(samples.map(|b| i16::from_le_bytes([b[0], b[1]])), n)
}

fn dbfs(samples: impl Iterator<Item = i16>, n: usize) -> f32 {
    if n == 0 {
        return -120.0;
    }
    let sum: f64 = samples.map(|s| f64::from(s) * f64::from(s)).sum();
    let rms = (sum / n as f64).sqrt() / 32768.0;
    if rms <= 1e-6 {
        -120.0
    } else {
        (20.0 * rms.log10()) as f32
    }
}

/// Duration of `samples` samples at `rate` Hz.
pub fn samples_to_duration(samples: u64, rate: u32) -> Duration {
    Duration::from_nanos(samples.saturating_mul(1_000_000_000) / u64::from(rate.max(1)))
}

/// Why a binary audio frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Fewer bytes than the minimum.
    TooSmall {
        /// Frame length.
        len: usize,
        /// Minimum accepted.
        min: usize,
    },
    /// More bytes than the maximum.
    TooLarge {
        /// Frame length.
        len: usize,
        /// Maximum accepted.
        max: usize,
    },
    /// Not a whole number of 16-bit samples.
    OddLength {
        /// Frame length.
        len: usize,
    },
}

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ChunkError::TooSmall { len, min } => {
                write!(
                    f,
                    "audio frame of {len} bytes is below the minimum of {min}"
                )
            }
            ChunkError::TooLarge { len, max } => {
                write!(
                    f,
                    "audio frame of {len} bytes is above the maximum of {max}"
                )
            }
            ChunkError::OddLength { len } => write!(
                f,
                "audio frame of {len} bytes is not a whole number of 16-bit samples"
            ),
        }
    }
}

/// Checks a binary frame's size against the configured bounds and 16-bit alignment.
pub fn validate_chunk(len: usize, min: usize, max: usize) -> Result<(), ChunkError> {
    if len < min {
        Err(ChunkError::TooSmall { len, min })
    } else if len > max {
        Err(ChunkError::TooLarge { len, max })
    } else if !len.is_multiple_of(2) {
        Err(ChunkError::OddLength { len })
    } else {
        Ok(())
    }
}

/// Maps positions in an incoming audio stream to the wall-clock time they were captured.
///
/// A frame is assumed to arrive when its last sample was captured (as a live microphone sends
/// it), so a sample `k` samples before the frame's end was captured `k / rate` earlier.
#[derive(Debug)]
pub struct AudioClock {
    /// Sample rate of the stream.
    rate: u32,
    /// Total samples received.
    total: u64,
    /// (stream position after the frame, arrival time) of recent frames, oldest first.
    frames: VecDeque<(u64, Instant)>,
    /// How many frames to remember.
    capacity: usize,
}

impl AudioClock {
    /// A clock for a stream at `rate` Hz that remembers the last `capacity` frames.
    pub fn new(rate: u32, capacity: usize) -> Self {
        AudioClock {
            rate,
            total: 0,
            frames: VecDeque::with_capacity(capacity.min(1024)),
            capacity: capacity.max(1),
        }
    }

    /// Records a frame of `samples` samples that arrived at `at`.
    pub fn push(&mut self, samples: usize, at: Instant) {
        self.total += samples as u64;
        if self.frames.len() == self.capacity {
            self.frames.pop_front();
        }
        self.frames.push_back((self.total, at));
    }

    /// Total samples received.
    pub fn total_samples(&self) -> u64 {
        self.total
    }

    /// Seconds of audio received.
    pub fn total_seconds(&self) -> f64 {
        self.total as f64 / f64::from(self.rate)
    }

    /// When the sample at `seconds` into the stream was captured, if the clock still
    /// remembers that part of the stream (or it lies after the newest frame).
    pub fn instant_at(&self, seconds: f64) -> Option<Instant> {
        if !seconds.is_finite() || seconds < 0.0 {
            return None;
        }
        let pos = (seconds * f64::from(self.rate)).round() as u64;
        let &(end, at) = self
            .frames
            .iter()
            .find(|(end, _)| *end >= pos)
            .or_else(|| self.frames.back())?;
        if pos <= end {
            at.checked_sub(samples_to_duration(end - pos, self.rate))
        } else {
            Some(at + samples_to_duration(pos - end, self.rate))
        }
    }
}

/// The 10 ms frames of `samples` at `rate` that are louder than `dbfs`: the first one and
/// one past the last, in samples; `None` when all are quieter.
pub fn loud_span(samples: &[i16], rate: u32, dbfs: f32) -> Option<(usize, usize)> {
    let frame = (rate / 100).max(1) as usize;
    let loud: Vec<usize> = samples
        .chunks(frame)
        .enumerate()
        .filter(|(_, c)| rms_dbfs(c) > dbfs)
        .map(|(i, _)| i)
        .collect();
    let (first, last) = (*loud.first()?, *loud.last()?);
    Some((first * frame, ((last + 1) * frame).min(samples.len())))
}

/// The middle of the quietest 10 ms frame of `samples` whose start lies within `window`
/// samples of `around`: where a pause is cut into a sentence said in one go (said apart, the
/// words before a pause end with a finished sentence's pitch, which is not how people pause
/// mid-thought).
pub fn quietest_near(samples: &[i16], rate: u32, around: usize, window: usize) -> usize {
    let frame = (rate / 100).max(1) as usize;
    let from = around.saturating_sub(window);
    let to = (around + window).min(samples.len().saturating_sub(frame));
    (from..=to.max(from))
        .step_by(frame / 2)
        .min_by(|&a, &b| {
            let level = |at: usize| rms_dbfs(&samples[at..(at + frame).min(samples.len())]);
            level(a).total_cmp(&level(b))
        })
        .map_or(around, |at| (at + frame / 2).min(samples.len()))
}

/// `samples` at `rate` with `pause` of silence inserted at each of `cuts` (sample positions,
/// in order).
pub fn with_silence_at(samples: &[i16], rate: u32, cuts: &[usize], pause: Duration) -> Vec<i16> {
    let silence = (u64::from(rate) * pause.as_millis() as u64 / 1000) as usize;
    let mut out = Vec::with_capacity(samples.len() + cuts.len() * silence);
    let mut from = 0;
    for &cut in cuts {
        let cut = cut.clamp(from, samples.len());
        out.extend_from_slice(&samples[from..cut]);
        out.extend(std::iter::repeat_n(0i16, silence));
        from = cut;
    }
    out.extend_from_slice(&samples[from..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let samples = [0i16, 1, -1, i16::MAX, i16::MIN];
        let mut bytes = Vec::new();
        pcm_to_le_bytes(&samples, &mut bytes);
        let mut back = Vec::new();
        pcm_from_le_bytes(&bytes, &mut back);
        assert_eq!(back, samples);
    }

    #[test]
    fn levels_of_samples_and_of_their_bytes_agree() {
        let samples: Vec<i16> = (0..320).map(|i| ((i % 40) * 400 - 8_000) as i16).collect();
        let mut bytes = Vec::new();
        pcm_to_le_bytes(&samples, &mut bytes);
        let level = rms_dbfs(&samples);
        assert!((-20.0..-10.0).contains(&level), "{level}");
        assert_eq!(rms_dbfs_le(&bytes), level);
        assert_eq!(rms_dbfs_le(&[0; 640]), -120.0);
        assert_eq!(rms_dbfs_le(&[]), -120.0);
    }

    #[test]
    fn chunk_bounds() {
        assert_eq!(validate_chunk(3200, 100, 102_400), Ok(()));
        assert_eq!(
            validate_chunk(99, 100, 102_400),
            Err(ChunkError::TooSmall { len: 99, min: 100 })
        );
        assert_eq!(
            validate_chunk(102_402, 100, 102_400),
            Err(ChunkError::TooLarge {
                len: 102_402,
                max: 102_400
            })
        );
        assert_eq!(
            validate_chunk(3201, 100, 102_400),
            Err(ChunkError::OddLength { len: 3201 })
        );
    }

    #[test]
    fn levels() {
        assert_eq!(rms_dbfs(&[0; 160]), -120.0);
        let loud: Vec<i16> = (0..160)
            .map(|i| if i % 2 == 0 { 16384 } else { -16384 })
            .collect();
        assert!((rms_dbfs(&loud) + 6.02).abs() < 0.1);
    }

    #[test]
    fn clock_maps_positions_to_capture_times() {
        let t0 = Instant::now();
        let mut clock = AudioClock::new(16_000, 16);
        for i in 1..=10u64 {
            clock.push(1600, t0 + Duration::from_millis(100 * i));
        }
        assert_eq!(clock.total_samples(), 16_000);
        // 0.25 s into the stream lies in the third frame (0.2–0.3 s), which arrived at 300 ms.
        let at = clock.instant_at(0.25).unwrap();
        assert_eq!(at.duration_since(t0), Duration::from_millis(250));
        // Past the newest frame: extrapolated.
        let at = clock.instant_at(1.1).unwrap();
        assert_eq!(at.duration_since(t0), Duration::from_millis(1100));
        assert!(clock.instant_at(f64::NAN).is_none());
    }

    #[test]
    fn a_pause_is_cut_into_the_sentence_at_its_quietest_moment_near_the_words_end() {
        let rate = 1_000;
        // Loud, a quiet gap at 300–320, loud again; the words before the pause end at 290
        // when said alone.
        let mut samples = vec![8_000i16; 600];
        samples[300..320].fill(3);
        let cut = quietest_near(&samples, rate, 290, 100);
        assert!((300..=320).contains(&cut), "cut at {cut}");
        let paused = with_silence_at(&samples, rate, &[cut], Duration::from_millis(400));
        assert_eq!(paused.len(), 600 + 400);
        assert!(paused[cut..cut + 400].iter().all(|&s| s == 0));
        assert_eq!(&paused[..cut], &samples[..cut]);
        assert_eq!(&paused[cut + 400..], &samples[cut..]);
        // Outside the window, the quiet gap is not found.
        let far = quietest_near(&samples, rate, 100, 50);
        assert!(far < 200, "cut at {far}");
        assert_eq!(loud_span(&samples, rate, -20.0), Some((0, 600)));
        assert_eq!(loud_span(&[0; 100], rate, -20.0), None);
    }
}
