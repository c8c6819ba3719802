//! Spawning the application and talking to it.

use std::path::PathBuf;
use std::time::Duration;

use tokio::task::JoinHandle;

use atlas_client::{ConnectOptions, Connection, Incoming, TokenCarrier, connect, stream_pcm, wav};
use atlas_protocol::{AudioFormat, ClientMessage, ServerEvent, SessionStart};

pub use atlas_testkit::{SECRET, TestApp, fast_fakes, spawn_app_with};

pub async fn spawn_app() -> TestApp {
    spawn_app_with(fast_fakes(), |_| {}).await
}

/// What the tests do with a running server.
pub(crate) trait AppExt {
    fn token(&self, user: &str) -> String;
    async fn connect(&self, user: &str) -> Connection;
    async fn connect_with(&self, user: &str, carrier: TokenCarrier) -> Connection;
    async fn start(&self, user: &str, output_rate: u32) -> (Connection, String);
    async fn get(&self, path: &str) -> reqwest::Response;
    async fn get_text(&self, path: &str) -> String;
    async fn get_json(&self, path: &str) -> serde_json::Value;
    async fn post_dev_token(&self, body: Option<&serde_json::Value>) -> reqwest::Response;
    fn last_llm_messages(&self) -> Vec<serde_json::Value>;
}

impl AppExt for TestApp {
    fn token(&self, user: &str) -> String {
        atlas_testkit::token(user)
    }

    async fn connect(&self, user: &str) -> Connection {
        connect(&ConnectOptions::new(self.url(), self.token(user)))
            .await
            .expect("connects")
    }

    async fn connect_with(&self, user: &str, carrier: TokenCarrier) -> Connection {
        let mut o = ConnectOptions::new(self.url(), self.token(user));
        o.carrier = carrier;
        connect(&o).await.expect("connects")
    }

    /// Connects and starts a session with the given output rate; returns the session id.
    async fn start(&self, user: &str, output_rate: u32) -> (Connection, String) {
        let mut conn = self.connect(user).await;
        let id = start_with(&mut conn, start_message(16_000, output_rate)).await;
        (conn, id)
    }

    /// A GET of `path`.
    async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("http://{}{path}", self.addr))
            .await
            .unwrap()
    }

    /// The body of a GET of `path` (`/metrics`, say).
    async fn get_text(&self, path: &str) -> String {
        self.get(path).await.text().await.unwrap()
    }

    /// The JSON body of a GET of `path` (`/readyz`, say).
    async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.unwrap()
    }

    /// `POST /dev/token`, with `body` as its JSON when given.
    async fn post_dev_token(&self, body: Option<&serde_json::Value>) -> reqwest::Response {
        let mut request = reqwest::Client::new().post(format!("http://{}/dev/token", self.addr));
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.unwrap()
    }

    /// The messages of the last request the LLM fake received.
    fn last_llm_messages(&self) -> Vec<serde_json::Value> {
        let recorded = self.fakes.recorded();
        recorded.llm_requests.last().unwrap().1["messages"]
            .as_array()
            .unwrap()
            .clone()
    }
}

pub fn start_message(input_rate: u32, output_rate: u32) -> ClientMessage {
    ClientMessage::SessionStart(SessionStart {
        input_audio: AudioFormat {
            sample_rate: input_rate,
            ..AudioFormat::DEFAULT_INPUT
        },
        output_audio: AudioFormat {
            sample_rate: output_rate,
            ..AudioFormat::DEFAULT_OUTPUT
        },
        ..SessionStart::default()
    })
}

/// A speech fixture made with espeak-ng (see scripts/make-test-audio.sh), 16 kHz mono.
/// Fakes for a barge-in: realistic synthesis length (60 ms per character), so the reply is
/// still playing when the user speaks again, and the two things the user says.
pub fn barge_in_fakes() -> atlas_fakes::FakesConfig {
    let mut fakes = fast_fakes();
    fakes.tts.ms_per_char = 60;
    fakes.stt.transcripts = vec![
        "What is the weather like in Paris today?".into(),
        "Please tell me about Rome instead".into(),
    ];
    fakes
}

/// Sends `start` and waits for `session.started`; returns the session id.
pub async fn start_with(conn: &mut Connection, start: ClientMessage) -> String {
    conn.sender.send(&start).await.unwrap();
    let items = collect_until(conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::SessionStarted { .. }))
    })
    .await;
    match items.last().and_then(event) {
        Some(ServerEvent::SessionStarted { session_id, .. }) => session_id.clone(),
        _ => panic!("not started: {:#?}", summary(&items)),
    }
}

/// The test question, then, once its reply is heard, the interruption phrase; collects until
/// turn `until` is done.
pub async fn question_then_interruption(conn: &mut Connection, until: u64) -> Vec<Incoming> {
    let streaming = stream(conn, with_silence(speech("question_16k.wav"), 0.5), 1.0);
    let mut items = collect_until(conn, Duration::from_secs(20), |i| {
        matches!(i, Incoming::Audio { .. })
    })
    .await;
    streaming.await.unwrap();
    // The reply is playing; the user speaks again.
    let streaming = stream(conn, with_silence(speech("interrupt_16k.wav"), 1.5), 1.0);
    items.extend(collect_until(conn, Duration::from_secs(30), is_done(until)).await);
    streaming.await.unwrap();
    items
}

