//! Helpers shared by the block-diffusion tests (`tests/block.rs`, `tests/block_genmd4.rs`,
//! `tests/block_time.rs`): tiny networks with random parameters, the same parameters under
//! another block size, mean and standard error, and the exact enumeration of a toy block
//! network's predictions over all 2^N mask patterns (BD3-LM eq. (6)–(8) by brute force).
#![allow(dead_code)] // each test file uses its own subset

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig};
use maskdiff_objective::block_input;
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A tiny network with every parameter uniform in ±`scale` (so every path carries signal).
pub fn net(
    v: usize,
    block: Option<usize>,
    time: bool,
    seed: u64,
    scale: f32,
) -> Md4Transformer<f32, Cpu> {
    let mut cfg = NetworkConfig::preset("tiny", v).unwrap();
    cfg.time_conditioning = time;
    cfg.block_size = block;
    let mut m = cfg.init::<f32, Cpu>(&Cpu::default(), 0).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for p in m.params_mut() {
        let vals: Vec<f32> = (0..p.numel())
            .map(|_| scale * (rng.gen::<f32>() * 2.0 - 1.0))
            .collect();
        p.value = Cpu::default().tensor_from_vec(vals, (p.numel(),));
    }
    m
}

/// The same parameters under another block size (block_size changes no parameter).
pub fn with_block(m: &Md4Transformer<f32, Cpu>, block: Option<usize>) -> Md4Transformer<f32, Cpu> {
    let mut cfg = m.config().clone();
    cfg.block_size = block;
    let mut out = cfg.init::<f32, Cpu>(&Cpu::default(), 0).unwrap();
    for (d, s) in out.params_mut().into_iter().zip(m.params()) {
        d.value = s.value.clone();
    }
    out
}

/// Mean and standard error of the mean.
pub fn mean_se(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

/// log softmax of a row, in f64.
pub fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

/// −log softmax(row)[k].
pub fn nll(row: &[f32], k: usize) -> f64 {
    -log_softmax(row)[k]
}

/// x_0 with the positions of `pattern` (bit n set = position n masked) replaced by the mask id.
pub fn masked(x0: &[u32], pattern: usize, v: usize) -> Vec<u32> {
    (0..x0.len())
        .map(|i| {
            if pattern >> i & 1 == 1 {
                v as u32
            } else {
                x0[i]
            }
        })
        .collect()
}

/// log μ of a time-free block network for every mask pattern of `x0`: `[pattern][n][token]`
/// (one network call per pattern, on `[x_t ; x_0]`).
pub fn pattern_log_mu(m: &Md4Transformer<f32, Cpu>, x0: &[u32], v: usize) -> Vec<Vec<Vec<f64>>> {
    let n = x0.len();
    (0..1usize << n)
        .map(|s| {
            let xt = masked(x0, s, v);
            let ids = block_input(&xt, x0, 1, n);
            let batch = DenoiseBatch {
                ids: &ids,
                batch: 1,
                len: 2 * n,
                t: &[0.5],
                labels: None,
            };
            let logits = m.forward(&batch, NoneTape, None).unwrap().as_vec();
            (0..n)
                .map(|i| log_softmax(&logits[i * v..(i + 1) * v]))
                .collect()
        })
        .collect()
}

/// ∫ from a0 to a1 of f by composite Simpson with `k` (even) intervals.
pub fn simpson(f: impl Fn(f64) -> f64, a0: f64, a1: f64, k: usize) -> f64 {
    let h = (a1 - a0) / k as f64;
    let mut s = f(a0) + f(a1);
    for i in 1..k {
        s += f(a0 + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    s * h / 3.0
}

/// The validation path (`Objective::eval_nelbo`: one (t, x_t) per copy, the objective's own time
/// draws) over 6000 copies of `x0` is unbiased: its mean minus `offset` (the reconstruction term
/// where `exact` leaves it out) is within 4 standard errors of the enumerated `exact`.
pub fn assert_eval_nelbo_unbiased(
    obj: &impl maskdiff_objective::Objective<Cpu>,
    m: &Md4Transformer<f32, Cpu>,
    x0: &[u32],
    v: usize,
    offset: f64,
    exact: f64,
) {
    let copies = 6000;
    let xs: Vec<u32> = (0..copies).flat_map(|_| x0.iter().copied()).collect();
    let clean = maskdiff_objective::CleanBatch::new(&xs, copies, x0.len(), v, None).unwrap();
    let per = obj
        .eval_nelbo(
            &maskdiff_train::ModelNet(m),
            &clean,
            &mut StdRng::seed_from_u64(8),
        )
        .unwrap();
    let d: Vec<f64> = per.iter().map(|x| x - offset).collect();
    let (mean, se) = mean_se(&d);
    assert!(
        se > 0.0 && (mean - exact).abs() < 4.0 * se,
        "{mean} ± {se} vs exact {exact}"
    );
}
