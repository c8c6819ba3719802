//! Deepgram live transcription over WebSocket.
//!
//! `GET {base}/v1/listen?…` with `Authorization: Token <key>`; binary frames carry linear16
//! audio; text frames carry `KeepAlive`, `Finalize` and `CloseStream`. Deepgram answers with
//! `Results` (interim and final, `speech_final` on endpointing), `UtteranceEnd`,
//! `SpeechStarted` and `Metadata`. Unknown message types are ignored; a missing
//! `speech_final` reads as false.

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{SttCommand, SttEvent, SttOptions, SttProvider, SttStream};
use crate::ProviderError;
use crate::http::error_chain;

/// Settings of the Deepgram adapter.
#[derive(Clone, Debug)]
pub struct DeepgramConfig {
    /// Base URL (`wss://api.deepgram.com`).
    pub base_url: String,
    /// API key.
    pub api_key: SecretString,
    /// Model, e.g. `nova-3`.
    pub model: String,
    /// Default language when the client gives none.
    pub language: Option<String>,
    /// Silence (ms) after which Deepgram marks `speech_final`.
    pub endpointing_ms: u32,
    /// Gap (ms) after the last word for `UtteranceEnd` (Deepgram minimum 1000).
    pub utterance_end_ms: u32,
    /// Deadline for the WebSocket handshake.
    pub connect_timeout: Duration,
    /// Send `KeepAlive` after this long without audio (Deepgram closes after 10 s).
    pub keepalive_interval: Duration,
}

/// The Deepgram adapter.
pub struct Deepgram {
    config: DeepgramConfig,
}

impl Deepgram {
    /// Builds the adapter (no network traffic).
    pub fn new(config: DeepgramConfig) -> Self {
        Deepgram { config }
    }

    /// The listen URL for `options` (no secrets in it).
    pub fn listen_url(&self, options: &SttOptions) -> String {
        let c = &self.config;
        let mut url = format!(
            "{}/v1/listen?model={}&encoding=linear16&sample_rate={}&channels=1&interim_results=true&punctuate=true&smart_format=true&vad_events=true&endpointing={}&utterance_end_ms={}",
            c.base_url.trim_end_matches('/'),
            urlencode(&c.model),
            options.sample_rate,
            c.endpointing_ms,
            c.utterance_end_ms.max(1000),
        );
        if let Some(lang) = options.language.as_ref().or(c.language.as_ref()) {
            url.push_str("&language=");
            url.push_str(&urlencode(lang));
        }
        url
    }
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Every field of every message type Deepgram sends, so one parse handles them all, including
/// abridged `Results` without a `type` field.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    is_final: bool,
    #[serde(default)]
    speech_final: bool,
    #[serde(default)]
    from_finalize: bool,
    #[serde(default)]
    start: Option<f64>,
    #[serde(default)]
    duration: Option<f64>,
    #[serde(default)]
    channel: Option<ChannelField>,
    #[serde(default)]
    last_word_end: Option<f64>,
    #[serde(default)]
    timestamp: Option<f64>,
}

/// `channel` is an object in `Results` and a list of indexes elsewhere.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChannelField {
    Results(Channel),
    #[allow(dead_code)]
    Indexes(Vec<serde_json::Value>),
}

#[derive(Deserialize)]
struct Channel {
    #[serde(default)]
    alternatives: Vec<Alternative>,
}

#[derive(Deserialize)]
struct Alternative {
    #[serde(default)]
    transcript: String,
    #[serde(default)]
    words: Vec<Word>,
}

#[derive(Deserialize)]
struct Word {
    #[serde(default)]
    end: Option<f64>,
}

