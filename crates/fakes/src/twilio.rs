//! A fake **Twilio** that places an inbound phone call against *our* server, over real loopback
//! HTTP and WebSocket, speaking Twilio's wire protocol — so the Twilio Media Streams transport
//! can be tested and load-tested without Twilio. It is the caller's side of the call:
//!
//! 1. **The voice webhook.** `POST {base_url}/v1/twilio/voice`, form-encoded, with the
//!    parameters of an incoming call (`CallSid`, `AccountSid`, `From`, `To`, `Caller`, `Called`,
//!    `CallStatus=ringing`, `Direction=inbound`, `ApiVersion=2010-04-01`) and the
//!    `X-Twilio-Signature` header computed as Twilio computes it ([`sign`]) over the URL Twilio
//!    would have called, `{public_url}/v1/twilio/voice`.
//! 2. **The TwiML answer**, executed verb by verb: `<Say>` text is collected; `<Hangup/>`,
//!    `<Reject/>` or the end of the document end the call ([`CallReport::refused`]);
//!    `<Connect><Stream url>` with its `<Parameter name value/>` children opens a bidirectional
//!    Media Stream (Twilio executes nothing after `<Connect>` while the stream lasts, and the fake
//!    ends the call when the stream ends). Verbs the fake does not model are reported in
//!    [`CallReport::protocol_errors`] and skipped.
//! 3. **The stream's WebSocket.** Twilio only connects to `wss://` URLs and drops a query
//!    string (reported). The fake does not do TLS to a loopback server: it maps
//!    `wss://PUBLIC_HOST/path` to `ws://` + the host and port of `base_url`, **keeping the
//!    path** (`wss://` when `base_url` is `https`). The upgrade request carries
//!    `X-Twilio-Signature` over the stream URL as written in the TwiML, with no parameters.
//! 4. **What Twilio sends**: `connected`; `start` (`sequenceNumber` `"1"`, `tracks`
//!    `["inbound"]`, the `<Parameter>`s as `customParameters`, `audio/x-mulaw` 8000 Hz mono);
//!    one `media` message per frame at real-time pace carrying the caller's audio and then
//!    silence for as long as the call lasts, as a phone line does (`track` `"inbound"`, `chunk`
//!    from `"1"`, `timestamp` in ms since the stream started, all strings); `dtmf` messages
//!    (`track` `"inbound_track"`) at the configured offsets; and `stop` at the end, followed by a
//!    WebSocket close. Every message after `connected` carries the next `sequenceNumber`.
//! 5. **What Twilio does with the server's messages**: `media` payloads are decoded (the fake's
//!    own G.711 μ-law, [`mulaw_decode`]) and queued, and play at 8000 samples/s from the moment
//!    they arrive or the audio before them ends; a `mark` is echoed once the audio queued before
//!    it has played, or at once when nothing is queued; `clear` drops the unplayed audio and
//!    echoes every pending mark immediately. The fake only plays audio it has received and only
//!    echoes a mark once what precedes it has played. What was played, and when, is recorded
//!    ([`CallReport::heard`], [`CallReport::played`], [`CallReport::marks_sent_back`]).
//!
//! The call ends with `stop` after [`CallConfig::hangup_after`]; or once the audio and
//! [`CallConfig::trailing_silence`] have been sent and nothing is left to play (so the trailing
//! silence must cover the server's answer time); or after [`CallConfig::time_limit`]; or when the
//! server closes the stream ([`CallReport::server_closed`]). What the server sends is checked
//! (JSON text, a known event, our `streamSid`, a mark name, base64 payloads): anything wrong is
//! recorded in [`CallReport::protocol_errors`] and otherwise ignored, as Twilio ignores it.
//!
//! Sources: Twilio's "Media Streams - WebSocket Messages"
//! (<https://www.twilio.com/docs/voice/media-streams/websocket-messages>), "TwiML Voice:
//! `<Stream>`" (<https://www.twilio.com/docs/voice/twiml/stream>) and "Webhooks security"
//! (<https://www.twilio.com/docs/usage/webhooks/webhooks-security>).
//!
//! ```no_run
//! # async fn demo() -> Result<(), atlas_fakes::twilio::CallError> {
//! use std::time::Duration;
//! use atlas_fakes::twilio::{CallConfig, place_call};
//! let mut call = CallConfig::new("http://127.0.0.1:8080", "https://voice.example.com", "token");
//! call.audio = vec![0; 8000]; // one second of the caller's speech, 8 kHz PCM
//! call.dtmf = vec![(Duration::from_millis(500), '5')];
//! let report = place_call(call).await?;
//! println!("heard {:?}, marks {:?}", report.heard_duration(), report.marks_sent_back);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use url::Url;

/// Path of the voice webhook on our server.
pub const VOICE_PATH: &str = "/v1/twilio/voice";

/// Sample rate of Media Streams audio (μ-law, mono), both ways.
pub const SAMPLE_RATE: u32 = 8000;

/// One sample at 8 kHz.
const NANOS_PER_SAMPLE: u64 = 125_000;
/// Twilio's default webhook timeout.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the close handshake may take once the call is over.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Durations are capped at this, so that deadlines never overflow.
const FOREVER: Duration = Duration::from_secs(86_400);
const MAX_PROTOCOL_ERRORS: usize = 100;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One call to place. [`CallConfig::new`] fills in everything but the addresses and the token.
#[derive(Clone, Debug)]
pub struct CallConfig {
    /// Where our server really listens, e.g. `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The URL our server believes Twilio reaches it at, e.g. `https://voice.example.com`: the
    /// webhook is signed over `{public_url}/v1/twilio/voice`.
    pub public_url: String,
    /// The account's auth token, the key of every signature.
    pub auth_token: String,
    /// `AccountSid` of the call (`AC` + 32 hex digits).
    pub account_sid: String,
    /// The caller's number (`From`, `Caller`).
    pub from: String,
    /// The number called (`To`, `Called`).
    pub to: String,
    /// The caller's speech, 8 kHz mono PCM; it is sent from the start of the stream.
    pub audio: Vec<i16>,
    /// Audio per `media` message; a whole number of 8 kHz samples. Default 20 ms, as Twilio.
    pub frame: Duration,
    /// Keys pressed, at offsets from the start of the stream (`0`–`9`, `*`, `#`).
    pub dtmf: Vec<(Duration, char)>,
    /// Hang up this long after the start of the stream, whatever is going on. Default `None`.
    pub hangup_after: Option<Duration>,
    /// Silence sent after [`audio`](Self::audio) before the caller may hang up; the caller then
    /// hangs up as soon as nothing is left to play. Default 2 s.
    pub trailing_silence: Duration,
    /// The call is cut (with `stop`) after this long in any case. Default 120 s.
    pub time_limit: Duration,
}

impl CallConfig {
    /// A call from `+12025550101` to `+12025550199` with no speech, 20 ms frames, no keys,
    /// 2 s of trailing silence and a 120 s limit, under a fresh account SID.
    pub fn new(
        base_url: impl Into<String>,
        public_url: impl Into<String>,
        auth_token: impl Into<String>,
    ) -> Self {
        Self {
            base_url: base_url.into(),
            public_url: public_url.into(),
            auth_token: auth_token.into(),
            account_sid: sid("AC"),
            from: "+12025550101".into(),
            to: "+12025550199".into(),
            audio: Vec::new(),
            frame: Duration::from_millis(20),
            dtmf: Vec::new(),
            hangup_after: None,
            trailing_silence: Duration::from_secs(2),
            time_limit: Duration::from_secs(120),
        }
    }
}

