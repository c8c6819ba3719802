//! Before a session exists: a new connection has until its start deadline to send a valid
//! start, and may send only so many frames that are not one. Whatever the transport, these
//! rules are decided here, with time as an input; the transport parses its frames and
//! carries out the verdicts.

use std::time::{Duration, Instant};

use crate::vocab::{AudioFormat, ErrorCode};

use super::{EndReason, Event, MAX_INVALID_FRAMES};

/// Time allowed for a valid start.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A frame received before the start, as the transport classified it.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// A start that passed [`check_start`].
    Start,
    /// A start that did not, with the problem.
    BadStart(ErrorCode, String),
    /// A ping, with its answer.
    Ping(Event),
    /// The client ends before starting.
    End,
    /// Anything else: the transport names it (`"audio"`, a message type) or says why it is
    /// malformed.
    Other(ErrorCode, String),
    /// A transport control frame (no meaning for the session).
    Control,
}

/// What the transport does with a frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Wait for the next frame.
    Wait,
    /// Tell the client this, then wait for the next frame.
    Answer(Event),
    /// The session starts.
    Started,
    /// Give up: end with this reason (closing as [`EndReason::close`] says, without an event).
    End(EndReason),
}

/// The rules before the start.
#[derive(Clone, Debug)]
pub struct Prestart {
    deadline: Instant,
    invalid: u32,
}

impl Prestart {
    /// A connection opened at `now`.
    pub fn new(now: Instant) -> Self {
        Prestart {
            deadline: now + START_TIMEOUT,
            invalid: 0,
        }
    }

    /// When the start is due.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The deadline passed without a start: the client is told, then the connection ends.
    pub fn timed_out(&self) -> (Event, EndReason) {
        (
            Event::problem(
                ErrorCode::SessionNotStarted,
                format!(
                    "no session.start within {} seconds",
                    START_TIMEOUT.as_secs()
                ),
                true,
            ),
            EndReason::StartTimeout,
        )
    }

    /// Decides what `frame` leads to.
    pub fn frame(&mut self, frame: Frame) -> Verdict {
        let problem = match frame {
            Frame::Start => return Verdict::Started,
            Frame::Ping(pong) => return Verdict::Answer(pong),
            Frame::End => return Verdict::End(EndReason::ClientEnded),
            Frame::Control => return Verdict::Wait,
            Frame::BadStart(code, message) => Event::problem(code, message, false),
            Frame::Other(code, message) => Event::problem(code, message, false),
        };
        self.invalid += 1;
        if self.invalid > MAX_INVALID_FRAMES {
            // Closed with 1008 and no event: the client is not listening to them anyway.
            return Verdict::End(EndReason::Policy);
        }
        Verdict::Answer(problem)
    }
}

/// What a client asks for at the start, whatever its transport.
#[derive(Clone, Copy, Debug)]
pub struct StartRequest<'a> {
    /// Input audio.
    pub input: AudioFormat,
    /// Output audio.
    pub output: AudioFormat,
    /// The voice asked for, and whether the synthesiser has it.
    pub voice: Option<(&'a str, bool)>,
    /// The language tag.
    pub language: Option<&'a str>,
    /// The application's conversation id.
    pub conversation_id: Option<&'a str>,
    /// The client's name and version.
    pub client: (Option<&'a str>, Option<&'a str>),
    /// The client's W3C trace context.
    pub traceparent: Option<&'a str>,
}

