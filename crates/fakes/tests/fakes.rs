//! Exercises every fake over loopback with real clients (tokio-tungstenite, reqwest).

use std::time::{Duration, Instant};

use atlas_fakes::{
    Fakes, FakesConfig, Fault, LlmFakeConfig, ScriptedCall, ScriptedReply, SttFakeConfig, Target,
    TtsFakeConfig,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

const KEY: &str = "test-key";
const QUERY: &str = "model=nova-3&encoding=linear16&sample_rate=16000&channels=1&interim_results=true&utterance_end_ms=1000&vad_events=true&endpointing=300&punctuate=true&smart_format=true";
const DEFAULT_TRANSCRIPT: &str = "What is the weather like in Paris today?";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn start(config: FakesConfig) -> Fakes {
    Fakes::start(
        FakesConfig {
            api_key: Some(KEY.into()),
            ..config
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// Sending a request in a test (transport failures panic).
trait SendExt {
    /// The response.
    async fn sent(self) -> reqwest::Response;
    /// The response's body as text.
    async fn text_body(self) -> String;
    /// The response's body as JSON.
    async fn json_body(self) -> Value;
}

impl SendExt for reqwest::RequestBuilder {
    async fn sent(self) -> reqwest::Response {
        self.send().await.unwrap()
    }

    async fn text_body(self) -> String {
        self.sent().await.text().await.unwrap()
    }

    async fn json_body(self) -> Value {
        self.sent().await.json().await.unwrap()
    }
}

/// Sends a text message on `ws`.
async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// Sends `audio` in 20 ms messages until the fake stops taking them.
async fn send_audio_until_refused(ws: &mut Ws, audio: &[u8]) {
    for chunk in audio.chunks(640) {
        if ws.send(Message::binary(chunk.to_vec())).await.is_err() {
            break;
        }
    }
}

/// A fault answering with `status` (and `retry-after`, when given).
fn status_fault(status: u16, retry_after_s: Option<u64>) -> Fault {
    Fault::Status {
        status,
        retry_after_s,
    }
}

/// The JSON data of the SSE events of the response to `request` (without `[DONE]`).
async fn sse_json(request: reqwest::RequestBuilder) -> Vec<Value> {
    sse_data(&request.text_body().await)
}

/// The error body of the 400 the fake answers `request` with; its message must contain
/// `wanted`.
async fn refusal(request: reqwest::RequestBuilder, wanted: &str) -> Value {
    let response = request.sent().await;
    assert_eq!(response.status(), 400, "{wanted}");
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains(wanted), "{message} lacks {wanted}");
    v
}

/// The status of the answer to the control route `POST /_fakes/{route}` with `body` (any
/// fake's port serves it).
async fn post_control(fakes: &Fakes, route: &str, body: &Value) -> u16 {
    let response = reqwest::Client::new()
        .post(format!("{}/_fakes/{route}", fakes.anthropic_url()))
        .json(body)
        .sent()
        .await;
    response.status().as_u16()
}

/// Checks that the control route `POST /_fakes/{route}` takes `good` and refuses `bad` (400).
async fn check_control_route(fakes: &Fakes, route: &str, good: &Value, bad: &Value) {
    assert_eq!(post_control(fakes, route, good).await, 200);
    assert_eq!(post_control(fakes, route, bad).await, 400);
}

/// The text of a streamed LLM answer (Anthropic text deltas or OpenAI content deltas) to
/// `request`.
async fn spoken(request: reqwest::RequestBuilder) -> String {
    let data = sse_json(request).await;
    data.iter()
        .filter_map(|d| {
            if d["type"] == "content_block_delta" {
                Some(d["delta"]["text"].as_str().unwrap())
            } else {
                d["choices"][0]["delta"]["content"].as_str()
            }
        })
        .collect()
}

/// Checks that the streamed LLM answer to `request` says `expected`.
async fn assert_spoken(request: reqwest::RequestBuilder, expected: &str) {
    assert_eq!(spoken(request).await, expected);
}

/// `good` with its third message (the tool results) replaced by the person's words.
fn words_instead_of_results(good: &Value) -> Value {
    let mut unanswered = good.clone();
    unanswered["messages"][2] = json!({"role": "user", "content": "never mind"});
    unanswered
}

/// `body` asking for a whole (non-streamed) answer.
fn not_streamed(body: &Value) -> Value {
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    plain
}

/// An Anthropic request body: `fields` with the test model and a 256-token cap.
fn claude(fields: Value) -> Value {
    let mut body = json!({"model": "claude-test", "max_tokens": 256});
    let Value::Object(fields) = fields else {
        panic!("fields must be an object")
    };
    body.as_object_mut().unwrap().extend(fields);
    body
}

/// An OpenAI chat request body: `fields` with the test model.
fn gpt(fields: Value) -> Value {
    let Value::Object(mut body) = fields else {
        panic!("fields must be an object")
    };
    body.insert("model".into(), json!("gpt-test"));
    Value::Object(body)
}

/// Fakes with a fast LLM, and a client.
async fn llm_fakes() -> (Fakes, reqwest::Client) {
    let fakes = start(FakesConfig {
        llm: fast_llm(),
        ..FakesConfig::default()
    })
    .await;
    (fakes, reqwest::Client::new())
}

fn fast_llm() -> LlmFakeConfig {
    LlmFakeConfig {
        first_token: Duration::from_millis(60),
        tokens_per_s: 400.0,
        reply: None,
        tool_call: None,
    }
}

fn tone(ms: u64, amplitude: f64) -> Vec<u8> {
    (0..ms * 16)
        .flat_map(|i| {
            let t = i as f64 / 16_000.0;
            ((amplitude * 32767.0 * (std::f64::consts::TAU * 200.0 * t).sin()) as i16).to_le_bytes()
        })
        .collect()
}

fn silence(ms: u64) -> Vec<u8> {
    vec![0; (ms * 32) as usize]
}

async fn connect_stt(fakes: &Fakes, query: &str, key: &str) -> Result<Ws, tungstenite::Error> {
    let mut request = format!("{}/v1/listen?{query}", fakes.deepgram_url())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Token {key}").parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(ws, _)| ws)
}

/// The next text message as JSON (skipping pings); `None` on close, error or end.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out waiting for a message")
        {
            Some(Ok(Message::Text(t))) => return Some(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            _ => return None,
        }
    }
}

/// Reads until the socket ends; returns the JSON messages and the close frame, if any.
async fn read_to_end(ws: &mut Ws) -> (Vec<Value>, Option<(u16, String)>) {
    let mut messages = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("timed out waiting for the end of the stream")
        {
            Some(Ok(Message::Text(t))) => messages.push(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(frame))) => {
                let frame = frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned()));
                return (messages, frame);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (messages, None),
        }
    }
}

