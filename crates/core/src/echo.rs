//! The assistant's own voice heard back: telling it from the person.
//!
//! A client without echo cancellation (a laptop or phone on its loudspeaker) sends the
//! assistant's speech back through the microphone, and the recogniser transcribes it like
//! anything else. [`Echo`] remembers what the assistant said lately and judges a transcript
//! heard while it speaks, or within a window after it stopped, against those words: an
//! echo is a stretch of them with few recognition errors (a local alignment of the two word
//! sequences). Short transcripts are judged strictly, because a person who interrupts with
//! one of the assistant's words ("coffee" after "tea or coffee?") is not an echo; see
//! [`Echo::judge`].

use std::time::{Duration, Instant};

/// The assistant's words remembered, at most (older ones are forgotten first).
const MAX_WORDS: usize = 200;
/// Words of a transcript judged, at most: a longer one is the person's.
const MAX_HEARD: usize = 64;
/// Fewest words a transcript needs to be judged: fewer could be the person ("coffee" after
/// "tea or coffee?") as well as the echo, or the echo misheard (a recogniser's first partial
/// of a second of speech is often a wrong word or two).
pub const MIN_ECHO_WORDS: usize = 3;

/// What a transcript is, by its words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not the assistant's words (or nothing to judge against).
    Person,
    /// Too few words to tell, while the assistant's voice may come back: an interim
    /// transcript waits for more, a final one counts as the person's.
    Unsure,
    /// The assistant's own words coming back.
    Echo,
}

/// What the assistant said lately, and whether its voice can still come back.
#[derive(Debug)]
pub struct Echo {
    /// How long after the assistant stops its words still count as an echo (zero: never).
    window: Duration,
    /// The words, lower-cased without punctuation, each followed by a space.
    said: String,
    /// How many words `said` holds.
    count: usize,
    /// The assistant is speaking.
    speaking: bool,
    /// When it stopped.
    stopped: Option<Instant>,
}

impl Echo {
    /// A guard whose echoes may come up to `window` after the assistant stops (zero: off).
    pub fn new(window: Duration) -> Self {
        Echo {
            window,
            said: String::new(),
            count: 0,
            speaking: false,
            stopped: None,
        }
    }

    /// The assistant's words may come back now.
    fn live(&self, now: Instant) -> bool {
        !self.window.is_zero()
            && (self.speaking || self.stopped.is_some_and(|t| now < t + self.window))
    }

    /// The assistant says `text` (its words go out to be spoken).
    pub fn said(&mut self, text: &str, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        if !self.live(now) {
            self.said.clear();
            self.count = 0;
        }
        self.speaking = true;
        for word in words(text) {
            self.said.extend(word);
            self.said.push(' ');
            self.count += 1;
        }
        while self.count > MAX_WORDS {
            let first = self.said.find(' ').map_or(self.said.len(), |i| i + 1);
            self.said.drain(..first);
            self.count -= 1;
        }
    }

    /// The assistant stopped speaking at `now` (its reply ended or was cut).
    pub fn stopped(&mut self, now: Instant) {
        if std::mem::take(&mut self.speaking) {
            self.stopped = Some(now);
        }
    }

    /// Judges a transcript heard at `now`. Below [`MIN_ECHO_WORDS`] words it cannot tell.
    /// Otherwise it is an echo when a stretch of the assistant's recent words matches it with
    /// few errors: aligned word against word, a match scores 2 and a wrong, missing or extra
    /// word -1, and the best stretch must score at least `2n - 3e` for its `n` words,
    /// allowing `e = n / 3` errors.
    pub fn judge(&self, text: &str, now: Instant) -> Verdict {
        if !self.live(now) {
            return Verdict::Person;
        }
        let heard: Vec<String> = words(text).map(String::from_iter).collect();
        let n = heard.len();
        if n > MAX_HEARD {
            return Verdict::Person;
        }
        if n < MIN_ECHO_WORDS {
            return Verdict::Unsure;
        }
        let said: Vec<&str> = self.said.split_terminator(' ').collect();
        // Smith–Waterman over two rows.
        let mut prev = vec![0i32; said.len() + 1];
        let mut row = vec![0i32; said.len() + 1];
        let mut best = 0;
        for h in &heard {
            for (j, s) in said.iter().enumerate() {
                let diagonal = prev[j] + if h == s { 2 } else { -1 };
                let v = diagonal.max(prev[j + 1] - 1).max(row[j] - 1).max(0);
                row[j + 1] = v;
                best = best.max(v);
            }
            std::mem::swap(&mut prev, &mut row);
        }
        let n = n as i32;
        if best < 2 * n - 3 * (n / 3) {
            Verdict::Person
        } else {
            Verdict::Echo
        }
    }
}

