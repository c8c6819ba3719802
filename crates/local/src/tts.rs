//! Local speech synthesis with espeak-ng.
//!
//! espeak-ng is GPL-3.0-or-later. atlas-voice (Apache-2.0) does not link it: it runs the
//! `espeak-ng` program as a separate process per sentence and reads the WAV it writes to
//! standard output, which keeps the two programs' licences apart (see docs/architecture.md).
//! espeak-ng produces 22,050 Hz audio; the session resamples to the client's rate.

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;

use async_trait::async_trait;
use atlas_providers::ProviderError;
use atlas_providers::tts::{AudioStream, TtsProvider, TtsRequest};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::Semaphore;

/// espeak-ng's output rate.
pub const ESPEAK_RATE: u32 = 22_050;
/// Longest text handed to one synthesis.
const MAX_TEXT: usize = 2_000;

/// espeak-ng as a subprocess.
#[derive(Debug)]
pub struct Espeak {
    program: String,
    voices: HashSet<String>,
    default_voice: String,
    words_per_minute: u32,
    slots: Arc<Semaphore>,
}

impl Espeak {
    /// Checks that `program` runs and lists its voices.
    pub async fn new(
        program: &str,
        default_voice: &str,
        words_per_minute: u32,
        concurrency: usize,
    ) -> Result<Espeak, ProviderError> {
        let out = Command::new(program)
            .arg("--voices")
            .output()
            .await
            .map_err(|e| {
                ProviderError::Connect(format!(
                    "could not run {program} ({e}); install it with `apt-get install -y espeak-ng`"
                ))
            })?;
        if !out.status.success() {
            return Err(ProviderError::Connect(format!(
                "{program} --voices failed: {}",
                out.status
            )));
        }
        let voices: HashSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_lowercase))
            .collect();
        if !voices.contains(&default_voice.to_lowercase()) {
            return Err(ProviderError::Connect(format!(
                "espeak-ng has no voice {default_voice:?}"
            )));
        }
        Ok(Espeak {
            program: program.to_string(),
            voices,
            default_voice: default_voice.to_lowercase(),
            words_per_minute,
            slots: Arc::new(Semaphore::new(concurrency.max(1))),
        })
    }
}

/// Finds the PCM after a WAV header espeak-ng streams (its sizes are placeholders).
/// Returns the offset of the first sample, or `None` if more bytes are needed.
fn pcm_offset(buf: &[u8]) -> Result<Option<usize>, ProviderError> {
    if buf.len() < 12 {
        return Ok(None);
    }
    if &buf[0..4] != b"RIFF" || &buf[8..12] != b"WAVE" {
        return Err(ProviderError::Protocol(
            "espeak-ng did not write a WAV stream".into(),
        ));
    }
    let mut pos = 12;
    while pos + 8 <= buf.len() {
        let id = &buf[pos..pos + 4];
        let size =
            u32::from_le_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]) as usize;
        if id == b"data" {
            return Ok(Some(pos + 8));
        }
        if id == b"fmt " && buf.len() >= pos + 8 + 16 {
            let channels = u16::from_le_bytes([buf[pos + 10], buf[pos + 11]]);
            let rate =
                u32::from_le_bytes([buf[pos + 12], buf[pos + 13], buf[pos + 14], buf[pos + 15]]);
            let bits = u16::from_le_bytes([buf[pos + 22], buf[pos + 23]]);
            if channels != 1 || rate != ESPEAK_RATE || bits != 16 {
                return Err(ProviderError::Protocol(format!(
                    "espeak-ng wrote {channels} channel(s) of {bits}-bit audio at {rate} Hz"
                )));
            }
        }
        pos += 8 + size + (size & 1);
    }
    Ok(None)
}

#[async_trait]
impl TtsProvider for Espeak {
    fn provider(&self) -> &'static str {
        "local"
    }

    fn model(&self) -> &str {
        "espeak-ng"
    }

    fn sample_rate(&self) -> u32 {
        ESPEAK_RATE
    }

    fn has_voice(&self, voice: &str) -> bool {
        self.voices.contains(&voice.to_lowercase())
    }

    async fn synthesize(&self, request: TtsRequest) -> Result<AudioStream, ProviderError> {
        let voice = match request.voice {
            Some(v) if self.has_voice(&v) => v.to_lowercase(),
            Some(v) => {
                return Err(ProviderError::Protocol(format!(
                    "unknown espeak-ng voice {v:?}"
                )));
            }
            None => self.default_voice.clone(),
        };
        let text: String = request
            .text
            .chars()
            .filter(|c| !c.is_control() || *c == '\n')
            .take(MAX_TEXT)
            .collect();
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ProviderError::Closed("synthesiser closed".into()))?;
        let mut child = Command::new(&self.program)
            .args(["--stdout", "-b", "1", "-v", &voice, "-s"])
            .arg(self.words_per_minute.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ProviderError::Connect(format!("could not run {}: {e}", self.program)))?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = child.stdout.take().expect("piped");
        stdin
            .write_all(text.as_bytes())
            .await
            .map_err(|e| ProviderError::Closed(format!("espeak-ng input: {e}")))?;
        drop(stdin);
        let stream = crate::task_stream(16, move |tx| async move {
            let _permit = permit;
            let mut header = Vec::with_capacity(64);
            let mut buf = vec![0u8; 8192];
            let mut started = false;
            loop {
                let n = match stdout.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(ProviderError::Closed(format!("espeak-ng output: {e}"))))
                            .await;
                        return;
                    }
                };
                if n == 0 {
                    break;
                }
                let chunk = if started {
                    Bytes::copy_from_slice(&buf[..n])
                } else {
                    header.extend_from_slice(&buf[..n]);
                    match pcm_offset(&header) {
                        Ok(Some(at)) => {
                            started = true;
                            Bytes::copy_from_slice(&header[at..])
                        }
                        Ok(None) if header.len() < 4096 => continue,
                        Ok(None) => {
                            let _ = tx
                                .send(Err(ProviderError::Protocol(
                                    "no audio in espeak-ng output".into(),
                                )))
                                .await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                };
                if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            match child.wait().await {
                Ok(status) if status.success() && started => {}
                Ok(status) => {
                    let _ = tx
                        .send(Err(ProviderError::Stream {
                            kind: "espeak_failed".into(),
                            message: format!("espeak-ng exited with {status}"),
                        }))
                        .await;
                }
                Err(e) => {
                    let _ = tx.send(Err(ProviderError::Closed(e.to_string()))).await;
                }
            }
        });
        Ok(Box::pin(stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wav_header_is_skipped_and_checked() {
        let mut wav = Vec::new();
        wav.extend_from_slice(b"RIFF\xff\xff\xff\x7fWAVEfmt ");
        wav.extend_from_slice(&16u32.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes());
        wav.extend_from_slice(&1u16.to_le_bytes());
        wav.extend_from_slice(&ESPEAK_RATE.to_le_bytes());
        wav.extend_from_slice(&(ESPEAK_RATE * 2).to_le_bytes());
        wav.extend_from_slice(&2u16.to_le_bytes());
        wav.extend_from_slice(&16u16.to_le_bytes());
        assert_eq!(pcm_offset(&wav).unwrap(), None);
        wav.extend_from_slice(b"data\xff\xff\xff\x7f");
        assert_eq!(pcm_offset(&wav).unwrap(), Some(wav.len()));
        assert!(pcm_offset(b"RIFX....WAVE").is_err());
        let mut stereo = wav.clone();
        stereo[22] = 2;
        assert!(pcm_offset(&stereo).is_err());
    }
}
