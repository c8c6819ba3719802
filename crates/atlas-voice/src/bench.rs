//! `atlas-voice loadtest`: sessions that speak a question at real-time pace and measure the
//! time from the end of their speech to the first reply audio.
//!
//! With `--spawn` the provider fakes and the server run in this process on loopback ports,
//! wired together, with the fakes' latencies from the command line; otherwise `--url` and a
//! token point at a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tokio::time::Instant;

use futures_util::{SinkExt, StreamExt};

use atlas_client::{ConnectOptions, Incoming, WsMessage, connect, open_socket, speech_end, wav};
use atlas_fakes::Fakes;
use atlas_protocol::{
    AudioFormat, ClientMessage, LatencyBreakdown, ServerEvent, SessionStart, parse_server_event,
};
use atlas_server::config::Config;
use atlas_server::{Application, auth};

use crate::{FakeLatencies, dev_or_configured_secret, wire_fakes};

/// Arguments of `loadtest`.
#[derive(Args)]
pub struct LoadtestArgs {
    /// Start the fakes and a server in this process and measure against them.
    #[arg(long)]
    spawn: bool,
    /// Voice endpoint of a running server (without --spawn).
    #[arg(long)]
    url: Option<String>,
    /// Access token for a running server (without --spawn).
    #[arg(long, env = "ATLAS_TOKEN")]
    token: Option<String>,
    /// Concurrent sessions.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Questions asked one after another by each session.
    #[arg(long, default_value_t = 1)]
    turns: usize,
    /// Delay between session starts, ms.
    #[arg(long, default_value_t = 50)]
    ramp_ms: u64,
    /// The question (16-bit PCM WAV at 8, 16, 24 or 48 kHz).
    #[arg(long, default_value = "tests/audio/question_16k.wav")]
    input: PathBuf,
    /// Audio chunk length sent by each client, ms.
    #[arg(long, default_value_t = 100)]
    chunk_ms: u32,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Soak mode: this many short sessions one after another (connect, start, ping, end),
    /// sampling memory and live sessions as it goes.
    #[arg(long)]
    soak: Option<usize>,
    /// Idle mode: hold this many connected sessions that send no audio, and sample the
    /// server's memory and CPU while they sit there.
    #[arg(long)]
    idle: Option<usize>,
    /// How long idle sessions are held, in seconds.
    #[arg(long, default_value_t = 10)]
    hold_s: u64,
    /// Process id of the server, for its CPU and memory (defaults to this process with
    /// --spawn).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Process id of the provider fakes, for their CPU (to show they are not the bottleneck).
    #[arg(long)]
    fakes_pid: Option<u32>,
    /// Also hold this many slow sockets (request line only, or nothing) against the server
    /// once every session has started, reopening each one the server closes.
    #[arg(long)]
    slowloris: Option<usize>,
    /// The header timeout the server is expected to enforce on the slow sockets, seconds.
    #[arg(long, default_value_t = 10)]
    slowloris_limit_s: u64,
    /// With --spawn: every question makes the model call a webhook tool that answers after
    /// this many ms, so each turn is a tool turn (compare with a run without it).
    #[arg(long)]
    tool_ms: Option<u64>,
    /// With --tool-ms: the tool is instead the `hang` tool (it sleeps the given time) of the
    /// MCP test server (`tests/mcp/test_server.py http PORT`) at this Streamable HTTP URL,
    /// declared as MCP server `load`: every session's calls share its one connection.
    #[arg(long, requires = "tool_ms")]
    mcp_url: Option<String>,
    /// With --spawn: the accounting check. Each session barges in on a spoken reply, cuts a
    /// reply with a typed turn, and a third of them end during a reply; then the fakes' bill
    /// and the sessions' records must agree to the token (exit status 1 when not).
    #[arg(long, requires = "spawn")]
    mix: bool,
    /// With --mix: the server's database (default: an SQLite file in a temporary folder).
    #[arg(long, requires = "mix")]
    database_url: Option<String>,
    #[command(flatten)]
    latencies: FakeLatencies,
    #[command(flatten)]
    phone: crate::phone::PhoneArgs,
}

/// A frame is *late* when it leaves the load generator more than this behind its schedule.
const LATE_FRAME: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Sample {
    /// End of speech → first reply audio at the client.
    voice_to_voice: Vec<Duration>,
    /// End of speech → `transcript.final` at the client.
    to_final: Vec<Duration>,
    /// The server's own latency breakdown of each turn.
    server_reported: Vec<LatencyBreakdown>,
    /// The server's own time waiting for tools, in tool turns.
    tools_reported: Vec<u64>,
    errors: Vec<String>,
    /// How far behind its real-time schedule each audio frame was handed to the socket.
    send_lag: Vec<Duration>,
    /// Reply audio frames received.
    reply_frames: u64,
    /// Reply frames that arrived after the audio before them had finished playing: the
    /// listener hears a gap.
    reply_underruns: u64,
    /// Total length of those gaps.
    reply_gap: Duration,
}

