//! The language model worker: loads a GGUF chat model once (SmolLM2-135M-Instruct by
//! default) and streams replies to the conversations the server sends over standard input
//! (see `atlas_local::ipc`). Exits when its input closes.

use std::num::NonZeroU32;
use std::path::PathBuf;

use anyhow::{Context, bail};
use atlas_local::ipc::{self, Message, Reply, Request};
use atlas_local::sentences::{Limits, SentenceGate, Stop};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;

struct Args {
    model: PathBuf,
    threads: i32,
    context: u32,
    /// Stop after this many complete sentences.
    sentences: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut model = None;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get() as i32);
    let mut context = 2048;
    let mut sentences = 2;
    ipc::parse_options(
        "atlas-voice-llm --model FILE [--threads N] [--context TOKENS] [--sentences N]",
        |arg, value| {
            match arg {
                "--model" => model = Some(PathBuf::from(value()?)),
                "--threads" => threads = value()?.parse()?,
                "--context" => context = value()?.parse()?,
                "--sentences" => sentences = value()?.parse()?,
                _ => return Ok(false),
            }
            anyhow::Ok(true)
        },
    )?;
    Ok(Args {
        model: model.context("--model FILE is required")?,
        threads: threads.max(1),
        context: context.clamp(256, 32_768),
        sentences: sentences.max(1),
    })
}

struct Engine<'m> {
    model: &'m LlamaModel,
    template: LlamaChatTemplate,
    ctx: llama_cpp_2::context::LlamaContext<'m>,
    args: &'m Args,
    /// Tokens in the cache, in order (the last prompt and what was generated after it).
    cached: Vec<llama_cpp_2::token::LlamaToken>,
}

/// How one reply is decoded.
struct Decode {
    max_tokens: u32,
    soft_max_tokens: u32,
    temperature: f32,
    repeat_penalty: f32,
}

