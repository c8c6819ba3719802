//! `atlas-voice eval`: how good is a conversation with a running server?
//!
//! Plays a set of spoken prompts (`tests/eval/prompts.toml`) through a running server and
//! measures what a user would notice: how well the recogniser heard them (word error rate),
//! whether the answers to questions with one short answer were right, whether replies end on a
//! complete sentence, how often nothing came back, and the time from the end of speech to the
//! first reply audio.
//!
//! # How
//! - Every prompt is synthesised with each voice (espeak-ng run as a program, and the Piper
//!   neural voice in the synthesis worker), once per run, before any session starts (so the
//!   synthesis does not compete with the server for the CPU), and resampled to each rate.
//!   A `|` in a prompt's text becomes 400 ms of silence (or the prompt's `pause_ms`), cut into
//!   the sentence said in one go where the words before it end.
//! - Each prompt × voice × rate runs in a fresh session, so no history leaks between prompts:
//!   the audio is streamed at real-time pace in 20 ms chunks, followed by 2.5 s of silence,
//!   and the item ends at the `response.done` of the last turn (or at the timeout).
//! - `--text` sends each prompt as a typed turn (`input.text`) instead: a quick loop for
//!   working on the language model, without recognition.
//! - `--until-final` ends each item at its first final transcript, without waiting for the
//!   reply: a run that measures only turn-taking (with `tests/eval/turns.toml`, the labelled
//!   set of finished questions and sentences with a pause mid-thought).
//! - `--barge-in` says each spoken prompt again as soon as its reply is heard, and measures
//!   how long the reply takes to stop; the item's other figures are then of the reply to the
//!   prompt said again.
//!
//! # Metrics
//! - WER: word-level Levenshtein distance between the prompt's words and all final
//!   transcripts of the item, both [`normalize`]d, summed over a group and divided by the
//!   reference words.
//! - Correct: the reply's words contain one of the prompt's `expect` words ([`is_correct`]).
//! - Complete: the reply ends on `.`, `!` or `?` ([`ends_complete_sentence`]).
//! - Latency: the server's own end of speech → first reply audio (`latency_ms.to_first_audio`
//!   of `response.done`) and, measured here, the time from sending the chunk holding the last
//!   speech sample to the first reply audio frame. Percentiles are nearest-rank
//!   ([`percentile`]).
//! - Turn-taking: an item is *cut off* when its first final transcript arrives before the
//!   chunk holding its last speech sample was sent (the turn ended while the person had more
//!   to say: at a pause mid-thought, in the labelled set); the *end-of-turn delay* is the time
//!   from sending that chunk to the first final transcript, for items not cut off.
//! - Barge-in: from the moment the microphone captured the first sound of the prompt said
//!   again to the `response.interrupted` of the reply it cut.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use atlas_core::audio::{loud_span, quietest_near, with_silence_at};
use clap::{Args, ValueEnum};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use atlas_client::{ConnectOptions, Incoming, connect, speech_end, speech_start, stream_pcm, wav};
use atlas_core::resample::StreamResampler;
use atlas_local::piper::{self, PiperTts};
use atlas_local::worker::{Worker, WorkerConfig};
use atlas_protocol::{
    AudioFormat, ClientInfo, ClientMessage, LatencyBreakdown, ServerEvent, SessionStart,
};
use atlas_providers::tts::{TtsProvider, TtsRequest};

/// Where the prompt set lives in the repository.
const DEFAULT_PROMPTS: &str = "tests/eval/prompts.toml";
/// The prompt set as built in, for runs outside the repository.
const BUILTIN_PROMPTS: &str = include_str!("../../../tests/eval/prompts.toml");
/// Silence in place of each `|` in a prompt, unless it says otherwise (`pause_ms`).
const PAUSE: Duration = Duration::from_millis(400);
/// Silence streamed after each prompt, so the recogniser hears the end of the turn (longer
/// than the longest maximum silence of the `smart` turn policy one would measure).
const TRAILING_SILENCE: Duration = Duration::from_millis(2500);
/// Audio chunk length, as a browser microphone sends it.
const CHUNK_MS: u32 = 20;
/// Level above which a 10 ms frame counts as speech (as `loadtest` measures it).
const SPEECH_DBFS: f32 = -40.0;
/// Level below which a frame after words said alone counts as the voice's own padding (where
/// those words end, near which a pause is cut into the whole sentence).
const PADDING_DBFS: f32 = -50.0;
/// Rate of the reply audio asked for (the eval only measures when it arrives).
const OUTPUT_RATE: u32 = 16_000;
/// After the input has ended and the latest turn's reply is done, how long to wait for a
/// further turn before the item counts as finished.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the server may take to start a session.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Arguments of `eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// Voice endpoint of the running server.
    #[arg(long, default_value = "ws://127.0.0.1:8080/v1/voice")]
    url: String,
    /// Access token; without one, a development token is fetched from the server's
    /// `/dev/token` (a server in dev mode, as the offline default runs).
    #[arg(long, env = "ATLAS_TOKEN")]
    token: Option<String>,
    /// The prompt set (TOML); the built-in copy when the default path is absent.
    #[arg(long, default_value = DEFAULT_PROMPTS)]
    prompts: PathBuf,
    /// Voices that speak the prompts, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "espeak,piper"
    )]
    voices: Vec<Voice>,
    /// Input sample rates, comma-separated (8000, 16000, 24000 or 48000).
    #[arg(long, value_delimiter = ',', default_value = "16000,8000")]
    rates: Vec<u32>,
    /// Send each prompt as typed text (`input.text`) instead of audio: no recognition, no
    /// word error rate; for quick iteration on the language model.
    #[arg(long)]
    text: bool,
    /// Only the first N prompts (after --filter).
    #[arg(long)]
    limit: Option<usize>,
    /// Only prompts of this kind.
    #[arg(long, value_enum)]
    filter: Option<Kind>,
    /// Seconds to wait for the reply once the input has been sent.
    #[arg(long, default_value_t = 20)]
    timeout_s: u64,
    /// Write every item and the summary to this file as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Models directory (for the neural voice).
    #[arg(long, env = "ATLAS_MODELS_DIR", default_value = "models")]
    models_dir: PathBuf,
    /// Where the engine worker programs are (`atlas-voice-tts`); default: next to this
    /// program.
    #[arg(long)]
    engine_dir: Option<PathBuf>,
    /// Also write every synthesised clip here as WAV (`<voice>-<rate>-<id>.wav`).
    #[arg(long, value_name = "DIR")]
    save_clips: Option<PathBuf>,
    /// End each item at its first final transcript, without waiting for the reply (measures
    /// turn-taking only).
    #[arg(long)]
    until_final: bool,
    /// Say each spoken prompt again as soon as its reply is heard, and measure how long the
    /// reply takes to stop (the item's other figures are of the reply to the prompt said
    /// again).
    #[arg(long, conflicts_with_all = ["until_final", "text"])]
    barge_in: bool,
}

/// When an item ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listen {
    /// At the reply's end.
    Reply,
    /// At the first final transcript.
    UntilFinal,
    /// At the end of the reply to the prompt said again over the first reply.
    BargeIn,
}

/// A voice that speaks the prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Voice {
    /// espeak-ng (`en-us`, 165 words per minute), run as a program.
    Espeak,
    /// The Piper neural voice, in the synthesis worker.
    Piper,
}

impl Voice {
    fn name(self) -> &'static str {
        match self {
            Voice::Espeak => "espeak",
            Voice::Piper => "piper",
        }
    }
}

/// What a prompt is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A question with one short answer.
    Fact,
    /// Something the user asks for.
    Request,
    /// Small talk.
    Chat,
}

/// One prompt of the set.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompt {
    /// Unique name.
    pub id: String,
    /// What is spoken; `|` marks a pause.
    pub text: String,
    /// What the prompt is.
    pub kind: Kind,
    /// Acceptable answer words or numbers (any of them); empty when not checkable.
    #[serde(default)]
    pub expect: Vec<String>,
    /// Silence at each `|`, in ms (400 when absent).
    #[serde(default)]
    pub pause_ms: Option<u64>,
}

impl Prompt {
    /// The silence at each `|`.
    pub fn pause(&self) -> Duration {
        self.pause_ms.map_or(PAUSE, Duration::from_millis)
    }

