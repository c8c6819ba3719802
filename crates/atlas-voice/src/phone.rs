//! Phone calls against a server, placed by the fake Twilio (`atlas_fakes::twilio`): one call
//! (`atlas-voice call --twilio`) or many at once (`atlas-voice loadtest --twilio`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde_json::json;

use atlas_client::wav;
use atlas_core::resample::StreamResampler;
use atlas_fakes::twilio::{CallConfig, CallReport, place_call};

/// How calls reach the server.
#[derive(Args, Clone, Debug)]
pub struct PhoneArgs {
    /// Place phone calls through the fake Twilio instead of WebSocket sessions; `--url` is
    /// then the server's HTTP base (`http://127.0.0.1:8080`).
    #[arg(long)]
    pub twilio: bool,
    /// The public base URL the server is configured with (`ATLAS_PUBLIC_URL`): webhooks are
    /// signed over it, and the fake Twilio maps its host to `--url`'s.
    #[arg(long, default_value = "https://voice.example.com")]
    pub public_url: String,
    /// The auth token the server is configured with.
    #[arg(long, env = "ATLAS_TWILIO_AUTH_TOKEN", default_value = "")]
    pub twilio_auth_token: String,
    /// The number called (one of the server's `[[twilio_numbers]]`).
    #[arg(long, default_value = "+12025550199")]
    pub to: String,
}

/// The caller's speech at 8 kHz, from a WAV file at any rate.
pub fn speech_8k(path: &Path) -> anyhow::Result<Vec<i16>> {
    let (samples, rate) = wav::read(path)?;
    if rate == 8_000 {
        return Ok(samples);
    }
    let mut resampler = StreamResampler::new(rate, 8_000)?;
    let mut out = Vec::new();
    resampler.process(&samples, &mut out);
    resampler.flush(&mut out);
    Ok(out)
}

fn config(base: &str, phone: &PhoneArgs, audio: Vec<i16>) -> CallConfig {
    let mut cfg = CallConfig::new(base, &phone.public_url, &phone.twilio_auth_token);
    cfg.to = phone.to.clone();
    cfg.audio = audio;
    cfg
}

/// One call: speaks `input`, writes what the caller heard to `output`.
pub async fn call(
    base: &str,
    phone: &PhoneArgs,
    input: &Path,
    output: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut cfg = config(base, phone, speech_8k(input)?);
    cfg.trailing_silence = Duration::from_secs(8).min(timeout);
    cfg.time_limit = timeout;
    let report = place_call(cfg).await?;
    if let Some(said) = &report.refused {
        println!("refused: {said}");
        return Ok(());
    }
    report.write_heard_wav(output)?;
    println!(
        "call {}: heard {:.1} s ({} media messages, {} marks echoed, {} clears), first audio {} after the caller stopped; {:?}",
        report.call_sid,
        report.heard_duration().as_secs_f64(),
        report.media_messages,
        report.marks_sent_back.len(),
        report.clears,
        report
            .first_audio_after_speech_end
            .map_or("never".into(), |d| format!("{} ms", d.as_millis())),
        report.ended,
    );
    for e in &report.protocol_errors {
        println!("protocol error: {e}");
    }
    println!("wrote {}", output.display());
    Ok(())
}

/// Many calls at once: each speaks `input` once and hangs up after the answer; reports the
/// latency from the end of the caller's speech to the first audio back, failures, and the
/// server's CPU per call-minute.
pub async fn loadtest(
    base: &str,
    phone: &PhoneArgs,
    calls: usize,
    ramp: Duration,
    input: &Path,
    server_pid: Option<u32>,
    json_out: bool,
) -> anyhow::Result<()> {
    let audio = speech_8k(input)?;
    // As for WebSocket sessions: from the moment the last speech sample left the caller's
    // phone to the first reply audio playing.
    let eos = atlas_client::speech_end(&audio, 8_000, -40.0).context("the input has no speech")?;
    let started = Instant::now();
    let cpu_before = server_pid.and_then(crate::bench::cpu_seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..calls {
        let mut cfg = config(base, phone, audio.clone());
        cfg.trailing_silence = Duration::from_secs(6);
        cfg.time_limit = Duration::from_secs(60);
        let delay = ramp * i as u32;
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            place_call(cfg).await
        });
    }
    let mut reports: Vec<CallReport> = Vec::new();
    let mut failed = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.context("call task")? {
            Ok(report) if report.refused.is_none() => reports.push(report),
            Ok(report) => failed.push(format!("refused: {:?}", report.refused)),
            Err(e) => failed.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed();
    let server_cpu = match (cpu_before, server_pid.and_then(crate::bench::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut latency: Vec<Duration> = reports
        .iter()
        .filter_map(|r| r.played.first().map(|s| s.start.saturating_sub(eos)))
        .collect();
    latency.sort();
    let unanswered = reports.len() - latency.len();
    let call_minutes: f64 = reports
        .iter()
        .map(|r| r.played.last().map_or(0.0, |s| s.end.as_secs_f64()))
        .sum::<f64>()
        / 60.0;
    let p = |q: f64| crate::bench::percentile(&latency, q).as_millis() as u64;
    let errors: usize = reports.iter().map(|r| r.protocol_errors.len()).sum();
    let cpu_per_min = server_cpu.map(|c| c / call_minutes.max(f64::EPSILON));
    if json_out {
        println!(
            "{}",
            json!({
                "calls": calls,
                "answered": latency.len(),
                "unanswered": unanswered,
                "failed": failed.len(),
                "protocol_errors": errors,
                "first_audio_ms": {"p50": p(0.5), "p95": p(0.95), "p99": p(0.99)},
                "server_cpu_s": server_cpu,
                "call_minutes": call_minutes,
                "server_cpu_s_per_call_minute": cpu_per_min,
                "elapsed_s": elapsed.as_secs_f64(),
            })
        );
    } else {
        println!(
            "{calls} calls: {} answered, {unanswered} unanswered, {} failed, {errors} protocol errors",
            latency.len(),
            failed.len()
        );
        println!(
            "end of speech → first audio: p50 {} ms, p95 {} ms, p99 {} ms",
            p(0.5),
            p(0.95),
            p(0.99)
        );
        if let (Some(cpu), Some(per)) = (server_cpu, cpu_per_min) {
            println!(
                "server CPU {cpu:.2} s over {call_minutes:.1} call-minutes: {per:.3} s per call-minute"
            );
        }
        for f in failed.iter().take(5) {
            println!("failed: {f}");
        }
    }
    if !failed.is_empty() || unanswered > 0 {
        anyhow::bail!("{} calls failed, {unanswered} unanswered", failed.len());
    }
    Ok(())
}
