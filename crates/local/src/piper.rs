//! Local neural speech synthesis: a Piper voice (VITS, ONNX) in the synthesis worker.
//!
//! The worker (`atlas-voice-tts`) loads the voice once with ONNX Runtime, turns each request's
//! text into phonemes with the `espeak-ng` program and streams 16-bit PCM at the voice's rate,
//! one sentence per frame. The session resamples to the client's rate.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use async_trait::async_trait;
use atlas_providers::ProviderError;
use atlas_providers::tts::{AudioStream, TtsProvider, TtsRequest};
use bytes::Bytes;
use serde::Deserialize;

use crate::ipc::{Reply, Request};
use crate::worker::Worker;

/// The voice's output rate (`audio.sample_rate` in its `.onnx.json`).
pub const PIPER_RATE: u32 = 22_050;
/// Longest text handed to one synthesis.
const MAX_TEXT: usize = 2_000;
/// The voice's name, as clients may ask for it in `session.start`.
pub const VOICE: &str = "joe";

/// A Piper voice behind the synthesis worker.
#[derive(Debug)]
pub struct PiperTts {
    worker: Arc<Worker>,
    model: String,
}

impl PiperTts {
    /// An adapter over a started synthesis worker.
    pub fn new(worker: Arc<Worker>, model: impl Into<String>) -> Self {
        PiperTts {
            worker,
            model: model.into(),
        }
    }
}

#[async_trait]
impl TtsProvider for PiperTts {
    local_identity!();

    fn sample_rate(&self) -> u32 {
        PIPER_RATE
    }

    fn has_voice(&self, voice: &str) -> bool {
        voice.eq_ignore_ascii_case(VOICE) || voice.eq_ignore_ascii_case("en_US-joe-medium")
    }

    async fn synthesize(&self, request: TtsRequest) -> Result<AudioStream, ProviderError> {
        if let Some(v) = request.voice.as_deref().filter(|v| !self.has_voice(v)) {
            return Err(ProviderError::Protocol(format!(
                "unknown local voice {v:?} (the neural voice is {VOICE:?})"
            )));
        }
        let text: String = request
            .text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(MAX_TEXT)
            .collect();
        let mut ticket = self
            .worker
            .submit(|id| Request::Synthesize { id, text }, &[])
            .await?;
        Ok(Box::pin(crate::task_stream(8, move |tx| async move {
            loop {
                let (chunk, last) = match ticket.next().await {
                    Ok(Reply::Audio { pcm, last, .. }) => (Ok(Bytes::from(pcm)), last),
                    Ok(Reply::Failed { message, .. }) => (
                        Err(ProviderError::Stream {
                            kind: "synthesis_failed".into(),
                            message,
                        }),
                        true,
                    ),
                    Ok(other) => (
                        Err(ProviderError::Protocol(format!(
                            "unexpected reply {other:?}"
                        ))),
                        true,
                    ),
                    Err(e) => (Err(e), true),
                };
                let empty = matches!(&chunk, Ok(b) if b.is_empty());
                if (!empty && tx.send(chunk).await.is_err()) || last {
                    return;
                }
            }
        })))
    }
}

/// The synthesis worker's arguments for the fetched voice and runtime under `models_dir`.
pub fn worker_args(
    models_dir: &std::path::Path,
) -> Result<Vec<std::ffi::OsString>, crate::models::ModelError> {
    crate::models::onnx_worker_args(models_dir, "piper-joe", "the neural voice")
}

/// The parts of a Piper voice's configuration (`<voice>.onnx.json`) synthesis uses.
#[derive(Clone, Debug, Deserialize)]
pub struct VoiceConfig {
    /// Output format.
    pub audio: AudioConfig,
    /// The espeak-ng voice that makes the phonemes.
    pub espeak: EspeakConfig,
    /// The model's default scales.
    pub inference: InferenceConfig,
    /// Phoneme (one character) → model input ids.
    pub phoneme_id_map: HashMap<String, Vec<i64>>,
}

/// `audio` in a voice's configuration.
#[derive(Clone, Debug, Deserialize)]
pub struct AudioConfig {
    /// Output rate in Hz.
    pub sample_rate: u32,
}

/// `espeak` in a voice's configuration.
#[derive(Clone, Debug, Deserialize)]
pub struct EspeakConfig {
    /// espeak-ng voice name (`en-us`).
    pub voice: String,
}

/// `inference` in a voice's configuration.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct InferenceConfig {
    /// Variation of the voice.
    pub noise_scale: f32,
    /// Speaking time: above 1 slower, below 1 faster.
    pub length_scale: f32,
    /// Variation of phoneme durations.
    pub noise_w: f32,
}

const BOS: &str = "^";
const EOS: &str = "$";
const PAD: &str = "_";

impl VoiceConfig {
    /// The model's input for a phoneme string, as Piper builds it: start, then each known
    /// phoneme followed by the pad, then end. Unknown characters are skipped.
    pub fn ids(&self, phonemes: &str) -> Vec<i64> {
        let map = &self.phoneme_id_map;
        let pad = map.get(PAD).map(Vec::as_slice).unwrap_or(&[]);
        let mut ids = Vec::with_capacity(phonemes.len() * 2 + 4);
        ids.extend(map.get(BOS).into_iter().flatten());
        ids.extend(pad);
        let mut buf = [0u8; 4];
        for c in phonemes.chars() {
            if let Some(id) = map.get(&*c.encode_utf8(&mut buf)) {
                ids.extend(id);
                ids.extend(pad);
            }
        }
        ids.extend(map.get(EOS).into_iter().flatten());
        ids
    }
}

