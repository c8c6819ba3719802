//! Cuts streamed LLM text into speakable pieces.
//!
//! The first piece of a reply is cut at the first clause boundary (a comma after "Sure,") so
//! synthesis can start after a few tokens, or, when no clause boundary comes early, at a word
//! boundary: after [`SplitterConfig::eager_words`] words, or at the last whole word once the
//! reply's first text is [`SplitterConfig::eager_after`] old (time is an input: [`SentenceSplitter::due`]
//! says when to call [`SentenceSplitter::expire`]). Later pieces are whole sentences, which
//! sound more natural, unless a sentence runs long, when it is cut at a clause boundary or,
//! failing that, at a space. A boundary counts only once the character after the punctuation
//! is known to be whitespace, so "3.5" and "1,000" are never cut.

use std::time::{Duration, Instant};

/// Where to cut.
#[derive(Clone, Debug)]
pub struct SplitterConfig {
    /// Minimum length of the first piece before a clause boundary may end it.
    pub first_clause_min_chars: usize,
    /// Minimum length of a later piece before a clause boundary may end it.
    pub clause_min_chars: usize,
    /// A piece longer than this is cut at the last space.
    pub max_chars: usize,
    /// The first piece ends after this many whole words when no clause boundary came first
    /// (0: it waits for a clause).
    pub eager_words: usize,
    /// The first piece ends at the last whole word once the first text is this old, when no
    /// boundary came first (`None`: no deadline).
    pub eager_after: Option<Duration>,
}

impl Default for SplitterConfig {
    fn default() -> Self {
        SplitterConfig {
            first_clause_min_chars: 4,
            clause_min_chars: 80,
            max_chars: 240,
            eager_words: 0,
            eager_after: None,
        }
    }
}

/// Streaming sentence/clause splitter for one reply.
#[derive(Debug)]
pub struct SentenceSplitter {
    config: SplitterConfig,
    /// Text received but not yet emitted.
    buf: String,
    /// Pieces emitted so far.
    emitted: usize,
    /// When the first text arrived.
    first_text_at: Option<Instant>,
}

const ABBREVIATIONS: [&str; 13] = [
    "mr", "mrs", "ms", "dr", "st", "prof", "sr", "jr", "vs", "etc", "e.g", "i.e", "approx",
];

impl SentenceSplitter {
    /// A splitter with `config`.
    pub fn new(config: SplitterConfig) -> Self {
        SentenceSplitter {
            config,
            buf: String::new(),
            emitted: 0,
            first_text_at: None,
        }
    }

    /// Adds text streamed at `now` and appends every completed piece to `out`.
    pub fn push(&mut self, delta: &str, now: Instant, out: &mut Vec<String>) {
        if self.first_text_at.is_none() && !delta.is_empty() {
            self.first_text_at = Some(now);
        }
        self.buf.push_str(delta);
        while let Some(end) = self.boundary() {
            let piece: String = self.buf.drain(..end).collect();
            self.emit(piece, out);
        }
        self.expire(now, out);
    }

    /// When the first piece is due at a word boundary, if it is still waiting and has one:
    /// call [`SentenceSplitter::expire`] then.
    pub fn due(&self) -> Option<Instant> {
        if self.emitted > 0 {
            return None;
        }
        let due = self.first_text_at? + self.config.eager_after?;
        self.last_word_end().map(|_| due)
    }

