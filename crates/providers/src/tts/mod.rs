//! Speech synthesis: the [`TtsProvider`] trait and its adapters.

pub mod openai;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::ProviderError;

/// One synthesis request (a sentence or clause).
#[derive(Clone, Debug)]
pub struct TtsRequest {
    /// Text to speak.
    pub text: String,
    /// Voice; the adapter's default when `None`.
    pub voice: Option<String>,
}

/// Raw 16-bit little-endian mono PCM at [`TtsProvider::sample_rate`]. Chunk boundaries are
/// arbitrary and may split a sample. Dropping the stream aborts the request.
pub type AudioStream = BoxStream<'static, Result<Bytes, ProviderError>>;

/// A streaming speech synthesiser.
#[async_trait]
pub trait TtsProvider: Send + Sync + 'static {
    /// Provider name for the price catalog and metrics.
    fn provider(&self) -> &'static str;
    /// Model id.
    fn model(&self) -> &str;
    /// Sample rate of the audio it returns.
    fn sample_rate(&self) -> u32;
    /// Whether `voice` is one this provider offers.
    fn has_voice(&self, voice: &str) -> bool;
    /// Starts synthesis. Retries happen here, before the stream is returned.
    async fn synthesize(&self, request: TtsRequest) -> Result<AudioStream, ProviderError>;
}