/// What happened on a call. Times are relative to the start of the stream (the `start` message).
#[derive(Clone, Debug)]
pub struct CallReport {
    /// `CallSid` of the call (`CA` + 32 hex digits).
    pub call_sid: String,
    /// `streamSid` of the Media Stream (`MZ` + 32 hex digits); `None` when no stream was opened.
    pub stream_sid: Option<String>,
    /// The TwiML our server answered the webhook with.
    pub twiml: String,
    /// The text of every `<Say>` executed, in order.
    pub said: Vec<String>,
    /// `Some(said text)` when the TwiML ended the call without opening a stream (`<Hangup/>`,
    /// `<Reject/>` or the end of the document); the text of the `<Say>`s, joined by spaces.
    pub refused: Option<String>,
    /// The `<Parameter>`s of the `<Stream>`, sent as `start.customParameters`.
    pub custom_parameters: Vec<(String, String)>,
    /// Everything that was played to the caller, 8 kHz PCM, gaps left out.
    pub heard: Vec<i16>,
    /// When it was played: contiguous stretches of playback.
    pub played: Vec<Span>,
    /// The marks echoed back to the server, in order.
    pub marks_sent_back: Vec<MarkEcho>,
    /// `clear` messages received.
    pub clears: usize,
    /// `media` messages received for our stream.
    pub media_messages: usize,
    /// From the end of the caller's speech to when the first audio the server sent after it
    /// (after the frame carrying the last speech sample went out) began to play. `None` without
    /// speech or without such audio.
    pub first_audio_after_speech_end: Option<Duration>,
    /// The server closed the stream (or its connection) before the caller hung up.
    pub server_closed: bool,
    /// How the call ended.
    pub ended: CallEnd,
    /// Everything wrong with what the server did (at most 100 entries), and TwiML the fake does
    /// not model.
    pub protocol_errors: Vec<String>,
}

impl CallReport {
    /// How long the caller heard audio.
    pub fn heard_duration(&self) -> Duration {
        samples_duration(self.heard.len())
    }

    /// Writes [`heard`](Self::heard) as a 16-bit 8 kHz mono WAV file (to listen to a call).
    pub fn write_heard_wav(&self, path: impl AsRef<std::path::Path>) -> Result<(), hound::Error> {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::create(path, spec)?;
        for &sample in &self.heard {
            writer.write_sample(sample)?;
        }
        writer.finalize()
    }
}

/// A stretch of time relative to the start of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// When it began.
    pub start: Duration,
    /// When it ended.
    pub end: Duration,
}

/// A `mark` the fake sent back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkEcho {
    /// The server's `mark.name`.
    pub name: String,
    /// When it was sent back, relative to the start of the stream.
    pub at: Duration,
    /// Sent back because a `clear` dropped the audio before it (not because it played).
    pub cleared: bool,
}

/// How a call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallEnd {
    /// The TwiML ended the call without opening a stream.
    Refused,
    /// The audio and trailing silence were sent and nothing was left to play.
    Finished,
    /// [`CallConfig::hangup_after`] elapsed.
    HungUp,
    /// [`CallConfig::time_limit`] elapsed.
    TimeLimit,
    /// The server closed the stream.
    ServerClosed,
    /// The connection failed (the error).
    ConnectionLost(String),
}

/// Why a call could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The [`CallConfig`] is not usable.
    #[error("invalid call configuration: {0}")]
    Config(String),
    /// The webhook request failed (connection, timeout).
    #[error("voice webhook request failed: {0}")]
    Webhook(String),
    /// The webhook was answered with a status other than 2xx.
    #[error("voice webhook answered {status}: {body}")]
    WebhookStatus {
        /// The HTTP status.
        status: u16,
        /// The response body.
        body: String,
    },
    /// The TwiML could not be read or names a stream Twilio would not open.
    #[error("unusable TwiML: {0}")]
    Twiml(String),
    /// The stream's WebSocket could not be opened.
    #[error("media stream connection failed: {0}")]
    Connect(String),
    /// The stream's WebSocket upgrade was refused with an HTTP status.
    #[error("media stream upgrade refused with {status}: {body}")]
    StreamRefused {
        /// The HTTP status.
        status: u16,
        /// The response body.
        body: String,
    },
}

/// `X-Twilio-Signature` as Twilio computes it: HMAC-SHA1 keyed by the auth token over the full
/// URL followed by every parameter, sorted by name, each name immediately followed by its value;
/// base64. For a WebSocket upgrade or a GET, `params` is empty.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut mac =
        Hmac::<Sha1>::new_from_slice(auth_token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(url.as_bytes());
    for (name, value) in sorted {
        mac.update(name.as_bytes());
        mac.update(value.as_bytes());
    }
    BASE64.encode(mac.finalize().into_bytes())
}

/// G.711 μ-law encoding of one sample, by the formula (bias 0x84, clip 32635, inverted bits).
pub fn mulaw_encode(sample: i16) -> u8 {
    const BIAS: i32 = 0x84;
    const CLIP: i32 = 32_635;
    let value = i32::from(sample);
    let sign = if value < 0 { 0x80 } else { 0 };
    let magnitude = value.abs().min(CLIP) + BIAS;
    // The segment is the position of the highest set bit above bit 7 (magnitude is 132..=32767).
    let exponent = 31 - magnitude.leading_zeros() as i32 - 7;
    let mantissa = (magnitude >> (exponent + 3)) & 0x0F;
    !((sign | (exponent << 4) | mantissa) as u8)
}

/// G.711 μ-law decoding of one byte, by the formula: 0xFF → 0, 0x80 → 32124, 0x00 → -32124.
pub fn mulaw_decode(byte: u8) -> i16 {
    let byte = !byte;
    let exponent = u32::from((byte >> 4) & 0x07);
    let mantissa = i32::from(byte & 0x0F);
    let magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84;
    (if byte & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }) as i16
}

