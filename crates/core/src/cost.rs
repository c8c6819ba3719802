//! Cost arithmetic in integer micro-dollars, and the budget rule.
//!
//! Costs are always computed from usage *totals* times unit prices, rounded once, so repeated
//! updates never accumulate rounding drift. A price that is unknown makes the cost unknown
//! (`None`), never zero.

/// Micro-dollars (1e-6 USD).
pub type Micros = u64;

/// Unit prices of the engines one session uses, in micro-dollars.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prices {
    /// Speech recognition, per minute of audio streamed.
    pub stt_per_minute: Option<Micros>,
    /// LLM input, per million tokens.
    pub llm_input_per_mtok: Option<Micros>,
    /// LLM output, per million tokens.
    pub llm_output_per_mtok: Option<Micros>,
    /// LLM input read from the prompt cache, per million tokens (input price when unset).
    pub llm_cache_read_per_mtok: Option<Micros>,
    /// LLM input written to the prompt cache, per million tokens (input price when unset).
    pub llm_cache_write_per_mtok: Option<Micros>,
    /// Speech synthesis, per million characters.
    pub tts_per_mchar: Option<Micros>,
}

/// What a session used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Consumption {
    /// Audio streamed to recognition, in milliseconds.
    pub stt_ms: u64,
    /// LLM input tokens (uncached).
    pub llm_input_tokens: u64,
    /// LLM output tokens.
    pub llm_output_tokens: u64,
    /// LLM input tokens read from the cache.
    pub llm_cache_read_tokens: u64,
    /// LLM input tokens written to the cache.
    pub llm_cache_write_tokens: u64,
    /// Characters synthesised.
    pub tts_chars: u64,
}

/// Cost per stage and in total; `None` where a price is unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    /// Recognition.
    pub stt: Option<Micros>,
    /// Language model.
    pub llm: Option<Micros>,
    /// Synthesis.
    pub tts: Option<Micros>,
    /// Sum, unknown if any part is.
    pub total: Option<Micros>,
}

/// `amount × price / per`, rounded half up, without overflow.
fn scaled(amount: u64, price: Micros, per: u64) -> Micros {
    let n = u128::from(amount) * u128::from(price);
    let per = u128::from(per);
    u64::try_from((n + per / 2) / per).unwrap_or(u64::MAX)
}

impl Prices {
    /// The cost of `used`.
    pub fn cost(&self, used: &Consumption) -> Cost {
        let stt = self.stt_per_minute.map(|p| scaled(used.stt_ms, p, 60_000));
        let llm = match (self.llm_input_per_mtok, self.llm_output_per_mtok) {
            (Some(input), Some(output)) => {
                let read = self.llm_cache_read_per_mtok.unwrap_or(input);
                let write = self.llm_cache_write_per_mtok.unwrap_or(input);
                let total = u128::from(used.llm_input_tokens) * u128::from(input)
                    + u128::from(used.llm_output_tokens) * u128::from(output)
                    + u128::from(used.llm_cache_read_tokens) * u128::from(read)
                    + u128::from(used.llm_cache_write_tokens) * u128::from(write);
                Some(u64::try_from((total + 500_000) / 1_000_000).unwrap_or(u64::MAX))
            }
            _ => None,
        };
        let tts = self
            .tts_per_mchar
            .map(|p| scaled(used.tts_chars, p, 1_000_000));
        let total = match (stt, llm, tts) {
            (Some(a), Some(b), Some(c)) => Some(a.saturating_add(b).saturating_add(c)),
            _ => None,
        };
        Cost {
            stt,
            llm,
            tts,
            total,
        }
    }

    /// An upper estimate of one more reply: `input_tokens` of prompt, up to `max_tokens` of
    /// output, and four characters of speech per output token.
    pub fn reply_estimate(&self, input_tokens: u64, max_tokens: u64) -> Option<Micros> {
        let c = self.cost(&Consumption {
            llm_input_tokens: input_tokens,
            llm_output_tokens: max_tokens,
            tts_chars: max_tokens * 4,
            ..Consumption::default()
        });
        Some(c.llm?.saturating_add(c.tts?))
    }
}

/// What the budget says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetState {
    /// Within budget.
    Ok,
    /// Crossed the warning fraction (reported once).
    Warn,
    /// Spent, or the next piece of work would overspend: stop.
    Exhausted,
}

/// A spending limit with a one-time warning.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// The limit; `None` is unlimited.
    limit: Option<Micros>,
    /// Spend at which to warn.
    warn_at: Micros,
    warned: bool,
}

impl Budget {
    /// A budget of `limit` that warns at `warn_fraction` of it.
    pub fn new(limit: Option<Micros>, warn_fraction: f64) -> Self {
        let warn_at = limit
            .map(|l| (l as f64 * warn_fraction.clamp(0.0, 1.0)).round() as Micros)
            .unwrap_or(Micros::MAX);
        Budget {
            limit,
            warn_at,
            warned: false,
        }
    }