/// Maps one Deepgram text message to an event (`None` for messages that carry nothing).
pub(crate) fn map_message(text: &str) -> Result<Option<SttEvent>, ProviderError> {
    let msg: Incoming = serde_json::from_str(text)
        .map_err(|e| ProviderError::Protocol(format!("bad Deepgram message: {e}")))?;
    Ok(match (msg.kind.as_deref(), msg.channel) {
        (Some("Results") | None, Some(ChannelField::Results(channel))) => {
            let (text, last_word_end) = match channel.alternatives.into_iter().next() {
                Some(a) => {
                    let end = a.words.last().and_then(|w| w.end);
                    (a.transcript, end)
                }
                None => (String::new(), None),
            };
            if msg.is_final {
                let segment_end = match (msg.start, msg.duration) {
                    (Some(s), Some(d)) => Some(s + d),
                    _ => None,
                };
                Some(SttEvent::Final {
                    text,
                    speech_final: msg.speech_final,
                    from_finalize: msg.from_finalize,
                    speech_end_s: last_word_end.or(if msg.speech_final {
                        segment_end
                    } else {
                        None
                    }),
                })
            } else if text.trim().is_empty() {
                None
            } else {
                Some(SttEvent::Partial { text })
            }
        }
        (Some("UtteranceEnd"), _) => Some(SttEvent::UtteranceEnd {
            last_word_end_s: msg.last_word_end,
        }),
        (Some("SpeechStarted"), _) => Some(SttEvent::SpeechStarted {
            at_s: msg.timestamp,
        }),
        _ => None,
    })
}

const KEEPALIVE: &str = r#"{"type":"KeepAlive"}"#;
const FINALIZE: &str = r#"{"type":"Finalize"}"#;
const CLOSE_STREAM: &str = r#"{"type":"CloseStream"}"#;

#[async_trait]
impl SttProvider for Deepgram {
    fn provider(&self) -> &'static str {
        "deepgram"
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    fn input_rate(&self, client_rate: u32) -> u32 {
        client_rate // Deepgram takes any rate we declare
    }

    async fn connect(&self, options: SttOptions) -> Result<SttStream, ProviderError> {
        let url = self.listen_url(&options);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ProviderError::Connect(e.to_string()))?;
        let auth = format!("Token {}", self.config.api_key.expose_secret())
            .parse()
            .map_err(|_| ProviderError::Connect("API key is not a valid header value".into()))?;
        request.headers_mut().insert("authorization", auth);
        request.headers_mut().extend(crate::http::trace_headers());
        // Small buffers per connection (Deepgram's messages are small JSON); no write batching.
        let ws_config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .read_buffer_size(16 * 1024)
            .write_buffer_size(0);
        let connect = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true);
        let (socket, _response) =
            match tokio::time::timeout(self.config.connect_timeout, connect).await {
                Err(_) => return Err(ProviderError::Timeout("Deepgram handshake")),
                Ok(Err(tungstenite::Error::Http(response))) => {
                    let status = response.status().as_u16();
                    let body = response
                        .body()
                        .as_deref()
                        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok());
                    let field = |k: &str| {
                        body.as_ref()
                            .and_then(|v| v.get(k))
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_owned()
                    };
                    return Err(ProviderError::Status {
                        status,
                        kind: field("err_code"),
                        message: field("err_msg"),
                        retry_after: None,
                    });
                }
                Ok(Err(e)) => return Err(ProviderError::Connect(error_chain(&e))),
                Ok(Ok(pair)) => pair,
            };
        let (commands_tx, commands_rx) = mpsc::channel(64);
        let (events_tx, events_rx) = mpsc::channel(64);
        tokio::spawn(run(
            socket,
            commands_rx,
            events_tx,
            self.config.keepalive_interval,
        ));
        Ok(SttStream {
            commands: commands_tx,
            events: events_rx,
        })
    }
}

/// Largest message made by joining queued audio frames (Deepgram takes any size; 250 ms of
/// 16 kHz audio).
const MAX_BATCH_BYTES: usize = 8_000;

async fn next_command(
    commands: &mut mpsc::Receiver<SttCommand>,
    held: &mut Option<SttCommand>,
) -> Option<SttCommand> {
    match held.take() {
        Some(cmd) => Some(cmd),
        None => commands.recv().await,
    }
}

