//! Benchmark (not a test) of the run-time CPU-feature dispatch (`maskdiff_network::isa`): the
//! fused kernels, the tape-free forward pass and the full train step of an MD4 preset (default
//! `cpu-small`, batch 16 × 256) at every instruction-set level this CPU supports, interleaved
//! round by round in one process so that the machine's load hits every level alike. Reports the
//! fastest time of each (other processes only ever add time) and its ratio to the portable
//! (baseline x86-64) instance. The levels compute bit-identical results (tested in
//! `maskdiff_network::kernels::isa_equality`), so only the time differs.
//!
//! `cargo run --release -p maskdiff-train --example isa_levels -- [--rounds R] [--iters N]
//!  [--batch B] [--len N] [--preset NAME]`
//! The last lines are machine-readable: `isa=<level> kernels_s=… forward_tok_s=… train_tok_s=…`.

#[path = "common/args.rs"]
mod args;
use args::arg;
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::isa::{self, Level};
use maskdiff_network::{Kernels, MlpKind, NetworkConfig, Rope};
use maskdiff_process::DenoiseBatch;
use maskdiff_train::{LrSchedule, TrainBatch, TrainConfig, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

type Err = Box<dyn std::error::Error>;

/// Inputs of the fused kernels at the preset's activation shapes.
struct KernelInputs {
    scores: Tensor<(usize, usize, usize, usize), f32, Cpu>,
    x: Tensor<(usize, usize), f32, Cpu>,
    ffn_a: Tensor<(usize, usize), f32, Cpu>,
    ffn_u: Tensor<(usize, usize), f32, Cpu>,
    cond: Tensor<(usize, usize), f32, Cpu>,
    scale: Tensor<(usize,), f32, Cpu>,
    rope: Rope<f32, Cpu>,
    dims: (usize, usize, usize),
}

/// One forward + backward sweep through each fused element-wise kernel (softmax over the
/// attention scores, LayerNorm, RMSNorm, adaLN modulation, gated residual, GLU, RoPE).
fn kernels_once(k: &KernelInputs) -> Result<f32, Err> {
    let (b, n, h) = k.dims;
    let mut total = 0.0f32;
    let p = Cpu::softmax_last(k.scores.clone().leaky_traced())?;
    total += p.sum().backward().get(&k.scores).as_vec()[0];
    let y = Cpu::layer_norm(k.x.clone().leaky_traced())?;
    total += y.sum().backward().get(&k.x).as_vec()[0];
    let y = Cpu::rms_norm(k.x.clone().leaky_traced(), k.scale.clone())?;
    total += y.sum().backward().get(&k.x).as_vec()[0];
    let y = Cpu::modulate(
        k.x.clone().leaky_traced(),
        k.cond.clone().leaky_traced(),
        k.cond.clone().leaky_traced(),
        b,
        n,
    )?;
    total += y.sum().backward().get(&k.x).as_vec()[0];
    let y = Cpu::gated_residual(
        k.x.clone().leaky_traced(),
        k.x.clone().leaky_traced(),
        k.cond.clone().leaky_traced(),
        b,
        n,
    )?;
    total += y.sum().backward().get(&k.x).as_vec()[0];
    let y = Cpu::glu(
        MlpKind::Glu,
        k.ffn_a.clone().leaky_traced(),
        k.ffn_u.clone().leaky_traced(),
    )?;
    total += y.sum().backward().get(&k.ffn_a).as_vec()[0];
    let y = Cpu::rope(&k.rope, k.x.clone().leaky_traced(), b, n, h, 0.5)?;
    total += y.sum().backward().get(&k.x).as_vec()[0];
    Ok(total)
}

/// Big blocks on cache lines (AMX tile loads of the bf16 products; see the type).
#[global_allocator]
static ALLOC: maskdiff_network::CacheLineAlloc = maskdiff_network::CacheLineAlloc;

fn main() -> Result<(), Err> {
    maskdiff_network::tune_allocator();
    maskdiff_network::tune_threads();
    args::only(&["--batch", "--iters", "--len", "--preset", "--rounds"]);
    let dev = Cpu::default();
    let (rounds, iters) = (
        arg("--rounds", 3usize).max(1),
        arg("--iters", 3usize).max(1),
    );
    let (v, n, b) = (27usize, arg("--len", 256usize), arg("--batch", 16usize));
    let preset: String = arg("--preset", "cpu-small".to_string());
    let mut cfg = NetworkConfig::preset(&preset, v)?;
    cfg.max_len = cfg.max_len.max(n);
    let levels = isa::supported();
    println!(
        "preset {preset}, batch {b} x {n}; detected {}, process level {}; levels compared: {}",
        isa::detected(),
        isa::isa(),
        levels
            .iter()
            .map(|l| l.isa().name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let (d, h, hidden) = (cfg.dim, cfg.n_heads, cfg.ffn_hidden_dim());
    let mut rng = StdRng::seed_from_u64(0);
    let mut normal =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen::<f32>() - 0.5).collect() };
    let k = KernelInputs {
        scores: dev.tensor_from_vec(normal(b * h * n * n), (b, h, n, n)),
        x: dev.tensor_from_vec(normal(b * n * d), (b * n, d)),
        ffn_a: dev.tensor_from_vec(normal(b * n * hidden), (b * n, hidden)),
        ffn_u: dev.tensor_from_vec(normal(b * n * hidden), (b * n, hidden)),
        cond: dev.tensor_from_vec(normal(b * d), (b, d)),
        scale: dev.tensor_from_vec(normal(d), (d,)),
        rope: Rope::new(&dev, n, d / h, 10_000.0)?,
        dims: (b, n, h),
    };

    let train_cfg = TrainConfig {
        lr: LrSchedule::cosine(3e-4, 0, 1_000_000),
        ..Default::default()
    };
    let mut trainer = Trainer::<_, maskdiff_objective::Md4>::new(cfg, train_cfg, 0, &dev)?;
    let (x0, xt, t) = args::random_batch(&mut rng, v, b, n);
    let input = DenoiseBatch {
        ids: &xt,
        batch: b,
        len: n,
        t: &t,
        labels: None,
    };
    let batch = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };

    // best[level] = (kernels s, forward s, train step s)
    let mut best = vec![(f64::INFINITY, f64::INFINITY, f64::INFINITY); levels.len()];
    let time = |f: &mut dyn FnMut() -> Result<(), Err>| -> Result<f64, Err> {
        let s = Instant::now();
        f()?;
        Ok(s.elapsed().as_secs_f64())
    };
    for round in 0..=rounds {
        for (i, &level) in levels.iter().enumerate() {
            isa::with_level(level, || -> Result<(), Err> {
                for _ in 0..iters {
                    let tk = time(&mut || kernels_once(&k).map(|_| ()))?;
                    let tf = time(&mut || {
                        let logits = trainer.model().forward(&input, NoneTape, None)?;
                        let _ = logits.as_vec();
                        Ok(())
                    })?;
                    let ts = time(&mut || trainer.step(&batch).map(|_| ()).map_err(Into::into))?;
                    // round 0 warms every level up (page faults, caches) and is not counted
                    if round > 0 {
                        let e = &mut best[i];
                        *e = (e.0.min(tk), e.1.min(tf), e.2.min(ts));
                    }
                }
                Ok(())
            })?;
        }
    }
    let tokens = (b * n) as f64;
    let base = best[0];
    for (level, &(tk, tf, ts)) in levels.iter().zip(&best) {
        println!(
            "{:>8}: fused kernels {:.1} ms ({:.2}x portable), forward {:.0} tok/s ({:.2}x), \
             train step {:.0} tok/s ({:.2}x)",
            level.isa().name(),
            tk * 1e3,
            base.0 / tk,
            tokens / tf,
            base.1 / tf,
            tokens / ts,
            base.2 / ts,
        );
    }
    for (level, &(tk, tf, ts)) in levels.iter().zip(&best) {
        print_line(*level, tk, tokens / tf, tokens / ts);
    }
    Ok(())
}

fn print_line(level: Level, kernels_s: f64, fwd: f64, train: f64) {
    println!(
        "isa={} kernels_s={kernels_s:.5} forward_tok_s={fwd:.1} train_tok_s={train:.1}",
        level.isa().name()
    );
}
