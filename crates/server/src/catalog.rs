//! The price catalog: a versioned data file shipped with the binary (`prices.toml`),
//! replaceable with `ATLAS_PRICE_CATALOG`.

use std::collections::BTreeMap;

use serde::Deserialize;

use atlas_core::cost::{Micros, Prices, from_usd};

use crate::config::ConfigError;

/// The catalog compiled into the binary.
pub const BUILT_IN: &str = include_str!("../prices.toml");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    version: String,
    #[serde(default)]
    stt: BTreeMap<String, BTreeMap<String, SttPrice>>,
    #[serde(default)]
    llm: BTreeMap<String, BTreeMap<String, LlmPrice>>,
    #[serde(default)]
    tts: BTreeMap<String, BTreeMap<String, TtsPrice>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct SttPrice {
    per_minute: f64,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct LlmPrice {
    input_per_mtok: f64,
    output_per_mtok: f64,
    cache_read_per_mtok: Option<f64>,
    cache_write_per_mtok: Option<f64>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct TtsPrice {
    per_mchar: f64,
}

/// A loaded catalog.
pub struct Catalog {
    file: File,
}

/// The models one session uses: (provider, model) per stage.
#[derive(Clone, Debug)]
pub struct Models {
    /// Recogniser.
    pub stt: (String, String),
    /// Language model.
    pub llm: (String, String),
    /// Synthesiser.
    pub tts: (String, String),
}

fn lookup<'a, T>(
    table: &'a BTreeMap<String, BTreeMap<String, T>>,
    provider: &str,
    model: &str,
) -> Option<&'a T> {
    let models = table.get(provider)?;
    if let Some(p) = models.get(model).or_else(|| models.get("*")) {
        return Some(p);
    }
    // A dated snapshot matches its family: `claude-haiku-4-5-20251001` → `claude-haiku-4-5`,
    // `gpt-4o-2024-08-06` → `gpt-4o`. The suffix must look like a date, so an unknown model
    // such as `nova-9` never borrows the price of `nova`.
    models
        .iter()
        .filter(|(k, _)| {
            model
                .strip_prefix(k.as_str())
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(|date| {
                    date.len() >= 8 && date.chars().all(|c| c.is_ascii_digit() || c == '-')
                })
        })
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v)
}

fn check(v: f64, what: &str) -> Result<Micros, ConfigError> {
    if v.is_finite() && v >= 0.0 {
        Ok(from_usd(v))
    } else {
        Err(ConfigError(format!(
            "price catalog: {what} must be a non-negative number"
        )))
    }
}

impl Catalog {
    /// Parses a catalog file's text.
    pub fn parse(text: &str) -> Result<Catalog, ConfigError> {
        let file: File =
            toml::from_str(text).map_err(|e| ConfigError(format!("price catalog: {e}")))?;
        for (p, models) in &file.stt {
            for (m, v) in models {
                check(v.per_minute, &format!("stt.{p}.{m}.per_minute"))?;
            }
        }
        for (p, models) in &file.llm {
            for (m, v) in models {
                for (what, x) in [
                    ("input_per_mtok", Some(v.input_per_mtok)),
                    ("output_per_mtok", Some(v.output_per_mtok)),
                    ("cache_read_per_mtok", v.cache_read_per_mtok),
                    ("cache_write_per_mtok", v.cache_write_per_mtok),
                ] {
                    if let Some(x) = x {
                        check(x, &format!("llm.{p}.{m}.{what}"))?;
                    }
                }
            }
        }
        for (p, models) in &file.tts {
            for (m, v) in models {
                check(v.per_mchar, &format!("tts.{p}.{m}.per_mchar"))?;
            }
        }
        Ok(Catalog { file })
    }

    /// The built-in catalog, or the file named by `path`.
    pub fn load(path: Option<&std::path::Path>) -> Result<Catalog, ConfigError> {
        match path {
            None => Self::parse(BUILT_IN),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    ConfigError(format!("ATLAS_PRICE_CATALOG {}: {e}", p.display()))
                })?;
                Self::parse(&text)
            }
        }
    }

    /// The catalog's version, recorded with every session.
    pub fn version(&self) -> &str {
        &self.file.version
    }

    /// Unit prices for `models`; unknown models leave their prices unset.
    pub fn prices(&self, models: &Models) -> Prices {
        let stt = lookup(&self.file.stt, &models.stt.0, &models.stt.1);
        let llm = lookup(&self.file.llm, &models.llm.0, &models.llm.1);
        let tts = lookup(&self.file.tts, &models.tts.0, &models.tts.1);
        Prices {
            stt_per_minute: stt.map(|p| from_usd(p.per_minute)),
            llm_input_per_mtok: llm.map(|p| from_usd(p.input_per_mtok)),
            llm_output_per_mtok: llm.map(|p| from_usd(p.output_per_mtok)),
            llm_cache_read_per_mtok: llm.and_then(|p| p.cache_read_per_mtok.map(from_usd)),
            llm_cache_write_per_mtok: llm.and_then(|p| p.cache_write_per_mtok.map(from_usd)),
            tts_per_mchar: tts.map(|p| from_usd(p.per_mchar)),
        }
    }
}

/// The configured models the catalog has no price for, as `stage provider/model`.
pub fn unpriced(models: &Models, prices: &Prices) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |priced: bool, stage: &str, (provider, model): &(String, String)| {
        if !priced {
            out.push(format!("{stage} {provider}/{model}"));
        }
    };
    check(prices.stt_per_minute.is_some(), "stt", &models.stt);
    check(
        prices.llm_input_per_mtok.is_some() && prices.llm_output_per_mtok.is_some(),
        "llm",
        &models.llm,
    );
    check(prices.tts_per_mchar.is_some(), "tts", &models.tts);
    out
}

