//! Admission, per-address limits, capacity, resume.

use std::time::Duration;

use atlas_client::{ClientError, ConnectOptions, Connection, Incoming, connect};
use atlas_protocol::{ClientMessage, ServerEvent};

use crate::helpers::*;

async fn attempt(app: &TestApp, user: &str) -> Result<Connection, (u16, String)> {
    match connect(&ConnectOptions::new(app.url(), app.token(user))).await {
        Ok(c) => Ok(c),
        Err(ClientError::Refused { status, code, .. }) => Err((status, code)),
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

#[tokio::test]
async fn fifty_simultaneous_attempts_admit_exactly_three() {
    let app = spawn_app_with(fast_fakes(), |c| c.connect_burst = 1000).await;
    let attempts = (0..50).map(|_| attempt(&app, "greedy"));
    let results = futures::future::join_all(attempts).await;
    let admitted: Vec<&Connection> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(admitted.len(), 3);
    for r in &results {
        if let Err(refusal) = r {
            assert_eq!(refusal, &(429, "too_many_sessions".to_string()));
        }
    }
    // Another user is not affected.
    assert!(attempt(&app, "other").await.is_ok());
    // Ending one session frees its place.
    let mut conns: Vec<Connection> = results.into_iter().filter_map(Result::ok).collect();
    let mut first = conns.remove(0);
    first
        .sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    end_session(&mut first).await;
    let mut admitted_again = false;
    for _ in 0..50 {
        if attempt(&app, "greedy").await.is_ok() {
            admitted_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted_again);
}

#[tokio::test]
async fn connection_attempts_are_rate_limited_per_address() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.connect_burst = 5;
        c.connect_rate_per_s = 1;
        c.max_sessions_per_user = 100;
    })
    .await;
    let mut ok = 0;
    let mut limited = 0;
    for i in 0..8 {
        match attempt(&app, &format!("u{i}")).await {
            Ok(_) => ok += 1,
            Err((429, code)) if code == "too_many_attempts" => limited += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((ok, limited), (5, 3));
}

#[tokio::test]
async fn a_full_instance_answers_503() {
    let app = spawn_app_with(fast_fakes(), |c| c.max_sessions = 2).await;
    let _a = attempt(&app, "a").await.unwrap();
    let _b = attempt(&app, "b").await.unwrap();
    assert_eq!(
        attempt(&app, "c").await.unwrap_err(),
        (503, "at_capacity".into())
    );
}

async fn resume(app: &TestApp, user: &str, token: &str) -> Result<Connection, (u16, String)> {
    let mut o = ConnectOptions::new(app.url(), app.token(user));
    o.resume = Some(token.to_owned());
    match connect(&o).await {
        Ok(c) => {
            c.sender.send(&start_message(16_000, 24_000)).await.unwrap();
            Ok(c)
        }
        Err(ClientError::Refused { status, code, .. }) => Err((status, code)),
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

fn resume_token(items: &[Incoming]) -> String {
    items
        .iter()
        .find_map(|i| match event(i) {
            Some(ServerEvent::SessionStarted { resume_token, .. })
            | Some(ServerEvent::SessionResumed { resume_token, .. }) => Some(resume_token.clone()),
            _ => None,
        })
        .expect("a resume token")
}

async fn start_collecting(app: &TestApp, user: &str) -> (Connection, String, String) {
    let mut conn = app.connect(user).await;
    conn.sender
        .send(&start_message(16_000, 24_000))
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionStarted { .. }))
    })
    .await;
    let Some(ServerEvent::SessionStarted { session_id, .. }) = items.last().and_then(event) else {
        unreachable!()
    };
    let id = session_id.clone();
    (conn, id, resume_token(&items))
}

