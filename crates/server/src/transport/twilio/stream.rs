//! The media stream of a call: its handshake (`connected`, then `start` with the credential
//! the webhook issued), its messages in the session's terms, and the session's output on it.
//!
//! The caller's audio arrives as μ-law at 8 kHz and reaches the session as 16-bit PCM at 8 kHz
//! (the session resamples for the recogniser as for any client). Reply audio goes out as one
//! `media` message per piece the playout releases, each followed by a `mark` named after the
//! turn and the offset where the piece ends: Twilio echoes a mark once the audio before it
//! has played, which confirms playback to the session's playout. A cut reply is a `clear`;
//! the marks Twilio then echoes for the audio it threw away arrive after the cut, when the
//! playout no longer takes confirmations, so what counts as heard is what was played before
//! the `clear`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::time::Instant;
use tracing::{info, warn};

use atlas_core::audio::pcm_from_le_bytes;
use atlas_core::session::prestart::{Frame, Prestart, Verdict};
use atlas_core::session::{EndReason, Event};
use atlas_protocol::{AudioFormat, ErrorCode, close};

use super::{credential, mulaw, wire};
use crate::admission;
use crate::auth::Identity;
use crate::metrics;
use crate::state::AppState;
use crate::transport::writer::{self, OutboundTx, SendError};
use crate::transport::{Call, FromClient, Kind, Link, Reader, Start, Wire, Writer};

/// The custom parameter carrying the credential.
pub const CREDENTIAL: &str = "credential";
/// The custom parameter carrying the caller's number.
pub const CALLER: &str = "caller";
/// The format of a call's audio on the session's side.
pub const CALL_AUDIO: AudioFormat = AudioFormat {
    encoding: atlas_protocol::AudioEncoding::PcmS16le,
    sample_rate: 8_000,
};

/// Serves an upgraded media stream: the handshake, admission, then the session.
pub async fn accept(socket: WebSocket, state: AppState) {
    let (sink, mut stream) = socket.split();
    let (outbound, task) = writer::spawn(&state.sessions, sink);
    let refused = |why: &'static str| {
        metrics::refused(why);
        info!(reason = why, "call stream refused");
    };
    let (start, stream_sid, identity) = match handshake(&state, &mut stream).await {
        Ok(started) => started,
        Err(why) => {
            refused(why);
            // Nothing is played: with nothing after `</Connect>`, Twilio hangs up.
            outbound.close(close::POLICY, why).await;
            drop(outbound);
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
            return;
        }
    };
    let upgrade = match admission::admit(&state, &identity.user_id).await {
        Ok(upgrade) => upgrade,
        Err(refusal) => {
            // Admitted at the webhook moments ago, and taken since: the caller was not told.
            refused(refusal.label());
            outbound.close(close::POLICY, refusal.label()).await;
            return;
        }
    };
    let liveness = Liveness::default();
    let link = Link {
        reader: Reader::Twilio(StreamReader::new(stream, liveness.clone())),
        writer: Writer::new(outbound, Wire::Twilio(Renderer::new(stream_sid, liveness))),
        task,
    };
    link.join(state, start, identity, upgrade).await;
}

/// Reads up to the `start` message and checks it: the credential, for this call, and the
/// audio format.
async fn handshake(
    state: &AppState,
    stream: &mut SplitStream<WebSocket>,
) -> Result<(Start, String, Identity), &'static str> {
    let Some(secret) = super::webhook::credential_secret(state) else {
        return Err("calls are not enabled");
    };
    let mut rules = Prestart::new(Instant::now().into_std());
    let deadline = Instant::from_std(rules.deadline());
    loop {
        let message = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err("no start message"),
            Ok(Some(Ok(m))) => m,
            Ok(_) => return Err("stream closed before its start"),
        };
        let frame = match &message {
            Message::Text(text) => match wire::parse(text.as_str()) {
                Ok(wire::Inbound::Start(start)) => {
                    return started(&secret, start);
                }
                Ok(wire::Inbound::Connected(_)) => Frame::Control,
                Ok(wire::Inbound::Stop(_)) => Frame::End,
                Ok(_) => Frame::Other(ErrorCode::SessionNotStarted, "before start".into()),
                Err(e) => Frame::Other(ErrorCode::InvalidMessage, e.to_string()),
            },
            Message::Ping(_) | Message::Pong(_) => Frame::Control,
            Message::Close(_) => return Err("stream closed before its start"),
            Message::Binary(_) => Frame::Other(ErrorCode::InvalidMessage, "binary".into()),
        };
        match rules.frame(frame) {
            Verdict::Wait | Verdict::Answer(_) | Verdict::Started => {}
            Verdict::End(EndReason::ClientEnded) => return Err("call ended before its start"),
            Verdict::End(_) => return Err("no valid start message"),
        }
    }
}

