//! Draft replies (preemptive replies): answering words before the turn ends, keeping the
//! work only if the turn ends with them.

use super::*;
use crate::tools::{CheckedCall, ToolCall, ToolKind};

/// The reference configuration offering `drafts` drafts per turn.
fn drafting(drafts: u32) -> Config {
    let mut c = config();
    c.turns.drafts = drafts;
    c
}

/// A stable transcript that does not end the turn (Deepgram's `is_final` before its
/// `speech_final`).
fn stable(h: &mut Harness, text: &str) -> Vec<Output> {
    let eos = h.now;
    h.hear_final(text, false, Some(eos))
}

/// The endpoint that follows it with no more words.
fn endpoint(h: &mut Harness) -> Vec<Output> {
    h.hear_final("", true, None)
}

fn settled(out: &[Output]) -> Vec<bool> {
    every!(out, Output::DraftSettled { kept } => *kept)
}

/// Anything of the reply that reached the client: its start, its words, its audio.
fn heard_of_reply(out: &[Output]) -> bool {
    has(out, |o| {
        matches!(
            o,
            Output::Audio { .. }
                | Output::Event(
                    Event::ReplyStarted { .. }
                        | Event::ReplyText { .. }
                        | Event::ReplyDone { .. }
                        | Event::Interrupted { .. }
                )
        )
    })
}

#[test]
fn a_draft_whose_words_end_the_turn_is_kept_and_what_it_held_goes_out_at_once() {
    let mut h = Harness::new(drafting(2));
    let out = stable(&mut h, "What is the weather?");
    assert!(
        started_reply(&out, 1),
        "the draft starts on the stable words"
    );
    assert!(!heard_of_reply(&out));
    assert_eq!(
        h.s.history().count(),
        0,
        "the history holds only turns that ended"
    );
    let prompt = h.s.prompt();
    assert_eq!(
        prompt.last().map(|m| m.text.as_str()),
        Some("What is the weather?")
    );

    // The draft writes and speaks; the client gets none of it yet.
    let mut out = h.feed(Input::ReplyText {
        turn_id: 1,
        text: "Sunny".into(),
    });
    out.extend(h.speak(1, "Sunny."));
    out.extend(h.advance(500 * MS));
    assert!(!heard_of_reply(&out), "{out:?}");

    let out = endpoint(&mut h);
    assert_eq!(settled(&out), [true]);
    assert!(!started_reply(&out, 1), "no second request");
    let shown: Vec<_> = events(&out)
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Heard { .. } | Event::ReplyStarted { .. } | Event::ReplyText { .. }
            )
        })
        .collect();
    assert!(matches!(
        shown[..],
        [
            Event::Heard { turn_id: 1, text },
            Event::ReplyStarted { turn_id: 1 },
            Event::ReplyText { turn_id: 1, text: words },
        ] if text == "What is the weather?" && words == "Sunny"
    ));
    assert!(
        has(&out, |o| matches!(o, Output::Audio { turn_id: 1, .. })),
        "the audio it held goes out with the turn's end"
    );
    assert_eq!(h.s.history().count(), 1);

    let mut out = h.feed(Input::ReplyEnded(outcome(1, "Sunny.", 10)));
    out.extend(h.advance(S));
    assert_eq!(
        logged(&out),
        ("What is the weather?", "Sunny.", "completed")
    );
    let usage = h.s.ledger().usage();
    assert_eq!((usage.llm_input_tokens, usage.llm_output_tokens), (100, 10));
}

