//! The JSON text messages of a Twilio Media Stream WebSocket.
//!
//! Twilio sends, in order: `connected` once, `start` once (the stream's and call's ids, the
//! media format, and the `<Parameter>`s of the TwiML as `customParameters`), then `media`
//! (base64 μ-law, 8000 Hz, mono), `dtmf` (a key the caller pressed) and `mark`
//! (audio we sent up to a mark of ours has played, or was dropped by `clear`), and finally
//! `stop`. [`parse`] reads them into [`Inbound`].
//!
//! On a bidirectional stream we send `media` (audio to play after what Twilio already holds),
//! `mark` (tell us when playback reaches this point) and `clear` (drop everything not yet
//! played); [`media`], [`mark`] and [`clear`] render them.
//!
//! Twilio writes `sequenceNumber`, `chunk` and `timestamp` as JSON strings of digits (`"1"`);
//! they are read as numbers (a JSON number is accepted too). Unknown fields are ignored and an
//! unknown `event` reads as [`Inbound::Other`], so additions on Twilio's side do not break a
//! call.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// The largest message [`parse`] reads, in bytes. A `media` message of 20 ms is a few hundred
/// bytes, and a `start` message a few hundred plus the custom parameters.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;

/// Why a message from Twilio could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The message is longer than [`MAX_MESSAGE_LEN`]; it was not parsed.
    #[error("the message is {len} bytes long, over the limit of {max}")]
    TooLong {
        /// The message's length in bytes.
        len: usize,
        /// The limit, [`MAX_MESSAGE_LEN`].
        max: usize,
    },
    /// The message is not JSON of the shape Twilio documents.
    #[error("not a Twilio Media Streams message: {0}")]
    Invalid(#[from] serde_json::Error),
    /// A `media` message's payload is not base64.
    #[error("the media payload is not base64: {0}")]
    Payload(#[from] base64::DecodeError),
}

/// A message from Twilio, by its `event`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Inbound {
    /// `connected`: the first message.
    Connected(Connected),
    /// `start`: the stream's metadata, once, right after `connected`.
    Start(Start),
    /// `media`: a chunk of audio.
    Media(Media),
    /// `dtmf`: the caller pressed a key (bidirectional streams only).
    Dtmf(Dtmf),
    /// `mark`: playback reached a mark we sent, or `clear` dropped it (bidirectional streams
    /// only).
    Mark(Mark),
    /// `stop`: the stream stopped or the call ended.
    Stop(Stop),
    /// An event this module does not know. Ignore it.
    #[serde(other)]
    Other,
}

/// The `connected` message: the protocol to expect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Connected {
    /// The protocol for the connection's lifetime: `Call`.
    pub protocol: String,
    /// The protocol's semantic version, e.g. `1.0.0`.
    pub version: String,
}

/// The `start` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    /// The message's place in the stream, from 1.
    #[serde(deserialize_with = "number")]
    pub sequence_number: u64,
    /// The stream's metadata.
    pub start: StartDetails,
    /// The stream's id (`MZ…`).
    pub stream_sid: String,
}

/// The `start` object of the `start` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartDetails {
    /// The stream's id (`MZ…`).
    pub stream_sid: String,
    /// The account that created the stream (`AC…`).
    pub account_sid: String,
    /// The call that started the stream (`CA…`).
    pub call_sid: String,
    /// The media flows to expect: `inbound`, `outbound`.
    #[serde(default)]
    pub tracks: Vec<String>,
    /// The `<Parameter>` name/value pairs of the `<Stream>` TwiML.
    #[serde(default)]
    pub custom_parameters: HashMap<String, String>,
    /// The format of the `media` payloads.
    pub media_format: MediaFormat,
}

/// The format of a stream's `media` payloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MediaFormat {
    /// Always `audio/x-mulaw`, per Twilio's docs.
    pub encoding: String,
    /// Samples a second: always 8000, per Twilio's docs.
    pub sample_rate: u32,
    /// Always 1, per Twilio's docs.
    pub channels: u32,
}

impl MediaFormat {
    /// The encoding Twilio documents, the one [`super::mulaw`] converts.
    pub const MULAW: &'static str = "audio/x-mulaw";

