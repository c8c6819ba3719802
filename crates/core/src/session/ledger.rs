//! The session's one ledger: consumption → cost → session budget and the user's daily budget.
//!
//! Every unit of work the session pays for enters here, and every spending decision is made
//! here: the running cost (recomputed from totals, so it never drifts), the spend not yet
//! added to the user's daily total, and the budget check before new work starts.

use crate::cost::{Budget, BudgetState, Consumption, Cost, Micros, Prices};
pub use crate::cost::{CHARS_PER_TOKEN, estimate_tokens};

/// What the session used so far, and its cost.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// The running cost; `None` when a model in use has no price.
    pub cost: Option<Micros>,
    /// Seconds of audio streamed to recognition.
    pub stt_seconds: f64,
    /// Model prompt tokens (cache reads and writes included).
    pub llm_input_tokens: u64,
    /// Model output tokens.
    pub llm_output_tokens: u64,
    /// Characters synthesised.
    pub tts_chars: u64,
}

/// Token counts of one language-model request, as far as the provider reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportedTokens {
    /// Uncached input tokens.
    pub input: Option<u64>,
    /// Output tokens.
    pub output: Option<u64>,
    /// Input tokens read from the prompt cache.
    pub cache_read: Option<u64>,
    /// Input tokens written to the prompt cache.
    pub cache_write: Option<u64>,
}

impl ReportedTokens {
    /// Both counts together (a count is known if either is).
    pub fn plus(self, other: ReportedTokens) -> ReportedTokens {
        let sum = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
        ReportedTokens {
            input: sum(self.input, other.input),
            output: sum(self.output, other.output),
            cache_read: sum(self.cache_read, other.cache_read),
            cache_write: sum(self.cache_write, other.cache_write),
        }
    }
}

/// What one language-model request used, reported or measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlmBill {
    /// The request reached the provider and was not refused (a refused request — an error
    /// status — costs nothing).
    pub billable: bool,
    /// The provider finished its stream, so its output count (if any) is final.
    pub finished: bool,
    /// Characters of the prompt sent (system prompt and history).
    pub prompt_chars: usize,
    /// Characters the model produced.
    pub generated_chars: usize,
    /// What the provider reported.
    pub reported: ReportedTokens,
}

impl LlmBill {
    /// Token counts to bill: the provider's report, and where it is missing or not final, a
    /// measurement of the text. Input is billed for every request the provider accepted, also
    /// when the reply is cut before its first token.
    pub fn tokens(&self) -> ReportedTokens {
        if !self.billable {
            return ReportedTokens::default();
        }
        let r = self.reported;
        let generated = estimate_tokens(self.generated_chars);
        let output = match (r.output, self.finished) {
            (Some(reported), true) => reported,
            (reported, _) => reported.unwrap_or(0).max(generated),
        };
        let input = match (r.input, r.cache_read, r.cache_write) {
            (None, None, None) => estimate_tokens(self.prompt_chars),
            (input, _, _) => input.unwrap_or(0),
        };
        ReportedTokens {
            input: Some(input),
            output: Some(output),
            cache_read: Some(r.cache_read.unwrap_or(0)),
            cache_write: Some(r.cache_write.unwrap_or(0)),
        }
    }
}

/// Spend per stage newly counted by the last update (for the spend metrics), and the amount to
/// add to the user's daily total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpendDelta {
    /// Recognition.
    pub stt: Micros,
    /// Language model.
    pub llm: Micros,
    /// Synthesis.
    pub tts: Micros,
    /// Total not yet added to the user's daily spend.
    pub daily: Micros,
}

impl SpendDelta {
    /// Whether nothing was spent.
    pub fn is_zero(&self) -> bool {
        *self == SpendDelta::default()
    }
}

/// The ledger's verdict on work about to start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on.
    Ok,
    /// Go on, and tell the client it crossed the warning fraction (`spent`, `limit`).
    Warn {
        /// Spent so far.
        spent: Micros,
        /// The session budget.
        limit: Micros,
    },
    /// Stop: the session or daily budget is spent, or the next work would overspend it.
    Exhausted,
}

