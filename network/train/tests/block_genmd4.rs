//! Block diffusion with GenMD4 inside the blocks (BD3-LM × GenMD4's learned per-token
//! exponents): `Block<GenMd4>` through the generic trainer's pieces. B = N is GenMD4 itself on
//! the same x_t, t and exponents (loss, reported numbers, θ's gradient); the block NELBO (training
//! validation path and the `Denoiser` estimator) and θ's REINFORCE gradient are unbiased against
//! the exact values worked out by enumerating mask patterns on a toy vocabulary (and central
//! differences in θ for the gradient); the trainer takes steps with it unchanged.

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Md4Transformer, NetworkConfig, NetworkDenoiser};
use maskdiff_objective::{
    Block, BlockTime, CleanBatch, EvalOptions, GenMd4, GenMd4Batch, GenMd4Options, GenMd4Stats,
    InnerSpec, Objective, ObjectiveSpec, Share,
};
use maskdiff_schedule::{inverse_softplus, softplus, GENMD4_T1};
use maskdiff_train::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

mod block_common;
use block_common::{assert_eval_nelbo_unbiased, mean_se, pattern_log_mu, with_block};

/// A tiny network with every parameter uniform in ±0.5.
fn net(v: usize, block: Option<usize>, time: bool, seed: u64) -> Md4Transformer<f32, Cpu> {
    block_common::net(v, block, time, seed, 0.5)
}

/// GenMD4's ε (official 1e−4).
const EPS: f64 = 1e-4;

/// GenMD4 as `from_settings` builds it, with exponents `w`.
fn genmd4(w: &[f64], one_sample: bool) -> GenMd4<Cpu> {
    let mut g = GenMd4::new(
        w.len(),
        GenMd4Options::default(),
        one_sample,
        &Cpu::default(),
    )
    .unwrap();
    g.set_exponents(w).unwrap();
    g
}

