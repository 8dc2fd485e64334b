//! Property 7 — GenMD4 (paper §6, eq. (12), App. I; spec §5, §11.16–§11.20): equal exponents
//! reduce it to MD4 with the poly-w schedule; the integrand is ≥ 0 and 0 only for a perfect
//! predictor; the spec's exact facts; and the RLOO surrogate's θ-gradient, averaged over many
//! draws, equals the exact gradient of E_q[L] + recon computed by enumeration on a tiny problem.

mod common;

use approx::assert_relative_eq;
use common::{log_softmax, mean_se, noised, TablePredictor};
use dfdx::prelude::*;
use maskdiff_objective::reference::{
    continuous_estimate, genmd4_diffusion_estimate, genmd4_integrand, genmd4_log_q, genmd4_recon,
    rloo_term,
};
use maskdiff_objective::tensor::softplus_tensor;
use maskdiff_objective::{
    genmd4_loss, md4_diffusion_loss, GenMd4Batch, GenMd4Options, MaskedBatch,
};
use maskdiff_schedule::{
    inverse_softplus, softplus, PerTokenPolynomial, Polynomial, THETA_INIT_FOR_W1,
};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

proptest! {
    #![proptest_config(common::config(64))]

    /// All w_v = w: the GenMD4 one-sample loss equals MD4's with the unshifted poly-w schedule
    /// (weight −w/t), in f64 (1e−10 relative) and on tensors (L1 of the GenMD4 loss equals the
    /// MD4 loss with weight w/t on the same mask, 1e−5 relative).
    #[test]
    fn equal_exponents_reduce_to_md4_poly(
        w in 0.2f64..5.0, t in 0.01f64..0.999, n in 1usize..6, v in 1usize..6, seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x0: Vec<u32> = (0..n).map(|_| rng.gen_range(0..v as u32)).collect();
        let xt: Vec<u32> = x0.iter().map(|&x| if rng.gen::<bool>() { v as u32 } else { x }).collect();
        let logits32: Vec<f32> = (0..n * v).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        let logits: Vec<f64> = logits32.iter().map(|&x| x as f64).collect();
        let lp = log_softmax(&logits, v);
        let g = genmd4_diffusion_estimate(&PerTokenPolynomial::uniform(v, w).unwrap(), t, &x0, &xt, &lp).unwrap();
        let m = continuous_estimate(&Polynomial::new(w).unwrap(), t, &x0, &xt, v, &lp).unwrap();
        prop_assert!((g - m).abs() <= 1e-10 * (1.0 + m.abs()), "GenMD4 {g} vs MD4 {m}");

        let dev = Cpu::default();
        let gb = GenMd4Batch::new(x0.clone(), [xt.clone(), xt.clone()].concat(), 1, n, v, vec![t], 1e-4).unwrap();
        let stacked = dev.tensor_from_vec([logits32.clone(), logits32.clone()].concat(), (2, n, v));
        let theta = dev.tensor_from_vec(vec![inverse_softplus(w) as f32; v], (v,));
        let out = genmd4_loss(stacked, theta, &gb, &GenMd4Options::default()).unwrap();
        let mb = MaskedBatch::new(x0.clone(), xt.clone(), 1, n, v, vec![t], vec![w / t]).unwrap();
        let md4 = md4_diffusion_loss(dev.tensor_from_vec(logits32, (1, n, v)), &mb).unwrap().as_vec()[0] as f64;
        prop_assert!((out.l1[0] - md4).abs() <= 1e-5 * (1.0 + md4.abs()), "tensor GenMD4 {} vs MD4 {md4}", out.l1[0]);
        prop_assert_eq!(out.rloo()[0], 0.0);
    }

    /// The integrand (1/t)(Σ_v w_v μ_v − w_x − w_x log μ_x) is ≥ 0, exactly 0 for μ = onehot(x),
    /// and > 0 whenever μ_x < 1 − 1e−6 (it equals Σ_{v≠x} w_v μ_v + w_x(μ_x − 1 − log μ_x)).
    #[test]
    fn integrand_nonnegative_zero_only_when_perfect(
        ws in prop::collection::vec(0.05f64..6.0, 1..7), t in 1e-3f64..1.0, seed in any::<u64>(), sharp in 0.0f64..30.0,
    ) {
        let v = ws.len();
        let mut rng = StdRng::seed_from_u64(seed);
        let x = rng.gen_range(0..v);
        let logits: Vec<f64> = (0..v).map(|u| rng.gen_range(-3.0..3.0) + if u == x { sharp } else { 0.0 }).collect();
        let lp = log_softmax(&logits, v);
        let val = genmd4_integrand(&ws, t, x, &lp);
        prop_assert!(val >= 0.0, "negative integrand {val}");
        if lp[x].exp() < 1.0 - 1e-6 {
            prop_assert!(val > 0.0);
        }
        let onehot: Vec<f64> = (0..v).map(|u| if u == x { 0.0 } else { f64::NEG_INFINITY }).collect();
        prop_assert_eq!(genmd4_integrand(&ws, t, x, &onehot), 0.0);
    }
}

