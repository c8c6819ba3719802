//! The speech recognition worker: loads a Whisper ggml model once and transcribes the
//! utterances the server sends over standard input (see `atlas_local::ipc`). Exits when its
//! input closes.

use std::ffi::c_void;
use std::path::PathBuf;

use anyhow::Context;
use atlas_local::ipc::{self, Reply, Request};
use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

struct Args {
    model: PathBuf,
    threads: i32,
    /// Encoder context: `None` sizes it to the utterance, `Some(0)` uses the full 30 s window.
    audio_ctx: Option<i32>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut model = None;
    let mut threads = std::thread::available_parallelism().map_or(2, |n| n.get() as i32);
    let mut audio_ctx = None;
    ipc::parse_options(
        "atlas-voice-stt --model FILE [--threads N] [--audio-ctx auto|0|N]",
        |arg, value| {
            match arg {
                "--model" => model = value().ok().map(PathBuf::from),
                "--audio-ctx" => {
                    let v = value()?;
                    audio_ctx = if v == "auto" { None } else { Some(v.parse()?) };
                }
                "--threads" => threads = value()?.parse()?,
                _ => return Ok(false),
            }
            anyhow::Ok(true)
        },
    )?;
    Ok(Args {
        model: model.context("--model FILE is required")?,
        threads: threads.max(1),
        audio_ctx,
    })
}

/// What whisper.cpp's abort callback looks at: whether request `id` has been cancelled.
struct AbortCheck<'a> {
    cancelled: &'a ipc::Cancelled,
    id: u64,
}

/// whisper.cpp's abort callback: `data` is an [`AbortCheck`].
unsafe extern "C" fn should_abort(data: *mut c_void) -> bool {
    // SAFETY: whisper.cpp passes back the pointer set with `set_abort_callback_user_data`,
    // which points at an `AbortCheck` alive for the whole decode.
    let check = unsafe { &*(data as *const AbortCheck) };
    check
        .cancelled
        .lock()
        .is_ok_and(|ids| ids.contains(&check.id))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    ipc::check_fetched("model", &args.model)?;
    // Route whisper.cpp's own logging away from standard output (it is the reply channel).
    whisper_rs::install_logging_hooks();
    let path = args.model.to_str().context("model path is not UTF-8")?;
    let ctx = WhisperContext::new_with_params(path, WhisperContextParameters::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut state = ctx.create_state().context("creating the Whisper state")?;
    let model = format!(
        "whisper {} ({} layers)",
        if ctx.is_multilingual() {
            "multilingual"
        } else {
            "English"
        },
        ctx.model_n_audio_layer()
    );
    ipc::reply(&Reply::Ready { model })?;

    let (requests, cancelled) = ipc::spawn_stdin_reader();
    let mut samples: Vec<f32> = Vec::new();
    for (request, payload) in requests {
        let Request::Transcribe {
            id,
            language,
            partial,
        } = request
        else {
            continue;
        };
        if cancelled.lock().expect("cancel lock").remove(&id) {
            continue;
        }
        samples.clear();
        samples.extend(
            payload
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32 / 32768.0),
        );
        // whisper.cpp wants at least a second; pad short utterances with silence.
        if samples.len() < 16_000 + 1_600 {
            samples.resize(16_000 + 1_600, 0.0);
        }
        let mut params = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        params.set_n_threads(args.threads);
        params.set_language(Some(language.as_deref().unwrap_or("en")));
        params.set_no_context(true);
        params.set_single_segment(true);
        params.set_no_timestamps(true);
        params.set_suppress_blank(true);
        // Bounded work per utterance: no re-decoding at higher temperatures, and a cap on
        // tokens in proportion to the audio so a decoding loop cannot hold the engine for
        // seconds.
        params.set_temperature_inc(0.0);
        params.set_max_tokens(atlas_local::stt::max_tokens(payload.len() / 2, partial));
        // A cancelled request (a partial overtaken by the utterance's end, a session gone)
        // stops between the model's steps instead of holding the engine. (whisper-rs's
        // closure-taking `set_abort_callback_safe` hands whisper.cpp a pointer of the wrong
        // type and leaks the closure, so the plain callback is used with a check that lives
        // on this stack frame for the whole `full` call.)
        let check = AbortCheck {
            cancelled: &cancelled,
            id,
        };
        // SAFETY: `check` outlives `state.full` below, the only call that uses the pointer,
        // and `should_abort` only reads it.
        unsafe {
            params.set_abort_callback(Some(should_abort));
            params.set_abort_callback_user_data(&check as *const AbortCheck as *mut c_void);
        }
        params.set_print_special(false);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        // Only part of the 30 s window goes through the encoder: the utterance plus a margin,
        // and at least ~10 s (512 positions), below which tiny.en's accuracy drops on short
        // questions. Three times faster than the full window for a few seconds of speech.
        // Partials, shown while the person speaks and then replaced, use half that floor.
        let mel_frames = samples.len() / 160;
        let floor = if partial { 256 } else { 512 };
        params.set_audio_ctx(
            args.audio_ctx
                .unwrap_or((mel_frames / 2 + 128).clamp(floor, 1500) as i32),
        );
        let result = state.full(params, &samples);
        if cancelled.lock().expect("cancel lock").remove(&id) {
            continue;
        }
        let reply = match result {
            Ok(()) => {
                let text: String = state
                    .as_iter()
                    .filter_map(|s| s.to_str_lossy().ok().map(|t| t.into_owned()))
                    .collect();
                Reply::Transcript {
                    id,
                    text: text.trim().to_string(),
                }
            }
            Err(e) => Reply::Failed {
                id,
                message: e.to_string(),
            },
        };
        ipc::reply(&reply)?;
    }
    Ok(())
}
