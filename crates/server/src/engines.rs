//! Builds the provider adapters the configuration asks for.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;

use atlas_providers::llm::LlmProvider;
use atlas_providers::llm::anthropic::{Anthropic, AnthropicConfig};
use atlas_providers::llm::openai_compat::{OpenAiChat, OpenAiChatConfig};
use atlas_providers::stt::SttProvider;
use atlas_providers::stt::deepgram::{Deepgram, DeepgramConfig};
use atlas_providers::tts::TtsProvider;
use atlas_providers::tts::openai::{OpenAiTts, OpenAiTtsConfig};
use atlas_providers::turn::TurnProvider;

use atlas_local::llm::{Decoding, LocalLlm};
use atlas_local::models;
use atlas_local::piper::{self, PiperTts};
use atlas_local::smart_turn::{self, SmartTurn};
use atlas_local::stt::{LocalStt, PartialCadence};
use atlas_local::tts::Espeak;
use atlas_local::vad::EndpointConfig;
use atlas_local::worker::{Worker, WorkerConfig};

use crate::config::{Config, ConfigError, LlmKind, SttKind, TtsKind, TurnPolicyKind};

/// Requests the end-of-turn worker holds at least: about a second of decisions.
const TURN_QUEUE: usize = 20;

/// The engines every session uses, shared by all sessions.
#[derive(Clone)]
pub struct Engines {
    /// Speech recogniser.
    pub stt: Arc<dyn SttProvider>,
    /// Language model.
    pub llm: Arc<dyn LlmProvider>,
    /// Speech synthesiser.
    pub tts: Arc<dyn TtsProvider>,
    /// End-of-turn model (the `smart` turn policy only).
    pub turn: Option<Arc<dyn TurnProvider>>,
}

fn key(k: &Option<SecretString>) -> SecretString {
    k.clone().unwrap_or_else(|| SecretString::from(""))
}