    /// The words as spoken (and as the recogniser should write them): without the `|`.
    pub fn spoken(&self) -> String {
        self.text
            .split('|')
            .flat_map(str::split_whitespace)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether the reply can be checked against `expect`.
    pub fn checkable(&self) -> bool {
        !self.expect.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptFile {
    prompt: Vec<Prompt>,
}

/// Parses and checks a prompt set: unique ids, something to say, no blank answers.
pub fn parse_prompts(text: &str) -> anyhow::Result<Vec<Prompt>> {
    let file: PromptFile = toml::from_str(text)?;
    let mut ids = HashSet::new();
    for p in &file.prompt {
        anyhow::ensure!(!p.id.trim().is_empty(), "a prompt has an empty id");
        anyhow::ensure!(
            ids.insert(p.id.as_str()),
            "prompt id {:?} is repeated",
            p.id
        );
        anyhow::ensure!(
            p.text.split('|').all(|s| !s.trim().is_empty()),
            "prompt {:?}: every part of its text must have words",
            p.id
        );
        anyhow::ensure!(
            p.expect.iter().all(|e| !normalize(e).is_empty()),
            "prompt {:?} has a blank expected answer",
            p.id
        );
        anyhow::ensure!(
            match p.pause_ms {
                None => true,
                Some(ms) => (50..=5_000).contains(&ms) && p.text.contains('|'),
            },
            "prompt {:?}: pause_ms must be 50–5000 and the text must have a `|`",
            p.id
        );
    }
    Ok(file.prompt)
}

// ---------------------------------------------------------------------------------------------
// Scoring
// ---------------------------------------------------------------------------------------------

/// Number words up to twenty and the tens, with their values.
const NUMBER_WORDS: [(&str, u64); 28] = [
    ("zero", 0),
    ("one", 1),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
];

fn number_word(word: &str) -> Option<u64> {
    NUMBER_WORDS
        .iter()
        .find(|(w, _)| *w == word)
        .map(|&(_, v)| v)
}

/// Words for comparison: lowercase; apostrophes dropped (`what's` → `whats`); hyphens and
/// other punctuation split words; thousands separators dropped and decimal points kept
/// between digits; number words written as digits, a run of them as one number
/// (`twenty-one` → `21`, `one hundred twenty` → `120`, `hundred` → `100`), so that `four` and
/// `4` are the same word.
pub fn normalize(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut cleaned = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let between_digits = i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if c.is_alphanumeric() {
            cleaned.extend(c.to_lowercase());
        } else if matches!(c, '\'' | '’' | '‘') || (c == ',' && between_digits) {
            // Joined: contractions and possessives, 1,000.
        } else if c == '.' && between_digits {
            cleaned.push('.');
        } else {
            cleaned.push(' ');
        }
    }
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    let mut out = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let (value, used) = number_at(&words[i..]);
        match value {
            Some(v) => out.push(v.to_string()),
            None => out.push(words[i].to_owned()),
        }
        i += used;
    }
    out
}

/// The number spelled by the words at the start of `words` and how many words it took; or
/// `None` and 1 when the first word is not a number word.
fn number_at(words: &[&str]) -> (Option<u64>, usize) {
    let unit = |w: Option<&&str>| {
        w.and_then(|w| number_word(w))
            .filter(|v| (1..=9).contains(v))
    };
    let is_tens = |v: u64| v >= 20 && v.is_multiple_of(10);
    // Below one hundred: a word, or tens and a unit.
    let below_hundred = |at: usize| -> Option<(u64, usize)> {
        let v = words.get(at).and_then(|w| number_word(w))?;
        match unit(words.get(at + 1)) {
            Some(u) if is_tens(v) => Some((v + u, 2)),
            _ => Some((v, 1)),
        }
    };
    let (mut value, mut used) = match below_hundred(0) {
        Some(found) => found,
        None if words.first() == Some(&"hundred") => (1, 0),
        None => return (None, 1),
    };
    if words.get(used) == Some(&"hundred") && (1..=99).contains(&value) {
        value *= 100;
        used += 1;
        if let Some((rest, n)) = below_hundred(used).filter(|&(r, _)| r > 0) {
            value += rest;
            used += n;
        }
    }
    (Some(value), used.max(1))
}

/// Word-level Levenshtein distance: substitutions, insertions and deletions turning
/// `reference` into `hypothesis`.
pub fn word_errors(reference: &[String], hypothesis: &[String]) -> usize {
    let mut prev: Vec<usize> = (0..=hypothesis.len()).collect();
    let mut row = vec![0; hypothesis.len() + 1];
    for (i, r) in reference.iter().enumerate() {
        row[0] = i + 1;
        for (j, h) in hypothesis.iter().enumerate() {
            let substitute = prev[j] + usize::from(r != h);
            row[j + 1] = substitute.min(prev[j + 1] + 1).min(row[j] + 1);
        }
        std::mem::swap(&mut prev, &mut row);
    }
    prev[hypothesis.len()]
}

/// Whether `reply` holds one of the `expect` answers as whole (normalized) words.
pub fn is_correct(reply: &str, expect: &[String]) -> bool {
    let words = normalize(reply);
    expect.iter().any(|e| {
        let want = normalize(e);
        !want.is_empty() && words.windows(want.len()).any(|w| w == want.as_slice())
    })
}

/// Whether `reply` ends on a complete sentence: `.`, `!` or `?` after trailing quotes,
/// brackets and emphasis marks; a trailing ellipsis (`...`, `…`) trails off and does not count.
pub fn ends_complete_sentence(reply: &str) -> bool {
    let t = reply.trim_end_matches(|c: char| {
        c.is_whitespace()
            || matches!(
                c,
                '"' | '\'' | '”' | '’' | '»' | ')' | ']' | '}' | '*' | '_'
            )
    });
    t.ends_with(['.', '!', '?']) && !t.ends_with("...")
}

/// Nearest-rank percentile (`p` in 0–100) of `values`; `None` when there are none.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len() as f64 / 100.0).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

// ---------------------------------------------------------------------------------------------
// Audio
// ---------------------------------------------------------------------------------------------

/// Mono 16-bit audio at some rate.
#[derive(Clone, Debug)]
struct Clip {
    samples: Vec<i16>,
    rate: u32,
}

/// A prompt ready to stream at one rate: speech followed by the trailing silence.
#[derive(Debug)]
struct Prepared {
    samples: Vec<i16>,
    rate: u32,
    /// Where the speech ends in `samples`, in samples.
    speech_end: u64,
    /// Where the speech starts in `samples`.
    speech_start: Duration,
}

/// The PCM of a WAV that espeak-ng streams to standard output: its size fields are
/// placeholders, so the chunks are walked by hand and the data runs to the end of the bytes.
fn parse_streamed_wav(bytes: &[u8]) -> anyhow::Result<Clip> {
    anyhow::ensure!(
        bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WAVE",
        "not a WAV stream"
    );
    let mut pos = 12;
    let mut rate = None;
    while pos + 8 <= bytes.len() {
        let id = &bytes[pos..pos + 4];
        let size = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let body = pos + 8;
        if id == b"fmt " {
            anyhow::ensure!(bytes.len() >= body + 16, "truncated fmt chunk");
            let format = u16::from_le_bytes([bytes[body], bytes[body + 1]]);
            let channels = u16::from_le_bytes([bytes[body + 2], bytes[body + 3]]);
            let bits = u16::from_le_bytes([bytes[body + 14], bytes[body + 15]]);
            anyhow::ensure!(
                format == 1 && channels == 1 && bits == 16,
                "expected 16-bit mono PCM, got format {format}, {channels} channel(s), {bits} bits"
            );
            rate = Some(u32::from_le_bytes([
                bytes[body + 4],
                bytes[body + 5],
                bytes[body + 6],
                bytes[body + 7],
            ]));
        } else if id == b"data" {
            let rate = rate.context("data before the fmt chunk")?;
            let end = body.saturating_add(size).min(bytes.len());
            let samples = bytes[body..end]
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]))
                .collect();
            return Ok(Clip { samples, rate });
        }
        pos = body.saturating_add(size).saturating_add(size & 1);
    }
    anyhow::bail!("no data chunk")
}

