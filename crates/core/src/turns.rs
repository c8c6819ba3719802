//! The turn state machine: when the user's turn ends, when the user barges in, and which
//! short utterances ("mm-hm", "okay") are backchannels that must not interrupt.
//!
//! Inputs are recognition signals and client commands; outputs are [`Action`]s the caller
//! carries out. The machine knows nothing of providers: cloud endpointing (Deepgram
//! `speech_final` / `UtteranceEnd`), a local VAD and push-to-talk all arrive as [`Input`]s.
//!
//! # Turn policies
//! Under [`TurnPolicy::Silence`] the recogniser's endpointing ends the turn: a fixed stretch
//! of silence. Under [`TurnPolicy::Smart`] the same signal is only a *pause*: the machine asks
//! for the end-of-turn model's judgement of the audio so far ([`Action::ScoreTurn`]) and ends
//! the turn when the model says it is complete ([`Input::TurnScored`]) and no speech came
//! since, or else once the person has been silent for the policy's maximum silence (a
//! deadline, [`Turns::deadline`]). Speech that resumes cancels the pause: its score, late or
//! not, decides nothing. A turn never ends while the recogniser reports speech going on. A
//! pause the model cannot judge (it is busy or failed: [`Input::TurnUnjudged`]) is decided as
//! the silence policy would: once the person has been silent for the policy's `unjudged`
//! time, not its maximum silence.
//!
//! A recogniser that cuts utterances itself and transcribes them afterwards (the local one)
//! reports the cut first ([`Heard::SpeechEnded`]): the pause begins there, and the model
//! judges it while the words are being transcribed. A decision reached before the words
//! arrive waits for them: the turn ends with their final transcript, at once.
//!
//! # Drafts (preemptive replies)
//! With [`TurnConfig::drafts`] above zero, final words that do not end the turn yet (a
//! recogniser's `is_final` before its `speech_final`, or a pause the model is still judging)
//! are offered as a *draft* ([`Action::Draft`]): the caller may start answering them before
//! the turn ends, and keeps that work only if the turn ends with exactly those words. Words
//! that come after a draft void it ([`Action::DropDraft`]); at most `drafts` are offered per
//! turn.
//!
//! # Echo
//! With [`TurnConfig::echo_window`] set, transcripts of the assistant's own words heard back
//! through the person's microphone ([`Turns::said`] tells the machine what it says) are not
//! the person's: an interim one neither interrupts nor shows, a final one adds no words. An
//! interim transcript too short to tell waits for more words; a final one that short is the
//! person's (see [`crate::echo`]).

use std::time::{Duration, Instant};

use crate::echo::{Echo, Verdict};

/// How the end of the person's turn is decided.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TurnPolicy {
    /// The recogniser's endpointing (a fixed silence) ends the turn.
    Silence,
    /// The recogniser's endpointing marks a pause; the end-of-turn model decides.
    Smart {
        /// A score at or above this ends the turn (the model's probability that it is
        /// complete).
        threshold: f32,
        /// Silence after the end of speech that ends the turn whatever the model said (or
        /// if it never answered).
        max_silence: Duration,
        /// Silence after the end of speech that ends the turn when the model cannot judge
        /// the pause: what the silence policy would have waited (at most `max_silence`).
        unjudged: Duration,
    },
}

/// Behaviour switches.
#[derive(Clone, Debug)]
pub struct TurnConfig {
    /// Phrases that, said alone while the assistant speaks, do not interrupt it.
    pub backchannels: Vec<String>,
    /// The recogniser sends interim transcripts soon after speech starts. Without them (the
    /// local recogniser) the user barges in as soon as speech starts; with them, once the
    /// first words are heard (so a cough or a backchannel does not cut the reply).
    pub partials: bool,
    /// Fewest letters a transcript needs before it can interrupt (filters noise blips).
    pub min_interrupt_chars: usize,
    /// How the end of a turn is decided.
    pub policy: TurnPolicy,
    /// Drafts offered per turn at most (0: none; answers start when the turn ends).
    pub drafts: u32,
    /// How long after the assistant stops speaking its words heard back are still taken for
    /// an echo (zero: never; for clients that cancel their own echo).
    pub echo_window: Duration,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            backchannels: [
                "mm-hm", "mhm", "mm", "hmm", "uh-huh", "uh huh", "okay", "ok", "yeah", "yep",
                "right", "i see", "got it",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            partials: true,
            min_interrupt_chars: 2,
            policy: TurnPolicy::Silence,
            drafts: 0,
            echo_window: Duration::ZERO,
        }
    }
}

/// Recognition signals: what the recogniser heard.
#[derive(Clone, Copy, Debug)]
pub enum Heard<'a> {
    /// Interim transcript of the words not yet final.
    Partial(&'a str),
    /// Final transcript of a stretch of speech.
    Final {
        /// The final text (may be empty).
        text: &'a str,
        /// The recogniser's endpointing says the utterance ended.
        speech_final: bool,
        /// When the user stopped speaking, if the caller can tell.
        end_of_speech: Option<Instant>,
    },
    /// The recogniser saw a gap after the last word (Deepgram `UtteranceEnd`).
    UtteranceEnd {
        /// When the user stopped speaking, if the caller can tell.
        end_of_speech: Option<Instant>,
    },
    /// Voice activity began.
    SpeechStarted,
    /// The recogniser's own detector cut the utterance here; its final transcript follows.
    SpeechEnded {
        /// When the user stopped speaking, if the caller can tell.
        end_of_speech: Option<Instant>,
    },
}