/// §11.16: softplus(0.5413249) = 1 (1e−7; the tensor version in f32, 1e−6).
#[test]
fn spec_11_16_init() {
    assert_relative_eq!(softplus(0.5413249), 1.0, max_relative = 1e-7);
    assert_relative_eq!(softplus(THETA_INIT_FOR_W1), 1.0, max_relative = 1e-15);
    let dev = Cpu::default();
    let th = dev.tensor_from_vec(vec![0.5413249f32; 3], (3,));
    for w in softplus_tensor(th).unwrap().as_vec() {
        assert!((w - 1.0).abs() < 1e-6);
    }
}

/// §11.17: V = 3, w = (1, 2, 0.5), t = 0.5, x = 0, μ = (0.5, 0.3, 0.2): loss 1.7862944, and
/// 1.3862944 = 2 ln 2 with all w = 1 (1e−7).
#[test]
fn spec_11_17_integrand_example() {
    let lp: Vec<f64> = [0.5f64, 0.3, 0.2].iter().map(|p| p.ln()).collect();
    assert!((genmd4_integrand(&[1.0, 2.0, 0.5], 0.5, 0, &lp) - 1.7862944).abs() < 1e-7);
    assert!((genmd4_integrand(&[1.0, 1.0, 1.0], 0.5, 0, &lp) - 1.3862944).abs() < 1e-7);
}

/// §11.19: all w = 1, t1 = 1e−3, V = 27: recon per token (1 − ε)·t1·ln 27 = 0.0032955 nats,
/// reference and tensor (1e−6 relative; tensor 1e−5).
#[test]
fn spec_11_19_recon() {
    let sch = PerTokenPolynomial::uniform(27, 1.0).unwrap();
    let x0: Vec<u32> = (0..8).map(|i| (i * 3) % 27).collect();
    let per_token = genmd4_recon(&sch, 1e-3, &x0).unwrap() / 8.0;
    assert_relative_eq!(
        per_token,
        (1.0 - 1e-4) * 1e-3 * 27f64.ln(),
        max_relative = 1e-12
    );
    assert!((per_token - 0.0032955).abs() < 5e-8);
    let dev = Cpu::default();
    let gb = GenMd4Batch::new(
        x0.clone(),
        [x0.clone(), x0.clone()].concat(),
        1,
        8,
        27,
        vec![0.5],
        1e-4,
    )
    .unwrap();
    let out = genmd4_loss(
        dev.zeros_like(&(2, 8, 27)),
        dev.tensor_from_vec(vec![THETA_INIT_FOR_W1 as f32; 27], (27,)),
        &gb,
        &GenMd4Options::default(),
    )
    .unwrap();
    assert_relative_eq!(out.recon[0] / 8.0, per_token, max_relative = 1e-5);
}

/// §11.20 and §5.5: RLOO term 0.5(5 − 3)(−2 + 4) = 2; it vanishes when L1 = L2; log q of one
/// masked (w_x = 2, t = 0.5) = −1.3863944, unmasked = −0.2876487 (1e−7).
#[test]
fn spec_11_20_rloo_and_log_q() {
    assert_eq!(rloo_term(5.0, 3.0, -2.0, -4.0), 2.0);
    assert_eq!(rloo_term(4.0, 4.0, -1.0, -7.0), 0.0);
    let sch = PerTokenPolynomial::new(vec![2.0]).unwrap();
    assert!((genmd4_log_q(&sch, 0.5, &[0], &[1]).unwrap() - (-1.3863944)).abs() < 1e-7);
    assert!((genmd4_log_q(&sch, 0.5, &[0], &[0]).unwrap() - (-0.2876487)).abs() < 1e-7);
}

// ---- RLOO gradient unbiasedness -------------------------------------------------------------

const X0: [u32; 3] = [0, 2, 1];
const V: usize = 3;
const T: f64 = 0.6;
const T1: f64 = 1e-3;
const EPS: f64 = 1e-4;

