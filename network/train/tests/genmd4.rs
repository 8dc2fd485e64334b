//! GenMD4 in the trainer (paper §6, App. I.2; spec §5): equal exponents reduce the step to MD4
//! with the polynomial schedule on the same masks, the one-sample variant's network gradient is
//! MD4's on the first mask while θ's gradient is unchanged, θ's gradient at initialisation is
//! unbiased for the exact objective worked out in closed form, the learned exponents separate
//! deterministic from noise token values, evaluation at initialisation has the uniform value,
//! and checkpoints keep θ, its EMA and its AdamW state (exact resume).

use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::NetworkConfig;
use maskdiff_objective::tensor::MaskedBatch;
use maskdiff_objective::{GenMd4, Md4, ObjectiveSpec};
use maskdiff_process::DenoiseBatch;
use maskdiff_schedule::{inverse_softplus, softplus, GENMD4_T1, THETA_INIT_FOR_W1};
use maskdiff_train::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

const EPS: f64 = 1e-4;

fn cfg(one_sample: bool, lr: f64, total: u64) -> TrainConfig {
    TrainConfig {
        objective: ObjectiveSpec::GenMd4 { one_sample },
        lr: LrSchedule::cosine(lr, 0, total),
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
        ema_decay: 0.9,
        ..Default::default()
    }
}

fn tb(x0: &[u32], batch: usize, len: usize) -> TrainBatch<'_> {
    TrainBatch {
        x0,
        batch,
        len,
        labels: None,
    }
}

fn mean_se(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let s = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    (d, s)
}

/// Network gradient of mean_b over the given halves of the MD4 loss with weights w/t (the
/// poly-w schedule: −α'/(1 − α) = w/t for every t, spec §11.3), computed through
/// `md4_diffusion_loss` — independently of the GenMD4 code.
fn md4_poly_grads<D: maskdiff_network::Kernels<f32>>(
    t: &Trainer<D, GenMd4<D>>,
    x0: &[u32],
    xts: &[&[u32]],
    times: &[f64],
    w: f64,
    (b, n, v): (usize, usize, usize),
) -> (Vec<Vec<f64>>, Vec<Vec<f32>>) {
    let model = t.model();
    let mut per_seq = Vec::new();
    let mut total: Option<Tensor<(), f32, D, OwnedTape<f32, D>>> = None;
    for xt in xts {
        let mb = MaskedBatch::new(
            x0.to_vec(),
            xt.to_vec(),
            b,
            n,
            v,
            times.to_vec(),
            times.iter().map(|t| w / t).collect(),
        )
        .unwrap();
        let input = DenoiseBatch {
            ids: xt,
            batch: b,
            len: n,
            t: times,
            labels: None,
        };
        let logits = model.forward(&input, model.tape(), None).unwrap();
        let loss = maskdiff_objective::md4_diffusion_loss(logits, &mb).unwrap();
        per_seq.push(loss.as_vec().iter().map(|&x| x as f64).collect());
        let s = loss.sum::<Rank0, _>() * (1.0 / (b * xts.len()) as f32);
        total = Some(match total {
            None => s,
            Some(a) => a + s,
        });
    }
    let grads = total.unwrap().backward();
    let g = model
        .params()
        .iter()
        .map(|p| grads.get(&p.value).as_vec())
        .collect();
    (per_seq, g)
}