/// Whether a start can be served; the problem for the client if not.
pub fn check_start(start: &StartRequest<'_>) -> Result<(), (ErrorCode, String)> {
    for (what, format) in [("input", start.input), ("output", start.output)] {
        if !AudioFormat::SUPPORTED_RATES.contains(&format.sample_rate) {
            return Err((
                ErrorCode::UnsupportedAudioFormat,
                format!(
                    "{what} sample rate {} is not supported (use 8000, 16000, 24000 or 48000)",
                    format.sample_rate
                ),
            ));
        }
    }
    let invalid = |m: String| Err((ErrorCode::InvalidMessage, m));
    if let Some((voice, false)) = start.voice {
        return invalid(format!(
            "unknown voice {:?}",
            voice.chars().take(40).collect::<String>()
        ));
    }
    if let Some(lang) = start.language
        && (lang.is_empty()
            || lang.len() > 35
            || !lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    {
        return invalid("language must be a BCP-47 tag such as en-US".into());
    }
    if start.conversation_id.is_some_and(|c| c.len() > 128) {
        return invalid("conversation_id is longer than 128 characters".into());
    }
    let (name, version) = start.client;
    if name.is_some_and(|n| n.len() > 64) || version.is_some_and(|v| v.len() > 64) {
        return invalid("client name and version must be at most 64 characters".into());
    }
    if start.traceparent.is_some_and(|t| !is_traceparent(t)) {
        return invalid(
            "traceparent must be a W3C trace context: 00-{32 hex digits}-{16 hex digits}-{2 hex \
             digits}, lowercase, ids not all zero"
                .into(),
        );
    }
    Ok(())
}

/// Whether `t` is a W3C `traceparent` header value (Trace Context, level 1): version `00`
/// exactly as specified; a later version (not `ff`) with the same four leading fields and
/// perhaps more after a `-`.
pub fn is_traceparent(t: &str) -> bool {
    const LEN: usize = 55;
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    if !t.is_ascii()
        || t.len() < LEN
        || (t.len() > LEN && (t.starts_with("00") || t.as_bytes()[LEN] != b'-'))
    {
        return false;
    }
    let mut fields = t[..LEN].split('-');
    match (fields.next(), fields.next(), fields.next(), fields.next()) {
        (Some(version), Some(trace_id), Some(parent_id), Some(flags)) => {
            version.len() == 2
                && version != "ff"
                && trace_id.len() == 32
                && parent_id.len() == 16
                && flags.len() == 2
                && [version, trace_id, parent_id, flags].into_iter().all(hex)
                && nonzero(trace_id)
                && nonzero(parent_id)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other() -> Frame {
        Frame::Other(
            ErrorCode::SessionNotStarted,
            "audio before session.start".into(),
        )
    }

    #[test]
    fn frames_before_the_start_are_answered_until_the_limit() {
        let mut p = Prestart::new(Instant::now());
        for _ in 0..MAX_INVALID_FRAMES {
            assert!(matches!(
                p.frame(other()),
                Verdict::Answer(Event::Problem { fatal: false, .. })
            ));
        }
        // Pings and control frames do not count.
        assert_eq!(p.frame(Frame::Control), Verdict::Wait);
        let pong = Event::Pong { id: None };
        assert_eq!(p.frame(Frame::Ping(pong.clone())), Verdict::Answer(pong));
        assert_eq!(p.frame(other()), Verdict::End(EndReason::Policy));
    }

    #[test]
    fn a_bad_start_counts_and_a_good_one_starts() {
        let mut p = Prestart::new(Instant::now());
        let bad = Frame::BadStart(ErrorCode::InvalidMessage, "unknown voice".into());
        assert!(matches!(
            p.frame(bad),
            Verdict::Answer(Event::Problem { .. })
        ));
        assert_eq!(p.frame(Frame::Start), Verdict::Started);
        assert_eq!(p.frame(Frame::End), Verdict::End(EndReason::ClientEnded));
    }

    #[test]
    fn the_start_is_due_ten_seconds_after_the_connection() {
        let t0 = Instant::now();
        let p = Prestart::new(t0);
        assert_eq!(p.deadline(), t0 + START_TIMEOUT);
        let (event, reason) = p.timed_out();
        assert_eq!(reason, EndReason::StartTimeout);
        assert!(matches!(
            event,
            Event::Problem {
                fatal: true,
                code: ErrorCode::SessionNotStarted,
                ..
            }
        ));
    }

    fn request() -> StartRequest<'static> {
        StartRequest {
            input: AudioFormat::DEFAULT_INPUT,
            output: AudioFormat::DEFAULT_OUTPUT,
            voice: None,
            language: None,
            conversation_id: None,
            traceparent: None,
            client: (None, None),
        }
    }

    #[test]
    fn a_start_is_checked_field_by_field() {
        assert_eq!(check_start(&request()), Ok(()));
        let mut r = request();
        r.input.sample_rate = 44_100;
        assert_eq!(
            check_start(&r).unwrap_err().0,
            ErrorCode::UnsupportedAudioFormat
        );
        let long = "x".repeat(129);
        for r in [
            StartRequest {
                voice: Some(("nova-9", false)),
                ..request()
            },
            StartRequest {
                language: Some("en US"),
                ..request()
            },
            StartRequest {
                conversation_id: Some(&long),
                ..request()
            },
            StartRequest {
                client: (Some(&long[..65]), None),
                ..request()
            },
        ] {
            assert_eq!(check_start(&r).unwrap_err().0, ErrorCode::InvalidMessage);
        }
        let known = StartRequest {
            voice: Some(("alloy", true)),
            language: Some("en-US"),
            ..request()
        };
        assert_eq!(check_start(&known), Ok(()));
    }

    #[test]
    fn a_traceparent_is_checked_against_the_w3c_format() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_traceparent(ok));
        // A later version may append fields.
        assert!(is_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00x",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(!is_traceparent(bad), "{bad:?}");
        }
        let start = |traceparent| StartRequest {
            traceparent,
            ..request()
        };
        assert!(check_start(&start(Some(ok))).is_ok());
        let (code, message) = check_start(&start(Some("00-1-2-3"))).unwrap_err();
        assert_eq!(code, ErrorCode::InvalidMessage);
        assert!(message.starts_with("traceparent must be"), "{message}");
    }
}