/// `clip` with `pause` of silence inserted at each of `cuts` (sample positions).
fn with_pauses_at(clip: &Clip, cuts: &[usize], pause: Duration) -> Clip {
    Clip {
        samples: with_silence_at(&clip.samples, clip.rate, cuts, pause),
        rate: clip.rate,
    }
}

/// Resamples `clip` to `rate`, appends the trailing silence and finds where speech ends.
fn prepare(clip: &Clip, rate: u32) -> anyhow::Result<Prepared> {
    let mut samples = if clip.rate == rate {
        clip.samples.clone()
    } else {
        let mut r = StreamResampler::new(clip.rate, rate)?;
        let mut out = Vec::with_capacity(clip.samples.len() * rate as usize / clip.rate as usize);
        r.process(&clip.samples, &mut out);
        r.flush(&mut out);
        out
    };
    let end = speech_end(&samples, rate, SPEECH_DBFS).context("the clip has no speech")?;
    let speech_start = speech_start(&samples, rate, SPEECH_DBFS).unwrap_or_default();
    let speech_end = (end.as_secs_f64() * f64::from(rate)).round() as u64;
    samples.extend(std::iter::repeat_n(
        0i16,
        (u64::from(rate) * TRAILING_SILENCE.as_millis() as u64 / 1000) as usize,
    ));
    Ok(Prepared {
        samples,
        rate,
        speech_end,
        speech_start,
    })
}

/// The voices, started once per run.
struct Synthesiser {
    piper: Option<PiperTts>,
}

impl Synthesiser {
    /// Starts what `voices` need: the synthesis worker for the neural voice.
    async fn start(voices: &[Voice], models_dir: &Path, engine_dir: &Path) -> anyhow::Result<Self> {
        let piper = if voices.contains(&Voice::Piper) {
            let program = engine_dir.join("atlas-voice-tts");
            anyhow::ensure!(
                program.is_file(),
                "the synthesis worker {} is missing; build it (`cargo build --release`) or \
                 point --engine-dir at it",
                program.display()
            );
            let worker = Worker::start(WorkerConfig {
                name: "speech synthesis",
                program,
                args: piper::worker_args(models_dir)?,
                queue: 4,
                start_timeout: Duration::from_secs(60),
                nice: 0,
            })
            .await
            .context("cannot start the neural voice")?;
            Some(PiperTts::new(worker, "piper-joe"))
        } else {
            None
        };
        Ok(Synthesiser { piper })
    }

    /// `text` (a prompt's, with its `|` pauses of `pause`) spoken by `voice`. The sentence is
    /// said in one go and the silence cut into it, at the quietest moment near where the words
    /// before each `|` end when said alone: said apart, those words would end with a finished
    /// sentence's falling pitch, which is not how people pause mid-thought (and exactly what
    /// an end-of-turn model listens for).
    async fn speak(&self, voice: Voice, text: &str, pause: Duration) -> anyhow::Result<Clip> {
        let parts: Vec<&str> = text.split('|').map(str::trim).collect();
        let whole = self.say(voice, &parts.join(" ")).await?;
        let mut cuts = Vec::new();
        for k in 1..parts.len() {
            let before = self.say(voice, &parts[..k].join(" ")).await?;
            let end = loud_span(&before.samples, before.rate, PADDING_DBFS)
                .map_or(before.samples.len(), |(_, end)| end);
            let window = whole.rate as usize / 5;
            let cut = quietest_near(&whole.samples, whole.rate, end, window);
            cuts.push(cut.max(cuts.last().copied().unwrap_or(0)));
        }
        Ok(with_pauses_at(&whole, &cuts, pause))
    }

    async fn say(&self, voice: Voice, text: &str) -> anyhow::Result<Clip> {
        match voice {
            Voice::Espeak => espeak(text).await,
            Voice::Piper => self.piper(text).await,
        }
    }

    async fn piper(&self, text: &str) -> anyhow::Result<Clip> {
        let tts = self
            .piper
            .as_ref()
            .context("the neural voice is not started")?;
        let mut stream = tts
            .synthesize(TtsRequest {
                text: text.to_owned(),
                voice: None,
            })
            .await?;
        // Chunks may split a sample: collect the bytes, then read the samples.
        let mut bytes = Vec::new();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        let samples = bytes
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Clip {
            samples,
            rate: piper::PIPER_RATE,
        })
    }
}

