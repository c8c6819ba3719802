//! Per-turn timestamps and the latency breakdown derived from them.

use std::time::{Duration, Instant};

/// Moments in one turn's life; each is recorded once, the first time it happens.
#[derive(Clone, Debug, Default)]
pub struct TurnTimings {
    /// The user stopped speaking (from the audio clock), if known.
    pub end_of_speech: Option<Instant>,
    /// The final transcript / end of turn arrived.
    pub end_of_turn: Option<Instant>,
    /// The LLM request was sent.
    pub llm_request: Option<Instant>,
    /// The first LLM token arrived.
    pub llm_first_token: Option<Instant>,
    /// The first TTS request was sent.
    pub tts_request: Option<Instant>,
    /// The first TTS audio arrived.
    pub tts_first_audio: Option<Instant>,
}

/// Durations derived from [`TurnTimings`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// End of speech → final transcript.
    pub end_of_speech_to_final: Option<Duration>,
    /// LLM request → first token.
    pub llm_first_token: Option<Duration>,
    /// First TTS request → first audio.
    pub tts_first_audio: Option<Duration>,
    /// End of speech (or the reply's start when speech end is unknown) → first audio sent
    /// (the playout's measure, [`crate::session`]).
    pub to_first_audio: Option<Duration>,
    /// Time the turn waited for its tools (all rounds), when it called any.
    pub tools: Option<Duration>,
}

impl Latency {
    /// Each figure under the name metrics and traces give its stage: `stt_final`,
    /// `llm_first_token`, `tts_first_audio`, `first_audio`, `tools`.
    pub fn stages(&self) -> [(&'static str, Option<Duration>); 5] {
        [
            ("stt_final", self.end_of_speech_to_final),
            ("llm_first_token", self.llm_first_token),
            ("tts_first_audio", self.tts_first_audio),
            ("first_audio", self.to_first_audio),
            ("tools", self.tools),
        ]
    }
}

fn between(a: Option<Instant>, b: Option<Instant>) -> Option<Duration> {
    Some(b?.saturating_duration_since(a?))
}

/// Records `at` into `slot` unless it already holds a time.
pub fn mark(slot: &mut Option<Instant>, at: Instant) {
    if slot.is_none() {
        *slot = Some(at);
    }
}

impl TurnTimings {
    /// The breakdown for this turn.
    pub fn latency(&self) -> Latency {
        Latency {
            end_of_speech_to_final: between(self.end_of_speech, self.end_of_turn),
            llm_first_token: between(self.llm_request, self.llm_first_token),
            tts_first_audio: between(self.tts_request, self.tts_first_audio),
            to_first_audio: None,
            tools: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut t = TurnTimings {
            end_of_speech: Some(t0),
            ..Default::default()
        };
        mark(&mut t.end_of_turn, t0 + ms(150));
        mark(&mut t.llm_request, t0 + ms(151));
        mark(&mut t.llm_first_token, t0 + ms(451));
        mark(&mut t.llm_first_token, t0 + ms(999)); // second mark is ignored
        mark(&mut t.tts_request, t0 + ms(460));
        mark(&mut t.tts_first_audio, t0 + ms(660));
        let l = t.latency();
        assert_eq!(l.end_of_speech_to_final, Some(ms(150)));
        assert_eq!(l.llm_first_token, Some(ms(300)));
        assert_eq!(l.tts_first_audio, Some(ms(200)));
        assert_eq!(l.to_first_audio, None);
    }

    #[test]
    fn unknown_moments_give_no_durations() {
        let t = TurnTimings {
            end_of_turn: Some(Instant::now()),
            ..Default::default()
        };
        let l = t.latency();
        assert_eq!(l.end_of_speech_to_final, None);
        assert_eq!(l.llm_first_token, None);
    }
}