/// With all exponents frozen at w = 2.5 (after one training step, so the network is not at its
/// zero-output initialisation): on the masks and times the step draws, the two-sample trainer's
/// per-sequence losses L1, L2 equal MD4's loss with weight w/t on each mask, its network
/// gradient equals ∇ mean(0.5(MD4_1 + MD4_2)), the one-sample trainer's network gradient equals
/// ∇ mean(MD4_1) and its θ gradient equals the two-sample one; the reported step loss is
/// 0.5(L1 + L2) + recon with recon = N(1 − ε)t1^w ln V by hand (spec §5.4, §11.16).
/// Tolerances: 1e-5 relative on losses, 2e-4 of the largest component on gradients (f32).
#[test]
fn equal_exponents_reduce_to_md4_poly() {
    let dev = Cpu::default();
    let (v, b, n) = (5usize, 6usize, 20usize);
    let mut rng = StdRng::seed_from_u64(1);
    let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
    let net = NetworkConfig::preset("tiny", v).unwrap();
    assert_eq!(net.dropout, 0.0);
    let mut two =
        Trainer::<_, GenMd4<Cpu>>::new(net.clone(), cfg(false, 1e-2, 100), 7, &dev).unwrap();
    two.step(&tb(&x0, b, n)).unwrap();
    let w = 2.5;
    two.set_genmd4_exponents(&vec![w; v]).unwrap();
    let mut one = Trainer::<_, GenMd4<Cpu>>::new(net, cfg(true, 1e-2, 100), 7, &dev).unwrap();
    one.step(&tb(&x0, b, n)).unwrap(); // same step count, hence the same RNG for the next step
    for (dst, src) in one
        .model_mut()
        .params_mut()
        .iter_mut()
        .zip(two.model().params())
    {
        dst.value = src.value.clone();
    }
    one.set_genmd4_exponents(&vec![w; v]).unwrap();

    let g2 = two.genmd4_gradients(&tb(&x0, b, n)).unwrap();
    let g1 = one.genmd4_gradients(&tb(&x0, b, n)).unwrap();
    assert_eq!(g1.batch, g2.batch, "both trainers draw the same masks");
    let gb = &g2.batch;
    assert_eq!(gb, &two.genmd4_next_batch(&tb(&x0, b, n)).unwrap());
    assert!(gb.t().iter().all(|&t| (GENMD4_T1..1.0).contains(&t)));
    let halves = [&gb.xt()[..b * n], &gb.xt()[b * n..]];
    let (md4, md4_grad_both) = md4_poly_grads(&two, &x0, &halves, gb.t(), w, (b, n, v));
    let (_, md4_grad_first) = md4_poly_grads(&two, &x0, &halves[..1], gb.t(), w, (b, n, v));
    for (s, (m1, m2)) in md4[0].iter().zip(&md4[1]).enumerate() {
        let expect = 0.5 * (m1 + m2);
        assert!(
            (g2.diffusion[s] - expect).abs() <= 1e-5 * (1.0 + expect),
            "seq {s}: GenMD4 {} vs MD4 {expect}",
            g2.diffusion[s]
        );
        let recon = n as f64 * (1.0 - EPS) * GENMD4_T1.powf(w) * (v as f64).ln();
        assert!(
            (g2.recon[s] - recon).abs() <= 1e-5 * recon,
            "{}",
            g2.recon[s]
        );
    }
    for (i, (a, e)) in g2.network.iter().zip(&md4_grad_both).enumerate() {
        let (d, s) = max_abs_diff(&a.as_vec(), e);
        assert!(
            d <= 2e-4 * s + 1e-7,
            "param {i}: two-sample grad off by {d} (scale {s})"
        );
    }
    let mut nonzero = 0;
    for (i, (a, e)) in g1.network.iter().zip(&md4_grad_first).enumerate() {
        let (d, s) = max_abs_diff(&a.as_vec(), e);
        assert!(
            d <= 2e-4 * s + 1e-7,
            "param {i}: one-sample grad off by {d} (scale {s})"
        );
        nonzero += (s > 1e-6) as usize;
    }
    assert!(
        nonzero > 5,
        "the network gradient should reach many parameters"
    );
    let (d, s) = max_abs_diff(&g1.theta.as_vec(), &g2.theta.as_vec());
    assert!(
        s > 0.0 && d <= 1e-4 * s,
        "θ gradient differs between variants: {d} of {s}"
    );
    // the tape-free evaluation of the same masks agrees
    let on = two.genmd4_loss_on(gb, None, false).unwrap();
    for (a, e) in on.diffusion().iter().zip(&g2.diffusion) {
        assert!((a - e).abs() <= 1e-5 * (1.0 + e), "{a} vs {e}");
    }
    // the step reports the NELBO of exactly these masks
    let stats = two.step(&tb(&x0, b, n)).unwrap();
    let diff = (0..b).map(|s| 0.5 * (md4[0][s] + md4[1][s])).sum::<f64>() / b as f64;
    let recon = n as f64 * (1.0 - EPS) * GENMD4_T1.powf(w) * (v as f64).ln();
    assert!(
        (stats.diffusion - diff).abs() <= 1e-5 * diff,
        "{stats:?} vs {diff}"
    );
    assert!(
        (stats.loss - diff - recon).abs() <= 1e-5 * stats.loss,
        "{stats:?}"
    );
}