impl Sample {
    fn merge(&mut self, other: Sample) {
        self.voice_to_voice.extend(other.voice_to_voice);
        self.to_final.extend(other.to_final);
        self.server_reported.extend(other.server_reported);
        self.tools_reported.extend(other.tools_reported);
        self.errors.extend(other.errors);
        self.send_lag.extend(other.send_lag);
        self.reply_frames += other.reply_frames;
        self.reply_underruns += other.reply_underruns;
        self.reply_gap += other.reply_gap;
    }
}

/// The question and its silence, cut into the frames a live microphone would send.
struct Frames {
    /// Frame payloads (shared, never copied per session).
    data: Vec<bytes::Bytes>,
    /// When each frame is due, from the start of the stream: when its last sample would have
    /// been captured.
    due: Vec<Duration>,
}

impl Frames {
    fn new(samples: &[i16], rate: u32, chunk_ms: u32) -> Self {
        let per_chunk = (rate * chunk_ms / 1000).max(1) as usize;
        let mut data = Vec::new();
        let mut due = Vec::new();
        let mut sent = 0usize;
        for chunk in samples.chunks(per_chunk) {
            sent += chunk.len();
            let mut bytes = Vec::with_capacity((chunk.len() * 2).max(100));
            for s in chunk {
                bytes.extend_from_slice(&s.to_le_bytes());
            }
            // Pad a short last chunk to the server's minimum frame.
            bytes.resize(bytes.len().max(100), 0);
            data.push(bytes::Bytes::from(bytes));
            due.push(Duration::from_secs_f64(sent as f64 / f64::from(rate)));
        }
        Frames { data, due }
    }
}

