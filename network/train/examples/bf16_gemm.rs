//! bf16 against f32 matrix products (benchmark, not a test): the dense-layer products of a
//! `cpu-small` training step (batch 16 × 256 tokens: x (4096, k) @ w (k, n) for the q/k/v/o,
//! FFN and output shapes) through the public `Kernels::matmul` of the CPU device, at f32 and at
//! `Precision::Bf16` (bf16 inputs, f32 accumulation: AMX tiles where the CPU and OS allow them,
//! else the AVX512-BF16 `vdpbf16ps` microkernel where the CPU has it, else a portable loop), timed alternately in one process so both see
//! the same machine load. Prints the CPU's kernel level and, per shape, the best GFLOP/s of each
//! precision over `--rounds` alternations of `--iters` products, and the ratio bf16 / f32.
//! Then the same for the attention op (`Kernels::attention`, cpu-small: 16 sequences × 256
//! positions, 4 heads of 64; its six per-head products run bf16 inputs at `Precision::Bf16`):
//! the tape-free forward, and forward + backward.
//!
//! `cargo run --release -p maskdiff-train --example bf16_gemm -- [--rounds 5] [--iters 5]
//!  [--m 4096]`
//! Per shape also the dense layer's forward + backward (the forward product, dX = dY Wᵀ and
//! dW = Xᵀ dY, with Σ y as the loss). Run it with `MASKDIFF_ISA=avx512` beside the default to
//! compare AMX tiles with `vdpbf16ps` on a CPU that has both.
//! Last line, machine-readable: `bf16_gemm mean_ratio=… dense_train_ratio=… attention_forward_ratio=…
//! attention_train_ratio=… bf16_hardware=…`.

#[path = "common/args.rs"]
mod args;
use args::arg;
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{precision, with_precision, Kernels, Precision};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

/// Best seconds of `iters` runs of `f` at precision `p`.
fn best_secs(p: Precision, iters: usize, mut f: impl FnMut()) -> f64 {
    with_precision(p, || {
        (0..iters)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    })
}

type T2 = Tensor<(usize, usize), f32, Cpu>;

/// Best seconds of `iters` products x @ w at precision `p`.
fn best_time(p: Precision, x: &T2, w: &T2, iters: usize) -> f64 {
    best_secs(p, iters, || {
        let y = <Cpu as Kernels<f32>>::matmul(x.clone(), w.clone()).expect("matmul");
        std::hint::black_box(y);
    })
}

/// Best seconds of `iters` dense-layer forward + backward passes (y = x @ w, Σ y as the loss:
/// the forward product, dX = dY Wᵀ and dW = Xᵀ dY) at precision `p`.
fn dense_train_time(p: Precision, x: &T2, w: &T2, iters: usize) -> f64 {
    best_secs(p, iters, || {
        let y = <Cpu as Kernels<f32>>::matmul(x.leaky_trace(), w.clone()).expect("matmul");
        std::hint::black_box(y.sum().backward());
    })
}

type T4 = Tensor<(usize, usize, usize, usize), f32, Cpu>;

/// Best seconds of `iters` attention calls at precision `p`: tape-free forward, or forward and
/// backward (Σ of the output as the loss) with `train`.
fn attention_time(p: Precision, (q, k, v): (&T4, &T4, &T4), train: bool, iters: usize) -> f64 {
    best_secs(p, iters, || {
        if train {
            let o =
                <Cpu as Kernels<f32>>::attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
                    .expect("attention");
            std::hint::black_box(o.sum().backward());
        } else {
            let o = <Cpu as Kernels<f32>>::attention(q.clone(), k.clone(), v.clone())
                .expect("attention");
            std::hint::black_box(o);
        }
    })
}

