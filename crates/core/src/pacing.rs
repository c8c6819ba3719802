//! Keeps outgoing audio a bounded lead ahead of real-time playback.
//!
//! Sending a reply's audio as fast as synthesis produces it would let the client buffer
//! seconds of speech the user may never hear; after a barge-in the history would then claim
//! words that were never played. The pacer lets audio run at most `lead` ahead of the
//! playback clock, so "sent" stays close to "heard".

use std::time::{Duration, Instant};

/// Playback clock for one reply.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// How far ahead of playback audio may be sent.
    lead: Duration,
    /// Playback start, shifted forward whenever the client's buffer ran dry.
    started: Option<Instant>,
    /// Audio sent so far.
    sent: Duration,
}

impl Pacer {
    /// A pacer allowing `lead` of buffered audio at the client.
    pub fn new(lead: Duration) -> Self {
        Pacer {
            lead,
            started: None,
            sent: Duration::ZERO,
        }
    }

    /// How long to wait at `now` before sending the next frame (zero when it may go at once).
    pub fn delay(&mut self, now: Instant) -> Duration {
        let Some(started) = self.started else {
            self.started = Some(now);
            return Duration::ZERO;
        };
        let played = now.saturating_duration_since(started);
        if played > self.sent {
            // The client ran out of audio; playback resumes with the next frame.
            self.started = Some(now - self.sent);
            return Duration::ZERO;
        }
        let ahead = self.sent - played;
        ahead.saturating_sub(self.lead)
    }

    /// Records that a frame of `duration` was sent.
    pub fn sent(&mut self, duration: Duration) {
        self.sent += duration;
    }

    /// Audio sent so far.
    pub fn total_sent(&self) -> Duration {
        self.sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_lead_then_real_time() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_millis(300));
        let frame = Duration::from_millis(100);
        // The first 400 ms (lead + the frame playing) go at once.
        for _ in 0..4 {
            assert_eq!(p.delay(t0), Duration::ZERO);
            p.sent(frame);
        }
        assert_eq!(p.delay(t0), Duration::from_millis(100));
        // 100 ms later the next frame may go.
        assert_eq!(p.delay(t0 + frame), Duration::ZERO);
    }

    #[test]
    fn underrun_restarts_the_clock() {
        let t0 = Instant::now();
        let mut p = Pacer::new(Duration::from_millis(200));
        p.delay(t0);
        p.sent(Duration::from_millis(100));
        // A gap of one second between sentences: the buffer ran dry.
        assert_eq!(p.delay(t0 + Duration::from_secs(1)), Duration::ZERO);
        for _ in 0..3 {
            p.sent(Duration::from_millis(100));
        }
        // Three frames sent after the gap, 300 ms ahead of playback: 100 ms over the lead.
        assert_eq!(
            p.delay(t0 + Duration::from_secs(1)),
            Duration::from_millis(100)
        );
    }
}
