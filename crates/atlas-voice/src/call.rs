//! `atlas-voice call`: stream a WAV file to a server and save the spoken reply.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use atlas_client::{ConnectOptions, Incoming, connect, stream_pcm, wav};
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
    /// WAV file with the question (16-bit PCM).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the reply audio.
    #[arg(long, default_value = "reply.wav")]
    output: PathBuf,
    /// Sample rate of the reply audio.
    #[arg(long, default_value_t = 24_000)]
    output_rate: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Print every event as a JSON line.
    #[arg(long)]
    json: bool,
}

/// Runs one question-and-answer exchange.
pub async fn run(args: CallArgs) -> anyhow::Result<()> {
    let (mut samples, mut rate) = wav::read(&args.input)?;
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
    let mut conn = connect(&ConnectOptions::new(&args.url, &args.token))
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart {
            input_audio: AudioFormat {
                sample_rate: rate,
                ..AudioFormat::DEFAULT_INPUT
            },
            output_audio: AudioFormat {
                sample_rate: args.output_rate,
                ..AudioFormat::DEFAULT_OUTPUT
            },
            ..SessionStart::default()
        }))
        .await?;
    let sender = conn.sender.clone();
    let streaming =
        tokio::spawn(async move { stream_pcm(&sender, &samples, rate, 100, 1.0).await });
    let mut audio: Vec<i16> = Vec::new();
    let mut reply = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let outcome = loop {
        let item = match tokio::time::timeout_at(deadline, conn.incoming.recv()).await {
            Err(_) => {
                break Err(anyhow::anyhow!(
                    "no complete reply within {} s",
                    args.timeout_s
                ));
            }
            Ok(None) => break Err(anyhow::anyhow!("connection ended")),
            Ok(Some(item)) => item,
        };
        match item {
            Incoming::Audio { pcm, .. } => {
                audio.extend(
                    pcm.chunks_exact(2)
                        .map(|b| i16::from_le_bytes([b[0], b[1]])),
                );
            }
            Incoming::Closed { code, reason, .. } => {
                break Err(anyhow::anyhow!(
                    "server closed the connection ({code:?} {reason})"
                ));
            }
            Incoming::Event { event, .. } => {
                if args.json {
                    println!("{}", event.to_json());
                }
                match event {
                    ServerEvent::TranscriptFinal { text, .. } if !args.json => {
                        println!("you:       {text}")
                    }
                    ServerEvent::ResponseTextDelta { text, .. } => reply.push_str(&text),
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
    streaming.abort();
    let _ = conn.sender.send(&ClientMessage::SessionEnd).await;
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
