//! The examples' command-line parsing and their random inputs: `--name value` pairs parsed with
//! `FromStr` (an absent name takes the default; a missing or unparsable value, or a name the
//! example does not know ([`only`]), ends the run with a one-line error), bare `--flag`s, and a
//! batch of random ids, its half-masked copy and evenly spaced times.
// Each example includes this file and uses part of it.
#![allow(dead_code)]

use rand::{rngs::StdRng, Rng};

/// The value after `name`, or `default` when `name` is absent; a missing or unparsable value
/// ends the run ([`fail`]).
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    let Some(i) = args.iter().position(|a| a == name) else {
        return default;
    };
    match args.get(i + 1).map(|v| (v, v.parse())) {
        Some((_, Ok(v))) => v,
        Some((v, Err(_))) => fail(&format!("{name}: cannot read {v:?}")),
        None => fail(&format!("{name} needs a value")),
    }
}

/// Ends the run for a bad command line: one line on stderr, exit status 2.
pub fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(2)
}

/// Ends the run ([`fail`]) if the command line has a `--name` outside `names` (the example's
/// flags and valued names): a mistyped or unsupported flag would otherwise be ignored and the
/// run measure something else than asked.
pub fn only(names: &[&str]) {
    if let Some(a) = std::env::args()
        .skip(1)
        .find(|a| a.starts_with("--") && !names.contains(&a.as_str()))
    {
        fail(&format!(
            "unknown option {a} (this example takes {})",
            names.join(" ")
        ));
    }
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

/// The names [`variance_flags`] reads.
pub const VARIANCE_FLAGS: [&str; 5] = ["--run", "--batches", "--batch", "--draws", "--cache"];

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