/// The surrogate, the micro-batch numbers and θ's gradient of a loss call (share = all of `mb`).
fn loss_and_theta_grad<O: Objective<Cpu, Noised = GenMd4Batch, Stats = GenMd4Stats>>(
    o: &O,
    m: &Md4Transformer<f32, Cpu>,
    mb: &GenMd4Batch,
) -> (f64, GenMd4Stats, Vec<f64>) {
    let b = mb.batch();
    let share = Share {
        lo: 0,
        hi: b,
        total: b,
    };
    let l = o
        .loss(&ModelNet(m), mb, None, share, &mut StdRng::seed_from_u64(0))
        .unwrap();
    let value = l.scalar.array() as f64;
    let grads = l.scalar.backward();
    let params = o.params();
    assert_eq!(params.len(), 1, "θ is the objective's one parameter");
    let g = grads.get(params[0].1).as_vec();
    (value, l.stats, g.iter().map(|&x| x as f64).collect())
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = a.iter().map(|x| x.abs()).fold(1e-12, f64::max);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn block_size_n_is_genmd4_on_the_same_noise() {
    let (v, n, b) = (6, 12, 5);
    let w = [0.5, 0.8, 1.0, 1.3, 2.0, 3.0];
    for (time, one_sample) in [(true, false), (false, true)] {
        let plain = net(v, None, time, 3);
        let g = genmd4(&w, one_sample);
        let blk = Block::with_inner(g.clone(), n).unwrap();
        assert_eq!(
            Objective::<Cpu>::spec(&blk),
            ObjectiveSpec::Block {
                block_size: n,
                inner: InnerSpec::GenMd4 { one_sample },
                time: BlockTime::Sequence,
            }
        );
        let mut rng = StdRng::seed_from_u64(9);
        let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
        let clean = CleanBatch::new(&x0, b, n, v, None).unwrap();
        let mb = g.noise(&clean, &mut rng).unwrap();
        let (a, sa, ga) = loss_and_theta_grad(&g, &plain, &mb);
        let (c, sc, gc) = loss_and_theta_grad(&blk, &with_block(&plain, Some(n)), &mb);
        assert!(a > 1.0, "a non-trivial loss {a}");
        assert!((a - c).abs() < 1e-5 * a, "GenMD4 {a} vs block B = N {c}");
        assert!(max_rel(&sa.nelbo, &sc.nelbo) < 1e-5, "{sa:?} vs {sc:?}");
        assert!(max_rel(&sa.rloo, &sc.rloo) < 1e-4, "{sa:?} vs {sc:?}");
        assert_eq!(sa.recon, sc.recon);
        assert!(ga.iter().any(|x| x.abs() > 1e-3), "θ gradient {ga:?}");
        assert!(max_rel(&ga, &gc) < 1e-4, "θ gradient {ga:?} vs {gc:?}");
        // smaller blocks change the loss and θ's gradient (the clean prefix is used)
        let blk4 = Block::with_inner(g.clone(), 4).unwrap();
        let (d, _, gd) = loss_and_theta_grad(&blk4, &with_block(&plain, Some(4)), &mb);
        assert!((a - d).abs() > 1e-3, "B = 4 should differ: {a} vs {d}");
        assert!(max_rel(&ga, &gd) > 1e-3, "{ga:?} vs {gd:?}");
    }
}

/// The exact block-GenMD4 NELBO of `x0` (official conventions: t ~ U[t1, 1) without the
/// (1 − t1) factor, reconstruction at t1) under a time-free network whose log μ for mask pattern
/// S (bit n set = position n masked) is `log_mu[S][n]`, with exponents w = softplus(θ):
///
///   1/(1 − t1) ∫_{t1}^1 Σ_S P(S | t) Σ_{n∈S} (1/t)(Σ_v w_v μ_v − w_x − w_x log μ_x) dt + recon,
///
/// P(S | t) = Π_{n∈S} (1 − ε)t^{w_{x_n}} Π_{n∉S} (1 − (1 − ε)t^{w_{x_n}}), recon =
/// Σ_n (1 − ε)t1^{w_x}(logsumexp_v(w_v ln t1) − w_x ln t1). The t integral is taken over
/// s = ln t (dt/t = ds) by composite Simpson with 400 intervals.
fn exact_nelbo(theta: &[f64], x0: &[u32], log_mu: &[Vec<Vec<f64>>]) -> f64 {
    let w: Vec<f64> = theta.iter().map(|&x| softplus(x)).collect();
    let n = x0.len();
    let t1 = GENMD4_T1;
    // per pattern, Σ_{n∈S} (Σ_v w_v μ_v − w_x − w_x log μ_x): does not depend on t
    let cost: Vec<f64> = (0..1usize << n)
        .map(|s| {
            (0..n)
                .filter(|&i| s >> i & 1 == 1)
                .map(|i| {
                    let lm = &log_mu[s][i];
                    let x = x0[i] as usize;
                    let mean_w: f64 = w.iter().zip(lm).map(|(wv, l)| wv * l.exp()).sum();
                    mean_w - w[x] - w[x] * lm[x]
                })
                .sum()
        })
        .collect();
    let f = |sv: f64| -> f64 {
        let t = sv.exp();
        let p: Vec<f64> = x0
            .iter()
            .map(|&x| (1.0 - EPS) * t.powf(w[x as usize]))
            .collect();
        (0..1usize << n)
            .map(|s| {
                let prob: f64 = (0..n)
                    .map(|i| if s >> i & 1 == 1 { p[i] } else { 1.0 - p[i] })
                    .product();
                prob * cost[s]
            })
            .sum()
    };
    let (a, b, k) = (t1.ln(), 0.0f64, 400usize);
    let h = (b - a) / k as f64;
    let mut integral = f(a) + f(b);
    for i in 1..k {
        integral += f(a + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    integral *= h / 3.0;
    let z: Vec<f64> = w.iter().map(|x| x * t1.ln()).collect();
    let zmax = z.iter().cloned().fold(f64::MIN, f64::max);
    let lse = zmax + z.iter().map(|x| (x - zmax).exp()).sum::<f64>().ln();
    let recon: f64 = x0
        .iter()
        .map(|&x| (1.0 - EPS) * t1.powf(w[x as usize]) * (lse - z[x as usize]))
        .sum();
    integral / (1.0 - t1) + recon
}

#[test]
fn block_genmd4_nelbo_and_theta_gradient_are_unbiased_against_enumeration() {
    // N = 4, V = 3, B = 2, a time-free block network with random parameters, unequal exponents.
    let (v, n, bs) = (3usize, 4usize, 2usize);
    let w = [0.6, 1.0, 1.7];
    let theta: Vec<f64> = w.iter().map(|&x| inverse_softplus(x)).collect();
    let m = net(v, Some(bs), false, 21);
    let x0: Vec<u32> = vec![2, 0, 1, 1];
    let log_mu = pattern_log_mu(&m, &x0, v);
    let exact = exact_nelbo(&theta, &x0, &log_mu);
    let blk = Block::with_inner(genmd4(&w, false), bs).unwrap();

    // (a) the validation path: one (t, x_t) per copy
    assert_eval_nelbo_unbiased(&blk, &m, &x0, v, 0.0, exact);

    // (b) the Denoiser estimator (`maskdiff eval`)
    let seqs = vec![x0.clone(); 3000];
    let mut den = NetworkDenoiser::new(m.clone());
    let opts = EvalOptions {
        mc_samples: 2,
        discrete_steps: None,
        batch_rows: 512,
        seed: 3,
    };
    let r = Objective::<Cpu>::estimate(&blk, &mut den, &seqs, None, opts, &mut |_| {}).unwrap();
    let total = r.diffusion_nats + r.recon_nats;
    assert!(
        (total - exact).abs() < 4.0 * r.stderr_nats,
        "{r:?} vs exact {exact}"
    );

    // (c) θ's gradient (pathwise + RLOO score function + recon): the mean over independent
    // chunks of copies against central differences of the exact NELBO.
    let grad_exact: Vec<f64> = (0..v)
        .map(|i| {
            let h = 1e-5;
            let (mut up, mut dn) = (theta.clone(), theta.clone());
            up[i] += h;
            dn[i] -= h;
            (exact_nelbo(&up, &x0, &log_mu) - exact_nelbo(&dn, &x0, &log_mu)) / (2.0 * h)
        })
        .collect();
    let (chunks, per_chunk) = (32, 1500);
    let xs: Vec<u32> = (0..per_chunk).flat_map(|_| x0.iter().copied()).collect();
    let clean = CleanBatch::new(&xs, per_chunk, n, v, None).unwrap();
    let mut rng = StdRng::seed_from_u64(77);
    let mut g: Vec<Vec<f64>> = vec![Vec::new(); v];
    for _ in 0..chunks {
        let mb = blk.noise(&clean, &mut rng).unwrap();
        let (_, _, gr) = loss_and_theta_grad(&blk, &m, &mb);
        for (i, x) in gr.into_iter().enumerate() {
            g[i].push(x);
        }
    }
    let scale = grad_exact.iter().map(|x| x.abs()).fold(0.0, f64::max);
    assert!(scale > 0.05, "a non-trivial exact gradient {grad_exact:?}");
    for i in 0..v {
        let (mg, se) = mean_se(&g[i]);
        eprintln!(
            "θ_{i}: block surrogate {mg:.4} ± {se:.4}, exact {:.4}",
            grad_exact[i]
        );
    }
    for i in 0..v {
        let (mg, se) = mean_se(&g[i]);
        assert!(
            (mg - grad_exact[i]).abs() <= 4.0 * se + 1e-3 * scale,
            "θ_{i}: {mg} ± {se} vs exact {}",
            grad_exact[i]
        );
        assert!(se < 0.25 * scale, "θ_{i}: too few draws, se {se}");
    }
}

#[test]
fn trainer_steps_with_genmd4_inside_blocks() {
    let v = 6;
    let mut net_cfg = NetworkConfig::preset("tiny", v).unwrap();
    net_cfg.block_size = Some(4);
    let spec = ObjectiveSpec::Block {
        block_size: 4,
        inner: InnerSpec::GenMd4 { one_sample: false },
        time: BlockTime::Sequence,
    };
    let train_cfg = TrainConfig {
        objective: spec,
        lr: LrSchedule::constant(3e-3, 0),
        ema_decay: 0.0,
        ..Default::default()
    };
    let dev = Cpu::default();
    let mut tr =
        Trainer::<Cpu, Block<GenMd4<Cpu>>>::new(net_cfg.clone(), train_cfg.clone(), 1, &dev)
            .unwrap();
    assert_eq!(Objective::<Cpu>::spec(tr.objective()), spec);
    let w0 = tr.objective().inner().exponents();
    // a deterministic pattern: token n+1 = token n + 1 mod V, so the clean prefix predicts it
    let (b, n) = (8, 16);
    let x0: Vec<u32> = (0..b)
        .flat_map(|s| (0..n).map(move |i| ((s + i) % v) as u32))
        .collect();
    let batch = TrainBatch {
        x0: &x0,
        batch: b,
        len: n,
        labels: None,
    };
    let first = tr.step(&batch).unwrap();
    let mut last = first;
    for _ in 0..40 {
        last = tr.step(&batch).unwrap();
    }
    assert!(first.loss.is_finite() && last.loss.is_finite());
    assert!(
        last.loss < 0.5 * first.loss,
        "{} -> {}",
        first.loss,
        last.loss
    );
    // the exponents are learned
    let w1 = tr.objective().inner().exponents();
    assert!(
        w0.iter().zip(&w1).any(|(a, b)| (a - b).abs() > 1e-3),
        "{w0:?} -> {w1:?}"
    );
    // the other block objective type is refused for this spec, and vice versa
    assert!(Trainer::<Cpu, Block>::new(net_cfg.clone(), train_cfg, 1, &dev).is_err());
    let md4_blocks = TrainConfig {
        objective: ObjectiveSpec::Block {
            block_size: 4,
            inner: InnerSpec::Md4,
            time: BlockTime::Sequence,
        },
        ..Default::default()
    };
    assert!(Trainer::<Cpu, Block<GenMd4<Cpu>>>::new(net_cfg, md4_blocks, 1, &dev).is_err());
}

/// Manifests written before GenMD4 blocks existed (no `inner`) read as MD4 blocks, and an MD4
/// block spec is written as before.
#[test]
fn block_spec_serialisation_is_backward_compatible() {
    let old: ObjectiveSpec = serde_json::from_str(r#"{"block":{"block_size":4}}"#).unwrap();
    assert_eq!(
        old,
        ObjectiveSpec::Block {
            block_size: 4,
            inner: InnerSpec::Md4,
            time: BlockTime::Sequence,
        }
    );
    assert_eq!(
        serde_json::to_string(&old).unwrap(),
        r#"{"block":{"block_size":4}}"#
    );
    let g = ObjectiveSpec::Block {
        block_size: 2,
        inner: InnerSpec::GenMd4 { one_sample: true },
        time: BlockTime::Sequence,
    };
    let s = serde_json::to_string(&g).unwrap();
    assert_eq!(serde_json::from_str::<ObjectiveSpec>(&s).unwrap(), g);
    // per-block times are written, and read back
    let pb = ObjectiveSpec::Block {
        block_size: 4,
        inner: InnerSpec::Md4,
        time: BlockTime::Block,
    };
    let s = serde_json::to_string(&pb).unwrap();
    assert_eq!(s, r#"{"block":{"block_size":4,"time":"block"}}"#);
    assert_eq!(serde_json::from_str::<ObjectiveSpec>(&s).unwrap(), pb);
}
