//! The examples' command-line parsing and their random inputs: `--name value` pairs parsed with
//! `FromStr` (a missing or unparsable value takes the default), bare `--flag`s, and a batch of
//! random ids, its half-masked copy and evenly spaced times.
// Each example includes this file and uses part of it.
#![allow(dead_code)]

use rand::{rngs::StdRng, Rng};

/// The value after `name`, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether `name` was given.
pub fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

/// `b·n` ids uniform in `0..v` (x0), the same with about half replaced by the mask id `v` (x_t,
/// for forward passes), and times `(i + 1/2)/b`.
pub fn random_batch(
    rng: &mut StdRng,
    v: usize,
    b: usize,
    n: usize,
) -> (Vec<u32>, Vec<u32>, Vec<f64>) {
    let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
    let xt: Vec<u32> = x0
        .iter()
        .map(|&x| if rng.gen::<bool>() { x } else { v as u32 })
        .collect();
    let t: Vec<f64> = (0..b).map(|i| (i as f64 + 0.5) / b as f64).collect();
    (x0, xt, t)
}

/// The flags of the step-variance examples (`block_time_variance`, `clip_step_variance`):
/// `--run CHECKPOINT_DIR` (required), `--batches R` (32) of `--batch B` (8) test sequences,
/// `--draws D` (16) noise draws per batch, `--cache DIR` (data-cache) for the corpus.
pub struct VarianceFlags {
    pub run: std::path::PathBuf,
    pub batches: usize,
    pub batch: usize,
    pub draws: usize,
    pub cache: std::path::PathBuf,
}

/// Reads [`VarianceFlags`]; an error when `--run` is missing.
pub fn variance_flags() -> Result<VarianceFlags, &'static str> {
    let run: String = arg("--run", String::new());
    if run.is_empty() {
        return Err("--run CHECKPOINT_DIR is required");
    }
    Ok(VarianceFlags {
        run: run.into(),
        batches: arg("--batches", 32usize),
        batch: arg("--batch", 8usize),
        draws: arg("--draws", 16usize),
        cache: arg("--cache", "data-cache".to_string()).into(),
    })
}
