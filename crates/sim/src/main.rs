//! `atlas-sim`: runs seeds of the deterministic simulation; a failure prints the seed, the
//! command that replays it and the shrunk schedule.

use std::time::Instant;

use clap::Parser;

/// Deterministic simulation of sessions, their ownership, the ledger and the recorder.
#[derive(Parser)]
struct Args {
    /// Number of seeds to run (from `--first`).
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Replay one seed (prints its shrunk schedule if it fails).
    #[arg(long)]
    seed: Option<u64>,
    /// Actions per seed.
    #[arg(long, default_value_t = atlas_sim::ACTIONS)]
    actions: usize,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let (first, count) = match args.seed {
        Some(seed) => (seed, 1),
        None => (args.first, args.seeds),
    };
    let began = Instant::now();
    let mut total = atlas_sim::Stats::default();
    for seed in first..first + count {
        match atlas_sim::run_seed(seed, args.actions) {
            Ok(stats) => {
                total.inputs += stats.inputs;
                total.requests += stats.requests;
                total.moves += stats.moves;
                total.records += stats.records;
                total.drafts.0 += stats.drafts.0;
                total.drafts.1 += stats.drafts.1;
                total.echoes += stats.echoes;
            }
            Err(v) => {
                eprintln!("seed {seed} failed {v}");
                eprintln!("replay: {}", atlas_sim::replay_command(seed, args.actions));
                let schedule = atlas_sim::schedule(seed, args.actions);
                let short = atlas_sim::shrink(seed, &schedule, v.invariant);
                eprintln!("shrunk to {} actions:", short.len());
                for a in &short {
                    eprintln!("  {a:?}");
                }
                return std::process::ExitCode::FAILURE;
            }
        }
        if count > 1 && (seed - first + 1) % 100_000 == 0 {
            eprintln!(
                "{} seeds, {:.0} s",
                seed - first + 1,
                began.elapsed().as_secs_f64()
            );
        }
    }
    let secs = began.elapsed().as_secs_f64();
    println!(
        "{count} seeds passed in {secs:.1} s ({:.0} seeds/s): {} machine inputs, {} provider requests, {} moves between instances, {} sessions recorded, {} drafts kept and {} discarded, {} echoes heard",
        count as f64 / secs,
        total.inputs,
        total.requests,
        total.moves,
        total.records,
        total.drafts.0,
        total.drafts.1,
        total.echoes
    );
    std::process::ExitCode::SUCCESS
}