fn started(secret: &[u8], start: wire::Start) -> Result<(Start, String, Identity), &'static str> {
    let details = start.start;
    let token = details
        .custom_parameters
        .get(CREDENTIAL)
        .ok_or("no credential")?;
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let user_id = credential::verify(secret, token, &details.call_sid, now).map_err(|e| {
        warn!(error = %e, "call stream with a bad credential");
        "bad credential"
    })?;
    if !details.media_format.is_mulaw_8k_mono() {
        return Err("unsupported media format");
    }
    let caller = details
        .custom_parameters
        .get(CALLER)
        .map(|c| c.chars().take(32).collect())
        .unwrap_or_default();
    let start = Start {
        kind: Kind::Twilio,
        input: CALL_AUDIO,
        output: CALL_AUDIO,
        voice: None,
        language: None,
        conversation_id: None,
        client: None,
        traceparent: None,
        call: Some(Call {
            call_sid: details.call_sid,
            caller,
        }),
    };
    let identity = Identity {
        user_id,
        // A call holds no access token: it lasts until it ends or the session's limits end it.
        expires_at: now + 10 * 365 * 86_400,
    };
    Ok((start, details.stream_sid, identity))
}

/// The session's heartbeat on a call: a ping is answered by Twilio's pong, or by the next
/// audio the call sends (a stream that keeps sending the caller's audio every 20 ms is alive,
/// whether or not its end answers WebSocket pings).
#[derive(Clone, Debug, Default)]
pub struct Liveness(Arc<AtomicBool>);

impl Liveness {
    /// A ping went out.
    fn pinged(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// What the session hears of `item`: a pong first when a ping is owed and `item` shows the
    /// stream alive (then `item` itself next).
    fn answer(&self, item: FromClient) -> (FromClient, Option<FromClient>) {
        match item {
            FromClient::Pong => {
                self.0.store(false, Ordering::Relaxed);
                (FromClient::Pong, None)
            }
            FromClient::Audio(_) if self.0.swap(false, Ordering::Relaxed) => {
                (FromClient::Pong, Some(item))
            }
            item => (item, None),
        }
    }
}

/// A call's messages, in the session's terms.
pub struct StreamReader {
    stream: SplitStream<WebSocket>,
    liveness: Liveness,
    /// What to hand over next, before reading on.
    next: Option<FromClient>,
    mulaw: Vec<u8>,
    pcm: Vec<i16>,
}

impl StreamReader {
    fn new(stream: SplitStream<WebSocket>, liveness: Liveness) -> Self {
        StreamReader {
            stream,
            liveness,
            next: None,
            mulaw: Vec::new(),
            pcm: Vec::new(),
        }
    }

    /// The next thing the call sent.
    pub async fn next(&mut self) -> FromClient {
        if let Some(item) = self.next.take() {
            return item;
        }
        let item = self.read().await;
        let (now, then) = self.liveness.answer(item);
        self.next = then;
        now
    }

    async fn read(&mut self) -> FromClient {
        let message = match self.stream.next().await {
            Some(Ok(m)) => m,
            _ => return FromClient::Closed("call stream closed"),
        };
        let text = match message {
            Message::Text(text) => text,
            Message::Close(_) => return FromClient::Closed("call stream closed"),
            Message::Ping(_) => return FromClient::Nothing,
            Message::Pong(_) => return FromClient::Pong,
            Message::Binary(_) => {
                return FromClient::Invalid(
                    ErrorCode::InvalidMessage,
                    "binary frames are not part of a media stream".into(),
                );
            }
        };
        match wire::parse(text.as_str()) {
            Ok(wire::Inbound::Media(media)) => self.audio(&media.media),
            Ok(wire::Inbound::Dtmf(dtmf)) => match dtmf.dtmf.digit.chars().next() {
                Some(digit) if dtmf.dtmf.digit.len() == 1 => FromClient::Digit(digit),
                _ => FromClient::Invalid(ErrorCode::InvalidMessage, "bad dtmf digit".into()),
            },
            Ok(wire::Inbound::Mark(mark)) => match parse_mark(&mark.mark.name) {
                Some((turn_id, offset)) => FromClient::Played { turn_id, offset },
                None => FromClient::Nothing,
            },
            // The caller hung up (or the call was redirected): the session ends.
            Ok(wire::Inbound::Stop(_)) => FromClient::End,
            Ok(wire::Inbound::Connected(_) | wire::Inbound::Start(_) | wire::Inbound::Other) => {
                FromClient::Nothing
            }
            Err(e) => FromClient::Invalid(ErrorCode::InvalidMessage, e.to_string()),
        }
    }

