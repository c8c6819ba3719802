//! Playout: when each piece of a reply's audio goes to the listener, and which of its
//! sentences the listener has heard.
//!
//! Sending a reply's audio as fast as synthesis produces it would let the listener's side
//! buffer seconds of speech the person may never hear; after a barge-in the history would then
//! claim words that were never played. The playout keeps the audio sent between a low and a
//! high mark ahead of a playback clock:
//!
//! - while less than half the low mark is buffered (the reply's start, or after synthesis
//!   fell behind), audio goes out as soon as it arrives, so the first words are not delayed;
//! - above that, audio waits until playback has brought the buffer down to the low mark and
//!   there is enough to fill it back to the high mark, then goes out as one piece; with less
//!   than that at hand it goes out when the buffer is down to half the low mark. Once the
//!   buffer is full, a piece is therefore `high - low` long however small the chunks
//!   synthesis delivers: fewer, larger writes per second of speech.
//!
//! The playback clock starts when the first piece is sent and assumes real-time playback; if
//! the buffer ran dry (a gap between sentences), it restarts with the next piece. What was
//! *heard* is what the clock has played: a sentence counts once all of its audio has. A
//! transport that learns more (a telephony provider echoing marks) can confirm playback
//! exactly with [`Playout::confirm`].
//!
//! Audio is 16-bit little-endian PCM at the rate given to [`Playout::new`]; offsets are in
//! bytes of that stream, always whole samples.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

/// Bytes per sample of the playout's PCM.
const SAMPLE_BYTES: u64 = 2;

/// How long a piece sent once the buffer is full is, at most (the distance between the low
/// and the high mark): twice the 100 ms frame protocol v1 writes, so one wake-up and one flush
/// carry two frames.
pub const PIECE: Duration = Duration::from_millis(200);

/// Pieces are whole multiples of this (protocol v1's largest frame) whenever at least this
/// much goes out, so that a transport cutting them into frames makes no fragments.
pub const QUANTUM: Duration = Duration::from_millis(100);

/// Audio of one reply on its way to the listener.
#[derive(Debug)]
pub struct Playout {
    /// Bytes of audio per second.
    rate: u64,
    /// Send when at most this much is buffered ahead of playback (bytes).
    low: u64,
    /// Never buffer more than this ahead of playback (bytes).
    high: u64,
    /// Received and not sent yet.
    pending: BytesMut,
    /// Bytes sent so far.
    sent: u64,
    /// [`QUANTUM`] in bytes.
    quantum: u64,
    /// When byte 0 would have been played (moved forward whenever the buffer ran dry).
    clock: Option<Instant>,
    /// Playback the listener's side confirmed (bytes), whatever the clock says.
    confirmed: u64,
    /// Sentences whose audio is complete, in order, with the offset where their audio ends.
    sentences: VecDeque<Sentence>,
    /// Set once stopped: what had been played then.
    stopped: Option<u64>,
}

/// A sentence whose audio ends at `end`.
#[derive(Debug)]
struct Sentence {
    end: u64,
    tag: Option<u32>,
    text: String,
}

impl Playout {
    /// A playout at `sample_rate` that keeps at most `high` of audio ahead of playback.
    pub fn new(sample_rate: u32, high: Duration) -> Self {
        let rate = u64::from(sample_rate) * SAMPLE_BYTES;
        let high_bytes = whole(bytes_in(high, rate)).max(SAMPLE_BYTES);
        let piece = whole(bytes_in(PIECE, rate)).min(whole(high_bytes / 2));
        Playout {
            rate,
            low: high_bytes - piece,
            high: high_bytes,
            pending: BytesMut::new(),
            sent: 0,
            // Never more than a piece, or a piece could never go out whole.
            quantum: whole(bytes_in(QUANTUM, rate)).min(piece).max(SAMPLE_BYTES),
            clock: None,
            confirmed: 0,
            sentences: VecDeque::new(),
            stopped: None,
        }
    }

    /// Adds synthesised audio (whole samples) after what was added before.
    pub fn push(&mut self, pcm: &[u8]) {
        if self.stopped.is_none() {
            self.pending.extend_from_slice(pcm);
        }
    }

    /// The audio of a sentence is complete (everything pushed so far includes it); `tag`
    /// says which part of the reply it belongs to.
    pub fn end_sentence(&mut self, tag: Option<u32>, text: String) {
        if self.stopped.is_none() {
            let end = self.sent + self.pending.len() as u64;
            self.sentences.push_back(Sentence { end, tag, text });
        }
    }