/// What happened.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    /// A recognition signal.
    Heard(Heard<'a>),
    /// Push-to-talk released (`input.commit`).
    Commit,
    /// The client asked to stop the reply (`response.cancel`).
    Cancel,
    /// A typed user turn: complete by itself, answered like a final transcript.
    Text {
        /// What the user typed.
        text: &'a str,
    },
    /// The reply for `turn_id` finished on its own.
    ResponseFinished {
        /// The turn.
        turn_id: u64,
    },
    /// The end-of-turn model's answer to [`Action::ScoreTurn`].
    TurnScored {
        /// The pause it was asked for.
        pause: u64,
        /// Its probability that the turn is complete.
        probability: f32,
    },
    /// The end-of-turn model will not answer [`Action::ScoreTurn`] (busy, or failed).
    TurnUnjudged {
        /// The pause it was asked for.
        pause: u64,
    },
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Show the user's words so far.
    Partial(String),
    /// Ask the recogniser to finalise what it has (push-to-talk).
    Finalize,
    /// Ask the end-of-turn model whether the turn is complete, judging the audio heard up to
    /// now; answer with [`Input::TurnScored`] for `pause`.
    ScoreTurn {
        /// The pause (a new number for each).
        pause: u64,
    },
    /// Stop the reply for `turn_id` at once.
    Interrupt {
        /// The turn being cut off.
        turn_id: u64,
    },
    /// The words so far may be the whole turn: a reply to them may start now, to be kept if
    /// the turn ends with exactly `text` (its [`Action::EndOfTurn`] will say so).
    Draft {
        /// The turn's words so far.
        text: String,
        /// When the user stopped speaking, if known.
        end_of_speech: Option<Instant>,
    },
    /// The person went on after the last draft: it will not be the turn.
    DropDraft,
    /// The user's turn is complete: reply to it.
    EndOfTurn {
        /// New turn number, from 1.
        turn_id: u64,
        /// The user's words.
        text: String,
        /// When the user stopped speaking, if known.
        end_of_speech: Option<Instant>,
    },
}

/// A pause the end-of-turn model judges.
#[derive(Clone, Copy, Debug)]
struct Pause {
    /// Its number.
    id: u64,
    /// When the speech before it ended.
    since: Instant,
    /// When its maximum silence runs out.
    deadline: Instant,
    /// Opened at the recogniser's cut: the final transcript of the speech before it has not
    /// arrived yet.
    awaiting_words: bool,
    /// Decided (a complete score, or the maximum silence) while awaiting the words: the turn
    /// ends when they arrive.
    decided: bool,
}

/// Turn-taking state of one session.
#[derive(Debug)]
pub struct Turns {
    config: TurnConfig,
    /// Backchannel phrases split into words, for matching.
    backchannel_words: Vec<Vec<String>>,
    /// Final text of the user's turn in progress.
    pending: String,
    /// Latest interim text not yet covered by a final.
    partial: String,
    /// End of speech of the latest final, if known.
    pending_eos: Option<Instant>,
    /// Push-to-talk released; end the turn at the next final.
    commit_requested: bool,
    /// Number of the last turn started.
    last_turn: u64,
    /// The turn whose reply is in flight.
    responding: Option<u64>,
    /// Under the smart policy, the pause being judged.
    pause: Option<Pause>,
    /// Number of the last pause.
    last_pause: u64,
    /// When the recogniser last reported speech starting.
    speech_started: Option<Instant>,
    /// Drafts offered this turn.
    drafts: u32,
    /// The last draft offered still stands (no words came after it).
    drafted: bool,
    /// What the assistant said lately, to tell its echo from the person.
    echo: Echo,
}

impl Turns {
    /// A fresh state machine; `last_turn` lets a resumed session continue its numbering.
    pub fn new(config: TurnConfig, last_turn: u64) -> Self {
        let backchannel_words = config.backchannels.iter().map(|p| words(p)).collect();
        let echo = Echo::new(config.echo_window);
        Turns {
            echo,
            config,
            backchannel_words,
            pending: String::new(),
            partial: String::new(),
            pending_eos: None,
            commit_requested: false,
            last_turn,
            responding: None,
            pause: None,
            last_pause: 0,
            speech_started: None,
            drafts: 0,
            drafted: false,
        }
    }

    /// When the pause being judged ends the turn by its maximum silence, if one is.
    pub fn deadline(&self) -> Option<Instant> {
        self.pause.filter(|p| !p.decided).map(|p| p.deadline)
    }