fn transcript(results: &Value) -> &str {
    results["channel"]["alternatives"][0]["transcript"]
        .as_str()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Deepgram

#[tokio::test]
async fn stt_detects_speech_in_real_time_audio() {
    let fakes = start(FakesConfig::default()).await;
    let ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
    let (mut sink, mut stream) = ws.split();

    let reader = tokio::spawn(async move {
        let mut received = Vec::new();
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    received.push((
                        Instant::now(),
                        serde_json::from_str::<Value>(t.as_str()).unwrap(),
                    ));
                }
                Ok(Message::Close(frame)) => {
                    return (received, frame.map(|f| u16::from(f.code)));
                }
                Ok(_) => {}
                Err(e) => panic!("socket error: {e}"),
            }
        }
        (received, None)
    });

    // 300 ms silence, 1 s tone, 1.5 s silence, sent in real time as 20 ms messages.
    let mut audio = silence(300);
    audio.extend(tone(1000, 0.3));
    audio.extend(silence(1500));
    let t0 = Instant::now();
    let mut end_of_speech_sent = None;
    for (k, chunk) in audio.chunks(640).enumerate() {
        let due = t0 + Duration::from_millis(20 * (k as u64 + 1));
        tokio::time::sleep_until(due.into()).await;
        sink.send(Message::binary(chunk.to_vec())).await.unwrap();
        if (k + 1) * 20 == 1300 {
            end_of_speech_sent = Some(Instant::now());
        }
    }
    sink.send(Message::text(r#"{"type":"CloseStream"}"#))
        .await
        .unwrap();
    let (received, close) = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(close, Some(1000));

    let kinds: Vec<&str> = received
        .iter()
        .map(|(_, m)| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "SpeechStarted", "{kinds:?}");
    assert!((received[0].1["timestamp"].as_f64().unwrap() - 0.3).abs() < 0.02);
    assert_eq!(kinds.last(), Some(&"Metadata"));

    let interims: Vec<&Value> = received
        .iter()
        .map(|(_, m)| m)
        .filter(|m| m["type"] == "Results" && m["is_final"] == false)
        .collect();
    assert!(interims.len() >= 2, "{kinds:?}");
    assert!(DEFAULT_TRANSCRIPT.starts_with(transcript(interims[0])));
    assert!(!transcript(interims[0]).is_empty());

    let final_pos = received
        .iter()
        .position(|(_, m)| m["speech_final"] == true)
        .expect("a speech_final result");
    let (final_at, fin) = &received[final_pos];
    assert_eq!(fin["is_final"], true);
    assert_eq!(transcript(fin), DEFAULT_TRANSCRIPT);
    let words = fin["channel"]["alternatives"][0]["words"]
        .as_array()
        .unwrap();
    assert_eq!(words.len(), 8);
    assert_eq!(words[0]["word"], "what");
    assert_eq!(words[7]["punctuated_word"], "today?");
    assert!((words[0]["start"].as_f64().unwrap() - 0.3).abs() < 0.02);
    assert!((words[7]["end"].as_f64().unwrap() - 1.3).abs() < 0.02);
    // The final comes final_delay (150 ms) after the end of speech.
    let latency = final_at.duration_since(end_of_speech_sent.unwrap());
    assert!(
        latency >= Duration::from_millis(140) && latency < Duration::from_secs(1),
        "final latency {latency:?}"
    );

    let ue_pos = kinds
        .iter()
        .position(|k| *k == "UtteranceEnd")
        .expect("UtteranceEnd");
    assert!(ue_pos > final_pos);
    assert!((received[ue_pos].1["last_word_end"].as_f64().unwrap() - 1.3).abs() < 0.02);

    let metadata = &received.last().unwrap().1;
    assert!((metadata["duration"].as_f64().unwrap() - 2.8).abs() < 0.001);
    assert_eq!(metadata["channels"], 1);

    let recorded = fakes.recorded();
    assert_eq!(recorded.stt_connections, vec![QUERY.to_owned()]);
    assert_eq!(recorded.stt_audio_bytes, audio.len() as u64);
    assert_eq!(recorded.stt_audio_messages, audio.chunks(640).len() as u64);
    assert_eq!(recorded.stt_close_streams, 1);
    fakes.shutdown().await;
}

#[tokio::test]
async fn stt_finalize_keepalive_and_transcript_cycling() {
    let fakes = start(FakesConfig {
        stt: SttFakeConfig {
            transcripts: vec!["first one".into(), "second one".into()],
            ..SttFakeConfig::default()
        },
        ..FakesConfig::default()
    })
    .await;
    let mut ws = connect_stt(&fakes, "encoding=linear16&sample_rate=16000", KEY)
        .await
        .unwrap();
    for transcript_expected in ["first one", "second one", "first one"] {
        for chunk in tone(500, 0.3).chunks(640) {
            ws.send(Message::binary(chunk.to_vec())).await.unwrap();
        }
        send_text(&mut ws, r#"{"type":"KeepAlive"}"#).await;
        send_text(&mut ws, r#"{"type":"Finalize"}"#).await;
        let result = next_json(&mut ws).await.unwrap();
        assert_eq!(result["type"], "Results");
        assert_eq!(result["is_final"], true);
        assert_eq!(result["speech_final"], false);
        assert_eq!(result["from_finalize"], true);
        assert_eq!(transcript(&result), transcript_expected);
    }
    send_text(&mut ws, r#"{"type":"Unknown"}"#).await;
    send_text(&mut ws, r#"{"type":"CloseStream"}"#).await;
    let (messages, close) = read_to_end(&mut ws).await;
    assert_eq!(messages.last().unwrap()["type"], "Metadata");
    assert_eq!(close.map(|c| c.0), Some(1000));
    let recorded = fakes.recorded();
    assert_eq!(recorded.stt_keepalives, 3);
    assert_eq!(recorded.stt_finalizes, 3);
    assert_eq!(recorded.stt_close_streams, 1);
}

#[tokio::test]
async fn stt_refuses_bad_upgrades_in_deepgram_shape() {
    let fakes = start(FakesConfig::default()).await;
    let refusal = |result: Result<Ws, tungstenite::Error>| match result {
        Err(tungstenite::Error::Http(response)) => {
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            (response.status().as_u16(), response.headers().clone(), body)
        }
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("upgrade unexpectedly accepted"),
    };

    let (status, _, body) = refusal(connect_stt(&fakes, QUERY, "wrong").await);
    assert_eq!(status, 401);
    assert_eq!(body["err_code"], "INVALID_AUTH");
    assert!(body["request_id"].is_string());

    let (status, headers, body) = refusal(connect_stt(&fakes, "encoding=opus", KEY).await);
    assert_eq!(status, 400);
    assert!(body["err_msg"].as_str().unwrap().contains("opus"));
    assert!(headers.contains_key("dg-error"));

    fakes.inject(Target::Stt, status_fault(429, Some(2)));
    let (status, headers, body) = refusal(connect_stt(&fakes, QUERY, KEY).await);
    assert_eq!(status, 429);
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(body["err_code"], "TOO_MANY_REQUESTS");
    // One-shot: the next connection is accepted.
    let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
    ws.close(None).await.unwrap();
    assert_eq!(fakes.recorded().stt_connections.len(), 4);
}

#[tokio::test]
async fn stt_faults_and_inactivity() {
    let fakes = start(FakesConfig {
        stt: SttFakeConfig {
            inactivity_timeout: Duration::from_millis(400),
            ..SttFakeConfig::default()
        },
        ..FakesConfig::default()
    })
    .await;
    let speech = tone(1000, 0.3);

    // DropMidStream: one interim, then the TCP connection goes away without a close frame.
    fakes.inject(Target::Stt, Fault::DropMidStream);
    let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
    send_audio_until_refused(&mut ws, &speech).await;
    let (messages, close) = read_to_end(&mut ws).await;
    assert_eq!(close, None, "no close frame expected");
    let results: Vec<&Value> = messages.iter().filter(|m| m["type"] == "Results").collect();
    assert_eq!(results.len(), 1, "{messages:?}");
    assert_eq!(results[0]["is_final"], false);

    // MidStreamError: close 1011 DATA-0000 after the first interim.
    fakes.inject(Target::Stt, Fault::MidStreamError);
    let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
    send_audio_until_refused(&mut ws, &speech).await;
    let (messages, close) = read_to_end(&mut ws).await;
    assert_eq!(close, Some((1011, "DATA-0000".to_owned())));
    assert_eq!(messages.last().unwrap()["is_final"], false);

    // Stall: audio accepted, nothing ever sent.
    fakes.inject(Target::Stt, Fault::Stall);
    let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
    for chunk in speech
        .iter()
        .copied()
        .chain(silence(1500))
        .collect::<Vec<_>>()
        .chunks(640)
    {
        ws.send(Message::binary(chunk.to_vec())).await.unwrap();
    }
    send_text(&mut ws, r#"{"type":"CloseStream"}"#).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(700), ws.next())
            .await
            .is_err(),
        "a stalled session must not answer"
    );
    drop(ws);

    // Inactivity: nothing sent for the timeout closes with 1011 NET-0001.
    let started = Instant::now();
    let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
    let (messages, close) = read_to_end(&mut ws).await;
    assert!(messages.is_empty());
    assert_eq!(close, Some((1011, "NET-0001".to_owned())));
    assert!(started.elapsed() >= Duration::from_millis(400));
}

// ---------------------------------------------------------------------------------------------
// Anthropic

/// Parses an SSE body into `(event, data)` pairs (`event` is "" when absent).
fn parse_sse(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_owned();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = v.to_owned();
                }
            }
            (event, data)
        })
        .collect()
}

/// A request to the fake LLM `target` (Anthropic or OpenAI chat) with valid credentials.
fn llm_request(
    client: &reqwest::Client,
    fakes: &Fakes,
    target: Target,
    body: &Value,
) -> reqwest::RequestBuilder {
    let request = if target == Target::Anthropic {
        client
            .post(format!("{}/v1/messages", fakes.anthropic_url()))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
    } else {
        client
            .post(format!("{}/chat/completions", fakes.openai_url()))
            .bearer_auth(KEY)
    };
    request.json(body)
}

#[tokio::test]
async fn anthropic_stream_event_order_timing_and_usage() {
    let (fakes, client) = llm_fakes().await;
    let body = claude(json!({
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Hello there"}]},
        ],
        "stream": true,
    }));
    let started = Instant::now();
    let response = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut first_delta_at = None;
    let mut text = String::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        if first_delta_at.is_none() && text.contains("text_delta") {
            first_delta_at = Some(started.elapsed());
        }
    }
    assert!(first_delta_at.unwrap() >= Duration::from_millis(55));

    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        &names[..3],
        ["message_start", "content_block_start", "ping"]
    );
    assert_eq!(
        &names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for ((name, _), d) in events.iter().zip(&data) {
        assert_eq!(d["type"], name.as_str());
    }
    let start = &data[0]["message"];
    assert_eq!(start["role"], "assistant");
    assert_eq!(start["model"], "claude-test");
    assert_eq!(start["content"], json!([]));
    assert!(start["stop_reason"].is_null());
    // "Be brief." + "Hi" + "Hello!" + "Hello there" = 9 + 2 + 6 + 11 = 28 chars -> 7 tokens.
    assert_eq!(start["usage"]["input_tokens"], 7);
    let deltas: Vec<&str> = data
        .iter()
        .filter(|d| d["type"] == "content_block_delta")
        .map(|d| d["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        deltas.concat(),
        "Sure, you asked: Hello there. This is a reply from the fake model. Is there anything else?"
    );
    assert_eq!(deltas[1], " you");
    let message_delta = &data[data.len() - 2];
    assert_eq!(message_delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(message_delta["usage"]["output_tokens"], deltas.len());

    // max_tokens cuts the reply.
    let mut short = body.clone();
    short["max_tokens"] = json!(4);
    let text = llm_request(&client, &fakes, Target::Anthropic, &short)
        .text_body()
        .await;
    let data: Vec<Value> = parse_sse(&text)
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let deltas = data
        .iter()
        .filter(|d| d["type"] == "content_block_delta")
        .count();
    assert_eq!(deltas, 4);
    let message_delta = &data[data.len() - 2];
    assert_eq!(message_delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(message_delta["usage"]["output_tokens"], 4);

    // Non-streaming returns a Message.
    let message = llm_request(&client, &fakes, Target::Anthropic, &not_streamed(&body))
        .json_body()
        .await;
    assert_eq!(message["type"], "message");
    assert!(
        message["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Sure, you asked: Hello there.")
    );
    assert_eq!(message["stop_reason"], "end_turn");

    let recorded = fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 3);
    assert_eq!(recorded.llm_requests[0], (Target::Anthropic, body));
}

#[tokio::test]
async fn anthropic_errors_and_faults() {
    let (fakes, client) = llm_fakes().await;
    let body = json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "Hey"}], "stream": true});
    let error_of = |v: &Value| v["error"]["type"].as_str().unwrap().to_owned();

    let response = client
        .post(format!("{}/v1/messages", fakes.anthropic_url()))
        .header("x-api-key", KEY)
        .json(&body)
        .sent()
        .await;
    assert_eq!(response.status(), 400);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(error_of(&v), "invalid_request_error");

    let response = client
        .post(format!("{}/v1/messages", fakes.anthropic_url()))
        .header("x-api-key", "nope")
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .sent()
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(
        error_of(&response.json().await.unwrap()),
        "authentication_error"
    );

    assert_eq!(
        llm_request(
            &client,
            &fakes,
            Target::Anthropic,
            &json!({"model": "m", "messages": []}),
        )
        .sent()
        .await
        .status(),
        400
    );

    fakes.inject(Target::Anthropic, status_fault(429, Some(1)));
    fakes.inject(Target::Anthropic, status_fault(529, None));
    for (status, retry_after, error) in [
        (429, Some("1"), "rate_limit_error"),
        (529, None, "overloaded_error"),
    ] {
        let response = llm_request(&client, &fakes, Target::Anthropic, &body)
            .sent()
            .await;
        assert_eq!(response.status(), status);
        let header = response.headers().get("retry-after");
        assert_eq!(header.map(|v| v.to_str().unwrap()), retry_after);
        assert_eq!(error_of(&response.json().await.unwrap()), error);
    }
    let response = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("message_stop"));

    // MidStreamError: three deltas, then an error event, no message_stop.
    fakes.inject(Target::Anthropic, Fault::MidStreamError);
    let text = llm_request(&client, &fakes, Target::Anthropic, &body)
        .text_body()
        .await;
    let events = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "content_block_delta")
            .count(),
        3
    );
    assert_eq!(names.last(), Some(&"error"));
    let error: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(error_of(&error), "overloaded_error");

    // DropMidStream: the body breaks after three deltas.
    fakes.inject(Target::Anthropic, Fault::DropMidStream);
    let response = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let mut failed = false;
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the body should end with an error");
    assert_eq!(text.matches("event: content_block_delta").count(), 3);
    assert!(!text.contains("message_stop"));
}

