//! Which client audio frames may wait to go to the recogniser together.
//!
//! Browsers and phones send audio in 20 ms frames. Forwarding each in a message of its own
//! costs a write (a system call, and a message for the recogniser to read) 50 times a second
//! per session — measured, the largest single cost of a session on the server
//! (docs/benchmarks.md). Recognisers take larger messages (Deepgram recommends 20–250 ms), and
//! much of a session's audio is not urgent: the quiet while the person listens, or thinks,
//! feeds no decision. Everything else is urgent: a recogniser acts on audio only once it has
//! it, so any voiced frame held back — above all the last one of a turn — delays the end of the
//! turn (and a barge-in) by as long as it waits.
//!
//! So a frame may wait for the next ones, up to `max_hold` of audio, only when it is quiet and
//! no end of speech is awaited:
//! - a voiced frame goes at once, with everything held before it;
//! - after speech, quiet frames go one by one until the recogniser has reported the end of
//!   that speech (or two seconds of quiet have passed: no recogniser counts longer);
//! - held audio never waits longer than `max_hold` of wall time (a client that stopped
//!   sending mid-batch).
//!
//! Voice and quiet are told apart by level against a noise floor that follows the quietest
//! recent audio, so a noisy room is not mistaken for endless speech. A misjudged frame costs
//! at most `max_hold` of delay, never audio.

use std::time::{Duration, Instant};

/// Voice is at least this far above the noise floor…
const VOICE_ABOVE_FLOOR_DB: f32 = 12.0;
/// …and at least this loud.
const MIN_VOICE_DBFS: f32 = -50.0;
/// The floor drops at once to quieter audio and rises this fast through louder audio.
const FLOOR_RISE_DB_PER_S: f32 = 6.0;
/// The floor before any audio.
const INITIAL_FLOOR_DBFS: f32 = -60.0;
/// Quiet after speech is urgent until the recogniser reports the end, or for this long.
const END_WATCH: Duration = Duration::from_secs(2);

/// The decision for one session's audio on its way to the recogniser.
#[derive(Debug, Clone)]
pub struct Uplink {
    /// Most audio held, and longest wait (zero: every frame goes at once).
    max_hold: Duration,
    /// Audio held so far.
    held: Duration,
    /// When the held audio must go, whatever follows.
    deadline: Option<Instant>,
    /// Level of the background, in dBFS.
    floor_dbfs: f32,
    /// Voice was heard and the recogniser has not reported its end yet.
    awaiting_end: bool,
    /// Quiet audio since the last voice.
    quiet: Duration,
}

impl Uplink {
    /// Holds at most `max_hold` of audio (zero turns holding off).
    pub fn new(max_hold: Duration) -> Self {
        Uplink {
            max_hold,
            held: Duration::ZERO,
            deadline: None,
            floor_dbfs: INITIAL_FLOOR_DBFS,
            awaiting_end: false,
            quiet: Duration::ZERO,
        }
    }

    /// A frame of `length` arrived at `now`: `true` when it may wait for the next frames,
    /// `false` when it must go now together with everything held before it. Its level in dBFS
    /// is only measured (`level_dbfs`) when a frame that long could be held at all.
    pub fn hold(
        &mut self,
        level_dbfs: impl FnOnce() -> f32,
        length: Duration,
        now: Instant,
    ) -> bool {
        if length >= self.max_hold {
            // Never held (holding off, or frames as long as the hold): nothing to decide.
            self.released();
            return false;
        }
        if self.is_voice(level_dbfs(), length) {
            self.awaiting_end = true;
            self.quiet = Duration::ZERO;
        } else {
            self.quiet += length;
            self.awaiting_end &= self.quiet < END_WATCH;
        }
        // Voice, and the quiet after it until the recogniser has reported its end, are what
        // turn-taking decides on: they go at once (the last voiced frame of a turn never waits
        // for the one after it).
        let urgent = self.awaiting_end;
        if urgent || self.held + length >= self.max_hold {
            self.released();
            return false;
        }
        self.held += length;
        self.deadline.get_or_insert(now + self.max_hold);
        true
    }

    /// The recogniser reported the end of the speech it heard: quiet may wait again.
    pub fn end_heard(&mut self) {
        self.awaiting_end = false;
    }

    /// When held audio must go, if any is held.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// `true` when held audio must go at `now`.
    pub fn expired(&mut self, now: Instant) -> bool {
        if self.deadline.is_some_and(|d| now >= d) {
            self.released();
            return true;
        }
        false
    }

    /// Whatever was held has gone (with a frame sent at once, a finalise or a close).
    pub fn released(&mut self) {
        self.held = Duration::ZERO;
        self.deadline = None;
    }

    fn is_voice(&mut self, level_dbfs: f32, length: Duration) -> bool {
        if level_dbfs < self.floor_dbfs {
            self.floor_dbfs = level_dbfs;
        } else {
            let rise = FLOOR_RISE_DB_PER_S * length.as_secs_f32();
            self.floor_dbfs = (self.floor_dbfs + rise).min(level_dbfs);
        }
        level_dbfs > (self.floor_dbfs + VOICE_ABOVE_FLOOR_DB).max(MIN_VOICE_DBFS)
    }
}