impl Engines {
    /// Builds the adapters named by `config` (no network traffic); local engines are started
    /// and their models loaded.
    pub async fn from_config(config: &Config) -> Result<Engines, ConfigError> {
        let http = config.http_settings();
        let stt: Arc<dyn SttProvider> = match config.stt {
            SttKind::Deepgram => Arc::new(Deepgram::new(DeepgramConfig {
                base_url: config.deepgram_url.clone(),
                api_key: key(&config.deepgram_api_key),
                model: config.stt_model.clone(),
                language: config.stt_language.clone(),
                endpointing_ms: config.recogniser_endpointing_ms(),
                utterance_end_ms: config.stt_utterance_end_ms,
                connect_timeout: Duration::from_secs(config.provider_timeout_s.min(10)),
                keepalive_interval: Duration::from_secs(3),
            })),
            SttKind::Local => {
                let model = models::require(
                    &config.models_dir,
                    if config.local_stt_model == "whisper-base" {
                        "whisper-base"
                    } else {
                        "whisper-tiny.en"
                    },
                    "the local speech recognition model",
                )
                .map_err(|e| ConfigError(e.to_string()))?;
                let threads = match config.local_stt_threads {
                    0 => std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
                    n => n,
                }
                .to_string();
                let worker = start_worker(
                    config,
                    "speech recognition",
                    "atlas-voice-stt",
                    vec!["--model".into(), model.into()],
                    &["--threads", &threads],
                    0,
                )
                .await?;
                let endpoint = EndpointConfig {
                    end_silence_ms: config.recogniser_endpointing_ms().max(50),
                    ..EndpointConfig::default()
                };
                let partials = (config.local_stt_partial_ms > 0).then_some(PartialCadence {
                    first_ms: config.local_stt_partial_ms,
                    every_ms: config.local_stt_partial_ms,
                });
                Arc::new(LocalStt::new(
                    worker,
                    config.local_stt_model.clone(),
                    endpoint,
                    partials,
                ))
            }
        };
        let llm: Arc<dyn LlmProvider> = match config.llm {
            LlmKind::Anthropic => Arc::new(Anthropic::new(AnthropicConfig {
                base_url: config.anthropic_url.clone(),
                api_key: key(&config.anthropic_api_key),
                model: config.llm_model.clone(),
                http: http.clone(),
            })),
            LlmKind::Openai => Arc::new(OpenAiChat::new(OpenAiChatConfig {
                base_url: config
                    .openai_chat_url
                    .clone()
                    .unwrap_or_else(|| config.openai_url.clone()),
                api_key: config.openai_api_key.clone(),
                model: config.llm_model.clone(),
                include_usage: config.openai_include_usage,
                provider: if config.openai_chat_provider == "local" {
                    "local"
                } else {
                    "openai"
                },
                http: http.clone(),
            })),
            LlmKind::Local => {
                let model =
                    models::require(&config.models_dir, "smollm2", "the local language model")
                        .map_err(|e| ConfigError(e.to_string()))?;
                let sentences = config.local_max_sentences.to_string();
                let threads = config.local_llm_threads.max(1).to_string();
                let worker = start_worker(
                    config,
                    "language model",
                    "atlas-voice-llm",
                    vec!["--model".into(), model.into()],
                    &["--sentences", &sentences, "--threads", &threads],
                    config.local_llm_nice,
                )
                .await?;
                Arc::new(LocalLlm::new(
                    worker,
                    "smollm2",
                    Decoding {
                        system: Some(config.local_system_prompt.clone()),
                        max_tokens: config.local_max_tokens,
                        soft_max_tokens: config.local_soft_max_tokens,
                        temperature: config.local_temperature,
                        repeat_penalty: config.local_repeat_penalty,
                    },
                ))
            }
        };
        let tts: Arc<dyn TtsProvider> = match config.tts {
            TtsKind::Openai => Arc::new(OpenAiTts::new(OpenAiTtsConfig {
                base_url: config.openai_url.clone(),
                api_key: key(&config.openai_api_key),
                model: config.tts_model.clone(),
                voice: config.tts_voice.clone(),
                http,
            })),
            TtsKind::Local if config.local_tts_model == "espeak-ng" => Arc::new(
                Espeak::new(
                    "espeak-ng",
                    &config.local_tts_voice,
                    config.local_tts_wpm,
                    4,
                )
                .await
                .map_err(|e| ConfigError(format!("local speech synthesis: {e}")))?,
            ),
            TtsKind::Local => {
                let args = piper::worker_args(&config.models_dir)
                    .map_err(|e| ConfigError(e.to_string()))?;
                let threads = config.local_tts_threads.to_string();
                let worker = start_worker(
                    config,
                    "speech synthesis",
                    "atlas-voice-tts",
                    args,
                    &["--threads", &threads],
                    0,
                )
                .await?;
                Arc::new(PiperTts::new(worker, config.local_tts_model.clone()))
            }
        };
        let turn: Option<Arc<dyn TurnProvider>> = match config.turn_policy {
            TurnPolicyKind::Silence => None,
            TurnPolicyKind::Smart => {
                let args = smart_turn::worker_args(&config.models_dir)
                    .map_err(|e| ConfigError(e.to_string()))?;
                // One thread: a decision takes ~50 ms of one core, and the recogniser and the
                // model need the others at the same moment. A longer queue than the other
                // engines': sessions that stop speaking together all ask at once, and a
                // decision that waits up to a second still ends a turn before the maximum
                // silence would (docs/benchmarks.md).
                let config = Config {
                    local_queue: config.local_queue.max(TURN_QUEUE),
                    ..config.clone()
                };
                let worker = start_worker(
                    &config,
                    "end-of-turn",
                    "atlas-voice-turn",
                    args,
                    &["--threads", "1"],
                    0,
                )
                .await?;
                Some(Arc::new(SmartTurn::new(worker)))
            }
        };
        Ok(Engines {
            stt,
            llm,
            tts,
            turn,
        })
    }
}

/// Where the engine worker binaries are: `ATLAS_ENGINE_DIR`, else next to this program (or
/// one level up, for test binaries in `target/*/deps`).
fn engine_program(config: &Config, name: &str) -> Result<std::path::PathBuf, ConfigError> {
    let mut dirs = Vec::new();
    if let Some(dir) = &config.engine_dir {
        dirs.push(dir.clone());
    } else if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        dirs.push(dir.clone());
        if let Some(parent) = dir.parent() {
            dirs.push(parent.to_path_buf());
        }
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ConfigError(format!(
                "the engine worker {name} is not in {}; build it with `cargo build --release` \
                 (or point ATLAS_ENGINE_DIR at it)",
                dirs.first()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            ))
        })
}

/// Starts an engine worker: `args` are the model's (`--model FILE`, …), `extra` the
/// settings after them, `nice` how much lower than the server it is scheduled.
async fn start_worker(
    config: &Config,
    name: &'static str,
    program: &str,
    mut args: Vec<std::ffi::OsString>,
    extra: &[&str],
    nice: i32,
) -> Result<Arc<Worker>, ConfigError> {
    args.extend(extra.iter().map(Into::into));
    Worker::start(WorkerConfig {
        name,
        program: engine_program(config, program)?,
        args,
        queue: config.local_queue,
        start_timeout: Duration::from_secs(120),
        nice,
    })
    .await
    .map_err(|e| ConfigError(format!("starting the local {name} engine: {e}")))
}
