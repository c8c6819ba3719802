//! `atlas-voice loadtest --spawn --mix`: the accounting check. Concurrent sessions each take
//! every path that ends a provider request early — a spoken question cut by a spoken barge-in,
//! a typed turn cutting a reply, a session ended while a reply plays — and then the providers'
//! bill (what the fakes counted, the way the providers count) is compared with what the
//! server recorded in `voice_sessions`: model prompt and output tokens, synthesis characters,
//! recognition seconds, and one final record per session.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;

use atlas_client::{ConnectOptions, Connection, Incoming, connect, stream_pcm};
use atlas_fakes::{Fakes, Usage};
use atlas_protocol::{AudioFormat, ClientMessage, ServerEvent, SessionStart};
use atlas_store::Store;
use atlas_store::records::UserUsage;

/// The user every mixed session belongs to.
pub const USER: &str = "loadtest-mix";

/// How long one step of a session may wait for the server.
const STEP: Duration = Duration::from_secs(30);

/// How one session ends.
#[derive(Clone, Copy, Debug)]
enum Ending {
    /// `session.end` once the last reply is done.
    AfterReply,
    /// `session.end` while a reply is playing.
    DuringReply,
}

/// One accounting check.
pub struct Check<'a> {
    /// The voice endpoint.
    pub url: &'a str,
    /// An access token of [`USER`].
    pub token: &'a str,
    /// The fakes the server is wired to.
    pub fakes: &'a Fakes,
    /// The server's database.
    pub database_url: &'a str,
    /// Concurrent sessions.
    pub sessions: usize,
    /// Delay between session starts.
    pub ramp: Duration,
    /// The spoken question (16-bit mono samples and their rate).
    pub question: (Vec<i16>, u32),
    /// Print the result as JSON.
    pub json: bool,
}

/// Runs the check's sessions, waits for their final records, and compares them with the
/// fakes' bill. An error names every disagreement.
pub async fn run(check: Check<'_>) -> anyhow::Result<()> {
    let Check {
        url,
        token,
        fakes,
        database_url,
        sessions,
        ramp,
        question,
        json,
    } = check;
    let started = Instant::now();
    let question = std::sync::Arc::new(question);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..sessions {
        let (url, token, question) = (url.to_owned(), token.to_owned(), question.clone());
        let ending = if i % 3 == 2 {
            Ending::DuringReply
        } else {
            Ending::AfterReply
        };
        tasks.spawn(async move {
            tokio::time::sleep(ramp * i as u32).await;
            one_session(&url, &token, &question.0, question.1, ending).await
        });
    }
    let mut errors = Vec::new();
    let mut interrupted = 0u64;
    let mut barge_ins = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(done)) => {
                interrupted += done.interrupted;
                barge_ins.push(done.barge_in.as_secs_f64() * 1e3);
            }
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let store = Store::connect(database_url).await?;
    let recorded = settled(&store, fakes, sessions).await?;
    store.close().await;
    let billed = fakes.recorded().usage;
    let disagreements = compare(sessions, &billed, &recorded);
    let barge_in = |p| crate::eval::percentile(&barge_ins, p).unwrap_or(f64::NAN);
    if json {
        println!(
            "{}",
            json!({
                "sessions": sessions,
                "session_errors": errors.len(),
                "interrupted_replies": interrupted,
                "barge_in_ms": {"p50": barge_in(50.0), "p95": barge_in(95.0), "max": barge_in(100.0)},
                "elapsed_s": started.elapsed().as_secs_f64(),
                "fakes": {
                    "llm_requests": billed.llm_requests,
                    "llm_cut_requests": billed.llm_cut_requests,
                    "llm_cut_last_tokens": billed.llm_cut_last_tokens,
                    "llm_input_tokens": billed.llm_input_tokens,
                    "llm_output_tokens": billed.llm_output_tokens,
                    "tts_requests": billed.tts_requests,
                    "tts_chars": billed.tts_chars,
                    "stt_audio_seconds": billed.stt_audio_seconds,
                },
                "records": {
                    "sessions": recorded.sessions,
                    "ended": recorded.ended,
                    "turns": recorded.turns,
                    "llm_input_tokens": recorded.llm_input_tokens,
                    "llm_output_tokens": recorded.llm_output_tokens,
                    "tts_chars": recorded.tts_chars,
                    "stt_seconds": recorded.stt_seconds,
                },
                "disagreements": disagreements,
            })
        );
    } else {
        println!(
            "{sessions} mixed sessions in {:.1} s: {} replies cut short ({} model streams left early of {}), {} session errors",
            started.elapsed().as_secs_f64(),
            interrupted,
            billed.llm_cut_requests,
            billed.llm_requests,
            errors.len()
        );
        println!(
            "barge-in: the barging speech's first sound → response.interrupted at the client: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
            barge_in(50.0),
            barge_in(95.0),
            barge_in(100.0)
        );
        println!("                      providers (fakes)   ledger (records)");
        println!(
            "model prompt tokens   {:>17}   {:>16}",
            billed.llm_input_tokens, recorded.llm_input_tokens
        );
        println!(
            "model output tokens   {:>17}   {:>16}",
            billed.llm_output_tokens, recorded.llm_output_tokens
        );
        println!(
            "speech characters     {:>17}   {:>16}",
            billed.tts_chars, recorded.tts_chars
        );
        println!(
            "recognition seconds   {:>17.3}   {:>16.3}",
            billed.stt_audio_seconds, recorded.stt_seconds
        );
        println!(
            "final records         {:>17}   {:>16}",
            sessions, recorded.ended
        );
    }
    for e in errors.iter().take(5) {
        eprintln!("session error: {e}");
    }
    anyhow::ensure!(errors.is_empty(), "{} sessions failed", errors.len());
    anyhow::ensure!(
        disagreements.is_empty(),
        "the ledger and the providers disagree: {}",
        disagreements.join("; ")
    );
    Ok(())
}