#[test]
fn a_draft_of_other_words_is_discarded_billed_and_never_heard() {
    let mut h = Harness::new(drafting(2));
    assert!(started_reply(&stable(&mut h, "What is"), 1));
    let mut out = h.feed(Input::ReplyText {
        turn_id: 1,
        text: "It is".into(),
    });
    out.extend(h.speak(1, "It is."));

    // The endpoint brings more words: the draft is cut and the turn waits for its bill.
    out.extend(h.hear_final("the weather?", true, Some(h.now)));
    assert!(aborted(&out, 1));
    assert_eq!(settled(&out), [false]);
    assert!(!heard_of_reply(&out), "{out:?}");
    assert!(matches!(
        events(&out)[..],
        [Event::Heard { turn_id: 1, text }] if text == "What is the weather?"
    ));

    let out = h.feed(Input::ReplyEnded(outcome(1, "It is.", 30)));
    assert!(
        started_reply(&out, 1),
        "the turn's own reply starts once the draft is paid"
    );
    assert!(
        !has(&out, |o| matches!(o, Output::Turn(_))),
        "a draft is no turn"
    );
    assert!(
        !events(&out)
            .iter()
            .any(|e| matches!(e, Event::Interrupted { .. } | Event::ReplyDone { .. }))
    );
    let texts: Vec<_> = h.s.history().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["What is the weather?"]);
    assert_eq!(
        h.s.ledger().usage().llm_output_tokens,
        30,
        "the draft is billed"
    );

    let out = h.reply_done(1, "Sunny.", 10);
    assert_eq!(turn_log(&out).user_text, "What is the weather?");
    let usage = h.s.ledger().usage();
    assert_eq!((usage.llm_input_tokens, usage.llm_output_tokens), (200, 40));
}

#[test]
fn words_after_a_draft_discard_it_at_once() {
    let mut h = Harness::new(drafting(2));
    stable(&mut h, "Book a table");
    let out = h.feed(Input::Heard(Heard::Partial("for")));
    assert!(aborted(&out, 1));
    assert_eq!(settled(&out), [false]);
    let out = h.feed(Input::ReplyEnded(outcome(1, "", 0)));
    assert!(!started_reply(&out, 1), "nothing to answer yet");

    // The next stable words are drafted again (the second of two).
    assert!(started_reply(&stable(&mut h, "for two"), 1));
    let prompt = h.s.prompt();
    assert_eq!(
        prompt.last().map(|m| m.text.as_str()),
        Some("Book a table for two")
    );
}

#[test]
fn drafts_are_capped_per_turn() {
    let mut h = Harness::new(drafting(1));
    assert!(started_reply(&stable(&mut h, "Book"), 1));
    h.feed(Input::Heard(Heard::Partial("a")));
    h.feed(Input::ReplyEnded(outcome(1, "", 0)));
    let out = stable(&mut h, "a table");
    assert!(!started_reply(&out, 1), "one draft a turn: {out:?}");
    let out = endpoint(&mut h);
    assert!(started_reply(&out, 1), "the turn is answered when it ends");
    // A new turn has its own allowance.
    h.reply_done(1, "Done.", 5);
    h.advance(S);
    assert!(started_reply(&stable(&mut h, "Thanks"), 2));
}

#[test]
fn without_drafts_a_stable_transcript_waits_for_the_end_of_the_turn() {
    let mut h = Harness::new(drafting(0));
    let out = stable(&mut h, "What is the weather?");
    assert!(!has(&out, |o| matches!(o, Output::StartReply { .. })));
    assert!(started_reply(&endpoint(&mut h), 1));
}

#[test]
fn a_draft_finished_before_its_turn_ended_plays_whole_once_kept() {
    let mut h = Harness::new(drafting(2));
    stable(&mut h, "Hi");
    let mut out = h.reply_done(1, "Hello there.", 8);
    out.extend(h.advance(S));
    assert!(!heard_of_reply(&out));
    assert!(!has(&out, |o| matches!(o, Output::Turn(_))));

    let mut out = endpoint(&mut h);
    out.extend(h.advance(S));
    assert!(has(&out, |o| matches!(o, Output::Audio { turn_id: 1, .. })));
    let turn = turn_log(&out);
    assert_eq!(
        (turn.outcome, turn.assistant_text.as_str()),
        ("completed", "Hello there.")
    );
    let usage = h.s.ledger().usage();
    assert_eq!(usage.llm_output_tokens, 8, "billed once");
}