/// A webhook that answers every tool call after `delay` (the load test's tool).
async fn start_webhook(delay: Duration) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || async move {
            tokio::time::sleep(delay).await;
            axum::Json(json!({"status": "shipped"}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// Waits until the spawned server's MCP server `load` is up (its tools offered).
async fn wait_for_mcp(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready: serde_json::Value = reqwest::get(format!("http://{addr}/readyz"))
            .await?
            .json()
            .await?;
        if ready["mcp_servers"]["load"]["state"] == "up" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the MCP server did not come up: {ready}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the load test and prints the summary.
pub async fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    let mut _keep = None;
    let mut phone = args.phone.clone();
    if phone.twilio_auth_token.is_empty() {
        // Both ends of a spawned run, or a test deployment configured with the same.
        phone.twilio_auth_token = "atlas-loadtest-twilio-auth-token".into();
    }
    let (url, token) = if args.spawn {
        let mut fakes_config = args.latencies.config();
        if let Some(ms) = args.tool_ms {
            fakes_config.llm.tool_call = Some(match args.mcp_url {
                Some(_) => atlas_fakes::ScriptedCall {
                    name: "load__hang".into(),
                    arguments: json!({"seconds": ms as f64 / 1000.0}).to_string(),
                },
                None => atlas_fakes::ScriptedCall {
                    name: "lookup_order".into(),
                    arguments: r#"{"order_id":"A1"}"#.into(),
                },
            });
        }
        let fakes = Fakes::start(fakes_config, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let mut config = Config::load_unvalidated(None)?;
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        wire_fakes(&mut config, &fakes);
        if let (Some(ms), Some(url)) = (args.tool_ms, &args.mcp_url) {
            config.mcp_servers = vec![atlas_server::config::McpServerConfig {
                allow: vec!["hang".into()],
                timeout_ms: ms + 5_000,
                max_concurrency: 256,
                ..atlas_server::config::McpServerConfig::http("load", url)
            }];
        } else if let Some(ms) = args.tool_ms {
            let hook = start_webhook(Duration::from_millis(ms)).await?;
            config.tools = vec![atlas_server::config::ToolConfig {
                name: "lookup_order".into(),
                description: "Looks up an order by its id.".into(),
                kind: atlas_server::config::ToolRunner::Webhook,
                url: Some(format!("http://{hook}/hook")),
                timeout_ms: ms + 5_000,
                idempotent: true,
                parameters: json!({"type": "object", "properties": {"order_id": {"type": "string"}}}),
            }];
            config.tool_webhook_secret = Some(secrecy::SecretString::from("x".repeat(32)));
        }
        // The check's records go to a database of their own.
        let scratch = args.mix.then(tempfile::tempdir).transpose()?;
        if let Some(dir) = &scratch {
            config.database_url = match &args.database_url {
                Some(url) => url.clone(),
                None => format!("sqlite://{}/records.db", dir.path().display()),
            };
        }
        config.max_sessions_per_user = u32::MAX;
        if phone.twilio {
            config.twilio_auth_token =
                Some(secrecy::SecretString::from(phone.twilio_auth_token.clone()));
            config.twilio_numbers = vec![atlas_server::config::TwilioNumber {
                number: phone.to.clone(),
                user_id: "loadtest".into(),
            }];
        }
        // Every simulated client comes from 127.0.0.1.
        config.connect_rate_per_s = u32::MAX;
        config.connect_burst = u32::MAX;
        if phone.twilio {
            // Twilio connects only to wss:// URLs; the fake Twilio maps the public host to
            // the address it calls.
            config.public_url = Some(phone.public_url.clone());
        }
        let app = Application::build(config.clone()).await?;
        let addr = app.local_addr();
        let stop = app.shutdown_token();
        tokio::spawn(app.run_until_stopped());
        if args.mcp_url.is_some() {
            wait_for_mcp(addr).await?;
        }
        let secret = dev_or_configured_secret(&config)?;
        let user = if args.mix {
            crate::mix::USER
        } else {
            "loadtest"
        };
        let token = auth::mint_token(&secret, user, &config.jwt_audience, "authenticated", 3600)?;
        let url = format!("ws://{addr}/v1/voice");
        if args.mix {
            let result = crate::mix::run(crate::mix::Check {
                url: &url,
                token: &token,
                fakes: &fakes,
                database_url: &config.database_url,
                sessions: args.sessions,
                ramp: Duration::from_millis(args.ramp_ms),
                question: wav::read(&args.input)?,
                json: args.json,
            })
            .await;
            stop.cancel();
            fakes.shutdown().await;
            drop(scratch);
            return result;
        }
        _keep = Some((fakes, stop));
        (url, token)
    } else {
        (
            args.url
                .clone()
                .context("--url is required without --spawn")?,
            args.token
                .clone()
                // A phone call carries no token.
                .or_else(|| phone.twilio.then(String::new))
                .context("--token is required without --spawn")?,
        )
    };
    if phone.twilio {
        let base = http_base(&url);
        let pid = args.server_pid.or(args.spawn.then(std::process::id));
        let result = crate::phone::loadtest(
            &base,
            &phone,
            args.sessions,
            Duration::from_millis(args.ramp_ms),
            &args.input,
            pid,
            args.json,
        )
        .await;
        if let Some((fakes, stop)) = _keep {
            stop.cancel();
            fakes.shutdown().await;
        }
        return result;
    }
    if let Some(n) = args.idle {
        let pid = args.server_pid.or(args.spawn.then(std::process::id));
        let result = idle(&url, &token, n, args.hold_s, pid).await;
        if let Some((fakes, stop)) = _keep {
            stop.cancel();
            fakes.shutdown().await;
        }
        return result;
    }
    if let Some(n) = args.soak {
        let pid = args.server_pid.or(args.spawn.then(std::process::id));
        let result = soak(&url, &token, n, pid, args.json).await;
        if let Some((fakes, stop)) = _keep {
            stop.cancel();
            fakes.shutdown().await;
        }
        return result;
    }
    let (samples, rate) = wav::read(&args.input)?;
    let eos = speech_end(&samples, rate, -40.0).context("the input has no speech")?;
    let mut audio = samples;
    audio.extend(std::iter::repeat_n(0i16, rate as usize * 2));
    let frames = std::sync::Arc::new(Frames::new(&audio, rate, args.chunk_ms));
    let server_pid = args.server_pid.or(args.spawn.then(std::process::id));
    let http_base = http_base(&url);
    let dropped_before = server_counter(&http_base, "atlas_audio_frames_dropped_total").await;
    let cpu_before = server_pid.and_then(cpu_seconds);
    let own_cpu_before = cpu_seconds(std::process::id());
    let fakes_cpu_before = args.fakes_pid.and_then(cpu_seconds);
    let started = Instant::now();
    let slow_stop = tokio_util::sync::CancellationToken::new();
    let slow = match args.slowloris {
        Some(n) => {
            let host = http_base
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_owned();
            let addr = tokio::net::lookup_host(&host)
                .await?
                .next()
                .context("the server's address")?;
            let (stop, limit) = (
                slow_stop.clone(),
                Duration::from_secs(args.slowloris_limit_s),
            );
            let after = Duration::from_millis(args.ramp_ms * args.sessions as u64);
            Some(tokio::spawn(async move {
                tokio::time::sleep(after).await;
                crate::slowloris::run(addr, n, limit, stop).await
            }))
        }
        None => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.sessions {
        let (url, token, frames) = (url.clone(), token.clone(), frames.clone());
        let turns = args.turns;
        let delay = Duration::from_millis(args.ramp_ms * i as u64);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            one_session(&url, &token, &frames, rate, eos, turns).await
        });
    }
    let mut all = Sample::default();
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(s) => all.merge(s),
            Err(e) => all.errors.push(e.to_string()),
        }
    }
    let elapsed = started.elapsed();
    slow_stop.cancel();
    let slow = match slow {
        Some(task) => Some(task.await?),
        None => None,
    };
    let dropped_after = server_counter(&http_base, "atlas_audio_frames_dropped_total").await;
    let resources = Resources {
        server_cpu_s: server_pid
            .and_then(cpu_seconds)
            .zip(cpu_before)
            .map(|(a, b)| a - b),
        rss_kib: server_pid.and_then(rss_kib),
        peak_rss_kib: server_pid.and_then(peak_rss_kib),
        loadgen_cpu_s: cpu_seconds(std::process::id())
            .zip(own_cpu_before)
            .map(|(a, b)| a - b),
        fakes_cpu_s: args
            .fakes_pid
            .and_then(cpu_seconds)
            .zip(fakes_cpu_before)
            .map(|(a, b)| a - b),
        server_dropped_frames: dropped_after.zip(dropped_before).map(|(a, b)| a - b),
    };
    report(&args, &all, elapsed, &resources);
    if let Some(s) = &slow {
        if args.json {
            println!("{}", json!({ "slowloris": s.to_json() }));
        } else {
            println!(
                "slow sockets: {} opened, {} closed by the server (open → closed p50 {} ms, p99 {} ms, max {} ms), {} still open past {} s, {} connect errors",
                s.opened,
                s.closed,
                s.close_p50_ms,
                s.close_p99_ms,
                s.close_max_ms,
                s.open_past_limit,
                args.slowloris_limit_s,
                s.connect_errors
            );
        }
    }
    if let Some((fakes, stop)) = _keep {
        stop.cancel();
        fakes.shutdown().await;
    }
    if all.voice_to_voice.is_empty() {
        anyhow::bail!("no session got a reply");
    }
    Ok(())
}

/// One simulated client: speaks the question `turns` times at real-time pace and times the
/// replies. It drives its socket itself, in one task, so that the load generator's own cost
/// per frame (one timer wake-up and one write) stays far below the server's.
async fn one_session(
    url: &str,
    token: &str,
    frames: &Frames,
    rate: u32,
    eos: Duration,
    turns: usize,
) -> Sample {
    let mut out = Sample::default();
    let mut ws = match open_socket(&ConnectOptions::new(url, token)).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            out.errors.push(e.to_string());
            return out;
        }
    };
    let output = AudioFormat::DEFAULT_OUTPUT;
    let start = ClientMessage::SessionStart(SessionStart {
        input_audio: AudioFormat {
            sample_rate: rate,
            ..AudioFormat::DEFAULT_INPUT
        },
        output_audio: output,
        ..SessionStart::default()
    });
    if let Err(e) = ws.send(WsMessage::text(json_text(&start))).await {
        out.errors.push(e.to_string());
        return out;
    }
    let output_bytes_per_s = f64::from(output.sample_rate) * 2.0;
    let next_frame = tokio::time::sleep(Duration::ZERO);
    let give_up = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(next_frame, give_up);
    for _ in 0..turns {
        let began = Instant::now();
        let mut next = 0;
        next_frame.as_mut().reset(began + frames.due[0]);
        give_up.as_mut().reset(began + Duration::from_secs(60));
        let mut final_at = None;
        let mut first_audio = None;
        let mut playback = Playback::default();
        let mut done = false;
        enum Step {
            Send,
            Received(Option<Result<WsMessage, atlas_client::WsError>>),
            GiveUp,
        }
        while !done || next < frames.data.len() {
            let step = tokio::select! {
                _ = &mut next_frame, if next < frames.data.len() => Step::Send,
                m = ws.next() => Step::Received(m),
                _ = &mut give_up => Step::GiveUp,
            };
            match step {
                Step::Send => {
                    let due = began + frames.due[next];
                    out.send_lag
                        .push(Instant::now().saturating_duration_since(due));
                    if let Err(e) = ws.send(WsMessage::Binary(frames.data[next].clone())).await {
                        out.errors.push(format!("sending audio: {e}"));
                        return out;
                    }
                    next += 1;
                    if let Some(d) = frames.due.get(next) {
                        next_frame.as_mut().reset(began + *d);
                    }
                }
                Step::Received(Some(Ok(WsMessage::Binary(pcm)))) => {
                    let at = Instant::now();
                    let length = Duration::from_secs_f64(pcm.len() as f64 / output_bytes_per_s);
                    first_audio.get_or_insert(at);
                    out.reply_frames += 1;
                    if let Some(gap) = playback.arrive(at, length) {
                        out.reply_underruns += 1;
                        out.reply_gap += gap;
                    }
                }
                Step::Received(Some(Ok(WsMessage::Text(text)))) => {
                    match parse_server_event(text.as_str()) {
                        Ok(ServerEvent::TranscriptFinal { .. }) => {
                            final_at.get_or_insert(Instant::now());
                        }
                        Ok(ServerEvent::ResponseDone { latency_ms, .. }) => {
                            out.tools_reported.extend(latency_ms.tools);
                            out.server_reported.push(latency_ms);
                            done = true;
                        }
                        Ok(ServerEvent::Error {
                            code, fatal: true, ..
                        }) => {
                            out.errors.push(format!("fatal error {}", code.as_str()));
                            return out;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            out.errors.push(format!("unparseable event: {e}"));
                            return out;
                        }
                    }
                }
                Step::Received(Some(Ok(WsMessage::Close(frame)))) => {
                    out.errors.push(format!("closed {frame:?}"));
                    return out;
                }
                // Pings are answered by the WebSocket layer.
                Step::Received(Some(Ok(_))) => {}
                Step::Received(Some(Err(e))) => {
                    out.errors.push(format!("connection failed: {e}"));
                    return out;
                }
                Step::Received(None) => {
                    out.errors.push("connection ended".into());
                    return out;
                }
                Step::GiveUp => {
                    out.errors.push("no reply within 60 s".into());
                    return out;
                }
            }
        }
        if let Some(first) = first_audio {
            out.voice_to_voice
                .push(first.saturating_duration_since(began + eos));
        }
        if let Some(f) = final_at {
            out.to_final.push(f.saturating_duration_since(began + eos));
        }
    }
    let _ = ws
        .send(WsMessage::text(json_text(&ClientMessage::SessionEnd)))
        .await;
    let _ = ws.close(None).await;
    out
}