/// `text` spoken by espeak-ng (`en-us`, 165 words per minute).
async fn espeak(text: &str) -> anyhow::Result<Clip> {
    let mut child = tokio::process::Command::new("espeak-ng")
        .args(["--stdout", "-v", "en-us", "-s", "165"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run espeak-ng (install it with `apt-get install -y espeak-ng`)")?;
    let mut stdin = child.stdin.take().context("espeak-ng's input")?;
    stdin.write_all(text.as_bytes()).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    anyhow::ensure!(
        out.status.success(),
        "espeak-ng failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse_streamed_wav(&out.stdout).context("espeak-ng's output")
}

// ---------------------------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------------------------

/// What one item sends.
enum Input {
    /// Speech at real-time pace.
    Audio(Arc<Prepared>),
    /// A typed turn.
    Text(String),
}

/// What came back for one item.
#[derive(Default)]
struct Exchange {
    /// Final transcripts, in order.
    finals: Vec<String>,
    /// Partial transcripts received.
    partials: usize,
    /// Turns the server started (more than one when it split the prompt at a pause).
    turns: usize,
    /// Text of the reply that ended the item (or of the latest one, on a timeout).
    reply: String,
    /// Bytes of reply audio.
    audio_bytes: usize,
    /// The server's latency breakdown of the reply that ended the item.
    latency: Option<LatencyBreakdown>,
    /// Speech sent → first reply audio, measured here, ms.
    client_latency_ms: Option<f64>,
    /// Whether that reply was cut off.
    interrupted: bool,
    /// From sending the chunk holding the last speech sample to the first final transcript,
    /// ms (negative: the turn ended before the speech did).
    final_ms: Option<f64>,
    /// No complete reply within the timeout.
    timed_out: bool,
    /// The prompt said again's first sound → `response.interrupted` of the reply it cut, ms.
    barge_in_ms: Option<f64>,
    /// Errors the server reported, and why listening stopped early.
    errors: Vec<String>,
}

/// Opens a session, plays `input`, and listens until the reply is done or `timeout` after
/// the input ended. `Err` when no session could be started.
async fn exchange(
    options: &ConnectOptions,
    rate: u32,
    input: &Input,
    timeout: Duration,
    listen: Listen,
) -> anyhow::Result<Exchange> {
    let mut conn = connect(options).await?;
    let start = SessionStart {
        input_audio: AudioFormat {
            sample_rate: rate,
            ..AudioFormat::DEFAULT_INPUT
        },
        output_audio: AudioFormat {
            sample_rate: OUTPUT_RATE,
            ..AudioFormat::DEFAULT_OUTPUT
        },
        client: Some(ClientInfo {
            name: Some("atlas-voice-eval".into()),
            version: Some(env!("CARGO_PKG_VERSION").into()),
        }),
        ..SessionStart::default()
    };
    conn.sender
        .send(&ClientMessage::SessionStart(start))
        .await?;
    let ready = Instant::now() + START_TIMEOUT;
    loop {
        match tokio::time::timeout_at(ready, conn.incoming.recv()).await {
            Err(_) => anyhow::bail!("no session.started within {} s", START_TIMEOUT.as_secs()),
            Ok(None) => anyhow::bail!("the connection ended before the session started"),
            Ok(Some(Incoming::Event {
                event: ServerEvent::SessionStarted { .. },
                ..
            })) => break,
            Ok(Some(Incoming::Event {
                event: ServerEvent::Error { code, message, .. },
                ..
            })) => anyhow::bail!(
                "the server refused the session: {} {message}",
                code.as_str()
            ),
            Ok(Some(Incoming::Closed { code, reason, .. })) => {
                anyhow::bail!("the server closed the connection ({code:?} {reason})")
            }
            Ok(Some(_)) => {}
        }
    }

    let mut out = Exchange::default();
    let began = Instant::now();
    let speak = |clip: &Arc<Prepared>| {
        let (sender, clip) = (conn.sender.clone(), clip.clone());
        tokio::spawn(
            async move { stream_pcm(&sender, &clip.samples, clip.rate, CHUNK_MS, 1.0).await },
        )
    };
    let (mut feeder, mut input_end, mut hard_deadline) = match input {
        Input::Audio(clip) => {
            let length =
                atlas_core::audio::samples_to_duration(clip.samples.len() as u64, clip.rate);
            (Some(speak(clip)), None, began + length + timeout)
        }
        Input::Text(text) => {
            conn.sender
                .send(&ClientMessage::InputText { text: text.clone() })
                .await?;
            (None, Some(Instant::now()), began + timeout)
        }
    };
    let mut stream_start = None;
    let mut settle: Option<Instant> = None;
    let mut latest_turn = 0u64;
    let mut done: Option<u64> = None;
    let mut replies: BTreeMap<u64, String> = BTreeMap::new();
    let mut audio_at: Vec<Instant> = Vec::new();
    let mut first_final: Option<Instant> = None;
    // The prompt said again: when its first sound was captured, and the turn it cuts.
    let mut barge: Option<(Instant, u64)> = None;
    let mut closed = false;
    let finished = |done: Option<u64>, latest: u64| done.is_some_and(|d| d >= latest);
    loop {
        let deadline = input_end.map_or(hard_deadline, |e| e + timeout);
        let wake = settle.map_or(deadline, |s| s.min(deadline));
        tokio::select! {
            joined = async { feeder.as_mut().expect("guarded by the condition").await },
                if feeder.is_some() =>
            {
                feeder = None;
                match joined {
                    Ok(Ok(at)) => {
                        stream_start = Some(at);
                        input_end = Some(Instant::now());
                        if finished(done, latest_turn) {
                            settle = Some(Instant::now() + SETTLE);
                        }
                    }
                    Ok(Err(e)) => {
                        out.errors.push(format!("sending audio: {e}"));
                        break;
                    }
                    Err(e) => {
                        out.errors.push(format!("sending audio: {e}"));
                        break;
                    }
                }
            }
            item = conn.incoming.recv() => match item {
                None => {
                    out.errors.push("the connection ended".into());
                    closed = true;
                    break;
                }
                Some(Incoming::Closed { code, reason, .. }) => {
                    out.errors.push(format!("the server closed the connection ({code:?} {reason})"));
                    closed = true;
                    break;
                }
                Some(Incoming::Audio { pcm, at }) => {
                    if listen == Listen::BargeIn
                        && barge.is_none()
                        && let Input::Audio(clip) = input
                    {
                        // One microphone: what is left of the trailing silence gives way.
                        if let Some(task) = feeder.take() {
                            task.abort();
                        }
                        feeder = Some(speak(clip));
                        barge = Some((Instant::now() + clip.speech_start, latest_turn));
                        (input_end, stream_start, settle) = (None, None, None);
                        hard_deadline = Instant::now()
                            + atlas_core::audio::samples_to_duration(
                                clip.samples.len() as u64,
                                clip.rate,
                            )
                            + timeout;
                        // The item's figures are of the prompt said again.
                        audio_at.clear();
                        out.audio_bytes = 0;
                        out.finals.clear();
                        first_final = None;
                        continue;
                    }
                    out.audio_bytes += pcm.len();
                    audio_at.push(at);
                }
                Some(Incoming::Event { event, at }) => match event {
                    ServerEvent::TranscriptPartial { .. } => out.partials += 1,
                    ServerEvent::TranscriptFinal { turn_id, text } => {
                        out.finals.push(text);
                        first_final.get_or_insert_with(Instant::now);
                        latest_turn = latest_turn.max(turn_id);
                        settle = None;
                        if listen == Listen::UntilFinal {
                            break;
                        }
                    }
                    ServerEvent::ResponseStarted { turn_id } => {
                        out.turns += 1;
                        latest_turn = latest_turn.max(turn_id);
                        settle = None;
                    }
                    ServerEvent::ResponseTextDelta { turn_id, text } => {
                        replies.entry(turn_id).or_default().push_str(&text);
                    }
                    ServerEvent::ResponseInterrupted { turn_id } => {
                        if let Some((spoken, cut)) = barge
                            && turn_id == cut
                        {
                            let ms = at.saturating_duration_since(spoken).as_secs_f64() * 1e3;
                            out.barge_in_ms.get_or_insert(ms);
                        }
                    }
                    ServerEvent::ResponseDone { turn_id, interrupted, latency_ms } => {
                        done = Some(turn_id);
                        out.interrupted = interrupted;
                        out.latency = Some(latency_ms);
                        if input_end.is_some() && finished(done, latest_turn) {
                            break;
                        }
                    }
                    ServerEvent::ToolCall { call_id, name, .. } => {
                        // The evaluation is no application: every tool fails, and the
                        // assistant carries on without it.
                        let _ = conn.sender.send(&ClientMessage::ToolResult {
                            call_id,
                            result: None,
                            error: Some(format!("the tool {name} is not available")),
                        }).await;
                    }
                    ServerEvent::Error { code, message, fatal } => {
                        out.errors.push(format!("{}: {message}", code.as_str()));
                        if fatal {
                            break;
                        }
                    }
                    _ => {}
                },
            },
            _ = tokio::time::sleep_until(wake) => {
                out.timed_out = settle.is_none_or(|s| s > Instant::now());
                break;
            }
        }
    }
    if let Some(task) = feeder {
        task.abort();
    }
    out.reply = done
        .and_then(|t| replies.remove(&t))
        .or_else(|| replies.pop_last().map(|(_, text)| text))
        .unwrap_or_default();
    // When the last speech sample left: the end of the chunk that holds it.
    let speech_sent = match input {
        Input::Audio(clip) => stream_start.map(|at| {
            let per_chunk = u64::from((clip.rate * CHUNK_MS / 1000).max(1));
            let sent = clip.speech_end.div_ceil(per_chunk) * per_chunk;
            at + atlas_core::audio::samples_to_duration(sent, clip.rate)
        }),
        Input::Text(_) => input_end,
    };
    out.final_ms = first_final.and_then(|at| {
        let sent = speech_sent.or_else(|| match input {
            // Cut off before the feeder finished: when the speech will have been sent.
            Input::Audio(clip) => {
                let per_chunk = u64::from((clip.rate * CHUNK_MS / 1000).max(1));
                let sent = clip.speech_end.div_ceil(per_chunk) * per_chunk;
                Some(began + atlas_core::audio::samples_to_duration(sent, clip.rate))
            }
            Input::Text(_) => None,
        })?;
        Some(if at >= sent {
            (at - sent).as_secs_f64() * 1000.0
        } else {
            -((sent - at).as_secs_f64() * 1000.0)
        })
    });
    out.client_latency_ms = speech_sent.and_then(|sent| {
        audio_at
            .iter()
            .find(|&&at| at >= sent)
            .map(|&at| (at - sent).as_secs_f64() * 1000.0)
    });
    if !closed {
        let _ = conn.sender.send(&ClientMessage::SessionEnd).await;
        let bye = Instant::now() + Duration::from_secs(2);
        while let Ok(Some(item)) = tokio::time::timeout_at(bye, conn.incoming.recv()).await {
            if matches!(item, Incoming::Closed { .. }) {
                break;
            }
        }
    }
    conn.abort();
    Ok(out)
}

/// Where access tokens come from.
enum Tokens {
    /// Given on the command line.
    Fixed(String),
    /// Minted by the server's development endpoint, renewed at half their lifetime.
    Dev {
        endpoint: String,
        client: reqwest::Client,
        token: String,
        renew_at: Instant,
    },
}

#[derive(Deserialize)]
struct DevToken {
    token: String,
    expires_in: u64,
}

impl Tokens {
    async fn new(url: &str, token: Option<String>) -> anyhow::Result<Tokens> {
        if let Some(t) = token {
            return Ok(Tokens::Fixed(t));
        }
        let endpoint = format!("{}/dev/token", crate::bench::http_base(url));
        let client = reqwest::Client::new();
        let (token, renew_at) = fetch_dev_token(&client, &endpoint).await?;
        Ok(Tokens::Dev {
            endpoint,
            client,
            token,
            renew_at,
        })
    }

    async fn get(&mut self) -> anyhow::Result<String> {
        match self {
            Tokens::Fixed(t) => Ok(t.clone()),
            Tokens::Dev {
                endpoint,
                client,
                token,
                renew_at,
            } => {
                if Instant::now() >= *renew_at {
                    (*token, *renew_at) = fetch_dev_token(client, endpoint).await?;
                }
                Ok(token.clone())
            }
        }
    }
}

/// A development token from `POST /dev/token`, and when to renew it.
async fn fetch_dev_token(
    client: &reqwest::Client,
    endpoint: &str,
) -> anyhow::Result<(String, Instant)> {
    let response = client
        .post(endpoint)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach the server at {endpoint}"))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        anyhow::bail!(
            "{endpoint} answered 404: the server is not in development mode; pass --token \
             (or set ATLAS_TOKEN)"
        );
    }
    let body: DevToken = response
        .error_for_status()
        .with_context(|| format!("{endpoint} refused a development token"))?
        .json()
        .await
        .with_context(|| format!("{endpoint} answered something other than a token"))?;
    let renew_at = Instant::now() + Duration::from_secs(body.expires_in / 2);
    Ok((body.token, renew_at))
}

// ---------------------------------------------------------------------------------------------
// Records and summary
// ---------------------------------------------------------------------------------------------

/// One prompt run once with one voice at one rate (or typed).
#[derive(Debug, Serialize)]
pub struct ItemRecord {
    /// `<voice>@<rate>`, or `text`.
    pub group: String,
    /// The prompt's id.
    pub id: String,
    /// The prompt's kind.
    pub kind: Kind,
    /// The voice (absent when typed).
    pub voice: Option<Voice>,
    /// Input sample rate (absent when typed).
    pub rate: Option<u32>,
    /// The words spoken (the reference transcript).
    pub text: String,
    /// Acceptable answers.
    pub expect: Vec<String>,
    /// Whether a session was established and the prompt sent.
    pub ran: bool,
    /// All final transcripts of the item, joined (absent when typed).
    pub transcript: Option<String>,
    /// Partial transcripts received.
    pub partials: usize,
    /// Reply turns the server started.
    pub turns: usize,
    /// Word errors against the reference (absent when typed).
    pub word_errors: Option<usize>,
    /// Words in the reference.
    pub reference_words: usize,
    /// The reply's text.
    pub reply: String,
    /// Whether any reply audio arrived.
    pub reply_audio: bool,
    /// Seconds of reply audio.
    pub reply_audio_s: f64,
    /// Whether the reply holds an expected answer (absent when not checkable).
    pub correct: Option<bool>,
    /// Whether the reply ends on a complete sentence.
    pub complete_sentence: bool,
    /// Neither reply text nor reply audio.
    pub no_reply: bool,
    /// The server's end of speech → first reply audio, ms.
    pub latency_ms: Option<u64>,
    /// Measured here: last speech sample sent → first reply audio frame, ms.
    pub client_latency_ms: Option<f64>,
    /// The server's whole latency breakdown.
    pub server_latency: Option<LatencyBreakdown>,
    /// Whether the reply was cut off.
    pub interrupted: bool,
    /// No complete reply within the timeout.
    pub timed_out: bool,
    /// Errors the server reported, or why the item did not run.
    pub errors: Vec<String>,
    /// The silence at each `|`, ms (absent: no pause).
    pub pause_ms: Option<u64>,
    /// Last speech sample sent → first final transcript, ms (negative: before it).
    pub final_ms: Option<f64>,
    /// The turn ended before the speech did.
    pub cut_off: bool,
    /// With `--barge-in`: the prompt said again's first sound → `response.interrupted` of
    /// the reply it cut, ms (absent: the reply was not cut).
    pub barge_in_ms: Option<f64>,
}

/// The metrics of a set of items.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    /// `<voice>@<rate>`, `text` or `all`.
    pub group: String,
    /// Items.
    pub items: usize,
    /// Items that could not run (no session).
    pub failed: usize,
    /// Word errors / reference words over the items that ran with audio.
    pub wer: Option<f64>,
    /// Word errors.
    pub word_errors: usize,
    /// Reference words.
    pub reference_words: usize,
    /// Checkable items that ran.
    pub checkable: usize,
    /// Of those, answered correctly.
    pub correct: usize,
    /// `correct / checkable`.
    pub correctness: Option<f64>,
    /// Items with reply text.
    pub replies: usize,
    /// Of those, ending on a complete sentence.
    pub complete: usize,
    /// `complete / replies`.
    pub complete_share: Option<f64>,
    /// Items that ran with no reply at all.
    pub no_reply: usize,
    /// `no_reply / items that ran`.
    pub no_reply_share: Option<f64>,
    /// Items with no complete reply within the timeout.
    pub timed_out: usize,
    /// Which figure the headline percentiles use: `server` when the server reported any,
    /// else `client`.
    pub latency_source: Option<&'static str>,
    /// Headline end of speech → first audio, p50, ms.
    pub latency_p50_ms: Option<f64>,
    /// Headline end of speech → first audio, p95, ms.
    pub latency_p95_ms: Option<f64>,
    /// Measured at the client, p50, ms.
    pub client_latency_p50_ms: Option<f64>,
    /// Measured at the client, p95, ms.
    pub client_latency_p95_ms: Option<f64>,
    /// Items that ran with audio and a pause mid-thought.
    pub paused: usize,
    /// Items that ran with audio whose turn ended before the speech did.
    pub cut_off: usize,
    /// Of those, items with a pause mid-thought.
    pub paused_cut_off: usize,
    /// End-of-turn delay (last speech sample sent → first final) of items not cut off, p50,
    /// ms.
    pub end_of_turn_p50_ms: Option<f64>,
    /// The same, p95, ms.
    pub end_of_turn_p95_ms: Option<f64>,
    /// Replies cut by the prompt said again (with `--barge-in`).
    pub barge_ins: usize,
    /// The prompt said again's first sound → `response.interrupted`, p50, ms.
    pub barge_in_p50_ms: Option<f64>,
    /// The same, p95, ms.
    pub barge_in_p95_ms: Option<f64>,
}