/// The exact GenMD4 objective (official conventions: t ~ U[t1, 1) without the (1 − t1) factor,
/// recon at t1) per sequence of a model with uniform predictions μ = 1/V, as a function of θ,
/// for token counts `c`: F = (1 − ε)/(1 − t1) Σ_x c_x (w̄ − w_x + w_x ln V)(1 − t1^{w_x})/w_x
/// plus Σ_x c_x (1 − ε) t1^{w_x} (logsumexp_u(w_u ln t1) − w_x ln t1), w̄ = mean_u w_u. (The
/// integrand per masked position is (w̄ − w_x + w_x ln V)/t, masked with probability
/// (1 − ε)t^{w_x}, and E_t[t^{w−1}] = (1 − t1^w)/(w(1 − t1)).)
fn uniform_model_objective(theta: &[f64], c: &[f64]) -> f64 {
    let v = theta.len();
    let w: Vec<f64> = theta.iter().map(|&x| softplus(x)).collect();
    let wbar = w.iter().sum::<f64>() / v as f64;
    let (t1, ln_v) = (GENMD4_T1, (v as f64).ln());
    let z: Vec<f64> = w.iter().map(|x| x * t1.ln()).collect();
    let zmax = z.iter().cloned().fold(f64::MIN, f64::max);
    let lse = zmax + z.iter().map(|x| (x - zmax).exp()).sum::<f64>().ln();
    (0..v)
        .map(|x| {
            let diff =
                (1.0 - EPS) / (1.0 - t1) * (wbar - w[x] + w[x] * ln_v) * (1.0 - t1.powf(w[x]))
                    / w[x];
            let recon = (1.0 - EPS) * t1.powf(w[x]) * (lse - z[x]);
            c[x] * (diff + recon)
        })
        .sum()
}