    /// Whether this is 8000 Hz mono μ-law, the only format Twilio documents and the only one
    /// this transport handles.
    pub fn is_mulaw_8k_mono(&self) -> bool {
        self.encoding == Self::MULAW && self.sample_rate == 8000 && self.channels == 1
    }
}

/// The `media` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Media {
    /// The message's place in the stream.
    #[serde(deserialize_with = "number")]
    pub sequence_number: u64,
    /// The audio and where it belongs.
    pub media: MediaDetails,
    /// The stream's id.
    pub stream_sid: String,
}

/// The `media` object of the `media` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MediaDetails {
    /// `inbound` (the caller) or `outbound` (what the call plays).
    pub track: String,
    /// The chunk's number in its track, from 1.
    #[serde(deserialize_with = "number")]
    pub chunk: u64,
    /// Presentation time in milliseconds from the start of the stream.
    #[serde(deserialize_with = "number")]
    pub timestamp: u64,
    /// The audio, base64 μ-law; see [`MediaDetails::decode_payload`].
    pub payload: String,
}

impl MediaDetails {
    /// Decodes the payload and appends the μ-law bytes to `out`. On error `out` is left as it
    /// was.
    pub fn decode_payload(&self, out: &mut Vec<u8>) -> Result<(), ParseError> {
        let len = out.len();
        STANDARD
            .decode_vec(self.payload.as_bytes(), out)
            .map_err(|e| {
                out.truncate(len);
                ParseError::Payload(e)
            })
    }
}

/// The `dtmf` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dtmf {
    /// The stream's id.
    pub stream_sid: String,
    /// The message's place in the stream.
    #[serde(deserialize_with = "number")]
    pub sequence_number: u64,
    /// The key.
    pub dtmf: DtmfDetails,
}

/// The `dtmf` object of the `dtmf` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DtmfDetails {
    /// The track the key was pressed on: always `inbound_track`, per Twilio's docs.
    pub track: String,
    /// The key: `0`–`9`, `*` or `#`.
    pub digit: String,
}

/// The `mark` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mark {
    /// The stream's id.
    pub stream_sid: String,
    /// The message's place in the stream.
    #[serde(deserialize_with = "number")]
    pub sequence_number: u64,
    /// Which mark.
    pub mark: MarkDetails,
}

/// The `mark` object of a `mark` message, either way.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MarkDetails {
    /// The name we gave the mark when we sent it.
    pub name: String,
}

/// The `stop` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stop {
    /// The stream's id.
    pub stream_sid: String,
    /// The message's place in the stream.
    #[serde(deserialize_with = "number")]
    pub sequence_number: u64,
    /// Which call.
    pub stop: StopDetails,
}

/// The `stop` object of the `stop` message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StopDetails {
    /// The account that created the stream.
    pub account_sid: String,
    /// The call that started the stream.
    pub call_sid: String,
}

/// Reads one text message from Twilio. Messages over [`MAX_MESSAGE_LEN`] bytes are refused
/// before parsing.
pub fn parse(text: &str) -> Result<Inbound, ParseError> {
    if text.len() > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLong {
            len: text.len(),
            max: MAX_MESSAGE_LEN,
        });
    }
    Ok(serde_json::from_str(text)?)
}