// ---------------------------------------------------------------------------------------------
// OpenAI chat

/// `data:` payloads of an OpenAI stream.
fn openai_data(text: &str) -> Vec<String> {
    parse_sse(text).into_iter().map(|(_, d)| d).collect()
}

#[tokio::test]
async fn openai_stream_with_and_without_usage() {
    let (fakes, client) = llm_fakes().await;
    let body = gpt(json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_completion_tokens": 200,
    }));
    let response = llm_request(&client, &fakes, Target::OpenAiChat, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 200);
    let data = openai_data(&response.text().await.unwrap());
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    for chunk in &chunks[..chunks.len() - 1] {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-test");
        assert!(chunk.as_object().unwrap().contains_key("usage"));
        assert!(chunk["usage"].is_null());
    }
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], "stop");
    let content: Vec<&str> = chunks[1..chunks.len() - 2]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        content.concat(),
        "Sure, you asked: Hello there. This is a reply from the fake model. Is there anything else?"
    );
    // "Be brief." + "Hello there" = 20 chars -> 5 tokens.
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 5);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], content.len());
    assert_eq!(usage_chunk["usage"]["total_tokens"], 5 + content.len());

    // Without include_usage: no usage anywhere, still [DONE]; max_tokens -> "length".
    let mut no_usage = body.clone();
    no_usage.as_object_mut().unwrap().remove("stream_options");
    no_usage
        .as_object_mut()
        .unwrap()
        .remove("max_completion_tokens");
    no_usage["max_tokens"] = json!(3);
    let data = openai_data(
        &llm_request(&client, &fakes, Target::OpenAiChat, &no_usage)
            .text_body()
            .await,
    );
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.len(), 1 + 3 + 1);

    // Non-streaming completion.
    let completion: Value = llm_request(
        &client,
        &fakes,
        Target::OpenAiChat,
        &json!({"model": "gpt-test", "messages": [{"role": "user", "content": "Yo"}]}),
    )
    .json_body()
    .await;
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    assert!(
        completion["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Sure, you asked: Yo.")
    );

    let recorded = fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 3);
    assert!(
        recorded
            .llm_requests
            .iter()
            .all(|(t, _)| *t == Target::OpenAiChat)
    );
    assert_eq!(recorded.llm_requests[1].1, no_usage);
}