/// Places one call against our server and reports what happened. Ends by itself: every wait
/// is bounded ([`CallConfig::time_limit`], webhook 15 s, handshake 10 s, close 2 s).
pub async fn place_call(cfg: CallConfig) -> Result<CallReport, CallError> {
    let frame_samples = frame_samples(cfg.frame)?;
    if let Some((_, digit)) = cfg.dtmf.iter().find(|(_, d)| !"0123456789*#".contains(*d)) {
        return Err(CallError::Config(format!("{digit:?} is not a DTMF key")));
    }
    let base_url = cfg.base_url.trim_end_matches('/');
    let public_url = cfg.public_url.trim_end_matches('/');
    let call_sid = sid("CA");

    // 1. The voice webhook.
    let params: Vec<(String, String)> = [
        ("AccountSid", cfg.account_sid.as_str()),
        ("ApiVersion", "2010-04-01"),
        ("CallSid", call_sid.as_str()),
        ("CallStatus", "ringing"),
        ("Called", cfg.to.as_str()),
        ("Caller", cfg.from.as_str()),
        ("Direction", "inbound"),
        ("From", cfg.from.as_str()),
        ("To", cfg.to.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let signature = sign(
        &cfg.auth_token,
        &format!("{public_url}{VOICE_PATH}"),
        &params,
    );
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .finish();
    let client = reqwest::Client::builder()
        .timeout(WEBHOOK_TIMEOUT)
        .build()
        .map_err(|e| CallError::Webhook(e.to_string()))?;
    let response = client
        .post(format!("{base_url}{VOICE_PATH}"))
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(reqwest::header::USER_AGENT, "TwilioProxy/1.1")
        .header("X-Twilio-Signature", signature.as_str())
        .body(body)
        .send()
        .await
        .map_err(|e| CallError::Webhook(e.to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| CallError::Webhook(e.to_string()))?;
    if !status.is_success() {
        return Err(CallError::WebhookStatus {
            status: status.as_u16(),
            body: text,
        });
    }

    // 2. The TwiML.
    let twiml = Twiml::parse(&text).map_err(CallError::Twiml)?;
    let mut report = CallReport {
        call_sid: call_sid.clone(),
        stream_sid: None,
        twiml: text,
        refused: None,
        said: twiml.said,
        custom_parameters: Vec::new(),
        heard: Vec::new(),
        played: Vec::new(),
        marks_sent_back: Vec::new(),
        clears: 0,
        media_messages: 0,
        first_audio_after_speech_end: None,
        server_closed: false,
        ended: CallEnd::Refused,
        protocol_errors: twiml.notes,
    };
    let (stream_url, parameters) = match twiml.action {
        Action::End => {
            report.refused = Some(report.said.join(" "));
            return Ok(report);
        }
        Action::Stream { url, parameters } => (url, parameters),
    };

    // 3. The stream's WebSocket.
    let (signed_url, local_url) = stream_urls(
        &stream_url,
        public_url,
        base_url,
        &mut report.protocol_errors,
    )?;
    let mut ws = connect(&local_url, &sign(&cfg.auth_token, &signed_url, &[])).await?;

    // 4–7. The stream.
    let mut first =
        vec![json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string()];
    let t0 = Instant::now();
    let trailing = usize::try_from(cfg.trailing_silence.as_nanos() / u128::from(NANOS_PER_SAMPLE))
        .unwrap_or(usize::MAX);
    let mut dtmf = cfg.dtmf.clone();
    dtmf.sort_by_key(|(offset, _)| *offset);
    let mut s = Session {
        cfg: &cfg,
        call_sid,
        stream_sid: sid("MZ"),
        t0,
        seq: 0,
        chunk: 0,
        frame_samples,
        total_samples: cfg.audio.len().saturating_add(trailing),
        sent_samples: 0,
        speech_end: (!cfg.audio.is_empty()).then(|| t0 + samples_duration(cfg.audio.len())),
        speech_sent: false,
        dtmf: dtmf.into(),
        playout: Playout::default(),
        marks: Vec::new(),
        clears: 0,
        media_messages: 0,
        first_reply: None,
        errors: std::mem::take(&mut report.protocol_errors),
    };
    first.push(s.start_message(&parameters));
    let hangup_at = cfg.hangup_after.map(|d| t0 + d.min(FOREVER));
    let limit = t0 + cfg.time_limit.min(FOREVER);
    let end = match send(&mut ws, &mut first).await {
        Ok(()) => run(&mut ws, &mut s, hangup_at, limit).await,
        Err(e) => CallEnd::ConnectionLost(e),
    };

    // The call is over: whatever was still playing is cut.
    let now = Instant::now();
    s.playout.advance(now);
    s.playout.cut(now);
    match &end {
        CallEnd::Finished | CallEnd::HungUp | CallEnd::TimeLimit => {
            let mut last = vec![s.stop_message()];
            if send(&mut ws, &mut last).await.is_ok() {
                let _ = ws.send(Message::Close(None)).await;
                drain(&mut ws).await;
            }
        }
        // Complete the close handshake the server started.
        CallEnd::ServerClosed => drain(&mut ws).await,
        CallEnd::Refused | CallEnd::ConnectionLost(_) => {}
    }

    report.stream_sid = Some(s.stream_sid);
    report.custom_parameters = parameters;
    report.heard = s.playout.heard;
    report.played = s
        .playout
        .spans
        .into_iter()
        .map(|(start, end)| Span {
            start: start.saturating_duration_since(t0),
            end: end.saturating_duration_since(t0),
        })
        .collect();
    report.marks_sent_back = s.marks;
    report.clears = s.clears;
    report.media_messages = s.media_messages;
    report.first_audio_after_speech_end = s.first_reply;
    report.protocol_errors = s.errors;
    report.server_closed = end == CallEnd::ServerClosed;
    report.ended = end;
    Ok(report)
}

/// The stream loop: media frames on a real-time clock, the server's messages, and timed events
/// (DTMF, marks coming due, the end of playback, hang-up), until the call ends.
async fn run(
    ws: &mut Ws,
    s: &mut Session<'_>,
    hangup_at: Option<Instant>,
    limit: Instant,
) -> CallEnd {
    let frame = samples_duration(s.frame_samples);
    // A frame goes out once its audio has been "spoken": the first at t0 + frame. If the fake
    // falls behind, late frames go out at once (Burst), as a network delivers delayed packets,
    // so the stream's media time keeps up with the wall clock and no audio is lost.
    let mut ticker = tokio::time::interval_at(s.t0 + frame, frame);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut out = Vec::new();
    loop {
        let now = Instant::now();
        out.extend(s.due(now));
        if let Err(e) = send(ws, &mut out).await {
            return CallEnd::ConnectionLost(e);
        }
        if hangup_at.is_some_and(|at| now >= at) {
            return CallEnd::HungUp;
        }
        if now >= limit {
            return CallEnd::TimeLimit;
        }
        if s.all_sent() && s.playout.idle(now) {
            return CallEnd::Finished;
        }
        let deadline = s.next_deadline(limit, hangup_at);
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    out.extend(s.on_text(text.as_str(), Instant::now()));
                }
                Some(Ok(Message::Binary(_))) => {
                    s.error("binary message: Twilio only takes JSON text messages".to_owned());
                }
                Some(Ok(Message::Close(_))) | None => return CallEnd::ServerClosed,
                Some(Ok(_)) => {} // ping, pong
                Some(Err(e)) => return CallEnd::ConnectionLost(e.to_string()),
            },
            _ = ticker.tick() => out.push(s.media_frame()),
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// The state of one stream.
struct Session<'a> {
    cfg: &'a CallConfig,
    call_sid: String,
    stream_sid: String,
    /// When `start` was sent.
    t0: Instant,
    /// Last `sequenceNumber` used.
    seq: u64,
    /// Last `media.chunk` used.
    chunk: u64,
    frame_samples: usize,
    /// Speech plus trailing silence.
    total_samples: usize,
    sent_samples: usize,
    /// When the caller stopped speaking.
    speech_end: Option<Instant>,
    /// The frame with the last speech sample has gone out.
    speech_sent: bool,
    /// Keys still to press, by offset.
    dtmf: VecDeque<(Duration, char)>,
    playout: Playout,
    marks: Vec<MarkEcho>,
    clears: usize,
    media_messages: usize,
    first_reply: Option<Duration>,
    errors: Vec<String>,
}

impl Session<'_> {
    fn next_seq(&mut self) -> String {
        self.seq += 1;
        self.seq.to_string()
    }

    fn all_sent(&self) -> bool {
        self.sent_samples >= self.total_samples
    }

    fn error(&mut self, error: String) {
        if self.errors.len() < MAX_PROTOCOL_ERRORS {
            self.errors.push(error);
        }
    }

    fn start_message(&mut self, parameters: &[(String, String)]) -> String {
        let custom: serde_json::Map<String, Value> = parameters
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let seq = self.next_seq();
        json!({
            "event": "start",
            "sequenceNumber": seq,
            "start": {
                "accountSid": self.cfg.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": custom,
                "mediaFormat": {
                    "encoding": "audio/x-mulaw",
                    "sampleRate": SAMPLE_RATE,
                    "channels": 1,
                },
            },
            "streamSid": self.stream_sid,
        })
        .to_string()
    }

    /// The next frame of the caller's line: speech, then silence.
    fn media_frame(&mut self) -> String {
        let from = self.sent_samples;
        let to = from + self.frame_samples;
        let audio = &self.cfg.audio;
        let payload: Vec<u8> = (from..to)
            .map(|i| mulaw_encode(audio.get(i).copied().unwrap_or(0)))
            .collect();
        if !audio.is_empty() && from < audio.len() && to >= audio.len() {
            self.speech_sent = true;
        }
        self.sent_samples = to;
        self.chunk += 1;
        let seq = self.next_seq();
        json!({
            "event": "media",
            "sequenceNumber": seq,
            "media": {
                "track": "inbound",
                "chunk": self.chunk.to_string(),
                "timestamp": samples_duration(from).as_millis().to_string(),
                "payload": BASE64.encode(payload),
            },
            "streamSid": self.stream_sid,
        })
        .to_string()
    }

    fn stop_message(&mut self) -> String {
        let seq = self.next_seq();
        json!({
            "event": "stop",
            "sequenceNumber": seq,
            "stop": {"accountSid": self.cfg.account_sid, "callSid": self.call_sid},
            "streamSid": self.stream_sid,
        })
        .to_string()
    }

    fn echo(&mut self, name: String, cleared: bool, now: Instant) -> String {
        let seq = self.next_seq();
        let message = json!({
            "event": "mark",
            "sequenceNumber": seq,
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        })
        .to_string();
        self.marks.push(MarkEcho {
            name,
            at: now.saturating_duration_since(self.t0),
            cleared,
        });
        message
    }

    /// Messages due by `now`: marks whose audio has played, keys pressed.
    fn due(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for name in self.playout.advance(now) {
            out.push(self.echo(name, false, now));
        }
        while let Some(&(offset, digit)) = self.dtmf.front() {
            match self.t0.checked_add(offset) {
                Some(at) if at <= now => {}
                _ => break,
            }
            self.dtmf.pop_front();
            let seq = self.next_seq();
            out.push(
                json!({
                    "event": "dtmf",
                    "streamSid": self.stream_sid,
                    "sequenceNumber": seq,
                    "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
                })
                .to_string(),
            );
        }
        out
    }

    fn next_deadline(&self, limit: Instant, hangup_at: Option<Instant>) -> Instant {
        let playback_end = if self.all_sent() {
            self.playout.busy_until
        } else {
            None
        };
        let key = self
            .dtmf
            .front()
            .and_then(|(offset, _)| self.t0.checked_add(*offset));
        [hangup_at, key, self.playout.next_mark(), playback_end]
            .into_iter()
            .flatten()
            .fold(limit, Instant::min)
    }

    /// One message from the server; returns the marks it sends back.
    fn on_text(&mut self, text: &str, now: Instant) -> Vec<String> {
        let message: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.error(format!("message is not JSON ({e}): {}", clip(text)));
                return Vec::new();
            }
        };
        let event = message
            .get("event")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !matches!(event, "media" | "mark" | "clear") {
            self.error(format!("unknown event {event:?}: {}", clip(text)));
            return Vec::new();
        }
        if message.get("streamSid").and_then(Value::as_str) != Some(self.stream_sid.as_str()) {
            self.error(format!("{event} for another streamSid: {}", clip(text)));
            return Vec::new();
        }
        match event {
            "media" => {
                self.media_messages += 1;
                let Some(payload) = message.pointer("/media/payload").and_then(Value::as_str)
                else {
                    self.error(format!("media without media.payload: {}", clip(text)));
                    return Vec::new();
                };
                match BASE64.decode(payload) {
                    Ok(bytes) => {
                        let start = self
                            .playout
                            .media(now, bytes.into_iter().map(mulaw_decode).collect());
                        if self.speech_sent && self.first_reply.is_none() {
                            self.first_reply = self
                                .speech_end
                                .map(|end| start.saturating_duration_since(end));
                        }
                    }
                    Err(e) => self.error(format!("media payload is not base64 ({e})")),
                }
                Vec::new()
            }
            "mark" => match message.pointer("/mark/name").and_then(Value::as_str) {
                Some(name) => {
                    let due = self.playout.mark(now, name.to_owned());
                    due.into_iter()
                        .map(|name| self.echo(name, false, now))
                        .collect()
                }
                None => {
                    self.error(format!("mark without mark.name: {}", clip(text)));
                    Vec::new()
                }
            },
            _ => {
                self.clears += 1;
                let echoed = self.playout.clear(now);
                echoed
                    .into_iter()
                    .map(|(name, cleared)| self.echo(name, cleared, now))
                    .collect()
            }
        }
    }
}

