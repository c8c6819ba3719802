//! Voice activity detection and endpointing for the local recogniser.
//!
//! [`Endpointer`] runs earshot's detector on 16 ms frames of 16 kHz audio, reports when
//! speech starts (for barge-in) and cuts an utterance once the speaker has been silent for
//! the configured time, keeping a little audio from before the start so the first word is
//! whole.

use std::collections::VecDeque;

use earshot::Detector;

/// Samples per detector frame (16 ms at 16 kHz).
pub const FRAME: usize = 256;
/// The rate the detector and Whisper take.
pub const RATE: u32 = 16_000;

/// Endpointing settings.
#[derive(Clone, Debug)]
pub struct EndpointConfig {
    /// Frame score at or above which a frame is speech.
    pub threshold: f32,
    /// Speech this long in a row starts an utterance.
    pub start_ms: u32,
    /// Silence this long ends it.
    pub end_silence_ms: u32,
    /// Audio kept from before the start.
    pub preroll_ms: u32,
    /// Utterances are cut at this length even without a pause.
    pub max_utterance_ms: u32,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        EndpointConfig {
            threshold: 0.5,
            start_ms: 64,
            end_silence_ms: 500,
            preroll_ms: 250,
            max_utterance_ms: 30_000,
        }
    }
}

/// What the endpointer saw.
#[derive(Debug, PartialEq)]
pub enum VadEvent {
    /// Speech began at this sample (of the stream).
    SpeechStarted {
        /// Sample index.
        at: u64,
    },
    /// A complete utterance.
    Utterance(Utterance),
}

/// The audio of one utterance.
#[derive(Debug, PartialEq)]
pub struct Utterance {
    /// 16 kHz samples, from a little before the start to the end of the trailing pause.
    pub audio: Vec<i16>,
    /// Stream sample where the speech ended.
    pub speech_end: u64,
}

fn frames(ms: u32) -> usize {
    (ms as usize * RATE as usize / 1000).div_ceil(FRAME).max(1)
}

/// Splits a 16 kHz stream into utterances.
pub struct Endpointer {
    config: EndpointConfig,
    detector: Box<Detector>,
    /// Samples of the frame being filled.
    frame: Vec<i16>,
    /// Samples consumed (whole frames).
    consumed: u64,
    /// Recent frames while not in speech.
    preroll: VecDeque<i16>,
    speaking: bool,
    utterance: Vec<i16>,
    speech_run: usize,
    silence_run: usize,
    speech_end: u64,
}

impl Endpointer {
    /// A fresh endpointer.
    pub fn new(config: EndpointConfig) -> Self {
        Endpointer {
            detector: Detector::default_boxed(),
            frame: Vec::with_capacity(FRAME),
            consumed: 0,
            preroll: VecDeque::with_capacity(frames(config.preroll_ms) * FRAME),
            speaking: false,
            utterance: Vec::new(),
            speech_run: 0,
            silence_run: 0,
            speech_end: 0,
            config,
        }
    }

    /// Whether an utterance is in progress.
    pub fn in_speech(&self) -> bool {
        self.speaking
    }

    /// Feeds samples; events are appended to `out`.
    pub fn push(&mut self, samples: &[i16], out: &mut Vec<VadEvent>) {
        let mut rest = samples;
        while !rest.is_empty() {
            let take = (FRAME - self.frame.len()).min(rest.len());
            self.frame.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.frame.len() == FRAME {
                let frame = std::mem::take(&mut self.frame);
                self.on_frame(&frame, out);
                self.frame = frame;
                self.frame.clear();
            }
        }
    }

    fn on_frame(&mut self, frame: &[i16], out: &mut Vec<VadEvent>) {
        let voiced = self.detector.predict_i16(frame) >= self.config.threshold;
        self.consumed += FRAME as u64;
        if !self.speaking {
            let keep = frames(self.config.preroll_ms).max(frames(self.config.start_ms)) * FRAME;
            self.preroll.extend(frame.iter().copied());
            while self.preroll.len() > keep {
                self.preroll.pop_front();
            }
            self.speech_run = if voiced { self.speech_run + 1 } else { 0 };
            if self.speech_run >= frames(self.config.start_ms) {
                self.speaking = true;
                self.silence_run = 0;
                self.speech_end = self.consumed;
                self.utterance.clear();
                self.utterance.extend(self.preroll.drain(..));
                out.push(VadEvent::SpeechStarted {
                    at: self.consumed - (self.speech_run * FRAME) as u64,
                });
            }
            return;
        }
        self.utterance.extend_from_slice(frame);
        if voiced {
            self.silence_run = 0;
            self.speech_end = self.consumed;
        } else {
            self.silence_run += 1;
        }
        let max = self.config.max_utterance_ms as usize * RATE as usize / 1000;
        if self.silence_run >= frames(self.config.end_silence_ms) || self.utterance.len() >= max {
            out.push(VadEvent::Utterance(self.cut()));
        }
    }

    fn cut(&mut self) -> Utterance {
        self.speaking = false;
        self.speech_run = 0;
        self.silence_run = 0;
        self.preroll.clear();
        Utterance {
            audio: std::mem::take(&mut self.utterance),
            speech_end: self.speech_end,
        }
    }

    /// The utterance being spoken so far (from its pre-roll), while speech goes on.
    pub fn utterance_so_far(&self) -> Option<&[i16]> {
        self.speaking.then_some(self.utterance.as_slice())
    }

    /// Ends the utterance in progress now (push-to-talk release, end of stream); `None` when
    /// there is none.
    pub fn flush(&mut self) -> Option<Utterance> {
        if !self.speaking {
            return None;
        }
        self.utterance.extend_from_slice(&self.frame);
        self.frame.clear();
        Some(self.cut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(ms: usize, amplitude: f32) -> Vec<i16> {
        (0..ms * 16)
            .map(|i| {
                let t = i as f32 / 16_000.0;
                // A crude voiced sound: a 140 Hz buzz with formant-ish harmonics.
                let s = (2.0 * std::f32::consts::PI * 140.0 * t).sin()
                    + 0.6 * (2.0 * std::f32::consts::PI * 700.0 * t).sin()
                    + 0.4 * (2.0 * std::f32::consts::PI * 1200.0 * t).sin();
                (s * amplitude * 10_000.0) as i16
            })
            .collect()
    }

    #[test]
    fn silence_is_never_speech() {
        let mut ep = Endpointer::new(EndpointConfig::default());
        let mut out = Vec::new();
        ep.push(&vec![0i16; 16_000 * 3], &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert!(ep.flush().is_none());
    }

    #[test]
    fn odd_sized_chunks_are_framed() {
        let mut ep = Endpointer::new(EndpointConfig::default());
        let mut out = Vec::new();
        for chunk in vec![0i16; 1000].chunks(77) {
            ep.push(chunk, &mut out);
        }
        assert_eq!(ep.consumed, (1000 / FRAME * FRAME) as u64);
        assert_eq!(ep.frame.len(), 1000 % FRAME);
        let _ = tone(1, 0.0);
    }
}