    /// The next piece to send at `now`, if one is due.
    pub fn poll(&mut self, now: Instant) -> Option<Bytes> {
        if self.stopped.is_some() || self.pending.is_empty() {
            return None;
        }
        let clock = *self.clock.get_or_insert(now);
        let elapsed = bytes_in(now.saturating_duration_since(clock), self.rate);
        if elapsed > self.sent {
            // The buffer ran dry: playback resumes with this piece.
            self.clock = Some(now - duration_of(self.sent, self.rate));
        }
        let ahead = self.sent - elapsed.min(self.sent);
        let room = self.high - ahead.min(self.high);
        let pending = self.pending.len() as u64;
        // A full piece goes at the low mark; less than that waits for more until half of it.
        let piece = self.high - self.low;
        if ahead > self.low || (ahead > self.low / 2 && pending < piece) {
            return None;
        }
        let mut len = whole(room.min(pending));
        if len >= self.quantum {
            len -= len % self.quantum;
        } else if len < pending {
            // Less than a quantum fits: wait rather than send a fragment.
            return None;
        }
        if len == 0 {
            return None;
        }
        self.sent += len;
        Some(self.pending.split_to(len as usize).freeze())
    }

    /// When the next piece is due, once playback has started (before it, a piece is due as
    /// soon as there is audio: poll after pushing); `None` while nothing waits to be sent.
    pub fn next_due(&self) -> Option<Instant> {
        if self.stopped.is_some() || self.pending.is_empty() {
            return None;
        }
        let clock = self.clock?;
        // With a full piece at hand it goes at the low mark, otherwise at half of it.
        let piece = self.high - self.low;
        let mark = if self.pending.len() as u64 >= piece {
            self.low
        } else {
            self.low / 2
        };
        // Rounded up, so that at the deadline the buffer is at the mark, never a byte above
        // it (which would wake the driver again for nothing).
        Some(clock + duration_ceil(self.sent.saturating_sub(mark), self.rate))
    }

    /// Whether more audio may be pushed: less than a piece waits to be sent. Synthesis runs
    /// at most a piece (plus what is on its way) ahead of what the listener holds, and a
    /// driver that takes audio only when asked takes it in the same wake-up that sends a piece.
    pub fn wants_audio(&self) -> bool {
        self.stopped.is_none() && (self.pending.len() as u64) < self.high - self.low
    }

    /// Whether everything pushed has been sent.
    pub fn is_drained(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether any audio has been sent.
    pub fn started(&self) -> bool {
        self.sent > 0
    }

    /// The listener's side reports that playback reached `offset` bytes (a mark echoed).
    pub fn confirm(&mut self, offset: u64) {
        if self.stopped.is_none() {
            self.confirmed = self.confirmed.max(offset.min(self.sent));
        }
    }

    /// Audio played by `now` (bytes): the clock's reckoning, or the confirmed playback if
    /// further; frozen once stopped.
    pub fn played(&self, now: Instant) -> u64 {
        if let Some(played) = self.stopped {
            return played;
        }
        let by_clock = self.clock.map_or(0, |clock| {
            bytes_in(now.saturating_duration_since(clock), self.rate)
        });
        by_clock.max(self.confirmed).min(self.sent)
    }

    /// Stops at `now` (barge-in, a cut reply): nothing more is sent, and what is heard stays
    /// what had been played by then. Returns whether the listener still holds unplayed audio.
    pub fn stop(&mut self, now: Instant) -> bool {
        if self.stopped.is_some() {
            return false;
        }
        let played = self.played(now);
        self.stopped = Some(played);
        self.pending.clear();
        played < self.sent
    }

    /// The text of the sentences tagged `tag` that were heard by `now`, space-separated: all
    /// of them that were sent if `all_sent`, otherwise those whose audio has played.
    pub fn heard(&self, tag: Option<u32>, now: Instant, all_sent: bool) -> String {
        let limit = if all_sent {
            self.sent
        } else {
            self.played(now)
        };
        let mut text = String::new();
        for s in self
            .sentences
            .iter()
            .take_while(|s| s.end <= limit)
            .filter(|s| s.tag == tag)
        {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&s.text);
        }
        text
    }

    /// Length of the audio heard by `now`: all that was sent if `all_sent`, otherwise what
    /// had played (see [`Playout::heard`]).
    pub fn heard_for(&self, now: Instant, all_sent: bool) -> Duration {
        if all_sent {
            self.sent()
        } else {
            duration_of(self.played(now), self.rate)
        }
    }

    /// Audio sent so far.
    pub fn sent(&self) -> Duration {
        duration_of(self.sent, self.rate)
    }
}

