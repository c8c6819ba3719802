//! Tools from real MCP servers (the official Python SDK's, installed by `scripts/setup-mcp.sh`):
//! `mcp-server-time` over stdio, and the test tree's server (`tests/mcp/test_server.py`) over
//! stdio and Streamable HTTP. The model is the scripted provider fake.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use atlas_fakes::Target;
use atlas_server::Config;
use atlas_server::config::McpServerConfig;

use crate::helpers::*;
use crate::tools::{
    anthropic_results, call, calls, continued_request, done, reply_text, type_turn,
};

/// The Python with the MCP packages of `tests/mcp/requirements.txt`.
fn python() -> PathBuf {
    let path = std::env::var_os("MCP_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/atlas-voice/mcp-venv/bin/python")
        });
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup-mcp.sh (or set MCP_TEST_PYTHON)",
        path.display()
    );
    path
}

fn test_server() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/mcp/test_server.py")
        .to_string_lossy()
        .into_owned()
}

/// `mcp-server-time` over stdio, its local time zone UTC.
fn time_server() -> McpServerConfig {
    McpServerConfig::stdio(
        "time",
        vec![
            python().to_string_lossy().into_owned(),
            "-m".into(),
            "mcp_server_time".into(),
            "--local-timezone".into(),
            "UTC".into(),
        ],
    )
}

/// The test tree's server over stdio, logging to `log`.
fn stdio_test_server(log: &Path) -> McpServerConfig {
    McpServerConfig {
        env: BTreeMap::from([("MCP_TEST_LOG".into(), log.to_string_lossy().into_owned())]),
        ..McpServerConfig::stdio(
            "test",
            vec![
                python().to_string_lossy().into_owned(),
                test_server(),
                "stdio".into(),
            ],
        )
    }
}

/// A server using the test tree's server over stdio (as `tweak` changes its declaration),
/// once it is up with `tools` tools; returns its log, in a folder that lives as long as the
/// returned guard.
async fn with_test_server(
    tweak: impl FnOnce(&mut McpServerConfig),
    tools: usize,
) -> (TestApp, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let mut declared = stdio_test_server(&log);
    tweak(&mut declared);
    let app = spawn_app_with(fast_fakes(), |c: &mut Config| {
        c.mcp_servers = vec![declared];
    })
    .await;
    until_up(&app, "test", tools, 1).await;
    (app, log, dir)
}

