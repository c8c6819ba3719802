//! The `atlas-voice` binary: `serve`, `fakes`, `call`, `token`, `loadtest`, `eval`, `db`,
//! `models`, `llm-server` and `healthcheck`.

mod bench;
mod call;
mod db;
mod eval;
mod health;
mod llm_server;
mod mix;
mod models;
mod phone;
mod slowloris;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use tracing_subscriber::EnvFilter;

use atlas_fakes::{Fakes, FakesConfig};
use atlas_server::config::{Config, DEV_JWT_SECRET, LogFormat};
use atlas_server::{Application, auth};

/// mimalloc instead of the system allocator: under load the server allocates and frees small
/// buffers for every frame on two worker threads, where glibc's per-thread arenas spent
/// measurable time in locking and in growing their heaps (see docs/benchmarks.md). Transparent
/// huge pages are turned off for the process in `main` (see there).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "atlas-voice",
    version,
    about = "Real-time voice conversation server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Run fake Deepgram, Anthropic and OpenAI servers for development and tests.
    Fakes(FakesArgs),
    /// Talk to a server: stream a WAV file, save the reply audio.
    Call(call::CallArgs),
    /// Mint a development access token from the configured HS256 secret.
    Token(TokenArgs),
    /// Measure latency: sessions that speak and wait for the first reply audio.
    Loadtest(bench::LoadtestArgs),
    /// Evaluate a running server with spoken prompts: word error rate, answer correctness,
    /// complete sentences and latency.
    Eval(eval::EvalArgs),
    /// Database migrations: new, list, status, up, diff, lint.
    Db(db::DbArgs),
    /// Local engines' models: fetch, verify, list.
    Models(models::ModelsArgs),
    /// Serve a GGUF chat model (a stronger one than the default, say) at an OpenAI-compatible
    /// endpoint, for `ATLAS_LLM=openai`.
    LlmServer(llm_server::LlmServerArgs),
    /// Exit 0 if the server on this machine answers /healthz (container health checks).
    Healthcheck(health::HealthcheckArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file (TOML); the environment overrides it.
    #[arg(long, env = "ATLAS_CONFIG")]
    config: Option<PathBuf>,
    /// Development: start the provider fakes in-process and use them (implies dev mode).
    #[arg(long)]
    fakes: bool,
}

/// Latencies and behaviour of the provider fakes.
#[derive(Args, Clone)]
pub struct FakeLatencies {
    /// STT: end of speech → final transcript, ms.
    #[arg(long, default_value_t = 150)]
    pub stt_final_ms: u64,
    /// STT: silence after the last word → an `is_final` transcript of the words so far, before
    /// the final (`speech_final`) one, ms; unset: none.
    #[arg(long)]
    pub stt_stable_ms: Option<u64>,
    /// LLM: request → first token, ms.
    #[arg(long, default_value_t = 300)]
    pub llm_first_token_ms: u64,
    /// LLM tokens per second after the first.
    #[arg(long, default_value_t = 50.0)]
    pub llm_tokens_per_s: f64,
    /// TTS: request → first audio byte, ms.
    #[arg(long, default_value_t = 200)]
    pub tts_first_byte_ms: u64,
    /// TTS streaming speed as a real-time factor.
    #[arg(long, default_value_t = 4.0)]
    pub tts_speed: f64,
    /// TTS audio per input character, ms.
    #[arg(long, default_value_t = 60)]
    pub tts_ms_per_char: u32,
}

impl FakeLatencies {
    /// The fakes' configuration for these latencies.
    pub fn config(&self) -> FakesConfig {
        let mut c = FakesConfig::default();
        c.stt.final_delay = Duration::from_millis(self.stt_final_ms);
        c.stt.silence_to_end = c.stt.silence_to_end.min(c.stt.final_delay);
        c.stt.stable_after = self.stt_stable_ms.map(Duration::from_millis);
        c.llm.first_token = Duration::from_millis(self.llm_first_token_ms);
        c.llm.tokens_per_s = self.llm_tokens_per_s;
        c.tts.first_byte = Duration::from_millis(self.tts_first_byte_ms);
        c.tts.speed = self.tts_speed;
        c.tts.ms_per_char = self.tts_ms_per_char;
        c
    }
}

#[derive(Args)]
struct FakesArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Require this API key from clients.
    #[arg(long)]
    api_key: Option<String>,
    #[command(flatten)]
    latencies: FakeLatencies,
    /// Also run a TCP proxy to a database, as `LISTEN=UPSTREAM` (e.g.
    /// `127.0.0.1:15432=127.0.0.1:5432`), to test against a slow database.
    #[arg(long)]
    db_proxy: Option<String>,
    /// Delay each request through the database proxy by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    db_delay_ms: u64,
}

#[derive(Args)]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long, default_value = "dev-user")]
    user: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_s: u64,
    /// Role claim.
    #[arg(long, default_value = "authenticated")]
    role: String,
    /// Configuration file (for the secret and audience).
    #[arg(long, env = "ATLAS_CONFIG")]
    config: Option<PathBuf>,
}

fn init_logging(format: LogFormat) {
    init_logging_with(format, None);
}