/// The caller's earpiece: audio queued in arrival order and played at 8000 samples/s, with the
/// marks queued behind it. Pure (takes the time), so it can be tested without a clock.
#[derive(Debug, Default)]
struct Playout {
    queue: VecDeque<Queued>,
    /// When the queued audio will have played; `None` before any audio.
    busy_until: Option<Instant>,
    heard: Vec<i16>,
    /// Contiguous stretches of playback.
    spans: Vec<(Instant, Instant)>,
}

#[derive(Debug)]
enum Queued {
    Audio { start: Instant, samples: Vec<i16> },
    Mark { at: Instant, name: String },
}

impl Playout {
    /// Queues audio received at `now`; returns when it starts to play.
    fn media(&mut self, now: Instant, samples: Vec<i16>) -> Instant {
        let start = self.busy_until.map_or(now, |busy| busy.max(now));
        if !samples.is_empty() {
            self.busy_until = Some(start + samples_duration(samples.len()));
            self.queue.push_back(Queued::Audio { start, samples });
        }
        start
    }

    /// Queues a mark received at `now` behind the audio before it. Returns the marks due now,
    /// this one included when no audio is left to play.
    fn mark(&mut self, now: Instant, name: String) -> Vec<String> {
        let mut due = self.advance(now);
        match self.busy_until {
            Some(end) if end > now => self.queue.push_back(Queued::Mark { at: end, name }),
            _ => due.push(name),
        }
        due
    }

    /// A `clear` at `now`: the marks due, then every pending mark (flagged as cleared); the
    /// audio playing is cut and the rest dropped.
    fn clear(&mut self, now: Instant) -> Vec<(String, bool)> {
        let mut echoed: Vec<(String, bool)> =
            self.advance(now).into_iter().map(|n| (n, false)).collect();
        echoed.extend(self.cut(now).into_iter().map(|n| (n, true)));
        echoed
    }

    /// Plays what has finished playing by `now`; returns the marks that came due, in order.
    fn advance(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        loop {
            let ready = match self.queue.front() {
                Some(Queued::Audio { start, samples }) => {
                    *start + samples_duration(samples.len()) <= now
                }
                Some(Queued::Mark { at, .. }) => *at <= now,
                None => false,
            };
            if !ready {
                return due;
            }
            match self.queue.pop_front() {
                Some(Queued::Audio { start, samples }) => self.played(start, &samples),
                Some(Queued::Mark { name, .. }) => due.push(name),
                None => return due,
            }
        }
    }

    /// Stops playback at `now`: what is playing is cut there, the rest dropped. Returns the
    /// marks that were still queued.
    fn cut(&mut self, now: Instant) -> Vec<String> {
        let mut pending = Vec::new();
        for item in std::mem::take(&mut self.queue) {
            match item {
                Queued::Audio { start, samples } if start < now => {
                    let played = now.saturating_duration_since(start).as_nanos()
                        / u128::from(NANOS_PER_SAMPLE);
                    let played = usize::try_from(played).unwrap_or(usize::MAX);
                    self.played(start, &samples[..played.min(samples.len())]);
                }
                Queued::Audio { .. } => {}
                Queued::Mark { name, .. } => pending.push(name),
            }
        }
        self.busy_until = self.busy_until.map(|busy| busy.min(now));
        pending
    }

    fn played(&mut self, start: Instant, samples: &[i16]) {
        if samples.is_empty() {
            return;
        }
        let end = start + samples_duration(samples.len());
        self.heard.extend_from_slice(samples);
        match self.spans.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.spans.push((start, end)),
        }
    }

    fn next_mark(&self) -> Option<Instant> {
        self.queue.iter().find_map(|item| match item {
            Queued::Mark { at, .. } => Some(*at),
            Queued::Audio { .. } => None,
        })
    }

    fn idle(&self, now: Instant) -> bool {
        self.busy_until.is_none_or(|busy| busy <= now)
    }
}

/// What the TwiML tells Twilio to do.
#[derive(Debug, PartialEq)]
enum Action {
    /// `<Connect><Stream url>` with its `<Parameter>`s.
    Stream {
        url: String,
        parameters: Vec<(String, String)>,
    },
    /// `<Hangup/>`, `<Reject/>` or the end of the document.
    End,
}

#[derive(Debug)]
struct Twiml {
    said: Vec<String>,
    action: Action,
    /// What the fake does not model.
    notes: Vec<String>,
}

impl Twiml {
    /// Executes the verbs of `<Response>` in order, up to the first that ends the call or opens
    /// the stream.
    fn parse(xml: &str) -> Result<Twiml, String> {
        let mut depth = 0usize;
        let mut root = false;
        let mut said = Vec::new();
        let mut notes = Vec::new();
        let mut say: Option<String> = None;
        let mut in_connect = false;
        let mut stream: Option<(String, Vec<(String, String)>)> = None;
        for token in tokenize(xml)? {
            let (name, attrs, opens, closes) = match token {
                Token::Text(text) => {
                    if let Some(say) = say.as_mut() {
                        say.push_str(&text);
                    }
                    continue;
                }
                Token::Open { name, attrs, empty } => (name, attrs, true, empty),
                Token::Close(name) => (name, Vec::new(), false, true),
            };
            if opens {
                depth += 1;
                match (depth, name.as_str()) {
                    (1, "Response") => root = true,
                    (1, other) => {
                        return Err(format!("the root element is <{other}>, not <Response>"));
                    }
                    (2, "Say") => say = Some(String::new()),
                    (2, "Hangup" | "Reject") => {
                        return Ok(Twiml {
                            said,
                            action: Action::End,
                            notes,
                        });
                    }
                    (2, "Connect") => in_connect = true,
                    // Silence or a recording: nothing the fake needs to hear.
                    (2, "Pause" | "Play") => {}
                    (2, other) => {
                        notes.push(format!("TwiML verb <{other}> is not modelled; skipped"))
                    }
                    (3, "Stream") if in_connect => {
                        let url = attr(&attrs, "url").ok_or("<Stream> has no url")?;
                        stream = Some((url, Vec::new()));
                    }
                    (3, other) if in_connect => {
                        notes.push(format!("<Connect><{other}> is not modelled; skipped"));
                    }
                    (4, "Parameter") => {
                        if let Some((_, parameters)) = stream.as_mut() {
                            match (attr(&attrs, "name"), attr(&attrs, "value")) {
                                (Some(n), Some(v)) => parameters.push((n, v)),
                                _ => notes.push("<Parameter> without name or value".to_owned()),
                            }
                        }
                    }
                    _ => {}
                }
            }
            if closes {
                match (depth, name.as_str()) {
                    (2, "Say") => {
                        if let Some(text) = say.take() {
                            said.push(text.trim().to_owned());
                        }
                    }
                    (2, "Connect") => {
                        in_connect = false;
                        if let Some((url, parameters)) = stream.take() {
                            return Ok(Twiml {
                                said,
                                action: Action::Stream { url, parameters },
                                notes,
                            });
                        }
                        notes.push("<Connect> without <Stream>".to_owned());
                    }
                    _ => {}
                }
                depth = depth.checked_sub(1).ok_or("unbalanced end tag")?;
            }
        }
        if !root {
            return Err("no <Response> element".to_owned());
        }
        Ok(Twiml {
            said,
            action: Action::End,
            notes,
        })
    }
}

