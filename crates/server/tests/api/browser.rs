//! The built-in web page, on the browser SDK (`clients/web`), in a real headless Chromium
//! (Debian's `chromium` and `chromium-driver`, installed by scripts/test.sh) with a fake
//! microphone fed from a WAV file: a spoken turn, Stop then Start, a cut connection, a drain
//! with and without Redis, token refresh, a non-fatal error, and typed text.
//!
//! The tests read the page's `window.atlasState` and its visible text. One browser runs at a
//! time (a lock here, a test group in `.config/nextest.toml`): two cores do not carry more.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use atlas_fakes::{Fault, Target};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::*;

static ONE_BROWSER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium with a WAV file as its microphone, and the page at `url`.
struct Browser {
    client: Client,
    _driver: Driver,
    _dir: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("Debian's chromium is required (apt-get install chromium chromium-driver)")
}

/// The question, then silence long enough for the reply (Chromium loops the file).
fn spoken_question() -> Vec<i16> {
    with_silence(speech("question_16k.wav"), 9.0)
}

/// A microphone that hears nothing: the session only sees typed or scripted input.
fn silence() -> Vec<i16> {
    vec![0; 16_000]
}

impl Browser {
    async fn open(url: &str, mic: Vec<i16>) -> Browser {
        let turn = ONE_BROWSER_AT_A_TIME.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let wav = dir.path().join("mic.wav");
        atlas_client::wav::write(&wav, &mic, 16_000).unwrap();
        let port = free_port();
        let driver = Driver(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver (apt-get install chromium-driver)"),
        );
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": chromium_args(dir.path(), &wav),
            }
        });
        let caps = caps.as_object().unwrap().clone();
        let mut client = None;
        for _ in 0..50 {
            match ClientBuilder::rustls()
                .unwrap()
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let client = client.expect("a WebDriver session");
        client.goto(url).await.unwrap();
        Browser {
            client,
            _driver: driver,
            _dir: dir,
            _turn: turn,
        }
    }

    async fn state(&self) -> Value {
        self.client
            .execute("return window.atlasState;", vec![])
            .await
            .unwrap_or(Value::Null)
    }

    /// Polls the page's state until `f` holds (200 ms apart: the page is observed, not timed).
    async fn wait_for(&self, secs: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.state().await;
            if f(&s) {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; page state: {s}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The element of the page with this id.
    async fn element(&self, id: &str) -> fantoccini::elements::Element {
        self.client.find(Locator::Id(id)).await.unwrap()
    }

    async fn click(&self, id: &str) {
        self.element(id).await.click().await.unwrap();
    }

    async fn text(&self, id: &str) -> String {
        self.element(id).await.text().await.unwrap()
    }

    /// Starts a conversation and waits for its session.
    async fn start(&self) -> Value {
        self.click("start").await;
        self.wait_for(20, "a session", |s| {
            s["state"] == "listening" && s["sessionId"].is_string()
        })
        .await
    }

    async fn close(self) {
        self.client.close().await.unwrap();
    }
}

fn chromium_args(profile: &Path, wav: &Path) -> Vec<String> {
    vec![
        "--headless=new".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--no-first-run".into(),
        format!("--user-data-dir={}", profile.join("profile").display()),
        "--use-fake-device-for-media-stream".into(),
        "--use-fake-ui-for-media-stream".into(),
        format!("--use-file-for-fake-audio-capture={}", wav.display()),
        "--autoplay-policy=no-user-gesture-required".into(),
        "--window-size=900,900".into(),
    ]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn notices(s: &Value) -> Vec<String> {
    s["notices"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["text"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_spoken_turn_is_shown_played_and_costed_and_a_cut_connection_resumes() {
    let app = spawn_app_with(fast_fakes(), |c| c.dev = true).await;
    let proxy = Proxy::start(app.addr).await.unwrap();
    let browser = Browser::open(&format!("http://{}/", proxy.addr), spoken_question()).await;
    browser.click("start").await;

    let s = browser
        .wait_for(40, "a transcript and reply audio", |s| {
            s["transcripts"].as_array().is_some_and(|t| !t.is_empty())
                && s["audioChunksPlayed"].as_u64().unwrap_or(0) > 5
        })
        .await;
    assert_eq!(
        s["transcripts"][0],
        "What is the weather like in Paris today?"
    );
    let session_id = s["sessionId"].clone();
    // The transcript, the reply and its latency breakdown are on the page.
    let s = browser
        .wait_for(20, "the reply's usage", |s| {
            s["costUsd"].as_f64().unwrap_or(0.0) > 0.0
        })
        .await;
    let log = browser.text("log").await;
    assert!(
        log.contains("You: What is the weather like in Paris today?"),
        "{log}"
    );
    assert!(log.contains("Assistant: "), "{log}");
    assert!(log.contains("first audio "), "latency breakdown: {log}");
    assert!(log.contains(" ms"), "{log}");
    // The running cost with the session budget.
    let cost = browser.text("cost").await;
    assert_eq!(cost, format!("${:.4}", s["costUsd"].as_f64().unwrap()));
    assert_eq!(browser.text("budget").await.trim(), "of $5.00");
    // The state follows the turn back to listening once the reply has played.
    browser
        .wait_for(20, "listening after the reply", |s| {
            s["state"] == "listening"
        })
        .await;
    if let Ok(path) = std::env::var("ATLAS_SCREENSHOT") {
        // The page's content, without the empty window below it.
        let body = browser.client.find(Locator::Css("html")).await.unwrap();
        std::fs::write(path, body.screenshot().await.unwrap()).unwrap();
    }

    // Cut the connection mid-session; the page reconnects and resumes.
    proxy.cut();
    proxy.restore();
    let s = browser
        .wait_for(30, "a resumed session", |s| {
            s["resumed"] == true && s["state"] == "listening"
        })
        .await;
    assert_eq!(s["sessionId"], session_id, "the same session");
    assert_eq!(strings(&s["sessions"]).len(), 1, "no new session");
    browser.close().await;
}

#[tokio::test]
async fn stop_then_start_begins_a_new_session_at_once() {
    let app = spawn_app_with(fast_fakes(), |c| c.dev = true).await;
    let browser = Browser::open(&format!("http://{}/", app.addr), silence()).await;
    let first = browser.start().await;
    browser.click("stop").await;
    browser
        .wait_for(5, "closed", |s| s["state"] == "closed")
        .await;
    let began = tokio::time::Instant::now();
    browser.click("start").await;
    let s = browser
        .wait_for(5, "a second session", |s| {
            strings(&s["sessions"]).len() == 2 && s["state"] == "listening"
        })
        .await;
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "at once, no retries"
    );
    assert_ne!(s["sessionId"], first["sessionId"]);
    assert_eq!(s["resumed"], false);
    assert!(s["reconnects"].is_null(), "no reconnect attempt: {s}");
    assert!(s["errors"].as_array().unwrap().is_empty(), "{s}");
    browser.close().await;
}

/// A deploy under a page in session: two development instances A and B (`tweak` applied to
/// both) behind a load balancer; the page starts a session on A, then the load balancer
/// sends new connections to B and A drains. Returns the page, the state it had once its first
/// session started, and the instances and load balancer (to keep them alive).
async fn deploy_under_a_session(
    tweak: impl Fn(&mut atlas_server::Config),
) -> (Browser, Value, (TestApp, TestApp, Proxy)) {
    let dev = |c: &mut atlas_server::Config| {
        c.dev = true;
        tweak(c);
    };
    let a = spawn_app_with(fast_fakes(), &dev).await;
    let b = spawn_app_with(fast_fakes(), &dev).await;
    let lb = Proxy::start(a.addr).await.unwrap();
    let browser = Browser::open(&format!("http://{}/", lb.addr), silence()).await;
    let first = browser.start().await;
    lb.set_upstream(b.addr);
    a.shutdown.cancel();
    (browser, first, (a, b, lb))
}

#[tokio::test]
async fn a_drain_without_redis_starts_a_fresh_session_on_the_other_instance() {
    let (browser, first, _deployed) = deploy_under_a_session(|_| {}).await;
    let s = browser
        .wait_for(15, "a fresh session on B", |s| {
            strings(&s["sessions"]).len() == 2 && s["state"] == "listening"
        })
        .await;
    assert_ne!(s["sessionId"], first["sessionId"]);
    assert_eq!(s["resumed"], false);
    assert!(notices(&s).iter().any(|n| n.contains("restarting")), "{s}");
    assert!(s["closed"].is_null(), "{s}");
    browser.close().await;
}

#[tokio::test]
async fn a_drain_with_redis_resumes_the_session_on_the_other_instance() {
    let prefix = format!("atlas-browser-{}", uuid::Uuid::new_v4());
    let (browser, first, _deployed) = deploy_under_a_session(|c| {
        c.redis_url = Some("redis://127.0.0.1:6379".into());
        c.redis_prefix = prefix.clone();
    })
    .await;
    let s = browser
        .wait_for(15, "the session resumed on B", |s| {
            s["resumed"] == true && s["state"] == "listening"
        })
        .await;
    assert_eq!(s["sessionId"], first["sessionId"], "the same session");
    assert_eq!(strings(&s["sessions"]).len(), 1);
    browser.close().await;
}

#[tokio::test]
async fn the_page_refreshes_its_token_before_expiry_and_keeps_the_session() {
    // 12 s tokens with 1 s of grace: without auth.refresh the session closes with 4401 at 13 s.
    let app = spawn_app_with(fast_fakes(), |c| {
        c.dev = true;
        c.dev_token_ttl_s = 12;
        c.token_grace_s = 1;
    })
    .await;
    let browser = Browser::open(&format!("http://{}/", app.addr), silence()).await;
    let first = browser.start().await;
    let s = browser
        .wait_for(40, "three token refreshes", |s| {
            s["tokenRefreshes"].as_u64().unwrap_or(0) >= 3 || !s["closed"].is_null()
        })
        .await;
    assert!(s["closed"].is_null(), "the session ended: {s}");
    assert_eq!(s["sessionId"], first["sessionId"]);
    assert_eq!(s["state"], "listening");
    assert!(s["errors"].as_array().unwrap().is_empty(), "{s}");
    browser.close().await;
}

#[tokio::test]
async fn a_non_fatal_error_is_shown_and_the_session_goes_on() {
    let app = spawn_app_with(fast_fakes(), |c| c.dev = true).await;
    for _ in 0..3 {
        app.fakes.inject(
            Target::Anthropic,
            Fault::Status {
                status: 500,
                retry_after_s: None,
            },
        );
    }
    let browser = Browser::open(&format!("http://{}/", app.addr), spoken_question()).await;
    browser.click("start").await;
    let s = browser
        .wait_for(40, "the error", |s| {
            strings(&s["errors"]).contains(&"llm_failed".to_owned())
        })
        .await;
    let shown = browser.text("notices").await;
    let message = notices(&s).into_iter().last().unwrap();
    assert!(shown.contains(&message), "{shown} shows {message}");
    // The session goes on: the next turn is answered.
    browser
        .wait_for(40, "a second, answered turn", |s| {
            s["transcripts"].as_array().is_some_and(|t| t.len() >= 2)
                && s["replies"].as_array().is_some_and(|r| {
                    r.iter()
                        .skip(1)
                        .any(|x| !x.as_str().unwrap_or_default().is_empty())
                })
        })
        .await;
    let s = browser.state().await;
    assert!(s["closed"].is_null(), "{s}");
    browser.close().await;
}

#[tokio::test]
async fn typed_text_is_answered() {
    let app = spawn_app_with(fast_fakes(), |c| c.dev = true).await;
    let browser = Browser::open(&format!("http://{}/", app.addr), silence()).await;
    browser.start().await;
    let field = browser.client.find(Locator::Id("text")).await.unwrap();
    field.send_keys("Tell me a joke").await.unwrap();
    browser.click("send").await;
    let s = browser
        .wait_for(30, "the typed turn answered", |s| {
            strings(&s["transcripts"]) == ["Tell me a joke"]
                && strings(&s["replies"]).iter().any(|r| !r.is_empty())
        })
        .await;
    assert!(s["errors"].as_array().unwrap().is_empty(), "{s}");
    let log = browser.text("log").await;
    assert!(log.contains("You: Tell me a joke"), "{log}");
    assert_eq!(field.prop("value").await.unwrap().as_deref(), Some(""));
    browser.close().await;
}
