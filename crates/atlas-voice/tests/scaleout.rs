//! Scale-out with two real server processes sharing the real Redis (each test under its own
//! key prefix): the per-user limit across instances, leases freed after a crash, a resume on
//! the other instance, the daily budget across instances, and Redis going away.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use secrecy::SecretString;

use atlas_client::{ClientError, ConnectOptions, Connection, Incoming, connect, stream_pcm, wav};
use atlas_fakes::proxy::Proxy;
use atlas_fakes::{Fakes, FakesConfig};
use atlas_protocol::{ClientMessage, ServerEvent, SessionStart};

const SECRET: &str = "scale-out-test-secret-0123456789abcdef";

struct Instance {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Instance {
    fn url(&self) -> String {
        format!("ws://{}/v1/voice", self.addr)
    }
}

fn fast_fakes() -> FakesConfig {
    let mut c = FakesConfig::default();
    c.llm.first_token = Duration::from_millis(80);
    c.llm.tokens_per_s = 200.0;
    c.tts.first_byte = Duration::from_millis(40);
    c.tts.speed = 20.0;
    c.tts.ms_per_char = 30;
    c
}

fn spawn(fakes: &Fakes, redis: &str, prefix: &str, extra: &[(&str, &str)]) -> Instance {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atlas-voice"));
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("ATLAS_LISTEN", "127.0.0.1:0")
        .env("ATLAS_JWT_SECRET", SECRET)
        .env("ATLAS_STT", "deepgram")
        .env("ATLAS_LLM", "anthropic")
        .env("ATLAS_TTS", "openai")
        .env("DEEPGRAM_API_KEY", "k")
        .env("ANTHROPIC_API_KEY", "k")
        .env("OPENAI_API_KEY", "k")
        .env("ATLAS_DEEPGRAM_URL", fakes.deepgram_url())
        .env("ATLAS_ANTHROPIC_URL", fakes.anthropic_url())
        .env("ATLAS_OPENAI_URL", fakes.openai_url())
        .env("REDIS_URL", redis)
        .env("ATLAS_REDIS_PREFIX", prefix)
        .env("ATLAS_LEASE_TTL_S", "2")
        .env("ATLAS_CONNECT_BURST", "1000")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}/atlas.db", dir.path().display()),
        )
        .env("ATLAS_SPOOL_DIR", dir.path().join("spool"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("the atlas-voice binary");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server printed its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("atlas-voice listening on http://") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Instance {
        child,
        addr,
        _dir: dir,
    }
}

fn token(user: &str) -> String {
    atlas_server::auth::mint_token(
        &SecretString::from(SECRET),
        user,
        "authenticated",
        "authenticated",
        600,
    )
    .unwrap()
}

fn prefix() -> String {
    format!("atlas-test-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    format!(
        "{:x}{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
        std::process::id()
    )
}

async fn start(
    url: &str,
    user: &str,
    resume: Option<&str>,
) -> Result<(Connection, ServerEvent), (u16, String)> {
    let mut o = ConnectOptions::new(url, token(user));
    o.resume = resume.map(str::to_owned);
    let mut conn = match connect(&o).await {
        Ok(c) => c,
        Err(ClientError::Refused { status, code, .. }) => return Err((status, code)),
        Err(e) => panic!("{e}"),
    };
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart::default()))
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), conn.incoming.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Incoming::Event {
                event: e @ (ServerEvent::SessionStarted { .. } | ServerEvent::SessionResumed { .. }),
                ..
            } => {
                return Ok((conn, e));
            }
            Incoming::Closed { code, reason, .. } => panic!("closed {code:?} {reason}"),
            _ => {}
        }
    }
}

fn question() -> Vec<i16> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/audio/question_16k.wav");
    let (mut s, _) = wav::read(&path).unwrap();
    s.extend(std::iter::repeat_n(0, 16_000));
    s
}

