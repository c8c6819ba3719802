//! The session machine under simulated time: every test runs in microseconds.

use super::ledger::ReportedTokens;
use super::*;
use crate::cost::from_usd;

/// The first of `$items` (outputs or events) that matches `$pat`, as `$e`.
macro_rules! first {
    ($items:expr, $pat:pat => $e:expr) => {
        $items.into_iter().find_map(|o| match o {
            $pat => Some($e),
            _ => None,
        })
    };
}

/// Every one of `$items` (outputs or events) that matches `$pat`, as `$e`, in order.
macro_rules! every {
    ($items:expr, $pat:pat => $e:expr) => {
        $items
            .into_iter()
            .filter_map(|o| match o {
                $pat => Some($e),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
}

mod drafts;
mod findings;
mod playout;
mod tools;

const S: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

fn config() -> Config {
    Config::reference()
}

/// The reference configuration with an idle timeout of `timeout`.
fn idle_after(timeout: Duration) -> Config {
    let mut c = config();
    c.timers.idle_timeout = timeout;
    c
}

/// A session under test with its own clock.
struct Harness {
    s: Session,
    now: Instant,
    start: Instant,
    /// Answer heartbeat pings (a healthy client).
    pong: bool,
}

impl Harness {
    fn new(config: Config) -> Self {
        let now = Instant::now();
        let mut h = Harness {
            s: Session::new("s1".into(), config, now, None),
            now,
            start: now,
            pong: true,
        };
        h.attach(false, "t1");
        h.drain();
        h
    }

    fn attach(&mut self, resumed: bool, token: &str) -> Vec<Output> {
        self.feed(Input::Attach(attaching(self, resumed, token)))
    }

    fn feed(&mut self, input: Input<'_>) -> Vec<Output> {
        self.s.handle(input, self.now);
        self.drain()
    }

    fn drain(&mut self) -> Vec<Output> {
        std::iter::from_fn(|| self.s.poll_output()).collect()
    }

    /// Advances the clock by `d`, waking the machine at every deadline on the way.
    fn advance(&mut self, d: Duration) -> Vec<Output> {
        let until = self.now + d;
        let mut out = Vec::new();
        while let Some(t) = self.s.poll_timeout() {
            if t > until {
                break;
            }
            self.now = t.max(self.now);
            self.s.handle_timeout(self.now);
            let step = self.drain();
            if self.pong && has(&step, |o| matches!(o, Output::Ping)) {
                self.s.handle(Input::Pong, self.now);
            }
            out.extend(step);
        }
        self.now = until;
        out
    }

    /// 100 ms of 16 kHz audio.
    fn audio(&mut self) -> Vec<Output> {
        self.feed(Input::Audio(Bytes::from(vec![0u8; 3200])))
    }

    /// Says `text` and ends the turn; returns the outputs.
    fn say(&mut self, text: &str) -> Vec<Output> {
        self.hear_final(text, true, None)
    }

    /// The recogniser's final transcript of `text`.
    fn hear_final(
        &mut self,
        text: &str,
        speech_final: bool,
        end_of_speech: Option<Instant>,
    ) -> Vec<Output> {
        self.feed(Input::Heard(Heard::Final {
            text,
            speech_final,
            end_of_speech,
        }))
    }

    /// The reply to `turn_id` speaks `text`: 100 ms of audio, then the sentence's end.
    fn speak(&mut self, turn_id: u64, text: &str) -> Vec<Output> {
        if text.is_empty() {
            return Vec::new();
        }
        let round = self.s.reply.as_ref().map_or(0, |r| r.rounds);
        let mut out = self.feed(Input::ReplyAudio {
            turn_id,
            pcm: &[0; 4800],
        });
        out.extend(self.feed(Input::ReplySentence {
            turn_id,
            round: Some(round),
            text: text.into(),
        }));
        out
    }

    /// The reply to `turn_id` speaks `spoken` and its task ends.
    fn reply_done(&mut self, turn_id: u64, spoken: &str, output_tokens: u64) -> Vec<Output> {
        let mut out = self.speak(turn_id, spoken);
        out.extend(self.feed(Input::ReplyEnded(outcome(turn_id, spoken, output_tokens))));
        out
    }
}

/// A session whose reply to "Hello" is cut by `cut`: checks the reply was stopped, and
/// returns the session and what the cut put out.
fn reply_cut_by(
    config: Config,
    cut: impl FnOnce(&mut Harness) -> Vec<Output>,
) -> (Harness, Vec<Output>) {
    let mut h = Harness::new(config);
    h.say("Hello");
    let out = cut(&mut h);
    assert!(aborted(&out, 1));
    (h, out)
}

/// The harness's user asking to attach with `token`.
fn attaching(h: &Harness, resumed: bool, token: &str) -> Attaching {
    Attaching {
        resumed,
        overtaken: false,
        user_id: "user".into(),
        token: token.into(),
        token_expiry: h.start + 3600 * S,
        input: AudioFormat::DEFAULT_INPUT,
        output: AudioFormat::DEFAULT_OUTPUT,
    }
}

/// The report of a reply that generated and synthesised `spoken`.
fn outcome(turn_id: u64, spoken: &str, output_tokens: u64) -> ReplyOutcome {
    ReplyOutcome {
        turn_id,
        llm: LlmBill {
            billable: true,
            finished: true,
            prompt_chars: 400,
            generated_chars: spoken.len(),
            reported: ReportedTokens {
                input: Some(100),
                output: Some(output_tokens),
                ..ReportedTokens::default()
            },
        },
        tts_chars: spoken.len() as u64,
        latency: Latency::default(),
        failure: None,
    }
}

fn finish(out: &[Output]) -> Option<Finish> {
    first!(out, Output::Finish(f) => *f)
}

/// Why the session ended, if it did.
fn end_reason(out: &[Output]) -> Option<EndReason> {
    finish(out).map(|f| f.reason)
}

fn events(out: &[Output]) -> Vec<&Event> {
    every!(out, Output::Event(e) => e)
}

fn turn_log(out: &[Output]) -> &TurnLog {
    first!(out, Output::Turn(t) => t).expect("a turn log")
}

/// The turn logged: what the person said, what the assistant said, and how it ended.
fn logged(out: &[Output]) -> (&str, &str, &str) {
    let turn = turn_log(out);
    (&turn.user_text, &turn.assistant_text, turn.outcome)
}

fn has(out: &[Output], pred: impl Fn(&Output) -> bool) -> bool {
    out.iter().any(pred)
}

/// The machine stopped the reply to `turn_id`.
fn aborted(out: &[Output], turn_id: u64) -> bool {
    has(
        out,
        |o| matches!(o, Output::AbortReply { turn_id: t } if *t == turn_id),
    )
}

/// The machine started the reply to `turn_id`.
fn started_reply(out: &[Output], turn_id: u64) -> bool {
    has(
        out,
        |o| matches!(o, Output::StartReply { turn_id: t, .. } if *t == turn_id),
    )
}

fn error_code(out: &[Output]) -> Option<ErrorCode> {
    first!(events(out), Event::Problem { code, .. } => *code)
}

#[test]
fn attach_announces_the_session_and_registers_its_token() {
    let now = Instant::now();
    let mut s = Session::new("s1".into(), config(), now, None);
    s.handle(
        Input::Attach(Attaching {
            resumed: false,
            overtaken: false,
            user_id: "user".into(),
            token: "t1".into(),
            token_expiry: now + 3600 * S,
            input: AudioFormat::DEFAULT_INPUT,
            output: AudioFormat::DEFAULT_OUTPUT,
        }),
        now,
    );
    let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    assert!(has(
        &out,
        |o| matches!(o, Output::RegisterToken(t) if t == "t1")
    ));
    assert!(matches!(
        events(&out)[..],
        [Event::Ready { session_id, resume_token, resumed_turns: None, .. }] if session_id == "s1" && resume_token == "t1"
    ));
    assert!(s.is_attached());
}

#[test]
fn a_turn_starts_a_reply_and_its_end_is_billed_and_recorded() {
    let mut h = Harness::new(config());
    let out = h.say("What is the weather?");
    assert!(started_reply(&out, 1));
    assert_eq!(h.s.history().count(), 1);
    let out = h.reply_done(1, "Sunny.", 10);
    assert_eq!(
        logged(&out),
        ("What is the weather?", "Sunny.", "completed")
    );
    assert!(has(&out, |o| matches!(o, Output::Spend(d) if d.llm > 0)));
    assert!(events(&out).iter().any(|e| matches!(
        e,
        Event::Usage(u) if u.llm_input_tokens == 100 && u.llm_output_tokens == 10
    )));
    assert_eq!(h.s.history().count(), 2);
}

#[test]
fn barge_in_aborts_and_keeps_only_what_was_spoken() {
    let mut h = Harness::new(config());
    h.say("Tell me a story");
    h.speak(1, "Once upon");
    // Its 100 ms have played; the next sentence's have not.
    h.advance(150 * MS);
    h.speak(1, "a time there was a princess.");
    let out = h.feed(Input::Heard(Heard::Partial("wait stop")));
    assert!(aborted(&out, 1));
    let mut o = outcome(1, "Once upon", 0);
    o.llm.finished = false;
    o.llm.reported.output = None;
    o.llm.generated_chars = 40;
    let out = h.feed(Input::ReplyEnded(o));
    assert!(events(&out).contains(&&Event::Interrupted { turn_id: 1 }));
    // Output measured from the generated text when the provider's count is not final.
    assert_eq!(h.s.ledger().usage().llm_output_tokens, 10);
    assert_eq!(h.s.history().last().unwrap().text, "Once upon");
}

/// The words the model writes are what the echo guard listens for: the reply's own voice
/// heard back neither cuts it nor, once it is over, makes a turn; a kept draft's words count
/// from when they go out.
#[test]
fn the_replys_own_words_heard_back_cut_nothing_and_make_no_turn() {
    let mut c = config();
    c.turns.echo_window = Duration::from_secs(1);
    c.turns.drafts = 1;
    let mut h = Harness::new(c);
    h.hear_final("Tell me a story", false, Some(h.now));
    h.feed(Input::ReplyText {
        turn_id: 1,
        text: "Once upon a time there was a fox.".into(),
    });
    // The turn ends with the draft's words: they go out, and may come back.
    assert!(!started_reply(&h.hear_final("", true, None), 2));
    h.speak(1, "Once upon a time there was a fox.");
    let out = h.feed(Input::Heard(Heard::Partial("once upon a time there")));
    assert!(out.is_empty(), "{out:?}");
    h.advance(500 * MS);
    h.feed(Input::ReplyEnded(outcome(
        1,
        "Once upon a time there was a fox.",
        9,
    )));
    let out = h.hear_final("Once upon a time, there was a fox.", true, None);
    assert!(!started_reply(&out, 2) && !aborted(&out, 1), "{out:?}");
    assert_eq!(h.s.last_turn(), 1);
    // Past the window, the same words are the person's.
    h.advance(2_000 * MS);
    let out = h.hear_final("Once upon a time, there was a fox.", true, None);
    assert!(started_reply(&out, 2), "{out:?}");
}

/// A turn that ends while the reply before it is being cut waits for that reply's report
/// before its own starts: the wait is logged as time queued in the server.
#[test]
fn a_turn_waiting_for_the_reply_it_cut_logs_the_wait() {
    let mut h = Harness::new(config());
    h.say("Tell me a story");
    h.speak(1, "Once upon a time.");
    let out = h.say("No, tell me about Rome");
    assert!(aborted(&out, 1) && !started_reply(&out, 2));
    h.advance(30 * MS);
    let out = h.feed(Input::ReplyEnded(outcome(1, "Once upon a time.", 5)));
    assert!(
        turn_log(&out).queued.is_zero(),
        "the cut reply waited for nothing"
    );
    assert!(started_reply(&out, 2));
    let mut out = h.reply_done(2, "Rome is old.", 4);
    out.extend(h.advance(500 * MS));
    assert_eq!(turn_log(&out).turn_id, 2);
    assert_eq!(turn_log(&out).queued, 30 * MS);
}

#[test]
fn a_reply_cut_before_its_first_token_still_pays_for_the_prompt() {
    let mut h = Harness::new(config());
    h.say("Hello");
    h.feed(Input::Cancel);
    let out = h.feed(Input::ReplyEnded(ReplyOutcome {
        turn_id: 1,
        llm: LlmBill {
            billable: true,
            finished: false,
            prompt_chars: 400,
            generated_chars: 0,
            reported: ReportedTokens::default(),
        },
        tts_chars: 0,
        latency: Latency::default(),
        failure: None,
    }));
    assert_eq!(h.s.ledger().usage().llm_input_tokens, 100);
    assert!(has(&out, |o| matches!(o, Output::Spend(d) if d.llm == 100)));
}

#[test]
fn detach_cuts_the_reply_and_waits_for_the_resume_window() {
    let (mut h, out) = reply_cut_by(config(), |h| h.feed(Input::Detach));
    assert!(has(&out, |o| matches!(o, Output::CloseRecogniser)));
    assert!(!h.s.is_attached());
    let out = h.feed(Input::ReplyEnded(outcome(1, "", 0)));
    // Nothing is sent to a detached client.
    assert!(events(&out).is_empty());
    // Resumed inside the window: same session, history and usage intact.
    h.advance(59 * S);
    let out = h.attach(true, "t2");
    assert!(matches!(
        events(&out)[0],
        Event::Ready { session_id, resumed_turns: Some(1), resume_token, .. } if session_id == "s1" && resume_token == "t2"
    ));
    assert!(
        events(&out)
            .iter()
            .any(|e| matches!(e, Event::Usage(u) if u.llm_input_tokens == 100))
    );
    // The cut reply had spoken nothing: only the person's words stay in the history.
    assert_eq!(h.s.history().count(), 1);
}

#[test]
fn the_resume_window_ends_a_detached_session() {
    let mut h = Harness::new(config());
    h.feed(Input::Detach);
    let out = h.advance(59 * S);
    assert_eq!(finish(&out), None);
    let out = h.advance(2 * S);
    assert_eq!(
        finish(&out),
        Some(Finish {
            reason: EndReason::ResumeExpired,
            record: true,
            handover: false
        })
    );
    assert!(h.s.is_ended());
    assert_eq!(h.s.poll_timeout(), None);
    // Nothing after the end: a resume on its way is refused.
    assert!(matches!(
        h.attach(true, "t2").as_slice(),
        [Output::RefuseConnection {
            code: ErrorCode::ResumeFailed,
            ..
        }]
    ));
}

#[test]
fn the_previous_token_stays_valid_until_the_client_uses_the_new_one() {
    let mut h = Harness::new(config());
    h.feed(Input::Detach);
    let out = h.attach(true, "t2");
    assert!(has(
        &out,
        |o| matches!(o, Output::RegisterToken(t) if t == "t2")
    ));
    // Not retired yet: session.resumed may be lost, and the client retries with t1.
    assert!(!has(&out, |o| matches!(o, Output::RetireToken(_))));
    let out = h.feed(Input::Ping(None));
    assert!(has(
        &out,
        |o| matches!(o, Output::RetireToken(t) if t == "t1")
    ));
}

#[test]
fn a_lost_session_resumed_is_retried_with_the_old_token_then_the_grace_ends_it() {
    let mut h = Harness::new(config());
    h.feed(Input::Detach);
    h.attach(true, "t2");
    // The client never got session.resumed; it resumes again (with t1, still valid).
    h.feed(Input::Detach);
    let out = h.attach(true, "t3");
    // t1 is useless once a newer resume happened; t2 is now the previous token.
    assert!(has(
        &out,
        |o| matches!(o, Output::RetireToken(t) if t == "t1")
    ));
    let out = h.advance(31 * S);
    assert!(has(
        &out,
        |o| matches!(o, Output::RetireToken(t) if t == "t2")
    ));
}

#[test]
fn pings_do_not_keep_a_session_alive() {
    let mut h = Harness::new(idle_after(3 * S));
    let mut ended = None;
    for _ in 0..24 {
        let mut out = h.feed(Input::Ping(None));
        out.extend(h.advance(S / 2));
        if let Some(f) = finish(&out) {
            ended = Some((f, h.now - h.start));
            break;
        }
    }
    let (f, at) = ended.expect("the idle timeout ended the session");
    assert_eq!(f.reason, EndReason::IdleTimeout);
    assert!(at <= 3 * S + S / 2, "{at:?}");
}

#[test]
fn audio_and_user_messages_are_activity() {
    let mut h = Harness::new(idle_after(3 * S));
    for _ in 0..10 {
        h.advance(2 * S);
        let out = h.audio();
        assert!(finish(&out).is_none());
    }
    h.advance(2 * S);
    assert!(finish(&h.feed(Input::Commit)).is_none());
    h.advance(2 * S);
    assert!(finish(&h.feed(Input::Text("hi"))).is_none());
    h.reply_done(1, "Hello.", 2);
    let out = h.advance(4 * S);
    assert_eq!(end_reason(&out), Some(EndReason::IdleTimeout));
}

#[test]
fn heartbeat_pings_and_a_missed_pong_detaches() {
    let mut h = Harness::new(config());
    h.pong = false;
    let out = h.advance(30 * S);
    assert!(has(&out, |o| matches!(o, Output::Ping)));
    h.feed(Input::Pong);
    let out = h.advance(30 * S);
    assert!(has(&out, |o| matches!(o, Output::Ping)));
    let out = h.advance(11 * S);
    assert!(has(&out, |o| matches!(
        o,
        Output::CloseConnection(Closing::HeartbeatTimeout)
    )));
    assert!(!h.s.is_attached());
    assert!(!h.s.is_ended());
}

#[test]
fn maximum_duration_warns_then_ends() {
    let mut h = Harness::new(idle_after(10_000 * S));
    let mut warned = false;
    let mut ended = None;
    for _ in 0..1800 {
        let mut out = h.audio();
        out.extend(h.advance(S));
        warned |= events(&out).iter().any(|e| {
            matches!(
                e,
                Event::Ending {
                    reason: Ending::MaxDuration,
                    seconds_left: 60
                }
            )
        });
        if let Some(f) = finish(&out) {
            ended = Some((f.reason, h.now - h.start));
            break;
        }
    }
    assert!(warned);
    let (reason, at) = ended.unwrap();
    assert_eq!(reason, EndReason::MaxDuration);
    assert_eq!(at, 1800 * S);
}

#[test]
fn a_continued_session_keeps_its_age() {
    let now = Instant::now();
    let carried = Carried {
        last_turn: 3,
        history: vec![
            CarriedMessage {
                role: CarriedRole::User,
                text: "hi".into(),
                tool_calls: Vec::new(),
                tool_results: Vec::new(),
            },
            CarriedMessage {
                role: CarriedRole::Assistant,
                text: "hello".into(),
                tool_calls: Vec::new(),
                tool_results: Vec::new(),
            },
        ],
        ledger: LedgerState::default(),
    };
    let c = idle_after(10_000 * S);
    let mut s = Session::new("s1".into(), c, now, Some((carried, 1790 * S)));
    assert_eq!(s.last_turn(), 3);
    assert_eq!(s.history().count(), 2);
    s.handle_timeout(now + 10 * S);
    let out: Vec<_> = std::iter::from_fn(|| s.poll_output()).collect();
    assert_eq!(end_reason(&out), Some(EndReason::MaxDuration));
}

#[test]
fn token_expiry_ends_unless_refreshed() {
    let mut c = idle_after(10_000 * S);
    c.timers.max_duration = 20_000 * S;
    let mut h = Harness::new(c.clone());
    // Expires at +3600 s, grace 10 s.
    let out = h.advance(3609 * S);
    assert!(finish(&out).is_none());
    let out = h.advance(2 * S);
    assert_eq!(end_reason(&out), Some(EndReason::TokenExpired));
    assert_eq!(error_code(&out), Some(ErrorCode::TokenExpired));

    let mut h = Harness::new(c.clone());
    h.advance(3500 * S);
    let later = h.start + 7200 * S;
    let out = h.feed(Input::TokenRefreshed(Ok(VerifiedToken {
        user_id: "user".into(),
        expiry: later,
    })));
    assert_eq!(error_code(&out), None);
    let out = h.advance(200 * S);
    assert!(finish(&out).is_none());
    let out = h.feed(Input::TokenRefreshed(Err("bad signature".into())));
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    assert!(finish(&out).is_none());

    // A valid token of another user extends nothing: the session still ends on the first
    // token's expiry.
    let mut h = Harness::new(c);
    h.advance(3500 * S);
    let out = h.feed(Input::TokenRefreshed(Ok(VerifiedToken {
        user_id: "someone else".into(),
        expiry: h.start + 7200 * S,
    })));
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthorized));
    let out = h.advance(200 * S);
    assert_eq!(end_reason(&out), Some(EndReason::TokenExpired));
}

#[test]
fn a_resume_is_attached_in_place_of_the_connection_it_replaces_or_refused() {
    let mut h = Harness::new(config());
    // A second connection while one is attached: the first is told and closed, then the
    // second attached.
    let out = h.attach(true, "t2");
    let closed = out
        .iter()
        .position(|o| matches!(o, Output::CloseConnection(Closing::Replaced)))
        .expect("the replaced connection is closed");
    let attached = out
        .iter()
        .position(|o| matches!(o, Output::AttachConnection))
        .expect("the resume is attached");
    assert!(closed < attached);
    assert!(matches!(
        &out[..closed],
        [
            ..,
            Output::Event(Event::Problem {
                code: ErrorCode::Internal,
                fatal: true,
                ..
            })
        ]
    ));

    // A resume whose hand-over a later one overtook is refused; the session goes on.
    let mut overtaken = attaching(&h, true, "t3");
    overtaken.overtaken = true;
    let out = h.feed(Input::Attach(overtaken));
    assert!(matches!(
        out.as_slice(),
        [Output::RefuseConnection {
            code: ErrorCode::ResumeFailed,
            closing: Closing::ResumeOvertaken,
            ..
        }]
    ));
    assert!(h.s.is_attached());

    // Once the session ended, a resume is refused as well.
    h.feed(Input::End);
    let out = h.attach(true, "t4");
    assert!(matches!(
        out.as_slice(),
        [Output::RefuseConnection {
            code: ErrorCode::ResumeFailed,
            closing: Closing::Ended(_),
            ..
        }]
    ));
}

/// The reference configuration with the smart turn policy (1.5 s of maximum silence).
fn smart() -> Config {
    let mut c = config();
    c.turns.policy = crate::turns::TurnPolicy::Smart {
        threshold: 0.5,
        max_silence: 1500 * MS,
        unjudged: 300 * MS,
    };
    c
}

#[test]
fn under_the_smart_policy_a_pause_is_judged_and_the_silence_is_the_fallback() {
    let mut h = Harness::new(smart());
    // The endpoint is a pause: the model is asked, nothing is answered yet.
    let eos = h.now;
    let out = h.hear_final("What is the capital of", true, Some(eos));
    let pause = first!(&out, Output::ScoreTurn { pause } => *pause).expect("a score asked");
    assert!(!started_reply(&out, 1));
    // The model hears an unfinished thought: the machine waits, and its timer is the
    // pause's maximum silence from the end of speech.
    let out = h.feed(Input::TurnScored {
        pause,
        probability: 0.1,
    });
    assert!(!started_reply(&out, 1));
    assert_eq!(h.s.poll_timeout(), Some(eos + 1500 * MS));
    // The person goes on; the next pause is judged complete: the reply starts at once.
    h.advance(400 * MS);
    h.feed(Input::Heard(Heard::SpeechStarted));
    let out = h.hear_final("France?", true, Some(h.now));
    let next = first!(&out, Output::ScoreTurn { pause } => *pause).expect("a new pause");
    assert_ne!(next, pause);
    let out = h.feed(Input::TurnScored {
        pause: next,
        probability: 0.93,
    });
    assert!(started_reply(&out, 1));
    assert_eq!(
        first!(events(&out), Event::Heard { text, .. } => text.as_str()),
        Some("What is the capital of France?")
    );
    // A pause the model never answers ends by the clock, and not before.
    h.feed(Input::ReplyEnded(outcome(1, "Paris.", 5)));
    let eos = h.now;
    h.hear_final("Thanks", true, Some(eos));
    assert!(!started_reply(&h.advance(1499 * MS), 2));
    assert!(started_reply(&h.advance(MS), 2));
    // One it cannot judge (busy) ends as the silence policy would have ended it.
    h.feed(Input::ReplyEnded(outcome(2, "You're welcome.", 5)));
    let out = h.hear_final("Bye", true, Some(h.now));
    let pause = first!(&out, Output::ScoreTurn { pause } => *pause).expect("a score asked");
    assert!(!started_reply(&h.feed(Input::TurnUnjudged { pause }), 3));
    assert!(!started_reply(&h.advance(299 * MS), 3));
    assert!(started_reply(&h.advance(MS), 3));
}

#[test]
fn checkpoints_come_on_schedule() {
    let mut h = Harness::new(idle_after(10_000 * S));
    let out = h.advance(181 * S);
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::Checkpoint))
            .count(),
        3
    );
}

