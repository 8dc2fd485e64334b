//! Property 8 — the dfdx training losses equal the f64 reference (values) and their gradients
//! equal central finite differences of the f64 reference (spec §3.1, §3.2, §5.3–§5.5): MD4
//! (continuous and discrete-time weights) w.r.t. the logits, GenMD4's surrogate w.r.t. the logits
//! and θ (with the RLOO coefficient held fixed, as the stop-gradient prescribes).

mod common;

use common::{any_schedule, log_softmax};
use dfdx::prelude::*;
use maskdiff_objective::reference::{
    continuous_estimate, genmd4_diffusion_estimate, genmd4_log_q, genmd4_recon, genmd4_two_sample,
};
use maskdiff_objective::{
    genmd4_loss, md4_diffusion_loss, GenMd4Batch, GenMd4Options, MaskedBatch,
};
use maskdiff_schedule::{PerTokenPolynomial, TimeSampling};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Σ_b weight_b · masked CE_b in f64 from logits (the reference of the summed MD4 loss).
fn md4_reference_total(mb: &MaskedBatch, logits: &[f64]) -> f64 {
    let (l, v) = (mb.len(), mb.vocab());
    (0..mb.batch())
        .map(|b| {
            let lp = log_softmax(&logits[b * l * v..(b + 1) * l * v], v);
            let ce: f64 = (0..l)
                .filter(|&n| mb.is_masked(b * l + n))
                .map(|n| -lp[n * v + mb.x0()[b * l + n] as usize])
                .sum();
            mb.weight()[b] * ce
        })
        .sum()
}