async fn ask(conn: &mut Connection, turn: u64) {
    let sender = conn.sender.clone();
    let streaming =
        tokio::spawn(async move { stream_pcm(&sender, &question(), 16_000, 100, 4.0).await });
    loop {
        match tokio::time::timeout(Duration::from_secs(20), conn.incoming.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Incoming::Event {
                event: ServerEvent::ResponseDone { turn_id, .. },
                ..
            } if turn_id == turn => break,
            Incoming::Closed { code, reason, .. } => panic!("closed {code:?} {reason}"),
            _ => {}
        }
    }
    streaming.abort();
}

const REDIS: &str = "redis://127.0.0.1:6379";

#[tokio::test]
async fn the_user_limit_holds_across_instances_and_a_crash_frees_places_within_the_lease() {
    let fakes = Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let p = prefix();
    let mut a = spawn(&fakes, REDIS, &p, &[]);
    let b = spawn(&fakes, REDIS, &p, &[]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(start(&a.url(), "busy", None).await.expect("admitted on A"));
    }
    assert_eq!(
        start(&b.url(), "busy", None).await.err(),
        Some((429, "too_many_sessions".into()))
    );
    assert!(start(&b.url(), "someone-else", None).await.is_ok());
    // A dies without a word.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let crashed = Instant::now();
    let admitted_at = loop {
        if start(&b.url(), "busy", None).await.is_ok() {
            break crashed.elapsed();
        }
        assert!(
            crashed.elapsed() < Duration::from_secs(10),
            "places never freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        admitted_at <= Duration::from_millis(2_000 + 1_500),
        "freed within the 2 s lease: {admitted_at:?}"
    );
    drop(held);
}

#[tokio::test]
async fn a_session_dropped_on_one_instance_resumes_on_the_other_with_its_history() {
    let fakes = Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let p = prefix();
    let a = spawn(&fakes, REDIS, &p, &[]);
    let b = spawn(&fakes, REDIS, &p, &[]);
    let (mut conn, started) = start(&a.url(), "traveller", None).await.unwrap();
    let ServerEvent::SessionStarted {
        session_id,
        resume_token,
        ..
    } = started
    else {
        unreachable!()
    };
    ask(&mut conn, 1).await;
    conn.abort();
    // B takes the session over once A has published it.
    let began = Instant::now();
    let (mut conn, resumed) = loop {
        match start(&b.url(), "traveller", Some(&resume_token)).await {
            Ok(ok) => break ok,
            Err((404, _)) if began.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("resume on B refused: {e:?}"),
        }
    };
    let ServerEvent::SessionResumed {
        session_id: resumed_id,
        turns,
        ..
    } = resumed
    else {
        panic!("{resumed:?}")
    };
    assert_eq!(resumed_id, session_id);
    assert_eq!(turns, 1);
    ask(&mut conn, 2).await;
    let recorded = fakes.recorded();
    let messages = recorded.llm_requests.last().unwrap().1["messages"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(messages.len(), 3, "the history came along: {messages:?}");
    assert_eq!(
        messages[0]["content"],
        "What is the weather like in Paris today?"
    );
    assert_eq!(messages[1]["role"], "assistant");
}

#[tokio::test]
async fn the_daily_budget_holds_across_instances() {
    let fakes = Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let p = prefix();
    let budget = [
        ("ATLAS_USER_DAILY_BUDGET_USD", "0.008"),
        ("ATLAS_LLM_MAX_TOKENS", "100"),
    ];
    let a = spawn(&fakes, REDIS, &p, &budget);
    let b = spawn(&fakes, REDIS, &p, &budget);
    let (mut conn, _) = start(&a.url(), "spender", None).await.unwrap();
    ask(&mut conn, 1).await;
    conn.sender.send(&ClientMessage::SessionEnd).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        start(&b.url(), "spender", None).await.err(),
        Some((429, "budget_exhausted".into()))
    );
    assert!(start(&b.url(), "saver", None).await.is_ok());
}

#[tokio::test]
async fn without_redis_new_sessions_are_refused_and_live_ones_continue() {
    let fakes = Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 6379)))
        .await
        .unwrap();
    let a = spawn(&fakes, &format!("redis://{}", proxy.addr), &prefix(), &[]);
    let (mut live, _) = start(&a.url(), "steady", None).await.unwrap();
    proxy.cut();
    assert_eq!(
        start(&a.url(), "newcomer", None).await.err(),
        Some((503, "at_capacity".into()))
    );
    // The live session still answers.
    live.sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(Duration::from_secs(5), live.incoming.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Incoming::Event {
                event: ServerEvent::Pong { .. },
                ..
            } => break true,
            Incoming::Closed { .. } => break false,
            _ => {}
        }
    };
    assert!(pong);
    // Redis comes back: new sessions are admitted again.
    proxy.restore();
    let began = Instant::now();
    loop {
        if start(&a.url(), "newcomer", None).await.is_ok() {
            break;
        }
        assert!(began.elapsed() < Duration::from_secs(10), "never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_draining_instance_hands_its_sessions_to_another() {
    let fakes = Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let p = prefix();
    let a = spawn(&fakes, REDIS, &p, &[]);
    let b = spawn(&fakes, REDIS, &p, &[]);
    let (mut conn, started) = start(&a.url(), "mover", None).await.unwrap();
    let ServerEvent::SessionStarted {
        session_id,
        resume_token,
        ..
    } = started
    else {
        unreachable!()
    };
    ask(&mut conn, 1).await;
    // Deploy: A is told to stop.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(a.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let close = loop {
        let item = tokio::time::timeout(Duration::from_secs(10), conn.incoming.recv())
            .await
            .unwrap()
            .unwrap();
        if let Incoming::Closed { code, .. } = item {
            break code;
        }
    };
    assert_eq!(close, Some(1001), "going away: resume elsewhere");
    let (mut conn, resumed) = start(&b.url(), "mover", Some(&resume_token))
        .await
        .expect("resumed on B");
    let ServerEvent::SessionResumed {
        session_id: id,
        turns,
        ..
    } = resumed
    else {
        panic!("{resumed:?}")
    };
    assert_eq!((id, turns), (session_id, 1));
    ask(&mut conn, 2).await;
}

