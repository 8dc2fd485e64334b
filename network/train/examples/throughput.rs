//! Throughput benchmark (not a test): an MD4 transformer preset (default `cpu-small`: vocab
//! 27 plus the mask, length 256, width 256, 4 layers, 4 heads, GLU), batch 16, f32, on dfdx's CPU device
//! (or CUDA with `--features cuda` and `--device cuda`): (a) forward (no tape) and (b) a full
//! training step (masking, forward, MD4 loss, backward, gradient norm, AdamW, EMA), in tokens
//! per second of the fastest timed iteration (other processes only ever add time), and the peak
//! resident memory of each phase (Linux: VmHWM, reset between phases through
//! /proc/self/clear_refs).
//!
//! `cargo run --release -p maskdiff-train --example throughput -- [--iters N] [--warmup N]
//!  [--batch B] [--len N] [--preset NAME] [--vocab V] [--device cpu|cuda] [--no-forward]
//!  [--precision f32|bf16] [--no-train] [--log-probs] [--image HxWxC]`
//! With an image preset (`unet-small`, ...) the sequence is one `--image` (default 28x28x1,
//! Fashion-MNIST's shape; give `--vocab 256` for 8-bit pixels) and `--len` is ignored.
//! `--log-probs` times the forward phase through `log_probs` (forward, log-softmax and the host
//! copy: what sampling and evaluation call) instead of the bare forward pass.
//! The last line is machine-readable: `maskdiff forward_tok_s=… train_tok_s=…
//! train_peak_rss_mb=… train_rss_growth_mb=… precision=…` (`bf16`: the dense layers' and
//! attention's products with bf16 inputs; on a CPU without AVX512-BF16 it runs f32 and says
//! `precision=f32`).

#[path = "common/mem.rs"]
mod mem;

#[path = "common/args.rs"]
mod args;
use args::{arg, flag};
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{set_precision, Kernels, NetworkConfig, Precision};
use maskdiff_process::DenoiseBatch;
use maskdiff_train::{LrSchedule, TrainBatch, TrainConfig, Trainer};
use rand::{rngs::StdRng, SeedableRng};
use std::time::Instant;

/// (fastest, median) of the timings.
fn summary(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    (xs[0], xs[xs.len() / 2])
}

fn run<D: Kernels<f32>>(dev: &D) -> Result<(), Box<dyn std::error::Error>> {
    let (iters, warmup) = (arg("--iters", 10usize).max(1), arg("--warmup", 2usize));
    let (v, n, b) = (
        arg("--vocab", 27usize),
        arg("--len", 256usize),
        arg("--batch", 16usize),
    );
    let preset: String = arg("--preset", "cpu-small".to_string());
    let want = arg("--precision", "f32".to_string());
    let mut precision = Precision::parse(&want).ok_or(format!("unknown precision {want:?}"))?;
    if precision == Precision::Bf16 && !maskdiff_network::precision::bf16_hardware() {
        println!("no AVX512-BF16 at the kernels' level: running f32");
        precision = Precision::F32;
    }
    set_precision(precision);
    let mut cfg = NetworkConfig::preset(&preset, v)?;
    // an image network (U-Net) is built for one image shape: `--image HxWxC` (default 28x28x1)
    let n = if cfg.image().is_some() {
        let img: String = arg("--image", "28x28x1".to_string());
        let d: Vec<usize> = img.split('x').filter_map(|s| s.parse().ok()).collect();
        let [h, w, c] = d[..] else {
            return Err(format!("--image {img:?} is not HxWxC").into());
        };
        cfg.set_image(h, w, c)?;
        h * w * c
    } else {
        cfg.max_len = cfg.max_len.max(n);
        n
    };
    let train_cfg = TrainConfig {
        lr: LrSchedule::cosine(3e-4, 0, 1_000_000),
        ..Default::default()
    };
    let mut trainer = Trainer::<_, maskdiff_objective::Md4>::new(cfg.clone(), train_cfg, 0, dev)?;
    println!(
        "model {preset}: {} parameters, ffn hidden {}, batch {b}, len {n}, rayon threads {}, \
         kernels {}, precision {precision}",
        trainer.model().num_params(),
        cfg.ffn_hidden_dim(),
        rayon_threads(),
        maskdiff_network::isa::isa()
    );
    let mut rng = StdRng::seed_from_u64(0);
    let (x0, xt, t) = args::random_batch(&mut rng, v, b, n);
    let input = DenoiseBatch {
        ids: &xt,
        batch: b,
        len: n,
        t: &t,
        labels: None,
    };
    let tokens = (b * n) as f64;

    let mut fwd_tok_s = f64::NAN;
    let rss0 = mem::reset_peak();
    if !flag("--no-forward") {
        let mut fwd = Vec::new();
        for i in 0..warmup + iters {
            let s = Instant::now();
            if flag("--log-probs") {
                let lp = trainer.model().log_probs(&input)?;
                assert_eq!(lp.data.len(), b * n * v);
            } else {
                let logits = trainer.model().forward(&input, NoneTape, None)?;
                let _ = logits.as_vec(); // synchronise
            }
            if i >= warmup {
                fwd.push(s.elapsed().as_secs_f64());
            }
        }
        let (f, fm) = summary(fwd);
        println!(
            "forward: best {f:.4} s/batch, median {fm:.4}, peak RSS {:.1} MB (+{:.1} over the model)",
            mem::peak_mb(),
            mem::peak_mb() - rss0
        );
        fwd_tok_s = tokens / f;
    }
    if flag("--no-train") {
        println!("maskdiff forward_tok_s={fwd_tok_s:.1} precision={precision}");
        return Ok(());
    }
    let batch = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };
    let rss1 = mem::reset_peak();
    let mut step = Vec::new();
    for i in 0..warmup + iters {
        let s = Instant::now();
        trainer.step(&batch)?;
        if i >= warmup {
            step.push(s.elapsed().as_secs_f64());
        }
    }
    let (s, sm) = summary(step);
    let (peak, growth) = (mem::peak_mb(), mem::peak_mb() - rss1);
    println!(
        "train step: best {s:.4} s/step, median {sm:.4}, peak RSS {peak:.1} MB (+{growth:.1})"
    );
    println!(
        "maskdiff forward_tok_s={fwd_tok_s:.1} train_tok_s={:.1} train_peak_rss_mb={peak:.1} \
         train_rss_growth_mb={growth:.1} precision={precision}",
        tokens / s
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
        "--batch",
        "--device",
        "--image",
        "--iters",
        "--len",
        "--log-probs",
        "--no-forward",
        "--no-train",
        "--precision",
        "--preset",
        "--vocab",
        "--warmup",
    ]);
    match arg("--device", "cpu".to_string()).as_str() {
        "cpu" => run(&Cpu::default()),
        #[cfg(feature = "cuda")]
        "cuda" => run(&maskdiff_network::dfdx::tensor::Cuda::default()),
        other => Err(format!("unknown or not compiled-in device {other:?}").into()),
    }
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default (all cores)".into())
}
