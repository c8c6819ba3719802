//! `atlas-voice call`: stream a WAV file (or raw PCM from stdin) to a server, print the
//! transcript, save the spoken reply. Built on the resilient client: it reconnects and
//! resumes if the connection drops.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use tokio::io::AsyncReadExt;

use atlas_client::voice::{ReconnectPolicy, ToolScript, VoiceEvent, VoiceSession};
use atlas_client::{ConnectOptions, wav};
use atlas_core::resample::StreamResampler;
use atlas_protocol::{AudioFormat, ClientMessage, ServerEvent, SessionStart};

/// Arguments of `call`.
#[derive(Args)]
pub struct CallArgs {
    /// Voice endpoint.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/voice")]
    url: String,
    /// Access token (see `atlas-voice token`).
    #[arg(long, env = "ATLAS_TOKEN")]
    token: String,
    /// The question: a 16-bit PCM WAV file, or `-` for raw s16le mono PCM on stdin.
    #[arg(long)]
    input: PathBuf,
    /// Sample rate of raw PCM on stdin.
    #[arg(long, default_value_t = 16_000)]
    input_rate: u32,
    /// Where to write the reply audio (WAV).
    #[arg(long, default_value = "reply.wav")]
    output: PathBuf,
    /// Sample rate of the reply audio.
    #[arg(long, default_value_t = 24_000)]
    output_rate: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Print every event as a JSON line instead of a transcript.
    #[arg(long)]
    json: bool,
    /// Answers to the application's tools: a JSON file mapping each tool name to
    /// `{"result": <any JSON>}` or `{"error": "<message>"}`; a `tool.call` for another tool is
    /// answered with an error.
    #[arg(long)]
    tool_results: Option<PathBuf>,
    #[command(flatten)]
    phone: crate::phone::PhoneArgs,
}

async fn read_input(args: &CallArgs) -> anyhow::Result<(Vec<i16>, u32)> {
    if args.input.as_os_str() == "-" {
        let mut raw = Vec::new();
        tokio::io::stdin()
            .read_to_end(&mut raw)
            .await
            .context("cannot read stdin")?;
        let samples = raw
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        return Ok((samples, args.input_rate));
    }
    wav::read(&args.input)
}

/// Runs one question-and-answer exchange.
pub async fn run(args: CallArgs) -> anyhow::Result<()> {
    if args.phone.twilio {
        return crate::phone::call(
            &args.url,
            &args.phone,
            &args.input,
            &args.output,
            Duration::from_secs(args.timeout_s),
        )
        .await;
    }
    let tools = match &args.tool_results {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            ToolScript::from_json(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => ToolScript::default(),
    };
    let (mut samples, mut rate) = read_input(&args).await?;
    if !AudioFormat::SUPPORTED_RATES.contains(&rate) {
        let mut r = StreamResampler::new(rate, 16_000)?;
        let mut out = Vec::new();
        r.process(&samples, &mut out);
        r.flush(&mut out);
        samples = out;
        rate = 16_000;
    }
    // Trailing silence lets the recogniser hear the end of the question.
    samples.extend(std::iter::repeat_n(0i16, rate as usize * 2));
    let start = SessionStart {
        input_audio: AudioFormat {
            sample_rate: rate,
            ..AudioFormat::DEFAULT_INPUT
        },
        output_audio: AudioFormat {
            sample_rate: args.output_rate,
            ..AudioFormat::DEFAULT_OUTPUT
        },
        client: Some(atlas_protocol::ClientInfo {
            name: Some("atlas-voice-call".into()),
            version: Some(env!("CARGO_PKG_VERSION").into()),
        }),
        ..SessionStart::default()
    };
    let mut session = VoiceSession::start(
        ConnectOptions::new(&args.url, &args.token),
        start,
        ReconnectPolicy::default(),
        Duration::from_secs(15),
    )
    .await
    .with_context(|| format!("cannot connect to {}", args.url))?;
    // Stream at real-time pace, 100 ms chunks, in the background.
    let chunk = (rate / 10) as usize;
    let (audio_tx, mut audio_rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let feeder = tokio::spawn(async move {
        let began = tokio::time::Instant::now();
        for (i, c) in samples.chunks(chunk).enumerate() {
            tokio::time::sleep_until(began + Duration::from_millis(100 * (i as u64 + 1))).await;
            let mut bytes: Vec<u8> = c.iter().flat_map(|s| s.to_le_bytes()).collect();
            bytes.resize(bytes.len().max(100), 0);
            if audio_tx.send(Bytes::from(bytes)).await.is_err() {
                break;
            }
        }
    });
    let mut audio: Vec<i16> = Vec::new();
    let mut reply = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let outcome = loop {
        let event = tokio::select! {
            Some(pcm) = audio_rx.recv() => {
                let _ = session.audio(pcm).await;
                continue;
            }
            e = tokio::time::timeout_at(deadline, session.events.recv()) => e,
        };
        let event = match event {
            Err(_) => {
                break Err(anyhow::anyhow!(
                    "no complete reply within {} s",
                    args.timeout_s
                ));
            }
            Ok(None) => break Err(anyhow::anyhow!("the session ended")),
            Ok(Some(e)) => e,
        };
        match event {
            VoiceEvent::Audio(pcm) => {
                audio.extend(
                    pcm.chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]])),
                );
            }
            VoiceEvent::Reconnecting { attempt, delay } => {
                eprintln!(
                    "connection lost; reconnecting (attempt {attempt}) in {} s",
                    delay.as_secs()
                );
            }
            VoiceEvent::GaveUp { attempts, error } => {
                break Err(anyhow::anyhow!(
                    "gave up after {attempts} reconnection attempts: {error}"
                ));
            }
            VoiceEvent::Ended { code, reason } => {
                break Err(anyhow::anyhow!(
                    "the server ended the session ({code:?} {reason})"
                ));
            }
            VoiceEvent::Server(event) => {
                if args.json {
                    use std::io::Write as _;
                    // A closed pipe (`| head`) ends the output quietly.
                    if writeln!(std::io::stdout().lock(), "{}", event.to_json()).is_err() {
                        break Ok(());
                    }
                }
                match event {
                    ServerEvent::TranscriptFinal { text, .. } if !args.json => {
                        println!("you:       {text}")
                    }
                    ServerEvent::ResponseTextDelta { text, .. } => reply.push_str(&text),
                    ServerEvent::ToolCall { call_id, name, .. } => {
                        let answer = tools.answer(&name);
                        if !args.json {
                            println!("tool:      {name} → {answer:?}");
                        }
                        let _ = session.tool_result(call_id, answer).await;
                    }
                    ServerEvent::Error {
                        code,
                        message,
                        fatal,
                    } if !args.json => {
                        eprintln!(
                            "error {}: {message}{}",
                            code.as_str(),
                            if fatal { " (fatal)" } else { "" }
                        );
                    }
                    ServerEvent::ResponseDone { latency_ms, .. } => {
                        if !args.json {
                            println!("assistant: {reply}");
                            println!("latency:   {latency_ms:?}");
                        }
                        break Ok(());
                    }
                    _ => {}
                }
            }
        }
    };
    feeder.abort();
    let _ = session.send(ClientMessage::SessionEnd).await;
    wav::write(&args.output, &audio, args.output_rate)?;
    if !args.json {
        println!(
            "wrote {:.2} s of reply audio to {}",
            audio.len() as f64 / f64::from(args.output_rate),
            args.output.display()
        );
    }
    outcome
}
