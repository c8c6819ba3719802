//! The speech synthesis worker: loads a Piper voice once with ONNX Runtime and speaks the
//! texts the server sends over standard input (see `atlas_local::ipc`), one PCM frame per
//! sentence. Phonemes come from the `espeak-ng` program. Exits when its input closes.

use std::path::PathBuf;

use anyhow::{Context, bail};
use atlas_core::splitter::{SentenceSplitter, SplitterConfig};
use atlas_local::ipc::{self, Reply, Request};
use atlas_local::onnx::{Onnx, OnnxOptions};
use atlas_local::piper::{self, VoiceConfig};
use ort::value::Tensor;

struct Args {
    onnx: OnnxOptions,
    espeak: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut onnx = OnnxOptions::default();
    let mut espeak = "espeak-ng".to_string();
    ipc::parse_options(
        "atlas-voice-tts --model VOICE.onnx --runtime libonnxruntime.so [--threads N] \
         [--espeak PROGRAM]",
        |arg, value| {
            if arg == "--espeak" {
                espeak = value()?;
                return Ok(true);
            }
            onnx.take(arg, value)
        },
    )?;
    Ok(Args { onnx, espeak })
}

struct Voice {
    onnx: Onnx,
    config: VoiceConfig,
    espeak: String,
}

impl Voice {
    /// One sentence as 16-bit PCM.
    fn speak(&mut self, sentence: &str) -> anyhow::Result<Vec<u8>> {
        let phonemes = piper::phonemize(&self.espeak, &self.config.espeak.voice, sentence)
            .context("phonemes from espeak-ng")?;
        let ids = self.config.ids(&phonemes);
        if ids.len() <= 3 {
            return Ok(Vec::new());
        }
        let n = ids.len() as i64;
        let scales = self.config.inference;
        let outputs = self.onnx.session.run(ort::inputs![
            "input" => Tensor::from_array((vec![1i64, n], ids))?,
            "input_lengths" => Tensor::from_array((vec![1i64], vec![n]))?,
            "scales" => Tensor::from_array((
                vec![3i64],
                vec![scales.noise_scale, scales.length_scale, scales.noise_w],
            ))?,
        ])?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>()?;
        Ok(piper::to_pcm(audio))
    }
}

/// Cuts a request's text into sentences (long ones at clauses), each synthesised and sent on
/// its own so playback starts after the first.
fn sentences(text: &str) -> Vec<String> {
    let mut splitter = SentenceSplitter::new(SplitterConfig {
        first_clause_min_chars: 120,
        clause_min_chars: 120,
        max_chars: 300,
        ..SplitterConfig::default()
    });
    let mut out = Vec::new();
    splitter.push(text, std::time::Instant::now(), &mut out);
    out.extend(splitter.finish());
    out
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let model = args.onnx.model()?.to_path_buf();
    ipc::check_fetched("voice", &model)?;
    let config_path = PathBuf::from(format!("{}.json", model.display()));
    let config: VoiceConfig =
        serde_json::from_slice(&std::fs::read(&config_path).with_context(|| {
            format!("reading the voice configuration {}", config_path.display())
        })?)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    if config.audio.sample_rate != piper::PIPER_RATE {
        bail!(
            "the voice speaks at {} Hz; this worker serves {} Hz voices",
            config.audio.sample_rate,
            piper::PIPER_RATE
        );
    }
    // Check espeak-ng before the slow model load, with a clear message.
    piper::phonemize(&args.espeak, &config.espeak.voice, "ok").with_context(|| {
        format!(
            "running {} (install it with `apt-get install -y espeak-ng`)",
            args.espeak
        )
    })?;
    let mut voice = Voice {
        onnx: args.onnx.load("atlas-voice-tts", "voice")?,
        config,
        espeak: args.espeak.clone(),
    };
    // The first run allocates ONNX Runtime's buffers; do it before the first session waits.
    voice.speak("Ready.").context("a first synthesis")?;
    ipc::reply(&Reply::Ready {
        model: format!(
            "piper {} ({} Hz, {} thread(s))",
            voice.onnx.model_name(),
            piper::PIPER_RATE,
            voice.onnx.threads
        ),
    })?;

    let (requests, cancelled) = ipc::spawn_stdin_reader();
    for (request, _) in requests {
        let Request::Synthesize { id, text } = request else {
            continue;
        };
        let is_cancelled = || cancelled.lock().expect("cancel lock").contains(&id);
        let parts = sentences(&text);
        let mut result = Ok(());
        if parts.is_empty() {
            result = ipc::reply(&Reply::Audio {
                id,
                last: true,
                pcm: Vec::new(),
            })
            .map_err(Into::into);
        }
        for (i, sentence) in parts.iter().enumerate() {
            if is_cancelled() {
                break;
            }
            result = voice.speak(sentence).and_then(|pcm| {
                ipc::reply(&Reply::Audio {
                    id,
                    last: i + 1 == parts.len(),
                    pcm,
                })
                .map_err(Into::into)
            });
            if result.is_err() {
                break;
            }
        }
        cancelled.lock().expect("cancel lock").remove(&id);
        if let Err(e) = result {
            ipc::reply(&Reply::Failed {
                id,
                message: format!("{e:#}"),
            })?;
        }
    }
    Ok(())
}