    /// Cuts the first piece at its last whole word if it is due by `now`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<String>) {
        if self.due().is_some_and(|due| due <= now)
            && let Some(end) = self.last_word_end()
        {
            let piece: String = self.buf.drain(..end).collect();
            self.emit(piece, out);
        }
    }

    /// Byte index of the whitespace after the buffer's last whole word, if any.
    fn last_word_end(&self) -> Option<usize> {
        let start = self.buf.len() - self.buf.trim_start().len();
        self.buf[start..]
            .rfind(char::is_whitespace)
            .map(|k| k + start)
    }

    /// Ends the reply: the remaining text, if it holds anything speakable.
    pub fn finish(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        self.emit(rest, &mut out);
        out.pop()
    }

    fn emit(&mut self, piece: String, out: &mut Vec<String>) {
        let trimmed = piece.trim();
        if trimmed.chars().any(char::is_alphanumeric) {
            self.emitted += 1;
            out.push(trimmed.to_owned());
        }
    }

    /// Byte index just past the first boundary in the buffer, if any: a piece never runs
    /// past `max_chars` to reach punctuation; past that it is cut at the last space.
    fn boundary(&self) -> Option<usize> {
        let found = self.punctuation_boundary();
        let buf = self.buf.as_str();
        let max = self.config.max_chars;
        if buf.len() > max && found.is_none_or(|end| end > max) {
            let cut = buf[..max]
                .rfind(char::is_whitespace)
                .filter(|&k| k > 0)
                .unwrap_or_else(|| floor_char_boundary(buf, max));
            return Some(cut.max(1));
        }
        found
    }

    /// Byte index just past the first clause, sentence or eager word boundary, if any.
    fn punctuation_boundary(&self) -> Option<usize> {
        let clause_min = if self.emitted == 0 {
            self.config.first_clause_min_chars
        } else {
            self.config.clause_min_chars
        };
        let eager_words = if self.emitted == 0 {
            self.config.eager_words
        } else {
            0
        };
        let mut words = 0;
        let buf = self.buf.as_str();
        let mut chars = buf.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            let Some(&(j, next)) = chars.peek() else {
                // The buffer ends at punctuation. Cut now (instead of waiting a whole token for
                // the next character) where the punctuation cannot be part of a number or an
                // abbreviation: it follows a letter.
                let prev = buf[..i].chars().next_back();
                let after_letter = prev.is_some_and(char::is_alphabetic);
                let len = buf[..i].trim_start().chars().count() + 1;
                let end = i + c.len_utf8();
                match c {
                    '!' | '?' | '…' => return Some(end),
                    '.' if after_letter && !ends_with_abbreviation(&buf[..i]) => return Some(end),
                    ',' | ';' | ':' if after_letter && len >= clause_min => return Some(end),
                    _ => break,
                }
            };
            if c == '\n' {
                return Some(j);
            }
            if !next.is_whitespace() {
                continue;
            }
            let len = buf[..i].trim_start().chars().count() + 1;
            match c {
                '.' if !ends_with_abbreviation(&buf[..i]) => return Some(j),
                '!' | '?' | '…' => return Some(j),
                ',' | ';' | ':' | '—' if len >= clause_min => return Some(j),
                _ => {}
            }
            if !c.is_whitespace() {
                words += 1;
                if words == eager_words {
                    return Some(j);
                }
            }
        }
        None
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ends_with_abbreviation(before_dot: &str) -> bool {
    let word = before_dot
        .rsplit(|c: char| c.is_whitespace() || c == '(' || c == '"')
        .next()
        .unwrap_or("");
    if word.chars().count() == 1 && word.chars().all(char::is_alphabetic) {
        // An initial, as in "J. Smith", or the start of one streamed in pieces ("e." of
        // "e.g.", "i." of "i.e.").
        return true;
    }
    let lower = word.to_lowercase();
    ABBREVIATIONS.contains(&lower.as_str())
}