proptest! {
    #![proptest_config(common::config(64))]

    /// MD4: per-sequence dfdx loss vs `continuous_estimate` (1e−5·(1 + |ref|)); gradient of the
    /// summed loss vs central differences (h = 1e−6) of the f64 reference (1e−4·(1 + |fd|)).
    /// Discrete-time batches (weight T·coef) go through the same check.
    #[test]
    fn md4_tensor_matches_reference(
        s in any_schedule(), b in 1usize..4, l in 1usize..6, v in 1usize..6,
        seed in any::<u64>(), discrete in any::<bool>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let x0: Vec<u32> = (0..b * l).map(|_| rng.gen_range(0..v as u32)).collect();
        let mb = if discrete {
            MaskedBatch::sample_discrete(&x0, b, l, v, &s, 1 + rng.gen_range(0..20), TimeSampling::Iid, &mut rng).unwrap()
        } else {
            MaskedBatch::sample(&x0, b, l, v, &s, TimeSampling::Iid, &mut rng).unwrap()
        };
        let logits32: Vec<f32> = (0..b * l * v).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        let logits: Vec<f64> = logits32.iter().map(|&x| x as f64).collect();
        let dev = Cpu::default();
        let lt = dev.tensor_from_vec(logits32, (b, l, v));
        let out = md4_diffusion_loss(lt.leaky_trace(), &mb).unwrap();
        let vals = out.as_vec();
        for r in 0..b {
            let xt = &mb.xt()[r * l..(r + 1) * l];
            let lp = log_softmax(&logits[r * l * v..(r + 1) * l * v], v);
            let want = if discrete {
                mb.weight()[r] * (0..l).filter(|&n| xt[n] as usize == v).map(|n| -lp[n * v + x0[r * l + n] as usize]).sum::<f64>()
            } else {
                continuous_estimate(&s, mb.t()[r], &x0[r * l..(r + 1) * l], xt, v, &lp).unwrap()
            };
            prop_assert!((vals[r] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{} vs {want}", vals[r]);
        }
        let grads = out.sum().backward();
        let g = grads.get(&lt).as_vec();
        let h = 1e-6;
        for i in 0..logits.len() {
            let mut up = logits.clone();
            up[i] += h;
            let mut dn = logits.clone();
            dn[i] -= h;
            let fd = (md4_reference_total(&mb, &up) - md4_reference_total(&mb, &dn)) / (2.0 * h);
            prop_assert!((g[i] as f64 - fd).abs() <= 1e-4 * (1.0 + fd.abs()) + 1e-6 * mb.weight()[i / (l * v)],
                "logit {i}: dfdx {} vs fd {fd}", g[i]);
        }
    }
}

/// The reference GenMD4 surrogate mean_b[0.5(L1 + L2) + c_b(log q1 − log q2) + recon], with the
/// RLOO coefficients c_b held fixed, as a function of θ and the stacked logits.
fn genmd4_reference_surrogate(
    gb: &GenMd4Batch,
    theta: &[f64],
    logits: &[f64],
    c: &[f64],
    t1: f64,
) -> f64 {
    let sch = PerTokenPolynomial::from_theta(theta).unwrap();
    let (b, l, v) = (gb.batch(), gb.len(), gb.vocab());
    let row = |r: usize| log_softmax(&logits[r * l * v..(r + 1) * l * v], v);
    (0..b)
        .map(|r| {
            let x0 = &gb.x0()[r * l..(r + 1) * l];
            let (x1, x2) = (
                &gb.xt()[r * l..(r + 1) * l],
                &gb.xt()[(b + r) * l..(b + r + 1) * l],
            );
            let l1 = genmd4_diffusion_estimate(&sch, gb.t()[r], x0, x1, &row(r)).unwrap();
            let l2 = genmd4_diffusion_estimate(&sch, gb.t()[r], x0, x2, &row(b + r)).unwrap();
            let lq = genmd4_log_q(&sch, gb.t()[r], x0, x1).unwrap()
                - genmd4_log_q(&sch, gb.t()[r], x0, x2).unwrap();
            0.5 * (l1 + l2) + c[r] * lq + genmd4_recon(&sch, t1, x0).unwrap()
        })
        .sum::<f64>()
        / b as f64
}

proptest! {
    #![proptest_config(common::config(48))]

    /// GenMD4: per-sequence L1, L2, log q1, log q2, recon of the dfdx loss vs
    /// `genmd4_two_sample` (1e−4·(1 + |ref|), RLOO term too); surrogate value vs the reference surrogate
    /// (1e−4 relative); gradients w.r.t. logits and θ vs central differences (h = 1e−6) of the
    /// reference surrogate with c_b = 0.5(L1 − L2) fixed (1e−3·(1 + |fd|)).
    #[test]
    fn genmd4_tensor_matches_reference(
        b in 1usize..4, l in 1usize..5, v in 1usize..5, seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let theta32: Vec<f32> = (0..v).map(|_| rng.gen_range(-1.5f32..2.0)).collect();
        let theta: Vec<f64> = theta32.iter().map(|&x| x as f64).collect();
        let sch = PerTokenPolynomial::from_theta(&theta).unwrap();
        let opts = GenMd4Options { sampling: TimeSampling::Iid, ..GenMd4Options::default() };
        let x0: Vec<u32> = (0..b * l).map(|_| rng.gen_range(0..v as u32)).collect();
        let gb = GenMd4Batch::sample(&x0, b, l, &sch, &opts, &mut rng).unwrap();
        let logits32: Vec<f32> = (0..2 * b * l * v).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
        let logits: Vec<f64> = logits32.iter().map(|&x| x as f64).collect();
        let dev = Cpu::default();
        let lt = dev.tensor_from_vec(logits32, (2 * b, l, v));
        let th = dev.tensor_from_vec(theta32, (v,));
        let out = genmd4_loss(lt.leaky_trace(), th.leaky_trace(), &gb, &opts).unwrap();
        let close = |a: f64, e: f64, tol: f64| (a - e).abs() <= tol * (1.0 + e.abs());
        let mut c = vec![0.0; b];
        let mut want_s = 0.0;
        for r in 0..b {
            let lp = |k: usize| log_softmax(&logits[k * l * v..(k + 1) * l * v], v);
            let e = genmd4_two_sample(&sch, gb.t()[r], opts.t1, &x0[r * l..(r + 1) * l],
                &gb.xt()[r * l..(r + 1) * l], &gb.xt()[(b + r) * l..(b + r + 1) * l], &lp(r), &lp(b + r)).unwrap();
            prop_assert!(close(out.l1[r], e.l1, 1e-4) && close(out.l2[r], e.l2, 1e-4), "L: {} {} vs {e:?}", out.l1[r], out.l2[r]);
            prop_assert!(close(out.log_q1[r], e.log_q1, 1e-4) && close(out.log_q2[r], e.log_q2, 1e-4), "log q vs {e:?}");
            prop_assert!(close(out.recon[r], e.recon, 1e-4));
            prop_assert!(close(out.nelbo()[r], e.nelbo(), 1e-4));
            prop_assert!(close(out.rloo()[r], e.rloo(), 1e-4));
            prop_assert!((out.prior - e.prior).abs() <= 1e-12);
            c[r] = 0.5 * (e.l1 - e.l2);
            want_s += e.surrogate() / b as f64;
        }
        let got_s = out.surrogate.as_vec()[0] as f64;
        prop_assert!(close(got_s, want_s, 1e-4), "surrogate {got_s} vs {want_s}");
        let grads = out.surrogate.backward();
        let (gl, gt) = (grads.get(&lt).as_vec(), grads.get(&th).as_vec());
        let h = 1e-6;
        let f = |th: &[f64], lg: &[f64]| genmd4_reference_surrogate(&gb, th, lg, &c, opts.t1);
        for i in 0..v {
            let (mut up, mut dn) = (theta.clone(), theta.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (f(&up, &logits) - f(&dn, &logits)) / (2.0 * h);
            prop_assert!(close(gt[i] as f64, fd, 1e-3), "theta {i}: dfdx {} vs fd {fd}", gt[i]);
        }
        for i in 0..logits.len() {
            let (mut up, mut dn) = (logits.clone(), logits.clone());
            up[i] += h;
            dn[i] -= h;
            let fd = (f(&theta, &up) - f(&theta, &dn)) / (2.0 * h);
            prop_assert!(close(gl[i] as f64, fd, 1e-3), "logit {i}: dfdx {} vs fd {fd}", gl[i]);
        }
    }
}
