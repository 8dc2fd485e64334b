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

/// Initialisation seeds of the paired runs.
const SEEDS: std::ops::Range<u64> = 40..48;

/// Steps over which the two runs of a seed stay coupled.
const COUPLED: usize = 16;

/// Tolerances. While the two runs of a seed are still coupled (the first 16 steps: same
/// initialisation, batches and noise, only the products' rounding differs) each step's
/// training loss is within 0.1 % (relative) of the f32 run's (observed: ≤ 5·10⁻⁵; by step 35
/// up to 12 %, the 50-step windows' means up to 4 %, a seed change 10 %). Afterwards
/// the trajectories drift apart as runs from different initialisation seeds do: a single
/// seed's final test NELBO can differ by as much as a seed change, and by how much depends
/// on the machine (the f32 run's rounding follows the CPU's gemm kernels; the bf16 run is
/// bit-identical everywhere). Seed 42 alone, bf16 − f32: +0.042 nats/token on an AMD EPYC
/// Zen 4 (AVX-512), +0.083 on an AMD EPYC Zen 1 (AVX2), while the two f32 seeds 42 and 43
/// were 0.009 apart there. So the final NELBO is checked over 8 seeds as a paired comparison:
/// the mean of the differences bf16 − f32 must be within 3 standard errors of zero (plus
/// 0.01 nats/token), i.e. bf16 adds no bias a user would see; a broken bf16 path (a bias of
/// 0.1 nats/token, or a model that does not learn) fails it. Observed over seeds 40–47:
/// differences −0.083…+0.064, means 0.7463 (bf16) and 0.7481 (f32) on the Zen 4; −0.083…
/// +0.083, mean +0.0037, sd 0.052 (bound 0.065) on the Zen 1.
#[test]
fn bf16_training_follows_f32() {
    let mut diffs = Vec::new();
    let mut f32_nelbo = Vec::new();
    for seed in SEEDS {
        let (l32, e32) = run(Precision::F32, seed);
        let (l16, e16) = run(Precision::Bf16, seed);
        assert_ne!(
            l32, l16,
            "the bf16 run computed the same losses: bf16 path not taken"
        );
        for (i, (a, b)) in l32.iter().zip(&l16).take(COUPLED).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * a,
                "seed {seed}, step {i}: f32 loss {a} vs bf16 {b}"
            );
        }
        diffs.push(e16 - e32);
        f32_nelbo.push(e32);
    }
    let n = diffs.len() as f64;
    let mean = diffs.iter().sum::<f64>() / n;
    let sd = (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let f32_mean = f32_nelbo.iter().sum::<f64>() / n;
    assert!(
        f32_mean < 0.6 * (V as f64).ln(),
        "the f32 runs did not learn: {f32_nelbo:?}"
    );
    assert!(
        mean.abs() <= 3.0 * sd / n.sqrt() + 0.01,
        "bf16 − f32 test NELBO over seeds {SEEDS:?}: mean {mean:+.4}, sd {sd:.4}: {diffs:?}"
    );
}