/// A Redis server speaking only TLS on a free loopback port, with a certificate from a CA
/// made for the test (openssl); stopped on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=atlas-voice test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            dir.path().join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args([
                "--tls-cert-file",
                "server.pem",
                "--tls-key-file",
                "server.key",
            ])
            .args(["--tls-ca-cert-file", "ca.pem", "--tls-auth-clients", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let redis = TlsRedis { child, port, dir };
        let began = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                began.elapsed() < Duration::from_secs(10),
                "redis-server did not open its TLS port"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// Keys under `prefix`, read with redis-cli over TLS.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert", &self.ca(), "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "--scan", "--pattern"])
            .arg(format!("{prefix}:*"))
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn rediss_urls_use_tls_and_verify_the_server() {
    let fakes = Fakes::start(fast_fakes(), SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let redis = TlsRedis::start();
    // The test's CA is trusted through the standard SSL_CERT_FILE.
    let p = prefix();
    let trusted = spawn(&fakes, &redis.url(), &p, &[("SSL_CERT_FILE", &redis.ca())]);
    let (mut conn, _) = start(&trusted.url(), "tls-user", None).await.unwrap();
    ask(&mut conn, 1).await;
    let keys = redis.keys(&p);
    assert!(!keys.is_empty(), "the session's lease is in the TLS Redis");
    // With only the system's roots the self-made certificate is refused, and so are new
    // sessions (Redis unavailable), as for any unreachable Redis.
    let untrusted = spawn(&fakes, &redis.url(), &prefix(), &[]);
    assert_eq!(
        start(&untrusted.url(), "tls-user-2", None).await.err(),
        Some((503, "at_capacity".into()))
    );
}
