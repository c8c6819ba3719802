//! The streaming pipeline end to end: speech in, transcript, reply text and audio out.

use std::time::Duration;

use atlas_client::Incoming;
use atlas_fakes::{TTS_SAMPLE_RATE, Target};
use atlas_protocol::{ServerEvent, Usage};

use crate::helpers::*;

/// Samples the fake TTS returns for `text` resampled to `rate` (the server preserves each
/// sentence's duration exactly).
fn expected_samples(inputs: &[String], ms_per_char: u32, rate: u32) -> u64 {
    inputs
        .iter()
        .map(|t| {
            let at_24k =
                t.chars().count() as u64 * u64::from(ms_per_char) * u64::from(TTS_SAMPLE_RATE)
                    / 1000;
            (at_24k * u64::from(rate) + u64::from(TTS_SAMPLE_RATE) / 2) / u64::from(TTS_SAMPLE_RATE)
        })
        .sum()
}

async fn ask(app: &TestApp, user: &'static str, output_rate: u32) -> (Vec<Incoming>, String) {
    let (mut conn, id) = app.start(user, output_rate).await;
    let question = with_silence(speech("question_16k.wav"), 1.5);
    let streaming = stream(&conn, question, 1.0);
    let mut items = collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
    items.extend(
        collect_until(&mut conn, Duration::from_secs(5), |i| {
            matches!(event(i), Some(ServerEvent::Usage(_)))
        })
        .await,
    );
    streaming.abort();
    (items, id)
}

#[tokio::test]
async fn spoken_question_gets_a_spoken_reply_at_each_requested_rate() {
    let app = spawn_app().await;
    // Two sessions at once, at different output rates.
    let (a, b) = tokio::join!(ask(&app, "user-a", 16_000), ask(&app, "user-b", 48_000));
    assert_ne!(a.1, b.1, "sessions have distinct ids");
    let recorded = app.fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 2);
    assert_eq!(recorded.stt_connections.len(), 2);
    for ((items, _), rate) in [(a, 16_000u32), (b, 48_000u32)] {
        let events: Vec<&ServerEvent> = items.iter().filter_map(event).collect();
        let final_pos = events
            .iter()
            .position(|e| matches!(e, ServerEvent::TranscriptFinal { turn_id: 1, text } if text == "What is the weather like in Paris today?"))
            .unwrap_or_else(|| panic!("no final transcript: {:#?}", summary(&items)));
        let started_pos = events
            .iter()
            .position(|e| matches!(e, ServerEvent::ResponseStarted { turn_id: 1 }))
            .expect("response.started");
        assert!(final_pos < started_pos);
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::ResponseTextDelta { turn_id: 1, text } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert!(
            text.starts_with("Sure, you asked: What is the weather like in Paris today?"),
            "{text}"
        );

        // Audio only between response.started and response.done.
        let first_audio = items
            .iter()
            .position(|i| matches!(i, Incoming::Audio { .. }))
            .expect("audio");
        let done_at = items.iter().position(is_done(1)).unwrap();
        let started_at = items
            .iter()
            .position(|i| matches!(event(i), Some(ServerEvent::ResponseStarted { .. })))
            .unwrap();
        assert!(started_at < first_audio && first_audio < done_at);
        assert!(
            !items[done_at..]
                .iter()
                .any(|i| matches!(i, Incoming::Audio { .. }))
        );

        // Every sentence was synthesised and delivered at the requested rate, full length.
        let inputs: Vec<String> = recorded.tts_inputs.clone();
        let per_session: Vec<String> = {
            // Both sessions asked the same question, so each sentence appears twice.
            let half = inputs.len() / 2;
            let mut sorted = inputs.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), half, "{inputs:?}");
            sorted
        };
        assert_eq!(
            per_session.join(" ").len(),
            text.trim().len(),
            "TTS got all of the text"
        );
        let samples = audio_bytes(&items) as u64 / 2;
        let expected = expected_samples(&per_session, 30, rate);
        assert!(
            samples.abs_diff(expected) <= per_session.len() as u64,
            "{samples} samples at {rate} Hz, expected {expected}"
        );

        let Some(ServerEvent::ResponseDone {
            interrupted,
            latency_ms,
            ..
        }) = event(&items[done_at])
        else {
            unreachable!()
        };
        assert!(!interrupted);
        let eos = latency_ms.end_of_speech_to_final.expect("stt latency");
        assert!(
            eos >= 140,
            "final {eos} ms after end of speech; the fake waits 150"
        );
        assert!(latency_ms.llm_first_token.expect("llm latency") >= 80);
        assert!(latency_ms.tts_first_audio.expect("tts latency") >= 40);
        assert!(latency_ms.to_first_audio.expect("total") >= 140 + 80 + 40);

        let Some(ServerEvent::Usage(Usage {
            llm_input_tokens,
            llm_output_tokens,
            tts_chars,
            stt_seconds,
            ..
        })) = items.last().and_then(event)
        else {
            unreachable!()
        };
        assert!(*llm_input_tokens > 0 && *llm_output_tokens > 0);
        assert_eq!(
            *tts_chars as usize,
            per_session.iter().map(|s| s.chars().count()).sum::<usize>()
        );
        assert!(*stt_seconds > 3.0, "{stt_seconds}");
    }
    // The LLM saw the server's system prompt and the user's words.
    let (target, body) = &recorded.llm_requests[0];
    assert_eq!(*target, Target::Anthropic);
    assert_eq!(body["system"], app.config.system_prompt.as_str());
    assert_eq!(body["messages"][0]["role"], "user");
    assert_eq!(
        body["messages"][0]["content"],
        "What is the weather like in Paris today?"
    );
    assert_eq!(body["stream"], true);
}