#[test]
fn budget_warns_once_then_stops_before_overspending() {
    let mut c = config();
    // One reply estimate: 200 output tokens (1,000 µ$) + 800 chars of speech (12,000 µ$).
    c.session_budget = Some(30_000);
    let mut h = Harness::new(c);
    h.say("one");
    // A costly reply: 5,000 output tokens = 25,000 µ$, past the 80 % warning.
    let out = h.reply_done(1, "ok", 5_000);
    assert!(
        events(&out)
            .iter()
            .any(|e| matches!(e, Event::BudgetWarning { .. }))
    );
    // The next reply would pass the budget: refused before starting, session ends 4402.
    let out = h.say("two");
    assert!(!has(&out, |o| matches!(o, Output::StartReply { .. })));
    let f = finish(&out).unwrap();
    assert_eq!(f.reason, EndReason::BudgetExhausted);
    assert!(f.record);
    assert!(has(
        &out,
        |o| matches!(o, Output::Turn(t) if t.outcome == "refused" && t.user_text == "two")
    ));
    assert!(
        !events(&out)
            .iter()
            .any(|e| matches!(e, Event::BudgetWarning { .. }))
    );
}

#[test]
fn recognition_is_budgeted_while_the_person_talks() {
    let mut c = config();
    c.session_budget = Some(100); // $0.0001: 1.4 s of recognition
    let mut h = Harness::new(c);
    let mut forwarded = 0;
    let mut ended = None;
    for _ in 0..100 {
        let out = h.audio();
        forwarded += out
            .iter()
            .filter(|o| matches!(o, Output::Forward { .. }))
            .count();
        if let Some(f) = finish(&out) {
            ended = Some(f.reason);
            break;
        }
    }
    assert_eq!(ended, Some(EndReason::BudgetExhausted));
    assert!(forwarded < 30, "{forwarded}");
}