/// Joins `first` with the audio frames already waiting behind it, so that a recogniser
/// connection that fell behind catches up with one write instead of one per frame. Nothing
/// waits for more audio: when the queue is empty (the normal case) `first` goes out as it is.
/// A non-audio command found in the queue is kept in `held`, so order is preserved.
fn coalesce(
    first: Bytes,
    commands: &mut mpsc::Receiver<SttCommand>,
    held: &mut Option<SttCommand>,
) -> Bytes {
    let mut batch: Option<BytesMut> = None;
    while batch.as_ref().map_or(first.len(), BytesMut::len) < MAX_BATCH_BYTES {
        match commands.try_recv() {
            Ok(SttCommand::Audio(more)) => {
                let b = batch.get_or_insert_with(|| {
                    let mut b = BytesMut::with_capacity(MAX_BATCH_BYTES + more.len());
                    b.extend_from_slice(&first);
                    b
                });
                b.extend_from_slice(&more);
            }
            Ok(other) => {
                *held = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    match batch {
        Some(b) => b.freeze(),
        None => first,
    }
}

async fn run<S>(
    socket: S,
    mut commands: mpsc::Receiver<SttCommand>,
    events: mpsc::Sender<Result<SttEvent, ProviderError>>,
    keepalive: Duration,
) where
    S: futures_util::Stream<Item = Result<Message, tungstenite::Error>>
        + futures_util::Sink<Message, Error = tungstenite::Error>
        + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    let mut last_sent = Instant::now();
    let mut closing = false;
    let mut ticker = tokio::time::interval(keepalive.max(Duration::from_millis(100)) / 2);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let close_deadline = tokio::time::sleep(Duration::from_secs(86_400));
    tokio::pin!(close_deadline);
    // A command taken from the queue behind a batch of audio, handled next.
    let mut held: Option<SttCommand> = None;
    loop {
        tokio::select! {
            cmd = next_command(&mut commands, &mut held), if !closing => {
                let sent = match cmd {
                    Some(SttCommand::Audio(bytes)) => {
                        let batch = coalesce(bytes, &mut commands, &mut held);
                        sink.send(Message::Binary(batch)).await
                    }
                    Some(SttCommand::Finalize) => sink.send(Message::text(FINALIZE)).await,
                    Some(SttCommand::Close) | None => {
                        closing = true;
                        close_deadline.as_mut().reset(Instant::now() + Duration::from_secs(3));
                        sink.send(Message::text(CLOSE_STREAM)).await
                    }
                };
                if let Err(e) = sent {
                    if !closing {
                        let _ = events.send(Err(ProviderError::Closed(error_chain(&e)))).await;
                    }
                    return;
                }
                last_sent = Instant::now();
            }
            msg = stream.next() => {
                match msg {
                    Some(Ok(Message::Text(text))) => match map_message(text.as_str()) {
                        Ok(Some(event)) => {
                            if events.send(Ok(event)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(error = %e, "ignoring Deepgram message"),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        if !closing {
                            let reason = frame
                                .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                                .unwrap_or_else(|| "no close frame".into());
                            let _ = events.send(Err(ProviderError::Closed(reason))).await;
                        }
                        return;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        if !closing {
                            let _ = events.send(Err(ProviderError::Closed(error_chain(&e)))).await;
                        }
                        return;
                    }
                    None => {
                        if !closing {
                            let _ = events
                                .send(Err(ProviderError::Closed("connection ended".into())))
                                .await;
                        }
                        return;
                    }
                }
            }
            _ = ticker.tick(), if !closing => {
                if last_sent.elapsed() >= keepalive {
                    if sink.send(Message::text(KEEPALIVE)).await.is_err() {
                        let _ = events.send(Err(ProviderError::Closed("keepalive failed".into()))).await;
                        return;
                    }
                    last_sent = Instant::now();
                }
            }
            _ = &mut close_deadline, if closing => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queued_audio_is_joined_in_order_and_commands_keep_their_place() {
        let (tx, mut rx) = mpsc::channel(16);
        // Nothing queued: the frame goes out as it is (no copy, no wait).
        let alone = coalesce(Bytes::from_static(b"aa"), &mut rx, &mut None);
        assert_eq!(&alone[..], b"aa");
        for cmd in [
            SttCommand::Audio(Bytes::from_static(b"bb")),
            SttCommand::Audio(Bytes::from_static(b"cc")),
            SttCommand::Finalize,
            SttCommand::Audio(Bytes::from_static(b"dd")),
        ] {
            tx.try_send(cmd).unwrap();
        }
        let mut held = None;
        let batch = coalesce(Bytes::from_static(b"aa"), &mut rx, &mut held);
        assert_eq!(&batch[..], b"aabbcc");
        // The finalize stops the batch and is handled before the audio behind it.
        assert!(matches!(
            next_command(&mut rx, &mut held).await,
            Some(SttCommand::Finalize)
        ));
        match next_command(&mut rx, &mut held).await {
            Some(SttCommand::Audio(b)) => assert_eq!(&b[..], b"dd"),
            _ => panic!("expected the last frame"),
        }
        // A batch never grows far past the cap.
        for _ in 0..16 {
            tx.try_send(SttCommand::Audio(Bytes::from(vec![0u8; 1_000])))
                .unwrap();
        }
        let big = coalesce(Bytes::from(vec![0u8; 1_000]), &mut rx, &mut held);
        assert_eq!(big.len(), MAX_BATCH_BYTES);
        assert!(held.is_none());
    }

    #[test]
    fn maps_results() {
        let partial = r#"{"type":"Results","channel_index":[0,1],"duration":1.0,"start":0.0,"is_final":false,"speech_final":false,"channel":{"alternatives":[{"transcript":"what is","confidence":0.9,"words":[]}]},"metadata":{"request_id":"x"}}"#;
        assert_eq!(
            map_message(partial).unwrap(),
            Some(SttEvent::Partial {
                text: "what is".into()
            })
        );
        // No speech_final field at all: read as false.
        let final_ = r#"{"type":"Results","duration":1.5,"start":0.5,"is_final":true,"channel":{"alternatives":[{"transcript":"hello there","words":[{"word":"hello","start":0.6,"end":0.9},{"word":"there","start":1.0,"end":1.4}]}]}}"#;
        assert_eq!(
            map_message(final_).unwrap(),
            Some(SttEvent::Final {
                text: "hello there".into(),
                speech_final: false,
                from_finalize: false,
                speech_end_s: Some(1.4)
            })
        );
        let empty_interim =
            r#"{"type":"Results","is_final":false,"channel":{"alternatives":[{"transcript":""}]}}"#;
        assert_eq!(map_message(empty_interim).unwrap(), None);
        assert_eq!(
            map_message(r#"{"type":"UtteranceEnd","channel":[0,1],"last_word_end":2.3}"#).unwrap(),
            Some(SttEvent::UtteranceEnd {
                last_word_end_s: Some(2.3)
            })
        );
        assert_eq!(
            map_message(r#"{"type":"SomethingNew","x":1}"#).unwrap(),
            None
        );
        assert!(map_message("not json").is_err());
    }

    #[test]
    fn maps_documented_payloads() {
        let fixture = |name: &str| {
            std::fs::read_to_string(format!(
                "{}/tests/fixtures/deepgram/{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .unwrap()
        };
        assert_eq!(
            map_message(&fixture("results_interim.json")).unwrap(),
            Some(SttEvent::Partial {
                text: "another big".into()
            })
        );
        let Some(SttEvent::Final {
            text,
            speech_final: true,
            from_finalize: false,
            speech_end_s: Some(end),
        }) = map_message(&fixture("results_final_speech_final.json")).unwrap()
        else {
            panic!("not a speech_final result")
        };
        assert_eq!(text, "Tell me more about this.");
        assert!(end > 6.8 && end <= 5.99 + 1.98 + 1e-9, "{end}");
        assert_eq!(
            map_message(&fixture("utterance_end.json")).unwrap(),
            Some(SttEvent::UtteranceEnd {
                last_word_end_s: Some(2.395)
            })
        );
        assert_eq!(
            map_message(&fixture("speech_started.json")).unwrap(),
            Some(SttEvent::SpeechStarted { at_s: Some(9.54) })
        );
        assert_eq!(map_message(&fixture("metadata.json")).unwrap(), None);
    }

    #[test]
    fn url_has_streaming_parameters_and_no_key() {
        let dg = Deepgram::new(DeepgramConfig {
            base_url: "wss://example.invalid/".into(),
            api_key: SecretString::from("sekrit"),
            model: "nova-3".into(),
            language: None,
            endpointing_ms: 300,
            utterance_end_ms: 500,
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
        });
        let url = dg.listen_url(&SttOptions {
            sample_rate: 16_000,
            language: Some("en-US".into()),
        });
        assert!(url.starts_with("wss://example.invalid/v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&channels=1&interim_results=true"));
        assert!(url.contains("utterance_end_ms=1000"));
        assert!(url.contains("endpointing=300"));
        assert!(url.contains("language=en-US"));
        assert!(!url.contains("sekrit"));
    }
}