#[tokio::test]
async fn openai_errors_and_faults() {
    let fakes = start(FakesConfig {
        llm: LlmFakeConfig {
            reply: Some("one two three four five six".into()),
            ..fast_llm()
        },
        ..FakesConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let body =
        json!({"model": "gpt", "messages": [{"role": "user", "content": "x"}], "stream": true});

    let response = client
        .post(format!("{}/chat/completions", fakes.openai_url()))
        .bearer_auth("wrong")
        .json(&body)
        .sent()
        .await;
    assert_eq!(response.status(), 401);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(v["error"].as_object().unwrap().contains_key("param"));

    let response = llm_request(
        &client,
        &fakes,
        Target::OpenAiChat,
        &json!({"model": "gpt", "messages": []}),
    )
    .sent()
    .await;
    assert_eq!(response.status(), 400);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "messages");

    let response = client
        .post(format!("{}/chat/completions", fakes.openai_url()))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .sent()
        .await;
    assert_eq!(response.status(), 400);

    fakes.inject(Target::OpenAiChat, status_fault(503, Some(3)));
    let response = llm_request(&client, &fakes, Target::OpenAiChat, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "3");
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");

    fakes.inject(Target::OpenAiChat, Fault::MidStreamError);
    let data = openai_data(
        &llm_request(&client, &fakes, Target::OpenAiChat, &body)
            .text_body()
            .await,
    );
    // Role chunk, three tokens, then the error object; no [DONE].
    assert_eq!(data.len(), 5, "{data:?}");
    let error: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(!data.iter().any(|d| d == "[DONE]"));

    fakes.inject(Target::OpenAiChat, Fault::DropMidStream);
    let response = llm_request(&client, &fakes, Target::OpenAiChat, &body)
        .sent()
        .await;
    assert!(response.text().await.is_err());
}

// ---------------------------------------------------------------------------------------------
// OpenAI TTS

/// Fakes whose TTS starts after `first_byte_ms` and runs `speed` times real time, and a
/// client.
async fn tts_fakes(first_byte_ms: u64, speed: f64) -> (Fakes, reqwest::Client) {
    let fakes = start(FakesConfig {
        tts: TtsFakeConfig {
            first_byte: Duration::from_millis(first_byte_ms),
            speed,
            ..TtsFakeConfig::default()
        },
        ..FakesConfig::default()
    })
    .await;
    (fakes, reqwest::Client::new())
}

fn tts_request(client: &reqwest::Client, fakes: &Fakes, body: &Value) -> reqwest::RequestBuilder {
    client
        .post(format!("{}/audio/speech", fakes.openai_url()))
        .bearer_auth(KEY)
        .json(body)
}

#[tokio::test]
async fn tts_streams_paced_pcm_of_the_right_length() {
    let (fakes, client) = tts_fakes(50, 10.0).await;
    let input = "Hello world, this is a test.";
    let body = json!({"model": "gpt-4o-mini-tts", "input": input, "voice": "alloy", "response_format": "pcm"});
    let started = Instant::now();
    let response = tts_request(&client, &fakes, &body).sent().await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "audio/pcm");
    let mut pcm = Vec::new();
    let mut first_at = None;
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        if first_at.is_none() && !chunk.is_empty() {
            first_at = Some(started.elapsed());
        }
        pcm.extend_from_slice(&chunk);
    }
    let elapsed = started.elapsed();
    // 28 chars * 60 ms = 1.68 s at 24 kHz, 2 bytes per sample.
    assert_eq!(pcm.len(), 28 * 60 * 24 * 2);
    assert!(first_at.unwrap() >= Duration::from_millis(45));
    // 17 chunks of 100 ms at 10x real time: >= 50 ms + 16 * 10 ms.
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    let samples: Vec<i16> = pcm
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    let peak = samples.iter().map(|s| s.unsigned_abs()).max().unwrap();
    let peak_dbfs = 20.0 * (f64::from(peak) / 32768.0).log10();
    assert!((-9.0..=-3.0).contains(&peak_dbfs), "peak {peak_dbfs} dBFS");
    let voiced = samples.iter().filter(|s| s.unsigned_abs() > 300).count();
    assert!(voiced > samples.len() / 3, "mostly audible");
    assert!(
        samples.iter().filter(|s| **s == 0).count() > 24 * 60,
        "gaps between words"
    );

    // The request's speed shortens the audio.
    let fast = json!({"model": "tts-1", "input": input, "voice": "alloy", "response_format": "pcm", "speed": 2.0});
    let bytes = tts_request(&client, &fakes, &fast)
        .sent()
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len(), 28 * 30 * 24 * 2);

    assert_eq!(
        fakes.recorded().tts_inputs,
        vec![input.to_owned(), input.to_owned()]
    );
}

