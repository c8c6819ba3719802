//! Tool rounds under simulated time.

use super::*;
use crate::tools::{CheckedCall, ToolCall, ToolKind, ToolOutcome};

fn tool_config(max_calls: u32) -> Config {
    Config {
        tools: Some(ToolPolicy {
            max_calls_per_turn: max_calls,
            acknowledgement: Some("One moment.".into()),
            record_content: false,
            max_result_bytes: 1000,
        }),
        ..config()
    }
}

fn call(id: &str, kind: ToolKind) -> CheckedCall {
    CheckedCall {
        call: ToolCall {
            id: id.into(),
            name: "lookup_order".into(),
            arguments: r#"{"order":"A1"}"#.into(),
        },
        verdict: Ok((kind, 5 * S)),
    }
}

fn invalid(id: &str) -> CheckedCall {
    CheckedCall {
        verdict: Err("arguments do not match the schema: \"order\" is required".into()),
        ..call(id, ToolKind::Server)
    }
}

fn bill(output_tokens: u64) -> LlmBill {
    outcome(1, "", output_tokens).llm
}

/// A session with tools (`max_calls` a turn) whose user said `text`: the reply to turn 1
/// is under way.
fn asked(max_calls: u32, text: &str) -> Harness {
    let mut h = Harness::new(tool_config(max_calls));
    h.say(text);
    h
}

/// The reply's model asks for the server tools `ids`, with nothing said first.
fn server_round(h: &mut Harness, ids: &[&str]) -> Vec<Output> {
    let calls = ids.iter().map(|id| call(id, ToolKind::Server)).collect();
    calls_round(h, "", calls)
}

fn calls_round(h: &mut Harness, text: &str, calls: Vec<CheckedCall>) -> Vec<Output> {
    h.feed(Input::ToolCalls {
        turn_id: 1,
        text: text.into(),
        calls,
        llm: bill(20),
    })
}

fn started_tools(out: &[Output]) -> Vec<(String, ToolKind)> {
    every!(out, Output::CallTool { call, kind, .. } => (call.id.clone(), *kind))
}

fn continued(out: &[Output]) -> Option<bool> {
    first!(out, Output::ContinueReply { tools_allowed, .. } => *tools_allowed)
}

fn logs(out: &[Output]) -> Vec<(String, ToolOutcome)> {
    every!(out, Output::ToolLog(l) => (l.call_id.clone(), l.outcome))
}

fn cancelled(out: &[Output]) -> Vec<(String, &'static str)> {
    every!(out, Output::CancelTool { call_id, reason, .. } => (call_id.clone(), *reason))
}

fn finished(h: &mut Harness, id: &str, result: Result<&str, &str>) -> Vec<Output> {
    h.feed(Input::ToolFinished {
        call_id: id.into(),
        result: result.map(str::to_owned).map_err(str::to_owned),
    })
}

fn last_round(h: &Harness) -> (Vec<ToolCall>, Vec<ToolResult>) {
    let messages: Vec<_> = h.s.history().collect();
    let i = messages
        .iter()
        .rposition(|m| !m.tool_calls.is_empty())
        .expect("a tool round in the history");
    (
        messages[i].tool_calls.clone(),
        messages[i + 1].tool_results.clone(),
    )
}