fn whole(bytes: u64) -> u64 {
    bytes - bytes % SAMPLE_BYTES
}

/// Bytes played in `d` (rounded down).
fn bytes_in(d: Duration, rate: u64) -> u64 {
    (d.as_nanos() * u128::from(rate) / 1_000_000_000) as u64
}

fn duration_of(bytes: u64, rate: u64) -> Duration {
    Duration::from_nanos((u128::from(bytes) * 1_000_000_000 / u128::from(rate)) as u64)
}

fn duration_ceil(bytes: u64, rate: u64) -> Duration {
    Duration::from_nanos((u128::from(bytes) * 1_000_000_000).div_ceil(u128::from(rate)) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: u32 = 8000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `n` milliseconds of audio at 8 kHz.
    fn audio(n: u64) -> Vec<u8> {
        vec![0; (n * 16) as usize]
    }

    fn len_ms(piece: &Bytes) -> u64 {
        piece.len() as u64 / 16
    }

    /// A playout with a 400 ms lead given `n` ms of audio, its start sent at `t0`.
    fn started(t0: Instant, n: u64) -> Playout {
        let mut p = Playout::new(RATE, ms(400));
        p.push(&audio(n));
        assert!(p.poll(t0).is_some());
        p
    }

    /// A playout with a 400 ms lead holding `sentences`: tag, text and length in ms.
    fn holding(sentences: &[(Option<u32>, &str, u64)]) -> Playout {
        let mut p = Playout::new(RATE, ms(400));
        for &(tag, text, n) in sentences {
            p.push(&audio(n));
            p.end_sentence(tag, text.into());
        }
        p
    }

    #[test]
    fn the_start_goes_out_at_once_then_pieces_refill_the_buffer() {
        let t0 = Instant::now();
        let mut p = Playout::new(RATE, ms(400));
        p.push(&audio(1000));
        // Up to the high mark at once.
        assert_eq!(p.poll(t0).map(|b| len_ms(&b)), Some(400));
        assert_eq!(p.poll(t0), None);
        // Due when the buffer is down to the low mark (400 - 200 ms).
        assert_eq!(p.next_due(), Some(t0 + ms(200)));
        assert_eq!(p.poll(t0 + ms(199)), None);
        assert_eq!(p.poll(t0 + ms(200)).map(|b| len_ms(&b)), Some(200));
        assert_eq!(p.next_due(), Some(t0 + ms(400)));
        assert_eq!(p.poll(t0 + ms(400)).map(|b| len_ms(&b)), Some(200));
        assert_eq!(p.poll(t0 + ms(600)).map(|b| len_ms(&b)), Some(200));
        assert!(p.is_drained());
        assert_eq!(p.next_due(), None);
        assert_eq!(p.sent(), ms(1000));
    }

    #[test]
    fn small_chunks_are_joined_into_pieces_once_the_buffer_is_full() {
        let t0 = Instant::now();
        let mut p = Playout::new(RATE, ms(400));
        let mut pieces = Vec::new();
        // Synthesis delivers 20 ms chunks, twice as fast as real time, for 2 s of audio.
        for i in 0..100u64 {
            let now = t0 + ms(i * 10);
            p.push(&audio(20));
            while let Some(piece) = p.poll(now) {
                pieces.push(len_ms(&piece));
            }
        }
        let mut now = t0 + ms(1000);
        while let Some(due) = p.next_due() {
            now = now.max(due);
            while let Some(piece) = p.poll(now) {
                pieces.push(len_ms(&piece));
            }
        }
        assert_eq!(pieces.iter().sum::<u64>(), 2000);
        // Chunks go out as they come until 100 ms are buffered; after that, in 200 ms pieces
        // (the last may be shorter).
        // A hundred chunks went out in a quarter as many pieces.
        assert!(pieces.len() <= 25, "{pieces:?}");
        let large = pieces.iter().filter(|&&n| n >= 200).count();
        assert!(large >= 6, "{pieces:?}");
        assert!(pieces[..11].iter().all(|&n| n == 20), "{pieces:?}");
    }

    #[test]
    fn a_late_wake_up_still_sends_the_waiting_piece() {
        let t0 = Instant::now();
        let mut p = started(t0, 400);
        p.push(&audio(200));
        assert_eq!(p.next_due(), Some(t0 + ms(200)));
        // Woken 30 ms late: the buffer is below the low mark, a whole piece waits.
        assert_eq!(p.poll(t0 + ms(230)).map(|b| len_ms(&b)), Some(200));
    }

    #[test]
    fn a_gap_restarts_the_clock() {
        let t0 = Instant::now();
        let mut p = started(t0, 100);
        // One second later the buffer has long run dry: the next sentence goes out at once,
        // and playback is counted from then.
        p.push(&audio(600));
        let t1 = t0 + ms(1000);
        assert_eq!(p.poll(t1).map(|b| len_ms(&b)), Some(400));
        assert_eq!(p.played(t1), 100 * 16);
        assert_eq!(p.played(t1 + ms(100)), 200 * 16);
        // 500 ms sent, the clock at 100 ms: a full piece is at hand, due at the low mark.
        assert_eq!(p.next_due(), Some(t1 + ms(200)));
    }

    #[test]
    fn only_sentences_played_by_the_clock_are_heard() {
        let t0 = Instant::now();
        let mut p = holding(&[
            (Some(0), "One.", 300),
            (Some(0), "Two.", 300),
            (None, "Just a moment.", 300),
        ]);
        assert!(p.poll(t0).is_some());
        assert_eq!(p.heard(Some(0), t0 + ms(299), false), "");
        assert_eq!(p.heard(Some(0), t0 + ms(300), false), "One.");
        // Counting what was sent instead: the first 400 ms hold the first sentence.
        assert_eq!(p.heard(Some(0), t0, true), "One.");
        while let Some(due) = p.next_due() {
            p.poll(due);
        }
        assert_eq!(p.heard(Some(0), t0, true), "One. Two.");
        assert_eq!(p.heard(None, t0, true), "Just a moment.");
    }

    #[test]
    fn stopping_drops_what_was_not_sent_and_freezes_what_was_heard() {
        let t0 = Instant::now();
        let mut p = holding(&[(Some(0), "One.", 200), (Some(0), "Two.", 800)]);
        assert!(p.poll(t0).is_some());
        // Cut 250 ms in: 400 ms were sent, 250 played.
        assert!(p.stop(t0 + ms(250)));
        assert_eq!(p.poll(t0 + ms(300)), None);
        assert!(p.is_drained());
        assert!(!p.wants_audio());
        p.push(&audio(100));
        assert!(p.is_drained());
        assert_eq!(p.played(t0 + ms(5000)), 250 * 16);
        assert_eq!(p.heard(Some(0), t0 + ms(5000), false), "One.");
        // Stopped after everything played: nothing left at the listener's side.
        let mut q = started(t0, 100);
        assert!(!q.stop(t0 + ms(150)));
    }

    #[test]
    fn confirmed_playback_counts_beyond_the_clock_but_never_beyond_what_was_sent() {
        let t0 = Instant::now();
        let mut p = holding(&[(Some(0), "One.", 300)]);
        assert!(p.poll(t0).is_some());
        p.confirm(300 * 16);
        assert_eq!(p.heard(Some(0), t0, false), "One.");
        p.confirm(10_000 * 16);
        assert_eq!(p.played(t0), 300 * 16);
    }

    #[test]
    fn the_buffer_wants_audio_until_it_holds_a_piece() {
        let mut p = Playout::new(RATE, ms(400));
        assert!(p.wants_audio());
        p.push(&audio(199));
        assert!(p.wants_audio());
        p.push(&audio(1));
        assert!(!p.wants_audio());
    }

    #[test]
    fn a_lead_shorter_than_two_quanta_still_plays_everything() {
        let t0 = Instant::now();
        let mut p = Playout::new(RATE, ms(150));
        p.push(&audio(1000));
        let mut now = t0;
        let mut sent = 0;
        for _ in 0..100 {
            while let Some(piece) = p.poll(now) {
                sent += len_ms(&piece);
            }
            match p.next_due() {
                Some(due) => {
                    assert!(
                        due > now || sent == 0,
                        "due again at {due:?} with nothing sent"
                    );
                    now = due;
                }
                None => break,
            }
        }
        assert_eq!(sent, 1000);
    }

    #[test]
    fn the_deadline_never_wakes_early() {
        // At 44.1 kHz a deadline in whole nanoseconds falls between samples.
        let t0 = Instant::now();
        let mut p = Playout::new(44_100, ms(300));
        p.push(&vec![0; 88_200 * 2]);
        let mut now = t0;
        let mut wakeups = 0;
        while !p.is_drained() {
            if p.poll(now).is_none() {
                now = p.next_due().unwrap();
                wakeups += 1;
                assert!(p.poll(now).is_some(), "woken at {now:?} with nothing due");
            }
            assert!(wakeups < 100);
        }
    }
}