pub fn speech(name: &str) -> Vec<i16> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/audio")
        .join(name);
    let (samples, rate) = wav::read(&path).expect("fixture");
    assert_eq!(rate, 16_000);
    samples
}

/// Streams `samples` (16 kHz) in 100 ms chunks at `pace` × real time, in the background.
pub fn stream(conn: &Connection, samples: Vec<i16>, pace: f64) -> JoinHandle<()> {
    let sender = conn.sender.clone();
    tokio::spawn(async move {
        let _ = stream_pcm(&sender, &samples, 16_000, 100, pace).await;
    })
}

pub fn event(i: &Incoming) -> Option<&ServerEvent> {
    match i {
        Incoming::Event { event, .. } => Some(event),
        _ => None,
    }
}

/// Collects incoming items until `stop` matches one (included); panics on timeout or close.
pub async fn collect_until(
    conn: &mut Connection,
    timeout: Duration,
    mut stop: impl FnMut(&Incoming) -> bool,
) -> Vec<Incoming> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut items = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, conn.incoming.recv()).await {
            Ok(Some(item)) => {
                let done = stop(&item);
                let closed = matches!(item, Incoming::Closed { .. });
                items.push(item);
                if done {
                    return items;
                }
                if closed {
                    panic!(
                        "connection closed before the expected item: {:#?}",
                        summary(&items)
                    );
                }
            }
            Ok(None) => panic!("connection ended: {:#?}", summary(&items)),
            Err(_) => panic!("timed out; got {:#?}", summary(&items)),
        }
    }
}

/// Items as short strings, audio frames folded, for failure messages.
pub fn summary(items: &[Incoming]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for i in items {
        match i {
            Incoming::Audio { pcm, .. } => match out.last_mut() {
                Some(last) if last.starts_with("audio") => {
                    let n: usize = last[6..].trim_end_matches(" bytes").parse().unwrap_or(0);
                    *last = format!("audio {} bytes", n + pcm.len());
                }
                _ => out.push(format!("audio {} bytes", pcm.len())),
            },
            Incoming::Event { event, .. } => out.push(event.to_json()),
            Incoming::Closed { code, reason, .. } => out.push(format!("closed {code:?} {reason}")),
        }
    }
    out
}

pub fn is_done(turn: u64) -> impl FnMut(&Incoming) -> bool {
    move |i| matches!(event(i), Some(ServerEvent::ResponseDone { turn_id, .. }) if *turn_id == turn)
}

pub fn audio_bytes(items: &[Incoming]) -> usize {
    items
        .iter()
        .map(|i| match i {
            Incoming::Audio { pcm, .. } => pcm.len(),
            _ => 0,
        })
        .sum()
}

pub fn errors(items: &[Incoming]) -> Vec<(atlas_protocol::ErrorCode, bool)> {
    items
        .iter()
        .filter_map(|i| match event(i) {
            Some(ServerEvent::Error { code, fatal, .. }) => Some((*code, *fatal)),
            _ => None,
        })
        .collect()
}

/// Streams the spoken test question, then a second of silence, at 4 × real time.
pub fn ask(conn: &Connection) -> JoinHandle<()> {
    stream(conn, with_silence(speech("question_16k.wav"), 1.0), 4.0)
}

/// Sends `text` as a typed turn.
pub async fn type_text(conn: &Connection, text: &str) {
    conn.sender
        .send(&ClientMessage::InputText { text: text.into() })
        .await
        .unwrap();
}

/// Collects incoming items until the connection closes (included).
pub async fn until_closed(conn: &mut Connection, timeout: Duration) -> Vec<Incoming> {
    collect_until(conn, timeout, |i| matches!(i, Incoming::Closed { .. })).await
}

/// Collects incoming items until the next usage event (included).
pub async fn until_usage(conn: &mut Connection) -> Vec<Incoming> {
    collect_until(conn, Duration::from_secs(5), |i| {
        matches!(event(i), Some(ServerEvent::Usage(_)))
    })
    .await
}

/// Sends `session.end` and collects until the close.
pub async fn end_session(conn: &mut Connection) -> Vec<Incoming> {
    conn.sender.send(&ClientMessage::SessionEnd).await.unwrap();
    until_closed(conn, Duration::from_secs(5)).await
}

/// Sends a ping and checks that its pong comes back (not a close) within two seconds.
pub async fn assert_answers_ping(conn: &mut Connection) {
    conn.sender
        .send(&ClientMessage::Ping { id: None })
        .await
        .unwrap();
    let items = collect_until(conn, Duration::from_secs(2), |i| {
        matches!(event(i), Some(ServerEvent::Pong { .. })) || matches!(i, Incoming::Closed { .. })
    })
    .await;
    assert!(
        matches!(items.last().and_then(event), Some(ServerEvent::Pong { .. })),
        "{:#?}",
        summary(&items)
    );
}

/// Whether `items` end with the connection closed with `code`.
pub fn closed_with(items: &[Incoming], code: u16) -> bool {
    matches!(items.last(), Some(Incoming::Closed { code: Some(c), .. }) if *c == code)
}

/// Appends `secs` of silence.
pub fn with_silence(mut samples: Vec<i16>, secs: f64) -> Vec<i16> {
    samples.extend(std::iter::repeat_n(0, (16_000.0 * secs) as usize));
    samples
}

pub use atlas_fakes::proxy::Proxy;