/// At initialisation (zero output layer ⇒ μ uniform) the trainer's θ gradient — pathwise,
/// RLOO score-function and recon parts together — averaged over independent draws equals the
/// exact ∇_θ of [`uniform_model_objective`] (central differences, h = 1e−5) within 4 SE + 1e−3.
/// At w = 1 that gradient is ≈ (1 − e^{−1})·N·(1/V − p_v): token values more frequent than 1/V
/// have negative gradient (their w grows), rarer ones positive — also asserted.
#[test]
fn theta_gradient_at_init_is_unbiased() {
    let dev = Cpu::default();
    let (v, b, n) = (4usize, 16usize, 40usize);
    // every row has exactly these counts (p = 0.5, 0.3, 0.15, 0.05), in shuffled order
    let counts = [20usize, 12, 6, 2];
    let mut rng = StdRng::seed_from_u64(4);
    let mut x0 = Vec::new();
    for _ in 0..b {
        let mut row: Vec<u32> = (0..v)
            .flat_map(|x| std::iter::repeat_n(x as u32, counts[x]))
            .collect();
        for i in (1..row.len()).rev() {
            row.swap(i, rng.gen_range(0..=i));
        }
        x0.extend(row);
    }
    let c: Vec<f64> = counts.iter().map(|&k| k as f64).collect();
    let theta0 = vec![THETA_INIT_FOR_W1; v];
    let exact: Vec<f64> = (0..v)
        .map(|i| {
            let h = 1e-5;
            let (mut up, mut dn) = (theta0.clone(), theta0.clone());
            up[i] += h;
            dn[i] -= h;
            (uniform_model_objective(&up, &c) - uniform_model_objective(&dn, &c)) / (2.0 * h)
        })
        .collect();
    let net = NetworkConfig::preset("tiny", v).unwrap();
    let draws = 600;
    let mut g: Vec<Vec<f64>> = vec![Vec::new(); v];
    for seed in 0..draws {
        let t =
            Trainer::<_, GenMd4<Cpu>>::new(net.clone(), cfg(false, 1e-2, 10), seed, &dev).unwrap();
        let gr = t.genmd4_gradients(&tb(&x0, b, n)).unwrap();
        for (i, x) in gr.theta.as_vec().iter().enumerate() {
            g[i].push(*x as f64);
        }
    }
    let scale = exact.iter().map(|x| x.abs()).fold(0.0, f64::max);
    for i in 0..v {
        let (m, se) = mean_se(&g[i]);
        eprintln!("θ_{i}: trainer {m:.4} ± {se:.4}, exact {:.4}", exact[i]);
        assert!(
            (m - exact[i]).abs() <= 4.0 * se + 1e-3,
            "θ_{i}: trainer {m} ± {se}, exact {}",
            exact[i]
        );
        let p = counts[i] as f64 / n as f64;
        let approx = (1.0 - (-1.0f64).exp()) * n as f64 * (1.0 / v as f64 - p);
        assert!(
            (exact[i] - approx).abs() < 0.05 * approx.abs() + 0.05,
            "closed form {} vs first-order {approx}",
            exact[i]
        );
        assert!(se < 0.2 * scale, "θ_{i}: too few draws, se {se}");
        assert_eq!(exact[i] < 0.0, p > 1.0 / v as f64);
    }
}

/// Fresh model (uniform μ), all w = 1: per token the GenMD4 NELBO is in expectation
/// (1 − ε)·ln V (diffusion over t ∈ [t1, 1), no (1 − t1) factor) + (1 − ε)·t1·ln V (recon,
/// spec §11.19), i.e. (1 − ε)(1 + t1) ln V; `eval_loss` (one x_t per sequence) agrees within
/// 4 SE, and the SE is below 2 % of the value.
#[test]
fn eval_at_init_has_uniform_value() {
    let dev = Cpu::default();
    let (v, b, n) = (6usize, 32usize, 24usize);
    let t = Trainer::<_, GenMd4<Cpu>>::new(
        NetworkConfig::preset("tiny", v).unwrap(),
        cfg(false, 1e-3, 10),
        3,
        &dev,
    )
    .unwrap();
    assert_eq!(
        t.genmd4_exponents(true),
        vec![softplus(THETA_INIT_FOR_W1 as f32 as f64); v]
    );
    let mut rng = StdRng::seed_from_u64(9);
    let mut per_token = Vec::new();
    for _ in 0..40 {
        let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect();
        for l in t.eval_loss(&tb(&x0, b, n), &mut rng, true).unwrap() {
            per_token.push(l / n as f64);
        }
    }
    let (m, se) = mean_se(&per_token);
    let target = (1.0 - EPS) * (1.0 + GENMD4_T1) * (v as f64).ln();
    assert!(
        (m - target).abs() < 4.0 * se,
        "mean {m} ± {se}, target {target}"
    );
    assert!(se < 0.02 * target, "test too weak: se {se}");
}