#[tokio::test]
async fn tts_validation_and_faults() {
    let (fakes, client) = tts_fakes(10, 20.0).await;
    let ok = json!({"model": "tts-1", "input": "Some words to say here.", "voice": "alloy", "response_format": "pcm"});

    let mut mp3 = ok.clone();
    mp3["response_format"] = json!("mp3");
    let mut empty = ok.clone();
    empty["input"] = json!("");
    let mut long = ok.clone();
    long["input"] = json!("a".repeat(4097));
    for (body, param) in [(mp3, "response_format"), (empty, "input"), (long, "input")] {
        let response = tts_request(&client, &fakes, &body).sent().await;
        assert_eq!(response.status(), 400);
        let v: Value = response.json().await.unwrap();
        assert_eq!(v["error"]["param"], param);
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    let response = client
        .post(format!("{}/audio/speech", fakes.openai_url()))
        .json(&ok)
        .sent()
        .await;
    assert_eq!(response.status(), 401);

    fakes.inject(Target::OpenAiTts, status_fault(500, None));
    let response = tts_request(&client, &fakes, &ok).sent().await;
    assert_eq!(response.status(), 500);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");

    for fault in [Fault::DropMidStream, Fault::MidStreamError] {
        fakes.inject(Target::OpenAiTts, fault);
        let response = tts_request(&client, &fakes, &ok).sent().await;
        assert_eq!(response.status(), 200);
        let mut received = 0;
        let mut failed = false;
        let mut chunks = response.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            match chunk {
                Ok(bytes) => received += bytes.len(),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed);
        assert_eq!(received, 4800, "exactly the first chunk");
    }
}

// ---------------------------------------------------------------------------------------------
// Control routes, shutdown, concurrency

#[tokio::test]
async fn control_routes_queue_faults_and_report_recordings() {
    let (fakes, client) = llm_fakes().await;

    check_control_route(
        &fakes,
        "faults",
        &json!({"target": "anthropic", "fault": {"kind": "status", "status": 500}}),
        &json!({"target": "nope", "fault": {"kind": "stall"}}),
    )
    .await;

    let base = fakes.anthropic_url();
    let body = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}], "stream": true});
    let response = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 500);
    let v: Value = response.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");

    let recorded: Value = client
        .get(format!("{base}/_fakes/recorded"))
        .json_body()
        .await;
    assert_eq!(recorded["llm_requests"], json!([["anthropic", body]]));
    assert_eq!(recorded["stt_audio_bytes"], 0);

    let response = client
        .delete(format!("{base}/_fakes/recorded"))
        .sent()
        .await;
    assert!(response.status().is_success());
    assert!(fakes.recorded().llm_requests.is_empty());

    let response = client.get(format!("{base}/v2/unknown")).sent().await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn shutdown_ends_stalled_streams_and_sessions() {
    let fakes = start(FakesConfig::default()).await;
    let client = reqwest::Client::new();
    fakes.inject(Target::OpenAiChat, Fault::Stall);
    fakes.inject(Target::Anthropic, Fault::Stall);
    fakes.inject(Target::Stt, Fault::Stall);

    let body =
        json!({"model": "gpt", "messages": [{"role": "user", "content": "x"}], "stream": true});
    let chat = llm_request(&client, &fakes, Target::OpenAiChat, &body)
        .sent()
        .await;
    assert_eq!(chat.status(), 200);
    let body = json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}], "stream": true});
    let mut messages = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await
        .bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(2), messages.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        std::str::from_utf8(&first)
            .unwrap()
            .starts_with("event: message_start")
    );
    let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();

    let chat_body = tokio::spawn(async move { chat.text().await });
    let anthropic_rest = tokio::spawn(async move { messages.next().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !chat_body.is_finished(),
        "stalled stream must not end by itself"
    );

    tokio::time::timeout(Duration::from_secs(6), fakes.shutdown())
        .await
        .expect("shutdown finishes");
    let chat_result = tokio::time::timeout(Duration::from_secs(2), chat_body)
        .await
        .unwrap()
        .unwrap();
    assert!(chat_result.is_err());
    let rest = tokio::time::timeout(Duration::from_secs(2), anthropic_rest)
        .await
        .unwrap()
        .unwrap();
    assert!(!matches!(rest, Some(Ok(_))));
    let (messages, close) = read_to_end(&mut ws).await;
    assert!(messages.is_empty());
    assert_eq!(close.map(|c| c.0), Some(u16::from(CloseCode::Away)));
}