#[tokio::test]
async fn a_dropped_session_resumes_with_its_history_usage_and_limits() {
    let app = spawn_app_with(fast_fakes(), |c| c.max_sessions_per_user = 1).await;
    let (mut conn, id, token) = start_collecting(&app, "r").await;
    let question = with_silence(speech("question_16k.wav"), 1.0);
    stream(&conn, question.clone(), 4.0);
    collect_until(&mut conn, Duration::from_secs(20), is_done(1)).await;
    let usage_before = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::Usage(_)))
    })
    .await;
    let Some(ServerEvent::Usage(before)) = usage_before.last().and_then(event).cloned() else {
        unreachable!()
    };
    // The network drops: no close frame, no session.end.
    conn.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The detached session still holds the user's only place.
    assert_eq!(
        attempt(&app, "r").await.unwrap_err(),
        (429, "too_many_sessions".into())
    );
    // Another user cannot use the token.
    assert_eq!(
        resume(&app, "mallory", &token).await.unwrap_err(),
        (404, "resume_failed".into())
    );
    // The owner resumes.
    let mut conn = resume(&app, "r", &token).await.unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::Usage(_)))
    })
    .await;
    let resumed = items
        .iter()
        .find_map(|i| match event(i) {
            Some(ServerEvent::SessionResumed {
                session_id,
                turns,
                resume_token,
                ..
            }) => Some((session_id.clone(), *turns, resume_token.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{:#?}", summary(&items)));
    assert_eq!(resumed.0, id, "same session id");
    assert_eq!(resumed.1, 1, "one turn so far");
    assert_ne!(resumed.2, token, "the resume token rotates");
    let Some(ServerEvent::Usage(after)) = items.last().and_then(event) else {
        unreachable!()
    };
    assert_eq!(
        after.llm_output_tokens, before.llm_output_tokens,
        "usage survived"
    );
    assert!(after.stt_seconds >= before.stt_seconds);
    // The client's first message on the new connection shows it holds the new token: from
    // then on the old token no longer works.
    conn.sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .unwrap();
    collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::Pong { .. }))
    })
    .await;
    assert_eq!(
        resume(&app, "r", &token).await.unwrap_err(),
        (404, "resume_failed".into())
    );
    // The conversation continues with its history.
    stream(&conn, question, 4.0);
    collect_until(&mut conn, Duration::from_secs(20), is_done(2)).await;
    let messages = app.last_llm_messages();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(messages[1]["role"], "assistant");
}

#[tokio::test]
async fn a_resume_replaces_a_connection_still_attached_with_4409() {
    let app = spawn_app().await;
    let (mut old, id, token) = start_collecting(&app, "r").await;
    let mut new = resume(&app, "r", &token).await.unwrap();
    let items = until_closed(&mut old, Duration::from_secs(5)).await;
    assert!(closed_with(&items, 4409), "{:#?}", summary(&items));
    let items = collect_until(&mut new, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionResumed { .. }))
    })
    .await;
    assert!(
        matches!(items.last().and_then(event), Some(ServerEvent::SessionResumed { session_id, .. }) if *session_id == id)
    );
}

#[tokio::test]
async fn after_the_resume_window_the_session_is_gone_and_its_place_free() {
    let app = spawn_app_with(fast_fakes(), |c| {
        c.resume_window_s = 1;
        c.max_sessions_per_user = 1;
    })
    .await;
    let (conn, _, token) = start_collecting(&app, "r").await;
    conn.abort();
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        resume(&app, "r", &token).await.unwrap_err(),
        (404, "resume_failed".into())
    );
    assert!(attempt(&app, "r").await.is_ok());
}

