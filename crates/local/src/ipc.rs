//! The framing and messages between the server and its engine workers.
//!
//! A frame is a little-endian `u32` length and a JSON header, then a `u32` length and a raw
//! payload (audio for transcription, empty otherwise). Both lengths are bounded.

use std::io::{self, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Largest JSON header accepted.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest payload accepted (a bit over 60 s of 16 kHz 16-bit audio).
pub const MAX_PAYLOAD: usize = 2 << 20;

/// One chat message for the language model worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// Text.
    pub text: String,
}

fn no_penalty() -> f32 {
    1.0
}

/// Server to worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Transcribe the payload: 16-bit little-endian mono PCM at 16 kHz.
    Transcribe {
        /// Request id.
        id: u64,
        /// Language hint (`en`), the model's default when `None`.
        language: Option<String>,
        /// An interim decode of an utterance still being spoken: cheaper settings, and it may
        /// be cancelled while it runs.
        #[serde(default)]
        partial: bool,
    },
    /// Generate a reply to a conversation, streaming text.
    Generate {
        /// Request id.
        id: u64,
        /// Conversation, system message first.
        messages: Vec<Message>,
        /// Hard output token cap (an unfinished sentence there is dropped).
        max_tokens: u32,
        /// Past this many tokens, stop at the next sentence end (0: no soft cap).
        #[serde(default)]
        soft_max_tokens: u32,
        /// Sampling temperature; 0 decodes greedily.
        temperature: f32,
        /// Repetition penalty (1: none).
        #[serde(default = "no_penalty")]
        repeat_penalty: f32,
    },
    /// Speak `text` (one or more sentences), streaming audio sentence by sentence.
    Synthesize {
        /// Request id.
        id: u64,
        /// Text to speak.
        text: String,
    },
    /// Score whether the speech in the payload (16-bit little-endian mono PCM at 16 kHz, the
    /// last 8 s count) is a finished turn.
    ScoreTurn {
        /// Request id.
        id: u64,
    },
    /// Stop request `id` (queued or running).
    Cancel {
        /// Request id.
        id: u64,
    },
}

/// Worker to server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// The model is loaded; requests can follow.
    Ready {
        /// Model description.
        model: String,
    },
    /// A transcription.
    Transcript {
        /// Request id.
        id: u64,
        /// Text, trimmed.
        text: String,
    },
    /// More generated text.
    Delta {
        /// Request id.
        id: u64,
        /// Text.
        text: String,
    },
    /// Generation finished.
    Done {
        /// Request id.
        id: u64,
        /// `stop` (end of reply), `length` (token cap) or `cancelled`.
        stop_reason: String,
        /// Prompt tokens.
        input_tokens: u64,
        /// Generated tokens.
        output_tokens: u64,
    },
    /// Synthesised speech: the frame's payload is 16-bit little-endian mono PCM at the
    /// voice's rate (one sentence per frame).
    Audio {
        /// Request id.
        id: u64,
        /// The request's last frame.
        last: bool,
        /// The PCM, carried as the frame's payload (not in the JSON header).
        #[serde(skip)]
        pcm: Vec<u8>,
    },
    /// The end-of-turn model's score.
    TurnScore {
        /// Request id.
        id: u64,
        /// Probability that the turn is complete (0–1).
        probability: f32,
    },
    /// The request failed.
    Failed {
        /// Request id.
        id: u64,
        /// What went wrong.
        message: String,
    },
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(
    out: &mut impl Write,
    header: &T,
    payload: &[u8],
) -> io::Result<()> {
    let header = serde_json::to_vec(header).map_err(io::Error::other)?;
    out.write_all(&frame_bytes(&header, payload))?;
    out.flush()
}

/// Encodes one frame into a buffer.
pub fn frame_bytes(header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 + header.len() + payload.len());
    buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
    buf.extend_from_slice(header);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(payload);
    buf
}

fn read_len(input: &mut impl Read, max: usize, what: &str) -> io::Result<Option<usize>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    checked_len(len, max, what).map(Some)
}

/// The length a frame part's 4-byte prefix gives, refused over `max`.
fn checked_len(prefix: [u8; 4], max: usize, what: &str) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} of {len} bytes is over the {max}-byte limit"),
        ));
    }
    Ok(len)
}

/// Reads one frame; `None` at a clean end of input.
pub fn read_frame<T: for<'de> Deserialize<'de>>(
    input: &mut impl Read,
) -> io::Result<Option<(T, Vec<u8>)>> {
    let Some(len) = read_len(input, MAX_HEADER, "header")? else {
        return Ok(None);
    };
    let mut header = vec![0u8; len];
    input.read_exact(&mut header)?;
    let header = serde_json::from_slice(&header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let len = read_len(input, MAX_PAYLOAD, "payload")?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload)?;
    Ok(Some((header, payload)))
}

