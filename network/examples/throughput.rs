//! Throughput benchmark (not a test): the `cpu-small` MD4 transformer (vocab 27 + mask, length
//! 256, width 256, 4 layers, 4 heads, GLU), batch 16, f32, on dfdx's CPU device:
//! (a) forward (no tape) and (b) a full training step (masking, forward, MD4 loss, backward,
//! gradient norm, AdamW, EMA), in tokens per second (median over timed iterations).
//!
//! `cargo run --release -p maskdiff-network --example throughput -- [--iters N] [--warmup N]`
//! The last line is machine-readable: `maskdiff forward_tok_s=… train_tok_s=…`.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::train::{LrSchedule, TrainBatch, TrainConfig, Trainer};
use maskdiff_network::NetworkConfig;
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// (fastest, median) of the timings.
fn summary(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    (xs[0], xs[xs.len() / 2])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (iters, warmup) = (arg("--iters", 10).max(1), arg("--warmup", 2));
    let (v, n, b) = (27usize, 256usize, 16usize);
    let cfg = NetworkConfig::preset("cpu-small", v)?;
    let dev = Cpu::default();
    let train_cfg = TrainConfig {
        lr: LrSchedule {
            peak: 3e-4,
            warmup_steps: 0,
            total_steps: 1_000_000,
        },
        ..Default::default()
    };
    let mut trainer = Trainer::new(cfg.clone(), train_cfg, 0, &dev)?;
    println!(
        "model cpu-small: {} parameters, ffn hidden {}, batch {b}, len {n}, rayon threads {}",
        trainer.model().num_params(),
        cfg.ffn_hidden_dim(),
        rayon_threads()
    );
    let mut rng = StdRng::seed_from_u64(0);
    let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
    // half-masked inputs for the forward pass
    let xt: Vec<u32> = x0
        .iter()
        .map(|&x| if rng.gen::<bool>() { x } else { v as u32 })
        .collect();
    let t: Vec<f64> = (0..b).map(|i| (i as f64 + 0.5) / b as f64).collect();
    let input = DenoiseBatch {
        ids: &xt,
        batch: b,
        len: n,
        t: &t,
        labels: None,
    };

    let mut fwd = Vec::new();
    for i in 0..warmup + iters {
        let s = Instant::now();
        let logits = trainer.model().forward(&input, NoneTape, None)?;
        let _ = logits.as_vec(); // synchronise
        if i >= warmup {
            fwd.push(s.elapsed().as_secs_f64());
        }
    }
    let batch = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };
    let mut step = Vec::new();
    for i in 0..warmup + iters {
        let s = Instant::now();
        trainer.step(&batch)?;
        if i >= warmup {
            step.push(s.elapsed().as_secs_f64());
        }
    }
    let ((f, fm), (s, sm)) = (summary(fwd), summary(step));
    let tokens = (b * n) as f64;
    println!("forward: best {f:.4} s/batch, median {fm:.4}");
    println!("train step: best {s:.4} s/step, median {sm:.4}");
    println!(
        "maskdiff forward_tok_s={:.1} train_tok_s={:.1}",
        tokens / f,
        tokens / s
    );
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default (all cores)".into())
}
