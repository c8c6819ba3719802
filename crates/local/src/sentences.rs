//! The complete-sentence rule for the local language model's replies.
//!
//! A small model stopped by a token cap ends mid-word ("I'd recommend "The Hunger Games"
//! by"). The [`SentenceGate`] sits between the model and the stream the session hears: it
//! lets text through only up to the last complete sentence, tells the generator when to stop
//! (after the configured number of sentences, or at the first sentence end past the soft cap)
//! and, when the hard cap cuts a sentence, drops the unfinished part. A reply that never
//! finished its first sentence is cut at its last clause and closed with a full stop, so what
//! is spoken is always a sentence.

/// Why generation should stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Keep going.
    No,
    /// Enough: the sentence count or the soft cap was reached at a sentence end.
    Done,
}

/// Caps of one reply.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Complete sentences after which the reply ends.
    pub sentences: usize,
    /// Tokens after which the reply ends at the next sentence end.
    pub soft_tokens: u64,
}

/// Streams a reply through the complete-sentence rule.
#[derive(Debug)]
pub struct SentenceGate {
    limits: Limits,
    /// Text generated but not yet let through (an unfinished sentence).
    held: String,
    /// Whether anything has been let through.
    released: bool,
    sentences: usize,
}

/// Whether the mark `c` at byte `i` of `text` ends a sentence: `Some` when that is known
/// from the text after it, `None` when more text is needed.
fn ends_sentence(text: &str, i: usize, c: char) -> Option<bool> {
    let after = &text[i + c.len_utf8()..];
    let mut rest = after.chars();
    let next = rest.next();
    match c {
        '!' | '?' | '…' => next.map(char::is_whitespace),
        '.' => {
            let next = next?;
            if !next.is_whitespace() || abbreviation(&text[..i]) {
                return Some(false);
            }
            if text[..i].ends_with(|p: char| p.is_ascii_digit()) {
                // "120." ends a sentence only if a new one starts ("120. Then"), not in a
                // list ("1. Rest").
                let word = after.trim_start().chars().next()?;
                let list_item = text[..i]
                    .rsplit(char::is_whitespace)
                    .next()
                    .is_some_and(|w| w.chars().all(|d| d.is_ascii_digit()) && w.len() <= 2);
                return Some(word.is_uppercase() && !list_item);
            }
            Some(true)
        }
        '\n' => Some(
            text[..i]
                .trim()
                .chars()
                .next_back()
                .is_some_and(|p| p != ':'),
        ),
        _ => Some(false),
    }
}

/// Whether `text` ends with a sentence mark (closing quotes and brackets aside).
fn has_final_mark(text: &str) -> bool {
    text.trim_end()
        .trim_end_matches(['"', '\'', ')', '”', '’'])
        .ends_with(['.', '!', '?', '…'])
}

fn abbreviation(before: &str) -> bool {
    let word = before
        .rsplit(|c: char| c.is_whitespace())
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    matches!(
        word.as_str(),
        "mr" | "mrs" | "ms" | "dr" | "st" | "prof" | "jr" | "sr" | "vs" | "e.g" | "i.e" | "etc"
    ) || (word.len() == 1 && word.chars().all(|c| c.is_ascii_alphabetic()))
}

impl SentenceGate {
    /// A gate for one reply.
    pub fn new(limits: Limits) -> Self {
        SentenceGate {
            limits,
            held: String::new(),
            released: false,
            sentences: 0,
        }
    }

    /// Adds generated text (`tokens` generated so far). Returns the text that may be spoken
    /// now (complete sentences, possibly empty) and whether to stop.
    ///
    /// A sentence end is only known once the character after the mark is seen (so "3.5" is
    /// not cut), or at the end of the reply ([`SentenceGate::finish`]).
    pub fn push(&mut self, text: &str, tokens: u64) -> (String, Stop) {
        self.held.push_str(text);
        let mut out = String::new();
        while let Some(end) = self.first_end() {
            let mut sentence: String = self.held.drain(..end).collect();
            // A line that ends without a mark (a list item) is closed as a sentence.
            if sentence.ends_with('\n') && !has_final_mark(&sentence) {
                let body = sentence.trim_end().len();
                sentence.insert(body, '.');
            }
            self.release(&sentence, &mut out);
            self.sentences += 1;
            if self.sentences >= self.limits.sentences || tokens >= self.limits.soft_tokens {
                self.held.clear();
                return (out, Stop::Done);
            }
        }
        (out, Stop::No)
    }

    /// Ends the reply. `natural` is true when the model itself ended it (end of text), false
    /// when a cap or the context cut it. Returns the last text to speak.
    pub fn finish(&mut self, natural: bool) -> String {
        let held = std::mem::take(&mut self.held);
        let mut out = String::new();
        let rest = held.trim_end();
        if rest.is_empty() {
            return out;
        }
        if natural && has_final_mark(rest) {
            self.release(rest, &mut out);
        } else if natural {
            // The model stopped without a final mark: close its sentence.
            let closed = format!("{}.", rest.trim_end_matches([',', ';', ':', '-']));
            self.release(&closed, &mut out);
        } else if self.sentences == 0 {
            // Cut before the first sentence ended: keep up to the last clause, closed.
            let cut = rest
                .rfind([',', ';', ':'])
                .map(|i| &rest[..i])
                .filter(|s| s.split_whitespace().count() >= 3)
                .unwrap_or(rest);
            let closed = format!("{}.", cut.trim_end_matches([',', ';', ':', '-', ' ']));
            self.release(&closed, &mut out);
        }
        // Otherwise an unfinished sentence after complete ones is dropped.
        out
    }