/// F(θ) = E_{q_w(x_t|x_0)}[L_w(x_t, T)] + recon_w(t1), w = softplus(θ), by enumeration of the
/// 2^N patterns, written from spec §5.1, §5.3, §5.4. `q_theta` (if given) freezes the pattern
/// probabilities at those exponents (the pathwise part only).
fn exact_objective(theta: &[f64], q_theta: Option<&[f64]>, p: &TablePredictor) -> f64 {
    let sp = |x: f64| (1.0 + x.exp()).ln();
    let w: Vec<f64> = theta.iter().map(|&x| sp(x)).collect();
    let wq: Vec<f64> = q_theta.unwrap_or(theta).iter().map(|&x| sp(x)).collect();
    let n = X0.len();
    let diffusion: f64 = (0u64..1 << n)
        .map(|mask| {
            let q: f64 = (0..n)
                .map(|i| {
                    let m = (1.0 - EPS) * T.powf(wq[X0[i] as usize]);
                    if mask >> i & 1 == 1 {
                        m
                    } else {
                        1.0 - m
                    }
                })
                .product();
            let lp = p.log_probs(&noised(&X0, V, mask));
            let l: f64 = (0..n)
                .filter(|i| mask >> i & 1 == 1)
                .map(|i| {
                    let (x, row) = (X0[i] as usize, &lp[i * V..(i + 1) * V]);
                    let mean_w: f64 = (0..V).map(|u| w[u] * row[u].exp()).sum();
                    (mean_w - w[x] - w[x] * row[x]) / T
                })
                .sum();
            q * l
        })
        .sum();
    let z: Vec<f64> = w.iter().map(|wv| wv * T1.ln()).collect();
    let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
    let recon: f64 = X0
        .iter()
        .map(|&x| (1.0 - EPS) * T1.powf(w[x as usize]) * (lse - z[x as usize]))
        .sum();
    diffusion + recon
}

/// The surrogate's θ-gradient (dfdx backward), batch mean over B draws of two masks at t = 0.6,
/// averaged over K batches, equals the exact ∇_θ F (central differences of the enumeration,
/// h = 1e−5) within 4 SE + 1e−4 per component; the pathwise-only gradient differs from it by
/// more than 10 SE (so the test would catch a missing score-function term).
#[test]
fn rloo_gradient_unbiased() {
    let p = TablePredictor::random(X0.len(), V, 2.0, 21);
    let theta = [0.3f64, -0.4, 1.0];
    let grad = |q_fixed: bool| -> Vec<f64> {
        (0..V)
            .map(|i| {
                let h = 1e-5;
                let (mut up, mut dn) = (theta.to_vec(), theta.to_vec());
                up[i] += h;
                dn[i] -= h;
                let q = q_fixed.then_some(&theta[..]);
                (exact_objective(&up, q, &p) - exact_objective(&dn, q, &p)) / (2.0 * h)
            })
            .collect()
    };
    let (exact, pathwise) = (grad(false), grad(true));
    let sch = PerTokenPolynomial::from_theta(&theta).unwrap();
    let opts = GenMd4Options::default();
    let dev = Cpu::default();
    let (b, k, n) = (2000usize, 25usize, X0.len());
    let xs: Vec<u32> = X0.iter().cycle().take(b * n).copied().collect();
    let mut rng = StdRng::seed_from_u64(500);
    let mut draws: Vec<Vec<f64>> = vec![Vec::new(); V];
    for _ in 0..k {
        let gb = GenMd4Batch::at_times(&xs, b, n, &sch, vec![T; b], &mut rng).unwrap();
        let logits: Vec<f32> = (0..2 * b)
            .flat_map(|r| p.log_probs(&gb.xt()[r * n..(r + 1) * n]))
            .map(|x| x as f32)
            .collect();
        let lt = dev.tensor_from_vec(logits, (2 * b, n, V));
        let th = dev.tensor_from_vec(theta.iter().map(|&x| x as f32).collect(), (V,));
        let out = genmd4_loss(lt.leaky_trace(), th.leaky_trace(), &gb, &opts).unwrap();
        let g = out.surrogate.backward().get(&th).as_vec();
        for i in 0..V {
            draws[i].push(g[i] as f64);
        }
    }
    for i in 0..V {
        let (m, se) = mean_se(&draws[i]);
        assert!(
            (m - exact[i]).abs() <= 4.0 * se + 1e-4,
            "theta {i}: RLOO {m} ± {se} vs exact {}",
            exact[i]
        );
        assert!(
            (pathwise[i] - exact[i]).abs() > 10.0 * se,
            "theta {i}: pathwise {} too close to exact {}",
            pathwise[i],
            exact[i]
        );
    }
}
