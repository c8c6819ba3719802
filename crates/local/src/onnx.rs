//! What the ONNX Runtime workers (the neural voice, the end-of-turn model) share: their
//! `--model`, `--runtime` and `--threads` options, and loading ONNX Runtime from the library
//! `atlas-voice models fetch` unpacked and a model into a session (nothing is downloaded at
//! build time: `ort` loads the library at run time).

use std::io;
use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

/// The options every ONNX worker takes.
#[derive(Debug, Default)]
pub struct OnnxOptions {
    model: Option<PathBuf>,
    runtime: Option<PathBuf>,
    threads: Option<usize>,
}

impl OnnxOptions {
    /// Takes `arg` if it is one of the shared options (reading its value); false otherwise.
    pub fn take(
        &mut self,
        arg: &str,
        value: &mut dyn FnMut() -> io::Result<String>,
    ) -> io::Result<bool> {
        match arg {
            "--model" => self.model = Some(PathBuf::from(value()?)),
            "--runtime" => self.runtime = Some(PathBuf::from(value()?)),
            "--threads" => {
                let v = value()?;
                self.threads = Some(
                    v.parse()
                        .map_err(|_| io::Error::other(format!("--threads {v:?}: not a number")))?,
                );
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The model's file (`--model`), once given.
    pub fn model(&self) -> io::Result<&Path> {
        self.model
            .as_deref()
            .ok_or_else(|| io::Error::other("--model MODEL.onnx is required"))
    }

    /// Loads ONNX Runtime and the model (`what` names it in errors), after checking both
    /// were fetched. The session runs on `--threads` (default 1) threads.
    pub fn load(self, name: &str, what: &str) -> io::Result<Onnx> {
        let model = self
            .model
            .ok_or_else(|| io::Error::other("--model MODEL.onnx is required"))?;
        let runtime = self
            .runtime
            .ok_or_else(|| io::Error::other("--runtime LIBRARY is required"))?;
        let threads = self.threads.unwrap_or(1).max(1);
        crate::ipc::check_fetched(what, &model)?;
        crate::ipc::check_fetched("ONNX Runtime", &runtime)?;
        let environment = ort::init_from(&runtime)
            .map_err(err(format!(
                "loading ONNX Runtime from {}",
                runtime.display()
            )))?
            .with_name(name)
            .build()
            .map_err(err("starting ONNX Runtime".into()))?;
        let session = Session::builder(&environment)
            .map_err(err("configuring ONNX Runtime".into()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(err("configuring ONNX Runtime".into()))?
            .with_intra_threads(threads)
            .map_err(err("configuring ONNX Runtime".into()))?
            .with_inter_threads(1)
            .map_err(err("configuring ONNX Runtime".into()))?
            .commit_from_file(&model)
            .map_err(err(format!("loading {}", model.display())))?;
        Ok(Onnx {
            _environment: environment,
            session,
            model,
            threads,
        })
    }
}

/// A loaded model.
pub struct Onnx {
    _environment: Environment,
    /// The session to run.
    pub session: Session,
    /// The model's file.
    pub model: PathBuf,
    /// Threads it runs on.
    pub threads: usize,
}

impl Onnx {
    /// The model's file name without its extension, for the worker's `Ready` line.
    pub fn model_name(&self) -> String {
        file_stem(&self.model)
    }
}

/// An error with its `context`, for `map_err`.
fn err<E: std::fmt::Display>(context: String) -> impl FnOnce(E) -> io::Error {
    move |e| io::Error::other(format!("{context}: {e}"))
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