/// The persistent part of a ledger, carried across instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LedgerState {
    /// What was used.
    pub consumption: Consumption,
    /// Spend already added to the user's daily total.
    pub reported_spend: Micros,
    /// Whether the budget warning was given.
    pub budget_warned: bool,
}

/// Consumption, cost and budgets of one session.
#[derive(Clone, Debug)]
pub struct Ledger {
    prices: Prices,
    budget: Budget,
    daily_limit: Option<Micros>,
    consumption: Consumption,
    cost: Cost,
    /// Spend per stage already counted in metrics.
    metered: [Micros; 3],
    /// Spend already added to the user's daily total.
    reported_spend: Micros,
    /// The user's spend today, as last heard from the shared counter.
    daily_spent: Micros,
    /// Audio streamed to recognition, in seconds (exact; `consumption.stt_ms` is derived).
    stt_seconds: f64,
}

impl Ledger {
    /// A ledger at zero.
    pub fn new(prices: Prices, budget: Option<Micros>, warn_fraction: f64) -> Self {
        Ledger {
            prices,
            budget: Budget::new(budget, warn_fraction),
            daily_limit: None,
            consumption: Consumption::default(),
            cost: prices.cost(&Consumption::default()),
            metered: [0; 3],
            reported_spend: 0,
            daily_spent: 0,
            stt_seconds: 0.0,
        }
    }

    /// Applies a per-user daily budget too.
    pub fn with_daily_limit(mut self, limit: Option<Micros>) -> Self {
        self.daily_limit = limit;
        self
    }

    /// Continues from a state saved elsewhere; its spend was already metered and reported
    /// by the instance that saved it.
    pub fn restore(&mut self, state: LedgerState) {
        self.consumption = state.consumption;
        self.stt_seconds = state.consumption.stt_ms as f64 / 1000.0;
        self.reported_spend = state.reported_spend;
        if state.budget_warned {
            self.budget.mark_warned();
        }
        self.cost = self.prices.cost(&self.consumption);
        self.metered = [self.cost.stt, self.cost.llm, self.cost.tts].map(|c| c.unwrap_or(0));
    }

    /// The state to carry to another instance.
    pub fn state(&self) -> LedgerState {
        LedgerState {
            consumption: self.consumption,
            reported_spend: self.reported_spend,
            budget_warned: self.budget.warned(),
        }
    }

    /// What was used.
    pub fn consumption(&self) -> &Consumption {
        &self.consumption
    }

    /// The cost so far.
    pub fn cost(&self) -> Cost {
        self.cost
    }

    /// The session budget.
    pub fn budget_limit(&self) -> Option<Micros> {
        self.budget.limit()
    }

    /// Takes audio off the bill that was counted by [`Ledger::add_audio`] but never reached
    /// the recogniser.
    pub fn remove_audio(&mut self, seconds: f64) {
        self.stt_seconds = (self.stt_seconds - seconds).max(0.0);
        self.consumption.stt_ms = (self.stt_seconds * 1000.0) as u64;
    }

    /// Adds audio streamed to recognition; returns true when the total crossed a whole
    /// second (recognition is billed while the user talks, so budgets are re-checked then).
    pub fn add_audio(&mut self, seconds: f64) -> bool {
        self.stt_seconds += seconds;
        let ms = (self.stt_seconds * 1000.0) as u64;
        let crossed = ms / 1000 != self.consumption.stt_ms / 1000;
        self.consumption.stt_ms = ms;
        crossed
    }

    /// Bills one language-model request and the characters synthesised for it.
    pub fn add_reply(&mut self, llm: &LlmBill, tts_chars: u64) {
        let t = llm.tokens();
        let c = &mut self.consumption;
        c.llm_input_tokens += t.input.unwrap_or(0);
        c.llm_output_tokens += t.output.unwrap_or(0);
        c.llm_cache_read_tokens += t.cache_read.unwrap_or(0);
        c.llm_cache_write_tokens += t.cache_write.unwrap_or(0);
        c.tts_chars += tts_chars;
    }