    fn audio(&mut self, media: &wire::MediaDetails) -> FromClient {
        if media.track != "inbound" {
            return FromClient::Nothing;
        }
        self.mulaw.clear();
        if let Err(e) = media.decode_payload(&mut self.mulaw) {
            return FromClient::Invalid(ErrorCode::AudioChunkInvalid, e.to_string());
        }
        self.pcm.clear();
        mulaw::decode(&self.mulaw, &mut self.pcm);
        let mut bytes = Vec::with_capacity(self.pcm.len() * 2);
        for s in &self.pcm {
            bytes.extend_from_slice(&s.to_le_bytes());
        }
        FromClient::Audio(Bytes::from(bytes))
    }
}

/// A mark's name: the turn and the offset (bytes of 8 kHz PCM) where the audio before it ends.
fn mark_name(turn_id: u64, offset: u64) -> String {
    format!("{turn_id}:{offset}")
}

fn parse_mark(name: &str) -> Option<(u64, u64)> {
    let (turn, offset) = name.split_once(':')?;
    Some((turn.parse().ok()?, offset.parse().ok()?))
}

/// The session's output on a call.
#[derive(Debug)]
pub struct Renderer {
    stream_sid: String,
    liveness: Liveness,
    /// The turn whose audio is playing, and the bytes of it sent so far.
    turn_id: u64,
    offset: u64,
    samples: Vec<i16>,
    mulaw: Vec<u8>,
}

impl Renderer {
    fn new(stream_sid: String, liveness: Liveness) -> Self {
        Renderer {
            stream_sid,
            liveness,
            turn_id: 0,
            offset: 0,
            samples: Vec::new(),
            mulaw: Vec::new(),
        }
    }

    /// A heartbeat ping is going out.
    pub fn pinged(&self) {
        self.liveness.pinged();
    }

    /// What a call makes of `event`: a cut reply clears what Twilio has buffered; the rest
    /// has no sound.
    pub fn event(&mut self, event: &Event) -> Option<Message> {
        match event {
            Event::Interrupted { .. } => Some(Message::Text(wire::clear(&self.stream_sid).into())),
            _ => None,
        }
    }

    /// Sends a piece of reply audio of `turn_id` (16-bit PCM at 8 kHz) and a mark after it.
    pub fn audio(&mut self, tx: &OutboundTx, turn_id: u64, pcm: &[u8]) -> Result<(), SendError> {
        if turn_id != self.turn_id {
            self.turn_id = turn_id;
            self.offset = 0;
        }
        self.samples.clear();
        pcm_from_le_bytes(pcm, &mut self.samples);
        self.mulaw.clear();
        mulaw::encode(&self.samples, &mut self.mulaw);
        self.offset += pcm.len() as u64;
        tx.frame(Message::Text(
            wire::media(&self.stream_sid, &self.mulaw).into(),
        ))?;
        let name = mark_name(turn_id, self.offset);
        tx.frame(Message::Text(wire::mark(&self.stream_sid, &name).into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ping_is_answered_by_a_pong_or_by_the_next_audio() {
        let live = Liveness::default();
        let audio = || FromClient::Audio(Bytes::from_static(&[0; 320]));
        // No ping owed: audio is audio.
        assert!(matches!(live.answer(audio()), (FromClient::Audio(_), None)));
        live.pinged();
        // Owed: the next audio answers it, then goes to the session.
        assert!(matches!(
            live.answer(audio()),
            (FromClient::Pong, Some(FromClient::Audio(_)))
        ));
        assert!(matches!(live.answer(audio()), (FromClient::Audio(_), None)));
        // A real pong settles it too; other messages do not.
        live.pinged();
        assert!(matches!(
            live.answer(FromClient::Digit('1')),
            (FromClient::Digit('1'), None)
        ));
        assert!(matches!(
            live.answer(FromClient::Pong),
            (FromClient::Pong, None)
        ));
        assert!(matches!(live.answer(audio()), (FromClient::Audio(_), None)));
    }

    #[test]
    fn mark_names_carry_the_turn_and_the_offset() {
        assert_eq!(parse_mark(&mark_name(3, 16_000)), Some((3, 16_000)));
        assert_eq!(parse_mark("3"), None);
        assert_eq!(parse_mark("x:1"), None);
        assert_eq!(parse_mark("1:-5"), None);
    }

    #[tokio::test]
    async fn reply_audio_goes_out_as_mulaw_media_then_a_mark() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let out = OutboundTx::new(tx);
        let mut r = Renderer::new("MZ1".into(), Liveness::default());
        // 20 ms of silence at 8 kHz.
        r.audio(&out, 2, &[0u8; 320]).unwrap();
        r.audio(&out, 2, &[0u8; 320]).unwrap();
        let mut texts = Vec::new();
        while let Ok(writer::Outbound::Frame(Message::Text(t))) = rx.try_recv() {
            texts.push(serde_json::from_str::<serde_json::Value>(t.as_str()).unwrap());
        }
        assert_eq!(texts.len(), 4);
        assert_eq!(texts[0]["event"], "media");
        assert_eq!(texts[0]["streamSid"], "MZ1");
        // 160 μ-law bytes of silence (0xFF), base64.
        let payload = texts[0]["media"]["payload"].as_str().unwrap();
        assert_eq!(payload.len(), 216);
        assert_eq!(texts[1]["mark"]["name"], "2:320");
        assert_eq!(texts[3]["mark"]["name"], "2:640");
        assert_eq!(
            r.event(&Event::Interrupted { turn_id: 2 })
                .map(|m| m.into_text().unwrap().to_string()),
            Some(wire::clear("MZ1"))
        );
        assert_eq!(r.event(&Event::Pong { id: None }), None);
    }
}