impl Engine<'_> {
    /// Renders the conversation, dropping the oldest turns until it fits with room to reply.
    fn prompt(
        &self,
        messages: &[Message],
        max_tokens: u32,
    ) -> anyhow::Result<Vec<llama_cpp_2::token::LlamaToken>> {
        let budget = (self.args.context as usize).saturating_sub(max_tokens as usize + 8);
        let mut skip = 0;
        loop {
            let system = messages.iter().take(1).filter(|m| m.role == "system");
            let rest = messages.iter().skip(1 + skip);
            let chat = system
                .chain(rest)
                .map(|m| LlamaChatMessage::new(m.role.clone(), m.text.clone()))
                .collect::<Result<Vec<_>, _>>()?;
            let text = self
                .model
                .apply_chat_template(&self.template, &chat, true)?;
            let tokens = self.model.vocab().tokenize(text.as_bytes(), true, true);
            if tokens.len() <= budget {
                return Ok(tokens);
            }
            if 1 + skip + 1 >= messages.len() {
                bail!("the last message alone is longer than the context");
            }
            skip += 2;
        }
    }

    fn generate(
        &mut self,
        id: u64,
        messages: &[Message],
        decode: &Decode,
        cancelled: &dyn Fn() -> bool,
    ) -> anyhow::Result<()> {
        let tokens = self.prompt(messages, decode.max_tokens)?;
        // Reuse the cache for the prompt's unchanged beginning (the system prompt, and the
        // conversation so far on later turns): only the new part is evaluated.
        let keep = self
            .cached
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count()
            .min(tokens.len() - 1);
        if keep == 0 {
            self.ctx.clear_kv_cache();
        } else {
            self.ctx
                .clear_kv_cache_seq(Some(0), Some(keep as u32), None)
                .context("trimming the cache")?;
        }
        self.cached.clear();
        let mut batch = LlamaBatch::new(tokens.len().max(64), 1);
        let last = tokens.len() - 1;
        for (i, t) in tokens.iter().enumerate().skip(keep) {
            batch.add(*t, i as i32, &[0], i == last)?;
        }
        self.ctx.decode(&mut batch).context("prompt evaluation")?;
        self.cached.extend_from_slice(&tokens);
        let vocab = self.model.vocab();
        let penalties = LlamaSampler::penalties(
            self.model.n_vocab(),
            64,
            decode.repeat_penalty.clamp(1.0, 2.0),
            0.0,
            0.0,
        );
        let mut sampler = if decode.temperature <= 0.0 {
            LlamaSampler::chain_simple([penalties, LlamaSampler::greedy()])
        } else {
            LlamaSampler::chain_simple([
                penalties,
                LlamaSampler::top_k(40),
                LlamaSampler::top_p(0.9, 1),
                LlamaSampler::temp(decode.temperature.min(2.0)),
                LlamaSampler::dist(id as u32 ^ 0x5eed),
            ])
        };
        let mut gate = SentenceGate::new(Limits {
            sentences: self.args.sentences,
            soft_tokens: u64::from(decode.soft_max_tokens.max(1)),
        });
        let mut pos = tokens.len() as i32;
        let mut pending: Vec<u8> = Vec::new();
        let mut generated = 0u64;
        let mut stop = "length";
        let send = |text: String| -> anyhow::Result<()> {
            if !text.is_empty() {
                ipc::reply(&Reply::Delta { id, text })?;
            }
            Ok(())
        };
        while generated < u64::from(decode.max_tokens) {
            if cancelled() {
                stop = "cancelled";
                break;
            }
            let token = sampler.sample(&self.ctx, batch.n_tokens() - 1);
            if vocab.is_eog(token) {
                stop = "stop";
                break;
            }
            generated += 1;
            pending.extend(vocab.token_to_piece(token, false, None));
            let valid = match std::str::from_utf8(&pending) {
                Ok(s) => s.len(),
                Err(e) => e.valid_up_to(),
            };
            if valid > 0 {
                let text = String::from_utf8_lossy(&pending[..valid]).into_owned();
                pending.drain(..valid);
                let (out, gate_stop) = gate.push(&text, generated);
                send(out)?;
                if gate_stop == Stop::Done {
                    stop = "stop";
                    break;
                }
            }
            batch.clear();
            batch.add(token, pos, &[0], true)?;
            pos += 1;
            if pos as u32 >= self.args.context {
                break;
            }
            self.ctx.decode(&mut batch).context("generation")?;
            self.cached.push(token);
        }
        if stop != "cancelled" {
            send(gate.finish(stop == "stop"))?;
            // A reply cut at the cap still ends on a complete sentence.
            stop = "stop";
        }
        ipc::reply(&Reply::Done {
            id,
            stop_reason: stop.into(),
            input_tokens: tokens.len() as u64,
            output_tokens: generated,
        })?;
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    ipc::check_fetched("model", &args.model)?;
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &args.model, &LlamaModelParams::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let template = model
        .chat_template(None)
        .context("the model has no chat template")?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(args.context))
        .with_n_batch(args.context)
        .with_n_threads(args.threads)
        .with_n_threads_batch(args.threads);
    let ctx = model
        .new_context(&backend, params)
        .context("creating the context")?;
    let mut engine = Engine {
        model: &model,
        template,
        ctx,
        args: &args,
        cached: Vec::new(),
    };
    ipc::reply(&Reply::Ready {
        model: format!(
            "{} (GGUF, {} token context)",
            args.model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            args.context
        ),
    })?;

    let (requests, cancelled) = ipc::spawn_stdin_reader();
    for (request, _) in requests {
        let Request::Generate {
            id,
            messages,
            max_tokens,
            soft_max_tokens,
            temperature,
            repeat_penalty,
        } = request
        else {
            continue;
        };
        let decode = Decode {
            max_tokens,
            soft_max_tokens: if soft_max_tokens == 0 {
                max_tokens
            } else {
                soft_max_tokens
            },
            temperature,
            repeat_penalty,
        };
        let is_cancelled = || cancelled.lock().expect("cancel lock").contains(&id);
        let result = if is_cancelled() {
            ipc::reply(&Reply::Done {
                id,
                stop_reason: "cancelled".into(),
                input_tokens: 0,
                output_tokens: 0,
            })
            .map_err(Into::into)
        } else {
            engine.generate(id, &messages, &decode, &is_cancelled)
        };
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
