//! Test support shared by the integration tests of every crate: the provider fakes with short
//! latencies, the test signing secret and tokens, the server built in process on a loopback
//! port, and the `atlas-voice serve` binary run as a child process.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use atlas_fakes::{Fakes, FakesConfig};
use atlas_server::{Application, Config, auth};

/// Fresh databases and sample records: the store's test support.
pub use atlas_store::testing as store;
pub use atlas_store::testing::{PgDb, postgres_admin_url};

/// The HS256 secret every test server trusts.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// A ten-minute `authenticated` token for `user`, signed with [`SECRET`].
pub fn token(user: &str) -> String {
    token_for(user, 600)
}

/// An `authenticated` token for `user` that expires in `ttl_s` seconds.
pub fn token_for(user: &str, ttl_s: u64) -> String {
    auth::mint_token(
        &SecretString::from(SECRET),
        user,
        "authenticated",
        "authenticated",
        ttl_s,
    )
    .expect("a test token")
}

/// Fakes with short latencies so tests finish quickly.
/// 16 kHz speech as a phone line carries it: 8 kHz (a two-tap average, then every other
/// sample).
pub fn phone_line(samples: &[i16]) -> Vec<i16> {
    samples
        .chunks(2)
        .map(|p| ((i32::from(p[0]) + i32::from(*p.get(1).unwrap_or(&p[0]))) / 2) as i16)
        .collect()
}

/// Places a call with the fake Twilio and checks it was answered cleanly, with more than
/// `at_least` of reply audio played.
pub async fn answered_call(
    cfg: atlas_fakes::twilio::CallConfig,
    at_least: std::time::Duration,
) -> atlas_fakes::twilio::CallReport {
    let report = atlas_fakes::twilio::place_call(cfg)
        .await
        .expect("the call goes through");
    assert_eq!(report.refused, None, "{}", report.twiml);
    assert!(
        report.protocol_errors.is_empty(),
        "{:?}",
        report.protocol_errors
    );
    assert!(
        report.heard_duration() > at_least,
        "heard {:?}",
        report.heard_duration()
    );
    report
}

pub fn fast_fakes() -> FakesConfig {
    let mut c = FakesConfig::default();
    c.llm.first_token = Duration::from_millis(80);
    c.llm.tokens_per_s = 200.0;
    c.tts.first_byte = Duration::from_millis(40);
    c.tts.speed = 20.0;
    c.tts.ms_per_char = 30;
    c
}

/// Starts the fakes on a loopback port.
pub async fn start_fakes(config: FakesConfig) -> Fakes {
    Fakes::start(config, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("fakes start")
}

/// The server running in this process, and its fakes.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its provider fakes.
    pub fakes: Fakes,
    /// Starts the drain.
    pub shutdown: CancellationToken,
    /// The server task.
    pub server: JoinHandle<std::io::Result<()>>,
    /// The configuration it runs with.
    pub config: Config,
    /// Holds the test's SQLite file and spool; removed when the test ends.
    pub data_dir: tempfile::TempDir,
}

impl TestApp {
    /// The voice endpoint's URL.
    pub fn url(&self) -> String {
        format!("ws://{}/v1/voice", self.addr)
    }
}

/// Builds and runs the server in process on a loopback port, wired to fresh fakes, trusting
/// [`SECRET`], with a fresh SQLite file; `tweak` adjusts the configuration first.
pub async fn spawn_app_with(fakes: FakesConfig, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let fakes = start_fakes(fakes).await;
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    config.use_provider_urls(
        fakes.deepgram_url(),
        fakes.anthropic_url(),
        fakes.openai_url(),
    );
    config.dev = false;
    config.jwt_secret = Some(SecretString::from(SECRET));
    config.provider_idle_timeout_s = 2;
    config.provider_timeout_s = 3;
    let data_dir = tempfile::tempdir().expect("temp dir");
    config.database_url = format!("sqlite://{}/atlas.db", data_dir.path().display());
    config.spool_dir = data_dir.path().join("spool");
    tweak(&mut config);
    let app = Application::build(config.clone())
        .await
        .expect("app builds");
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        addr,
        fakes,
        shutdown,
        server,
        config,
        data_dir,
    }
}

/// A child process, killed (and reaped) when dropped; derefs to the [`Child`].
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// `atlas-voice serve` running as a child process (killed when dropped).
pub struct ServerProcess {
    /// The process.
    pub child: KillOnDrop,
    /// Where it listens.
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    /// The voice endpoint's URL.
    pub fn url(&self) -> String {
        format!("ws://{}/v1/voice", self.addr)
    }
}

/// The environment that wires a server process to `fakes` as the cloud providers.
pub fn fake_providers(fakes: &Fakes) -> Vec<(&'static str, String)> {
    vec![
        ("ATLAS_STT", "deepgram".into()),
        ("ATLAS_LLM", "anthropic".into()),
        ("ATLAS_TTS", "openai".into()),
        ("DEEPGRAM_API_KEY", "k".into()),
        ("ANTHROPIC_API_KEY", "k".into()),
        ("OPENAI_API_KEY", "k".into()),
        ("ATLAS_DEEPGRAM_URL", fakes.deepgram_url()),
        ("ATLAS_ANTHROPIC_URL", fakes.anthropic_url()),
        ("ATLAS_OPENAI_URL", fakes.openai_url()),
    ]
}

/// Runs `bin serve` on a loopback port with a clean environment (PATH, [`SECRET`], a fresh
/// SQLite file and spool) plus `env`, and waits for it to listen. Its standard error is
/// returned when it exits before listening.
pub fn serve(bin: &Path, env: &[(&str, String)]) -> Result<ServerProcess, String> {
    serve_with_args(bin, &[], env)
}

/// [`serve`] with more arguments after `serve` (`--fakes`, say).
pub fn serve_with_args(
    bin: &Path,
    args: &[&str],
    env: &[(&str, String)],
) -> Result<ServerProcess, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("ATLAS_LISTEN", "127.0.0.1:0")
        .env("ATLAS_JWT_SECRET", SECRET)
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/atlas.db", dir.path().display()),
        )
        .env("ATLAS_SPOOL_DIR", dir.path().join("spool"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the atlas-voice binary");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("atlas-voice listening on http://") {
                    break rest
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse().ok())
                        .expect("an address");
                }
            }
            _ => {
                let mut err = String::new();
                if let Some(mut stderr) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
                }
                let _ = child.wait();
                return Err(err);
            }
        }
    };
    // Keep draining both pipes so the child never blocks on a full one.
    std::thread::spawn(move || for _ in lines {});
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || for _ in BufReader::new(stderr).lines() {});
    }
    Ok(ServerProcess {
        child: KillOnDrop(child),
        addr,
        _dir: dir,
    })
}