/// 20 ms of 16 kHz audio at a constant `amplitude` (0: digital silence).
fn frame(amplitude: i16) -> Bytes {
    Bytes::from(amplitude.to_le_bytes().repeat(320))
}

impl Harness {
    /// `n` frames at `amplitude`, 20 ms apart: whether each may wait for the next.
    fn frames(&mut self, amplitude: i16, n: usize) -> Vec<bool> {
        (0..n)
            .flat_map(|_| {
                self.now += 20 * MS;
                let out = self.feed(Input::Audio(frame(amplitude)));
                out.into_iter().filter_map(|o| match o {
                    Output::Forward { hold, .. } => Some(hold),
                    _ => None,
                })
            })
            .collect()
    }
}

#[test]
fn audio_waits_for_the_recogniser_only_where_no_reply_depends_on_it() {
    let mut h = Harness::new(config());
    // Quiet before speech: four frames wait, the fifth takes all five (100 ms).
    assert_eq!(h.frames(0, 5), [true, true, true, true, false]);
    // Speech: every frame goes at once (barge-in, and the end of the turn never waits for
    // the frame after the last voiced one).
    assert_eq!(h.frames(8_000, 11), [false; 11]);
    // After speech every quiet frame goes at once: the recogniser is timing that silence,
    // and the reply waits for it…
    assert_eq!(h.frames(0, 8), [false; 8]);
    // …until the recogniser reports the end.
    let out = h.say("hello");
    assert!(has(&out, |o| matches!(o, Output::StartReply { .. })));
    assert_eq!(h.frames(0, 5), [true, true, true, true, false]);
}