/// Async counterpart of [`read_frame`] for the server side.
pub async fn read_frame_async<T: for<'de> Deserialize<'de>>(
    input: &mut (impl tokio::io::AsyncRead + Unpin),
) -> io::Result<Option<(T, Vec<u8>)>> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = checked_len(len, MAX_HEADER, "header")?;
    let mut header = vec![0u8; len];
    input.read_exact(&mut header).await?;
    let header = serde_json::from_slice(&header)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut len = [0u8; 4];
    input.read_exact(&mut len).await?;
    let len = checked_len(len, MAX_PAYLOAD, "payload")?;
    let mut payload = vec![0u8; len];
    input.read_exact(&mut payload).await?;
    Ok(Some((header, payload)))
}

/// Ids of cancelled requests, shared between a worker's reader thread and its engine.
pub type Cancelled = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u64>>>;

/// Worker side: reads requests from standard input on a thread of its own, so cancellations
/// are seen while a request runs. Returns the queue of requests (closed at end of input) and
/// the set of cancelled ids.
pub fn spawn_stdin_reader() -> (std::sync::mpsc::Receiver<(Request, Vec<u8>)>, Cancelled) {
    let (tx, rx) = std::sync::mpsc::channel();
    let cancelled: Cancelled = std::sync::Arc::default();
    let seen = cancelled.clone();
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        loop {
            match read_frame::<Request>(&mut stdin) {
                Ok(Some((Request::Cancel { id }, _))) => {
                    seen.lock().expect("cancel lock").insert(id);
                }
                Ok(Some(request)) => {
                    if tx.send(request).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    eprintln!("bad request frame: {e}");
                    return;
                }
            }
        }
    });
    (rx, cancelled)
}

/// Worker side: writes one reply to standard output (an [`Reply::Audio`]'s PCM as the
/// payload).
pub fn reply(reply: &Reply) -> io::Result<()> {
    let payload = match reply {
        Reply::Audio { pcm, .. } => pcm.as_slice(),
        _ => &[],
    };
    write_frame(&mut io::stdout().lock(), reply, payload)
}

/// Worker side: reads the command line's `--name value` options, handing each name to `set`
/// with a way to take its value (a missing value is the error `NAME needs a value`). `set`
/// returns `Ok(false)` for a name the worker does not take, which fails with `usage`.
pub fn parse_options<E: From<io::Error>>(
    usage: &str,
    mut set: impl FnMut(&str, &mut dyn FnMut() -> io::Result<String>) -> Result<bool, E>,
) -> Result<(), E> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| io::Error::other(format!("{arg} needs a value")))
        };
        if !set(&arg, &mut value)? {
            return Err(
                io::Error::other(format!("unknown argument {arg:?} (usage: {usage})")).into(),
            );
        }
    }
    Ok(())
}

/// Worker side: fails unless the `what` file at `path` (fetched by `atlas-voice models
/// fetch`) is there.
pub fn check_fetched(what: &str, path: &Path) -> io::Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} file {} does not exist (run `atlas-voice models fetch`)",
        path.display()
    )))
}

/// Server side: a reply with its payload put back where it belongs.
pub fn with_payload(mut reply: Reply, payload: Vec<u8>) -> Reply {
    if let Reply::Audio { pcm, .. } = &mut reply {
        *pcm = payload;
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_end_cleanly() {
        let mut buf = Vec::new();
        let req = Request::Transcribe {
            id: 7,
            language: Some("en".into()),
            partial: false,
        };
        write_frame(&mut buf, &req, &[1, 2, 3]).unwrap();
        let mut input = &buf[..];
        let (got, payload): (Request, Vec<u8>) = read_frame(&mut input).unwrap().unwrap();
        assert_eq!(got, req);
        assert_eq!(payload, vec![1, 2, 3]);
        assert!(read_frame::<Request>(&mut input).unwrap().is_none());
    }

    #[test]
    fn audio_replies_carry_their_pcm_as_the_payload() {
        let audio = Reply::Audio {
            id: 3,
            last: true,
            pcm: vec![1, 0, 255, 255],
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &audio, &[1, 0, 255, 255]).unwrap();
        let (got, payload): (Reply, Vec<u8>) = read_frame(&mut &buf[..]).unwrap().unwrap();
        assert_eq!(with_payload(got, payload), audio);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&((MAX_HEADER + 1) as u32).to_le_bytes());
        let err = read_frame::<Request>(&mut &buf[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);

        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Cancel { id: 1 }, b"abc").unwrap();
        buf.truncate(buf.len() - 1);
        let err = read_frame::<Request>(&mut &buf[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);

        let mut buf = Vec::new();
        write_frame(&mut buf, &serde_json::json!({"op": "explode"}), b"").unwrap();
        let err = read_frame::<Request>(&mut &buf[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