/// Waits until every session has its final record and every model stream has been settled by
/// the fakes; returns the records' sums.
async fn settled(store: &Store, fakes: &Fakes, sessions: usize) -> anyhow::Result<UserUsage> {
    let deadline = Instant::now() + STEP;
    loop {
        let recorded = store.usage_of(USER).await?;
        let open = fakes.recorded().usage.llm_open_streams;
        if (recorded.ended as usize >= sessions && open == 0) || Instant::now() >= deadline {
            return Ok(recorded);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every way the records and the bill differ.
fn compare(sessions: usize, billed: &Usage, recorded: &UserUsage) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |what: &str, providers: String, ledger: String| {
        out.push(format!("{what}: providers {providers}, ledger {ledger}"));
    };
    if recorded.sessions != sessions as i64 || recorded.ended != sessions as i64 {
        differ(
            "final records",
            sessions.to_string(),
            format!("{} recorded, {} ended", recorded.sessions, recorded.ended),
        );
    }
    if billed.llm_open_streams != 0 {
        differ(
            "model streams still open",
            billed.llm_open_streams.to_string(),
            "0".into(),
        );
    }
    let pairs = [
        (
            "model prompt tokens",
            billed.llm_input_tokens,
            recorded.llm_input_tokens,
        ),
        ("speech characters", billed.tts_chars, recorded.tts_chars),
    ];
    for (what, providers, ledger) in pairs {
        if i64::try_from(providers).ok() != Some(ledger) {
            differ(what, providers.to_string(), ledger.to_string());
        }
    }
    // Output tokens: the ledger bills all the text that reached the server, also of streams it
    // cut (it reads what has arrived before it drops one). The provider also bills text of a
    // cut stream that was still on its way — at most each cut stream's last event, which no
    // client can count (no provider reports usage for a stream the client left). So the
    // ledger never bills more, and misses at most that.
    let output = i64::try_from(billed.llm_output_tokens).unwrap_or(i64::MAX);
    let in_flight = i64::try_from(billed.llm_cut_last_tokens).unwrap_or(i64::MAX);
    let missed = output - recorded.llm_output_tokens;
    if !(0..=in_flight).contains(&missed) {
        differ(
            "model output tokens",
            output.to_string(),
            format!(
                "{} (at most {in_flight} may have been on their way when streams were cut)",
                recorded.llm_output_tokens
            ),
        );
    }
    // Seconds are sums of per-frame fractions on both sides: equal to the microsecond.
    if (billed.stt_audio_seconds - recorded.stt_seconds).abs() > 1e-3 {
        differ(
            "recognition seconds",
            format!("{:.6}", billed.stt_audio_seconds),
            format!("{:.6}", recorded.stt_seconds),
        );
    }
    out
}

/// What one session saw.
struct Done {
    /// Replies cut short.
    interrupted: u64,
    /// From the first sound of the spoken barge-in (when the microphone captured it) to
    /// `response.interrupted` of the reply it cut.
    barge_in: Duration,
}

/// One session: a spoken question, barged in on by speaking it again once its reply is heard;
/// a typed question cut by another typed one once its reply's text arrives; then the end, after
/// the last reply or during it.
async fn one_session(
    url: &str,
    token: &str,
    samples: &[i16],
    rate: u32,
    ending: Ending,
) -> anyhow::Result<Done> {
    let onset = atlas_client::speech_start(samples, rate, -40.0).context("no speech")?;
    let mut conn = connect(&ConnectOptions::new(url, token))
        .await
        .context("connecting")?;
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart {
            input_audio: AudioFormat {
                sample_rate: rate,
                ..AudioFormat::DEFAULT_INPUT
            },
            ..SessionStart::default()
        }))
        .await?;
    let mut log = Log {
        interrupted: 0,
        last_turn: 0,
        at: Instant::now(),
    };
    log.until(&mut conn, "session.started", |e| {
        matches!(e, ServerEvent::SessionStarted { .. })
    })
    .await?;

    // A spoken question, and the same question again as soon as its reply is heard.
    let mut speech = samples.to_vec();
    speech.extend(std::iter::repeat_n(0i16, rate as usize * 3 / 2));
    let microphone = speak(&conn, speech.clone(), rate);
    log.until_audio(&mut conn).await?;
    let first = log.last_turn;
    // One microphone: the silence after the question gives way to the question again (two
    // streams at once would interleave their frames, and the recogniser would hear the
    // speech chopped by silence).
    microphone.abort();
    let spoken_at = Instant::now() + onset;
    let _microphone = speak(&conn, speech, rate);
    log.until(
        &mut conn,
        "the barge-in",
        |e| matches!(e, ServerEvent::ResponseInterrupted { turn_id } if *turn_id == first),
    )
    .await?;
    let barge_in = log.at.saturating_duration_since(spoken_at);
    log.until(
        &mut conn,
        "the reply after the barge-in",
        |e| matches!(e, ServerEvent::ResponseDone { turn_id, .. } if *turn_id > first),
    )
    .await?;

    // A typed question, cut by another once the reply's text starts.
    let spoken = log.last_turn;
    conn.sender
        .send(&ClientMessage::InputText {
            text: "Tell me about the sea.".into(),
        })
        .await?;
    log.until(
        &mut conn,
        "reply text",
        |e| matches!(e, ServerEvent::ResponseTextDelta { turn_id, .. } if *turn_id > spoken),
    )
    .await?;
    conn.sender
        .send(&ClientMessage::InputText {
            text: "And about the mountains?".into(),
        })
        .await?;
    match ending {
        Ending::AfterReply => {
            log.until(
                &mut conn,
                "the last reply",
                |e| matches!(e, ServerEvent::ResponseDone { turn_id, .. } if *turn_id > spoken + 1),
            )
            .await?;
        }
        Ending::DuringReply => {
            log.until(&mut conn, "the last reply's text", |e| {
                matches!(e, ServerEvent::ResponseTextDelta { turn_id, .. } if *turn_id > spoken + 1)
            })
            .await?;
        }
    }
    conn.sender.send(&ClientMessage::SessionEnd).await?;
    log.until_closed(&mut conn).await?;
    Ok(Done {
        interrupted: log.interrupted,
        barge_in,
    })
}