#[test]
fn held_audio_goes_by_its_deadline_when_the_client_stops_sending() {
    let mut h = Harness::new(config());
    assert_eq!(h.frames(0, 2), [true, true]);
    let first = h.now - 20 * MS;
    assert!(h.s.poll_timeout().unwrap() <= first + 100 * MS);
    assert!(!has(&h.advance(79 * MS), |o| matches!(o, Output::SendHeld)));
    assert!(has(&h.advance(MS), |o| matches!(o, Output::SendHeld)));
    // Nothing is held any more.
    assert!(!has(&h.advance(S), |o| matches!(o, Output::SendHeld)));
}

#[test]
fn the_daily_budget_spans_sessions() {
    let mut c = config();
    c.daily_budget = Some(from_usd(1.0));
    let mut h = Harness::new(c);
    // Other sessions of the user spent almost all of today's budget.
    let out = h.feed(Input::DailySpent(from_usd(0.999)));
    assert!(finish(&out).is_none());
    let out = h.say("hello");
    assert_eq!(end_reason(&out), Some(EndReason::BudgetExhausted));
}

#[test]
fn spend_is_reported_for_the_daily_total_once() {
    let mut h = Harness::new(config());
    h.say("one");
    let out = h.reply_done(1, "ok", 100);
    let daily: u64 = every!(&out, Output::Spend(d) => d.daily).iter().sum();
    assert_eq!(daily, h.s.ledger().cost().total.unwrap());
}