/// The metrics of `items` under the name `group`.
pub fn summarize(group: &str, items: &[&ItemRecord]) -> Summary {
    let ran: Vec<&ItemRecord> = items.iter().copied().filter(|i| i.ran).collect();
    let heard: Vec<&ItemRecord> = ran
        .iter()
        .copied()
        .filter(|i| i.word_errors.is_some())
        .collect();
    let word_errors: usize = heard.iter().filter_map(|i| i.word_errors).sum();
    let reference_words: usize = heard.iter().map(|i| i.reference_words).sum();
    let checked: Vec<bool> = ran.iter().filter_map(|i| i.correct).collect();
    let correct = checked.iter().filter(|&&c| c).count();
    let replied: Vec<&ItemRecord> = ran
        .iter()
        .copied()
        .filter(|i| !i.reply.trim().is_empty())
        .collect();
    let complete = replied.iter().filter(|i| i.complete_sentence).count();
    let no_reply = ran.iter().filter(|i| i.no_reply).count();
    let server: Vec<f64> = ran
        .iter()
        .filter_map(|i| i.latency_ms)
        .map(|ms| ms as f64)
        .collect();
    let client: Vec<f64> = ran.iter().filter_map(|i| i.client_latency_ms).collect();
    let (source, headline) = if !server.is_empty() {
        (Some("server"), &server)
    } else if !client.is_empty() {
        (Some("client"), &client)
    } else {
        (None, &server)
    };
    let share = |n: usize, of: usize| (of > 0).then(|| n as f64 / of as f64);
    let spoken: Vec<&ItemRecord> = ran.iter().copied().filter(|i| i.voice.is_some()).collect();
    let end_of_turn: Vec<f64> = spoken
        .iter()
        .filter(|i| !i.cut_off)
        .filter_map(|i| i.final_ms)
        .collect();
    let barge_ins: Vec<f64> = ran.iter().filter_map(|i| i.barge_in_ms).collect();
    Summary {
        group: group.to_owned(),
        items: items.len(),
        failed: items.len() - ran.len(),
        wer: (!heard.is_empty()).then(|| share(word_errors, reference_words).unwrap_or(0.0)),
        word_errors,
        reference_words,
        checkable: checked.len(),
        correct,
        correctness: share(correct, checked.len()),
        replies: replied.len(),
        complete,
        complete_share: share(complete, replied.len()),
        no_reply,
        no_reply_share: share(no_reply, ran.len()),
        timed_out: ran.iter().filter(|i| i.timed_out).count(),
        latency_source: source,
        latency_p50_ms: percentile(headline, 50.0),
        latency_p95_ms: percentile(headline, 95.0),
        client_latency_p50_ms: percentile(&client, 50.0),
        client_latency_p95_ms: percentile(&client, 95.0),
        paused: spoken.iter().filter(|i| i.pause_ms.is_some()).count(),
        cut_off: spoken.iter().filter(|i| i.cut_off).count(),
        paused_cut_off: spoken
            .iter()
            .filter(|i| i.cut_off && i.pause_ms.is_some())
            .count(),
        end_of_turn_p50_ms: percentile(&end_of_turn, 50.0),
        end_of_turn_p95_ms: percentile(&end_of_turn, 95.0),
        barge_ins: barge_ins.len(),
        barge_in_p50_ms: percentile(&barge_ins, 50.0),
        barge_in_p95_ms: percentile(&barge_ins, 95.0),
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{:.1}%", v * 100.0))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.0}"))
}

