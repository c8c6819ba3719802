//! The resilient client against the real server: a connection cut mid-reply is resumed.

use std::time::Duration;

use bytes::Bytes;

use atlas_client::ConnectOptions;
use atlas_client::voice::{ReconnectPolicy, VoiceEvent, VoiceSession};
use atlas_protocol::{ServerEvent, SessionStart};

use crate::helpers::*;

async fn speak(session: &VoiceSession, samples: Vec<i16>) {
    for chunk in samples.chunks(1600) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut bytes = bytes;
        bytes.resize(bytes.len().max(100), 0);
        session.audio(Bytes::from(bytes)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn next_matching(
    session: &mut VoiceSession,
    secs: u64,
    mut f: impl FnMut(&VoiceEvent) -> bool,
) -> Vec<VoiceEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut seen = Vec::new();
    loop {
        let e = tokio::time::timeout_at(deadline, session.events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out; saw {} events: {:?}",
                    seen.len(),
                    seen.iter().rev().take(5).collect::<Vec<_>>()
                )
            })
            .expect("events ended");
        let done = f(&e);
        seen.push(e);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_connection_cut_mid_reply_reconnects_and_resumes_with_history() {
    let mut fakes = fast_fakes();
    fakes.tts.ms_per_char = 60;
    let app = spawn_app_with(fakes, |_| {}).await;
    let proxy = Proxy::start(app.addr).await.unwrap();
    let options = ConnectOptions::new(
        format!("ws://{}/v1/voice", proxy.addr),
        app.token("roaming"),
    );
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_millis(200),
        ..ReconnectPolicy::default()
    };
    let mut session = VoiceSession::start(
        options,
        SessionStart::default(),
        policy,
        Duration::from_secs(15),
    )
    .await
    .unwrap();
    let started = next_matching(&mut session, 5, |e| {
        matches!(e, VoiceEvent::Server(ServerEvent::SessionStarted { .. }))
    })
    .await;
    let Some(VoiceEvent::Server(ServerEvent::SessionStarted { session_id, .. })) = started.last()
    else {
        unreachable!()
    };
    let id = session_id.clone();

    speak(&session, with_silence(speech("question_16k.wav"), 1.0)).await;
    next_matching(&mut session, 20, |e| matches!(e, VoiceEvent::Audio(_))).await;
    // The network drops mid-reply, and comes back.
    proxy.cut();
    proxy.restore();
    let events = next_matching(&mut session, 15, |e| {
        matches!(e, VoiceEvent::Server(ServerEvent::SessionResumed { .. }))
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, VoiceEvent::Reconnecting { attempt: 1, .. }))
    );
    let Some(VoiceEvent::Server(ServerEvent::SessionResumed {
        session_id, turns, ..
    })) = events.last()
    else {
        unreachable!()
    };
    assert_eq!(*session_id, id, "the same session");
    assert_eq!(*turns, 1);

    // The conversation continues with its history (the cut reply kept as far as it was spoken).
    speak(&session, with_silence(speech("question_16k.wav"), 1.0)).await;
    next_matching(&mut session, 20, |e| {
        matches!(
            e,
            VoiceEvent::Server(ServerEvent::ResponseDone { turn_id: 2, .. })
        )
    })
    .await;
    let messages = app.last_llm_messages();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(messages[1]["role"], "assistant");
}