#[test]
fn invalid_frames_get_errors_then_a_policy_close() {
    let mut h = Harness::new(config());
    for i in 0..50 {
        let out = h.feed(Input::Audio(Bytes::from_static(&[0u8; 101])));
        assert_eq!(error_code(&out), Some(ErrorCode::AudioChunkInvalid), "{i}");
        assert!(has(&out, |o| matches!(o, Output::Rejected("odd_length"))));
        assert!(!has(&out, |o| matches!(o, Output::Forward { .. })));
    }
    let out = h.feed(Input::Invalid(ErrorCode::InvalidMessage, "bad".into()));
    assert_eq!(end_reason(&out), Some(EndReason::Policy));
}

#[test]
fn floods_are_dropped_then_closed() {
    let mut h = Harness::new(config());
    let mut dropped = 0;
    let mut ended = None;
    'outer: for second in 0..10 {
        for _ in 0..150 {
            let out = h.audio();
            dropped += out
                .iter()
                .filter(|o| matches!(o, Output::Rejected("rate")))
                .count();
            if let Some(f) = finish(&out) {
                ended = Some((f.reason, second));
                break 'outer;
            }
        }
        h.advance(S);
    }
    assert!(dropped >= 50 * 5);
    assert_eq!(ended, Some((EndReason::Policy, 5)));
}

