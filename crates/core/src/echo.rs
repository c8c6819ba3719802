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
/// Longest text held back as a word still being written; longer, it counts as written.
const MAX_UNFINISHED: usize = 64;
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
    /// The text after the last word boundary: a model writes in pieces that can split a
    /// word ("Par", "is"), so the last word counts once a boundary or the end comes.
    unfinished: String,
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
            unfinished: String::new(),
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
            self.unfinished.clear();
        }
        self.speaking = true;
        self.unfinished.push_str(text);
        let written = match self
            .unfinished
            .char_indices()
            .rfind(|&(_, c)| c.is_whitespace() || c == '-')
        {
            Some((i, c)) => i + c.len_utf8(),
            None if self.unfinished.len() > MAX_UNFINISHED => self.unfinished.len(),
            None => return,
        };
        self.write(written);
    }

    /// Moves the words of the first `upto` bytes of the unfinished text into what was said.
    fn write(&mut self, upto: usize) {
        for word in words(&self.unfinished[..upto]) {
            self.said.extend(word);
            self.said.push(' ');
            self.count += 1;
        }
        self.unfinished.drain(..upto);
        while self.count > MAX_WORDS {
            let first = self.said.find(' ').map_or(self.said.len(), |i| i + 1);
            self.said.drain(..first);
            self.count -= 1;
        }
    }

    /// The assistant stopped speaking at `now` (its reply ended or was cut): its last word
    /// is whole.
    pub fn stopped(&mut self, now: Instant) {
        if std::mem::take(&mut self.speaking) {
            self.stopped = Some(now);
            self.write(self.unfinished.len());
        }
    }

    /// Judges a transcript heard at `now`; an `interim` one's last word is left out (it may
    /// be cut off mid-way). Below [`MIN_ECHO_WORDS`] words it cannot tell. Otherwise it is
    /// an echo when a stretch of the assistant's recent words matches it with few errors:
    /// aligned word against word, a match (the same word, or one a letter or so apart:
    /// "parris") scores 2 and a wrong, missing or extra word -1, and the best stretch must
    /// score at least `2n - 3e` for its `n` words, allowing `e = n / 3` errors.
    pub fn judge(&self, text: &str, now: Instant, interim: bool) -> Verdict {
        if !self.live(now) {
            return Verdict::Person;
        }
        let mut heard = unlooped(words(text).map(String::from_iter));
        if interim {
            heard.pop();
        }
        let n = heard.len();
        if n > MAX_HEARD {
            return Verdict::Person;
        }
        if n < MIN_ECHO_WORDS {
            return Verdict::Unsure;
        }
        // The word being written counts as far as it goes.
        let unfinished: String = words(&self.unfinished).flatten().collect();
        let said: Vec<&str> = self
            .said
            .split_terminator(' ')
            .chain(Some(unfinished.as_str()).filter(|w| !w.is_empty()))
            .collect();
        // Smith–Waterman over two rows.
        let mut prev = vec![0i32; said.len() + 1];
        let mut row = vec![0i32; said.len() + 1];
        let mut best = 0;
        for h in &heard {
            for (j, s) in said.iter().enumerate() {
                let diagonal = prev[j] + if alike(h, s) { 2 } else { -1 };
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

/// The same word, as a recogniser may spell it: equal, or (from four letters) at most one
/// edit in four letters apart ("parris", "paris").
fn alike(heard: &str, said: &str) -> bool {
    if heard == said {
        return true;
    }
    let longest = heard.len().max(said.len());
    longest >= 4
        && heard.len().abs_diff(said.len()) <= longest / 4
        && strsim::levenshtein(heard, said) <= longest / 4
}

/// Longest run of words a recogniser repeats in a loop that [`unlooped`] takes out.
const MAX_LOOP: usize = 4;

/// The words with the loops a recogniser can fall into taken out ("the weather and the the
/// the weather and the": Whisper on part of an utterance), each run of up to
/// [`MAX_LOOP`] words that repeats the run just before it kept once.
fn unlooped(heard: impl Iterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in heard {
        out.push(word);
        let n = out.len();
        if let Some(k) =
            (1..=MAX_LOOP).find(|&k| n >= 2 * k && out[n - k..] == out[n - 2 * k..n - k])
        {
            out.truncate(n - k);
        }
    }
    out
}

/// The words of `text`, lower-cased, without punctuation; hyphens split words (the one rule
/// for comparing words, the turn machine's backchannels included).
pub(crate) fn words(text: &str) -> impl Iterator<Item = impl Iterator<Item = char> + '_> + '_ {
    text.split(|c: char| c.is_whitespace() || c == '-')
        .filter(|w| w.chars().any(|c| c.is_alphanumeric() || c == '\''))
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

    impl Echo {
        fn hear(&self, text: &str, now: Instant) -> Verdict {
            self.judge(text, now, false)
        }
    }

    #[test]
    fn misspelt_words_and_an_interim_last_word_cut_off_are_allowed_for() {
        let (echo, now) = speaking("Paris is a city known for its atmosphere");
        assert_eq!(echo.judge("Parris is a", now, false), Verdict::Echo);
        // Whisper's partial of "Paris is a ci…": its last word is still being said.
        assert_eq!(echo.judge("Parris is this", now, true), Verdict::Unsure);
        assert_eq!(echo.judge("Parris is a city kn", now, true), Verdict::Echo);
        assert_eq!(echo.judge("wait stop that now", now, true), Verdict::Person);
    }

    fn speaking(text: &str) -> (Echo, Instant) {
        let now = Instant::now();
        let mut echo = Echo::new(WINDOW);
        echo.said(text, now);
        (echo, now)
    }

    #[test]
    fn the_assistants_words_are_an_echo_even_misheard() {
        let (echo, now) = speaking("The capital of France is Paris. It is known for");
        assert_eq!(echo.hear("the capital of france", now), Verdict::Echo);
        assert_eq!(echo.hear("France is Paris, it is", now), Verdict::Echo);
        // Two of six words misheard, one of three missing.
        assert_eq!(
            echo.hear("the capital and friends is paris", now),
            Verdict::Echo
        );
        assert_eq!(echo.hear("capital france is", now), Verdict::Echo);
    }

    #[test]
    fn the_persons_own_words_are_not() {
        let (echo, now) = speaking("The capital of France is Paris. It is known for");
        assert_eq!(echo.hear("wait, what about Spain", now), Verdict::Person);
        assert_eq!(echo.hear("stop it now", now), Verdict::Person);
        // The assistant's words scattered through other words.
        assert_eq!(echo.hear("is it the capital", now), Verdict::Person);
        assert_eq!(echo.hear("the weather in paris", now), Verdict::Person);
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
            assert_eq!(echo.hear(heard, now), Verdict::Unsure, "{heard:?}");
        }
        echo_is_off_after(echo, now);
    }

    /// Once the window is over, nothing is unsure any more.
    fn echo_is_off_after(mut echo: Echo, now: Instant) {
        echo.stopped(now);
        assert_eq!(echo.hear("coffee", now + WINDOW), Verdict::Person);
    }

    #[test]
    fn words_come_back_only_within_the_window_after_the_assistant_stops() {
        let (mut echo, now) = speaking("The capital of France is Paris");
        let heard = "france is paris";
        echo.stopped(now);
        assert_eq!(echo.hear(heard, now + WINDOW / 2), Verdict::Echo);
        assert_eq!(echo.hear(heard, now + WINDOW), Verdict::Person);
        // The next reply starts afresh: the old words are forgotten.
        echo.said("Madrid is the capital of Spain", now + WINDOW * 2);
        assert_eq!(echo.hear(heard, now + WINDOW * 2), Verdict::Person);
        assert_eq!(
            echo.hear("capital of spain", now + WINDOW * 2),
            Verdict::Echo
        );
    }

    #[test]
    fn words_written_in_pieces_count_whole() {
        let now = Instant::now();
        let mut echo = Echo::new(WINDOW);
        for piece in ["The cap", "ital of Fr", "ance is Par", "is"] {
            echo.said(piece, now);
        }
        assert_eq!(
            echo.hear("the capital of france is paris", now),
            Verdict::Echo
        );
        echo.stopped(now);
        assert_eq!(echo.count, 6);
        assert_eq!(echo.hear("france is paris", now), Verdict::Echo);
    }

    #[test]
    fn a_recogniser_caught_in_a_loop_still_hears_an_echo() {
        let (echo, now) = speaking(
            "Paris is a city known for its vibrant atmosphere and stunning landscapes. The \
             weather in Paris can vary depending on the time of year.",
        );
        // As Whisper heard it, from part of the utterance.
        let heard = format!(
            "Paris is a city known for its vibrant atmosphere and stunning landscapes the \
             weather and the the weather and the{}",
            " the".repeat(40)
        );
        assert_eq!(echo.hear(&heard, now), Verdict::Echo);
        // A person repeating themselves is still the person.
        assert_eq!(echo.hear("no no no, stop talking", now), Verdict::Person);
    }

    #[test]
    fn a_zero_window_turns_the_guard_off() {
        let now = Instant::now();
        let mut echo = Echo::new(Duration::ZERO);
        echo.said("The capital of France is Paris", now);
        assert_eq!(echo.hear("the capital of france", now), Verdict::Person);
    }

    #[test]
    fn only_the_latest_words_are_remembered() {
        let now = Instant::now();
        let mut echo = Echo::new(WINDOW);
        echo.said("alpha beta gamma ", now);
        for i in 0..MAX_WORDS {
            echo.said(&format!("w{i} "), now);
        }
        assert_eq!(echo.count, MAX_WORDS);
        assert_eq!(echo.hear("alpha beta gamma", now), Verdict::Person);
        assert_eq!(echo.hear("w197 w198 w199", now), Verdict::Echo);
    }
}