/// Punctuation that ends a clause when followed by a space or the end of the text (so
/// "3.5" is not a clause end).
fn clause_marks(text: &str) -> Vec<char> {
    let mut marks = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if matches!(c, ',' | '.' | ';' | ':' | '!' | '?')
            && chars.peek().is_none_or(|n| n.is_whitespace())
        {
            // Of a run ("...", "?!") only the last counts.
            marks.push(c);
        }
    }
    marks
}

/// Joins espeak-ng's phoneme lines (one per clause) and puts back the clause punctuation it
/// drops, which the voice uses for intonation and pauses: "həlˈoʊ, wˈɜːld.". When the clauses
/// cannot be matched to the marks, only the text's final mark is kept.
pub fn with_punctuation(text: &str, lines: &[&str]) -> String {
    let lines: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let marks = clause_marks(text);
    let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 2).sum());
    let matched = marks.len() == lines.len() || marks.len() + 1 == lines.len();
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(line);
        if matched && let Some(m) = marks.get(i) {
            out.push(*m);
        }
    }
    if !matched && let Some(m) = marks.last().filter(|_| !out.is_empty()) {
        out.push(*m);
    }
    out
}

/// Phonemes for `text` in espeak-ng's IPA, from the `espeak-ng` program (run as a separate
/// process: espeak-ng is GPL-3.0-or-later and atlas-voice does not link it). The text goes
/// in on standard input, so nothing in it is read as an option.
pub fn phonemize(program: &str, voice: &str, text: &str) -> std::io::Result<String> {
    let mut child = Command::new(program)
        .args(["-q", "--ipa", "-v", voice])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = text.to_string();
    // Written from a thread so a large text cannot deadlock against a full output pipe.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| std::io::Error::other("espeak-ng input thread panicked"))??;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "{program} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    Ok(with_punctuation(text, &lines))
}

/// The model's float output as 16-bit PCM, peak-normalised as Piper does (quiet output is
/// not amplified more than a fixed gain).
pub fn to_pcm(audio: &[f32]) -> Vec<u8> {
    let peak = audio.iter().fold(0f32, |m, s| m.max(s.abs())).max(0.01);
    let gain = 32_767.0 * 0.95 / peak;
    let mut out = Vec::with_capacity(audio.len() * 2);
    for s in audio {
        let v = (s * gain).clamp(-32_768.0, 32_767.0) as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VoiceConfig {
        serde_json::from_str(
            r#"{"audio":{"sample_rate":22050},"espeak":{"voice":"en-us"},
               "inference":{"noise_scale":0.667,"length_scale":1,"noise_w":0.8},
               "phoneme_id_map":{"_":[0],"^":[1],"$":[2]," ":[3],",":[8],"h":[20],"ə":[59],"ˈ":[120]}}"#,
        )
        .unwrap()
    }

    #[test]
    fn ids_are_framed_and_padded_like_piper() {
        let c = config();
        assert_eq!(c.ids("hə"), vec![1, 0, 20, 0, 59, 0, 2]);
        // Unknown characters are skipped, spaces and marks kept.
        assert_eq!(
            c.ids("hX, ˈh"),
            vec![1, 0, 20, 0, 8, 0, 3, 0, 120, 0, 20, 0, 2]
        );
        assert_eq!(c.ids(""), vec![1, 0, 2]);
    }

    #[test]
    fn clause_punctuation_is_put_back() {
        assert_eq!(
            with_punctuation("Hello, world.", &["həlˈoʊ", " wˈɜːld"]),
            "həlˈoʊ, wˈɜːld."
        );
        assert_eq!(
            with_punctuation(
                "Is it 3.5 hours? Yes!",
                &["ɪz ɪt θɹˈiː pɔɪnt fˈaɪv ˈaʊɚz", "jˈɛs"]
            ),
            "ɪz ɪt θɹˈiː pɔɪnt fˈaɪv ˈaʊɚz? jˈɛs!"
        );
        // No final mark: the clauses still get theirs.
        assert_eq!(
            with_punctuation("Well, ok", &["wˈɛl", "ˈoʊkˈeɪ"]),
            "wˈɛl, ˈoʊkˈeɪ"
        );
        // espeak-ng split a long clause: only the final mark is kept.
        assert_eq!(
            with_punctuation("a b c.", &["ɐ", "bˈiː", "sˈiː"]),
            "ɐ bˈiː sˈiː."
        );
        assert_eq!(
            with_punctuation("Wait... what?!", &["wˈeɪt", "wˌʌt"]),
            "wˈeɪt. wˌʌt!"
        );
    }

    #[test]
    fn pcm_is_peak_normalised_without_clipping() {
        let pcm = to_pcm(&[0.0, 0.5, -0.5, 0.25]);
        let s: Vec<i16> = pcm
            .chunks(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        assert_eq!(s[0], 0);
        assert_eq!(s[1], 31_128);
        assert_eq!(s[2], -31_128);
        assert_eq!(s[3], 15_564);
        // Silence stays silence (no division blow-up).
        assert!(to_pcm(&[0.0; 4]).iter().all(|b| *b == 0));
    }
}