#[test]
fn session_end_gets_through_a_flood() {
    let mut h = Harness::new(config());
    for _ in 0..150 {
        h.audio();
    }
    let out = h.feed(Input::End);
    assert_eq!(end_reason(&out), Some(EndReason::ClientEnded));
}

#[test]
fn recogniser_failures_end_the_session_after_four() {
    let mut h = Harness::new(config());
    let out = h.feed(Input::RecogniserLost {
        busy: true,
        failures: 0,
    });
    assert_eq!(error_code(&out), Some(ErrorCode::EnginesBusy));
    for n in 1..4 {
        let out = h.feed(Input::RecogniserLost {
            busy: false,
            failures: n,
        });
        assert!(finish(&out).is_none());
    }
    let out = h.feed(Input::RecogniserLost {
        busy: false,
        failures: 4,
    });
    assert_eq!(end_reason(&out), Some(EndReason::ProviderFailed));
}

#[test]
fn ending_mid_reply_records_the_cut_reply_first() {
    let (mut h, out) = reply_cut_by(config(), |h| h.feed(Input::End));
    assert_eq!(finish(&out), None);
    let out = h.feed(Input::ReplyEnded(outcome(1, "Hi", 1)));
    let turn_at = out.iter().position(|o| matches!(o, Output::Turn(_)));
    let finish_at = out.iter().position(|o| matches!(o, Output::Finish(_)));
    assert!(turn_at.unwrap() < finish_at.unwrap());
    assert!(has(&out, |o| matches!(o, Output::Turn(t) if t.interrupted)));
}