#[tokio::test]
async fn many_concurrent_sessions() {
    let fakes = start(FakesConfig {
        llm: LlmFakeConfig {
            first_token: Duration::from_millis(20),
            tokens_per_s: 200.0,
            reply: Some("A short reply for load.".into()),
            tool_call: None,
        },
        ..FakesConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let mut tasks = Vec::new();
    for i in 0..150 {
        let client = client.clone();
        let url = format!("{}/v1/messages", fakes.anthropic_url());
        tasks.push(tokio::spawn(async move {
            let body = json!({"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": format!("q{i}")}], "stream": true});
            let text = client
                .post(url)
                .header("x-api-key", KEY)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .text_body().await;
            assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
        }));
    }
    let speech = tone(300, 0.3);
    for _ in 0..100 {
        let mut ws = connect_stt(&fakes, QUERY, KEY).await.unwrap();
        let speech = speech.clone();
        tasks.push(tokio::spawn(async move {
            for chunk in speech.chunks(640) {
                ws.send(Message::binary(chunk.to_vec())).await.unwrap();
            }
            send_text(&mut ws, r#"{"type":"CloseStream"}"#).await;
            let (messages, close) = read_to_end(&mut ws).await;
            assert_eq!(close.map(|c| c.0), Some(1000));
            assert!(
                messages
                    .iter()
                    .any(|m| m["is_final"] == true && transcript(m) == DEFAULT_TRANSCRIPT)
            );
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap()
            .unwrap();
    }
    let recorded = fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 150);
    assert_eq!(recorded.stt_connections.len(), 100);
    assert_eq!(recorded.stt_close_streams, 100);
}

/// An echo server on loopback: what it receives, it sends back.
async fn echo_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(s: &mut tokio::net::TcpStream) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = Instant::now();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    t.elapsed()
}

#[tokio::test]
async fn the_proxy_delays_requests_and_stalls_without_dropping_connections() {
    let proxy = atlas_fakes::proxy::Proxy::start(echo_server().await)
        .await
        .unwrap();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    round_trip(&mut s).await;
    proxy.set_delay(Duration::from_millis(150));
    assert!(round_trip(&mut s).await >= Duration::from_millis(150));
    proxy.set_delay(Duration::ZERO);
    // Stalled: the bytes are held, the connection stays open; resumed: they arrive.
    proxy.stall();
    let mut stalled = Box::pin(round_trip(&mut s));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut stalled)
            .await
            .is_err(),
        "nothing comes back while stalled"
    );
    proxy.resume();
    tokio::time::timeout(Duration::from_secs(5), stalled)
        .await
        .expect("held bytes flow once resumed");
}

// ---------------------------------------------------------------------------------------------
// Tools

const PARIS: &str = r#"{"city":"Paris","unit":"celsius"}"#;
/// Invalid JSON on purpose: the fakes stream what they are told.
const BROKEN: &str = r#"{"city": "Ro"#;

fn two_calls() -> ScriptedReply {
    ScriptedReply {
        text: "Let me check.".into(),
        tool_calls: vec![
            ScriptedCall::new("get_weather", PARIS),
            ScriptedCall::new("get_weather", BROKEN),
        ],
    }
}

fn anthropic_tools() -> Value {
    json!([{
        "name": "get_weather",
        "description": "Current weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }])
}

fn openai_tools() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}])
}

