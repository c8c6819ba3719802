//! The person's last seconds of audio at the end-of-turn model's rate, kept only under the
//! `smart` turn policy, and the model's decisions run off the session's loop.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use atlas_core::audio::pcm_from_le_bytes;
use atlas_core::resample::StreamResampler;
use atlas_providers::turn::{TURN_RATE, TurnProvider};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::shared::Answer;
use crate::metrics;

/// Audio the model is shown at most (it looks at the last 8 s).
const KEEP: usize = 8 * TURN_RATE as usize;
/// Audio before the turn's first speech the model hears (as its authors' code gives it).
const BEFORE_SPEECH_S: f64 = 0.5;

/// One session's ear for the end-of-turn model.
///
/// The model judges the person's turn as its authors' code hands it over: from half a second
/// before the turn's first speech to the pause the recogniser reported after the latest (a
/// voice detector's stop after a short silence) — not an earlier turn's words, nor whatever
/// audio happened to arrive before the decision was asked, so the same speech gets the same
/// verdict however busy the recogniser was.
pub struct TurnAudio {
    model: Arc<dyn TurnProvider>,
    /// The last [`KEEP`] samples at [`TURN_RATE`].
    recent: VecDeque<i16>,
    /// Samples kept since the start (the stream position after the newest).
    total: u64,
    /// Where the latest speech ended (seconds of the stream), as the recogniser said.
    speech_end_s: Option<f64>,
    /// Where the turn's first speech started (seconds of the stream).
    turn_start_s: Option<f64>,
    /// Silence after the end of speech the model hears: the recogniser's pause.
    trailing_s: f64,
    /// Converts the audio it is given to [`TURN_RATE`] when it comes at another rate.
    resampler: Option<StreamResampler>,
    scratch_in: Vec<i16>,
    scratch_out: Vec<i16>,
    /// The decision in flight (a newer pause makes it moot).
    scoring: Option<AbortHandle>,
}

impl TurnAudio {
    /// An ear for audio arriving at `rate`, whose model hears `trailing_s` of silence after
    /// the speech.
    pub fn new(model: Arc<dyn TurnProvider>, rate: u32, trailing_s: f64) -> Self {
        TurnAudio {
            model,
            recent: VecDeque::with_capacity(KEEP),
            total: 0,
            speech_end_s: None,
            turn_start_s: None,
            trailing_s,
            resampler: (rate != TURN_RATE)
                .then(|| StreamResampler::new(rate, TURN_RATE).ok())
                .flatten(),
            scratch_in: Vec::new(),
            scratch_out: Vec::new(),
            scoring: None,
        }
    }

    /// Keeps `pcm` (16-bit little-endian, at the rate given to [`TurnAudio::new`]).
    pub fn push(&mut self, pcm: &[u8]) {
        self.scratch_in.clear();
        pcm_from_le_bytes(pcm, &mut self.scratch_in);
        let samples = match self.resampler.as_mut() {
            None => &self.scratch_in,
            Some(r) => {
                self.scratch_out.clear();
                r.process(&self.scratch_in, &mut self.scratch_out);
                &self.scratch_out
            }
        };
        let samples = &samples[samples.len().saturating_sub(KEEP)..];
        let excess = (self.recent.len() + samples.len()).saturating_sub(KEEP);
        self.recent.drain(..excess);
        self.recent.extend(samples.iter().copied());
        self.total += samples.len() as u64;
    }

    /// The recogniser says the latest speech ended at `seconds` of the stream.
    pub fn speech_ended(&mut self, seconds: f64) {
        self.speech_end_s = Some(seconds);
    }

    /// The recogniser says speech started at `seconds` of the stream (the turn's first, unless
    /// the turn already has one).
    pub fn speech_started(&mut self, seconds: f64) {
        self.turn_start_s.get_or_insert(seconds);
    }

    /// The person's turn ended: the next speech starts a new one.
    pub fn turn_ended(&mut self) {
        self.turn_start_s = None;
    }

    /// The audio the model judges: from just before the turn's first speech to the pause
    /// after the latest, as far as they are kept.
    fn judged(&self) -> Vec<i16> {
        let kept = self.recent.len() as u64;
        let first = self.total - kept;
        let at = |s: f64| (s.max(0.0) * f64::from(TURN_RATE)) as u64;
        let end = self
            .speech_end_s
            .map(|s| at(s + self.trailing_s))
            .filter(|&end| end > first && end < self.total)
            .unwrap_or(self.total);
        let start = self
            .turn_start_s
            .map(|s| at(s - BEFORE_SPEECH_S))
            .filter(|&start| start > first && start < end)
            .unwrap_or(first);
        self.recent
            .range((start - first) as usize..(end - first) as usize)
            .copied()
            .collect()
    }