#[test]
fn a_draft_runs_no_tools_until_it_is_kept() {
    let mut c = drafting(2);
    c.tools = Some(ToolPolicy {
        max_calls_per_turn: 4,
        acknowledgement: None,
        record_content: false,
        max_result_bytes: 1000,
    });
    let call = || CheckedCall {
        call: ToolCall {
            id: "c1".into(),
            name: "lookup_order".into(),
            arguments: r#"{"order":"A1"}"#.into(),
        },
        verdict: Ok((ToolKind::Server, 5 * S)),
    };
    let tool_calls = |h: &mut Harness| {
        h.feed(Input::ToolCalls {
            turn_id: 1,
            text: String::new(),
            calls: vec![call()],
            llm: outcome(1, "", 20).llm,
        })
    };
    let calls = |out: &[Output]| has(out, |o| matches!(o, Output::CallTool { .. }));

    // Kept: the call runs when the turn ends.
    let mut h = Harness::new(c.clone());
    stable(&mut h, "Where is order A1?");
    assert!(
        !calls(&tool_calls(&mut h)),
        "not for words that may not be the turn"
    );
    assert_eq!(
        h.s.ledger().usage().llm_output_tokens,
        20,
        "its request is paid"
    );
    assert!(calls(&endpoint(&mut h)));

    // Discarded: it never runs.
    let mut h = Harness::new(c);
    stable(&mut h, "Where is order");
    tool_calls(&mut h);
    let mut out = h.hear_final("A1?", true, Some(h.now));
    out.extend(h.feed(Input::ReplyEnded(outcome(1, "", 0))));
    assert!(!calls(&out));
    assert!(started_reply(&out, 1));
}

#[test]
fn a_draft_is_budgeted_like_any_reply() {
    let mut c = drafting(2);
    // Less than one reply's estimate: no draft starts, and the turn is refused as before.
    c.session_budget = Some(5_000);
    let mut h = Harness::new(c);
    let out = stable(&mut h, "one");
    assert!(!has(&out, |o| matches!(o, Output::StartReply { .. })));
    let out = endpoint(&mut h);
    assert_eq!(end_reason(&out), Some(EndReason::BudgetExhausted));
}

#[test]
fn a_draft_cut_by_a_detach_or_the_end_is_billed_and_unheard() {
    let mut h = Harness::new(drafting(2));
    stable(&mut h, "Hello");
    let mut out = h.feed(Input::Detach);
    assert!(aborted(&out, 1));
    out.extend(h.feed(Input::ReplyEnded(outcome(1, "Hi", 3))));
    assert!(!heard_of_reply(&out));
    assert!(!has(&out, |o| matches!(o, Output::Turn(_))));
    assert_eq!(h.s.ledger().usage().llm_output_tokens, 3);

    let mut h = Harness::new(drafting(2));
    stable(&mut h, "Hello");
    let mut out = h.feed(Input::End);
    assert!(aborted(&out, 1));
    assert!(finish(&out).is_none(), "the end waits for the draft's bill");
    out.extend(h.feed(Input::ReplyEnded(outcome(1, "Hi", 3))));
    assert_eq!(end_reason(&out), Some(EndReason::ClientEnded));
    assert_eq!(h.s.ledger().usage().llm_output_tokens, 3);
}

#[test]
fn a_barge_in_is_drafted_once_the_reply_it_cut_has_reported() {
    let mut h = Harness::new(drafting(2));
    h.say("Tell me a story");
    h.speak(1, "Once upon a time.");
    let out = h.feed(Input::Heard(Heard::Partial("wait")));
    assert!(aborted(&out, 1));
    let out = stable(&mut h, "wait what about dragons");
    assert!(
        !has(&out, |o| matches!(o, Output::StartReply { .. })),
        "one reply at a time"
    );
    let out = h.feed(Input::ReplyEnded(outcome(1, "Once upon a time.", 5)));
    assert!(
        started_reply(&out, 2),
        "the draft starts once the cut reply is paid"
    );
    let out = endpoint(&mut h);
    assert_eq!(settled(&out), [true]);
}