    /// The user's spend today across sessions (and instances).
    pub fn set_daily_spent(&mut self, micros: Micros) {
        self.daily_spent = micros;
    }

    /// The usage the client sees.
    pub fn usage(&self) -> Usage {
        let c = &self.consumption;
        Usage {
            cost: self.cost.total,
            stt_seconds: self.stt_seconds,
            llm_input_tokens: c.llm_input_tokens
                + c.llm_cache_read_tokens
                + c.llm_cache_write_tokens,
            llm_output_tokens: c.llm_output_tokens,
            tts_chars: c.tts_chars,
        }
    }

    /// Recomputes the cost from the totals; returns what is newly spent.
    pub fn settle(&mut self) -> SpendDelta {
        self.cost = self.prices.cost(&self.consumption);
        let mut delta = SpendDelta::default();
        for (slot, (value, out)) in self.metered.iter_mut().zip([
            (self.cost.stt, &mut delta.stt),
            (self.cost.llm, &mut delta.llm),
            (self.cost.tts, &mut delta.tts),
        ]) {
            if let Some(v) = value
                && v > *slot
            {
                *out = v - *slot;
                *slot = v;
            }
        }
        if let Some(total) = self.cost.total
            && total > self.reported_spend
        {
            delta.daily = total - self.reported_spend;
            self.reported_spend = total;
            // Counted here at once, so the check below sees it before the shared counter
            // answers.
            self.daily_spent = self.daily_spent.saturating_add(delta.daily);
        }
        delta
    }

    /// An upper estimate of one more reply (see [`Prices::reply_estimate`]); nothing when a
    /// price is unknown.
    pub fn reply_estimate(&self, prompt_chars: usize, max_tokens: u64) -> Micros {
        self.prices
            .reply_estimate(prompt_chars, max_tokens)
            .unwrap_or(0)
    }

    /// Checks the budgets with `next` (an estimate of the work about to start) on top of the
    /// spend so far. A cost that is unknown (a model without a price) cannot be budgeted; the
    /// server refuses to start in that case unless the operator allowed it.
    pub fn check(&mut self, next: Micros) -> Verdict {
        if let Some(daily) = self.daily_limit
            && daily_exhausted(daily, self.daily_spent, next)
        {
            return Verdict::Exhausted;
        }
        let Some(spent) = self.cost.total else {
            return Verdict::Ok;
        };
        match self.budget.check(spent, next) {
            BudgetState::Ok => Verdict::Ok,
            BudgetState::Warn => Verdict::Warn {
                spent,
                limit: self.budget.limit().unwrap_or(0),
            },
            BudgetState::Exhausted => Verdict::Exhausted,
        }
    }
}