/// Streams `speech` at real-time pace in 20 ms frames from a task of its own (abort it to
/// stop the microphone).
fn speak(conn: &Connection, speech: Vec<i16>, rate: u32) -> tokio::task::JoinHandle<()> {
    let sender = conn.sender.clone();
    tokio::spawn(async move {
        let _ = stream_pcm(&sender, &speech, rate, 20, 1.0).await;
    })
}

/// What one session has seen so far.
struct Log {
    /// Replies cut short.
    interrupted: u64,
    /// The highest turn the server has started.
    last_turn: u64,
    /// When the last event arrived.
    at: Instant,
}

impl Log {
    /// Counts what `event` says about the turns.
    fn note(&mut self, event: &ServerEvent) {
        match event {
            ServerEvent::ResponseDone { interrupted, .. } => {
                self.interrupted += u64::from(*interrupted);
            }
            ServerEvent::TranscriptFinal { turn_id, .. }
            | ServerEvent::ResponseStarted { turn_id } => {
                self.last_turn = self.last_turn.max(*turn_id);
            }
            _ => {}
        }
    }

    /// The next item from the server before `deadline`, its events counted.
    async fn next(
        &mut self,
        conn: &mut Connection,
        what: &str,
        deadline: Instant,
    ) -> anyhow::Result<Incoming> {
        let item = tokio::time::timeout_at(deadline, conn.incoming.recv())
            .await
            .map_err(|_| anyhow::anyhow!("no {what} within {STEP:?}"))?
            .ok_or_else(|| anyhow::anyhow!("connection ended waiting for {what}"))?;
        if let Incoming::Event { event, at } = &item {
            self.at = *at;
            self.note(event);
        }
        Ok(item)
    }