fn attr(attrs: &[(String, String)], name: &str) -> Option<String> {
    attrs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// A piece of XML, as far as TwiML needs it.
#[derive(Debug, PartialEq)]
enum Token {
    Open {
        name: String,
        attrs: Vec<(String, String)>,
        empty: bool,
    },
    Close(String),
    Text(String),
}

/// A tolerant XML scan: elements, attributes, text and CDATA, with the predefined and numeric
/// entities decoded; declarations, comments and doctypes skipped.
fn tokenize(xml: &str) -> Result<Vec<Token>, String> {
    fn skip_past<'a>(s: &'a str, end: &str) -> Result<&'a str, String> {
        s.find(end)
            .map(|i| &s[i + end.len()..])
            .ok_or_else(|| format!("unterminated markup, expected {end:?}"))
    }
    fn push_text(out: &mut Vec<Token>, text: &str) {
        if !text.trim().is_empty() {
            out.push(Token::Text(unescape(text)));
        }
    }
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(lt) = rest.find('<') {
        push_text(&mut out, &rest[..lt]);
        rest = &rest[lt..];
        if let Some(r) = rest.strip_prefix("<!--") {
            rest = skip_past(r, "-->")?;
        } else if let Some(r) = rest.strip_prefix("<![CDATA[") {
            let end = r.find("]]>").ok_or("unterminated CDATA")?;
            out.push(Token::Text(r[..end].to_owned()));
            rest = &r[end + 3..];
        } else if let Some(r) = rest.strip_prefix("<?") {
            rest = skip_past(r, "?>")?;
        } else if let Some(r) = rest.strip_prefix("<!") {
            rest = skip_past(r, ">")?;
        } else if let Some(r) = rest.strip_prefix("</") {
            let end = r.find('>').ok_or("unterminated end tag")?;
            out.push(Token::Close(r[..end].trim().to_owned()));
            rest = &r[end + 1..];
        } else {
            let end = tag_end(rest).ok_or("unterminated tag")?;
            out.push(open_tag(&rest[1..end])?);
            rest = &rest[end + 1..];
        }
    }
    push_text(&mut out, rest);
    Ok(out)
}

/// Index of the `>` closing the tag at the start of `s`, skipping quoted attribute values.
fn tag_end(s: &str) -> Option<usize> {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '>') => return Some(i),
            _ => {}
        }
    }
    None
}

/// `name attr="value" …` (or ending in `/`) to an open token.
fn open_tag(inner: &str) -> Result<Token, String> {
    let (inner, empty) = match inner.trim_end().strip_suffix('/') {
        Some(inner) => (inner, true),
        None => (inner, false),
    };
    let inner = inner.trim();
    let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
    let name = &inner[..name_end];
    if name.is_empty() {
        return Err("a tag without a name".to_owned());
    }
    let mut attrs = Vec::new();
    let mut rest = inner[name_end..].trim_start();
    while !rest.is_empty() {
        let eq = rest
            .find('=')
            .ok_or_else(|| format!("an attribute without a value in <{name}>"))?;
        let key = rest[..eq].trim();
        let value = rest[eq + 1..].trim_start();
        let quote = value
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(|| format!("unquoted attribute {key} in <{name}>"))?;
        let close = value[1..]
            .find(quote)
            .ok_or_else(|| format!("unterminated attribute {key} in <{name}>"))?;
        attrs.push((key.to_owned(), unescape(&value[1..1 + close])));
        rest = value[close + 2..].trim_start();
    }
    Ok(Token::Open {
        name: name.to_owned(),
        attrs,
        empty,
    })
}

/// Decodes `&amp;` `&lt;` `&gt;` `&quot;` `&apos;` `&#N;` `&#xH;`; anything else is kept as is.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let decoded = rest.find(';').and_then(|semi| {
            let entity = &rest[1..semi];
            let c = match entity {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                    .map(|hex| u32::from_str_radix(hex, 16))
                    .or_else(|| entity.strip_prefix('#').map(str::parse::<u32>))
                    .and_then(Result::ok)
                    .and_then(char::from_u32),
            };
            c.map(|c| (c, semi))
        });
        match decoded {
            Some((c, semi)) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The stream URL as Twilio signs it, and the loopback URL the fake connects to instead: the
/// scheme and host:port of `base_url` with the stream URL's path.
fn stream_urls(
    stream_url: &str,
    public_url: &str,
    base_url: &str,
    notes: &mut Vec<String>,
) -> Result<(String, String), CallError> {
    let webhook = Url::parse(&format!("{public_url}{VOICE_PATH}"))
        .map_err(|e| CallError::Config(format!("public_url {public_url:?}: {e}")))?;
    // Twilio takes a relative URL too, relative to the document.
    let absolute = Url::parse(stream_url).is_ok();
    let mut url = webhook
        .join(stream_url)
        .map_err(|e| CallError::Twiml(format!("<Stream url={stream_url:?}>: {e}")))?;
    if !absolute && url.set_scheme("wss").is_err() {
        return Err(CallError::Twiml(format!(
            "<Stream url={stream_url:?}> cannot be made a wss:// URL"
        )));
    }
    if url.scheme() != "wss" {
        return Err(CallError::Twiml(format!(
            "<Stream url={stream_url:?}>: Twilio only connects to wss:// URLs"
        )));
    }
    let mut signed = stream_url.to_owned();
    if url.query().is_some() {
        notes.push(format!(
            "<Stream url={stream_url:?}> has a query string, which Twilio does not allow (dropped)"
        ));
        url.set_query(None);
        signed = url.to_string();
    } else if !absolute {
        signed = url.to_string();
    }
    if url.host_str() != webhook.host_str() {
        notes.push(format!(
            "<Stream> host {:?} is not the public host {:?}: Twilio would connect there",
            url.host_str().unwrap_or_default(),
            webhook.host_str().unwrap_or_default()
        ));
    }
    let base = Url::parse(base_url)
        .map_err(|e| CallError::Config(format!("base_url {base_url:?}: {e}")))?;
    let host = base
        .host_str()
        .ok_or_else(|| CallError::Config(format!("base_url {base_url:?} has no host")))?;
    let scheme = if base.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    let local = match base.port() {
        Some(port) => format!("{scheme}://{host}:{port}{}", url.path()),
        None => format!("{scheme}://{host}{}", url.path()),
    };
    Ok((signed, local))
}

/// Opens the stream's WebSocket as Twilio does: signed, and without Nagle's delay on 20 ms frames.
async fn connect(url: &str, signature: &str) -> Result<Ws, CallError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| CallError::Connect(e.to_string()))?;
    let value = signature
        .parse()
        .map_err(|_| CallError::Connect("the signature is not a header value".to_owned()))?;
    request.headers_mut().insert("x-twilio-signature", value);
    let connecting = tokio_tungstenite::connect_async_with_config(request, None, true);
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(CallError::Connect(format!(
            "no handshake within {CONNECT_TIMEOUT:?}"
        ))),
        Ok(Err(tungstenite::Error::Http(response))) => Err(CallError::StreamRefused {
            status: response.status().as_u16(),
            body: String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                .into_owned(),
        }),
        Ok(Err(e)) => Err(CallError::Connect(e.to_string())),
        Ok(Ok((ws, _))) => Ok(ws),
    }
}