#[tokio::test]
async fn barge_in_stops_the_reply_and_keeps_only_what_was_spoken() {
    let app = spawn_app_with(barge_in_fakes(), |_| {}).await;
    let (mut conn, _) = app.start("user-c", 24_000).await;
    let items = question_then_interruption(&mut conn, 2).await;

    let pos = |pred: &dyn Fn(&ServerEvent) -> bool| {
        items
            .iter()
            .position(|i| event(i).is_some_and(pred))
            .unwrap_or_else(|| panic!("missing event: {:#?}", summary(&items)))
    };
    let interrupted = pos(&|e| matches!(e, ServerEvent::ResponseInterrupted { turn_id: 1 }));
    let done1 = pos(&|e| {
        matches!(
            e,
            ServerEvent::ResponseDone {
                turn_id: 1,
                interrupted: true,
                ..
            }
        )
    });
    let started2 = pos(&|e| matches!(e, ServerEvent::ResponseStarted { turn_id: 2 }));
    assert!(interrupted < done1 && done1 < started2);
    assert!(
        !items[interrupted..started2]
            .iter()
            .any(|i| matches!(i, Incoming::Audio { .. })),
        "no audio of the interrupted turn after response.interrupted"
    );
    // Less audio was sent for turn 1 than the full reply would have taken.
    let turn1_audio = audio_bytes(&items[..interrupted]) as f64 / 2.0 / 24_000.0;
    assert!(turn1_audio < 5.0, "{turn1_audio} s of turn-1 audio");

    // The second LLM request carries the truncated assistant turn.
    let recorded = app.fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 2);
    let messages = recorded.llm_requests[1].1["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert_eq!(
        messages[0]["content"],
        "What is the weather like in Paris today?"
    );
    assert_eq!(messages[1]["role"], "assistant");
    let spoken = messages[1]["content"].as_str().unwrap();
    let full = "Sure, you asked: What is the weather like in Paris today?. This is a reply from the fake model. Is there anything else?";
    assert!(
        !spoken.is_empty() && full.starts_with(spoken) && spoken.len() < full.len(),
        "{spoken:?}"
    );
    assert_eq!(messages[2]["content"], "Please tell me about Rome instead");
}