    /// Ends the turn if the pause's maximum silence has run out at `now`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.deadline().is_some_and(|deadline| now >= deadline) {
            self.decide(out);
        }
    }

    /// The pause is decided: the turn ends now, or when the words before it arrive.
    fn decide(&mut self, out: &mut Vec<Action>) {
        match &mut self.pause {
            Some(p) if p.awaiting_words => p.decided = true,
            _ => self.end_turn(out),
        }
    }

    /// The turn whose reply is in flight, if any.
    pub fn responding(&self) -> Option<u64> {
        self.responding
    }

    /// Number of the last turn started.
    pub fn last_turn(&self) -> u64 {
        self.last_turn
    }

    /// The assistant says `text` at `now` (its words go out to be spoken).
    pub fn said(&mut self, text: &str, now: Instant) {
        self.echo.said(text, now);
    }

    /// Feeds one input that happened at `now`; the resulting actions are appended to `out` in
    /// the order to perform them.
    pub fn handle(&mut self, input: Input<'_>, now: Instant, out: &mut Vec<Action>) {
        let responding = self.responding.is_some();
        self.act(input, now, out);
        if responding && self.responding.is_none() {
            self.echo.stopped(now);
        }
    }

    fn act(&mut self, input: Input<'_>, now: Instant, out: &mut Vec<Action>) {
        match input {
            Input::Heard(Heard::Partial(text)) => {
                let text = text.trim();
                if text.is_empty() {
                    return;
                }
                match self.echo.judge(text, now, true) {
                    // The assistant's words heard back: as if nothing was heard.
                    Verdict::Echo => return,
                    // Too few words to tell from the echo: someone speaks (a pause is over),
                    // but nothing shows or interrupts until more words come.
                    Verdict::Unsure => {
                        self.pause = None;
                        return;
                    }
                    Verdict::Person => {}
                }
                // Words again: the person goes on.
                self.pause = None;
                self.drop_draft(out);
                self.partial.clear();
                self.partial.push_str(text);
                self.maybe_interrupt(text, out);
                out.push(Action::Partial(self.display()));
            }
            Input::Heard(Heard::Final {
                text,
                speech_final,
                end_of_speech,
            }) => {
                let mut text = text.trim();
                // Judged by when the words were spoken: a recogniser may transcribe the echo
                // of a reply's last words a while after it ended.
                let spoken = end_of_speech.map_or(now, |eos| eos.min(now));
                if !text.is_empty() && self.echo.judge(text, spoken, false) == Verdict::Echo {
                    // The assistant's own voice: heard as silence.
                    text = "";
                }
                self.partial.clear();
                if !text.is_empty() {
                    // More words than the last draft held.
                    self.drop_draft(out);
                    if !self.pending.is_empty() {
                        self.pending.push(' ');
                    }
                    self.pending.push_str(text);
                    // The turn's speech ends with its latest words: a piece without timing
                    // makes the end unknown rather than leaving an earlier piece's end.
                    self.pending_eos = end_of_speech;
                    self.words_arrived(end_of_speech);
                    self.maybe_interrupt(text, out);
                } else if let (Some(p), Some(eos)) = (&mut self.pause, end_of_speech)
                    && eos == p.since
                {
                    // Nothing was said before the cut (a noise): no words to wait for.
                    p.awaiting_words = false;
                }
                let turns = self.last_turn;
                if std::mem::take(&mut self.commit_requested) {
                    self.end_turn(out);
                } else if speech_final {
                    self.speech_ended(end_of_speech, now, out);
                }
                if !text.is_empty() && self.last_turn == turns {
                    self.offer_draft(out);
                }
            }
            Input::Heard(Heard::UtteranceEnd { end_of_speech }) => {
                // Only for words still waiting: an UtteranceEnd that arrives after its turn
                // ended must not date the next one.
                if self.pending_eos.is_none() && !self.pending.is_empty() {
                    self.pending_eos = end_of_speech;
                }
                self.speech_ended(end_of_speech, now, out);
            }
            Input::Heard(Heard::SpeechEnded { end_of_speech }) => {
                self.speech_cut(end_of_speech, now, out);
            }
            Input::Heard(Heard::SpeechStarted) => {
                // The person goes on (or a noise): the recogniser reports its end again. A
                // draft stands until words come (a cough adds none).
                self.pause = None;
                self.speech_started = Some(now);
                if !self.config.partials
                    && let Some(turn_id) = self.responding.take()
                {
                    out.push(Action::Interrupt { turn_id });
                }
            }
            Input::Commit => {
                if self.partial.is_empty() && !self.pending.is_empty() {
                    self.end_turn(out);
                } else {
                    self.commit_requested = true;
                    out.push(Action::Finalize);
                }
            }
            Input::Cancel => {
                if let Some(turn_id) = self.responding.take() {
                    out.push(Action::Interrupt { turn_id });
                }
            }
            Input::Text { text } => {
                let text = text.trim();
                if text.is_empty() {
                    return;
                }
                if !self.pending.is_empty() {
                    self.pending.push(' ');
                }
                self.pending.push_str(text);
                // A typed turn reports its own figures, from the moment it arrived.
                self.pending_eos = None;
                self.end_turn(out);
            }
            Input::ResponseFinished { turn_id } => {
                if self.responding == Some(turn_id) {
                    self.responding = None;
                }
            }
            Input::TurnScored { pause, probability } => {
                let TurnPolicy::Smart { threshold, .. } = self.config.policy else {
                    return;
                };
                if self.pause.is_some_and(|p| p.id == pause) && probability >= threshold {
                    self.decide(out);
                }
            }
            Input::TurnUnjudged { pause } => {
                let TurnPolicy::Smart { unjudged, .. } = self.config.policy else {
                    return;
                };
                if let Some(p) = &mut self.pause
                    && p.id == pause
                {
                    p.deadline = p.deadline.min(p.since + unjudged);
                    self.expire(now, out);
                }
            }
        }
    }

    /// The recogniser reports the end of speech (endpointing): under the silence policy the
    /// turn ends; under the smart policy a pause begins, unless one is already being judged
    /// with no speech since (and if that one was decided while its words were transcribed,
    /// they are in now: the turn ends).
    fn speech_ended(
        &mut self,
        end_of_speech: Option<Instant>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let TurnPolicy::Smart { max_silence, .. } = self.config.policy else {
            return self.end_turn(out);
        };
        if let Some(p) = self.pause {
            // Judged while the words were transcribed: they are here now.
            if p.decided && !p.awaiting_words {
                self.end_turn(out);
            }
            return;
        }
        let silent_since = end_of_speech.map_or(now, |eos| eos.min(now));
        // A late transcript: the person spoke again after the speech it ends (a local
        // recogniser transcribes while they go on). No pause: the recogniser will report the
        // end of what they are saying now.
        let resumed = self.speech_started.is_some_and(|t| t > silent_since);
        if self.pending.is_empty() || resumed {
            return;
        }
        self.open_pause(silent_since, max_silence, false, out);
    }

    /// The recogniser cut the utterance (its words follow): under the smart policy a pause
    /// begins, judged while they are transcribed.
    fn speech_cut(&mut self, end_of_speech: Option<Instant>, now: Instant, out: &mut Vec<Action>) {
        let TurnPolicy::Smart { max_silence, .. } = self.config.policy else {
            return;
        };
        let silent_since = end_of_speech.map_or(now, |eos| eos.min(now));
        let resumed = self.speech_started.is_some_and(|t| t > silent_since);
        if resumed || self.pause.is_some_and(|p| p.since >= silent_since) {
            return;
        }
        self.open_pause(silent_since, max_silence, true, out);
    }

    fn open_pause(
        &mut self,
        since: Instant,
        max_silence: Duration,
        awaiting_words: bool,
        out: &mut Vec<Action>,
    ) {
        self.last_pause += 1;
        self.pause = Some(Pause {
            id: self.last_pause,
            since,
            deadline: since + max_silence,
            awaiting_words,
            decided: false,
        });
        out.push(Action::ScoreTurn {
            pause: self.last_pause,
        });
    }

    /// Words of speech that ended at `end_of_speech` arrived: those spoken before the pause
    /// being judged belong to it (the cut's transcript ends where the pause starts); later
    /// ones, or ones of unknown timing, void it.
    fn words_arrived(&mut self, end_of_speech: Option<Instant>) {
        let Some(p) = &mut self.pause else {
            return;
        };
        match end_of_speech {
            // The cut's own words (the recogniser reports the same moment for both): a
            // decision about the pause can end the turn now. Words even a millisecond later
            // were spoken after the pause began.
            Some(eos) if eos == p.since => p.awaiting_words = false,
            // Words from before the cut, transcribed late: the pause stands.
            Some(eos) if eos < p.since => {}
            _ => self.pause = None,
        }
    }

    /// Offers the words so far as a draft, within the turn's allowance.
    fn offer_draft(&mut self, out: &mut Vec<Action>) {
        // Not while a reply plays: it is answered first, and the words may be a backchannel.
        if self.pending.is_empty() || self.responding.is_some() || self.drafts >= self.config.drafts
        {
            return;
        }
        self.drafts += 1;
        self.drafted = true;
        out.push(Action::Draft {
            text: self.pending.clone(),
            end_of_speech: self.pending_eos,
        });
    }

    /// More is coming than the last draft held.
    fn drop_draft(&mut self, out: &mut Vec<Action>) {
        if std::mem::take(&mut self.drafted) {
            out.push(Action::DropDraft);
        }
    }

    fn display(&self) -> String {
        match (self.pending.is_empty(), self.partial.is_empty()) {
            (true, _) => self.partial.clone(),
            (false, true) => self.pending.clone(),
            (false, false) => format!("{} {}", self.pending, self.partial),
        }
    }

    fn maybe_interrupt(&mut self, text: &str, out: &mut Vec<Action>) {
        let Some(turn_id) = self.responding else {
            return;
        };
        let letters = text.chars().filter(|c| c.is_alphanumeric()).count();
        // Words still coming may complete a backchannel ("got" … "it"): not yet an interruption.
        if letters < self.config.min_interrupt_chars || self.is_backchannel(&self.display(), true) {
            return;
        }
        self.responding = None;
        out.push(Action::Interrupt { turn_id });
    }

    fn end_turn(&mut self, out: &mut Vec<Action>) {
        self.pause = None;
        if self.pending.is_empty() {
            return;
        }
        self.drafts = 0;
        self.drafted = false;
        let text = std::mem::take(&mut self.pending);
        let end_of_speech = self.pending_eos.take();
        self.partial.clear();
        if let Some(turn_id) = self.responding {
            if self.is_backchannel(&text, false) {
                return; // "mm-hm" while the assistant talks: not a turn
            }
            self.responding = None;
            out.push(Action::Interrupt { turn_id });
        }
        self.last_turn += 1;
        self.responding = Some(self.last_turn);
        out.push(Action::EndOfTurn {
            turn_id: self.last_turn,
            text,
            end_of_speech,
        });
    }

    /// Whether `text` consists only of backchannel phrases; with `unfinished`, the last of them
    /// may still be missing its last words (an interim transcript).
    fn is_backchannel(&self, text: &str, unfinished: bool) -> bool {
        let ws = words(text);
        if ws.is_empty() {
            return false;
        }
        let mut i = 0;
        'outer: while i < ws.len() {
            for phrase in &self.backchannel_words {
                if !phrase.is_empty() && ws[i..].starts_with(phrase) {
                    i += phrase.len();
                    continue 'outer;
                }
            }
            let rest = &ws[i..];
            return unfinished
                && self
                    .backchannel_words
                    .iter()
                    .any(|phrase| phrase.len() > rest.len() && phrase.starts_with(rest));
        }
        true
    }
}

