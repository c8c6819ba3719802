//! OpenAI speech: `POST {base}/audio/speech` with `response_format: "pcm"`, which returns raw
//! 24 kHz 16-bit little-endian mono PCM in a chunked body.

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

use super::{AudioStream, TtsProvider, TtsRequest};
use crate::http::Endpoint;
use crate::{HttpSettings, ProviderError};

/// Sample rate of OpenAI's `pcm` format.
pub const PCM_RATE: u32 = 24_000;
/// Longest input the endpoint accepts, in characters.
pub const MAX_INPUT_CHARS: usize = 4096;
/// Voices the endpoint offers.
pub const VOICES: [&str; 11] = [
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
];

/// Settings of the OpenAI speech adapter.
#[derive(Clone, Debug)]
pub struct OpenAiTtsConfig {
    /// Base URL as the official SDKs take it (`https://api.openai.com/v1`).
    pub base_url: String,
    /// API key.
    pub api_key: SecretString,
    /// Model id (`tts-1`, `tts-1-hd`, `gpt-4o-mini-tts`).
    pub model: String,
    /// Default voice.
    pub voice: String,
    /// Timeouts and retries.
    pub http: HttpSettings,
}

/// The OpenAI speech adapter.
pub struct OpenAiTts {
    config: OpenAiTtsConfig,
    endpoint: Endpoint,
}

impl OpenAiTts {
    /// Builds the adapter (no network traffic).
    pub fn new(config: OpenAiTtsConfig) -> Self {
        let endpoint = Endpoint::new(
            &config.http,
            &config.base_url,
            "/audio/speech",
            "openai.speech",
            parse_error,
        );
        OpenAiTts { config, endpoint }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    input: &'a str,
    voice: &'a str,
    response_format: &'static str,
}

fn parse_error(v: &serde_json::Value) -> Option<(String, String)> {
    let e = v.get("error")?;
    let kind = e.get("type").and_then(|t| t.as_str()).unwrap_or("error");
    let message = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
    Some((kind.to_owned(), message.to_owned()))
}

#[async_trait]
impl TtsProvider for OpenAiTts {
    fn provider(&self) -> &'static str {
        "openai"
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    fn sample_rate(&self) -> u32 {
        PCM_RATE
    }

    fn has_voice(&self, voice: &str) -> bool {
        VOICES.contains(&voice)
    }

    async fn synthesize(&self, request: TtsRequest) -> Result<AudioStream, ProviderError> {
        let input: &str = match request.text.char_indices().nth(MAX_INPUT_CHARS) {
            Some((i, _)) => &request.text[..i],
            None => &request.text,
        };
        let body = Body {
            model: &self.config.model,
            input,
            voice: request.voice.as_deref().unwrap_or(&self.config.voice),
            response_format: "pcm",
        };
        let audio = self
            .endpoint
            .post_json(&body, |post| {
                post.bearer_auth(self.config.api_key.expose_secret())
            })
            .await?;
        Ok(Box::pin(audio))
    }
}