#[tokio::test]
async fn a_reply_cut_by_a_drop_is_kept_only_as_far_as_it_was_spoken() {
    let mut fakes = fast_fakes();
    fakes.tts.ms_per_char = 60;
    let app = spawn_app_with(fakes, |_| {}).await;
    let (mut conn, _, token) = start_collecting(&app, "r").await;
    let question = with_silence(speech("question_16k.wav"), 0.5);
    stream(&conn, question.clone(), 4.0);
    collect_until(&mut conn, Duration::from_secs(20), |i| {
        matches!(i, Incoming::Audio { .. })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    conn.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut conn = resume(&app, "r", &token).await.unwrap();
    collect_until(&mut conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionResumed { .. }))
    })
    .await;
    ask(&conn);
    collect_until(&mut conn, Duration::from_secs(20), is_done(2)).await;
    let messages = app.last_llm_messages();
    assert_eq!(messages.len(), 3, "{messages:?}");
    let spoken = messages[1]["content"].as_str().unwrap();
    let full = "Sure, you asked: What is the weather like in Paris today?. This is a reply from the fake model. Is there anything else?";
    assert!(
        !spoken.is_empty() && full.starts_with(spoken) && spoken.len() < full.len(),
        "{spoken:?}"
    );
}

#[tokio::test]
async fn a_lost_session_resumed_can_be_retried_with_the_previous_token() {
    let app = spawn_app().await;
    let (conn, id, first_token) = start_collecting(&app, "retry").await;
    conn.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The resume succeeds on the server, but the connection breaks before the client reads
    // session.resumed: the client still holds only the first token.
    let lost = resume(&app, "retry", &first_token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost.abort();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = resume(&app, "retry", &first_token)
        .await
        .expect("the previous token still resumes the session");
    let items = collect_until(&mut again, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionResumed { .. }))
    })
    .await;
    let Some(ServerEvent::SessionResumed { session_id, .. }) = items.last().and_then(event) else {
        unreachable!()
    };
    assert_eq!(session_id, &id);
}

/// Statuses of plain GETs to the voice endpoint carrying `header: value(i)`; the limiter
/// answers before anything else looks at the request.
async fn limited_count(app: &TestApp, header: &str, value: impl Fn(usize) -> String) -> usize {
    let client = reqwest::Client::new();
    let mut limited = 0;
    for i in 0..10 {
        let status = client
            .get(format!("http://{}/v1/voice", app.addr))
            .header(header, value(i))
            .send()
            .await
            .unwrap()
            .status();
        if status == 429 {
            limited += 1;
        }
    }
    limited
}

#[tokio::test]
async fn forged_forwarding_headers_do_not_bypass_the_per_address_limit() {
    // An instance allowing 5 attempts per address, reading the client's address from
    // `header` when the request comes from one of `proxies`.
    let behind = |header: &'static str, proxies: &'static str| {
        spawn_app_with(fast_fakes(), move |c| {
            c.connect_burst = 5;
            c.connect_rate_per_s = 1;
            c.client_ip_header = Some(header.into());
            c.trusted_proxies = Some(proxies.into());
        })
    };
    // The header is configured, but this client is not one of the trusted proxies: a new
    // forged address per attempt changes nothing.
    let direct = behind("x-forwarded-for", "192.0.2.1").await;
    let forged = |i| format!("203.0.113.{i}");
    assert_eq!(limited_count(&direct, "x-forwarded-for", forged).await, 5);

    // Behind a trusted proxy (here the test itself, on loopback) each forwarded client has
    // its own allowance…
    let proxied = behind("x-forwarded-for", "127.0.0.0/8").await;
    assert_eq!(limited_count(&proxied, "x-forwarded-for", forged).await, 0);
    // …but a client that prepends forged entries is still the address the proxy saw.
    let prepended = |i| format!("203.0.113.{i}, 198.51.100.7");
    assert_eq!(
        limited_count(&proxied, "x-forwarded-for", prepended).await,
        5
    );

    // Fly's header by name, IPv6 clients per /64.
    let fly = behind("fly-client-ip", "127.0.0.1, ::1").await;
    let same_block = |i| format!("2001:db8:5:6::{i:x}");
    assert_eq!(limited_count(&fly, "fly-client-ip", same_block).await, 5);
    let other_blocks = |i| format!("2001:db8:7:{i:x}::1");
    assert_eq!(limited_count(&fly, "fly-client-ip", other_blocks).await, 0);
}
