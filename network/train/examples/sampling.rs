//! Sampling cost benchmark (not a test): wall time and network calls of drawing `--samples`
//! (16) sequences of `--len` (256) tokens with T = `--steps` (256) on the cosine grid, with the
//! plain ancestral sampler (paper Alg. 2), the cached sampler (calls the network only on steps
//! that reveal something; same output for the same seed) and the first-hitting sampler (jumps
//! from one reveal time to the next; same law). The model is a time-free `cpu-small` (so the
//! cached sampler may reuse outputs), untrained: its weights do not change the cost.
//!
//! `cargo run --release -p maskdiff-train --example sampling -- [--steps T] [--samples S]
//!  [--len N] [--preset NAME] [--device cpu|cuda] [--f32-only] [--only S1,S2,..]
//!  [--precisions P1,P2] [--no-rows]` — prints a Markdown table; each sampler runs at f32, then
//! with bf16 matrix products where the CPU has AVX512-BF16. `--only` picks samplers
//! (`ancestral`, `cached`, `first-hitting` by default; also `mean`, `confidence`,
//! `threshold`, `remdm`: these read μ at every masked position or call at every step),
//! `--precisions` picks precisions (`f32`, `bf16`);
//! `--no-rows` makes the network answer the samplers' row requests from its full forward
//! (the row-restricted last block off), for comparison.

#[path = "common/args.rs"]
mod args;
use args::{arg, flag};
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{set_precision, Kernels, NetworkConfig, NetworkDenoiser, Precision};
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_sampler::{sample, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, Shifted};
use std::time::Instant;

/// A denoiser without its own row-restricted forward: the trait's default answers row requests
/// from the full forward (`--no-rows`).
struct FullOnly<'a, D: Denoiser>(&'a mut D);

impl<D: Denoiser> Denoiser for FullOnly<'_, D> {
    fn vocab(&self) -> Vocab {
        self.0.vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        self.0.is_time_conditioned()
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        self.0.log_probs(b)
    }
}

fn run<D: Kernels<f32>>(dev: &D) -> Result<(), Box<dyn std::error::Error>> {
    let (steps, samples, len) = (
        arg("--steps", 256usize),
        arg("--samples", 16usize),
        arg("--len", 256usize),
    );
    let preset: String = arg("--preset", "cpu-small".to_string());
    let mut cfg = NetworkConfig::preset(&preset, 27)?;
    cfg.time_conditioning = false;
    cfg.max_len = cfg.max_len.max(len);
    let mut den = NetworkDenoiser::new(cfg.init::<f32, D>(dev, 0)?);
    let schedule = Shifted::official(Linear);
    println!(
        "time-free {preset} ({} parameters), {samples} × {len} tokens, T = {steps}, cosine grid, \
         batch {samples}",
        den.model.num_params()
    );
    println!();
    println!(
        "| sampler | wall time (s) | batched network calls | calls per sample (NFE) | speed-up |"
    );
    println!("|---|---|---|---|---|");
    let mut base = None;
    let mut reference: Option<Vec<Vec<u32>>> = None;
    // f32 first (its ancestral row is the baseline), then bf16 products where the CPU has them
    let mut precisions = vec![Precision::F32];
    if maskdiff_network::precision::bf16_hardware() && !flag("--f32-only") {
        precisions.push(Precision::Bf16);
    }
    let list = |name: &str| -> Option<Vec<String>> {
        let v: String = arg(name, String::new());
        (!v.is_empty()).then(|| v.split(',').map(|s| s.trim().to_string()).collect())
    };
    if let Some(want) = list("--precisions") {
        let mut chosen = Vec::new();
        for w in &want {
            chosen.push(Precision::parse(w).ok_or(format!("unknown precision {w:?}"))?);
        }
        precisions = chosen;
    }
    let mut samplers = vec![
        ("ancestral (Alg. 2)", SamplerKind::Ancestral),
        ("cached", SamplerKind::Cached),
        ("first-hitting", SamplerKind::FirstHitting),
        ("mean (Alg. 3)", SamplerKind::Mean),
        ("confidence", SamplerKind::Confidence),
        ("threshold", SamplerKind::Threshold),
        ("ReMDM", SamplerKind::Remdm),
    ];
    let want = list("--only").unwrap_or_else(|| {
        ["ancestral", "cached", "first-hitting"]
            .map(String::from)
            .to_vec()
    });
    for w in &want {
        if !samplers.iter().any(|(_, k)| k.name() == w) {
            let names: Vec<&str> = samplers.iter().map(|(_, k)| k.name()).collect();
            return Err(format!("unknown sampler {w:?} ({})", names.join(", ")).into());
        }
    }
    samplers.retain(|(_, k)| want.iter().any(|w| w == k.name()));
    let rows = !flag("--no-rows");
    for (precision, (name, kind)) in precisions
        .iter()
        .flat_map(|&p| samplers.iter().map(move |&k| (p, k)))
    {
        set_precision(precision);
        let name = format!("{name}, {precision}");
        let config = SamplerConfig {
            kind,
            steps,
            num_samples: samples,
            length: len,
            batch_size: samples,
            seed: 7,
            ..SamplerConfig::default()
        };
        let s = Instant::now();
        let out = if rows {
            sample(&mut den, &schedule, &config, &[], None)?
        } else {
            sample(&mut FullOnly(&mut den), &schedule, &config, &[], None)?
        };
        let wall = s.elapsed().as_secs_f64();
        let nfe = out.nfe.iter().map(|&x| x as f64).sum::<f64>() / out.nfe.len() as f64;
        let base_wall = *base.get_or_insert(wall);
        println!(
            "| {name} | {wall:.2} | {} | {nfe:.1} | {:.2}× |",
            out.calls,
            base_wall / wall
        );
        // the cached sampler must reproduce Alg. 2 (of the same precision) exactly for the same seed
        match kind {
            SamplerKind::Ancestral => reference = Some(out.sequences),
            SamplerKind::Cached
                if reference.is_some() && reference.as_ref() != Some(&out.sequences) =>
            {
                return Err("cached sampler output differs from ancestral".into());
            }
            _ => {}
        }
    }
    println!();
    if reference.is_some() {
        println!("(cached output checked identical to ancestral for the same seed)");
    }
    println!(
        "(row-restricted last block {})",
        if rows { "on" } else { "off (--no-rows)" }
    );
    Ok(())
}

/// Big blocks on cache lines (AMX tile loads of the bf16 products; see the type).
#[global_allocator]
static ALLOC: maskdiff_network::CacheLineAlloc = maskdiff_network::CacheLineAlloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // glibc allocator tuning for the training step's large buffers (opt-in)
    maskdiff_network::tune_allocator();
    maskdiff_network::tune_threads();
    args::only(&[
        "--device",
        "--f32-only",
        "--len",
        "--no-rows",
        "--only",
        "--precisions",
        "--preset",
        "--samples",
        "--steps",
    ]);
    match arg("--device", "cpu".to_string()).as_str() {
        "cpu" => run(&Cpu::default()),
        #[cfg(feature = "cuda")]
        "cuda" => run(&maskdiff_network::dfdx::tensor::Cuda::default()),
        other => Err(format!("unknown or not compiled-in device {other:?}").into()),
    }
}