/// Logs to standard output in `format` at `RUST_LOG`'s levels; with `traces`, `tracing` spans
/// are also exported as OpenTelemetry spans, whatever the log level.
fn init_logging_with(format: LogFormat, traces: Option<&atlas_server::telemetry::Tracing>) {
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn"));
    atlas_server::telemetry::subscriber(format, filter, traces).init();
}

/// mimalloc asks for transparent huge pages on its arenas; when it later returns memory and
/// takes it back, each fault zeroes a whole 2 MiB page. Under load that zeroing was 15 % of the
/// server's CPU (docs/benchmarks.md), so the process opts out. Failure only costs speed.
fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Fakes(args) => {
            init_logging(LogFormat::Text);
            let mut config = args.latencies.config();
            config.api_key = args.api_key;
            let fakes = Fakes::start(config, args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            println!("provider fakes listening on {}", fakes.addr());
            println!("  ATLAS_DEEPGRAM_URL={}", fakes.deepgram_url());
            println!("  ATLAS_ANTHROPIC_URL={}", fakes.anthropic_url());
            println!("  ATLAS_OPENAI_URL={}", fakes.openai_url());
            let _proxy = match args.db_proxy.as_deref().map(|p| p.split_once('=')) {
                None => None,
                Some(Some((listen, upstream))) => {
                    let proxy = atlas_fakes::proxy::Proxy::start_on(
                        listen.parse().context("--db-proxy LISTEN")?,
                        upstream.parse().context("--db-proxy UPSTREAM")?,
                    )
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                    proxy.set_delay(Duration::from_millis(args.db_delay_ms));
                    println!(
                        "database proxy {listen} -> {upstream}, {} ms per request",
                        args.db_delay_ms
                    );
                    Some(proxy)
                }
                Some(None) => anyhow::bail!("--db-proxy takes LISTEN=UPSTREAM"),
            };
            shutdown_signal().await;
            fakes.shutdown().await;
            Ok(())
        }
        Command::Call(args) => {
            init_logging(LogFormat::Text);
            call::run(args).await
        }
        Command::Token(args) => {
            let config = Config::load_unvalidated(args.config.as_deref())?;
            let secret = dev_or_configured_secret(&config)?;
            let token = auth::mint_token(
                &secret,
                &args.user,
                &config.jwt_audience,
                &args.role,
                args.ttl_s,
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Loadtest(args) => {
            init_logging(LogFormat::Text);
            bench::run(args).await
        }
        Command::Eval(args) => {
            init_logging(LogFormat::Text);
            let code = eval::run(args).await?;
            std::process::exit(code);
        }
        Command::Db(args) => {
            let code = db::run(args).await?;
            std::process::exit(code);
        }
        Command::Healthcheck(args) => {
            let code = health::run(args).await?;
            std::process::exit(code);
        }
        Command::Models(args) => {
            let code = tokio::task::spawn_blocking(move || models::run(args)).await??;
            std::process::exit(code);
        }
        Command::LlmServer(args) => {
            init_logging(LogFormat::Text);
            llm_server::run(args).await
        }
    }
}

/// The configured HS256 secret, or the development secret in dev mode.
pub fn dev_or_configured_secret(config: &Config) -> anyhow::Result<SecretString> {
    match (&config.jwt_secret, config.dev) {
        (Some(s), _) => Ok(s.clone()),
        (None, true) => Ok(SecretString::from(DEV_JWT_SECRET)),
        (None, false) => anyhow::bail!(
            "no ATLAS_JWT_SECRET configured (set it, or ATLAS_DEV=true for the development secret)"
        ),
    }
}

/// Points `config` at in-process fakes and turns on dev mode.
pub fn wire_fakes(config: &mut Config, fakes: &Fakes) {
    config.use_provider_urls(
        fakes.deepgram_url(),
        fakes.anthropic_url(),
        fakes.openai_url(),
    );
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load_unvalidated(args.config.as_deref())?;
    let traces = atlas_server::telemetry::Tracing::from_env()?;
    init_logging_with(config.log_format, traces.as_ref());
    let fakes = if args.fakes {
        let fakes = Fakes::start(
            FakesConfig::default(),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .await?;
        wire_fakes(&mut config, &fakes);
        Some(fakes)
    } else {
        None
    };
    config.validate()?;
    let app = Application::build(config.clone()).await?;
    let addr = app.local_addr();
    println!("atlas-voice listening on http://{addr}  (voice endpoint ws://{addr}/v1/voice)");
    println!("open http://{addr}/ in a browser, press Start and speak");
    if fakes.is_some() {
        // `--fakes` implies dev mode, which accepts the development key.
        let secret = SecretString::from(DEV_JWT_SECRET);
        let token = auth::mint_token(
            &secret,
            "dev-user",
            &config.jwt_audience,
            "authenticated",
            24 * 3600,
        )?;
        println!("development mode with provider fakes; from a terminal:");
        println!(
            "  atlas-voice call --url ws://{addr}/v1/voice --token {token} --input tests/audio/question_16k.wav --output reply.wav"
        );
    }
    let stop = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown signal received; draining");
        stop.cancel();
    });
    app.run_until_stopped().await?;
    if let Some(f) = fakes {
        f.shutdown().await;
    }
    if let Some(traces) = traces {
        // The last spans leave before the process does (at most 5 s).
        tokio::task::spawn_blocking(move || traces.shutdown()).await?;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