/// The summaries as a table.
fn table(rows: &[Summary]) -> String {
    let mut s = format!(
        "{:<12} {:>5} {:>6} {:>7} {:>14} {:>16} {:>9} {:>9} {:>8} {:>8} {:>8}\n",
        "group",
        "items",
        "failed",
        "WER",
        "correct",
        "complete",
        "no reply",
        "timeouts",
        "p50 ms",
        "p95 ms",
        "client"
    );
    for r in rows {
        let correct = format!("{}/{} {}", r.correct, r.checkable, pct(r.correctness));
        let complete = format!("{}/{} {}", r.complete, r.replies, pct(r.complete_share));
        let client = format!(
            "{}/{}",
            ms(r.client_latency_p50_ms),
            ms(r.client_latency_p95_ms)
        );
        s.push_str(&format!(
            "{:<12} {:>5} {:>6} {:>7} {:>14} {:>16} {:>9} {:>9} {:>8} {:>8} {:>8}\n",
            r.group,
            r.items,
            r.failed,
            pct(r.wer),
            correct,
            complete,
            pct(r.no_reply_share),
            r.timed_out,
            ms(r.latency_p50_ms),
            ms(r.latency_p95_ms),
            client
        ));
    }
    if rows
        .iter()
        .any(|r| r.end_of_turn_p50_ms.is_some() || r.cut_off > 0)
    {
        s.push_str(&format!(
            "\n{:<12} {:>12} {:>16} {:>20}\n",
            "group", "cut off", "paused cut off", "end of turn p50/p95"
        ));
        for r in rows {
            s.push_str(&format!(
                "{:<12} {:>12} {:>16} {:>20}\n",
                r.group,
                format!("{}/{}", r.cut_off, r.items - r.failed),
                format!("{}/{}", r.paused_cut_off, r.paused),
                format!(
                    "{}/{} ms",
                    ms(r.end_of_turn_p50_ms),
                    ms(r.end_of_turn_p95_ms)
                ),
            ));
        }
    }
    if rows.iter().any(|r| r.barge_ins > 0) {
        s.push_str(&format!(
            "\n{:<12} {:>12} {:>34}\n",
            "group", "barge-ins", "first sound → interrupted p50/p95"
        ));
        for r in rows {
            s.push_str(&format!(
                "{:<12} {:>12} {:>34}\n",
                r.group,
                format!("{}/{}", r.barge_ins, r.items - r.failed),
                format!("{}/{} ms", ms(r.barge_in_p50_ms), ms(r.barge_in_p95_ms)),
            ));
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// One group of items: a voice at a rate, or typed.
#[derive(Clone, Copy)]
struct Group {
    voice: Option<Voice>,
    rate: u32,
}

impl Group {
    fn name(self) -> String {
        match self.voice {
            Some(v) => format!("{}@{}k", v.name(), self.rate / 1000),
            None => "text".into(),
        }
    }
}

fn load_prompts(path: &Path) -> anyhow::Result<Vec<Prompt>> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_prompts(&text).with_context(|| format!("{}", path.display())),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PROMPTS) =>
        {
            println!("{DEFAULT_PROMPTS} is not here; using the built-in prompt set");
            parse_prompts(BUILTIN_PROMPTS)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Runs the evaluation; returns the exit code (0 unless the server could not be reached).
pub async fn run(args: EvalArgs) -> anyhow::Result<i32> {
    let mut prompts = load_prompts(&args.prompts)?;
    if let Some(kind) = args.filter {
        prompts.retain(|p| p.kind == kind);
    }
    if let Some(n) = args.limit {
        prompts.truncate(n);
    }
    anyhow::ensure!(!prompts.is_empty(), "no prompts to run");
    for &rate in &args.rates {
        anyhow::ensure!(
            AudioFormat::SUPPORTED_RATES.contains(&rate),
            "--rates: {rate} Hz is not one of {:?}",
            AudioFormat::SUPPORTED_RATES
        );
    }
    let mut voices = args.voices.clone();
    voices.sort();
    voices.dedup();
    let mut rates = args.rates.clone();
    rates.dedup();
    anyhow::ensure!(
        args.text || (!voices.is_empty() && !rates.is_empty()),
        "no voices or rates"
    );

    // Reaching the server first: a missing server fails before minutes of synthesis.
    let mut tokens = match Tokens::new(&args.url, args.token.clone()).await {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(1);
        }
    };

    let groups: Vec<Group> = if args.text {
        vec![Group {
            voice: None,
            rate: 16_000,
        }]
    } else {
        voices
            .iter()
            .flat_map(|&v| {
                rates.iter().map(move |&rate| Group {
                    voice: Some(v),
                    rate,
                })
            })
            .collect()
    };

    // Every clip, before any session.
    let mut clips: HashMap<(Voice, String, u32), Arc<Prepared>> = HashMap::new();
    if !args.text {
        let engine_dir = match &args.engine_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("the program's directory")?
                .to_path_buf(),
        };
        let synth = Synthesiser::start(&voices, &args.models_dir, &engine_dir).await?;
        if let Some(dir) = &args.save_clips {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut spoken: HashMap<(Voice, String, Duration), Clip> = HashMap::new();
        for &voice in &voices {
            println!(
                "synthesising {} prompts with {}",
                prompts.len(),
                voice.name()
            );
            for p in &prompts {
                let key = (voice, p.text.clone(), p.pause());
                if !spoken.contains_key(&key) {
                    let clip = synth
                        .speak(voice, &p.text, p.pause())
                        .await
                        .with_context(|| format!("{} speaking {:?}", voice.name(), p.id))?;
                    spoken.insert(key.clone(), clip);
                }
                for &rate in &rates {
                    let prepared = prepare(&spoken[&key], rate)
                        .with_context(|| format!("{} speaking {:?}", voice.name(), p.id))?;
                    if let Some(dir) = &args.save_clips {
                        let path = dir.join(format!("{}-{}-{}.wav", voice.name(), rate, p.id));
                        wav::write(&path, &prepared.samples, rate)?;
                    }
                    clips.insert((voice, p.id.clone(), rate), Arc::new(prepared));
                }
            }
        }
        // The synthesis worker stops here, before the measurement.
        drop(synth);
    }

    let timeout = Duration::from_secs(args.timeout_s);
    let total = groups.len() * prompts.len();
    let mut records: Vec<ItemRecord> = Vec::with_capacity(total);
    let mut connected_once = false;
    for group in &groups {
        for p in &prompts {
            let input = match group.voice {
                Some(v) => Input::Audio(clips[&(v, p.id.clone(), group.rate)].clone()),
                None => Input::Text(p.spoken()),
            };
            let result = match tokens.get().await {
                Ok(token) => {
                    let options = ConnectOptions::new(&args.url, token);
                    let listen = if args.until_final {
                        Listen::UntilFinal
                    } else if args.barge_in {
                        Listen::BargeIn
                    } else {
                        Listen::Reply
                    };
                    exchange(&options, group.rate, &input, timeout, listen).await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = &result
                && !connected_once
            {
                eprintln!("error: cannot hold a session with {}: {e:#}", args.url);
                return Ok(1);
            }
            connected_once = true;
            let record = score(*group, p, result);
            println!("[{}/{}] {}", records.len() + 1, total, item_line(&record));
            records.push(record);
        }
    }

    let mut summaries: Vec<Summary> = groups
        .iter()
        .map(|g| {
            let name = g.name();
            let items: Vec<&ItemRecord> = records.iter().filter(|r| r.group == name).collect();
            summarize(&name, &items)
        })
        .collect();
    if groups.len() > 1 {
        summaries.push(summarize("all", &records.iter().collect::<Vec<_>>()));
    }
    println!();
    print!("{}", table(&summaries));
    println!(
        "WER over the words heard; correct over checkable items; complete over replies; \
         latency = end of speech → first reply audio ({} figure; client = measured here, p50/p95)",
        summaries
            .last()
            .and_then(|s| s.latency_source)
            .unwrap_or("server")
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({
            "url": args.url,
            "mode": if args.text { "text" } else { "audio" },
            "prompts": args.prompts,
            "timeout_s": args.timeout_s,
            "items": records,
            "summary": summaries,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(0)
}

/// Scores what came back for prompt `p` in `group`.
fn score(group: Group, p: &Prompt, result: anyhow::Result<Exchange>) -> ItemRecord {
    let spoken = p.spoken();
    let reference = normalize(&spoken);
    let mut record = ItemRecord {
        group: group.name(),
        id: p.id.clone(),
        kind: p.kind,
        voice: group.voice,
        rate: group.voice.map(|_| group.rate),
        text: spoken,
        expect: p.expect.clone(),
        ran: false,
        transcript: None,
        partials: 0,
        turns: 0,
        word_errors: None,
        reference_words: reference.len(),
        reply: String::new(),
        reply_audio: false,
        reply_audio_s: 0.0,
        correct: None,
        complete_sentence: false,
        no_reply: true,
        latency_ms: None,
        client_latency_ms: None,
        server_latency: None,
        interrupted: false,
        timed_out: false,
        errors: Vec::new(),
        pause_ms: p.text.contains('|').then(|| p.pause().as_millis() as u64),
        final_ms: None,
        cut_off: false,
        barge_in_ms: None,
    };
    let x = match result {
        Ok(x) => x,
        Err(e) => {
            record.errors.push(format!("{e:#}"));
            return record;
        }
    };
    let reply = x.reply.trim().to_owned();
    record.ran = true;
    if group.voice.is_some() {
        let heard = x.finals.join(" ");
        record.word_errors = Some(word_errors(&reference, &normalize(&heard)));
        record.transcript = Some(heard);
    }
    record.partials = x.partials;
    record.turns = x.turns;
    record.reply_audio = x.audio_bytes > 0;
    record.reply_audio_s = x.audio_bytes as f64 / 2.0 / f64::from(OUTPUT_RATE);
    record.correct = p.checkable().then(|| is_correct(&reply, &p.expect));
    record.complete_sentence = ends_complete_sentence(&reply);
    record.no_reply = reply.is_empty() && x.audio_bytes == 0;
    record.latency_ms = x.latency.as_ref().and_then(|l| l.to_first_audio);
    record.server_latency = x.latency;
    record.client_latency_ms = x.client_latency_ms;
    record.interrupted = x.interrupted;
    record.timed_out = x.timed_out;
    record.final_ms = x.final_ms;
    record.cut_off = x.final_ms.is_some_and(|ms| ms < 0.0);
    record.barge_in_ms = x.barge_in_ms;
    record.errors = x.errors;
    record.reply = reply;
    record
}

/// One line of progress for an item.
fn item_line(r: &ItemRecord) -> String {
    let mut line = format!("{} {}", r.group, r.id);
    if !r.ran {
        line.push_str(&format!(": not run ({})", r.errors.join("; ")));
        return line;
    }
    if let Some(t) = &r.transcript {
        line.push_str(&format!(" | heard {t:?}"));
    }
    line.push_str(&format!(" | reply {:?}", r.reply));
    match r.correct {
        Some(true) => line.push_str(" | correct"),
        Some(false) => line.push_str(" | WRONG"),
        None => {}
    }
    if !r.reply.is_empty() && !r.complete_sentence {
        line.push_str(" | incomplete");
    }
    if let Some(ms) = r.latency_ms {
        line.push_str(&format!(" | {ms} ms"));
    }
    if let Some(ms) = r.client_latency_ms {
        line.push_str(&format!(" (client {ms:.0} ms)"));
    }
    if let Some(ms) = r.final_ms {
        line.push_str(&format!(" | final {ms:+.0} ms"));
    }
    if r.cut_off {
        line.push_str(" | CUT OFF");
    }
    if r.timed_out {
        line.push_str(" | TIMEOUT");
    }
    if !r.errors.is_empty() {
        line.push_str(&format!(" | errors: {}", r.errors.join("; ")));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        normalize(s)
    }

    #[test]
    fn normalization_lowercases_strips_punctuation_and_writes_numbers_as_digits() {
        assert_eq!(
            words("What's the Capital of France?"),
            ["whats", "the", "capital", "of", "france"]
        );
        assert_eq!(
            words("well-known, isn't it!"),
            ["well", "known", "isnt", "it"]
        );
        assert_eq!(words("Twelve plus seven"), ["12", "plus", "7"]);
        assert_eq!(words("twenty-one"), ["21"]);
        assert_eq!(words("one hundred twenty minutes"), ["120", "minutes"]);
        assert_eq!(words("a hundred"), ["a", "100"]);
        assert_eq!(words("zero, ninety"), ["0", "90"]);
        assert_eq!(words("two three"), ["2", "3"]);
        assert_eq!(words("1,000 and 3.5."), ["1000", "and", "3.5"]);
        assert_eq!(words("100°C"), ["100", "c"]);
        assert!(words(" ... !").is_empty());
    }

    #[test]
    fn word_error_rate_counts_edits() {
        let e = |r: &str, h: &str| word_errors(&words(r), &words(h));
        assert_eq!(
            e(
                "what is the capital of france",
                "What is the capital of France?"
            ),
            0
        );
        // Substitution.
        assert_eq!(
            e(
                "what is the capital of france",
                "what is the capital of friends"
            ),
            1
        );
        // Insertion.
        assert_eq!(e("tell me a joke", "tell me a good joke"), 1);
        // Deletion.
        assert_eq!(e("tell me a joke", "tell me joke"), 1);
        // "and friends" for "of france": two substitutions.
        assert_eq!(e("the capital of france", "the capital and friends"), 2);
        // Number words and digits are the same words.
        assert_eq!(
            e(
                "how many minutes in two hours",
                "How many minutes in 2 hours?"
            ),
            0
        );
        assert_eq!(e("what is twelve plus seven", "what is 12 plus 7"), 0);
        assert_eq!(e("", "hello there"), 2);
        assert_eq!(e("hello there", ""), 2);
    }

    #[test]
    fn correctness_needs_an_expected_word() {
        let expect = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(is_correct(
            "The capital of France is Paris.",
            &expect(&["paris"])
        ));
        assert!(is_correct("A spider has 8 legs.", &expect(&["eight"])));
        assert!(is_correct("Spiders have eight legs.", &expect(&["8"])));
        assert!(is_correct("There are 120 minutes.", &expect(&["120"])));
        assert!(is_correct("One hundred twenty minutes.", &expect(&["120"])));
        assert!(is_correct(
            "It says moo: a cow!",
            &expect(&["horse", "cow"])
        ));
        assert!(is_correct("I love New York.", &expect(&["new york"])));
        // Whole words only, and a wrong number is wrong.
        assert!(!is_correct("Parisian food is great.", &expect(&["paris"])));
        assert!(!is_correct(
            "There are 2 * 60 = 12 minutes.",
            &expect(&["120"])
        ));
        assert!(!is_correct(
            "Spiders have five pairs of legs.",
            &expect(&["eight"])
        ));
        assert!(!is_correct("", &expect(&["blue"])));
        assert!(!is_correct("Blue.", &[]));
    }

    #[test]
    fn complete_sentences_end_with_a_stop() {
        assert!(ends_complete_sentence("It is blue."));
        assert!(ends_complete_sentence("Really? "));
        assert!(ends_complete_sentence("Hello!"));
        assert!(ends_complete_sentence("He said \"go home.\""));
        assert!(ends_complete_sentence("(That is all.)"));
        assert!(ends_complete_sentence("It is **blue.**"));
        assert!(!ends_complete_sentence(
            "I'd recommend \"The Hunger Games\" by"
        ));
        assert!(!ends_complete_sentence("Well..."));
        assert!(!ends_complete_sentence("Well…"));
        assert!(!ends_complete_sentence("The answer is"));
        assert!(!ends_complete_sentence(""));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        let v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(10.0));
        assert_eq!(percentile(&v, 95.0), Some(19.0));
        assert_eq!(percentile(&v, 100.0), Some(20.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0, 4.0], 50.0), Some(2.0));
    }

    #[test]
    fn the_prompt_set_is_complete() {
        let prompts = parse_prompts(BUILTIN_PROMPTS).expect("the prompt set parses");
        assert!(prompts.len() >= 30, "{} prompts", prompts.len());
        let checkable: Vec<&Prompt> = prompts.iter().filter(|p| p.checkable()).collect();
        assert!(checkable.len() >= 16, "{} checkable", checkable.len());
        assert!(checkable.iter().all(|p| p.kind == Kind::Fact));
        assert!(prompts.iter().filter(|p| p.text.contains('|')).count() >= 3);
        for kind in [Kind::Fact, Kind::Request, Kind::Chat] {
            assert!(prompts.iter().any(|p| p.kind == kind), "no {kind:?}");
        }
        let ids: HashSet<&str> = prompts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids.len(), prompts.len(), "ids are unique");
        // The reference has no pause marks, and numbers are spoken.
        let italy = prompts.iter().find(|p| p.text.contains('|')).unwrap();
        assert!(!italy.spoken().contains('|'));
        assert!(!italy.spoken().contains("  "));
        assert!(prompts.iter().any(|p| is_correct("19", &p.expect)));
    }

    #[test]
    fn prompt_sets_with_mistakes_are_refused() {
        let dup = r#"
            [[prompt]]
            id = "a"
            kind = "fact"
            text = "What?"
            [[prompt]]
            id = "a"
            kind = "chat"
            text = "Hi."
        "#;
        assert!(
            parse_prompts(dup)
                .unwrap_err()
                .to_string()
                .contains("repeated")
        );
        let kind = "[[prompt]]\nid = \"a\"\nkind = \"quiz\"\ntext = \"What?\"\n";
        assert!(parse_prompts(kind).is_err());
        let empty_part = "[[prompt]]\nid = \"a\"\nkind = \"fact\"\ntext = \"What | \"\n";
        assert!(parse_prompts(empty_part).is_err());
    }

    #[test]
    fn streamed_wav_with_placeholder_sizes_is_read() {
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF\xff\xff\xff\x7fWAVEfmt ");
        wav.extend_from_slice(&16u32.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes()); // PCM
        wav.extend_from_slice(&1u16.to_le_bytes()); // mono
        wav.extend_from_slice(&22_050u32.to_le_bytes());
        wav.extend_from_slice(&44_100u32.to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes());
        wav.extend_from_slice(&16u16.to_le_bytes());
        wav.extend_from_slice(b"data\xff\xff\xff\x7f");
        for s in [1i16, -2, 300] {
            wav.extend_from_slice(&s.to_le_bytes());
        }
        let clip = parse_streamed_wav(&wav).unwrap();
        assert_eq!(clip.rate, 22_050);
        assert_eq!(clip.samples, [1, -2, 300]);
        assert!(parse_streamed_wav(b"not a wav at all").is_err());
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: EvalArgs,
    }

    #[test]
    fn the_options_parse_with_their_defaults() {
        use clap::{CommandFactory, Parser};
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["eval"]).unwrap();
        assert_eq!(cli.args.voices, [Voice::Espeak, Voice::Piper]);
        assert_eq!(cli.args.rates, [16_000, 8_000]);
        assert_eq!(cli.args.timeout_s, 20);
        assert!(!cli.args.text);
        let cli = Cli::try_parse_from([
            "eval", "--voices", "piper", "--rates", "8000", "--filter", "fact", "--limit", "3",
            "--text",
        ])
        .unwrap();
        assert_eq!(cli.args.voices, [Voice::Piper]);
        assert_eq!(cli.args.rates, [8_000]);
        assert_eq!(cli.args.filter, Some(Kind::Fact));
        assert_eq!(cli.args.limit, Some(3));
        assert!(cli.args.text);
        assert!(Cli::try_parse_from(["eval", "--voices", "robot"]).is_err());
        assert!(
            Cli::try_parse_from(["eval", "--barge-in"])
                .unwrap()
                .args
                .barge_in
        );
        assert!(Cli::try_parse_from(["eval", "--barge-in", "--until-final"]).is_err());
    }

    #[test]
    fn summaries_count_what_they_say() {
        let item =
            |group: &str, correct: Option<bool>, reply: &str, latency: Option<u64>| ItemRecord {
                group: group.into(),
                id: "x".into(),
                kind: Kind::Fact,
                voice: Some(Voice::Espeak),
                rate: Some(16_000),
                text: "a b c d".into(),
                expect: vec![],
                ran: true,
                transcript: Some("a b c".into()),
                partials: 0,
                turns: 1,
                word_errors: Some(1),
                reference_words: 4,
                reply: reply.into(),
                reply_audio: !reply.is_empty(),
                reply_audio_s: 1.0,
                correct,
                complete_sentence: ends_complete_sentence(reply),
                no_reply: reply.is_empty(),
                latency_ms: latency,
                client_latency_ms: latency.map(|l| l as f64 + 20.0),
                server_latency: None,
                interrupted: false,
                timed_out: false,
                errors: vec![],
                pause_ms: None,
                final_ms: latency.map(|l| l as f64 - 700.0),
                cut_off: false,
                barge_in_ms: latency.map(|l| l as f64 / 10.0),
            };
        let items = [
            item("g", Some(true), "Paris.", Some(900)),
            item("g", Some(false), "The answer is", Some(1100)),
            item("g", None, "", None),
        ];
        let s = summarize("g", &items.iter().collect::<Vec<_>>());
        assert_eq!(s.wer, Some(3.0 / 12.0));
        assert_eq!((s.correct, s.checkable), (1, 2));
        assert_eq!((s.complete, s.replies), (1, 2));
        assert_eq!(s.no_reply, 1);
        assert_eq!(s.latency_source, Some("server"));
        assert_eq!(s.latency_p50_ms, Some(900.0));
        assert_eq!(s.latency_p95_ms, Some(1100.0));
        assert_eq!(s.client_latency_p50_ms, Some(920.0));
        assert_eq!(s.end_of_turn_p50_ms, Some(200.0));
        assert_eq!((s.cut_off, s.paused, s.paused_cut_off), (0, 0, 0));
        assert_eq!(s.barge_ins, 2);
        assert_eq!(
            (s.barge_in_p50_ms, s.barge_in_p95_ms),
            (Some(90.0), Some(110.0))
        );
        assert!(table(std::slice::from_ref(&s)).contains("90/110 ms"));
        // A paused item whose turn ended before its speech did is a cut-off, and its
        // (negative) figure is no end-of-turn delay.
        let cut = ItemRecord {
            pause_ms: Some(700),
            final_ms: Some(-650.0),
            cut_off: true,
            ..item("g", None, "Sure.", Some(500))
        };
        let whole = ItemRecord {
            pause_ms: Some(700),
            ..item("g", None, "Sure.", Some(1500))
        };
        let s = summarize("g", &[&cut, &whole]);
        assert_eq!((s.cut_off, s.paused, s.paused_cut_off), (1, 2, 1));
        assert_eq!(s.end_of_turn_p95_ms, Some(800.0));
        assert!(table(&[s]).contains("1/2"));
    }

    #[test]
    fn the_turn_taking_set_is_labelled() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/eval/turns.toml"),
        )
        .unwrap();
        let items = parse_prompts(&text).expect("the turn-taking set parses");
        assert!(items.len() >= 100, "{} items", items.len());
        let paused: Vec<&Prompt> = items.iter().filter(|p| p.text.contains('|')).collect();
        assert!(paused.len() >= 40, "{} with a pause", paused.len());
        assert!(
            items.len() - paused.len() >= 40,
            "finished questions and sentences"
        );
        for p in &paused {
            let ms = p.pause().as_millis();
            assert!((600..=900).contains(&ms), "{}: a {ms} ms pause", p.id);
        }
    }
}