/// Lower-cased words with punctuation removed and hyphens treated as spaces.
fn words(text: &str) -> Vec<String> {
    crate::echo::words(text).map(String::from_iter).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(t: &mut Turns, input: Input<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        t.handle(input, Instant::now(), &mut out);
        out
    }

    fn partial(text: &str) -> Input<'_> {
        Input::Heard(Heard::Partial(text))
    }

    fn fin(text: &str, speech_final: bool) -> Input<'_> {
        Input::Heard(Heard::Final {
            text,
            speech_final,
            end_of_speech: None,
        })
    }

    /// Turns whose first turn, `text`, is being answered.
    fn replying(text: &str) -> Turns {
        let mut t = Turns::new(TurnConfig::default(), 0);
        run(&mut t, fin(text, true));
        t
    }

    const UTTERANCE_END: Input<'static> = Input::Heard(Heard::UtteranceEnd {
        end_of_speech: None,
    });
    const SPEECH_STARTED: Input<'static> = Input::Heard(Heard::SpeechStarted);

    #[test]
    fn finals_accumulate_until_speech_final() {
        let mut t = Turns::new(TurnConfig::default(), 0);
        assert_eq!(
            run(&mut t, partial("what is")),
            vec![Action::Partial("what is".into())]
        );
        assert!(run(&mut t, fin("What is the weather", false)).is_empty());
        assert_eq!(
            run(&mut t, partial("in")),
            vec![Action::Partial("What is the weather in".into())]
        );
        let eos = Instant::now();
        let out = run(
            &mut t,
            Input::Heard(Heard::Final {
                text: "in Paris?",
                speech_final: true,
                end_of_speech: Some(eos),
            }),
        );
        assert_eq!(
            out,
            vec![Action::EndOfTurn {
                turn_id: 1,
                text: "What is the weather in Paris?".into(),
                end_of_speech: Some(eos)
            }]
        );
        assert_eq!(t.responding(), Some(1));
    }

    #[test]
    fn utterance_end_closes_a_turn_without_speech_final() {
        let mut t = Turns::new(TurnConfig::default(), 0);
        run(&mut t, fin("Hello there", false));
        let out = run(&mut t, UTTERANCE_END);
        assert!(matches!(&out[..], [Action::EndOfTurn { turn_id: 1, .. }]));
        // A second UtteranceEnd with nothing pending does nothing.
        assert!(run(&mut t, UTTERANCE_END).is_empty());
        // Empty speech_final with nothing pending does nothing.
        assert!(run(&mut t, fin("", true)).is_empty());
    }

    #[test]
    fn speech_during_a_reply_interrupts_it() {
        let mut t = replying("Tell me a story");
        assert_eq!(
            run(&mut t, partial("wait stop")),
            vec![
                Action::Interrupt { turn_id: 1 },
                Action::Partial("wait stop".into())
            ]
        );
        assert_eq!(t.responding(), None);
        let out = run(&mut t, fin("Wait, stop.", true));
        assert!(matches!(&out[..], [Action::EndOfTurn { turn_id: 2, .. }]));
    }

    /// While a reply plays, `interim` then `final_text` are heard: the interim transcript is
    /// only shown, the final is no turn, and the reply goes on.
    fn ignored_while_replying(interim: &str, final_text: &str) -> Turns {
        let mut t = replying("Tell me a story");
        assert_eq!(
            run(&mut t, partial(interim)),
            vec![Action::Partial(interim.into())]
        );
        assert!(run(&mut t, fin(final_text, true)).is_empty());
        assert_eq!(t.responding(), Some(1));
        t
    }

    #[test]
    fn backchannels_do_not_interrupt() {
        let mut t = ignored_while_replying("mm-hm", "Mm-hm, okay.");
        // Once the reply is over, "okay" is a turn of its own.
        run(&mut t, Input::ResponseFinished { turn_id: 1 });
        let out = run(&mut t, fin("Okay.", true));
        assert!(matches!(&out[..], [Action::EndOfTurn { turn_id: 2, .. }]));
    }

    /// Turns answering "Tell me a story" with `reply`, at `now`, guarding against its echo.
    fn saying(reply: &str, now: Instant) -> Turns {
        let config = TurnConfig {
            echo_window: Duration::from_secs(1),
            ..TurnConfig::default()
        };
        let mut t = Turns::new(config, 0);
        let mut out = Vec::new();
        t.handle(fin("Tell me a story", true), now, &mut out);
        t.said(reply, now);
        t
    }

    #[test]
    fn the_assistants_voice_heard_back_neither_interrupts_nor_speaks_for_the_person() {
        let now = Instant::now();
        let mut t = saying("Once upon a time there was a fox who lived", now);
        // Its words, misheard and all: nothing shown, nothing cut, no turn.
        assert!(at(&mut t, partial("once upon"), now).is_empty());
        assert!(at(&mut t, partial("once upon a dime there"), now).is_empty());
        assert!(at(&mut t, fin("Once upon a dime, there was.", true), now).is_empty());
        assert_eq!(t.responding(), Some(1));
        // The person's own words interrupt as ever, and only theirs make the turn.
        // (An interim transcript's last word may be cut off: it is not judged.)
        assert!(at(&mut t, partial("wait a moment"), now).is_empty());
        let out = at(&mut t, partial("wait a moment please"), now);
        assert_eq!(out[0], Action::Interrupt { turn_id: 1 });
        let out = at(&mut t, fin("Wait a moment please.", true), now);
        assert!(
            matches!(&out[..], [Action::EndOfTurn { turn_id: 2, text, .. }] if text == "Wait a moment please."),
            "{out:?}"
        );
    }

    #[test]
    fn a_word_of_the_assistants_waits_for_its_final_and_then_is_the_persons() {
        let now = Instant::now();
        let mut t = saying("Would you like tea or coffee?", now);
        assert!(at(&mut t, partial("coffee"), now).is_empty());
        let out = at(&mut t, fin("Coffee.", true), now);
        assert!(
            matches!(
                &out[..],
                [
                    Action::Interrupt { turn_id: 1 },
                    Action::EndOfTurn { turn_id: 2, .. }
                ]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn the_echo_of_a_reply_just_over_is_no_turn_but_later_words_are() {
        let now = Instant::now();
        let mut t = saying("The capital of France is Paris.", now);
        let over = now + Duration::from_secs(2);
        at(&mut t, Input::ResponseFinished { turn_id: 1 }, over);
        let echo = fin("The capital of France is Paris.", true);
        // Its last words, transcribed as it ended: silence.
        assert!(at(&mut t, echo, over + Duration::from_millis(900)).is_empty());
        // Transcribed late (a local recogniser), but spoken within the window: silence too.
        let late = Input::Heard(Heard::Final {
            text: "The capital of France is Paris.",
            speech_final: true,
            end_of_speech: Some(over + Duration::from_millis(300)),
        });
        assert!(at(&mut t, late, over + Duration::from_millis(1_800)).is_empty());
        // The same words said after the window are the person's.
        let out = at(&mut t, echo, over + Duration::from_millis(1000));
        assert!(
            matches!(&out[..], [Action::EndOfTurn { turn_id: 2, .. }]),
            "{out:?}"
        );
    }

    #[test]
    fn words_too_few_to_tell_from_the_echo_still_end_a_pause() {
        let now = Instant::now();
        let config = TurnConfig {
            echo_window: Duration::from_secs(1),
            policy: TurnPolicy::Smart {
                threshold: 0.5,
                max_silence: Duration::from_millis(1500),
                unjudged: Duration::from_millis(300),
            },
            ..TurnConfig::default()
        };
        let mut t = Turns::new(config, 0);
        at(
            &mut t,
            Input::Text {
                text: "Tell me a story",
            },
            now,
        );
        t.said("Once upon a time there was a fox", now);
        // The person says something while the reply plays, and pauses.
        let out = at(&mut t, fin("Hold on, I", true), now);
        let [
            Action::Interrupt { turn_id: 1 },
            Action::ScoreTurn { pause },
        ] = out[..]
        else {
            panic!("{out:?}");
        };
        // Two words: maybe the echo, maybe them going on. Speech goes on either way.
        assert!(at(&mut t, partial("a time"), now).is_empty());
        let scored = Input::TurnScored {
            pause,
            probability: 0.9,
        };
        assert!(at(&mut t, scored, now).is_empty(), "the pause was over");
    }

    #[test]
    fn without_a_window_the_assistants_words_are_heard_like_any_other() {
        let mut t = replying("Tell me a story");
        t.said("Once upon a time there was a fox", Instant::now());
        let out = run(&mut t, partial("once upon a time"));
        assert_eq!(out[0], Action::Interrupt { turn_id: 1 });
    }

    #[test]
    fn the_first_words_of_a_backchannel_wait_for_the_rest() {
        // "got" may become "got it": no interruption yet…
        let mut t = ignored_while_replying("got", "Got it.");
        // …but words that leave every phrase behind interrupt at once.
        let out = run(&mut t, partial("got to go"));
        assert_eq!(out[0], Action::Interrupt { turn_id: 1 });
        // A final that only begins a phrase is a turn: the speaker said no more.
        let mut t = replying("Tell me a story");
        let out = run(&mut t, fin("Got.", true));
        assert!(matches!(
            &out[..],
            [
                Action::Interrupt { turn_id: 1 },
                Action::EndOfTurn { turn_id: 2, .. }
            ]
        ));
    }

    #[test]
    fn noise_blips_do_not_interrupt() {
        let mut t = replying("Hi");
        let out = run(&mut t, partial("a"));
        assert_eq!(out, vec![Action::Partial("a".into())]);
        assert_eq!(t.responding(), Some(1));
    }

    #[test]
    fn push_to_talk_finalizes_then_ends_the_turn() {
        let mut t = Turns::new(TurnConfig::default(), 0);
        run(&mut t, partial("book a table"));
        assert_eq!(run(&mut t, Input::Commit), vec![Action::Finalize]);
        let out = run(&mut t, fin("Book a table.", false));
        assert!(
            matches!(&out[..], [Action::EndOfTurn { turn_id: 1, text, .. }] if text == "Book a table.")
        );
        // Commit with final text already pending ends the turn at once.
        run(&mut t, Input::ResponseFinished { turn_id: 1 });
        run(&mut t, fin("For two.", false));
        let out = run(&mut t, Input::Commit);
        assert!(matches!(&out[..], [Action::EndOfTurn { turn_id: 2, .. }]));
    }

    #[test]
    fn cancel_and_stale_finish() {
        let mut t = Turns::new(TurnConfig::default(), 4);
        run(&mut t, fin("Go on", true));
        assert_eq!(t.responding(), Some(5));
        run(&mut t, Input::ResponseFinished { turn_id: 3 });
        assert_eq!(t.responding(), Some(5));
        assert_eq!(
            run(&mut t, Input::Cancel),
            vec![Action::Interrupt { turn_id: 5 }]
        );
        assert!(run(&mut t, Input::Cancel).is_empty());
    }

    #[test]
    fn vad_interrupts_when_configured() {
        let mut t = Turns::new(
            TurnConfig {
                partials: false,
                ..TurnConfig::default()
            },
            0,
        );
        assert!(run(&mut t, SPEECH_STARTED).is_empty());
        run(&mut t, fin("Hello", true));
        assert_eq!(
            run(&mut t, SPEECH_STARTED),
            vec![Action::Interrupt { turn_id: 1 }]
        );
    }

    fn drafting(config: TurnConfig) -> Turns {
        Turns::new(
            TurnConfig {
                drafts: 2,
                ..config
            },
            0,
        )
    }

    fn drafted(out: &[Action]) -> Option<&str> {
        out.iter().find_map(|a| match a {
            Action::Draft { text, .. } => Some(text.as_str()),
            _ => None,
        })
    }

    #[test]
    fn stable_words_are_drafted_and_later_words_drop_the_draft() {
        let mut t = drafting(TurnConfig::default());
        assert_eq!(
            drafted(&run(&mut t, fin("Book a table", false))),
            Some("Book a table")
        );
        assert_eq!(
            run(&mut t, partial("for")),
            [
                Action::DropDraft,
                Action::Partial("Book a table for".into())
            ]
        );
        // A final with more words drops and drafts anew; the endpoint ends the turn with them.
        let out = run(&mut t, fin("for two", false));
        assert_eq!(drafted(&out), Some("Book a table for two"));
        assert!(
            !out.contains(&Action::DropDraft),
            "the partial dropped it already"
        );
        let out = run(&mut t, fin("", true));
        assert!(
            matches!(&out[..], [Action::EndOfTurn { text, .. }] if text == "Book a table for two")
        );
        // The allowance was two: a third offer this turn would not come; a new turn has its own.
        run(&mut t, Input::ResponseFinished { turn_id: 1 });
        assert_eq!(drafted(&run(&mut t, fin("Thanks", false))), Some("Thanks"));
    }

    #[test]
    fn a_noise_after_a_draft_keeps_it_until_words_come() {
        let mut t = drafting(TurnConfig::default());
        run(&mut t, fin("What time is it", false));
        assert_eq!(
            run(&mut t, SPEECH_STARTED),
            [],
            "a cough: no words, the draft stands"
        );
        let out = run(&mut t, fin("", true));
        assert!(matches!(&out[..], [Action::EndOfTurn { text, .. }] if text == "What time is it"));
    }

    #[test]
    fn no_draft_while_a_reply_plays_or_when_the_words_end_the_turn() {
        let mut t = drafting(TurnConfig::default());
        let out = run(&mut t, fin("Hello", true));
        assert_eq!(drafted(&out), None, "the turn ended: no draft");
        // "mm-hm" while the reply plays: answered first, and maybe a backchannel.
        assert_eq!(drafted(&run(&mut t, fin("mm-hm", false))), None);
    }

    #[test]
    fn under_the_smart_policy_a_judged_pause_is_drafted() {
        let mut t = drafting(TurnConfig {
            policy: TurnPolicy::Smart {
                threshold: 0.5,
                max_silence: Duration::from_millis(1500),
                unjudged: Duration::from_millis(300),
            },
            ..TurnConfig::default()
        });
        let out = run(&mut t, fin("What is the weather", true));
        assert!(out.contains(&Action::ScoreTurn { pause: 1 }));
        assert_eq!(drafted(&out), Some("What is the weather"));
        let out = run(&mut t, scored(1, 0.9));
        assert!(
            matches!(&out[..], [Action::EndOfTurn { text, .. }] if text == "What is the weather")
        );
    }

    fn smart() -> Turns {
        Turns::new(
            TurnConfig {
                policy: TurnPolicy::Smart {
                    threshold: 0.5,
                    max_silence: Duration::from_millis(1500),
                    unjudged: Duration::from_millis(300),
                },
                ..TurnConfig::default()
            },
            0,
        )
    }

    fn at(t: &mut Turns, input: Input<'_>, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        t.handle(input, now, &mut out);
        out
    }

    fn ended(out: &[Action]) -> Option<&str> {
        out.iter().find_map(|a| match a {
            Action::EndOfTurn { text, .. } => Some(text.as_str()),
            _ => None,
        })
    }

    fn scored(pause: u64, probability: f32) -> Input<'static> {
        Input::TurnScored { pause, probability }
    }

    #[test]
    fn under_the_smart_policy_endpointing_is_a_pause_the_model_judges() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = smart();
        let final_at = |text, eos| {
            Input::Heard(Heard::Final {
                text,
                speech_final: true,
                end_of_speech: Some(eos),
            })
        };
        // The endpoint asks for a score; the turn is not over yet.
        let out = at(&mut t, final_at("I would like to", ms(1000)), ms(1200));
        assert_eq!(out, vec![Action::ScoreTurn { pause: 1 }]);
        assert_eq!(
            t.deadline(),
            Some(ms(2500)),
            "max silence from the end of speech"
        );
        // A second endpoint signal for the same silence asks nothing more.
        assert!(at(&mut t, UTTERANCE_END, ms(1250)).is_empty());
        // The model thinks the person has more to say: nothing ends.
        assert!(at(&mut t, scored(1, 0.2), ms(1260)).is_empty());
        assert_eq!(t.responding(), None);
        // They go on; the pause is void, and so is any late answer about it.
        assert!(at(&mut t, SPEECH_STARTED, ms(1700)).is_empty());
        assert_eq!(
            t.deadline(),
            None,
            "no maximum silence while speech goes on"
        );
        assert!(at(&mut t, scored(1, 0.99), ms(1710)).is_empty());
        let mut out = Vec::new();
        t.expire(ms(5000), &mut out);
        assert!(out.is_empty(), "no turn ends while the person speaks");
        // The next endpoint is a new pause; a complete score ends the turn with all the words.
        let out = at(&mut t, final_at("book a table.", ms(2400)), ms(2600));
        assert_eq!(out, vec![Action::ScoreTurn { pause: 2 }]);
        let out = at(&mut t, scored(2, 0.9), ms(2650));
        assert_eq!(ended(&out), Some("I would like to book a table."));
        assert_eq!(t.deadline(), None);
        assert_eq!(t.responding(), Some(1));
    }

    #[test]
    fn under_the_smart_policy_the_maximum_silence_ends_a_turn_the_model_doubts() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = smart();
        at(&mut t, fin("So the thing is", true), ms(100));
        at(&mut t, scored(1, 0.1), ms(150));
        let mut out = Vec::new();
        t.expire(ms(1599), &mut out);
        assert!(out.is_empty());
        t.expire(ms(1600), &mut out);
        assert_eq!(ended(&out), Some("So the thing is"));
        // A model that never answers: the maximum silence still ends the turn.
        run(&mut t, Input::ResponseFinished { turn_id: 1 });
        at(&mut t, fin("Hello?", true), ms(3000));
        let mut out = Vec::new();
        t.expire(ms(4500), &mut out);
        assert_eq!(ended(&out), Some("Hello?"));
        // A score for a pause that is over decides nothing.
        assert!(at(&mut t, scored(2, 1.0), ms(4600)).is_empty());
    }

    #[test]
    fn under_the_smart_policy_a_pause_the_model_cannot_judge_ends_as_silence_would_end_it() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let unjudged = |pause| Input::TurnUnjudged { pause };
        // Refused at once: the turn ends 300 ms after the end of speech, not 1,500 ms.
        let mut t = smart();
        at(&mut t, words("What time is it?", ms(1_000)), ms(1_200));
        assert!(at(&mut t, unjudged(1), ms(1_210)).is_empty());
        assert_eq!(t.deadline(), Some(ms(1_300)));
        let mut out = Vec::new();
        t.expire(ms(1_299), &mut out);
        assert!(out.is_empty());
        t.expire(ms(1_300), &mut out);
        assert_eq!(ended(&out), Some("What time is it?"));
        // Failed after that much silence: the turn ends at once.
        let mut t = smart();
        at(&mut t, words("What time is it?", ms(1_000)), ms(1_200));
        assert_eq!(
            ended(&at(&mut t, unjudged(1), ms(1_400))),
            Some("What time is it?")
        );
        // Judged while its words are transcribed: the turn ends when they arrive.
        let (mut t, ms) = cut_at_one_second();
        assert!(
            at(&mut t, unjudged(1), ms(1_310)).is_empty(),
            "no words yet"
        );
        assert_eq!(t.deadline(), None, "decided");
        assert_eq!(
            ended(&at(&mut t, words("Hello there.", ms(1_000)), ms(1_700))),
            Some("Hello there.")
        );
        // About a pause that is over, or once the person spoke again: nothing.
        let mut t = smart();
        at(&mut t, words("So the thing is", ms(1_000)), ms(1_200));
        at(&mut t, SPEECH_STARTED, ms(1_250));
        assert!(at(&mut t, unjudged(1), ms(1_400)).is_empty());
        assert_eq!(t.deadline(), None);
        assert!(at(&mut t, unjudged(7), ms(1_500)).is_empty());
        // Under the silence policy there is no pause to judge.
        let mut t = Turns::new(TurnConfig::default(), 0);
        assert!(at(&mut t, unjudged(1), ms(0)).is_empty());
    }

    #[test]
    fn under_the_smart_policy_a_late_transcript_of_speech_that_went_on_is_no_pause() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = smart();
        // Speech ends at 1.0 s and starts again at 1.5 s; the transcript of the first part
        // arrives at 1.6 s, while the person is speaking.
        at(&mut t, SPEECH_STARTED, ms(1_500));
        let late = Input::Heard(Heard::Final {
            text: "I would like to book a table for",
            speech_final: true,
            end_of_speech: Some(ms(1_000)),
        });
        assert!(at(&mut t, late, ms(1_600)).is_empty());
        assert_eq!(
            t.deadline(),
            None,
            "no maximum silence runs while they speak"
        );
        // The end of what they said next is the pause.
        let next = Input::Heard(Heard::Final {
            text: "four people tonight.",
            speech_final: true,
            end_of_speech: Some(ms(2_400)),
        });
        assert_eq!(
            at(&mut t, next, ms(2_500)),
            vec![Action::ScoreTurn { pause: 1 }]
        );
        assert_eq!(t.deadline(), Some(ms(3_900)));
    }

    #[test]
    fn under_the_smart_policy_new_words_void_the_pause() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        for resume in [partial("and then"), fin("and then", false)] {
            let mut t = smart();
            at(&mut t, fin("Tell me", true), ms(0));
            at(&mut t, resume, ms(300));
            assert!(at(&mut t, scored(1, 1.0), ms(310)).is_empty());
            assert_eq!(t.deadline(), None);
        }
        // Push-to-talk and typed turns end at once, whatever the policy.
        let mut t = smart();
        at(&mut t, fin("Book it", true), ms(0));
        let out = at(&mut t, Input::Commit, ms(10));
        assert_eq!(ended(&out), Some("Book it"));
        assert_eq!(t.deadline(), None);
    }

    fn cut(eos: Instant) -> Input<'static> {
        Input::Heard(Heard::SpeechEnded {
            end_of_speech: Some(eos),
        })
    }

    fn words(text: &str, eos: Instant) -> Input<'_> {
        Input::Heard(Heard::Final {
            text,
            speech_final: true,
            end_of_speech: Some(eos),
        })
    }

    /// A smart-policy machine whose recogniser cut speech that ended at 1 s (reported at
    /// 1.3 s), which opened pause 1; and its clock, in ms.
    fn cut_at_one_second() -> (Turns, impl Fn(u64) -> Instant) {
        let t0 = Instant::now();
        let ms = move |n| t0 + Duration::from_millis(n);
        let mut t = smart();
        assert_eq!(
            at(&mut t, cut(ms(1000)), ms(1300)),
            vec![Action::ScoreTurn { pause: 1 }]
        );
        (t, ms)
    }

    #[test]
    fn under_the_smart_policy_a_cut_is_judged_while_its_words_are_transcribed() {
        // The model decides first: the turn ends the moment the words arrive.
        let (mut t, ms) = cut_at_one_second();
        assert_eq!(t.deadline(), Some(ms(2500)));
        assert!(
            at(&mut t, scored(1, 0.9), ms(1340)).is_empty(),
            "no words yet"
        );
        assert_eq!(t.deadline(), None, "decided: no maximum silence runs");
        let out = at(
            &mut t,
            words("What is the capital of France?", ms(1000)),
            ms(1900),
        );
        assert_eq!(ended(&out), Some("What is the capital of France?"));
        assert!(out.contains(&Action::EndOfTurn {
            turn_id: 1,
            text: "What is the capital of France?".into(),
            end_of_speech: Some(ms(1000)),
        }));
        // The words first: the pause stands, and the score ends the turn.
        run(&mut t, Input::ResponseFinished { turn_id: 1 });
        assert_eq!(
            at(&mut t, cut(ms(5000)), ms(5300)),
            vec![Action::ScoreTurn { pause: 2 }]
        );
        assert!(at(&mut t, words("And of Spain?", ms(5000)), ms(5600)).is_empty());
        assert!(at(&mut t, UTTERANCE_END, ms(5601)).is_empty());
        let out = at(&mut t, scored(2, 0.8), ms(5650));
        assert_eq!(ended(&out), Some("And of Spain?"));
    }

    #[test]
    fn under_the_smart_policy_a_cut_waits_for_its_words_past_the_maximum_silence() {
        let (mut t, ms) = cut_at_one_second();
        assert!(at(&mut t, scored(1, 0.1), ms(1340)).is_empty());
        let mut out = Vec::new();
        t.expire(ms(2500), &mut out);
        assert!(
            out.is_empty(),
            "the silence decided, but the words are not in yet"
        );
        assert_eq!(t.deadline(), None);
        let out = at(&mut t, words("So the thing is", ms(1000)), ms(2700));
        assert_eq!(ended(&out), Some("So the thing is"));
        // A cut of noise: nothing to say, nothing ends, nothing waits.
        run(&mut t, Input::ResponseFinished { turn_id: 1 });
        at(&mut t, cut(ms(4000)), ms(4300));
        at(&mut t, scored(2, 1.0), ms(4350));
        assert!(at(&mut t, words("", ms(4000)), ms(4600)).is_empty());
        assert_eq!(t.deadline(), None);
        assert_eq!(t.last_turn(), 1);
    }

    #[test]
    fn under_the_smart_policy_words_from_before_a_cut_keep_its_pause_and_later_ones_void_it() {
        let (mut t, ms) = cut_at_one_second();
        // An earlier utterance's transcript, late: the pause stands.
        let earlier = Input::Heard(Heard::Final {
            text: "I would like",
            speech_final: false,
            end_of_speech: Some(ms(400)),
        });
        assert!(at(&mut t, earlier, ms(1400)).is_empty());
        assert_eq!(t.deadline(), Some(ms(2500)));
        // Words spoken after the cut: it was no pause; the end of those words is the next.
        let out = at(&mut t, words("a table for four.", ms(1800)), ms(2000));
        assert_eq!(out, vec![Action::ScoreTurn { pause: 2 }]);
        assert!(
            at(&mut t, scored(1, 1.0), ms(2010)).is_empty(),
            "pause 1 is over"
        );
        let out = at(&mut t, scored(2, 1.0), ms(2020));
        assert_eq!(ended(&out), Some("I would like a table for four."));
        // Speech starting again after a cut voids it too.
        let (mut t, ms) = cut_at_one_second();
        at(&mut t, SPEECH_STARTED, ms(1350));
        assert_eq!(t.deadline(), None);
        assert!(at(&mut t, scored(1, 1.0), ms(1400)).is_empty());
        assert!(at(&mut t, words("Hello", ms(1000)), ms(1500)).is_empty());
        assert_eq!(
            t.last_turn(),
            0,
            "a late transcript while they speak is no pause"
        );
    }

    #[test]
    fn cuts_are_ignored_under_the_silence_policy() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = Turns::new(TurnConfig::default(), 0);
        assert!(at(&mut t, cut(ms(1000)), ms(1300)).is_empty());
        let out = at(&mut t, words("Hi there", ms(1000)), ms(1500));
        assert_eq!(ended(&out), Some("Hi there"));
    }

    #[test]
    fn scores_are_ignored_under_the_silence_policy() {
        let mut t = Turns::new(TurnConfig::default(), 0);
        run(&mut t, fin("Hi", false));
        assert!(run(&mut t, scored(0, 1.0)).is_empty());
        assert_eq!(t.deadline(), None);
    }
}