/// The daily budget's rule, for a session's next piece of work and for admitting a new
/// session alike: the user's spend today is at the limit already, or `next` (an estimate of
/// the work about to start) would take it over.
pub fn daily_exhausted(limit: Micros, spent_today: Micros, next: Micros) -> bool {
    spent_today >= limit || spent_today.saturating_add(next) > limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::from_usd;

    #[test]
    fn the_daily_rule_refuses_at_the_limit_and_over_it() {
        assert!(!daily_exhausted(100, 0, 100));
        assert!(!daily_exhausted(100, 99, 1));
        assert!(daily_exhausted(100, 99, 2));
        // Nothing more to start, but nothing left either (an unknown price estimates 0).
        assert!(daily_exhausted(100, 100, 0));
        assert!(daily_exhausted(100, u64::MAX, u64::MAX));
        // The ledger applies the same rule.
        let mut ledger = Ledger::new(prices(), None, 0.8).with_daily_limit(Some(100));
        ledger.set_daily_spent(100);
        assert_eq!(ledger.check(0), Verdict::Exhausted);
    }

    #[test]
    fn audio_the_recogniser_never_received_is_taken_off_the_bill() {
        let mut ledger = Ledger::new(prices(), None, 0.8);
        assert!(!ledger.add_audio(0.5));
        assert!(ledger.add_audio(0.75));
        ledger.remove_audio(0.25);
        assert!((ledger.usage().stt_seconds - 1.0).abs() < 1e-9);
        ledger.settle();
        let one_second = ledger.cost().total;
        ledger.remove_audio(5.0);
        assert_eq!(ledger.usage().stt_seconds, 0.0);
        ledger.settle();
        assert!(ledger.cost().total < one_second);
    }

    /// The reference deployment's prices (nova-3, claude-haiku-4-5, tts-1).
    fn prices() -> Prices {
        crate::session::Config::reference().prices
    }

    #[test]
    fn a_cut_reply_still_pays_its_prompt() {
        let bill = LlmBill {
            billable: true,
            finished: false,
            prompt_chars: 4_000,
            generated_chars: 0,
            reported: ReportedTokens::default(),
        };
        assert_eq!(bill.tokens().input, Some(1_000));
        assert_eq!(bill.tokens().output, Some(0));
        let refused = LlmBill {
            billable: false,
            ..bill
        };
        assert_eq!(refused.tokens(), ReportedTokens::default());
    }

    #[test]
    fn reported_counts_win_once_final() {
        let mut bill = LlmBill {
            billable: true,
            finished: true,
            prompt_chars: 4_000,
            generated_chars: 400,
            reported: ReportedTokens {
                input: Some(900),
                output: Some(90),
                ..ReportedTokens::default()
            },
        };
        assert_eq!(bill.tokens().input, Some(900));
        assert_eq!(bill.tokens().output, Some(90));
        // Not final: the text measured wins when larger.
        bill.finished = false;
        assert_eq!(bill.tokens().output, Some(100));
    }

    #[test]
    fn settle_reports_each_increase_once() {
        let mut l = Ledger::new(prices(), Some(from_usd(1.0)), 0.8);
        l.add_audio(60.0);
        let d = l.settle();
        assert_eq!((d.stt, d.daily), (4_300, 4_300));
        assert!(l.settle().is_zero());
        l.add_reply(
            &LlmBill {
                billable: true,
                finished: true,
                prompt_chars: 0,
                generated_chars: 0,
                reported: ReportedTokens {
                    input: Some(1_000),
                    output: Some(100),
                    ..ReportedTokens::default()
                },
            },
            10,
        );
        let d = l.settle();
        assert_eq!(d.llm, 1_000 + 500);
        assert_eq!(d.tts, 150);
        assert_eq!(d.daily, 1_650);
        assert_eq!(l.usage().llm_input_tokens, 1_000);
    }

    #[test]
    fn restored_spend_is_not_reported_again() {
        let mut a = Ledger::new(prices(), None, 0.8);
        a.add_audio(120.0);
        a.settle();
        let mut b = Ledger::new(prices(), None, 0.8);
        b.restore(a.state());
        assert!(b.settle().is_zero());
        assert_eq!(b.cost(), a.cost());
    }

    #[test]
    fn daily_limit_counts_own_spend_at_once() {
        let mut l = Ledger::new(prices(), None, 0.8).with_daily_limit(Some(10_000));
        l.set_daily_spent(5_000);
        assert_eq!(l.check(0), Verdict::Ok);
        l.add_audio(120.0); // 8,600
        l.settle();
        assert_eq!(l.check(0), Verdict::Exhausted);
    }

    #[test]
    fn unknown_prices_cannot_be_budgeted() {
        let mut p = prices();
        p.tts_per_mchar = None;
        let mut l = Ledger::new(p, Some(1), 0.8);
        l.add_audio(600.0);
        l.settle();
        assert_eq!(l.cost().total, None);
        assert_eq!(l.check(0), Verdict::Ok);
    }
}