/// Sends (and empties) `out`, in order.
async fn send(ws: &mut Ws, out: &mut Vec<String>) -> Result<(), String> {
    for text in out.drain(..) {
        ws.send(Message::Text(text.into()))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Reads until the close handshake completes (bounded).
async fn drain(ws: &mut Ws) {
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

fn frame_samples(frame: Duration) -> Result<usize, CallError> {
    let nanos = frame.as_nanos();
    let per_sample = u128::from(NANOS_PER_SAMPLE);
    if nanos == 0 || !nanos.is_multiple_of(per_sample) || frame > FOREVER {
        return Err(CallError::Config(format!(
            "frame {frame:?} is not a whole number of 8 kHz samples"
        )));
    }
    usize::try_from(nanos / per_sample)
        .map_err(|_| CallError::Config(format!("frame {frame:?} is too long")))
}

fn samples_duration(samples: usize) -> Duration {
    Duration::from_nanos((samples as u64).saturating_mul(NANOS_PER_SAMPLE))
}

/// A Twilio-style SID: the prefix and 32 hex digits.
fn sid(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// The start of a message, for error reports.
fn clip(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::extract::State;
    use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use base64::Engine as _;

    use super::*;

    const TOKEN: &str = "test-auth-token";
    const PUBLIC: &str = "https://voice.example.com";
    const STREAM_URL: &str = "wss://voice.example.com/v1/twilio/stream";
    const STREAM_TWIML: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Connect><Stream url="wss://voice.example.com/v1/twilio/stream"><Parameter name="session" value="abc&amp;1"/></Stream></Connect></Response>"#;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn tone(n: usize) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as f64 * std::f64::consts::TAU * 440.0 / 8000.0).sin() * 8000.0) as i16)
            .collect()
    }

    fn through_mulaw(samples: &[i16]) -> Vec<i16> {
        samples
            .iter()
            .map(|&s| mulaw_decode(mulaw_encode(s)))
            .collect()
    }

    // ---- μ-law ----

    #[test]
    fn mulaw_known_values() {
        // Decoding per G.711; the other values were checked against CPython's audioop.
        for (byte, sample) in [
            (0xFF, 0),
            (0x00, -32124),
            (0x80, 32124),
            (0x7F, 0),
            (0xCE, 988),
            (0x31, -3772),
        ] {
            assert_eq!(mulaw_decode(byte), sample, "decode {byte:#04x}");
        }
        for (sample, byte) in [
            (0, 0xFF),
            (1000, 0xCE),
            (-1000, 0x4E),
            (100, 0xF2),
            (-5, 0x7E),
            (i16::MAX, 0x80),
            (i16::MIN, 0x00),
        ] {
            assert_eq!(mulaw_encode(sample), byte, "encode {sample}");
        }
    }

    #[test]
    fn mulaw_round_trips_and_is_monotonic() {
        // Every code but "negative zero" (0x7F, which decodes to 0) survives decode-encode.
        for byte in 0..=255u8 {
            if byte != 0x7F {
                assert_eq!(mulaw_encode(mulaw_decode(byte)), byte, "{byte:#04x}");
            }
        }
        let mut previous = i16::MIN;
        for sample in i16::MIN..=i16::MAX {
            let decoded = mulaw_decode(mulaw_encode(sample));
            assert!(decoded >= previous, "not monotonic at {sample}");
            previous = decoded;
            // Within half a quantisation step (plus the clip above 32635).
            let error = (i32::from(decoded) - i32::from(sample)).abs();
            assert!(
                error <= (i32::from(sample).abs() + 132) / 32 + 1,
                "{sample} -> {decoded}"
            );
        }
    }

    // ---- signatures ----

    #[test]
    fn signature_matches_twilios_documented_example() {
        // https://www.twilio.com/docs/usage/webhooks/webhooks-security (and Twilio's snippets).
        let params = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+12349013030"),
            ("Digits", "1234"),
            ("From", "+12349013030"),
            ("To", "+18005551212"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(sign("12345", url, &params), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        let mut reversed = params.to_vec();
        reversed.reverse();
        assert_eq!(
            sign("12345", url, &reversed),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
        assert_ne!(sign("12346", url, &params), "0/KCTR6DLpKmkAf8muzZqo1nDgQ=");
        assert_ne!(
            sign("12345", "https://mycompany.com/myapp.php", &params),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }

    // ---- TwiML ----

    #[test]
    fn twiml_connect_stream_with_parameters() {
        let twiml = Twiml::parse(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE Response>
<Response>
  <!-- greet first -->
  <Say voice="alice">Connecting &amp; streaming&#33;</Say>
  <Connect>
    <Stream url="wss://voice.example.com/v1/twilio/stream">
      <Parameter name="session" value="abc&amp;1" />
      <Parameter name='caller' value="+1 &lt;x&gt; &#x41;"/>
    </Stream>
  </Connect>
  <Say>never reached</Say>
</Response>"#,
        )
        .unwrap();
        assert_eq!(twiml.said, ["Connecting & streaming!"]);
        assert_eq!(
            twiml.action,
            Action::Stream {
                url: STREAM_URL.to_owned(),
                parameters: vec![
                    ("session".to_owned(), "abc&1".to_owned()),
                    ("caller".to_owned(), "+1 <x> A".to_owned()),
                ],
            }
        );
        assert!(twiml.notes.is_empty(), "{:?}", twiml.notes);
    }

    #[test]
    fn twiml_that_ends_the_call() {
        let hangup =
            Twiml::parse("<Response><Say>Sorry, we are closed.</Say><Hangup/></Response>").unwrap();
        assert_eq!(
            (hangup.said, hangup.action),
            (vec!["Sorry, we are closed.".to_owned()], Action::End)
        );
        let reject = Twiml::parse(r#"<Response><Reject reason="busy"/></Response>"#).unwrap();
        assert_eq!(reject.action, Action::End);
        let end = Twiml::parse("<Response><Say><![CDATA[Bye <now>]]></Say></Response>").unwrap();
        assert_eq!(
            (end.said, end.action),
            (vec!["Bye <now>".to_owned()], Action::End)
        );
        let other = Twiml::parse("<Response><Gather/><Connect/></Response>").unwrap();
        assert_eq!(other.action, Action::End);
        assert_eq!(other.notes.len(), 2, "{:?}", other.notes);
        assert!(Twiml::parse("<Html/>").is_err());
        assert!(Twiml::parse("<Response").is_err());
        assert!(Twiml::parse("<Response><Connect><Stream/></Connect></Response>").is_err());
        assert!(Twiml::parse("not xml").is_err());
    }

    #[test]
    fn stream_urls_map_to_the_loopback_server() {
        let mut notes = Vec::new();
        let urls = stream_urls(STREAM_URL, PUBLIC, "http://127.0.0.1:8080", &mut notes).unwrap();
        assert_eq!(
            urls,
            (
                STREAM_URL.to_owned(),
                "ws://127.0.0.1:8080/v1/twilio/stream".to_owned()
            )
        );
        let urls = stream_urls(
            "/v1/twilio/stream",
            PUBLIC,
            "https://localhost:9443/",
            &mut notes,
        )
        .unwrap();
        assert_eq!(
            urls,
            (
                STREAM_URL.to_owned(),
                "wss://localhost:9443/v1/twilio/stream".to_owned()
            )
        );
        assert!(notes.is_empty(), "{notes:?}");
        let urls = stream_urls(
            "wss://voice.example.com/s?token=1",
            PUBLIC,
            "http://[::1]:80",
            &mut notes,
        )
        .unwrap();
        assert_eq!(
            urls,
            (
                "wss://voice.example.com/s".to_owned(),
                "ws://[::1]/s".to_owned()
            )
        );
        assert_eq!(notes.len(), 1);
        stream_urls(
            "wss://elsewhere.example.com/s",
            PUBLIC,
            "http://127.0.0.1:1",
            &mut notes,
        )
        .unwrap();
        assert_eq!(notes.len(), 2);
        assert!(matches!(
            stream_urls(
                "ws://voice.example.com/s",
                PUBLIC,
                "http://127.0.0.1:1",
                &mut notes
            ),
            Err(CallError::Twiml(_))
        ));
    }

    // ---- playback ----

    #[test]
    fn marks_follow_the_audio_before_them_and_clear_flushes_them() {
        let t = Instant::now();
        let mut p = Playout::default();
        assert!(p.idle(t));
        assert_eq!(p.media(t, vec![1; 800]), t); // 100 ms, plays at once
        assert!(p.mark(t, "a".to_owned()).is_empty());
        assert_eq!(p.media(t + ms(10), vec![2; 800]), t + ms(100)); // queued behind
        assert!(p.mark(t + ms(10), "b".to_owned()).is_empty());
        assert_eq!(p.next_mark(), Some(t + ms(100)));
        assert!(p.advance(t + ms(99)).is_empty());
        assert_eq!(p.advance(t + ms(100)), ["a"]);
        assert_eq!(p.heard, vec![1; 800]);
        assert_eq!(p.next_mark(), Some(t + ms(200)));
        // Half-way through the second chunk: it is cut there and b comes back as cleared.
        assert_eq!(p.clear(t + ms(150)), [("b".to_owned(), true)]);
        assert_eq!(p.heard.len(), 1200);
        assert_eq!(p.spans, [(t, t + ms(150))]);
        assert!(p.idle(t + ms(150)));
        // Nothing queued: a mark comes straight back.
        assert_eq!(p.mark(t + ms(200), "c".to_owned()), ["c"]);
        // Audio after a gap plays when it arrives: a new span.
        assert_eq!(p.media(t + ms(300), vec![3; 80]), t + ms(300));
        assert_eq!(p.advance(t + ms(400)), Vec::<String>::new());
        assert_eq!(p.spans, [(t, t + ms(150)), (t + ms(300), t + ms(310))]);
        assert_eq!(p.heard.len(), 1280);
    }

    // ---- whole calls against an in-process server ----

    #[derive(Clone, Copy, PartialEq)]
    enum Scenario {
        /// Replies after the caller spoke, with two marks.
        Reply,
        /// A long reply, cleared part-way, then a mark with nothing queued.
        Clear,
        /// Malformed messages, then closes the stream.
        Garbage,
        /// Says nothing.
        Silent,
    }

    struct Server {
        scenario: Scenario,
        twiml: String,
        webhook: Mutex<Vec<(String, String)>>,
        webhook_signed: Mutex<Option<bool>>,
        stream_signed: Mutex<Option<bool>>,
        log: Mutex<Vec<Value>>,
    }

    async fn start_server(scenario: Scenario, twiml: &str) -> (String, Arc<Server>) {
        let server = Arc::new(Server {
            scenario,
            twiml: twiml.to_owned(),
            webhook: Mutex::default(),
            webhook_signed: Mutex::default(),
            stream_signed: Mutex::default(),
            log: Mutex::default(),
        });
        let app = Router::new()
            .route(VOICE_PATH, post(voice))
            .route("/v1/twilio/stream", get(stream))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}"), server)
    }

    fn signature_ok(headers: &HeaderMap, expected: &str) -> bool {
        headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            == Some(expected)
    }

    async fn voice(
        State(server): State<Arc<Server>>,
        headers: HeaderMap,
        body: String,
    ) -> Response {
        let params: Vec<(String, String)> = url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
        let ok = signature_ok(
            &headers,
            &sign(TOKEN, &format!("{PUBLIC}{VOICE_PATH}"), &params),
        );
        *server.webhook_signed.lock().unwrap() = Some(ok);
        *server.webhook.lock().unwrap() = params;
        if !ok {
            return (StatusCode::FORBIDDEN, "bad signature").into_response();
        }
        ([(header::CONTENT_TYPE, "text/xml")], server.twiml.clone()).into_response()
    }

    async fn stream(
        State(server): State<Arc<Server>>,
        headers: HeaderMap,
        ws: WebSocketUpgrade,
    ) -> Response {
        *server.stream_signed.lock().unwrap() =
            Some(signature_ok(&headers, &sign(TOKEN, STREAM_URL, &[])));
        ws.on_upgrade(move |socket| serve_stream(socket, server))
    }

    fn text(value: Value) -> WsMessage {
        WsMessage::Text(value.to_string().into())
    }

    fn media(sid: &str, samples: &[i16]) -> WsMessage {
        let payload: Vec<u8> = samples.iter().map(|&s| mulaw_encode(s)).collect();
        text(
            json!({"event": "media", "streamSid": sid, "media": {"payload": BASE64.encode(payload)}}),
        )
    }

    fn mark(sid: &str, name: &str) -> WsMessage {
        text(json!({"event": "mark", "streamSid": sid, "mark": {"name": name}}))
    }

    impl Scenario {
        fn on_start(self, sid: &str) -> Vec<WsMessage> {
            match self {
                Scenario::Garbage => vec![
                    text(json!({"event": "nope", "streamSid": sid})),
                    text(
                        json!({"event": "media", "streamSid": "MZ00000000000000000000000000000000", "media": {"payload": "AAAA"}}),
                    ),
                    text(json!({"event": "media", "streamSid": sid, "media": {"payload": "!!!"}})),
                    WsMessage::Binary(vec![0u8].into()),
                    WsMessage::Close(None),
                ],
                _ => Vec::new(),
            }
        }

        /// Reacts to the caller's `frames`-th media message (media time, not wall time).
        fn on_media(self, frames: usize, sid: &str) -> Vec<WsMessage> {
            match (self, frames) {
                // 500 ms in: after the 400 ms of speech.
                (Scenario::Reply, 25) => {
                    let reply = tone(4800);
                    let mut out = vec![media(sid, &reply[..2400]), mark(sid, "one")];
                    out.extend(reply[2400..].chunks(800).map(|c| media(sid, c)));
                    out.push(mark(sid, "two"));
                    out
                }
                (Scenario::Clear, 5) => vec![media(sid, &tone(16_000)), mark(sid, "long")],
                (Scenario::Clear, 15) => vec![
                    text(json!({"event": "clear", "streamSid": sid})),
                    mark(sid, "after-clear"),
                ],
                _ => Vec::new(),
            }
        }
    }

    async fn serve_stream(mut socket: WebSocket, server: Arc<Server>) {
        let mut sid = String::new();
        let mut frames = 0;
        while let Some(Ok(msg)) = socket.recv().await {
            let WsMessage::Text(msg) = msg else { continue };
            let value: Value = serde_json::from_str(msg.as_str()).unwrap();
            server.log.lock().unwrap().push(value.clone());
            let out = match value["event"].as_str() {
                Some("start") => {
                    sid = value["streamSid"].as_str().unwrap_or_default().to_owned();
                    server.scenario.on_start(&sid)
                }
                Some("media") => {
                    frames += 1;
                    server.scenario.on_media(frames, &sid)
                }
                _ => Vec::new(),
            };
            for msg in out {
                if socket.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }

    /// The names of the marks in the server's `log`, in order.
    fn mark_names(log: &[Value]) -> Vec<&str> {
        log.iter()
            .filter(|m| m["event"] == "mark")
            .filter_map(|m| m["mark"]["name"].as_str())
            .collect()
    }

    fn payload(message: &Value) -> Vec<u8> {
        BASE64
            .decode(message["media"]["payload"].as_str().unwrap())
            .unwrap()
    }

    #[tokio::test]
    async fn call_plays_the_reply_and_echoes_marks_after_it_played() {
        let (base, server) = start_server(Scenario::Reply, STREAM_TWIML).await;
        let mut cfg = CallConfig::new(&base, PUBLIC, TOKEN);
        cfg.audio = tone(3200); // 400 ms of speech
        cfg.trailing_silence = ms(600);
        cfg.dtmf = vec![(ms(100), '7')];
        let report = place_call(cfg.clone()).await.unwrap();

        assert_eq!(report.ended, CallEnd::Finished);
        assert!(!report.server_closed);
        assert!(
            report.protocol_errors.is_empty(),
            "{:?}",
            report.protocol_errors
        );
        assert_eq!(
            report.custom_parameters,
            [("session".to_owned(), "abc&1".to_owned())]
        );
        // Heard: exactly what the server sent, through μ-law, for exactly its duration.
        assert_eq!(report.heard, through_mulaw(&tone(4800)));
        assert_eq!(report.heard_duration(), ms(600));
        assert_eq!(report.media_messages, 4);
        let played: Duration = report.played.iter().map(|s| s.end - s.start).sum();
        assert_eq!(played, ms(600));
        let start = report.played[0].start;
        assert!(start >= ms(500), "{start:?}"); // not before the server could have sent it
        // Each mark came back only once the audio before it had played.
        let names: Vec<&str> = report
            .marks_sent_back
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(names, ["one", "two"]);
        assert!(report.marks_sent_back.iter().all(|m| !m.cleared));
        assert!(report.marks_sent_back[0].at >= start + ms(300));
        assert!(report.marks_sent_back[1].at >= start + ms(600));
        // Speech ended at 400 ms; the reply went out after the 25th frame (500 ms).
        let latency = report.first_audio_after_speech_end.unwrap();
        assert!(
            latency >= ms(100) && latency < Duration::from_secs(5),
            "{latency:?}"
        );

        assert_eq!(*server.webhook_signed.lock().unwrap(), Some(true));
        assert_eq!(*server.stream_signed.lock().unwrap(), Some(true));
        let webhook = server.webhook.lock().unwrap().clone();
        let param = |name: &str| {
            webhook
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(param("CallSid").as_deref(), Some(report.call_sid.as_str()));
        assert_eq!(param("CallStatus").as_deref(), Some("ringing"));
        assert_eq!(param("Direction").as_deref(), Some("inbound"));
        assert_eq!(param("ApiVersion").as_deref(), Some("2010-04-01"));
        assert_eq!(param("From"), Some(cfg.from.clone()));
        assert_eq!(param("To"), Some(cfg.to.clone()));
        assert_eq!(param("AccountSid"), Some(cfg.account_sid.clone()));
        assert!(report.call_sid.starts_with("CA") && report.call_sid.len() == 34);

        let log = server.log.lock().unwrap().clone();
        let sid = report.stream_sid.clone().unwrap();
        assert!(sid.starts_with("MZ") && sid.len() == 34);
        assert_eq!(
            log[0],
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        );
        assert_eq!(
            log[1],
            json!({
                "event": "start",
                "sequenceNumber": "1",
                "start": {
                    "accountSid": cfg.account_sid,
                    "streamSid": sid,
                    "callSid": report.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": {"session": "abc&1"},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
                "streamSid": sid,
            })
        );
        // One sequence across every message after `connected`.
        for (i, message) in log[1..].iter().enumerate() {
            assert_eq!(message["sequenceNumber"], (i + 1).to_string(), "{message}");
            assert_eq!(message["streamSid"], sid.as_str());
        }
        let frames: Vec<&Value> = log.iter().filter(|m| m["event"] == "media").collect();
        for (i, frame) in frames.iter().enumerate() {
            assert_eq!(frame["media"]["track"], "inbound");
            assert_eq!(frame["media"]["chunk"], (i + 1).to_string());
            assert_eq!(frame["media"]["timestamp"], (i * 20).to_string());
            assert_eq!(payload(frame).len(), 160);
        }
        // The line carries the speech, then silence.
        let line: Vec<u8> = frames.iter().flat_map(|m| payload(m)).collect();
        assert!(line.len() >= 3200 + 4800, "{}", line.len());
        let speech: Vec<u8> = cfg.audio.iter().map(|&s| mulaw_encode(s)).collect();
        assert_eq!(line[..3200], speech[..]);
        assert!(line[3200..].iter().all(|&b| b == 0xFF));
        let keys: Vec<&Value> = log.iter().filter(|m| m["event"] == "dtmf").collect();
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys[0]["dtmf"],
            json!({"track": "inbound_track", "digit": "7"})
        );
        let marks = mark_names(&log);
        assert_eq!(marks, ["one", "two"]);
        let stop = log.last().unwrap();
        assert_eq!(stop["event"], "stop");
        assert_eq!(
            stop["stop"],
            json!({"accountSid": cfg.account_sid, "callSid": report.call_sid})
        );
    }

    #[tokio::test]
    async fn clear_drops_the_unplayed_audio_and_sends_pending_marks_back() {
        let (base, server) = start_server(Scenario::Clear, STREAM_TWIML).await;
        let mut cfg = CallConfig::new(&base, PUBLIC, TOKEN);
        cfg.audio = tone(1600);
        cfg.trailing_silence = ms(600);
        let report = place_call(cfg).await.unwrap();

        assert_eq!(report.ended, CallEnd::Finished);
        assert!(
            report.protocol_errors.is_empty(),
            "{:?}",
            report.protocol_errors
        );
        assert_eq!(report.clears, 1);
        let echoes: Vec<(&str, bool)> = report
            .marks_sent_back
            .iter()
            .map(|m| (m.name.as_str(), m.cleared))
            .collect();
        assert_eq!(echoes, [("long", true), ("after-clear", false)]);
        // The 2 s reply started at >= 100 ms: played out, its mark would be due at >= 2.1 s.
        assert!(
            report.marks_sent_back[0].at < ms(2100),
            "{:?}",
            report.marks_sent_back
        );
        // What was heard is the beginning of the reply, cut short.
        assert!(report.heard.len() < 16_000, "{}", report.heard.len());
        assert_eq!(
            report.heard[..],
            through_mulaw(&tone(16_000))[..report.heard.len()]
        );
        let log = server.log.lock().unwrap().clone();
        let marks = mark_names(&log);
        assert_eq!(marks, ["long", "after-clear"]);
        assert_eq!(log.last().unwrap()["event"], "stop");
    }

    #[tokio::test]
    async fn twiml_without_a_stream_refuses_the_call() {
        let twiml = r#"<?xml version="1.0" encoding="UTF-8"?><Response><Say voice="alice">Sorry, we are closed.</Say><Hangup/></Response>"#;
        let (base, server) = start_server(Scenario::Silent, twiml).await;
        let report = place_call(CallConfig::new(&base, PUBLIC, TOKEN))
            .await
            .unwrap();
        assert_eq!(report.refused.as_deref(), Some("Sorry, we are closed."));
        assert_eq!(report.ended, CallEnd::Refused);
        assert_eq!(report.stream_sid, None);
        assert_eq!(*server.stream_signed.lock().unwrap(), None);
    }

    #[tokio::test]
    async fn a_wrong_auth_token_is_refused_by_the_server() {
        let (base, server) = start_server(Scenario::Silent, STREAM_TWIML).await;
        let err = place_call(CallConfig::new(&base, PUBLIC, "not-the-token"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CallError::WebhookStatus { status: 403, .. }),
            "{err}"
        );
        assert_eq!(*server.webhook_signed.lock().unwrap(), Some(false));
    }

    #[tokio::test]
    async fn protocol_errors_are_reported_and_a_server_close_ends_the_call() {
        let (base, _server) = start_server(Scenario::Garbage, STREAM_TWIML).await;
        let mut cfg = CallConfig::new(&base, PUBLIC, TOKEN);
        cfg.audio = tone(8000);
        let report = place_call(cfg).await.unwrap();
        assert!(report.server_closed);
        assert_eq!(report.ended, CallEnd::ServerClosed);
        let errors = &report.protocol_errors;
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("nope"), "{errors:?}");
        assert!(errors[1].contains("streamSid"), "{errors:?}");
        assert!(errors[2].contains("base64"), "{errors:?}");
        assert!(errors[3].contains("binary"), "{errors:?}");
        assert_eq!(report.media_messages, 1);
        assert!(report.heard.is_empty());
    }

    #[tokio::test]
    async fn hangup_after_ends_the_call_with_stop() {
        let (base, server) = start_server(Scenario::Silent, STREAM_TWIML).await;
        let mut cfg = CallConfig::new(&base, PUBLIC, TOKEN);
        cfg.audio = tone(8000);
        cfg.hangup_after = Some(ms(300));
        let report = place_call(cfg).await.unwrap();
        assert_eq!(report.ended, CallEnd::HungUp);
        assert_eq!(report.first_audio_after_speech_end, None);
        let log = server.log.lock().unwrap().clone();
        let frames = log.iter().filter(|m| m["event"] == "media").count();
        assert!((1..=16).contains(&frames), "{frames}");
        assert_eq!(log.last().unwrap()["event"], "stop");
    }

    #[tokio::test]
    async fn bad_configuration_is_refused_before_calling() {
        let mut cfg = CallConfig::new("http://127.0.0.1:1", PUBLIC, TOKEN);
        cfg.frame = Duration::from_micros(100);
        assert!(matches!(
            place_call(cfg.clone()).await,
            Err(CallError::Config(_))
        ));
        cfg.frame = ms(20);
        cfg.dtmf = vec![(ms(0), 'x')];
        assert!(matches!(place_call(cfg).await, Err(CallError::Config(_))));
    }
}
