//! bf16 against f32 matrix products (benchmark, not a test): the dense-layer products of a
//! `cpu-small` training step (batch 16 × 256 tokens: x (4096, k) @ w (k, n) for the q/k/v/o,
//! FFN and output shapes) through the public `Kernels::matmul` of the CPU device, at f32 and at
//! `Precision::Bf16` (bf16 inputs, f32 accumulation: the AVX512-BF16 `vdpbf16ps` microkernel
//! where the CPU has it, else a portable loop), timed alternately in one process so both see
//! the same machine load. Prints the CPU's kernel level and, per shape, the best GFLOP/s of each
//! precision over `--rounds` alternations of `--iters` products, and the ratio bf16 / f32.
//!
//! `cargo run --release -p maskdiff-train --example bf16_gemm -- [--rounds 5] [--iters 5]
//!  [--m 4096]`
//! Last line, machine-readable: `bf16_gemm mean_ratio=… bf16_hardware=…`.

#[path = "common/args.rs"]
mod args;
use args::arg;
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{precision, with_precision, Kernels, Precision};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::time::Instant;

/// Best seconds of `iters` products x @ w at precision `p`.
fn best_time(
    p: Precision,
    x: &Tensor<(usize, usize), f32, Cpu>,
    w: &Tensor<(usize, usize), f32, Cpu>,
    iters: usize,
) -> f64 {
    with_precision(p, || {
        (0..iters)
            .map(|_| {
                let s = Instant::now();
                let y = <Cpu as Kernels<f32>>::matmul(x.clone(), w.clone()).expect("matmul");
                std::hint::black_box(y);
                s.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    })
}

fn main() {
    let (rounds, iters, m) = (
        arg("--rounds", 5usize).max(1),
        arg("--iters", 5usize).max(1),
        arg("--m", 4096usize),
    );
    let dev = Cpu::default();
    let hw = precision::bf16_hardware();
    println!(
        "kernels {}, AVX512-BF16 products: {}, RAYON_NUM_THREADS {}, m = {m}",
        maskdiff_network::isa::isa(),
        if hw { "yes" } else { "no (portable bf16 loop)" },
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset (all cores)".into())
    );
    let mut rng = StdRng::seed_from_u64(0);
    let mut rand = |r: usize, c: usize| {
        let v: Vec<f32> = (0..r * c).map(|_| rng.gen::<f32>() - 0.5).collect();
        dev.tensor_from_vec(v, (r, c))
    };
    // (k, n): q/k/v/o projections, the FFN's gate/up and down, the output layer (V = 27)
    let shapes = [(256, 256), (256, 704), (704, 256), (256, 27)];
    let mut ratios = Vec::new();
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
    }
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    println!("bf16_gemm mean_ratio={mean:.3} bf16_hardware={hw}");
}
