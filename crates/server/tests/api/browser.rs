//! The built-in web page in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`, installed by scripts/test.sh) with a fake microphone fed from a WAV
//! file: the transcript appears, reply audio is played, and a connection cut mid-session ends
//! in a resumed session.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::helpers::*;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn state(client: &fantoccini::Client) -> Value {
    client
        .execute("return window.atlasState;", vec![])
        .await
        .unwrap_or(Value::Null)
}

async fn wait_for(
    client: &fantoccini::Client,
    secs: u64,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = state(client).await;
        if f(&s) {
            return s;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}; page state: {s}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_web_page_talks_plays_the_reply_and_resumes_after_a_cut() {
    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("Debian's chromium is required (apt-get install chromium chromium-driver)");
    let dir = tempfile::tempdir().unwrap();
    // The fake microphone: the question, then silence long enough for the reply (Chromium
    // loops the file).
    let wav = dir.path().join("mic.wav");
    atlas_client::wav::write(&wav, &with_silence(speech("question_16k.wav"), 9.0), 16_000).unwrap();

    let app = spawn_app_with(fast_fakes(), |c| c.dev = true).await;
    let proxy = Proxy::start(app.addr).await.unwrap();
    let port = free_port();
    let _driver = Driver(
        Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium-driver)"),
    );
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                format!("--user-data-dir={}", dir.path().join("profile").display()),
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
                format!("--use-file-for-fake-audio-capture={}", wav.display()),
                "--autoplay-policy=no-user-gesture-required",
                "--window-size=900,700",
            ]
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
    client
        .goto(&format!("http://{}/", proxy.addr))
        .await
        .unwrap();
    client
        .find(Locator::Id("start"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    let s = wait_for(&client, 40, "a transcript and reply audio", |s| {
        s["transcripts"].as_array().is_some_and(|t| !t.is_empty())
            && s["audioChunksPlayed"].as_u64().unwrap_or(0) > 5
    })
    .await;
    assert_eq!(
        s["transcripts"][0],
        "What is the weather like in Paris today?"
    );
    assert_eq!(s["state"], "connected");
    let session_id = s["sessionId"].clone();
    // The transcript is on the page, not just in the state.
    let log = client
        .find(Locator::Id("log"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        log.contains("What is the weather like in Paris today?"),
        "{log}"
    );
    // The running cost arrives with the reply's usage event.
    let s = wait_for(&client, 20, "the running cost", |s| {
        s["costUsd"].as_f64().unwrap_or(0.0) > 0.0
    })
    .await;
    let cost = client
        .find(Locator::Id("cost"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(cost, format!("${:.4}", s["costUsd"].as_f64().unwrap()));
    if let Ok(path) = std::env::var("ATLAS_SCREENSHOT") {
        std::fs::write(path, client.screenshot().await.unwrap()).unwrap();
    }

    // Cut the connection mid-session; the page reconnects and resumes.
    proxy.cut();
    proxy.restore();
    let s = wait_for(&client, 30, "a resumed session", |s| {
        s["resumed"] == true && s["state"] == "connected"
    })
    .await;
    assert_eq!(s["sessionId"], session_id, "the same session");
    client.close().await.unwrap();
}