/// Why the server refuses to start with budgets set and `unpriced` models, and what to do.
pub fn unpriced_refusal(unpriced: &[String]) -> String {
    let example = unpriced
        .first()
        .map(|m| {
            let (stage, rest) = m.split_once(' ').unwrap_or(("llm", m));
            let (provider, model) = rest.split_once('/').unwrap_or((rest, ""));
            let price = match stage {
                "stt" => "{ per_minute = … }",
                "tts" => "{ per_mchar = … }",
                _ => "{ input_per_mtok = …, output_per_mtok = … }",
            };
            format!("[{stage}.{provider}] \"{model}\" = {price}")
        })
        .unwrap_or_default();
    format!(
        "a budget is set (ATLAS_SESSION_BUDGET_USD or ATLAS_USER_DAILY_BUDGET_USD) but the price \
         catalog has no price for {}, so budgets could not limit its spending. Price it in a \
         catalog file (a copy of the built-in crates/server/prices.toml with e.g. `{example}`) \
         named by ATLAS_PRICE_CATALOG, or set ATLAS_ALLOW_UNPRICED=true to run with its cost \
         unknown and budgets not enforced",
        unpriced.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models(stt: &str, llm: (&str, &str), tts: &str) -> Models {
        Models {
            stt: ("deepgram".into(), stt.into()),
            llm: (llm.0.into(), llm.1.into()),
            tts: ("openai".into(), tts.into()),
        }
    }

    #[test]
    fn built_in_catalog_has_the_seed_prices() {
        let c = Catalog::load(None).unwrap();
        let prices = |llm, tts| c.prices(&models("nova-3", ("anthropic", llm), tts));
        let p = prices("claude-3-haiku-20240307", "tts-1");
        assert_eq!(p.stt_per_minute, Some(4_800));
        assert_eq!(p.llm_input_per_mtok, Some(250_000));
        assert_eq!(p.llm_output_per_mtok, Some(1_250_000));
        assert_eq!(p.tts_per_mchar, Some(15_000_000));
        let p = prices("claude-haiku-4-5", "tts-1-hd");
        assert_eq!(p.llm_input_per_mtok, Some(1_000_000));
        assert_eq!(p.tts_per_mchar, Some(30_000_000));
        assert!(!c.version().is_empty());
    }

    #[test]
    fn unknown_models_have_no_price_and_local_is_free() {
        let c = Catalog::load(None).unwrap();
        let p = c.prices(&models("nova-9", ("anthropic", "claude-unknown"), "tts-9"));
        assert_eq!(
            (p.stt_per_minute, p.llm_input_per_mtok, p.tts_per_mchar),
            (None, None, None)
        );
        let p = c.prices(&Models {
            stt: ("local".into(), "whisper-tiny.en".into()),
            llm: ("local".into(), "smollm2".into()),
            tts: ("local".into(), "espeak-ng".into()),
        });
        assert_eq!(
            (p.stt_per_minute, p.llm_output_per_mtok, p.tts_per_mchar),
            (Some(0), Some(0), Some(0))
        );
    }

    #[test]
    fn current_model_ids_are_priced() {
        let c = Catalog::load(None).unwrap();
        for (stt, llm, tts) in [
            (
                "nova-3",
                ("anthropic", "claude-sonnet-4-5-20250929"),
                "gpt-4o-mini-tts",
            ),
            (
                "nova-2",
                ("anthropic", "claude-opus-4-1-20250805"),
                "tts-1-hd",
            ),
            ("nova-3", ("openai", "gpt-5-mini"), "tts-1"),
            ("nova-3", ("openai", "gpt-4.1-2025-04-14"), "tts-1"),
        ] {
            let m = models(stt, llm, tts);
            assert_eq!(unpriced(&m, &c.prices(&m)), Vec::<String>::new(), "{m:?}");
        }
        // A dated id takes its own family's price, not a shorter family's.
        let m = models("nova-3", ("anthropic", "claude-opus-4-5-20251101"), "tts-1");
        assert_eq!(c.prices(&m).llm_input_per_mtok, Some(5_000_000));
        let m = models("nova-3", ("anthropic", "claude-opus-4-1-20250805"), "tts-1");
        assert_eq!(c.prices(&m).llm_input_per_mtok, Some(15_000_000));
    }

    #[test]
    fn unpriced_models_are_named_with_the_fix() {
        let c = Catalog::load(None).unwrap();
        let m = models("nova-9", ("anthropic", "claude-haiku-4-5"), "tts-9");
        let missing = unpriced(&m, &c.prices(&m));
        assert_eq!(missing, vec!["stt deepgram/nova-9", "tts openai/tts-9"]);
        let msg = unpriced_refusal(&missing);
        assert!(
            msg.contains("stt deepgram/nova-9, tts openai/tts-9"),
            "{msg}"
        );
        assert!(
            msg.contains("[stt.deepgram] \"nova-9\" = { per_minute = … }"),
            "{msg}"
        );
        assert!(msg.contains("ATLAS_PRICE_CATALOG") && msg.contains("ATLAS_ALLOW_UNPRICED=true"));
    }

    #[test]
    fn a_bad_catalog_is_refused_clearly() {
        let e = Catalog::parse("version = \"x\"\n[tts.openai]\n\"tts-1\" = { per_mchar = -1.0 }\n")
            .err()
            .unwrap();
        assert!(e.to_string().contains("tts.openai.tts-1.per_mchar"), "{e}");
        assert!(Catalog::parse("not toml [").is_err());
    }
}