/// Most audio messages held for the recogniser while its connection is (re)connecting (about
/// 5 s of 100 ms messages); beyond it the oldest are dropped.
pub const BACKLOG_MESSAGES: usize = 50;
/// First wait before reconnecting after a failure; it doubles with each failure in a row…
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// …up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// When the connection to the recogniser may be opened again after it failed.
#[derive(Debug, Clone, Default)]
pub struct Reconnect {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Reconnect {
    /// The connection failed or dropped at `now`. A full engine queue (`busy`) is not a broken
    /// recogniser: it may reconnect at once and does not count as a failure.
    pub fn lost(&mut self, busy: bool, now: Instant) {
        if busy {
            self.retry_at = None;
            return;
        }
        self.failures += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (self.failures - 1).min(4))
            .min(MAX_BACKOFF);
        self.retry_at = Some(now + backoff);
    }

    /// A result arrived: the link works.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Whether a connection may be opened at `now`.
    pub fn may_connect(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAME: Duration = Duration::from_millis(20);
    const SPEECH: f32 = -20.0;
    const SILENCE: f32 = -120.0;

    struct Stream {
        uplink: Uplink,
        now: Instant,
    }

    impl Stream {
        fn new(max_hold_ms: u64) -> Self {
            Stream {
                uplink: Uplink::new(Duration::from_millis(max_hold_ms)),
                now: Instant::now(),
            }
        }

        /// Feeds `n` frames at `level`, 20 ms apart; returns which were held.
        fn frames(&mut self, n: usize, level: f32) -> Vec<bool> {
            (0..n)
                .map(|_| {
                    self.now += FRAME;
                    self.uplink.hold(|| level, FRAME, self.now)
                })
                .collect()
        }
    }

    /// Sends per `held` flags: each `false` sends itself and every frame held before it.
    fn messages(held: &[bool]) -> usize {
        held.iter().filter(|h| !**h).count()
    }

    #[test]
    fn quiet_goes_in_batches_of_the_hold_and_voice_at_once() {
        let mut s = Stream::new(100);
        // Quiet before anyone spoke: four frames wait, the fifth completes 100 ms.
        assert_eq!(
            s.frames(10, SILENCE),
            [true, true, true, true, false, true, true, true, true, false]
        );
        // Speech: every frame goes as it comes, the first one with the quiet held before it
        // (barge-in), the last one without waiting for what follows (the end of the turn).
        s.frames(2, SILENCE);
        assert_eq!(s.frames(11, SPEECH), [false; 11]);
    }

    #[test]
    fn the_end_of_speech_goes_frame_by_frame_until_the_recogniser_heard_it() {
        let mut s = Stream::new(100);
        s.frames(30, SPEECH);
        // Every quiet frame after speech goes at once: the recogniser is counting that silence.
        assert_eq!(s.frames(12, SILENCE), [false; 12]);
        s.uplink.end_heard();
        assert_eq!(s.frames(5, SILENCE), [true, true, true, true, false]);
        // A pause inside speech is watched the same way.
        s.frames(3, SPEECH);
        assert_eq!(s.frames(3, SILENCE), [false; 3]);
    }

    #[test]
    fn held_audio_waits_no_longer_than_the_hold() {
        let mut s = Stream::new(100);
        assert_eq!(s.frames(2, SILENCE), [true, true]);
        let first = s.now - FRAME;
        assert_eq!(
            s.uplink.deadline(),
            Some(first + Duration::from_millis(100))
        );
        // The client stops sending: nothing is due before the deadline, then it is.
        assert!(!s.uplink.expired(first + Duration::from_millis(99)));
        assert!(s.uplink.expired(first + Duration::from_millis(100)));
        assert_eq!(s.uplink.deadline(), None);
        // Sent with a frame that went at once, the held audio has no deadline either.
        s.frames(1, SILENCE);
        s.frames(1, SPEECH);
        assert_eq!(s.uplink.deadline(), None);
    }

    #[test]
    fn frames_as_long_as_the_hold_and_a_zero_hold_never_wait() {
        let mut s = Stream::new(100);
        let long = Duration::from_millis(100);
        assert!(!s.uplink.hold(|| SILENCE, long, s.now));
        let mut off = Stream::new(0);
        assert_eq!(off.frames(5, SILENCE), [false; 5]);
        assert_eq!(off.frames(5, SPEECH), [false; 5]);
    }

    #[test]
    fn a_noisy_room_is_not_taken_for_endless_speech() {
        let mut s = Stream::new(100);
        // Ten seconds of steady noise at −35 dBFS: voice at first (above the initial floor),
        // quiet once the floor has risen to it (~2 s), watched as the end of that "speech" for
        // two seconds although no recogniser reports one, then batched like any quiet.
        let noise = s.frames(500, -35.0);
        let late = &noise[300..];
        assert!(messages(late) <= 200 / 5 + 1, "{}", messages(late));
        // Speech 20 dB above the noise is voice; the noise after it is quiet again, and goes
        // frame by frame until the recogniser reports the end.
        assert!(!s.frames(1, -15.0)[0]);
        s.frames(20, -15.0);
        assert_eq!(s.frames(3, -35.0), [false; 3]);
        // Speech goes frame by frame.
        assert_eq!(s.frames(50, -15.0), [false; 50]);
    }

    #[test]
    fn reconnects_back_off_doubling_up_to_a_cap_and_busy_is_not_a_failure() {
        let t0 = Instant::now();
        let mut r = Reconnect::default();
        assert!(r.may_connect(t0));
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..7 {
            r.lost(false, now);
            let mut wait = Duration::ZERO;
            while !r.may_connect(now + wait) {
                wait += Duration::from_millis(50);
            }
            waits.push(wait.as_millis());
            now += wait;
        }
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(r.failures(), 7);
        r.lost(true, now);
        assert!(r.may_connect(now), "a busy engine is retried at once");
        assert_eq!(r.failures(), 7);
        r.succeeded();
        assert_eq!(r.failures(), 0);
    }
}