fn main() {
    maskdiff_network::tune_allocator();
    maskdiff_network::tune_threads();
    args::only(&["--iters", "--m", "--rounds"]);
    let (rounds, iters, m) = (
        arg("--rounds", 5usize).max(1),
        arg("--iters", 5usize).max(1),
        arg("--m", 4096usize),
    );
    let dev = Cpu::default();
    let hw = precision::bf16_hardware();
    println!(
        "kernels {}, bf16 products: {}, RAYON_NUM_THREADS {}, m = {m}",
        maskdiff_network::isa::isa(),
        if maskdiff_network::isa::level().amx().is_some() {
            "AMX tiles"
        } else if hw {
            "AVX512-BF16 (vdpbf16ps)"
        } else {
            "portable loop"
        },
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset (all cores)".into())
    );
    let mut rng = StdRng::seed_from_u64(0);
    let mut rand = |r: usize, c: usize| {
        let v: Vec<f32> = (0..r * c).map(|_| rng.gen::<f32>() - 0.5).collect();
        dev.tensor_from_vec(v, (r, c))
    };
    // (k, n): q/k/v/o projections, the FFN's gate/up and down, the output layer (V = 27)
    let shapes = [(256, 256), (256, 704), (704, 256), (256, 27)];
    let (mut ratios, mut train_ratios) = (Vec::new(), Vec::new());
    for (k, n) in shapes {
        let (x, w) = (rand(m, k), rand(k, n));
        let (mut f32_best, mut bf16_best) = (f64::INFINITY, f64::INFINITY);
        best_time(Precision::F32, &x, &w, 1); // warm-up
        best_time(Precision::Bf16, &x, &w, 1);
        for _ in 0..rounds {
            f32_best = f32_best.min(best_time(Precision::F32, &x, &w, iters));
            bf16_best = bf16_best.min(best_time(Precision::Bf16, &x, &w, iters));
        }
        let gf = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
        println!(
            "({m} x {k}) @ ({k} x {n}): f32 {:.1} GFLOP/s, bf16 {:.1} GFLOP/s, bf16/f32 {:.2}x",
            gf(f32_best),
            gf(bf16_best),
            f32_best / bf16_best
        );
        ratios.push(f32_best / bf16_best);
        let (mut f32_train, mut bf16_train) = (f64::INFINITY, f64::INFINITY);
        dense_train_time(Precision::F32, &x, &w, 1);
        dense_train_time(Precision::Bf16, &x, &w, 1);
        for _ in 0..rounds {
            f32_train = f32_train.min(dense_train_time(Precision::F32, &x, &w, iters));
            bf16_train = bf16_train.min(dense_train_time(Precision::Bf16, &x, &w, iters));
        }
        println!(
            "  forward + backward (3 products): f32 {:.1} GFLOP/s, bf16 {:.1} GFLOP/s, bf16/f32 {:.2}x",
            3.0 * gf(f32_train),
            3.0 * gf(bf16_train),
            f32_train / bf16_train
        );
        train_ratios.push(f32_train / bf16_train);
    }
    let train_mean = train_ratios.iter().sum::<f64>() / train_ratios.len() as f64;
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    // attention at cpu-small's shape (q already scaled: entries of a few tenths)
    let (b, n, h, hd) = (16, 256, 4, 64);
    let mut t4 = |s: f32| -> T4 {
        let v: Vec<f32> = (0..b * n * h * hd)
            .map(|_| (rng.gen::<f32>() - 0.5) * s)
            .collect();
        dev.tensor_from_vec(v, (b, n, h, hd))
    };
    let (q, k, v) = (t4(0.5), t4(2.0), t4(2.0));
    let mut att = Vec::new();
    for train in [false, true] {
        let qkv = (&q, &k, &v);
        attention_time(Precision::F32, qkv, train, 1); // warm-up
        attention_time(Precision::Bf16, qkv, train, 1);
        let (mut f32_best, mut bf16_best) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..rounds {
            f32_best = f32_best.min(attention_time(Precision::F32, qkv, train, iters));
            bf16_best = bf16_best.min(attention_time(Precision::Bf16, qkv, train, iters));
        }
        println!(
            "attention {b} x {n}, {h} heads of {hd}, {}: f32 {:.2} ms, bf16 {:.2} ms, bf16/f32 {:.2}x",
            if train { "forward + backward" } else { "forward" },
            f32_best * 1e3,
            bf16_best * 1e3,
            f32_best / bf16_best
        );
        att.push(f32_best / bf16_best);
    }
    println!(
        "bf16_gemm mean_ratio={mean:.3} dense_train_ratio={train_mean:.3} attention_forward_ratio={:.3} attention_train_ratio={:.3} bf16_hardware={hw}",
        att[0], att[1]
    );
}