/// A listener's playback of reply audio: it starts with the first frame and plays each frame
/// right after the one before, as long as frames arrive in time.
#[derive(Default)]
struct Playback {
    /// When the audio received so far will have finished playing.
    until: Option<Instant>,
}

impl Playback {
    /// A frame of `length` arrived at `at`; returns the silence the listener heard before it
    /// when the audio before it had already run out (more than 1 ms earlier).
    fn arrive(&mut self, at: Instant, length: Duration) -> Option<Duration> {
        let (start, gap) = match self.until {
            Some(end) if at > end + Duration::from_millis(1) => (at, Some(at - end)),
            Some(end) => (end.max(at), None),
            None => (at, None),
        };
        self.until = Some(start + length);
        gap
    }
}

fn json_text(msg: &ClientMessage) -> String {
    serde_json::to_string(msg).expect("client messages serialise")
}

/// `http://host:port` of a voice endpoint URL (for /metrics and /dev/token).
pub(crate) fn http_base(url: &str) -> String {
    url.replacen("ws://", "http://", 1)
        .replacen("wss://", "https://", 1)
        .split('?')
        .next()
        .unwrap_or_default()
        .trim_end_matches(atlas_protocol::VOICE_PATH)
        .trim_end_matches('/')
        .to_owned()
}