fn sse_data(text: &str) -> Vec<Value> {
    parse_sse(text)
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn anthropic_scripted_tool_calls_stream_as_tool_use_blocks() {
    let (fakes, client) = llm_fakes().await;
    fakes.script(Target::Anthropic, two_calls());
    // A refused request leaves the script for the retry.
    fakes.inject(Target::Anthropic, status_fault(429, None));
    let body = claude(json!({
        "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
        "tools": anthropic_tools(),
        "tool_choice": {"type": "auto"},
        "stream": true,
    }));
    let refused = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await;
    assert_eq!(refused.status(), 429);
    let response = llm_request(&client, &fakes, Target::Anthropic, &body)
        .sent()
        .await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    let events = parse_sse(&text);
    let data = sse_data(&text);
    for ((name, _), d) in events.iter().zip(&data) {
        assert_eq!(d["type"], name.as_str());
    }
    // Block by block: text at 0, then one tool_use block per call, each stopped before the
    // next starts.
    let blocks: Vec<(String, u64)> = data
        .iter()
        .filter(|d| d["type"] == "content_block_start" || d["type"] == "content_block_stop")
        .map(|d| {
            (
                d["type"].as_str().unwrap().to_owned(),
                d["index"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = [
        ("content_block_start", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_stop", 2),
    ]
    .iter()
    .map(|(t, i)| (t.to_string(), *i))
    .collect();
    assert_eq!(blocks, expected);
    let starts: Vec<&Value> = data
        .iter()
        .filter(|d| d["type"] == "content_block_start" && d["index"] != 0)
        .map(|d| &d["content_block"])
        .collect();
    for start in &starts {
        assert_eq!(start["type"], "tool_use");
        assert_eq!(start["name"], "get_weather");
        assert_eq!(start["input"], json!({}));
        assert!(start["id"].as_str().unwrap().starts_with("toolu_"));
    }
    assert_ne!(starts[0]["id"], starts[1]["id"]);
    let input = |index: u64| -> String {
        data.iter()
            .filter(|d| d["type"] == "content_block_delta" && d["index"] == index)
            .map(|d| {
                assert_eq!(d["delta"]["type"], "input_json_delta");
                d["delta"]["partial_json"].as_str().unwrap()
            })
            .collect()
    };
    assert_eq!(input(1), PARIS);
    assert_eq!(input(2), BROKEN);
    let said: String = data
        .iter()
        .filter(|d| d["type"] == "content_block_delta" && d["index"] == 0)
        .map(|d| d["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, "Let me check.");
    let message_delta = &data[data.len() - 2];
    assert_eq!(message_delta["delta"]["stop_reason"], "tool_use");
    // One output token per streamed piece: the text tokens and the argument fragments (the
    // empty `partial_json` that opens each tool block, as the API sends it, carries none).
    let pieces = data
        .iter()
        .filter(|d| d["type"] == "content_block_delta")
        .filter(|d| d["delta"]["partial_json"] != "")
        .count();
    assert!(pieces >= 4, "{pieces}");
    assert_eq!(message_delta["usage"]["output_tokens"], pieces);
    assert_eq!(data[data.len() - 1]["type"], "message_stop");

    // The script is used up: the next reply is text again.
    let data = sse_json(llm_request(&client, &fakes, Target::Anthropic, &body)).await;
    assert!(
        !data
            .iter()
            .any(|d| d["content_block"]["type"] == "tool_use")
    );
    assert_eq!(data[data.len() - 2]["delta"]["stop_reason"], "end_turn");

    // Non-streaming: a Message with tool_use blocks (input as an object, `{}` when the
    // arguments are not one).
    fakes.script(Target::Anthropic, two_calls());
    let message = llm_request(&client, &fakes, Target::Anthropic, &not_streamed(&body))
        .json_body()
        .await;
    assert_eq!(message["stop_reason"], "tool_use");
    assert_eq!(
        message["content"][0],
        json!({"type": "text", "text": "Let me check."})
    );
    assert_eq!(message["content"][1]["type"], "tool_use");
    assert_eq!(
        message["content"][1]["input"],
        json!({"city": "Paris", "unit": "celsius"})
    );
    assert_eq!(message["content"][2]["input"], json!({}));
}

#[tokio::test]
async fn openai_scripted_tool_calls_stream_as_tool_call_deltas() {
    let (fakes, client) = llm_fakes().await;
    // Scripted over the control route this time: two calls and no words.
    check_control_route(
        &fakes,
        "scripts",
        &json!({"target": "open_ai_chat", "reply": {"tool_calls": [
            {"name": "get_weather", "arguments": PARIS},
            {"name": "get_weather", "arguments": BROKEN},
        ]}}),
        &json!({"target": "open_ai_chat", "reply": {"tool_calls": "many"}}),
    )
    .await;
    let body = gpt(json!({
        "messages": [{"role": "user", "content": "Weather in Paris and Rome?"}],
        "tools": openai_tools(),
        "tool_choice": "auto",
        "stream": true,
        "stream_options": {"include_usage": true},
    }));
    let text = llm_request(&client, &fakes, Target::OpenAiChat, &body)
        .text_body()
        .await;
    assert!(text.ends_with("data: [DONE]\n\n"));
    let chunks = sse_data(&text);
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert!(first["content"].is_null());
    // Per index: the first fragment names the call, the others carry argument pieces.
    let mut calls: Vec<(String, String, String)> = Vec::new();
    for chunk in &chunks {
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        for fragment in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = fragment["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                assert_eq!(fragment["type"], "function");
                calls.push((
                    fragment["id"].as_str().unwrap().to_owned(),
                    fragment["function"]["name"].as_str().unwrap().to_owned(),
                    String::new(),
                ));
            } else {
                assert!(fragment.get("id").is_none());
                assert!(fragment["function"].get("name").is_none());
            }
            calls[index].2 += fragment["function"]["arguments"].as_str().unwrap();
        }
    }
    assert_eq!(calls.len(), 2);
    assert!(
        calls
            .iter()
            .all(|c| c.0.starts_with("call_") && c.1 == "get_weather")
    );
    assert_ne!(calls[0].0, calls[1].0);
    assert_eq!(calls[0].2, PARIS);
    assert_eq!(calls[1].2, BROKEN);
    let n = chunks.len();
    assert_eq!(chunks[n - 2]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks[n - 1]["choices"], json!([]));
    assert_eq!(chunks[n - 1]["usage"]["completion_tokens"], 4);

    // Non-streaming.
    fakes.script(
        Target::OpenAiChat,
        ScriptedReply::call("get_weather", PARIS),
    );
    let plain = json!({"model": "gpt-test", "messages": body["messages"], "tools": openai_tools()});
    let completion: Value = llm_request(&client, &fakes, Target::OpenAiChat, &plain)
        .json_body()
        .await;
    let choice = &completion["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        PARIS
    );
    assert_eq!(choice["message"]["tool_calls"][0]["type"], "function");
}

#[tokio::test]
async fn tool_results_are_checked_and_the_first_is_spoken() {
    let (fakes, client) = llm_fakes().await;

    // Anthropic: results answer the calls of the message before, first thing.
    let request = |body: &Value| llm_request(&client, &fakes, Target::Anthropic, body);
    let refused = |body: Value, wanted: &'static str| {
        let request = request(&body);
        async move {
            assert_eq!(refusal(request, wanted).await["type"], "error");
        }
    };
    let good = claude(json!({
        "tools": anthropic_tools(),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "21 C and sunny"},
            ]},
        ],
        "stream": true,
    }));
    assert_spoken(request(&good), "Here is what I found: 21 C and sunny.").await;
    // A result for a call that was never made, next to the right one.
    let mut stray = good.clone();
    stray["messages"][2]["content"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "tool_result", "tool_use_id": "toolu_99", "content": "?"}));
    refused(
        stray,
        "unexpected `tool_use_id` found in `tool_result` blocks: toolu_99",
    )
    .await;
    refused(
        words_instead_of_results(&good),
        "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_01",
    )
    .await;
    let mut late = good.clone();
    late["messages"][2]["content"] = json!([
        {"type": "text", "text": "here:"},
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "21 C"},
    ]);
    refused(
        late,
        "Did not find 1 `tool_result` block(s) at the beginning",
    )
    .await;
    let mut undeclared = good.clone();
    undeclared.as_object_mut().unwrap().remove("tools");
    refused(undeclared, "must define tools").await;
    let mut choice = good.clone();
    choice["tool_choice"] = json!({"type": "sometimes"});
    refused(choice, "Input tag 'sometimes'").await;
    let mut malformed = good.clone();
    malformed["tools"][0]
        .as_object_mut()
        .unwrap()
        .remove("input_schema");
    refused(malformed, "tools.0.input_schema: Field required").await;

    let request = |body: &Value| llm_request(&client, &fakes, Target::OpenAiChat, body);
    let refused = |body: Value, param: &'static str, wanted: &'static str| {
        let request = request(&body);
        async move {
            assert_eq!(refusal(request, wanted).await["error"]["param"], param);
        }
    };
    // OpenAI: one `tool` message per call, right after the assistant message.
    let good = gpt(json!({
        "tools": openai_tools(),
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_01", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            ]},
            {"role": "tool", "tool_call_id": "call_01", "content": "18 C and cloudy"},
        ],
        "stream": true,
    }));
    assert_spoken(request(&good), "Here is what I found: 18 C and cloudy.").await;
    let mut stray = good.clone();
    stray["messages"][2]["tool_call_id"] = json!("call_99");
    refused(
        stray,
        "messages.[2].tool_call_id",
        "'tool_call_id' of 'call_99' not found",
    )
    .await;
    let mut orphan = good.clone();
    orphan["messages"].as_array_mut().unwrap().remove(1);
    refused(
        orphan,
        "messages.[1].role",
        "must be a response to a preceeding message with 'tool_calls'",
    )
    .await;
    refused(
        words_instead_of_results(&good),
        "messages.[2].role",
        "did not have response messages: call_01",
    )
    .await;
    let mut choice = good.clone();
    choice["tool_choice"] = json!("sometimes");
    refused(
        choice,
        "tool_choice",
        "Supported values are: 'none', 'auto', and 'required'",
    )
    .await;
    let mut malformed = good.clone();
    malformed["tools"][0]["function"]["name"] = json!("get weather");
    refused(
        malformed,
        "tools[0].function.name",
        "does not match pattern",
    )
    .await;
    let mut untooled = good.clone();
    untooled.as_object_mut().unwrap().remove("tools");
    untooled["tool_choice"] = json!("auto");
    refused(
        untooled,
        "tool_choice",
        "only allowed when 'tools' are specified",
    )
    .await;

    // Every body was recorded, refused ones too, tool results and all.
    let recorded = fakes.recorded();
    assert_eq!(recorded.llm_requests.len(), 14);
    let (target, first) = &recorded.llm_requests[0];
    assert_eq!(*target, Target::Anthropic);
    assert_eq!(
        first["messages"][2]["content"][0]["content"],
        "21 C and sunny"
    );
    let (target, openai) = &recorded.llm_requests[7];
    assert_eq!(*target, Target::OpenAiChat);
    assert_eq!(openai["messages"][2]["role"], "tool");
}

