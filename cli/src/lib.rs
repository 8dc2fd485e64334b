//! `maskdiff-cli`: the `maskdiff` command line for MD4/GenMD4 masked diffusion (Shi et al.,
//! NeurIPS 2024): `train` (Alg. 1 with the continuous-time loss, eq. (5)), `eval` (the negative
//! ELBO of §3 in bits per token, continuous or T-step discrete), `sample` (ancestral sampling,
//! Alg. 2, §6) and `plot` (training curves, Figure 1's schedules).
//!
//! The library half exists so the pieces are unit-tested; `main.rs` only calls [`run()`].

pub mod args;
pub mod commands;
pub mod config;
pub mod dataset;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod images;
pub mod interrupt;
pub mod judge;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod reveal;
pub mod run;
pub mod template;

pub use error::{CliError, Result};

/// Parse the process arguments and run the chosen command.
pub fn run(cli: args::Cli) -> Result<()> {
    use args::Command;
    match cli.command {
        Command::Train(a) => commands::train::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Sample(a) => commands::sample::run(a),
        Command::Plot(a) => commands::plot::run(a),
    }
}