#[test]
fn a_server_tool_runs_and_its_result_goes_back_to_the_model() {
    let mut h = Harness::new(tool_config(4));
    let out = h.say("Where is my order A1?");
    assert!(started_reply(&out, 1));
    let out = server_round(&mut h, &["c1"]);
    assert_eq!(started_tools(&out), [("c1".to_owned(), ToolKind::Server)]);
    // Nothing said before the call: the configured acknowledgement fills the wait.
    assert!(has(
        &out,
        |o| matches!(o, Output::Acknowledge { turn_id: 1, text } if text == "One moment.")
    ));
    assert_eq!(continued(&out), None, "waits for the tool");

    h.advance(S);
    let out = finished(&mut h, "c1", Ok(r#"{"status":"shipped"}"#));
    assert_eq!(logs(&out), [("c1".to_owned(), ToolOutcome::Ok)]);
    assert_eq!(continued(&out), Some(true));
    let (calls, results) = last_round(&h);
    assert_eq!(calls[0].id, "c1");
    assert_eq!(results[0].content, r#"{"status":"shipped"}"#);
    assert!(!results[0].is_error);

    let out = h.reply_done(1, "It shipped yesterday.", 10);
    let turn = turn_log(&out);
    assert_eq!(turn.outcome, "completed");
    assert_eq!(turn.assistant_text, "It shipped yesterday.");
    assert_eq!(turn.latency.tools, Some(Duration::from_secs(1)));
    let done = events(&out)
        .into_iter()
        .find_map(|e| match e {
            Event::ReplyDone { latency, .. } => Some(*latency),
            _ => None,
        })
        .expect("response.done");
    assert_eq!(done.tools, Some(Duration::from_secs(1)));
    // The model's answer after the round is the turn's last assistant message.
    assert_eq!(h.s.history().last().unwrap().text, "It shipped yesterday.");
}

#[test]
fn every_round_trip_of_a_tool_turn_is_billed() {
    let mut h = asked(4, "Where is my order?");
    let before = h.s.ledger().consumption().llm_output_tokens;
    calls_round(&mut h, "Let me look.", vec![call("c1", ToolKind::Server)]);
    assert_eq!(h.s.ledger().consumption().llm_output_tokens, before + 20);
    finished(&mut h, "c1", Ok("{}"));
    let out = h.reply_done(1, "Done.", 7);
    assert_eq!(h.s.ledger().consumption().llm_output_tokens, before + 27);
    // The turn's record counts both requests, as billed.
    let log = turn_log(&out);
    assert_eq!((log.tokens.input, log.tokens.output), (Some(200), Some(27)));
    assert_eq!(log.tts_chars, "Done.".len() as u64);
}

#[test]
fn words_before_a_call_are_kept_and_need_no_acknowledgement() {
    let mut h = asked(4, "Book a table");
    let out = calls_round(&mut h, "Let me check.", vec![call("c1", ToolKind::Server)]);
    assert!(!has(&out, |o| matches!(o, Output::Acknowledge { .. })));
    finished(&mut h, "c1", Ok("{}"));
    let out = h.reply_done(1, "Booked.", 5);
    assert_eq!(turn_log(&out).assistant_text, "Let me check. Booked.");
}

#[test]
fn a_client_tool_is_answered_by_the_client_and_unknown_ids_are_refused() {
    let mut h = asked(4, "Open the settings");
    let out = calls_round(&mut h, "", vec![call("c1", ToolKind::Client)]);
    assert_eq!(started_tools(&out), [("c1".to_owned(), ToolKind::Client)]);

    let out = h.feed(Input::ToolResult {
        call_id: "nope",
        result: Ok("{}".into()),
    });
    assert_eq!(error_code(&out), Some(ErrorCode::InvalidMessage));
    assert_eq!(continued(&out), None);
    // A server tool's answer cannot stand in for the client's.
    let out = finished(&mut h, "c1", Ok("{}"));
    assert_eq!(continued(&out), None);

    let out = h.feed(Input::ToolResult {
        call_id: "c1",
        result: Err("the settings page is not available".into()),
    });
    assert_eq!(logs(&out), [("c1".to_owned(), ToolOutcome::Failed)]);
    assert_eq!(continued(&out), Some(true));
    let (_, results) = last_round(&h);
    assert!(results[0].is_error);
    assert_eq!(results[0].content, "the settings page is not available");
}

#[test]
fn parallel_calls_continue_once_all_are_answered_in_the_models_order() {
    let mut h = asked(4, "Weather in Paris and Rome?");
    let out = server_round(&mut h, &["a", "b"]);
    assert_eq!(started_tools(&out).len(), 2);
    let out = finished(&mut h, "b", Ok(r#""rain""#));
    assert_eq!(continued(&out), None);
    let out = finished(&mut h, "a", Ok(r#""sun""#));
    assert_eq!(continued(&out), Some(true));
    let (calls, results) = last_round(&h);
    assert_eq!(
        calls.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!(
        results
            .iter()
            .map(|r| r.content.as_str())
            .collect::<Vec<_>>(),
        [r#""sun""#, r#""rain""#]
    );
}

#[test]
fn a_tool_that_does_not_answer_in_time_is_cancelled_and_reported_to_the_model() {
    let mut h = asked(4, "Where is my order?");
    calls_round(&mut h, "", vec![call("c1", ToolKind::Client)]);
    let out = h.advance(4 * S);
    assert_eq!(continued(&out), None);
    let out = h.advance(2 * S);
    assert_eq!(cancelled(&out), [("c1".to_owned(), "timeout")]);
    assert_eq!(logs(&out), [("c1".to_owned(), ToolOutcome::TimedOut)]);
    assert_eq!(continued(&out), Some(true));
    let (_, results) = last_round(&h);
    assert!(results[0].is_error);
    assert!(
        results[0].content.contains("5000 ms"),
        "{}",
        results[0].content
    );
    // The late answer is refused.
    let out = h.feed(Input::ToolResult {
        call_id: "c1",
        result: Ok("{}".into()),
    });
    assert_eq!(error_code(&out), Some(ErrorCode::InvalidMessage));
}

#[test]
fn an_invalid_or_unknown_call_is_answered_as_an_error_and_never_run() {
    let mut h = asked(4, "Where is my order?");
    let out = calls_round(&mut h, "", vec![invalid("bad")]);
    assert!(started_tools(&out).is_empty());
    assert!(!has(&out, |o| matches!(o, Output::Acknowledge { .. })));
    assert_eq!(logs(&out), [("bad".to_owned(), ToolOutcome::Invalid)]);
    assert_eq!(continued(&out), Some(true));
    let (_, results) = last_round(&h);
    assert!(results[0].is_error);
    assert!(results[0].content.contains("\"order\" is required"));
}

#[test]
fn the_per_turn_limit_refuses_further_calls_and_then_allows_only_words() {
    let mut h = asked(2, "Check everything");
    let out = server_round(&mut h, &["a", "b"]);
    assert_eq!(started_tools(&out).len(), 2);
    finished(&mut h, "a", Ok("1"));
    let out = finished(&mut h, "b", Ok("2"));
    assert_eq!(continued(&out), Some(false), "limit reached: words only");
    // A model that calls anyway is refused without running anything.
    let out = h.feed(Input::ToolCalls {
        turn_id: 1,
        text: String::new(),
        calls: vec![call("c", ToolKind::Server)],
        llm: bill(5),
    });
    assert!(started_tools(&out).is_empty());
    assert_eq!(logs(&out), [("c".to_owned(), ToolOutcome::OverLimit)]);
    assert_eq!(continued(&out), Some(false));
    // The next turn starts afresh.
    h.reply_done(1, "Done.", 3);
    h.say("And again");
    let out = h.feed(Input::ToolCalls {
        turn_id: 2,
        text: String::new(),
        calls: vec![call("d", ToolKind::Server)],
        llm: bill(5),
    });
    assert_eq!(started_tools(&out).len(), 1);
}

#[test]
fn barge_in_during_a_tool_wait_cancels_the_tools_and_the_turn() {
    let mut h = asked(4, "Where is my order?");
    calls_round(
        &mut h,
        "",
        vec![call("a", ToolKind::Server), call("b", ToolKind::Client)],
    );
    finished(&mut h, "a", Ok("{}"));
    let out = h.feed(Input::Cancel);
    assert_eq!(cancelled(&out), [("b".to_owned(), "interrupted")]);
    assert_eq!(logs(&out), [("b".to_owned(), ToolOutcome::Cancelled)]);
    assert!(aborted(&out, 1));
    assert_eq!(continued(&out), None);
    // The history stays valid for the provider: each call next to its result.
    let (calls, results) = last_round(&h);
    assert_eq!(calls.len(), results.len());
    assert!(results[1].is_error);
    let out = h.feed(Input::ReplyEnded(outcome(1, "", 0)));
    let turn = turn_log(&out);
    assert_eq!(turn.outcome, "interrupted");
    assert!(turn.latency.tools.is_some());
    // The late answer of the cancelled server call is dropped without a word.
    let out = finished(&mut h, "b", Ok("{}"));
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn ending_the_session_during_a_tool_wait_cancels_the_tools() {
    let mut h = asked(4, "Where is my order?");
    server_round(&mut h, &["a"]);
    let out = h.feed(Input::End);
    assert_eq!(cancelled(&out), [("a".to_owned(), "ended")]);
    assert!(aborted(&out, 1));
    let out = h.feed(Input::ReplyEnded(outcome(1, "", 0)));
    assert_eq!(end_reason(&out), Some(EndReason::ClientEnded));
}

#[test]
fn a_tool_loop_stops_when_the_budget_is_spent() {
    let mut c = tool_config(50);
    c.session_budget = Some(from_usd(0.05));
    let mut h = Harness::new(c);
    h.say("Keep checking");
    let mut ended = None;
    for round in 0..20 {
        let id = format!("c{round}");
        // Each round trip costs $0.01 of output.
        let first = h.feed(Input::ToolCalls {
            turn_id: 1,
            text: String::new(),
            calls: vec![call(&id, ToolKind::Server)],
            llm: bill(2000),
        });
        assert!(!first.is_empty(), "round {round}");
        let out = finished(&mut h, &id, Ok("{}"));
        if aborted(&out, 1) {
            ended = Some(round);
            assert_eq!(continued(&out), None);
            let out = h.feed(Input::ReplyEnded(outcome(1, "", 0)));
            assert_eq!(end_reason(&out), Some(EndReason::BudgetExhausted));
            break;
        }
        assert_eq!(continued(&out), Some(true), "round {round}: {out:?}");
    }
    let ended = ended.expect("the budget stops the loop");
    assert!((2..6).contains(&ended), "stopped after round {ended}");
    assert!(h.s.ledger().cost().total.unwrap() <= from_usd(0.05));
}

#[test]
fn an_oversized_result_fails_the_call() {
    let mut h = asked(4, "Where is my order?");
    calls_round(&mut h, "", vec![call("c1", ToolKind::Client)]);
    let big = format!("\"{}\"", "x".repeat(2000));
    let out = h.feed(Input::ToolResult {
        call_id: "c1",
        result: Ok(big),
    });
    assert_eq!(logs(&out), [("c1".to_owned(), ToolOutcome::Failed)]);
    let (_, results) = last_round(&h);
    assert!(results[0].is_error);
    assert!(results[0].content.contains("1000 bytes"));
}

#[test]
fn content_is_recorded_only_when_the_operator_keeps_it() {
    for keep in [false, true] {
        let mut c = tool_config(4);
        c.tools.as_mut().unwrap().record_content = keep;
        let mut h = Harness::new(c);
        h.say("Where is my order?");
        server_round(&mut h, &["c1"]);
        let out = finished(&mut h, "c1", Ok("{\"ok\":1}"));
        let log = first!(&out, Output::ToolLog(l) => l).unwrap();
        assert_eq!(log.arguments_bytes, r#"{"order":"A1"}"#.len());
        assert_eq!(log.name, "lookup_order");
        assert_eq!(log.kind, Some(ToolKind::Server));
        assert_eq!(log.arguments.is_some(), keep);
        assert_eq!(log.result.as_deref(), keep.then_some("{\"ok\":1}"));
    }
}

#[test]
fn a_resumed_session_keeps_its_tool_rounds() {
    let mut h = asked(4, "Where is my order?");
    server_round(&mut h, &["c1"]);
    finished(&mut h, "c1", Ok("{}"));
    h.reply_done(1, "Shipped.", 3);
    let carried = h.s.carried();
    let json = serde_json::to_string(&carried).unwrap();
    let back: Carried = serde_json::from_str(&json).unwrap();
    let s = Session::new("s1".into(), tool_config(4), h.now, Some((back, S)));
    let a: Vec<_> = h.s.history().cloned().collect();
    let b: Vec<_> = s.history().cloned().collect();
    assert_eq!(a, b);
    assert_eq!(b[1].tool_calls.len(), 1);
}

#[test]
fn calls_without_a_usable_id_get_ids_of_their_own() {
    let mut h = asked(4, "Where are my orders?");
    let long = "x".repeat(MAX_CALL_ID + 1);
    let out = calls_round(
        &mut h,
        "",
        vec![
            call("a", ToolKind::Server),
            call("a", ToolKind::Server),
            call("", ToolKind::Server),
            call(&long, ToolKind::Server),
        ],
    );
    let ids: Vec<String> = started_tools(&out).into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids[0], "a");
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 4, "{ids:?}");
    assert!(
        ids[1..].iter().all(|id| id.starts_with("call_1_")),
        "{ids:?}"
    );
    // Each result reaches its own call.
    for id in &ids {
        finished(&mut h, id, Ok("{}"));
    }
    let (calls, results) = last_round(&h);
    let call_ids: Vec<&str> = calls.iter().map(|c| c.id.as_str()).collect();
    let result_ids: Vec<&str> = results.iter().map(|r| r.call_id.as_str()).collect();
    assert_eq!(call_ids, result_ids);
}