/// A phrase the operator lists as a backchannel (`ATLAS_BACKCHANNELS`), said alone while the
/// assistant speaks, does not interrupt it; the same phrase unlisted does.
#[tokio::test]
async fn configured_backchannels_do_not_interrupt_the_reply() {
    for listed in [true, false] {
        let mut fakes = fast_fakes();
        fakes.tts.ms_per_char = 60;
        fakes.stt.transcripts = vec![
            "What is the weather like in Paris today?".into(),
            "ja genau".into(),
        ];
        let app = spawn_app_with(fakes, move |c| {
            c.backchannels = Some(if listed {
                vec!["mm-hm".into(), "ja genau".into()]
            } else {
                vec!["mm-hm".into()]
            });
        })
        .await;
        let (mut conn, _) = app.start("backchannel", 24_000).await;
        // While the reply plays, the user says the phrase.
        let items = question_then_interruption(&mut conn, 1).await;
        let interrupted = items.iter().filter_map(event).any(|e| {
            matches!(
                e,
                ServerEvent::ResponseDone {
                    turn_id: 1,
                    interrupted: true,
                    ..
                }
            )
        });
        assert_eq!(
            interrupted,
            !listed,
            "listed: {listed}: {:#?}",
            summary(&items)
        );
    }
}

/// The assistant's own voice heard back through the microphone (a client on its loudspeaker,
/// no echo cancellation): with `ATLAS_ECHO_WINDOW_MS` it neither interrupts the reply nor
/// shows as the person's words nor makes a turn; without, it cuts the reply like anyone.
#[tokio::test]
async fn the_assistants_own_voice_heard_back_does_not_interrupt_it() {
    let echo = "This is a reply from the fake model.";
    for window_ms in [1_000, 0] {
        let mut fakes = fast_fakes();
        fakes.tts.ms_per_char = 60;
        fakes.stt.transcripts = vec![
            "What is the weather like in Paris today?".into(),
            echo.into(),
        ];
        let app = spawn_app_with(fakes, move |c| c.echo_window_ms = window_ms).await;
        let (mut conn, _) = app.start("loudspeaker", 24_000).await;
        let items = question_then_interruption(&mut conn, 1).await;
        let events: Vec<&ServerEvent> = items.iter().filter_map(event).collect();
        let interrupted = events.iter().any(|e| {
            matches!(
                e,
                ServerEvent::ResponseDone {
                    turn_id: 1,
                    interrupted: true,
                    ..
                }
            )
        });
        // Anything shown as the person's words once the reply began is the echo.
        let heard_echo = events
            .iter()
            .skip_while(|e| !matches!(e, ServerEvent::ResponseStarted { .. }))
            .any(|e| {
                matches!(
                    e,
                    ServerEvent::TranscriptPartial { .. } | ServerEvent::TranscriptFinal { .. }
                )
            });
        let guarded = window_ms > 0;
        assert_eq!(
            interrupted,
            !guarded,
            "window {window_ms}: {:#?}",
            summary(&items)
        );
        assert_eq!(
            heard_echo,
            !guarded,
            "window {window_ms}: {:#?}",
            summary(&items)
        );
        if guarded {
            // The echo made no turn of its own: one request, one reply.
            let rest = end_session(&mut conn).await;
            assert!(
                !rest
                    .iter()
                    .filter_map(event)
                    .any(|e| matches!(e, ServerEvent::ResponseStarted { .. })),
                "{:#?}",
                summary(&rest)
            );
            assert_eq!(app.fakes.recorded().llm_requests.len(), 1);
        }
    }
}

#[tokio::test]
async fn push_to_talk_commit_ends_the_turn_without_waiting_for_endpointing() {
    // A very slow end-of-speech detection: only input.commit can end the turn quickly.
    let mut fakes = fast_fakes();
    fakes.stt.final_delay = Duration::from_secs(20);
    fakes.stt.silence_to_end = Duration::from_secs(20);
    let app = spawn_app_with(fakes, |_| {}).await;
    let (mut conn, _) = app.start("user-d", 24_000).await;
    let question = with_silence(speech("question_16k.wav"), 0.3);
    stream(&conn, question, 4.0).await.unwrap();
    conn.sender
        .send(&atlas_protocol::ClientMessage::InputCommit)
        .await
        .unwrap();
    let items = collect_until(&mut conn, Duration::from_secs(10), is_done(1)).await;
    assert!(items.iter().any(|i| matches!(
        event(i),
        Some(ServerEvent::TranscriptFinal { turn_id: 1, .. })
    )));
    assert!(
        app.fakes.recorded().stt_finalizes >= 1,
        "Finalize was sent to the recogniser"
    );
}