/// The words of `text`, lower-cased, without punctuation; hyphens split words.
fn words(text: &str) -> impl Iterator<Item = impl Iterator<Item = char> + '_> + '_ {
    text.split(|c: char| c.is_whitespace() || c == '-')
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric() || *c == '\'')
                .flat_map(char::to_lowercase)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(1000);

    fn speaking(text: &str) -> (Echo, Instant) {
        let now = Instant::now();
        let mut echo = Echo::new(WINDOW);
        echo.said(text, now);
        (echo, now)
    }

    #[test]
    fn the_assistants_words_are_an_echo_even_misheard() {
        let (echo, now) = speaking("The capital of France is Paris. It is known for");
        assert_eq!(echo.judge("the capital of france", now), Verdict::Echo);
        assert_eq!(echo.judge("France is Paris, it is", now), Verdict::Echo);
        // Two of six words misheard, one of three missing.
        assert_eq!(
            echo.judge("the capital and friends is paris", now),
            Verdict::Echo
        );
        assert_eq!(echo.judge("capital france is", now), Verdict::Echo);
    }

    #[test]
    fn the_persons_own_words_are_not() {
        let (echo, now) = speaking("The capital of France is Paris. It is known for");
        assert_eq!(echo.judge("wait, what about Spain", now), Verdict::Person);
        assert_eq!(echo.judge("stop it now", now), Verdict::Person);
        // The assistant's words scattered through other words.
        assert_eq!(echo.judge("is it the capital", now), Verdict::Person);
        assert_eq!(echo.judge("the weather in paris", now), Verdict::Person);
    }

    #[test]
    fn a_word_or_two_cannot_be_told() {
        let (echo, now) = speaking("Would you like tea or coffee?");
        for heard in [
            "Coffee.",
            "or coffee",
            "coffee please",
            "stop",
            "Terrence?",
            "",
        ] {
            assert_eq!(echo.judge(heard, now), Verdict::Unsure, "{heard:?}");
        }
        echo_is_off_after(echo, now);
    }

    /// Once the window is over, nothing is unsure any more.
    fn echo_is_off_after(mut echo: Echo, now: Instant) {
        echo.stopped(now);
        assert_eq!(echo.judge("coffee", now + WINDOW), Verdict::Person);
    }

    #[test]
    fn words_come_back_only_within_the_window_after_the_assistant_stops() {
        let (mut echo, now) = speaking("The capital of France is Paris");
        let heard = "france is paris";
        echo.stopped(now);
        assert_eq!(echo.judge(heard, now + WINDOW / 2), Verdict::Echo);
        assert_eq!(echo.judge(heard, now + WINDOW), Verdict::Person);
        // The next reply starts afresh: the old words are forgotten.
        echo.said("Madrid is the capital of Spain", now + WINDOW * 2);
        assert_eq!(echo.judge(heard, now + WINDOW * 2), Verdict::Person);
        assert_eq!(
            echo.judge("capital of spain", now + WINDOW * 2),
            Verdict::Echo
        );
    }

    #[test]
    fn a_zero_window_turns_the_guard_off() {
        let now = Instant::now();
        let mut echo = Echo::new(Duration::ZERO);
        echo.said("The capital of France is Paris", now);
        assert_eq!(echo.judge("the capital of france", now), Verdict::Person);
    }

    #[test]
    fn only_the_latest_words_are_remembered() {
        let now = Instant::now();
        let mut echo = Echo::new(WINDOW);
        echo.said("alpha beta gamma", now);
        for _ in 0..MAX_WORDS {
            echo.said("la", now);
        }
        assert_eq!(echo.count, MAX_WORDS);
        assert_eq!(echo.judge("alpha beta gamma", now), Verdict::Person);
        assert_eq!(echo.judge("la la la", now), Verdict::Echo);
    }
}