/// Removes markup a speech synthesiser would read aloud (`*`, `#`, backticks, `_`).
pub fn speakable(text: &str) -> String {
    text.chars()
        .filter(|c| !matches!(c, '*' | '#' | '`' | '_'))
        .collect::<String>()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `deltas` one by one: the sentences out after each push, and what `finish` gives.
    fn pushed(deltas: &[&str]) -> (Vec<Vec<String>>, Option<String>) {
        let mut s = SentenceSplitter::new(SplitterConfig::default());
        let mut out = Vec::new();
        let now = Instant::now();
        let steps = deltas
            .iter()
            .map(|d| {
                s.push(d, now, &mut out);
                out.clone()
            })
            .collect();
        (steps, s.finish())
    }

    fn split_all(deltas: &[&str]) -> Vec<String> {
        let (steps, rest) = pushed(deltas);
        let mut out = steps.last().cloned().unwrap_or_default();
        out.extend(rest);
        out
    }

    #[test]
    fn first_clause_then_sentences() {
        let out = split_all(&[
            "Sure",
            ",",
            " the",
            " weather",
            " in",
            " Paris",
            " is",
            " mild",
            ",",
            " about",
            " 18",
            " degrees",
            ".",
            " Bring",
            " a",
            " jacket",
            "!",
            " Anything",
            " else",
            "?",
        ]);
        assert_eq!(
            out,
            vec![
                "Sure,",
                "the weather in Paris is mild, about 18 degrees.",
                "Bring a jacket!",
                "Anything else?"
            ]
        );
    }

    #[test]
    fn boundary_waits_for_whitespace() {
        let (steps, rest) = pushed(&["It costs 3.", "5 euros, or 1,000 cents. Fine"]);
        assert!(
            steps[0].is_empty(),
            "must not cut before seeing what follows the dot"
        );
        assert_eq!(steps[1], vec!["It costs 3.5 euros,", "or 1,000 cents."]);
        assert_eq!(rest.as_deref(), Some("Fine"));
    }

    #[test]
    fn cuts_at_the_end_of_the_buffer_when_unambiguous() {
        let (steps, _) = pushed(&["Sure,", " it is 1,", "000 metres high. Dr.", " Who? Yes"]);
        assert_eq!(steps[0], vec!["Sure,"]);
        assert_eq!(
            steps[1].len(),
            1,
            "a comma after a digit may be a thousands separator"
        );
        assert_eq!(steps[2], vec!["Sure,", "it is 1,000 metres high."]);
        assert_eq!(
            steps[3],
            vec!["Sure,", "it is 1,000 metres high.", "Dr. Who?"]
        );
    }

    #[test]
    fn abbreviations_and_initials_do_not_cut() {
        let out = split_all(&["Dr. Smith met J. Doe at St. Mary's. Then left."]);
        assert_eq!(
            out,
            vec!["Dr. Smith met J. Doe at St. Mary's.", "Then left."]
        );
    }

    #[test]
    fn long_runs_are_cut_at_a_space() {
        let long = "word ".repeat(100);
        let out = split_all(&[&long]);
        assert!(out.len() > 1);
        assert!(out.iter().all(|p| p.len() <= 240));
        assert_eq!(out.join(" ").split_whitespace().count(), 100);
    }

    #[test]
    fn punctuation_only_pieces_are_dropped() {
        let out = split_all(&["Hello. ... ! Bye."]);
        assert_eq!(out, vec!["Hello.", "Bye."]);
    }

    #[test]
    fn multibyte_text_is_safe() {
        let long = "é".repeat(500);
        let out = split_all(&[&long]);
        assert_eq!(out.concat().chars().count(), 500);
    }

    fn eager(words: usize, after_ms: Option<u64>) -> SentenceSplitter {
        SentenceSplitter::new(SplitterConfig {
            eager_words: words,
            eager_after: after_ms.map(Duration::from_millis),
            ..SplitterConfig::default()
        })
    }

    #[test]
    fn the_first_piece_ends_after_enough_whole_words_without_a_clause() {
        let mut s = eager(4, None);
        let now = Instant::now();
        let mut out = Vec::new();
        for d in ["The", " capital", " of", " France"] {
            s.push(d, now, &mut out);
        }
        assert!(out.is_empty(), "the fourth word may still go on: {out:?}");
        s.push(" is", now, &mut out);
        assert_eq!(out, vec!["The capital of France"]);
        // Later pieces are clause-sized or whole sentences again.
        for d in [
            " Paris", ",", " a", " city", " on", " the", " Seine.", " It has",
        ] {
            s.push(d, now, &mut out);
        }
        assert_eq!(out[1..], ["is Paris, a city on the Seine."]);
        assert_eq!(s.finish().as_deref(), Some("It has"));
    }

    #[test]
    fn a_clause_before_enough_words_still_ends_the_first_piece() {
        let mut s = eager(4, None);
        let mut out = Vec::new();
        s.push(
            "Sure, the capital of France is Paris.",
            Instant::now(),
            &mut out,
        );
        assert_eq!(out, vec!["Sure,", "the capital of France is Paris."]);
    }

    #[test]
    fn the_first_piece_is_cut_at_the_last_whole_word_when_its_deadline_passes() {
        let mut s = eager(0, Some(300));
        let t0 = Instant::now();
        let mut out = Vec::new();
        s.push("Well", t0, &mut out);
        assert_eq!(s.due(), None, "no whole word yet, nothing to cut");
        s.push(" then", t0 + Duration::from_millis(100), &mut out);
        assert_eq!(s.due(), Some(t0 + Duration::from_millis(300)));
        s.expire(t0 + Duration::from_millis(299), &mut out);
        assert!(out.is_empty());
        s.expire(t0 + Duration::from_millis(300), &mut out);
        assert_eq!(out, vec!["Well"], "a word still arriving stays: {out:?}");
        assert_eq!(s.due(), None, "only the first piece has a deadline");
        s.push(" we go", t0 + Duration::from_millis(900), &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(s.finish().as_deref(), Some("then we go"));
    }

    #[test]
    fn text_arriving_after_the_deadline_is_cut_as_it_comes() {
        let mut s = eager(0, Some(300));
        let t0 = Instant::now();
        let mut out = Vec::new();
        s.push("Hmm", t0, &mut out);
        s.push(" let me", t0 + Duration::from_millis(500), &mut out);
        assert_eq!(out, vec!["Hmm let"]);
    }

    /// A small deterministic generator for the invariant test (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn whatever_the_streaming_and_timing_nothing_is_lost_repeated_or_reordered() {
        const WORDS: [&str; 12] = [
            "Sure", "the", "capital", "3.5", "1,000", "Dr.", "e.g.", "J.", "Paris", "é", "is", "x",
        ];
        const AFTER: [&str; 8] = ["", "", "", ",", ".", "!", "?", ";"];
        for seed in 1..3_000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let text: Vec<String> = (0..rng.below(60) + 1)
                .map(|_| {
                    let word = WORDS[rng.below(WORDS.len() as u64) as usize];
                    format!("{word}{}", AFTER[rng.below(AFTER.len() as u64) as usize])
                })
                .collect();
            let text = text.join(" ");
            let eager_words = rng.below(8) as usize;
            let config = SplitterConfig {
                eager_words,
                eager_after: (rng.below(2) == 0).then(|| Duration::from_millis(rng.below(400))),
                max_chars: 40 + rng.below(200) as usize,
                ..SplitterConfig::default()
            };
            let max_chars = config.max_chars;
            let mut splitter = SentenceSplitter::new(config);
            let t0 = Instant::now();
            let mut now = t0;
            let mut out = Vec::new();
            let mut rest = text.as_str();
            while !rest.is_empty() {
                // Tokens of 1 to 8 bytes on character boundaries, some time apart; the
                // deadline checked at random moments in between.
                let mut cut = (rng.below(8) as usize + 1).min(rest.len());
                while !rest.is_char_boundary(cut) {
                    cut += 1;
                }
                splitter.push(&rest[..cut], now, &mut out);
                rest = &rest[cut..];
                now += Duration::from_millis(rng.below(120));
                if rng.below(3) == 0 {
                    splitter.expire(now, &mut out);
                }
            }
            out.extend(splitter.finish());
            let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
            let heard: Vec<String> = out.iter().flat_map(|p| words(p)).collect();
            assert_eq!(heard, words(&text), "seed {seed}: {out:?}");
            assert!(
                out.iter().all(|p| p.chars().count() <= max_chars),
                "seed {seed}: a piece over {max_chars} characters: {out:?}"
            );
            // Only the first piece is cut by words; with no deadline, after at most that many.
            if eager_words > 0 && splitter.config.eager_after.is_none() {
                assert!(words(&out[0]).len() <= eager_words, "seed {seed}: {out:?}");
            }
        }
    }

    #[test]
    fn markup_is_removed() {
        assert_eq!(speakable("**Bold** `code` # title"), "Bold code  title");
    }
}