    /// The limit.
    pub fn limit(&self) -> Option<Micros> {
        self.limit
    }

    /// Whether the warning was given.
    pub fn warned(&self) -> bool {
        self.warned
    }

    /// Records that the warning was given already (a session continued elsewhere).
    pub fn mark_warned(&mut self) {
        self.warned = true;
    }

    /// Checks `spent` (and, before starting work, `spent + next`).
    pub fn check(&mut self, spent: Micros, next: Micros) -> BudgetState {
        let Some(limit) = self.limit else {
            return BudgetState::Ok;
        };
        if spent >= limit || spent.saturating_add(next) > limit {
            return BudgetState::Exhausted;
        }
        if !self.warned && spent >= self.warn_at {
            self.warned = true;
            return BudgetState::Warn;
        }
        BudgetState::Ok
    }
}

/// Dollars for display (never used for arithmetic).
pub fn to_usd(m: Micros) -> f64 {
    m as f64 / 1_000_000.0
}

/// Micro-dollars from a dollar amount in configuration.
pub fn from_usd(usd: f64) -> Micros {
    (usd * 1_000_000.0).round().max(0.0) as Micros
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Prices {
        Prices {
            stt_per_minute: Some(4_300),          // Deepgram $0.0043/min
            llm_input_per_mtok: Some(250_000),    // Claude 3 Haiku $0.25/MTok
            llm_output_per_mtok: Some(1_250_000), // $1.25/MTok
            llm_cache_read_per_mtok: Some(30_000),
            llm_cache_write_per_mtok: None,
            tts_per_mchar: Some(15_000_000), // tts-1 $15/MChar
        }
    }

    #[test]
    fn seed_prices() {
        let c = reference().cost(&Consumption {
            stt_ms: 60_000,
            llm_input_tokens: 1_000_000,
            llm_output_tokens: 1_000_000,
            llm_cache_read_tokens: 1_000_000,
            llm_cache_write_tokens: 0,
            tts_chars: 1_000_000,
        });
        assert_eq!(c.stt, Some(4_300));
        assert_eq!(c.llm, Some(250_000 + 1_250_000 + 30_000));
        assert_eq!(c.tts, Some(15_000_000));
        assert_eq!(c.total, Some(4_300 + 1_530_000 + 15_000_000));
    }

    #[test]
    fn no_drift_from_many_small_updates() {
        // 12.4 s of audio, 830 in / 64 out tokens, 170 characters: computed from totals.
        let c = reference().cost(&Consumption {
            stt_ms: 12_400,
            llm_input_tokens: 830,
            llm_output_tokens: 64,
            tts_chars: 170,
            ..Consumption::default()
        });
        assert_eq!(c.stt, Some(889)); // 12.4/60 × 4300 = 888.67
        assert_eq!(c.llm, Some(288)); // 830×0.25 + 64×1.25 = 287.5
        assert_eq!(c.tts, Some(2_550)); // 170 × 15
        assert_eq!(c.total, Some(3_727));
    }

    #[test]
    fn unknown_price_means_unknown_cost_never_zero() {
        let mut p = reference();
        p.llm_output_per_mtok = None;
        let c = p.cost(&Consumption {
            llm_output_tokens: 10,
            ..Consumption::default()
        });
        assert_eq!(c.llm, None);
        assert_eq!(c.total, None);
        assert_eq!(c.stt, Some(0));
        // Local engines cost zero explicitly.
        let local = Prices {
            stt_per_minute: Some(0),
            llm_input_per_mtok: Some(0),
            llm_output_per_mtok: Some(0),
            tts_per_mchar: Some(0),
            ..Prices::default()
        };
        assert_eq!(
            local
                .cost(&Consumption {
                    tts_chars: 99,
                    ..Default::default()
                })
                .total,
            Some(0)
        );
    }

    #[test]
    fn budget_warns_once_then_stops_before_overspending() {
        let mut b = Budget::new(Some(from_usd(5.0)), 0.8);
        assert_eq!(b.check(from_usd(3.0), 0), BudgetState::Ok);
        assert_eq!(b.check(from_usd(4.0), 0), BudgetState::Warn);
        assert_eq!(b.check(from_usd(4.1), 0), BudgetState::Ok);
        assert_eq!(
            b.check(from_usd(4.5), from_usd(0.6)),
            BudgetState::Exhausted
        );
        assert_eq!(b.check(from_usd(5.0), 0), BudgetState::Exhausted);
        let mut unlimited = Budget::new(None, 0.8);
        assert_eq!(unlimited.check(u64::MAX, u64::MAX), BudgetState::Ok);
    }
}
