//! Scale-out with two real server processes sharing the real Redis (each test under its own
//! key prefix): the per-user limit across instances, leases freed after a crash, a resume on
//! the other instance, the daily budget across instances, and Redis going away.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use atlas_client::{ClientError, ConnectOptions, Connection, Incoming, connect, stream_pcm, wav};
use atlas_fakes::Fakes;
use atlas_fakes::proxy::Proxy;
use atlas_protocol::{ClientMessage, ServerEvent, SessionStart};

use atlas_testkit::{
    KillOnDrop, ServerProcess as Instance, fake_providers, fast_fakes, serve, start_fakes, token,
};

fn spawn(fakes: &Fakes, redis: &str, prefix: &str, extra: &[(&str, &str)]) -> Instance {
    let mut env = fake_providers(fakes);
    env.extend([
        ("REDIS_URL", redis.to_owned()),
        ("ATLAS_REDIS_PREFIX", prefix.to_owned()),
        ("ATLAS_LEASE_TTL_S", "2".to_owned()),
        ("ATLAS_CONNECT_BURST", "1000".to_owned()),
    ]);
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    serve(
        std::path::Path::new(env!("CARGO_BIN_EXE_atlas-voice")),
        &env,
    )
    .expect("the server starts")
}

/// Two instances sharing Redis under a fresh key prefix, both with `extra` settings.
fn two_instances(fakes: &Fakes, extra: &[(&str, &str)]) -> (Instance, Instance) {
    let p = prefix();
    let a = spawn(fakes, REDIS, &p, extra);
    let b = spawn(fakes, REDIS, &p, extra);
    (a, b)
}