/// A counter from the server's /metrics (summed over its label sets); `None` when the page
/// cannot be read, 0 when the counter has not been touched yet.
async fn server_counter(http_base: &str, name: &str) -> Option<f64> {
    let body = reqwest::get(format!("{http_base}/metrics"))
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    Some(counter_value(&body, name))
}

/// The sum of `name` over its label sets in a Prometheus text page.
fn counter_value(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Resource use over the run.
struct Resources {
    server_cpu_s: Option<f64>,
    rss_kib: Option<u64>,
    peak_rss_kib: Option<u64>,
    /// This process (with --spawn it holds the server and the fakes too).
    loadgen_cpu_s: Option<f64>,
    fakes_cpu_s: Option<f64>,
    /// Input frames the server dropped (from its /metrics).
    server_dropped_frames: Option<f64>,
}

/// User + system CPU seconds of `pid`, from /proc.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Peak resident memory of `pid` in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// One stage of the server's latency breakdown.
type StageOf = fn(&LatencyBreakdown) -> Option<u64>;

fn report(args: &LoadtestArgs, s: &Sample, elapsed: Duration, r: &Resources) {
    let mut v = s.voice_to_voice.clone();
    v.sort();
    // A tool turn adds the tool's own time and one more model request.
    let tool_floor = args
        .tool_ms
        .map_or(0, |t| t + args.latencies.llm_first_token_ms);
    let floor = Duration::from_millis(
        args.latencies.stt_final_ms
            + args.latencies.llm_first_token_ms
            + args.latencies.tts_first_byte_ms
            + tool_floor,
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (p50, p95, p99) = (
        percentile(&v, 0.5),
        percentile(&v, 0.95),
        percentile(&v, 0.99),
    );
    let max = v.last().copied().unwrap_or_default();
    let overhead = |d: Duration| ms(d) - ms(floor);
    let mut finals = s.to_final.clone();
    finals.sort();
    // The server's own view of each stage: where a tail comes from.
    let stages: [(&str, StageOf); 4] = [
        ("end_of_speech_to_final", |l| l.end_of_speech_to_final),
        ("llm_first_token", |l| l.llm_first_token),
        ("tts_first_audio", |l| l.tts_first_audio),
        ("to_first_audio", |l| l.to_first_audio),
    ];
    let stages = stages.map(|(name, field)| {
        let mut v: Vec<u64> = s.server_reported.iter().filter_map(field).collect();
        v.sort_unstable();
        let at = |p: f64| v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)));
        (
            name,
            at(0.5).copied().unwrap_or(0),
            at(0.99).copied().unwrap_or(0),
        )
    });
    let server_p50 = stages[3].1;
    let mut tools = s.tools_reported.clone();
    tools.sort();
    let tools_p50 = tools.get(tools.len() / 2).copied();
    let mut lag = s.send_lag.clone();
    lag.sort();
    let late = lag.iter().filter(|l| **l > LATE_FRAME).count();
    let lag_max = lag.last().copied().unwrap_or_default();
    let per_session = r.rss_kib.map(|x| x / args.sessions.max(1) as u64);
    if args.json {
        let out = json!({
            "sessions": args.sessions, "turns": args.turns, "chunk_ms": args.chunk_ms,
            "replies": v.len(), "errors": s.errors.len(),
            "fakes_floor_ms": ms(floor),
            "voice_to_voice_ms": {"p50": ms(p50), "p95": ms(p95), "p99": ms(p99), "max": ms(max)},
            "overhead_ms": {"p50": overhead(p50), "p95": overhead(p95), "p99": overhead(p99)},
            "end_of_speech_to_final_ms": {"p50": ms(percentile(&finals, 0.5)), "p99": ms(percentile(&finals, 0.99))},
            "server_reported_to_first_audio_ms_p50": server_p50,
            "server_reported_ms": stages
                .iter()
                .map(|(name, p50, p99)| (name.to_string(), json!({"p50": p50, "p99": p99})))
                .collect::<serde_json::Map<_, _>>(),
            "tool_turns": tools.len(),
            "server_reported_tools_ms_p50": tools_p50,
            "frames_sent": lag.len(),
            "send_lag_ms": {"p50": ms(percentile(&lag, 0.5)), "p99": ms(percentile(&lag, 0.99)), "max": ms(lag_max)},
            "late_frames": late,
            "late_frame_threshold_ms": ms(LATE_FRAME),
            "server_dropped_frames": r.server_dropped_frames,
            "reply_frames": s.reply_frames,
            "reply_underruns": s.reply_underruns,
            "reply_gap_ms": ms(s.reply_gap),
            "elapsed_s": elapsed.as_secs_f64(),
            "server_cpu_s": r.server_cpu_s,
            "server_rss_kib": r.rss_kib,
            "server_peak_rss_kib": r.peak_rss_kib,
            "loadgen_cpu_s": r.loadgen_cpu_s,
            "fakes_cpu_s": r.fakes_cpu_s,
        });
        println!("{out}");
        return;
    }
    println!(
        "sessions {} × turns {} (chunk {} ms): {} replies, {} errors in {:.1} s",
        args.sessions,
        args.turns,
        args.chunk_ms,
        v.len(),
        s.errors.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "end of speech → first reply audio: p50 {:.0} ms  p95 {:.0} ms  p99 {:.0} ms  max {:.0} ms",
        ms(p50),
        ms(p95),
        ms(p99),
        ms(max)
    );
    println!(
        "fakes' floor {:.0} ms → overhead p50 {:+.0} ms  p95 {:+.0} ms  p99 {:+.0} ms",
        ms(floor),
        overhead(p50),
        overhead(p95),
        overhead(p99)
    );
    println!(
        "end of speech → transcript.final: p50 {:.0} ms; server-reported to_first_audio p50 {server_p50} ms",
        ms(percentile(&finals, 0.5))
    );
    println!(
        "server-reported stages p50 / p99: {}",
        stages
            .iter()
            .map(|(name, p50, p99)| format!("{name} {p50} / {p99} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(t) = tools_p50 {
        println!(
            "tool turns: {} (the fakes' floor includes the tool's {} ms and one more model request); server-reported tool wait p50 {t} ms",
            tools.len(),
            args.tool_ms.unwrap_or(0)
        );
    }
    println!(
        "audio in: {} frames, send lag p50 {:.1} ms p99 {:.1} ms max {:.1} ms, {late} late (> {:.0} ms); dropped by the server: {}",
        lag.len(),
        ms(percentile(&lag, 0.5)),
        ms(percentile(&lag, 0.99)),
        ms(lag_max),
        ms(LATE_FRAME),
        r.server_dropped_frames
            .map(|d| format!("{d:.0}"))
            .unwrap_or_else(|| "unknown (no /metrics)".into()),
    );
    println!(
        "audio out: {} reply frames, {} underruns (gaps totalling {:.0} ms)",
        s.reply_frames,
        s.reply_underruns,
        ms(s.reply_gap)
    );
    let secs = elapsed.as_secs_f64();
    if let Some(cpu) = r.server_cpu_s {
        println!(
            "server: {cpu:.2} CPU s ({:.2} cores over the run), rss {} KiB (peak {} KiB, {} KiB per session)",
            cpu / secs,
            r.rss_kib.unwrap_or(0),
            r.peak_rss_kib.unwrap_or(0),
            per_session.unwrap_or(0)
        );
    }
    if let Some(cpu) = r.loadgen_cpu_s {
        println!(
            "load generator: {cpu:.2} CPU s ({:.2} cores){}",
            cpu / secs,
            if args.spawn {
                " — includes the server and the fakes (--spawn)"
            } else {
                ""
            }
        );
    }
    if let Some(cpu) = r.fakes_cpu_s {
        println!("fakes: {cpu:.2} CPU s ({:.2} cores)", cpu / secs);
    }
    for e in s.errors.iter().take(5) {
        println!("error: {e}");
    }
}

/// Resident memory of `pid` in KiB, from /proc.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `atlas_sessions_active` from the server's /metrics.
async fn live_sessions(http_base: &str) -> Option<f64> {
    let body = reqwest::get(format!("{http_base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines()
        .find(|l| l.starts_with("atlas_sessions_active "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

async fn soak(
    url: &str,
    token: &str,
    n: usize,
    pid: Option<u32>,
    json: bool,
) -> anyhow::Result<()> {
    let http_base = http_base(url);
    let started = Instant::now();
    let mut samples: Vec<(usize, Option<u64>, Option<f64>)> = Vec::new();
    let mut errors = 0usize;
    let every = (n / 10).max(1);
    for i in 0..n {
        if let Err(e) = short_session(url, token).await {
            errors += 1;
            if errors <= 3 {
                eprintln!("session {i}: {e}");
            }
        }
        if (i + 1) % every == 0 || i + 1 == n {
            // Let the server finish closing the last session before sampling.
            tokio::time::sleep(Duration::from_millis(50)).await;
            samples.push((
                i + 1,
                pid.and_then(rss_kib),
                live_sessions(&http_base).await,
            ));
        }
    }
    let elapsed = started.elapsed();
    let first_rss = samples.iter().find_map(|s| s.1);
    let last_rss = samples.last().and_then(|s| s.1);
    if json {
        let rows: Vec<_> = samples
            .iter()
            .map(|(k, rss, live)| json!({"sessions": k, "rss_kib": rss, "live_sessions": live}))
            .collect();
        println!(
            "{}",
            json!({"soak_sessions": n, "errors": errors, "elapsed_s": elapsed.as_secs_f64(), "samples": rows})
        );
    } else {
        println!(
            "soak: {n} sequential sessions, {errors} errors, {:.1} s ({:.2} ms per session)",
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1000.0 / n as f64
        );
        for (k, rss, live) in &samples {
            println!(
                "  after {k:>6}: rss {:>8} KiB, live sessions {}",
                rss.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
                live.map(|l| l.to_string()).unwrap_or_else(|| "?".into())
            );
        }
        if let (Some(a), Some(b)) = (first_rss, last_rss) {
            println!(
                "  rss change from the first to the last sample: {:+} KiB",
                b as i64 - a as i64
            );
        }
    }
    if errors > 0 {
        anyhow::bail!("{errors} sessions failed");
    }
    Ok(())
}

async fn short_session(url: &str, token: &str) -> anyhow::Result<()> {
    let mut conn = connect(&ConnectOptions::new(url, token)).await?;
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart::default()))
        .await?;
    conn.sender.send(&ClientMessage::Ping { id: None }).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut ended = false;
    loop {
        match tokio::time::timeout_at(deadline, conn.incoming.recv()).await {
            Err(_) => anyhow::bail!("timed out"),
            Ok(None) => anyhow::bail!("connection ended early"),
            Ok(Some(Incoming::Event {
                event: ServerEvent::Pong { .. },
                ..
            })) if !ended => {
                conn.sender.send(&ClientMessage::SessionEnd).await?;
                ended = true;
            }
            Ok(Some(Incoming::Closed {
                code: Some(1000), ..
            })) if ended => return Ok(()),
            Ok(Some(Incoming::Closed { code, reason, .. })) => {
                anyhow::bail!("closed {code:?} {reason}")
            }
            Ok(Some(_)) => {}
        }
    }
}

async fn open_idle(url: String, token: String) -> anyhow::Result<atlas_client::Connection> {
    let mut conn = connect(&ConnectOptions::new(url, token)).await?;
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart::default()))
        .await?;
    loop {
        match tokio::time::timeout(Duration::from_secs(20), conn.incoming.recv()).await {
            Ok(Some(Incoming::Event {
                event: ServerEvent::SessionStarted { .. },
                ..
            })) => return Ok(conn),
            Ok(Some(Incoming::Closed { code, reason, .. })) => {
                anyhow::bail!("closed {code:?} {reason}")
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => anyhow::bail!("no session.started"),
        }
    }
}

async fn idle(
    url: &str,
    token: &str,
    n: usize,
    hold_s: u64,
    pid: Option<u32>,
) -> anyhow::Result<()> {
    let rss_before = pid.and_then(rss_kib);
    let began = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut errors = 0usize;
    // Open in batches so the accept queue is never flooded.
    for batch in (0..n).collect::<Vec<_>>().chunks(250) {
        let mut set = tokio::task::JoinSet::new();
        for _ in batch {
            set.spawn(open_idle(url.to_owned(), token.to_owned()));
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(c)) => conns.push(c),
                Ok(Err(e)) => {
                    errors += 1;
                    if errors <= 3 {
                        eprintln!("session failed: {e}");
                    }
                }
                Err(e) => {
                    errors += 1;
                    eprintln!("task failed: {e}");
                }
            }
        }
    }
    let opened_in = began.elapsed();
    let cpu_before = pid.and_then(cpu_seconds);
    let rss_open = pid.and_then(rss_kib);
    tokio::time::sleep(Duration::from_secs(hold_s)).await;
    let cpu_idle = pid
        .and_then(cpu_seconds)
        .zip(cpu_before)
        .map(|(a, b)| a - b);
    let rss_held = pid.and_then(rss_kib);
    let open_now = conns.len();
    for c in &conns {
        let _ = c.sender.send(&ClientMessage::SessionEnd).await;
    }
    drop(conns);
    println!(
        "idle: {open_now} of {n} sessions open ({errors} failed) in {:.1} s, held {hold_s} s",
        opened_in.as_secs_f64()
    );
    if let (Some(before), Some(held)) = (rss_before, rss_held) {
        println!(
            "server rss: {before} KiB before, {} KiB open, {held} KiB after holding: {:.1} KiB per idle session",
            rss_open.unwrap_or(0),
            (held.saturating_sub(before)) as f64 / open_now.max(1) as f64
        );
    }
    if let Some(cpu) = cpu_idle {
        println!(
            "server cpu while idle: {cpu:.2} s over {hold_s} s ({:.3} cores)",
            cpu / hold_s.max(1) as f64
        );
    }
    if errors > 0 {
        anyhow::bail!("{errors} sessions failed to open");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn playback_counts_the_gaps_a_listener_hears() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Playback::default();
        // Three 100 ms frames at once, then one just in time: no gap.
        assert_eq!(p.arrive(t0, ms(100)), None);
        assert_eq!(p.arrive(t0, ms(100)), None);
        assert_eq!(p.arrive(t0, ms(100)), None);
        assert_eq!(p.arrive(t0 + ms(300), ms(100)), None);
        // The next one is 50 ms late: the listener heard 50 ms of silence.
        assert_eq!(p.arrive(t0 + ms(450), ms(100)), Some(ms(50)));
        // Playback resumed with it, so a frame at its end is on time again.
        assert_eq!(p.arrive(t0 + ms(550), ms(100)), None);
    }

    #[test]
    fn frames_follow_the_microphone_and_meet_the_minimum_size() {
        let samples = vec![1i16; 16_000 + 100];
        let f = Frames::new(&samples, 16_000, 20);
        assert_eq!(f.data.len(), 51);
        assert_eq!(f.data[0].len(), 640);
        assert_eq!(f.due[0], Duration::from_millis(20));
        // The short last chunk (100 samples) is due when its last sample is captured, and a
        // chunk below the server's 100-byte minimum is padded.
        assert_eq!(f.data[50].len(), 200);
        assert_eq!(f.due[50], Duration::from_secs_f64(16_100.0 / 16_000.0));
        let tiny = Frames::new(&[1i16; 10], 16_000, 20);
        assert_eq!(tiny.data[0].len(), 100);
    }

    #[test]
    fn metrics_page_and_endpoint_parsing() {
        let page = "# TYPE atlas_audio_frames_dropped_total counter\n\
                    atlas_audio_frames_dropped_total 7\n\
                    atlas_audio_frames_dropped_total_other 100\n\
                    atlas_turns_total{outcome=\"completed\"} 3\n\
                    atlas_turns_total{outcome=\"failed\"} 2\n";
        assert_eq!(counter_value(page, "atlas_audio_frames_dropped_total"), 7.0);
        assert_eq!(counter_value(page, "atlas_turns_total"), 5.0);
        assert_eq!(counter_value(page, "atlas_missing_total"), 0.0);
        assert_eq!(
            http_base("ws://127.0.0.1:8080/v1/voice?x=1"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            http_base("wss://voice.example/v1/voice"),
            "https://voice.example"
        );
    }
}