/// The `media` message that has Twilio play `mulaw` (8000 Hz mono μ-law, no file header) on
/// the stream `stream_sid`, after the audio it already holds.
pub fn media(stream_sid: &str, mulaw: &[u8]) -> String {
    let mut json = String::with_capacity(64 + stream_sid.len() + mulaw.len().div_ceil(3) * 4);
    json.push_str(r#"{"event":"media","streamSid":"#);
    push_json_string(&mut json, stream_sid);
    json.push_str(r#","media":{"payload":""#);
    STANDARD.encode_string(mulaw, &mut json);
    json.push_str(r#""}}"#);
    json
}

/// The `mark` message named `name` on the stream `stream_sid`: Twilio sends it back once the
/// audio sent before it has played, or when `clear` drops it.
pub fn mark(stream_sid: &str, name: &str) -> String {
    let mut json = String::with_capacity(64 + stream_sid.len() + name.len());
    json.push_str(r#"{"event":"mark","streamSid":"#);
    push_json_string(&mut json, stream_sid);
    json.push_str(r#","mark":{"name":"#);
    push_json_string(&mut json, name);
    json.push_str("}}");
    json
}

/// The `clear` message: Twilio drops the audio of the stream `stream_sid` it has not played
/// yet and sends back the marks that were pending.
pub fn clear(stream_sid: &str) -> String {
    let mut json = String::with_capacity(40 + stream_sid.len());
    json.push_str(r#"{"event":"clear","streamSid":"#);
    push_json_string(&mut json, stream_sid);
    json.push('}');
    json
}

/// Appends `text` to `out` as a JSON string, quotes included.
fn push_json_string(out: &mut String, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str(r#"\""#),
            '\\' => out.push_str(r"\\"),
            '\n' => out.push_str(r"\n"),
            '\r' => out.push_str(r"\r"),
            '\t' => out.push_str(r"\t"),
            c if c < ' ' => {
                let code = u32::from(c) as usize;
                out.push_str(r"\u00");
                out.push(char::from(HEX[code >> 4]));
                out.push(char::from(HEX[code & 0xF]));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Reads a count that Twilio writes as a JSON string of digits (`"1"`); a JSON number is
/// accepted too.
fn number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    struct Number;

    impl Visitor<'_> for Number {
        type Value = u64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative integer as a string of digits")
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
            let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let n = if digits { s.parse().ok() } else { None };
            n.ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
        }
    }

    deserializer.deserialize_any(Number)
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const STREAM: &str = "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX";

    fn parsed(text: &str) -> Inbound {
        parse(text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    #[test]
    fn the_documented_connected_message_parses() {
        let text = r#"{"event": "connected", "protocol": "Call", "version": "1.0.0"}"#;
        assert_eq!(
            parsed(text),
            Inbound::Connected(Connected {
                protocol: "Call".into(),
                version: "1.0.0".into(),
            })
        );
    }

    #[test]
    fn the_documented_start_message_parses() {
        let text = r#"{
          "event": "start",
          "sequenceNumber": "1",
          "start": {
            "accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "callSid": "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "tracks": ["inbound"],
            "mediaFormat": {
              "encoding": "audio/x-mulaw",
              "sampleRate": 8000,
              "channels": 1
            },
            "customParameters": {
              "FirstName": "Jane",
              "LastName": "Doe",
              "RemoteParty": "Bob"
            }
          },
          "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
        }"#;
        let Inbound::Start(start) = parsed(text) else {
            panic!("not a start message");
        };
        assert_eq!(start.sequence_number, 1);
        assert_eq!(start.stream_sid, STREAM);
        let details = &start.start;
        assert_eq!(details.stream_sid, STREAM);
        assert_eq!(details.account_sid, "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX");
        assert_eq!(details.call_sid, "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX");
        assert_eq!(details.tracks, ["inbound"]);
        assert!(details.media_format.is_mulaw_8k_mono());
        assert_eq!(details.custom_parameters.len(), 3);
        assert_eq!(details.custom_parameters["FirstName"], "Jane");
        assert_eq!(details.custom_parameters["LastName"], "Doe");
        assert_eq!(details.custom_parameters["RemoteParty"], "Bob");
    }

    #[test]
    fn the_documented_media_messages_parse() {
        let outbound = r#"{
          "event": "media",
          "sequenceNumber": "3",
          "media": {
            "track": "outbound",
            "chunk": "1",
            "timestamp": "5",
            "payload": "no+JhoaJjpz..."
          },
          "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
        }"#;
        assert_eq!(
            parsed(outbound),
            Inbound::Media(Media {
                sequence_number: 3,
                media: MediaDetails {
                    track: "outbound".into(),
                    chunk: 1,
                    timestamp: 5,
                    payload: "no+JhoaJjpz...".into(),
                },
                stream_sid: STREAM.into(),
            })
        );
        let inbound = r#"{
          "event": "media",
          "sequenceNumber": "4",
          "media": {
            "track": "inbound",
            "chunk": "2",
            "timestamp": "5",
            "payload": "no+JhoaJjpzS..."
          },
          "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
        }"#;
        let Inbound::Media(media) = parsed(inbound) else {
            panic!("not a media message");
        };
        assert_eq!((media.sequence_number, media.media.chunk), (4, 2));
        assert_eq!(media.media.track, "inbound");
    }

    #[test]
    fn the_documented_dtmf_mark_and_stop_messages_parse() {
        let dtmf = r#"{
          "event": "dtmf",
          "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
          "sequenceNumber": "5",
          "dtmf": {
            "track": "inbound_track",
            "digit": "1"
          }
        }"#;
        assert_eq!(
            parsed(dtmf),
            Inbound::Dtmf(Dtmf {
                stream_sid: STREAM.into(),
                sequence_number: 5,
                dtmf: DtmfDetails {
                    track: "inbound_track".into(),
                    digit: "1".into(),
                },
            })
        );
        let mark = r#"{
          "event": "mark",
          "sequenceNumber": "4",
          "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
          "mark": {
            "name": "my label"
          }
        }"#;
        assert_eq!(
            parsed(mark),
            Inbound::Mark(Mark {
                stream_sid: STREAM.into(),
                sequence_number: 4,
                mark: MarkDetails {
                    name: "my label".into(),
                },
            })
        );
        let stop = r#"{
          "event": "stop",
          "sequenceNumber": "5",
          "stop": {
            "accountSid": "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX",
            "callSid": "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
          },
          "streamSid": "MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"
        }"#;
        assert_eq!(
            parsed(stop),
            Inbound::Stop(Stop {
                stream_sid: STREAM.into(),
                sequence_number: 5,
                stop: StopDetails {
                    account_sid: "ACXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX".into(),
                    call_sid: "CAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX".into(),
                },
            })
        );
    }

    #[test]
    fn unknown_fields_and_events_are_tolerated() {
        let text = r#"{"event":"mark","sequenceNumber":"9","streamSid":"MZ1",
            "mark":{"name":"m","extra":[1,2]},"newField":{"a":null}}"#;
        let Inbound::Mark(mark) = parsed(text) else {
            panic!("not a mark message");
        };
        assert_eq!(mark.mark.name, "m");
        assert_eq!(
            parsed(r#"{"event":"transcription","sequenceNumber":"7","anything":{}}"#),
            Inbound::Other
        );
    }

    #[test]
    fn a_start_without_parameters_or_tracks_parses() {
        let text = r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ1",
            "start":{"streamSid":"MZ1","accountSid":"AC1","callSid":"CA1",
            "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;
        let Inbound::Start(start) = parsed(text) else {
            panic!("not a start message");
        };
        assert!(start.start.custom_parameters.is_empty());
        assert!(start.start.tracks.is_empty());
    }

    #[test]
    fn another_media_format_is_recognised() {
        let format = |encoding: &str, sample_rate, channels| MediaFormat {
            encoding: encoding.into(),
            sample_rate,
            channels,
        };
        assert!(format("audio/x-mulaw", 8000, 1).is_mulaw_8k_mono());
        assert!(!format("audio/x-alaw", 8000, 1).is_mulaw_8k_mono());
        assert!(!format("audio/x-mulaw", 16000, 1).is_mulaw_8k_mono());
        assert!(!format("audio/x-mulaw", 8000, 2).is_mulaw_8k_mono());
    }

    #[test]
    fn counts_may_be_numbers_but_not_other_strings() {
        let text = |seq: &str| {
            format!(
                r#"{{"event":"mark","sequenceNumber":{seq},"streamSid":"MZ1","mark":{{"name":"m"}}}}"#
            )
        };
        let Inbound::Mark(mark) = parsed(&text("12")) else {
            panic!("not a mark message");
        };
        assert_eq!(mark.sequence_number, 12);
        for bad in [
            r#""""#,
            r#""x""#,
            r#""-1""#,
            r#""+1""#,
            r#"" 1""#,
            r#""1.5""#,
            r#""18446744073709551616""#,
            "-1",
            "1.5",
            "null",
        ] {
            let e = parse(&text(bad)).expect_err(bad);
            assert!(matches!(e, ParseError::Invalid(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let missing_event = parse(r#"{"streamSid":"MZ1"}"#).expect_err("no event");
        assert!(
            missing_event.to_string().contains("event"),
            "{missing_event}"
        );
        let missing_field = parse(r#"{"event":"stop","sequenceNumber":"5","streamSid":"MZ1"}"#)
            .expect_err("no stop");
        assert!(
            missing_field.to_string().contains("stop"),
            "{missing_field}"
        );
        let bad_count = parse(r#"{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"five","dtmf":{"track":"inbound_track","digit":"1"}}"#)
            .expect_err("bad count");
        assert!(bad_count.to_string().contains("five"), "{bad_count}");
        for garbage in ["", "null", "[]", "\"media\"", "{", "{\"event\":7}"] {
            let e = parse(garbage).expect_err(garbage);
            assert!(matches!(e, ParseError::Invalid(_)), "{garbage}: {e}");
        }
    }

    #[test]
    fn messages_over_the_limit_are_refused_unread() {
        let padding = " ".repeat(MAX_MESSAGE_LEN);
        let over =
            format!("{{\"event\":\"connected\",\"protocol\":\"Call\",\"version\":\"1\"}}{padding}");
        let e = parse(&over).expect_err("too long");
        assert!(
            matches!(e, ParseError::TooLong { len, max } if len == over.len() && max == MAX_MESSAGE_LEN),
            "{e}"
        );
        assert!(e.to_string().contains(&over.len().to_string()), "{e}");
        // Right at the limit it is read.
        let body = r#"{"event":"connected","protocol":"Call","version":"1"}"#;
        let at_limit = format!("{body}{}", " ".repeat(MAX_MESSAGE_LEN - body.len()));
        assert_eq!(at_limit.len(), MAX_MESSAGE_LEN);
        assert!(matches!(parsed(&at_limit), Inbound::Connected(_)));
    }

    #[test]
    fn payloads_decode_and_append() {
        let details = |payload: &str| MediaDetails {
            track: "inbound".into(),
            chunk: 1,
            timestamp: 0,
            payload: payload.into(),
        };
        let mut out = vec![1u8];
        details("/38AgA==")
            .decode_payload(&mut out)
            .expect("base64");
        assert_eq!(out, [1, 0xFF, 0x7F, 0x00, 0x80]);
        let e = details("no+JhoaJjpz...")
            .decode_payload(&mut out)
            .expect_err("not base64");
        assert!(matches!(e, ParseError::Payload(_)), "{e}");
        assert_eq!(out, [1, 0xFF, 0x7F, 0x00, 0x80], "left as it was");
    }

    #[test]
    fn outbound_messages_have_the_documented_shape() {
        assert_eq!(
            media(STREAM, &[0xFF, 0x7F, 0x00, 0x80]),
            r#"{"event":"media","streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","media":{"payload":"/38AgA=="}}"#
        );
        assert_eq!(
            mark(STREAM, "my label"),
            r#"{"event":"mark","streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX","mark":{"name":"my label"}}"#
        );
        assert_eq!(
            clear(STREAM),
            r#"{"event":"clear","streamSid":"MZXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"}"#
        );
        // And as JSON values, against the docs' examples.
        let value = |text: String| serde_json::from_str::<Value>(&text).expect("JSON");
        assert_eq!(
            value(clear(STREAM)),
            json!({"event": "clear", "streamSid": STREAM})
        );
        assert_eq!(
            value(mark(STREAM, "my label")),
            json!({"event": "mark", "streamSid": STREAM, "mark": {"name": "my label"}})
        );
        let audio: Vec<u8> = (0..=255).collect();
        assert_eq!(
            value(media(STREAM, &audio)),
            json!({"event": "media", "streamSid": STREAM, "media": {"payload": STANDARD.encode(&audio)}})
        );
        assert_eq!(
            value(media(STREAM, &[])),
            json!({"event": "media", "streamSid": STREAM, "media": {"payload": ""}})
        );
    }

    #[test]
    fn hostile_strings_are_escaped() {
        let hostile = "q\"b\\s/\n\r\t\u{0}\u{1f}\u{7f}é\u{2028}🎧\",\"event\":\"clear";
        for (text, event) in [
            (mark(hostile, hostile), "mark"),
            (clear(hostile), "clear"),
            (media(hostile, b"x"), "media"),
        ] {
            let value: Value = serde_json::from_str(&text).expect("valid JSON");
            assert_eq!(value["event"], event, "{text}");
            assert_eq!(value["streamSid"], hostile, "{text}");
        }
        let value: Value = serde_json::from_str(&mark(hostile, hostile)).expect("valid JSON");
        assert_eq!(value["mark"]["name"], hostile);
    }
}