/// The next incoming item; panics if none comes within `timeout` or the connection ended.
async fn next_item(conn: &mut Connection, timeout: Duration) -> Incoming {
    tokio::time::timeout(timeout, conn.incoming.recv())
        .await
        .expect("an incoming item in time")
        .expect("the connection is open")
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
        match next_item(&mut conn, Duration::from_secs(5)).await {
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
        match next_item(conn, Duration::from_secs(20)).await {
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

/// Starts a session of `user` on `instance` and has one turn; returns the connection, the
/// session id and the resume token.
async fn session_with_one_turn(instance: &Instance, user: &str) -> (Connection, String, String) {
    let (mut conn, started) = start(&instance.url(), user, None).await.unwrap();
    let (session_id, resume_token) = ids(started);
    ask(&mut conn, 1).await;
    (conn, session_id, resume_token)
}

/// The messages of the last LLM request the fakes received.
fn last_llm_messages(fakes: &Fakes) -> Vec<serde_json::Value> {
    let recorded = fakes.recorded();
    recorded.llm_requests.last().unwrap().1["messages"]
        .as_array()
        .unwrap()
        .clone()
}

const REDIS: &str = "redis://127.0.0.1:6379";

#[tokio::test]
async fn the_user_limit_holds_across_instances_and_a_crash_frees_places_within_the_lease() {
    let fakes = start_fakes(fast_fakes()).await;
    let (mut a, b) = two_instances(&fakes, &[]);
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
    let fakes = start_fakes(fast_fakes()).await;
    let (a, b) = two_instances(&fakes, &[]);
    let (conn, session_id, resume_token) = session_with_one_turn(&a, "traveller").await;
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
    let (resumed_id, turns) = resumed_as(resumed);
    assert_eq!(resumed_id, session_id);
    assert_eq!(turns, 1);
    ask(&mut conn, 2).await;
    let messages = last_llm_messages(&fakes);
    assert_eq!(messages.len(), 3, "the history came along: {messages:?}");
    assert_eq!(
        messages[0]["content"],
        "What is the weather like in Paris today?"
    );
    assert_eq!(messages[1]["role"], "assistant");
}

#[tokio::test]
async fn the_daily_budget_holds_across_instances() {
    let fakes = start_fakes(fast_fakes()).await;
    let budget = [
        ("ATLAS_USER_DAILY_BUDGET_USD", "0.008"),
        ("ATLAS_LLM_MAX_TOKENS", "100"),
    ];
    let (a, b) = two_instances(&fakes, &budget);
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
    let fakes = start_fakes(fast_fakes()).await;
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
        match next_item(&mut live, Duration::from_secs(5)).await {
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
    let fakes = start_fakes(fast_fakes()).await;
    let (a, b) = two_instances(&fakes, &[]);
    let (mut conn, session_id, resume_token) = session_with_one_turn(&a, "mover").await;
    // Deploy: A is told to stop.
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(a.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let close = loop {
        let item = next_item(&mut conn, Duration::from_secs(10)).await;
        if let Incoming::Closed { code, .. } = item {
            break code;
        }
    };
    assert_eq!(close, Some(1001), "going away: resume elsewhere");
    let (mut conn, resumed) = start(&b.url(), "mover", Some(&resume_token))
        .await
        .expect("resumed on B");
    let (id, turns) = resumed_as(resumed);
    assert_eq!((id, turns), (session_id, 1));
    ask(&mut conn, 2).await;
}

/// Opens a connection (the upgrade, with its limits and claims) without starting it.
async fn open(url: &str, user: &str, resume: Option<&str>) -> Result<Connection, (u16, String)> {
    let mut o = ConnectOptions::new(url, token(user));
    o.resume = resume.map(str::to_owned);
    match connect(&o).await {
        Ok(c) => Ok(c),
        Err(ClientError::Refused { status, code, .. }) => Err((status, code)),
        Err(e) => panic!("{e}"),
    }
}

/// What a connection hears after `session.start`: the session event, or the refusal.
enum Outcome {
    Resumed(String),
    Refused(Option<String>, Option<u16>),
}

async fn start_on(conn: &mut Connection) -> Outcome {
    conn.sender
        .send(&ClientMessage::SessionStart(SessionStart::default()))
        .await
        .unwrap();
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), conn.incoming.recv())
            .await
            .expect("an answer to session.start")
        {
            Some(Incoming::Event {
                event: ServerEvent::SessionResumed { session_id, .. },
                ..
            }) => return Outcome::Resumed(session_id),
            Some(Incoming::Event {
                event:
                    ServerEvent::Error {
                        code, fatal: true, ..
                    },
                ..
            }) => error = Some(code.as_str().to_owned()),
            Some(Incoming::Closed { code, .. }) => return Outcome::Refused(error, code),
            None => return Outcome::Refused(error, None),
            _ => {}
        }
    }
}

/// Whether the connection still answers a ping.
async fn alive(conn: &mut Connection) -> bool {
    if conn
        .sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .is_err()
    {
        return false;
    }
    loop {
        match tokio::time::timeout(Duration::from_secs(3), conn.incoming.recv()).await {
            Ok(Some(Incoming::Event {
                event: ServerEvent::Pong { .. },
                ..
            })) => return true,
            Ok(Some(Incoming::Closed { .. })) | Ok(None) | Err(_) => return false,
            _ => {}
        }
    }
}

/// The session id and turn count of a `session.resumed`.
fn resumed_as(event: ServerEvent) -> (String, u64) {
    match event {
        ServerEvent::SessionResumed {
            session_id, turns, ..
        } => (session_id, turns),
        other => panic!("expected session.resumed, got {other:?}"),
    }
}

fn ids(started: ServerEvent) -> (String, String) {
    match started {
        ServerEvent::SessionStarted {
            session_id,
            resume_token,
            ..
        }
        | ServerEvent::SessionResumed {
            session_id,
            resume_token,
            ..
        } => (session_id, resume_token),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn racing_resumes_on_two_instances_yield_one_live_session() {
    let fakes = start_fakes(fast_fakes()).await;
    let (a, b) = two_instances(&fakes, &[]);
    let (conn, started) = start(&a.url(), "racer", None).await.unwrap();
    let (session_id, resume_token) = ids(started);
    conn.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Connection 1 resumes on A and waits; connection 2 resumes on B and starts at once.
    let mut first = open(&a.url(), "racer", Some(&resume_token)).await.unwrap();
    let mut second = open(&b.url(), "racer", Some(&resume_token)).await.unwrap();
    let second_outcome = start_on(&mut second).await;
    let first_outcome = start_on(&mut first).await;
    let Outcome::Resumed(id) = second_outcome else {
        panic!("the later claim must win");
    };
    assert_eq!(id, session_id);
    match first_outcome {
        Outcome::Resumed(_) => panic!("two connections got session.resumed for one session"),
        Outcome::Refused(code, close) => {
            assert_eq!(code.as_deref(), Some("resume_failed"));
            assert!(matches!(close, Some(4409) | Some(1000)), "{close:?}");
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(alive(&mut second).await, "the winner keeps the session");
}

#[tokio::test]
async fn a_session_survives_kill_9_of_its_instance() {
    let fakes = start_fakes(fast_fakes()).await;
    let (mut a, b) = two_instances(&fakes, &[]);
    let (_conn, session_id, resume_token) = session_with_one_turn(&a, "survivor").await;
    // The turn's state is replicated as the turn ends (queued before `response.done`); give
    // the write its round trip to Redis, then A dies without a word.
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    // The client library's schedule: 1, 2, 4, 8, 16 s.
    let mut resumed = None;
    for delay in [1u64, 2, 4, 8, 16] {
        tokio::time::sleep(Duration::from_secs(delay)).await;
        match start(&b.url(), "survivor", Some(&resume_token)).await {
            Ok(ok) => {
                resumed = Some(ok);
                break;
            }
            Err((status, _)) if status == 503 || status == 429 => continue,
            Err(e) => panic!("resume after the crash refused: {e:?}"),
        }
    }
    let (mut conn, event) = resumed.expect("resumed within the reconnect schedule");
    let (id, turns) = resumed_as(event);
    assert_eq!((id, turns), (session_id, 1));
    assert!(killed.elapsed() < Duration::from_secs(31));
    // Usage comes right after session.resumed: the first turn's tokens are still counted.
    let usage = loop {
        match next_item(&mut conn, Duration::from_secs(5)).await {
            Incoming::Event {
                event: ServerEvent::Usage(u),
                ..
            } => break u,
            Incoming::Closed { code, .. } => panic!("closed {code:?}"),
            _ => {}
        }
    };
    assert!(
        usage.llm_input_tokens > 0 && usage.llm_output_tokens > 0,
        "{usage:?}"
    );
    ask(&mut conn, 2).await;
    let messages = last_llm_messages(&fakes);
    assert_eq!(messages.len(), 3, "the history survived: {messages:?}");
}

#[tokio::test]
async fn a_redis_outage_during_lease_refresh_never_admits_a_fourth_session() {
    let fakes = start_fakes(fast_fakes()).await;
    let p = prefix();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 6379)))
        .await
        .unwrap();
    // A reaches Redis through a proxy that will fail; B directly.
    let a = spawn(&fakes, &format!("redis://{}", proxy.addr), &p, &[]);
    let b = spawn(&fakes, REDIS, &p, &[]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(start(&a.url(), "holder", None).await.unwrap().0);
    }
    proxy.cut();
    // While A cannot refresh its leases, B tries for a fourth session again and again. It may
    // only get one once A's three have ended (they end when their leases run out).
    let began = Instant::now();
    let admitted = loop {
        if let Ok((conn, _)) = start(&b.url(), "holder", None).await {
            break conn;
        }
        assert!(began.elapsed() < Duration::from_secs(15), "never admitted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for conn in &mut held {
        let closed = loop {
            match tokio::time::timeout(Duration::from_millis(200), conn.incoming.recv()).await {
                Ok(Some(Incoming::Closed { code, .. })) => break code,
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(_) => panic!("a 4th session was admitted while the 3rd was live"),
            }
        };
        assert_eq!(closed, Some(1011), "ended for its lapsed lease");
    }
    drop(admitted);
    proxy.restore();
}

/// Forgets every key under `prefix`, as a Redis restarted without persistence would.
async fn lose_redis_data(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the session had shared state");
    let _: i64 = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Waits (up to 10 s) until the state published for `session_id` under `prefix` holds `turns`
/// turn records: what another instance resumes from.
async fn until_published(prefix: &str, session_id: &str, turns: usize) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let began = Instant::now();
    loop {
        let state: Option<String> = redis::cmd("HGET")
            .arg(format!("{prefix}:session:{session_id}"))
            .arg("state")
            .query_async(&mut conn)
            .await
            .unwrap();
        let published = state
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["turn_records"].as_array().map(Vec::len))
            .unwrap_or(0);
        if published >= turns {
            return;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{published} of {turns} turns published"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The final record of `session_id` in the SQLite file at `db`: (end reason, turns).
async fn final_record(db: &std::path::Path, session_id: &str) -> Option<(String, i64)> {
    let url = format!("sqlite://{}", db.display());
    let began = Instant::now();
    while began.elapsed() < Duration::from_secs(10) {
        if let Ok(pool) = sqlx::SqlitePool::connect(&url).await {
            let row: Option<(Option<String>, i64)> = sqlx::query_as(
                "select end_reason, turns from voice_sessions where id = ? and ended_at is not null",
            )
            .bind(session_id)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten();
            pool.close().await;
            if let Some((reason, turns)) = row {
                return Some((reason.unwrap_or_default(), turns));
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

/// Ends the session and waits for the close.
async fn end(conn: &mut Connection) {
    conn.sender.send(&ClientMessage::SessionEnd).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), conn.incoming.recv()).await {
            Ok(Some(Incoming::Closed { .. })) | Ok(None) => break,
            Ok(Some(_)) => {}
            Err(_) => panic!("no close after session.end"),
        }
    }
}

/// Two instances sharing Redis (under `prefix`) and one SQLite file, and a session of `user`
/// on the first that has had one turn.
struct Pair {
    _a: Instance,
    b: Instance,
    db: std::path::PathBuf,
    conn: Connection,
    session_id: String,
    resume_token: String,
    _fakes: Fakes,
    _dir: tempfile::TempDir,
}

async fn pair_with_one_turn(prefix: &str, user: &str) -> Pair {
    let fakes = start_fakes(fast_fakes()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shared.db");
    let url = format!("sqlite://{}", db.display());
    let a = spawn(&fakes, REDIS, prefix, &[("DATABASE_URL", &url)]);
    let b = spawn(&fakes, REDIS, prefix, &[("DATABASE_URL", &url)]);
    let (conn, session_id, resume_token) = session_with_one_turn(&a, user).await;
    Pair {
        _a: a,
        b,
        db,
        conn,
        session_id,
        resume_token,
        _fakes: fakes,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_redis_that_loses_its_data_does_not_end_the_session_or_its_record() {
    let p = prefix();
    let mut pair = pair_with_one_turn(&p, "amnesia").await;
    let (session_id, resume_token) = (pair.session_id.clone(), pair.resume_token.clone());
    // Redis restarts empty (no persistence): the owner's entry, lease and tokens are gone.
    lose_redis_data(&p).await;
    // Several lease refreshes later (2 s leases, refreshed every 0.67 s) the session is live.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        alive(&mut pair.conn).await,
        "the session survived the data loss"
    );
    ask(&mut pair.conn, 2).await;
    // It is resumable again (its token re-registered): on the other instance, with both turns.
    pair.conn.abort();
    until_published(&p, &session_id, 2).await;
    let (mut conn, event) = start(&pair.b.url(), "amnesia", Some(&resume_token))
        .await
        .expect("resumes after the data loss");
    assert_eq!(resumed_as(event), (session_id.clone(), 2));
    end(&mut conn).await;
    let record = final_record(&pair.db, &session_id).await;
    assert_eq!(record, Some(("client_ended".to_owned(), 2)));
}

#[tokio::test]
async fn a_resume_that_never_completes_leaves_the_session_with_its_owner() {
    let p = prefix();
    let mut pair = pair_with_one_turn(&p, "flaky").await;
    let (session_id, resume_token) = (pair.session_id.clone(), pair.resume_token.clone());
    // B accepts a resume upgrade; the client is lost before its session.start.
    let abandoned = open(&pair.b.url(), "flaky", Some(&resume_token))
        .await
        .unwrap();
    abandoned.abort();
    // Well past the claim's deadline and many lease refreshes: the owner's connection lives.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        alive(&mut pair.conn).await,
        "the owner kept its live connection"
    );
    ask(&mut pair.conn, 2).await;
    end(&mut pair.conn).await;
    assert_eq!(
        final_record(&pair.db, &session_id).await,
        Some(("client_ended".to_owned(), 2))
    );
}

/// Runs `cmd` (`what`, for messages) to completion, checks that it succeeded and returns its
/// output.
fn run_ok(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().expect(what);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A Redis server speaking only TLS on a free loopback port, with a certificate from a CA
/// made for the test (openssl); stopped on drop.
struct TlsRedis {
    _child: KillOnDrop,
    port: u16,
    dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let mut cmd = Command::new("openssl");
            cmd.args(args).current_dir(dir.path());
            run_ok(&mut cmd, &format!("openssl {args:?}"));
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
        let redis = TlsRedis {
            _child: KillOnDrop(child),
            port,
            dir,
        };
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
        let mut cmd = Command::new("redis-cli");
        cmd.args(["--tls", "--cacert", &self.ca(), "-h", "127.0.0.1"])
            .args(["-p", &self.port.to_string(), "--scan", "--pattern"])
            .arg(format!("{prefix}:*"));
        let out = run_ok(&mut cmd, "redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn rediss_urls_use_tls_and_verify_the_server() {
    let fakes = start_fakes(fast_fakes()).await;
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