fn ckpt_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("maskdiff-genmd4-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Save after 3 steps, load, take 2 more steps: losses, θ, EMA θ and θ's AdamW moments are
/// bit-identical to an uninterrupted run (weight decay and clipping on, one-sample variant too);
/// θ really moved and its moments are non-zero; an MD4 config cannot resume it.
#[test]
fn save_resume_keeps_theta_and_its_optimizer_state() {
    let dev = Cpu::default();
    let (v, b, n) = (5usize, 4usize, 16usize);
    let mut rng = StdRng::seed_from_u64(11);
    let data: Vec<Vec<u32>> = (0..5)
        .map(|_| (0..b * n).map(|_| rng.gen_range(0..v as u32)).collect())
        .collect();
    let net = NetworkConfig::preset("tiny", v).unwrap();
    for one_sample in [false, true] {
        let mut c = cfg(one_sample, 1e-2, 100);
        c.adamw.weight_decay = 0.03;
        c.grad_clip = 5.0;
        let mut full = Trainer::<_, GenMd4<Cpu>>::new(net.clone(), c.clone(), 2, &dev).unwrap();
        let mut part = Trainer::<_, GenMd4<Cpu>>::new(net.clone(), c.clone(), 2, &dev).unwrap();
        for d in &data[..3] {
            full.step(&tb(d, b, n)).unwrap();
            part.step(&tb(d, b, n)).unwrap();
        }
        let dir = ckpt_dir(if one_sample { "one" } else { "two" });
        let man = part.save(&dir).unwrap();
        assert!(man.files.iter().any(|f| f.role == "objective"));
        drop(part);
        let mut resumed = Trainer::<_, GenMd4<Cpu>>::resume(&dir, &net, &c, &dev).unwrap();
        let (o0, o1) = (full.objective_optimizer(), resumed.objective_optimizer());
        assert_eq!(
            full.objective().theta().as_vec(),
            resumed.objective().theta().as_vec()
        );
        assert_eq!(
            full.ema_objective().theta().as_vec(),
            resumed.ema_objective().theta().as_vec()
        );
        assert_eq!(o0.m[0].as_vec(), o1.m[0].as_vec());
        assert_eq!(o0.v[0].as_vec(), o1.v[0].as_vec());
        assert_eq!(o0.count, 3);
        assert_eq!(o1.count, 3);
        assert!(o0.v[0].as_vec().iter().all(|&x| x > 0.0));
        let moved = full
            .objective()
            .theta()
            .as_vec()
            .iter()
            .map(|&x| (x as f64 - THETA_INIT_FOR_W1).abs())
            .fold(0.0, f64::max);
        assert!(moved > 1e-3, "θ did not move: {moved}");
        for d in &data[3..] {
            let a = full.step(&tb(d, b, n)).unwrap();
            let r = resumed.step(&tb(d, b, n)).unwrap();
            assert_eq!(a, r);
        }
        assert_eq!(
            full.genmd4_exponents(false),
            resumed.genmd4_exponents(false)
        );
        assert_eq!(full.genmd4_exponents(true), resumed.genmd4_exponents(true));
        let (gf, gr) = (full.objective_optimizer(), resumed.objective_optimizer());
        assert_eq!(gf.m[0].as_vec(), gr.m[0].as_vec());
        assert_eq!(gf.v[0].as_vec(), gr.v[0].as_vec());
        for (p, q) in full.model().params().iter().zip(resumed.model().params()) {
            assert_eq!(p.value.as_vec(), q.value.as_vec());
        }
        // the schedule for sampling comes from the EMA θ
        let sched = resumed.genmd4_schedule(true).unwrap();
        assert_eq!(sched.exponents(), &resumed.genmd4_exponents(true)[..]);
        let md4 = TrainConfig {
            objective: ObjectiveSpec::Md4,
            ..c.clone()
        };
        let err = Trainer::<_, Md4>::resume(&dir, &net, &md4, &dev).unwrap_err();
        assert!(
            matches!(err, TrainError::CheckpointMismatch { .. }),
            "{err}"
        );
        // and a GenMD4 checkpoint is not an MD4 run
        let err = Trainer::<_, Md4>::load(&dir, &dev).unwrap_err();
        assert!(matches!(err, TrainError::Objective(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Bad exponents and MD4-only calls are typed errors.
#[test]
fn genmd4_errors() {
    let dev = Cpu::default();
    let v = 4;
    let net = NetworkConfig::preset("tiny", v).unwrap();
    let mut t = Trainer::<_, GenMd4<Cpu>>::new(net.clone(), cfg(false, 1e-3, 10), 0, &dev).unwrap();
    assert!(t.set_genmd4_exponents(&[1.0; 3]).is_err());
    assert!(t.set_genmd4_exponents(&[1.0, 0.0, 1.0, 1.0]).is_err());
    assert!(t.set_genmd4_exponents(&[1.0, f64::NAN, 1.0, 1.0]).is_err());
    t.set_genmd4_exponents(&[0.5, 1.0, 2.0, 4.0]).unwrap();
    let w = t.genmd4_exponents(true);
    for (a, e) in w.iter().zip([0.5, 1.0, 2.0, 4.0]) {
        assert!((a - e).abs() < 1e-6 * e, "{a} vs {e}");
    }
    assert!((inverse_softplus(1.0) - THETA_INIT_FOR_W1).abs() < 1e-12);
    // a GenMD4 trainer cannot be built from an MD4 config (and vice versa): typed errors
    let md4_cfg = TrainConfig {
        objective: ObjectiveSpec::Md4,
        ..cfg(false, 1e-3, 10)
    };
    let err = Trainer::<_, GenMd4<Cpu>>::new(net.clone(), md4_cfg.clone(), 0, &dev).unwrap_err();
    assert!(matches!(err, TrainError::Objective(_)), "{err}");
    let err = Trainer::<_, Md4>::new(net.clone(), cfg(false, 1e-3, 10), 0, &dev).unwrap_err();
    assert!(matches!(err, TrainError::Objective(_)), "{err}");
    assert!(Trainer::<_, Md4>::new(net, md4_cfg, 0, &dev).is_ok());
}

/// Blocks of four tokens `[n n n D]`: n ~ U{0, 1, 2} i.i.d. (pure noise, independent of
/// everything) and D = 3 (deterministic given its neighbours: every fourth position). All four
/// values have frequency 1/4 = 1/V, so the fresh model's uniform prediction is calibrated and
/// the exact gradient at initialisation vanishes (see `theta_gradient_at_init_is_unbiased`: it
/// is ∝ 1/V − p_v) — any separation comes from context.
fn anchor_corpus(rng: &mut StdRng, b: usize, n: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(b * n);
    for _ in 0..b {
        let mut row = Vec::with_capacity(n + 4);
        while row.len() < n {
            for _ in 0..3 {
                row.push(rng.gen_range(0..3u32));
            }
            row.push(3);
        }
        row.truncate(n);
        out.extend(row);
    }
    out
}

/// Direction of the learned exponents, derived from the objective. Per token, the GenMD4 NELBO
/// is E_τ[cost of predicting it at its own masking time τ] with P(τ ≤ t) = t^{w} (the pathwise
/// −w/t weight and the score-function term of log q combine into this), so (i) a token's w falls
/// if its own prediction gets worse the later it is masked and (ii) rises if its staying
/// visible makes the OTHER tokens cheaper to predict. For a perfect model the NELBO does not
/// depend on w at all (any order gives −log p(x)); the push comes from what the network cannot
/// do. Here: the noise values are unpredictable whatever is visible, and D carries no
/// information about them — but the network (RoPE: relative positions only) must infer which
/// positions are D-positions from visible tokens. A visible D pins that phase for every masked
/// position; a visible noise token only rules out its own position. D's own effect is cancelled
/// by its effect on the other D's (all share one w: the fraction of D's still visible when a D
/// is masked is uniform whatever w_D), leaving its large benefit to the noise positions; the
/// noise tokens' benefit to others is small. Expected: w_D rises above 1 (D stays unmasked
/// longer, i.e. is generated first) and the noise exponents fall below it (generated last).
/// Asserted after 500 steps from w = 1: w_D > 1 > mean noise w, and w_D exceeds every noise
/// exponent by 0.03 (in 6 of 6 seeds tried the margin was 0.08–0.24).
#[test]
fn learned_exponents_separate_structure_from_noise() {
    let dev = Cpu::default();
    let (v, b, n, steps) = (4usize, 32usize, 32usize, 500u64);
    let mut t = Trainer::<_, GenMd4<Cpu>>::new(
        NetworkConfig::preset("tiny", v).unwrap(),
        cfg(false, 5e-3, steps),
        0,
        &dev,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(100);
    for _ in 0..steps {
        let x0 = anchor_corpus(&mut rng, b, n);
        t.step(&tb(&x0, b, n)).unwrap();
    }
    let w = t.genmd4_exponents(false);
    let noise_mean = (w[0] + w[1] + w[2]) / 3.0;
    let noise_max = w[0].max(w[1]).max(w[2]);
    eprintln!("learned exponents after {steps} steps: {w:?}");
    assert!(w[3] > 1.0 && noise_mean < 1.0, "{w:?}");
    assert!(w[3] > noise_max + 0.03, "{w:?}");
}

/// A checkpoint in today's format v2 and the same checkpoint rewritten in format v1 (the
/// objective file's role was `genmd4`) load to identical trainers; `load_model` reads only the
/// parameters (live or EMA) and θ (live or EMA): it still works with the optimizer file gone,
/// and gives exactly the trainer's models and exponents.
#[test]
fn format_v1_checkpoints_load_and_load_model_reads_weights_only() {
    let dev = Cpu::default();
    let (v, b, n) = (5usize, 2usize, 8usize);
    let net = NetworkConfig::preset("tiny", v).unwrap();
    let mut t = Trainer::<_, GenMd4<Cpu>>::new(net, cfg(false, 1e-2, 10), 3, &dev).unwrap();
    let x0: Vec<u32> = (0..b * n).map(|i| (i % v) as u32).collect();
    for _ in 0..2 {
        t.step(&tb(&x0, b, n)).unwrap();
    }
    let dir = ckpt_dir("v1");
    let man = t.save(&dir).unwrap();
    assert_eq!(man.format_version, FORMAT_VERSION);
    // rewrite as v1: role `genmd4`, file `genmd4-S.safetensors`
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(MANIFEST)).unwrap()).unwrap();
    json["format_version"] = 1.into();
    for f in json["files"].as_array_mut().unwrap() {
        if f["role"] == "objective" {
            let old = f["file"].as_str().unwrap().to_string();
            let new = old.replace("objective-", "genmd4-");
            std::fs::rename(dir.join(&old), dir.join(&new)).unwrap();
            f["role"] = "genmd4".into();
            f["file"] = new.into();
        }
    }
    std::fs::write(dir.join(MANIFEST), serde_json::to_vec(&json).unwrap()).unwrap();
    let v1 = Trainer::<_, GenMd4<Cpu>>::load(&dir, &dev).unwrap();
    assert_eq!(v1.genmd4_exponents(false), t.genmd4_exponents(false));
    assert_eq!(v1.genmd4_exponents(true), t.genmd4_exponents(true));
    assert_eq!(
        v1.objective_optimizer().m[0].as_vec(),
        t.objective_optimizer().m[0].as_vec()
    );
    // load_model needs no optimizer state
    let opt = man.files.iter().find(|f| f.role == "optimizer").unwrap();
    std::fs::remove_file(dir.join(&opt.file)).unwrap();
    assert!(Trainer::<_, GenMd4<Cpu>>::load(&dir, &dev).is_err());
    for (w, model, exps) in [
        (Weights::Ema, t.ema_model(), t.genmd4_exponents(true)),
        (Weights::Live, t.model(), t.genmd4_exponents(false)),
    ] {
        let m = load_model::<Cpu, GenMd4<Cpu>>(&dir, w, &dev).unwrap();
        assert_eq!(m.objective.exponents(), exps);
        for (p, q) in m.model.params().iter().zip(model.params()) {
            assert_eq!(p.name, q.name);
            assert_eq!(p.value.as_vec(), q.value.as_vec());
        }
    }
    // the wrong objective type is a typed error, not a silent MD4 model
    assert!(matches!(
        load_model::<Cpu, Md4>(&dir, Weights::Ema, &dev),
        Err(TrainError::Objective(_))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}
