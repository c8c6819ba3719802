//! Findings reproduced from outside (issue 25), each a machine-level regression test.

use super::*;

fn turn_logs(out: &[Output]) -> Vec<TurnLog> {
    every!(out, Output::Turn(t) => t.clone())
}

fn started(out: &[Output]) -> Vec<(u64, Option<Instant>)> {
    every!(out, Output::StartReply { turn_id, end_of_speech } => (*turn_id, *end_of_speech))
}

/// A turn that cuts the reply in flight must not make the cut reply free: its outcome is
/// billed and recorded, and the next reply starts only once the cut one has reported.
fn cut_by(cut: impl FnOnce(&mut Harness) -> Vec<Output>) {
    let mut h = Harness::new(config());
    h.feed(Input::Text("Tell me a long story"));
    h.speak(1, "Once upon a time");
    h.advance(200 * MS);
    let out = cut(&mut h);
    assert!(aborted(&out, 1));
    // One reply at a time: the next waits for the cut one's outcome.
    assert!(
        started(&out).is_empty(),
        "started before the cut reply ended"
    );
    let out = h.feed(Input::ReplyEnded(outcome(1, "Once upon a time", 40)));
    let logs = turn_logs(&out);
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].turn_id, 1);
    assert_eq!(logs[0].user_text, "Tell me a long story");
    assert_eq!(logs[0].assistant_text, "Once upon a time");
    assert!(logs[0].interrupted);
    assert_eq!(started(&out).len(), 1, "the waiting turn starts now");
    let next = started(&out)[0].0;
    h.reply_done(next, "Sure.", 5);
    // Both requests billed: 40 + 5 output tokens, 100 + 100 input.
    let usage = h.s.ledger().usage();
    assert_eq!(usage.llm_output_tokens, 45);
    assert_eq!(usage.llm_input_tokens, 200);
    // The history keeps the order things were said in.
    let roles: Vec<Role> = h.s.history().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [Role::User, Role::Assistant, Role::User, Role::Assistant]
    );
}

#[test]
fn a_typed_turn_during_a_reply_bills_the_cut_reply() {
    cut_by(|h| h.feed(Input::Text("Actually, what time is it?")));
}

#[test]
fn a_commit_during_a_reply_bills_the_cut_reply() {
    cut_by(|h| {
        let mut out = h.hear_final("stop and tell me the time", false, None);
        out.extend(h.feed(Input::Commit));
        out
    });
}

#[test]
fn a_final_without_a_partial_during_a_reply_bills_the_cut_reply() {
    cut_by(|h| h.say("No, tell me about Paris instead"));
}

#[test]
fn a_typed_turn_after_a_cancel_bills_the_cancelled_reply() {
    cut_by(|h| {
        let mut out = h.feed(Input::Cancel);
        out.extend(h.feed(Input::Text("What time is it?")));
        out
    });
}

#[test]
fn a_flood_of_typed_turns_runs_one_request_at_a_time_and_bills_each() {
    let mut h = Harness::new(config());
    h.feed(Input::Text("one"));
    let mut starts = 1;
    let mut logs = Vec::new();
    for i in 0..20 {
        let out = h.feed(Input::Text(if i % 2 == 0 { "two" } else { "three" }));
        starts += started(&out).len();
        logs.extend(turn_logs(&out));
    }
    // Only the first started; every later one waits or is superseded.
    assert_eq!(starts, 1);
    let out = h.feed(Input::ReplyEnded(outcome(1, "", 3)));
    logs.extend(turn_logs(&out));
    // The cut reply and the 19 superseded turns are all recorded; the last one starts.
    assert_eq!(logs.len(), 20);
    assert!(logs.iter().all(|l| l.interrupted));
    let next = started(&out);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].0, 21);
    assert_eq!(h.s.ledger().usage().llm_output_tokens, 3);
}

#[test]
fn a_late_utterance_end_does_not_date_the_next_typed_turn() {
    let mut h = Harness::new(config());
    let spoke = h.now;
    h.now += 200 * MS;
    h.hear_final("Hello there", true, Some(spoke));
    h.reply_done(1, "Hi.", 2);
    // The recogniser's UtteranceEnd for the same utterance arrives after the turn ended.
    h.now += 800 * MS;
    h.feed(Input::Heard(Heard::UtteranceEnd {
        end_of_speech: Some(spoke),
    }));
    h.now += 10 * S;
    let out = h.feed(Input::Text("And what time is it?"));
    // A typed turn reports its own figures: no end of speech of an earlier turn.
    assert_eq!(started(&out), vec![(2, None)]);
}

#[test]
fn a_turn_finalised_in_pieces_keeps_the_end_of_its_last_words() {
    let mut h = Harness::new(config());
    let t0 = h.now;
    h.hear_final("What is the weather", false, Some(t0 + 1200 * MS));
    h.hear_final("like in Paris today?", false, Some(t0 + 2300 * MS));
    h.now = t0 + 2900 * MS;
    // The endpoint arrives as an empty speech_final covering the silence.
    let out = h.hear_final("", true, Some(t0 + 2800 * MS));
    assert_eq!(started(&out), vec![(1, Some(t0 + 2300 * MS))]);
}

#[test]
fn a_piece_without_timing_does_not_keep_an_earlier_pieces_end() {
    let mut h = Harness::new(config());
    let t0 = h.now;
    h.hear_final("What is the weather", false, Some(t0 + 300 * MS));
    h.now = t0 + 2900 * MS;
    let out = h.hear_final("like in Paris today?", true, None);
    // Unknown rather than 2.6 s too early.
    assert_eq!(started(&out), vec![(1, None)]);
}

#[test]
fn token_refreshes_go_through_the_frame_rate_limit_one_verification_at_a_time() {
    let mut h = Harness::new(config());
    let mut verify = 0;
    let mut rejected = 0;
    for _ in 0..1000 {
        let out = h.feed(Input::Refresh("a.b.c".into()));
        verify += out
            .iter()
            .filter(|o| matches!(o, Output::VerifyToken(_)))
            .count();
        rejected += out
            .iter()
            .filter(|o| matches!(o, Output::Rejected("rate")))
            .count();
    }
    // One verification runs at a time; the rest of the first 100 wait as one (the latest).
    assert_eq!(verify, 1);
    assert_eq!(rejected, 900);
    let out = h.feed(Input::TokenRefreshed(Ok(VerifiedToken {
        user_id: "user".into(),
        expiry: h.start + 7200 * S,
    })));
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::VerifyToken(_)))
            .count(),
        1,
        "the latest waiting token is verified next"
    );
    let out = h.feed(Input::TokenRefreshed(Ok(VerifiedToken {
        user_id: "user".into(),
        expiry: h.start + 7200 * S,
    })));
    assert!(!has(&out, |o| matches!(o, Output::VerifyToken(_))));
}