#[tokio::test]
async fn the_tool_call_rule_answers_plain_questions_when_the_tool_is_declared() {
    let fakes = start(FakesConfig {
        llm: LlmFakeConfig {
            tool_call: Some(ScriptedCall {
                name: "get_weather".into(),
                arguments: PARIS.into(),
            }),
            ..fast_llm()
        },
        ..FakesConfig::default()
    })
    .await;
    let client = reqwest::Client::new();
    let ask = |tools: Option<Value>, choice: Option<&str>| {
        let mut body = gpt(json!({
            "messages": [{"role": "user", "content": "Weather?"}],
        }));
        if let Some(tools) = tools {
            body["tools"] = tools;
        }
        if let Some(choice) = choice {
            body["tool_choice"] = json!(choice);
        }
        let request = llm_request(&client, &fakes, Target::OpenAiChat, &body);
        async move {
            let v: Value = request.json_body().await;
            v["choices"][0].clone()
        }
    };
    let choice = ask(Some(openai_tools()), None).await;
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["arguments"],
        PARIS
    );
    // Not declared, or not allowed now: words.
    for (tools, tool_choice) in [(None, None), (Some(openai_tools()), Some("none"))] {
        let choice = ask(tools, tool_choice).await;
        assert_eq!(choice["finish_reason"], "stop");
        assert!(
            choice["message"]["content"]
                .as_str()
                .unwrap()
                .starts_with("Sure, you asked: Weather?")
        );
    }

    // Anthropic, streamed: the call, then after its result the spoken answer.
    let mut body = claude(json!({
        "tools": anthropic_tools(),
        "messages": [{"role": "user", "content": "Weather?"}],
        "stream": true,
    }));
    let data = sse_json(llm_request(&client, &fakes, Target::Anthropic, &body)).await;
    let start = data
        .iter()
        .find(|d| d["type"] == "content_block_start")
        .unwrap();
    assert_eq!(start["index"], 0);
    assert_eq!(start["content_block"]["type"], "tool_use");
    let id = start["content_block"]["id"].clone();
    assert_eq!(data[data.len() - 2]["delta"]["stop_reason"], "tool_use");
    body["messages"] = json!([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": id, "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": id, "content": "{\"temp_c\":21}"}]},
    ]);
    let data = sse_json(llm_request(&client, &fakes, Target::Anthropic, &body)).await;
    let said: String = data
        .iter()
        .filter(|d| d["type"] == "content_block_delta")
        .map(|d| d["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(said, r#"Here is what I found: {"temp_c":21}."#);
    assert_eq!(data[data.len() - 2]["delta"]["stop_reason"], "end_turn");
}