/// 20 ms frames reach the recogniser joined into fewer messages where nothing waits for them
/// (quiet, with no end of speech awaited) — every byte, in order, and the turn still ends — and
/// one by one when batching is off.
#[tokio::test]
async fn twenty_ms_frames_reach_the_recogniser_batched_and_whole() {
    for batch_ms in [100, 0] {
        let app = spawn_app_with(fast_fakes(), |c| c.stt_batch_ms = batch_ms).await;
        let (mut conn, _) = app.start("u", 16_000).await;
        let question = with_silence(speech("question_16k.wav"), 1.0);
        let frames = question.chunks(320).len() as u64;
        let bytes = question.len() as u64 * 2;
        let sender = conn.sender.clone();
        let streaming = tokio::spawn(async move {
            atlas_client::stream_pcm(&sender, &question, 16_000, 20, 1.0).await
        });
        let items = collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
        assert!(
            items.iter().filter_map(event).any(|e| matches!(
                e,
                ServerEvent::TranscriptFinal { turn_id: 1, text } if text.contains("Paris")
            )),
            "{:#?}",
            summary(&items)
        );
        streaming.await.unwrap().unwrap();
        // The last held audio goes by its deadline once the client stops sending.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while app.fakes.recorded().stt_audio_bytes < bytes && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let recorded = app.fakes.recorded();
        assert_eq!(recorded.stt_audio_bytes, bytes, "batch {batch_ms} ms");
        if batch_ms > 0 {
            // Speech and the quiet right after it go frame by frame; the quiet before it and
            // after the recogniser's final goes in batches.
            assert!(
                recorded.stt_audio_messages * 10 < frames * 8,
                "{} messages for {frames} frames",
                recorded.stt_audio_messages
            );
        } else {
            // One message per frame (a recogniser link that fell behind may join a few).
            assert!(
                recorded.stt_audio_messages * 10 >= frames * 9,
                "{} messages for {frames} frames",
                recorded.stt_audio_messages
            );
        }
    }
}

/// Issue 25, finding 6: the recogniser's `UtteranceEnd` for a spoken turn arrives after that
/// turn ended; a typed turn seconds later must report its own figures, not latency counted
/// from the earlier end of speech.
#[tokio::test]
async fn a_typed_turn_after_a_spoken_one_reports_its_own_latency() {
    let app = spawn_app().await;
    let (mut conn, _) = app.start("u-latency", 24_000).await;
    let question = with_silence(speech("question_16k.wav"), 2.5);
    let streaming = stream(&conn, question, 1.0);
    collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
    // The rest of the silence goes out (the UtteranceEnd comes a second after the last
    // word), then the person waits before typing.
    let _ = streaming.await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    type_text(&conn, "And tomorrow?").await;
    let items = collect_until(&mut conn, Duration::from_secs(15), is_done(2)).await;
    let latency = items
        .iter()
        .find_map(|i| match event(i) {
            Some(ServerEvent::ResponseDone {
                turn_id: 2,
                latency_ms,
                ..
            }) => Some(latency_ms.clone()),
            _ => None,
        })
        .expect("response.done");
    // A typed turn has no end of speech; first audio is counted from its arrival (these fakes
    // answer in ~120 ms; the stale figure would be over 3 s).
    assert_eq!(latency.end_of_speech_to_final, None, "{latency:?}");
    let first_audio = latency.to_first_audio.expect("first audio");
    assert!(first_audio < 2_500, "{latency:?}");
}

#[tokio::test]
async fn eager_first_audio_synthesises_the_first_words_before_a_clause_comes() {
    const REPLY: &str = "The capital of France is Paris and it lies on the Seine.";
    for (words, first) in [(4, "The capital of France"), (0, REPLY)] {
        let mut fakes = fast_fakes();
        fakes.llm.reply = Some(REPLY.into());
        let app = spawn_app_with(fakes, |c| {
            c.eager_first_words = words;
            c.eager_first_ms = 0;
        })
        .await;
        let (mut conn, _) = app.start("eager", 24_000).await;
        type_text(&conn, "What is the capital of France?").await;
        let items = collect_until(&mut conn, Duration::from_secs(15), is_done(1)).await;
        assert!(audio_bytes(&items) > 0, "{:#?}", summary(&items));
        let inputs = app.fakes.recorded().tts_inputs;
        assert_eq!(inputs[0], first, "eager after {words} words: {inputs:?}");
        assert_eq!(inputs.join(" "), REPLY, "nothing lost or repeated");
    }
}