    /// Reads until an event matching `want`.
    async fn until(
        &mut self,
        conn: &mut Connection,
        what: &str,
        want: impl Fn(&ServerEvent) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP;
        loop {
            match self.next(conn, what, deadline).await? {
                Incoming::Event {
                    event: event @ ServerEvent::Error { fatal: true, .. },
                    ..
                } => anyhow::bail!("fatal error waiting for {what}: {event:?}"),
                Incoming::Event { event, .. } if want(&event) => return Ok(()),
                Incoming::Closed { code, reason, .. } => {
                    anyhow::bail!("closed ({code:?} {reason}) waiting for {what}")
                }
                Incoming::Event { .. } | Incoming::Audio { .. } => {}
            }
        }
    }

    /// Reads until the first reply audio.
    async fn until_audio(&mut self, conn: &mut Connection) -> anyhow::Result<()> {
        let (what, deadline) = ("reply audio", Instant::now() + STEP);
        loop {
            match self.next(conn, what, deadline).await? {
                Incoming::Audio { pcm, .. } if !pcm.is_empty() => return Ok(()),
                Incoming::Closed { code, reason, .. } => {
                    anyhow::bail!("closed ({code:?} {reason}) waiting for {what}")
                }
                Incoming::Event { .. } | Incoming::Audio { .. } => {}
            }
        }
    }

    /// Reads until the server closes the connection.
    async fn until_closed(&mut self, conn: &mut Connection) -> anyhow::Result<()> {
        let deadline = Instant::now() + STEP;
        while !matches!(
            self.next(conn, "the close after session.end", deadline)
                .await?,
            Incoming::Closed { .. }
        ) {}
        Ok(())
    }
}
