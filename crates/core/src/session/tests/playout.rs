//! The reply's playout in the machine: pacing, what was heard, barge-in.

use super::*;

/// `n` milliseconds of audio at the reference output rate (24 kHz).
fn audio(n: usize) -> Vec<u8> {
    vec![1; n * 48]
}

fn audio_out(out: &[Output]) -> Vec<usize> {
    every!(out, Output::Audio { pcm, .. } => pcm.len() / 48)
}

fn done(out: &[Output]) -> Option<Latency> {
    first!(events(out), Event::ReplyDone { latency, .. } => *latency)
}

/// The reply to turn 1 hands the machine `ms` of audio.
fn play(h: &mut Harness, ms: usize) -> Vec<Output> {
    h.feed(Input::ReplyAudio {
        turn_id: 1,
        pcm: &audio(ms),
    })
}

/// Pushes `ms` of audio in 100 ms chunks while the machine wants it, then ends a sentence.
fn push_sentence(h: &mut Harness, text: &str, ms: usize) -> Vec<Output> {
    let mut out = Vec::new();
    for _ in 0..ms / 100 {
        assert!(
            h.s.wants_reply_audio(),
            "the playout refused audio it should take"
        );
        out.extend(play(h, 100));
    }
    out.extend(h.feed(Input::ReplySentence {
        turn_id: 1,
        round: Some(0),
        text: text.into(),
    }));
    out
}

#[test]
fn reply_audio_goes_out_paced_and_the_reply_is_done_once_all_of_it_has() {
    let mut h = Harness::new(config());
    h.say("Tell me something");
    // The lead (400 ms) goes out at once: chunks as they come until 100 ms are buffered,
    // then joined.
    let out = push_sentence(&mut h, "One.", 400);
    assert_eq!(audio_out(&out), [100, 100, 200]);
    // The listener's buffer is full; another piece (200 ms) waits in the playout, and then
    // synthesis is held back.
    let out = push_sentence(&mut h, "Two.", 200);
    assert!(audio_out(&out).is_empty());
    assert!(!h.s.wants_reply_audio());
    let out = h.feed(Input::ReplyEnded(outcome(1, "One. Two.", 5)));
    // The task is done, its audio is not: no reply.done yet.
    assert_eq!(done(&out), None);
    // Down to the low mark (200 ms) after 200 ms: the last piece, and the reply is done.
    let out = h.advance(199 * MS);
    assert!(audio_out(&out).is_empty());
    let out = h.advance(MS);
    assert_eq!(audio_out(&out), [200]);
    assert!(done(&out).is_some(), "{out:?}");
    assert_eq!(h.s.history().last().unwrap().text, "One. Two.");
    // Nothing more goes out.
    assert!(audio_out(&h.advance(5 * S)).is_empty());
}

#[test]
fn a_cut_reply_keeps_only_the_sentences_played_and_sends_nothing_after_the_cut() {
    let mut h = Harness::new(config());
    h.say("Tell me a story");
    push_sentence(&mut h, "Once upon a time.", 200);
    push_sentence(&mut h, "There was a princess.", 200);
    h.advance(250 * MS);
    play(&mut h, 100);
    // Barge-in 250 ms in: the first sentence has played, the second has not.
    let out = h.feed(Input::Heard(Heard::Partial("wait")));
    assert!(aborted(&out, 1));
    assert!(!h.s.wants_reply_audio());
    // Audio still arriving from the aborted task is dropped.
    let out = play(&mut h, 100);
    assert!(audio_out(&out).is_empty());
    let out = h.feed(Input::ReplyEnded(outcome(1, "", 9)));
    assert!(events(&out).contains(&&Event::Interrupted { turn_id: 1 }));
    assert_eq!(h.s.history().last().unwrap().text, "Once upon a time.");
    assert!(audio_out(&h.advance(2 * S)).is_empty());
}

#[test]
fn a_reply_cut_after_its_task_ended_is_billed_from_its_report() {
    let mut h = Harness::new(config());
    h.say("Tell me a story");
    push_sentence(&mut h, "A long sentence.", 400);
    play(&mut h, 300);
    // The task ended with 40 output tokens, billed at once; its audio plays on.
    h.feed(Input::ReplyEnded(outcome(1, "A long sentence.", 40)));
    assert_eq!(h.s.ledger().usage().llm_output_tokens, 40);
    h.advance(100 * MS);
    let out = h.feed(Input::Cancel);
    assert!(aborted(&out, 1));
    // The driver has no task left: its answer carries nothing; the held report counts.
    let out = h.feed(Input::ReplyEnded(ReplyOutcome {
        turn_id: 1,
        llm: LlmBill::default(),
        tts_chars: 0,
        latency: Latency::default(),
        failure: None,
    }));
    assert!(events(&out).contains(&&Event::Interrupted { turn_id: 1 }));
    assert_eq!(h.s.ledger().usage().llm_output_tokens, 40);
    // 100 ms of a 400 ms sentence played: none of its words are in the history.
    assert_eq!(h.s.history().last().unwrap().role, Role::User);
}

#[test]
fn the_time_to_first_audio_is_measured_when_the_first_piece_goes_out() {
    let mut h = Harness::new(config());
    let spoke_until = h.now;
    h.advance(300 * MS);
    h.hear_final("Hi", true, Some(spoke_until));
    h.advance(450 * MS);
    play(&mut h, 100);
    let out = h.feed(Input::ReplyEnded(outcome(1, "Hello.", 2)));
    let latency = done(&out).unwrap();
    assert_eq!(latency.to_first_audio, Some(750 * MS));
}

/// The reply to `turn_id` hands the machine `text`.
fn reply_text(h: &mut Harness, turn_id: u64, text: &str) -> Vec<Output> {
    h.feed(Input::ReplyText {
        turn_id,
        text: text.into(),
    })
}

#[test]
fn reply_text_reaches_the_client_until_the_reply_is_cut() {
    let mut h = Harness::new(config());
    h.say("Hi");
    let out = reply_text(&mut h, 1, "Hel");
    assert_eq!(
        events(&out),
        [&Event::ReplyText {
            turn_id: 1,
            text: "Hel".into()
        }]
    );
    h.feed(Input::Cancel);
    let out = reply_text(&mut h, 1, "lo");
    assert!(events(&out).is_empty());
    // A stale turn's text is ignored too.
    let out = reply_text(&mut h, 7, "x");
    assert!(events(&out).is_empty());
}
