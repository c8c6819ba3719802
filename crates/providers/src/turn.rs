//! End of turn: the [`TurnProvider`] trait, the fourth kind of engine beside recognition,
//! language and synthesis. It judges from the sound of the person's last seconds (pitch,
//! rhythm, how the words trail off) whether they finished what they were saying; the turn
//! policy of the session machine asks it at each pause (`atlas_core::turns`).

use async_trait::async_trait;

use crate::ProviderError;

/// The sample rate end-of-turn models take.
pub const TURN_RATE: u32 = 16_000;

/// An end-of-turn model.
#[async_trait]
pub trait TurnProvider: Send + Sync + 'static {
    /// Provider label for metrics and logs (`local`).
    fn provider(&self) -> &'static str;

    /// Model identifier.
    fn model(&self) -> &str;

    /// The probability that `pcm` (16 kHz mono, the person's audio up to now; models look at
    /// its last seconds) ends a finished turn.
    async fn score(&self, pcm: &[i16]) -> Result<f32, ProviderError>;
}