fn clustered() -> Config {
    let mut c = idle_after(10_000 * S);
    c.lease_ttl = Some(15 * S);
    c
}

#[test]
fn resume_state_is_published_after_each_turn_and_on_detach() {
    let mut h = Harness::new(clustered());
    h.say("one");
    let out = h.reply_done(1, "ok", 1);
    assert!(has(&out, |o| matches!(o, Output::Publish)));
    let out = h.feed(Input::Detach);
    assert!(has(&out, |o| matches!(o, Output::Publish)));
}

#[test]
fn leases_are_refreshed_and_a_lapse_fails_closed() {
    let mut h = Harness::new(clustered());
    let out = h.advance(5 * S);
    assert!(has(&out, |o| matches!(o, Output::RefreshLease)));
    // No second refresh while one is in flight.
    assert!(!has(&h.advance(S), |o| matches!(o, Output::RefreshLease)));
    let sent = h.start + 5 * S;
    h.feed(Input::Lease {
        answer: LeaseAnswer::Extended,
        sent_at: sent,
    });
    // The store goes away: refreshes fail, retried; the session ends when the lease runs
    // out, before the store could give its place to another session.
    let mut ended = None;
    for _ in 0..100 {
        let out = h.advance(S);
        if has(&out, |o| matches!(o, Output::RefreshLease)) {
            h.feed(Input::Lease {
                answer: LeaseAnswer::Unreachable,
                sent_at: h.now,
            });
        }
        if let Some(f) = finish(&out) {
            ended = Some((f.reason, h.now));
            break;
        }
    }
    let (reason, at) = ended.unwrap();
    assert_eq!(reason, EndReason::LeaseLost);
    assert!(at <= sent + 15 * S, "{:?}", at - sent);
}