/// The lines of a test server's log.
fn log_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 20 s) until `/readyz` says `server` is up with `tools` tools and at least
/// `connections` connections made; returns its details.
async fn until_up(app: &TestApp, server: &str, tools: usize, connections: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = app.get_json("/readyz").await;
        let details = ready["mcp_servers"][server].clone();
        if details["state"] == "up"
            && details["tools"] == tools
            && details["connections"].as_u64() >= Some(connections)
        {
            return details;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{server} not up with {tools} tools: {ready:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The names of the tools the model was offered in its first request.
fn offered(app: &TestApp) -> Vec<String> {
    let recorded = app.fakes.recorded();
    let first = &recorded.llm_requests.first().expect("a model request").1;
    first["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `(name, kind, outcome, mcp_server)` of a tool-call row.
type McpRow = (String, Option<String>, String, Option<String>);

/// The tool-call rows of `session`, in turn order, once `n` are written.
async fn tool_rows(app: &TestApp, session: &str, n: usize) -> Vec<McpRow> {
    let pool = sqlx::SqlitePool::connect(&app.config.database_url)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let rows: Vec<McpRow> = sqlx::query_as(
            "select name, kind, outcome, mcp_server from voice_tool_calls \
             where session_id = ? order by turn_index",
        )
        .bind(session)
        .fetch_all(&pool)
        .await
        .unwrap_or_default();
        if rows.len() >= n || tokio::time::Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_spoken_question_is_answered_with_the_time_from_an_mcp_server() {
    let app = spawn_app_with(fast_fakes(), |c: &mut Config| {
        c.mcp_servers = vec![time_server()];
    })
    .await;
    until_up(&app, "time", 2, 1).await;
    app.fakes.script(
        Target::Anthropic,
        calls(vec![call(
            "time__get_current_time",
            r#"{"timezone":"Asia/Tokyo"}"#,
        )]),
    );
    let (mut conn, session_id) = app.start("mcp-user", 24_000).await;
    let streaming = stream(&conn, with_silence(speech("question_16k.wav"), 1.5), 1.0);
    let items = collect_until(&mut conn, Duration::from_secs(30), is_done(1)).await;
    streaming.abort();

    // The model was offered the server's tools under its name, and its answer, spoken,
    // carries the server's result.
    let mut tools = offered(&app);
    tools.sort();
    assert_eq!(tools, ["time__convert_time", "time__get_current_time"]);
    let text = reply_text(&items, 1);
    assert!(
        text.contains(r#""timezone":"Asia/Tokyo""#) && text.contains(r#""datetime":"20"#),
        "{text}"
    );
    assert!(!done(&items, 1).0, "not interrupted");
    assert!(audio_bytes(&items) > 0, "spoken");
    // The result went back to the model as a result, not an error.
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results.len(), 1, "{results:#?}");
    assert_ne!(results[0]["is_error"], true, "{results:#?}");

    end_session(&mut conn).await;
    let rows = tool_rows(&app, &session_id, 1).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (name, kind, outcome, server) = &rows[0];
    assert_eq!(
        (
            name.as_str(),
            kind.as_deref(),
            outcome.as_str(),
            server.as_deref()
        ),
        ("time__get_current_time", Some("server"), "ok", Some("time"))
    );
}

#[tokio::test]
async fn a_hanging_mcp_tool_is_cancelled_at_its_deadline_and_the_turn_still_ends_with_speech() {
    let (app, log, _dir) = with_test_server(
        |s| {
            s.timeout_ms = 500;
        },
        9,
    )
    .await;
    app.fakes.script(
        Target::Anthropic,
        calls(vec![call("test__hang", r#"{"seconds": 30}"#)]),
    );
    let (mut conn, session_id) = app.start("mcp-user", 24_000).await;
    let started = std::time::Instant::now();
    let items = type_turn(&mut conn, "Take your time.", 1).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the turn waited {:?}",
        started.elapsed()
    );
    // The model heard that the tool did not answer, and spoke.
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results[0]["is_error"], true, "{results:#?}");
    assert!(!reply_text(&items, 1).is_empty());
    assert!(audio_bytes(&items) > 0, "spoken");
    // The server was told to stop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !log_lines(&log).contains(&"cancelled hang".to_owned()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no cancellation reached the server: {:?}",
            log_lines(&log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    end_session(&mut conn).await;
    let rows = tool_rows(&app, &session_id, 1).await;
    assert_eq!(
        (rows[0].2.as_str(), rows[0].3.as_deref()),
        ("timed_out", Some("test")),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_crashed_stdio_server_is_restarted_and_the_next_call_works() {
    let (app, _log, _dir) = with_test_server(|_| {}, 9).await;
    app.fakes
        .script(Target::Anthropic, calls(vec![call("test__crash", "{}")]));
    let (mut conn, _) = app.start("mcp-user", 24_000).await;
    type_turn(&mut conn, "Crash, please.", 1).await;
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results[0]["is_error"], true, "{results:#?}");

    // Restarted: a second connection, with its tools, and the next call answers.
    until_up(&app, "test", 9, 2).await;
    app.fakes.script(
        Target::Anthropic,
        calls(vec![call("test__echo", r#"{"text":"back again"}"#)]),
    );
    let items = type_turn(&mut conn, "Are you there?", 2).await;
    assert!(
        reply_text(&items, 2).contains("back again"),
        "{}",
        reply_text(&items, 2)
    );
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"atlas_mcp_server_up{server="test"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn error_results_and_images_reach_the_model_as_errors() {
    let (app, _log, _dir) = with_test_server(|_| {}, 9).await;
    app.fakes.script(
        Target::Anthropic,
        calls(vec![
            call("test__fail", r#"{"reason":"no such city"}"#),
            call("test__picture", "{}"),
            call("test__lookup", r#"{"city":"Paris"}"#),
            call("test__big", r#"{"size": 20000}"#),
        ]),
    );
    let (mut conn, _) = app.start("mcp-user", 24_000).await;
    type_turn(&mut conn, "Try them all.", 1).await;
    let results = anthropic_results(&continued_request(&app));
    let result = |i: usize| {
        (
            results[i]["is_error"] == true,
            results[i]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    assert_eq!(result(0), (true, "no such city".to_owned()), "{results:#?}");
    let (image_error, image) = result(1);
    assert!(image_error && image.contains("an image only"), "{image}");
    // Structured content, as JSON.
    let (lookup_error, lookup) = result(2);
    assert!(!lookup_error, "{lookup}");
    let lookup: Value = serde_json::from_str(&lookup).unwrap();
    assert_eq!(
        lookup,
        json!({"city": "Paris", "forecast": "sunny", "celsius": 21})
    );
    let (big_error, big) = result(3);
    assert!(
        big_error && big.contains("larger than 16384 bytes"),
        "{big}"
    );
}

#[tokio::test]
async fn allow_and_deny_lists_decide_what_the_model_may_call() {
    let (app, log, _dir) = with_test_server(
        |s| {
            s.allow = vec!["echo".into(), "fail".into()];
        },
        2,
    )
    .await;
    app.fakes.script(
        Target::Anthropic,
        calls(vec![
            call("test__secret_tool", "{}"),
            call("test__echo", r#"{"text":"hi"}"#),
        ]),
    );
    let (mut conn, _) = app.start("mcp-user", 24_000).await;
    type_turn(&mut conn, "Tell me a secret.", 1).await;
    let mut tools = offered(&app);
    tools.sort();
    assert_eq!(tools, ["test__echo", "test__fail"]);
    let results = anthropic_results(&continued_request(&app));
    assert_eq!(results[0]["is_error"], true);
    assert!(
        results[0]["content"]
            .as_str()
            .unwrap()
            .contains("no tool named"),
        "{results:#?}"
    );
    // The server never saw the call.
    assert_eq!(log_lines(&log), ["call echo"]);

    // Denied tools are left out of the rest.
    with_test_server(|s| s.deny = vec!["secret_tool".into(), "crash".into()], 7).await;
}

/// The test tree's server over Streamable HTTP on a free port, until dropped.
struct HttpServer {
    _child: tokio::process::Child,
    url: String,
}

impl HttpServer {
    async fn start(token: &str, log: &Path, port: u16) -> HttpServer {
        let mut child = tokio::process::Command::new(python())
            .args([test_server().as_str(), "http", &port.to_string()])
            .env("MCP_TEST_TOKEN", token)
            .env("MCP_TEST_LOG", log)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("the server starts")
            .unwrap()
            .unwrap();
        let addr = line.strip_prefix("listening on ").expect(&line).to_owned();
        HttpServer {
            _child: child,
            url: format!("http://{addr}/mcp"),
        }
    }
}

fn http_server(name: &str, url: &str, token: &str) -> McpServerConfig {
    McpServerConfig {
        headers: BTreeMap::from([("Authorization".into(), format!("Bearer {token}"))]),
        ..McpServerConfig::http(name, url)
    }
}

#[tokio::test]
async fn a_streamable_http_server_is_reached_with_its_token_and_its_new_tools_are_offered() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    let web = HttpServer::start("s3cret-token", &log, 0).await;
    let free_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let later_url = format!("http://127.0.0.1:{free_port}/mcp");
    // A server that refuses the token, and one that is not running yet, do not stop the start.
    let app = spawn_app_with(fast_fakes(), |c: &mut Config| {
        c.mcp_servers = vec![
            http_server("web", &web.url, "s3cret-token"),
            http_server("locked", &web.url, "wrong-token"),
            http_server("later", &later_url, "later-token"),
        ];
    })
    .await;
    until_up(&app, "web", 9, 1).await;
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["status"], "ready", "{ready:#}");
    for down in ["locked", "later"] {
        let details = &ready["mcp_servers"][down];
        assert_eq!(details["state"], "down", "{ready:#}");
        assert!(
            details["problem"].as_str().is_some_and(|p| !p.is_empty()),
            "{ready:#}"
        );
    }
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"atlas_mcp_server_up{server="locked"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"atlas_mcp_tools{server="web"} 9"#),
        "{metrics}"
    );

    // A tool added at the server is offered after the server says the list changed.
    app.fakes.script(
        Target::Anthropic,
        calls(vec![call("web__add_tool", r#"{"name":"forecast"}"#)]),
    );
    let (mut conn, _) = app.start("mcp-user", 24_000).await;
    let items = type_turn(&mut conn, "Learn something new.", 1).await;
    assert!(
        reply_text(&items, 1).contains("added"),
        "{}",
        reply_text(&items, 1)
    );
    until_up(&app, "web", 10, 1).await;
    app.fakes
        .script(Target::Anthropic, calls(vec![call("web__forecast", "{}")]));
    let items = type_turn(&mut conn, "And now?", 2).await;
    assert!(
        reply_text(&items, 2).contains("added"),
        "{}",
        reply_text(&items, 2)
    );
    assert_eq!(
        log_lines(&log),
        ["call add_tool", "call forecast"],
        "every call went through the one connection with the right token"
    );

    // The server that was not running is connected once it runs.
    let later_log = dir.path().join("later.log");
    let later = HttpServer::start("later-token", &later_log, free_port).await;
    assert_eq!(later.url, later_url);
    until_up(&app, "later", 9, 1).await;
    drop(web);
}
