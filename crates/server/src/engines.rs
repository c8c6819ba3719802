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

use crate::config::{Config, ConfigError, LlmKind, SttKind, TtsKind};

/// The three engines every session uses, shared by all sessions.
#[derive(Clone)]
pub struct Engines {
    /// Speech recogniser.
    pub stt: Arc<dyn SttProvider>,
    /// Language model.
    pub llm: Arc<dyn LlmProvider>,
    /// Speech synthesiser.
    pub tts: Arc<dyn TtsProvider>,
}

const LOCAL_UNAVAILABLE: &str = "the local engines are not part of this build yet; choose cloud \
    providers (ATLAS_STT=deepgram, ATLAS_LLM=anthropic or openai, ATLAS_TTS=openai) or run \
    `atlas-voice serve --fakes` to try the server against the built-in provider fakes";

fn key(k: &Option<SecretString>) -> SecretString {
    k.clone().unwrap_or_else(|| SecretString::from(""))
}

impl Engines {
    /// Builds the adapters named by `config` (no network traffic).
    pub fn from_config(config: &Config) -> Result<Engines, ConfigError> {
        let http = config.http_settings();
        let stt: Arc<dyn SttProvider> = match config.stt {
            SttKind::Deepgram => Arc::new(Deepgram::new(DeepgramConfig {
                base_url: config.deepgram_url.clone(),
                api_key: key(&config.deepgram_api_key),
                model: config.stt_model.clone(),
                language: config.stt_language.clone(),
                endpointing_ms: config.stt_endpointing_ms,
                utterance_end_ms: config.stt_utterance_end_ms,
                connect_timeout: Duration::from_secs(config.provider_timeout_s.min(10)),
                keepalive_interval: Duration::from_secs(3),
            })),
            SttKind::Local => return Err(ConfigError(LOCAL_UNAVAILABLE.into())),
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
                provider: "openai",
                http: http.clone(),
            })),
            LlmKind::Local => return Err(ConfigError(LOCAL_UNAVAILABLE.into())),
        };
        let tts: Arc<dyn TtsProvider> = match config.tts {
            TtsKind::Openai => Arc::new(OpenAiTts::new(OpenAiTtsConfig {
                base_url: config.openai_url.clone(),
                api_key: key(&config.openai_api_key),
                model: config.tts_model.clone(),
                voice: config.tts_voice.clone(),
                http,
            })),
            TtsKind::Local => return Err(ConfigError(LOCAL_UNAVAILABLE.into())),
        };
        Ok(Engines { stt, llm, tts })
    }
}