#[test]
fn a_lapsed_lease_without_a_place_or_a_stale_one_ends_the_session() {
    // A stale lease answer ends it as moved, like a stale owner (below).
    for (answer, reason) in [
        (LeaseAnswer::NoPlace, EndReason::LeaseLost),
        (LeaseAnswer::Stale, EndReason::Moved),
    ] {
        let mut h = Harness::new(clustered());
        h.advance(5 * S);
        let out = h.feed(Input::Lease {
            answer,
            sent_at: h.now,
        });
        assert_eq!(end_reason(&out), Some(reason), "{answer:?}");
    }
}

#[test]
fn a_stale_owner_writes_nothing_more() {
    let (mut h, _) = reply_cut_by(clustered(), |h| h.feed(Input::OwnershipLost));
    let out = h.feed(Input::ReplyEnded(outcome(1, "Hi", 5)));
    let f = finish(&out).unwrap();
    assert_eq!(
        f,
        Finish {
            reason: EndReason::Moved,
            record: false,
            handover: false
        }
    );
    assert!(!has(&out, |o| matches!(
        o,
        Output::Spend(_) | Output::Publish | Output::Checkpoint
    )));
}

#[test]
fn drain_hands_over_with_scale_out_and_records_without() {
    let mut h = Harness::new(clustered());
    let f = finish(&h.feed(Input::Shutdown)).unwrap();
    assert!(f.handover && f.record);
    let mut h = Harness::new(config());
    let out = h.feed(Input::Shutdown);
    let f = finish(&out).unwrap();
    assert!(!f.handover && f.record);
    assert_eq!(f.reason, EndReason::Draining);
    assert!(events(&out).iter().any(|e| matches!(
        e,
        Event::Ending {
            reason: Ending::Draining,
            ..
        }
    )));
}

#[test]
fn a_typed_turn_is_answered_like_speech() {
    let mut h = Harness::new(config());
    let out = h.feed(Input::Text("  What time is it?  "));
    assert!(events(&out).contains(&&Event::Heard {
        turn_id: 1,
        text: "What time is it?".into()
    }));
    assert!(started_reply(&out, 1));
    assert!(h.feed(Input::Text("   ")).is_empty());
}

#[test]
fn a_replacing_connection_cuts_the_reply() {
    let (h, _) = reply_cut_by(config(), |h| h.attach(true, "t2"));
    assert!(h.s.is_attached());
}
