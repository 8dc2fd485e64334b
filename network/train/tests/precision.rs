//! bf16 mixed precision in the training step (issue 13): with the dense layers' and
//! attention's products at bf16 (inputs rounded, f32 accumulation, f32 master weights and AdamW
//! state) a tiny model
//! trained on a Markov chain follows the f32 run — same batches, same noise, same seed — to
//! within a stated tolerance, while actually computing something different.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{with_precision, NetworkConfig, Precision};
use maskdiff_objective::Md4;
use maskdiff_train::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

const V: usize = 4;
const N: usize = 16;
const B: usize = 32;
const STEPS: usize = 300;

/// Sequences of the chain i → i + 1 (mod V) with probability 0.85, else any other state.
fn chain(rng: &mut StdRng, count: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(count * N);
    for _ in 0..count {
        let mut s = rng.gen_range(0..V);
        for _ in 0..N {
            out.push(s as u32);
            s = if rng.gen::<f64>() < 0.85 {
                (s + 1) % V
            } else {
                (s + 1 + rng.gen_range(1..V)) % V
            };
        }
    }
    out
}

/// (per-step training losses, final test NELBO in nats/token) at precision `p`.
fn run(p: Precision, seed: u64) -> (Vec<f64>, f64) {
    with_precision(p, || {
        let dev = Cpu::default();
        let cfg = TrainConfig {
            lr: LrSchedule::cosine(3e-3, 20, STEPS as u64),
            ema_decay: 0.0,
            ..Default::default()
        };
        let net = NetworkConfig::preset("tiny", V).unwrap();
        let mut t = Trainer::<_, Md4>::new(net, cfg, seed, &dev).unwrap();
        let mut data = StdRng::seed_from_u64(1);
        let losses = (0..STEPS)
            .map(|_| {
                let x0 = chain(&mut data, B);
                let tb = TrainBatch {
                    x0: &x0,
                    batch: B,
                    len: N,
                    labels: None,
                };
                t.step(&tb).unwrap().loss
            })
            .collect();
        let test = chain(&mut StdRng::seed_from_u64(999), 256);
        let mut r = StdRng::seed_from_u64(7);
        let mut tot = 0.0;
        for _ in 0..4 {
            let tb = TrainBatch {
                x0: &test,
                batch: 256,
                len: N,
                labels: None,
            };
            tot += t.eval_loss(&tb, &mut r, true).unwrap().iter().sum::<f64>();
        }
        (losses, tot / (4.0 * 256.0 * N as f64))
    })
}

/// Tolerances. While the two runs are still coupled (the first 100 steps) each 50-step window's
/// mean training loss is within 2 % (relative) of the f32 run's; afterwards the trajectories
/// drift apart as runs from different initialisation seeds do, so every window is within 8 %
/// and the final test NELBO within 0.06 nats/token of the f32 run's and within 1.5× the distance
/// of an f32 run from another initialisation seed. Observed on an AMD EPYC (Zen 4,
/// AVX512-BF16) with the dense layers' and attention's products at bf16: window differences
/// 0.1, 0.5, 3.6, 5.6, 5.5, 5.6 % (the seed change: 4.2–15 %), test NELBO f32 0.7585, bf16
/// 0.8004, other seed 0.7093 nats/token (from ln 4 = 1.386 at the start). Over seeds 40–47 the
/// paired differences bf16 − f32 range over −0.083…+0.064 with means 0.7463 (bf16) and 0.7481
/// (f32): seed noise, not a bias.
#[test]
fn bf16_training_follows_f32() {
    let (l32, e32) = run(Precision::F32, 42);
    let (l16, e16) = run(Precision::Bf16, 42);
    let (_, es) = run(Precision::F32, 43);
    assert_ne!(
        l32, l16,
        "the bf16 run computed the same losses: bf16 path not taken"
    );
    for (w, (a, b)) in l32.chunks(50).zip(l16.chunks(50)).enumerate() {
        let (ma, mb) = (a.iter().sum::<f64>() / 50.0, b.iter().sum::<f64>() / 50.0);
        let tol = if w < 2 { 0.02 } else { 0.08 };
        assert!(
            (ma - mb).abs() <= tol * ma,
            "window {w}: f32 {ma} vs bf16 {mb}"
        );
    }
    assert!(
        e32 < 0.6 * (V as f64).ln(),
        "the f32 run did not learn: {e32}"
    );
    assert!(
        (e32 - e16).abs() <= 0.06,
        "test NELBO: f32 {e32} vs bf16 {e16}"
    );
    assert!(
        (e32 - e16).abs() <= 1.5 * (e32 - es).abs(),
        "bf16 moved the test NELBO ({e16}) further from f32's ({e32}) than 1.5× a seed change ({es})"
    );
}
