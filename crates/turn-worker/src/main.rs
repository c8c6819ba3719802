//! The end-of-turn worker: loads Smart Turn v3.2 once with ONNX Runtime and scores the audio
//! the server sends over standard input (see `atlas_local::ipc`): the probability that the
//! speech so far is a finished turn. Exits when its input closes.

use std::path::PathBuf;

use anyhow::Context;
use atlas_local::ipc::{self, Reply, Request};
use atlas_local::smart_turn::{FRAMES, Features, N_MELS};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

struct Args {
    model: PathBuf,
    runtime: PathBuf,
    threads: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut model = None;
    let mut runtime = None;
    let mut threads = 1;
    ipc::parse_options(
        "atlas-voice-turn --model smart-turn-v3.2-cpu.onnx --runtime libonnxruntime.so \
         [--threads N]",
        |arg, value| {
            match arg {
                "--model" => model = Some(PathBuf::from(value()?)),
                "--runtime" => runtime = Some(PathBuf::from(value()?)),
                "--threads" => threads = value()?.parse()?,
                _ => return Ok(false),
            }
            anyhow::Ok(true)
        },
    )?;
    Ok(Args {
        model: model.context("--model MODEL.onnx is required")?,
        runtime: runtime.context("--runtime LIBRARY is required")?,
        threads: threads.max(1),
    })
}

struct Model {
    session: Session,
    features: Features,
}

impl Model {
    /// The probability that `pcm` (16 kHz) ends a finished turn.
    fn score(&mut self, pcm: &[i16]) -> anyhow::Result<f32> {
        let input = self.features.compute(pcm);
        let outputs = self.session.run(ort::inputs![
            "input_features" => Tensor::from_array((vec![1i64, N_MELS as i64, FRAMES as i64], input))?,
        ])?;
        let (_, scores) = outputs[0].try_extract_tensor::<f32>()?;
        scores
            .first()
            .copied()
            .context("the model returned no score")
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    ipc::check_fetched("end-of-turn model", &args.model)?;
    ipc::check_fetched("ONNX Runtime", &args.runtime)?;
    let environment = ort::init_from(&args.runtime)
        .with_context(|| format!("loading ONNX Runtime from {}", args.runtime.display()))?
        .with_name("atlas-voice-turn")
        .build()?;
    let session = Session::builder(&environment)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_intra_threads(args.threads)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_inter_threads(1)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .commit_from_file(&args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut model = Model {
        session,
        features: Features::new(),
    };
    // The first run allocates ONNX Runtime's buffers; do it before the first session waits.
    model.score(&[]).context("a first decision")?;
    ipc::reply(&Reply::Ready {
        model: format!("smart-turn v3.2 ({} thread(s))", args.threads),
    })?;

    let (requests, _cancelled) = ipc::spawn_stdin_reader();
    for (request, payload) in requests {
        let Request::ScoreTurn { id } = request else {
            continue;
        };
        let pcm: Vec<i16> = payload
            .chunks_exact(2)
            .map(|b| i16::from_le_bytes([b[0], b[1]]))
            .collect();
        match model.score(&pcm) {
            Ok(probability) => ipc::reply(&Reply::TurnScore { id, probability })?,
            Err(e) => ipc::reply(&Reply::Failed {
                id,
                message: format!("{e:#}"),
            })?,
        }
    }
    Ok(())
}
