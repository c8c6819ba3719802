//! The end-of-turn worker: loads Smart Turn v3.2 once with ONNX Runtime and scores the audio
//! the server sends over standard input (see `atlas_local::ipc`): the probability that the
//! speech so far is a finished turn. Exits when its input closes.

use anyhow::Context;
use atlas_local::ipc::{self, Reply, Request};
use atlas_local::onnx::{Onnx, OnnxOptions};
use atlas_local::smart_turn::{FRAMES, Features, N_MELS};
use ort::value::Tensor;

struct Model {
    onnx: Onnx,
    features: Features,
}

impl Model {
    /// The probability that `pcm` (16 kHz) ends a finished turn.
    fn score(&mut self, pcm: &[i16]) -> anyhow::Result<f32> {
        let input = self.features.compute(pcm);
        let shape = vec![1i64, N_MELS as i64, FRAMES as i64];
        let outputs = self.onnx.session.run(ort::inputs![
            "input_features" => Tensor::from_array((shape, input))?,
        ])?;
        let (_, scores) = outputs[0].try_extract_tensor::<f32>()?;
        scores
            .first()
            .copied()
            .context("the model returned no score")
    }
}

fn main() -> anyhow::Result<()> {
    let mut options = OnnxOptions::default();
    ipc::parse_options(
        "atlas-voice-turn --model smart-turn-v3.2-cpu.onnx --runtime libonnxruntime.so \
         [--threads N]",
        |arg, value| options.take(arg, value),
    )?;
    let mut model = Model {
        onnx: options.load("atlas-voice-turn", "end-of-turn model")?,
        features: Features::new(),
    };
    // The first run allocates ONNX Runtime's buffers; do it before the first session waits.
    model.score(&[]).context("a first decision")?;
    ipc::reply(&Reply::Ready {
        model: format!(
            "{} ({} thread(s))",
            model.onnx.model_name(),
            model.onnx.threads
        ),
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