    /// Asks the model about the audio so far for `pause`; the answer comes back as
    /// [`Answer::TurnScored`], also when the model could not judge it (a full queue refuses
    /// at once: the pause then ends as the silence policy would end it). A decision still
    /// running for an earlier pause is dropped.
    pub fn score(&mut self, pause: u64, answers: &mpsc::Sender<Answer>) {
        self.cancel();
        let audio = self.judged();
        tracing::debug!(
            pause,
            speech_end_s = self.speech_end_s,
            received_s = self.total as f64 / f64::from(TURN_RATE),
            judged_s = audio.len() as f64 / f64::from(TURN_RATE),
            "asking the end-of-turn model"
        );
        let model = self.model.clone();
        let answers = answers.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let result = model.score(&audio).await;
            metrics::turn_scored(started.elapsed(), result.is_ok());
            match result {
                Ok(probability) => {
                    tracing::debug!(
                        pause,
                        probability,
                        seconds = audio.len() as f64 / f64::from(TURN_RATE),
                        "end-of-turn model answered"
                    );
                    let _ = answers
                        .send(Answer::TurnScored(pause, Some(probability)))
                        .await;
                }
                Err(e) => {
                    tracing::debug!(pause, error = %e, "end-of-turn model did not judge");
                    let _ = answers.send(Answer::TurnScored(pause, None)).await;
                }
            }
        });
        self.scoring = Some(task.abort_handle());
    }

    /// Drops the decision in flight, if any.
    pub fn cancel(&mut self) {
        if let Some(task) = self.scoring.take() {
            task.abort();
        }
    }
}

impl Drop for TurnAudio {
    fn drop(&mut self) {
        self.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Never;

    #[async_trait::async_trait]
    impl TurnProvider for Never {
        fn provider(&self) -> &'static str {
            "test"
        }
        fn model(&self) -> &str {
            "never"
        }
        async fn score(&self, _: &[i16]) -> Result<f32, atlas_providers::ProviderError> {
            std::future::pending().await
        }
    }

    fn le(samples: impl Iterator<Item = i16>) -> Vec<u8> {
        samples.flat_map(i16::to_le_bytes).collect()
    }

    #[test]
    fn only_the_last_eight_seconds_are_kept_in_order() {
        let mut ear = TurnAudio::new(Arc::new(Never), TURN_RATE, 0.2);
        // 10 s in 20 ms frames, each sample numbered by its frame.
        for frame in 0..500i16 {
            ear.push(&le(std::iter::repeat_n(frame, 320)));
        }
        assert_eq!(ear.recent.len(), KEEP);
        assert_eq!(ear.recent.front(), Some(&100), "the first 2 s are gone");
        assert_eq!(ear.recent.back(), Some(&499));
        assert!(
            ear.recent
                .iter()
                .zip(ear.recent.iter().skip(1))
                .all(|(a, b)| a <= b)
        );
    }

    #[test]
    fn the_model_hears_the_speech_and_the_pause_after_it_not_what_came_later() {
        let mut ear = TurnAudio::new(Arc::new(Never), TURN_RATE, 0.2);
        // 3 s, each sample numbered by its 20 ms frame.
        for frame in 0..150i16 {
            ear.push(&le(std::iter::repeat_n(frame, 320)));
        }
        assert_eq!(ear.judged().len(), 48_000, "no end known: everything");
        ear.speech_ended(2.0);
        let judged = ear.judged();
        assert_eq!(judged.len(), 35_200, "speech up to 2 s and 0.2 s after");
        assert_eq!(judged.last(), Some(&109));
        // An end beyond what arrived, or before what is kept, leaves everything.
        ear.speech_ended(2.9);
        assert_eq!(ear.judged().len(), 48_000);
        // The turn's speech started at 1.5 s: half a second before it on (an earlier turn's
        // words are not this one's).
        ear.speech_ended(2.0);
        ear.speech_started(1.5);
        ear.speech_started(1.8);
        let judged = ear.judged();
        assert_eq!(judged.len(), 19_200, "1.0 s to 2.2 s");
        assert_eq!(judged.first(), Some(&50));
        ear.turn_ended();
        assert_eq!(ear.judged().len(), 35_200);
    }

    #[test]
    fn audio_at_another_rate_is_kept_at_the_model_rate() {
        let mut ear = TurnAudio::new(Arc::new(Never), 8_000, 0.2);
        // 1 s at 8 kHz.
        for _ in 0..50 {
            ear.push(&le(std::iter::repeat_n(1000, 160)));
        }
        let kept = ear.recent.len() as i64;
        assert!((kept - 16_000).abs() < 200, "{kept} samples for 1 s");
    }
}
