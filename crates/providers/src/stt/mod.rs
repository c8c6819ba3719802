//! Speech recognition: the [`SttProvider`] trait and its adapters.

pub mod deepgram;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::ProviderError;

/// What the recogniser should expect.
#[derive(Clone, Debug)]
pub struct SttOptions {
    /// Sample rate of the 16-bit mono PCM that will be sent.
    pub sample_rate: u32,
    /// BCP-47 language, provider default when `None`.
    pub language: Option<String>,
}

/// Commands to a recognition stream.
#[derive(Debug)]
pub enum SttCommand {
    /// 16-bit little-endian mono PCM at the stream's sample rate.
    Audio(Bytes),
    /// Finalise what has been heard so far (push-to-talk).
    Finalize,
    /// Flush and close.
    Close,
}

/// Results from a recognition stream. Times are seconds of stream audio.
#[derive(Clone, Debug, PartialEq)]
pub enum SttEvent {
    /// Interim hypothesis of the words not yet final.
    Partial {
        /// Text.
        text: String,
    },
    /// Final transcript of a stretch of audio.
    Final {
        /// Text (may be empty).
        text: String,
        /// The provider's endpointing says the utterance ended.
        speech_final: bool,
        /// Produced by a `Finalize` command.
        from_finalize: bool,
        /// End of the last word, if the provider says.
        speech_end_s: Option<f64>,
    },
    /// A gap after the last word (end of utterance).
    UtteranceEnd {
        /// End of the last word, if the provider says.
        last_word_end_s: Option<f64>,
    },
    /// Voice activity began.
    SpeechStarted {
        /// Where, if the provider says.
        at_s: Option<f64>,
    },
    /// The recogniser's own detector ended the utterance here, and its final transcript
    /// follows (a recogniser that transcribes after cutting, like the local one).
    SpeechEnded {
        /// Where the speech ended.
        at_s: Option<f64>,
    },
}

/// An open recognition stream. Dropping `commands` closes it; `events` ends when the stream
/// is over, after an `Err` if it failed.
#[derive(Debug)]
pub struct SttStream {
    /// Audio and control in.
    pub commands: mpsc::Sender<SttCommand>,
    /// Results out.
    pub events: mpsc::Receiver<Result<SttEvent, ProviderError>>,
}

/// A streaming speech recogniser.
#[async_trait]
pub trait SttProvider: Send + Sync + 'static {
    /// Provider name for the price catalog and metrics.
    fn provider(&self) -> &'static str;
    /// Model id.
    fn model(&self) -> &str;
    /// The sample rate to send for a client sending `client_rate` (resampled if different).
    fn input_rate(&self, client_rate: u32) -> u32;
    /// Whether it sends interim transcripts ([`SttEvent::Partial`]) soon enough after speech
    /// starts (a few hundred milliseconds) for a barge-in to wait for the first words.
    fn partials(&self) -> bool {
        true
    }
    /// Opens a stream.
    async fn connect(&self, options: SttOptions) -> Result<SttStream, ProviderError>;
}