    /// Complete sentences let through so far.
    pub fn sentences(&self) -> usize {
        self.sentences
    }

    fn release(&mut self, sentence: &str, out: &mut String) {
        let s = if self.released {
            sentence
        } else {
            sentence.trim_start()
        };
        if !s.is_empty() {
            self.released = true;
            out.push_str(s);
        }
    }

    /// Byte index just past the first sentence end in the held text.
    fn first_end(&self) -> Option<usize> {
        let text = self.held.as_str();
        for (i, c) in text.char_indices() {
            match ends_sentence(text, i, c) {
                None => return None,
                Some(true) if text[..i].chars().any(char::is_alphanumeric) => {
                    return Some(i + c.len_utf8());
                }
                Some(_) => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(sentences: usize, soft_tokens: u64) -> SentenceGate {
        SentenceGate::new(Limits {
            sentences,
            soft_tokens,
        })
    }

    /// Feeds `pieces` one token each; returns what was spoken and whether it stopped early.
    fn run(g: &mut SentenceGate, pieces: &[&str], natural: bool) -> (String, bool) {
        let mut spoken = String::new();
        for (n, p) in pieces.iter().enumerate() {
            let (out, stop) = g.push(p, n as u64 + 1);
            spoken.push_str(&out);
            if stop == Stop::Done {
                return (spoken, true);
            }
        }
        spoken.push_str(&g.finish(natural));
        (spoken, false)
    }

    #[test]
    fn text_is_let_through_a_sentence_at_a_time() {
        let mut g = gate(3, 100);
        let (out, stop) = g.push("The sky is blue", 1);
        assert_eq!((out.as_str(), stop), ("", Stop::No));
        // The mark alone is not enough: "blue." could still be "blue.com".
        assert_eq!(g.push(".", 2).0, "");
        assert_eq!(g.push(" It", 3).0, "The sky is blue.");
        assert_eq!(g.finish(true), " It.");
    }

    /// Runs a fresh gate of `sentences` (and no soft cap to speak of) over each case's pieces,
    /// ended naturally or not, and checks what it spoke.
    fn check(sentences: usize, cases: &[(&[&str], bool, &str)]) {
        for (pieces, natural, expected) in cases {
            let (spoken, _) = run(&mut gate(sentences, 100), pieces, *natural);
            assert_eq!(spoken, *expected, "{pieces:?}");
        }
    }

    #[test]
    fn a_cut_at_the_cap_drops_the_unfinished_sentence() {
        let pieces: &[&str] = &[
            "Try reading.",
            " I'd recommend",
            " \"The Hunger Games\"",
            " by",
        ];
        check(3, &[(pieces, false, "Try reading.")]);
    }

    #[test]
    fn a_first_sentence_cut_at_the_cap_ends_at_its_last_clause() {
        check(
            3,
            &[
                (
                    &[
                        "Paris is the capital of France,",
                        " a city known for",
                        " its",
                    ],
                    false,
                    "Paris is the capital of France.",
                ),
                (
                    &["Well,", " the answer is", " that"],
                    false,
                    "Well, the answer is that.",
                ),
            ],
        );
    }

    #[test]
    fn the_sentence_count_stops_generation() {
        let mut g = gate(2, 100);
        let (spoken, stopped) = run(&mut g, &["Hi!", " I'm fine.", " And you?", " ok"], true);
        assert_eq!(spoken, "Hi! I'm fine.");
        assert!(stopped);
        assert_eq!(g.sentences(), 2);
    }

    #[test]
    fn numbers_and_abbreviations_are_not_sentence_ends() {
        let abbreviations = "It is 3.5 km from Dr. Smith's house, e.g. near St. Paul's.";
        check(1, &[(&[abbreviations, " Yes."], true, abbreviations)]);
        check(
            2,
            &[(
                &["There are 120 minutes.", " That is 2 hours."],
                true,
                "There are 120 minutes. That is 2 hours.",
            )],
        );
        // A number at a sentence end is an end once the next sentence starts.
        let mut g = gate(1, 100);
        let (spoken, stopped) = run(&mut g, &["The answer is 120.", " Then", " more."], true);
        assert_eq!((spoken.as_str(), stopped), ("The answer is 120.", true));
    }

    #[test]
    fn a_natural_end_without_a_mark_is_closed() {
        check(
            2,
            &[
                (&["Sure thing"], true, "Sure thing."),
                (&["Hello there.", " Bye"], true, "Hello there. Bye."),
                (&["  ", "\n"], true, ""),
            ],
        );
    }

    #[test]
    fn list_lines_and_quotes_are_closed_as_sentences() {
        check(
            2,
            &[
                (
                    &[
                        "Try these:\n\n",
                        "* \"The Nightingale\" by Kristin Hannah\n",
                        "* More",
                    ],
                    true,
                    "Try these:\n\n* \"The Nightingale\" by Kristin Hannah.\n* More.",
                ),
                (
                    &["The answer is \"Awful Person\""],
                    true,
                    "The answer is \"Awful Person\".",
                ),
                (&["He said \"hi.\""], true, "He said \"hi.\""),
            ],
        );
    }

    #[test]
    fn a_line_break_after_a_sentence_ends_it_but_not_after_a_colon() {
        check(
            1,
            &[(
                &["Here are some:\n", "1. Rest.\n", "2. Eat."],
                true,
                "Here are some:\n1. Rest.",
            )],
        );
    }
}
