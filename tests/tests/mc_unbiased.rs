//! Property 5 — the Monte-Carlo estimators are unbiased and antithetic times reduce variance
//! (paper eq. (4), Alg. 1, App. I; spec §2.3, §3.1–§3.2, §11.11). Fixed seeds; each mean over K
//! batches must be within 4 standard errors of the exact value, which the test computes itself
//! (quadrature / enumeration in `common`, GenMD4's E_q[L] by enumeration below).

mod common;

use common::{
    discrete_nelbo_by_enumeration, mean_se, noised, simpson, t_quadrature_nelbo, TablePredictor,
};
use maskdiff_objective::reference::{continuous_estimate, genmd4_diffusion_estimate};
use maskdiff_objective::{GenMd4Batch, GenMd4Options, MaskedBatch};
use maskdiff_schedule::{
    AnySchedule, Cosine, Linear, MaskingSchedule, PerTokenPolynomial, Polynomial, Shifted,
    TimeSampling,
};
use rand::{rngs::StdRng, SeedableRng};

const X0: [u32; 3] = [0, 2, 1];
const V: usize = 3;
const B: usize = 16;
const K: usize = 4000;

fn masked_ce(xt: &[u32], lp: &[f64]) -> f64 {
    (0..X0.len())
        .filter(|&i| xt[i] as usize == V)
        .map(|i| -lp[i * V + X0[i] as usize])
        .sum()
}

/// Batch means of the continuous-time estimator on x_0 = `x0` (V = 2 or 3) and of its
/// Rao–Blackwellised version m(t_b) = E[estimate | t_b] (exact, by enumeration); also checks each
/// weight against −α'/(1 − α).
fn continuous_batch_means(
    s: &Shifted<AnySchedule>,
    x0: &[u32],
    vocab: usize,
    p: &TablePredictor,
    sampling: TimeSampling,
    seed: u64,
) -> (Vec<f64>, Vec<f64>) {
    let n = x0.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let xs: Vec<u32> = x0.iter().cycle().take(B * n).copied().collect();
    let costs: Vec<(i32, f64)> = (1u64..1 << n)
        .map(|m| (m.count_ones() as i32, p.cost(x0, m)))
        .collect();
    let (mut raw, mut rb) = (Vec::with_capacity(K), Vec::with_capacity(K));
    for _ in 0..K {
        let mb = MaskedBatch::sample(&xs, B, n, vocab, s, sampling, &mut rng).unwrap();
        let (mut sr, mut sb) = (0.0, 0.0);
        for b in 0..B {
            let t = mb.t()[b];
            let a = MaskingSchedule::<f64>::alpha(s, t);
            let w = -MaskingSchedule::<f64>::dalpha(s, t) / (1.0 - a);
            assert!((mb.weight()[b] - w).abs() <= 1e-9 * w);
            let xt = &mb.xt()[b * n..(b + 1) * n];
            let lp = p.log_probs(xt);
            let est = continuous_estimate(s, t, x0, xt, vocab, &lp).unwrap();
            let ce: f64 = (0..n)
                .filter(|&i| xt[i] as usize == vocab)
                .map(|i| -lp[i * vocab + x0[i] as usize])
                .sum();
            assert!((est - w * ce).abs() <= 1e-9 * est.max(1.0));
            sr += est;
            sb += w * costs
                .iter()
                .map(|&(k, c)| a.powi(n as i32 - k) * (1.0 - a).powi(k) * c)
                .sum::<f64>();
        }
        raw.push(sr / B as f64);
        rb.push(sb / B as f64);
    }
    (raw, rb)
}

/// Continuous-time estimator, shifted linear, cosine, poly2, poly3 (ε = 1e−4; unshifted schedules have
/// infinite variance near t = 0), on a 3-token random predictor and an 8-token monotone one:
/// i.i.d. and antithetic means within 4 SE of the exact L_∞ (t-quadrature). Antithetic t lowers
/// the variance of the t-part (Rao–Blackwellised batch means, by a factor > 4) and, where that
/// part dominates (8 tokens, poly2/poly3), of the estimator itself. With linear/cosine the mask
/// noise near t = 0 (weight ≈ 1/t) dominates and the total reduction is within sampling noise.
#[test]
fn continuous_estimator_unbiased_antithetic_lower_variance() {
    let x8: Vec<u32> = vec![0, 1, 1, 0, 1, 0, 0, 1];
    let problems = [
        (
            X0.to_vec(),
            V,
            TablePredictor::random(X0.len(), V, 2.0, 7),
            false,
        ),
        (x8.clone(), 2, TablePredictor::monotone(&x8, 2, 11), true),
    ];
    let mut seed = 100;
    for (x0, vocab, p, total_variance_drops) in &problems {
        for s in [
            Shifted::official(AnySchedule::Linear(Linear)),
            Shifted::official(AnySchedule::Cosine(Cosine)),
            Shifted::official(AnySchedule::Poly(Polynomial::new(2.0).unwrap())),
            Shifted::official(AnySchedule::Poly(Polynomial::new(3.0).unwrap())),
        ] {
            seed += 1;
            let exact = t_quadrature_nelbo(&s, x0, p, 4000);
            let (iid, iid_rb) = continuous_batch_means(&s, x0, *vocab, p, TimeSampling::Iid, seed);
            let (anti, anti_rb) =
                continuous_batch_means(&s, x0, *vocab, p, TimeSampling::Antithetic, seed + 50);
            let (mi, sei) = mean_se(&iid);
            let (ma, sea) = mean_se(&anti);
            assert!(
                (mi - exact).abs() <= 4.0 * sei,
                "iid {mi} ± {sei} vs exact {exact}"
            );
            assert!(
                (ma - exact).abs() <= 4.0 * sea,
                "antithetic {ma} ± {sea} vs exact {exact}"
            );
            let (_, se_rb_i) = mean_se(&iid_rb);
            let (_, se_rb_a) = mean_se(&anti_rb);
            assert!(
                se_rb_a * se_rb_a * 4.0 < se_rb_i * se_rb_i,
                "t-part: {se_rb_a} vs {se_rb_i}"
            );
            // With poly-w (w ≥ 2) the mask noise near t = 0 is light and the t-part dominates.
            let poly = matches!(s.inner(), AnySchedule::Poly(_));
            if *total_variance_drops && poly {
                assert!(sea < sei, "antithetic SE {sea} not below iid SE {sei}");
            }
        }
    }
}

/// Discrete-time (T = 4, code convention) estimator weight·CE: weight = T(α_s − α_t)/(1 − α_t)
/// with s = t − 1/T (1e−9 relative), mean within 4 SE of the exact L_4 (enumeration).
#[test]
fn discrete_estimator_unbiased() {
    let p = TablePredictor::random(X0.len(), V, 2.0, 8);
    let s = Shifted::official(AnySchedule::Cosine(Cosine));
    let steps = 4;
    let exact = discrete_nelbo_by_enumeration(&s, steps, &X0, &p);
    let mut rng = StdRng::seed_from_u64(300);
    let xs: Vec<u32> = X0.iter().cycle().take(B * X0.len()).copied().collect();
    let means: Vec<f64> = (0..K)
        .map(|_| {
            let mb = MaskedBatch::sample_discrete(
                &xs,
                B,
                3,
                V,
                &s,
                steps,
                TimeSampling::Antithetic,
                &mut rng,
            )
            .unwrap();
            (0..B)
                .map(|b| {
                    let t = mb.t()[b];
                    let sv = t - 1.0 / steps as f64;
                    let (a_t, a_s) = (
                        MaskingSchedule::<f64>::alpha(&s, t),
                        MaskingSchedule::<f64>::alpha(&s, sv),
                    );
                    let w = steps as f64 * (a_s - a_t) / (1.0 - a_t);
                    assert!((mb.weight()[b] - w).abs() <= 1e-9 * w);
                    let xt = &mb.xt()[b * 3..(b + 1) * 3];
                    w * masked_ce(xt, &p.log_probs(xt))
                })
                .sum::<f64>()
                / B as f64
        })
        .collect();
    let (m, se) = mean_se(&means);
    assert!((m - exact).abs() <= 4.0 * se, "{m} ± {se} vs exact {exact}");
}

/// E_{q_w(x_t|x_0)}[Σ_masked (1/t)(Σ_v w_v μ_v − w_x − w_x log μ_x)] by enumeration, written from
/// spec §5.1/§5.3.
fn genmd4_expected(w: &[f64], t: f64, p: &TablePredictor) -> f64 {
    let n = X0.len();
    (0u64..1 << n)
        .map(|mask| {
            let q: f64 = (0..n)
                .map(|i| {
                    let m = (1.0 - 1e-4) * t.powf(w[X0[i] as usize]);
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
                    let x = X0[i] as usize;
                    let row = &lp[i * V..(i + 1) * V];
                    let mean_w: f64 = (0..V).map(|v| w[v] * row[v].exp()).sum();
                    (mean_w - w[x] - w[x] * row[x]) / t
                })
                .sum();
            q * l
        })
        .sum()
}

/// GenMD4 two-sample diffusion estimate 0.5(L1 + L2) with t ~ antithetic U[t1, 1): mean within
/// 4 SE of (1/(1 − t1))∫_{t1}^1 E_q[L] dt (the official code's normalisation, spec §5.4).
#[test]
fn genmd4_estimator_unbiased() {
    let p = TablePredictor::random(X0.len(), V, 2.0, 9);
    let w = vec![0.7, 1.5, 3.0];
    let sch = PerTokenPolynomial::new(w.clone()).unwrap();
    let opts = GenMd4Options::default();
    // t = e^v: dt = t dv, a smooth integrand on [ln t1, 0].
    let integral = simpson(
        |v| v.exp() * genmd4_expected(&w, v.exp(), &p),
        opts.t1.ln(),
        0.0,
        4000,
    );
    let exact = integral / (1.0 - opts.t1);
    let mut rng = StdRng::seed_from_u64(400);
    let xs: Vec<u32> = X0.iter().cycle().take(B * 3).copied().collect();
    let means: Vec<f64> = (0..K)
        .map(|_| {
            let gb = GenMd4Batch::sample(&xs, B, 3, &sch, &opts, &mut rng).unwrap();
            (0..B)
                .map(|b| {
                    let (x1, x2) = (
                        &gb.xt()[b * 3..b * 3 + 3],
                        &gb.xt()[(B + b) * 3..(B + b) * 3 + 3],
                    );
                    let l1 = genmd4_diffusion_estimate(&sch, gb.t()[b], &X0, x1, &p.log_probs(x1))
                        .unwrap();
                    let l2 = genmd4_diffusion_estimate(&sch, gb.t()[b], &X0, x2, &p.log_probs(x2))
                        .unwrap();
                    0.5 * (l1 + l2)
                })
                .sum::<f64>()
                / B as f64
        })
        .collect();
    let (m, se) = mean_se(&means);
    assert!((m - exact).abs() <= 4.0 * se, "{m} ± {se} vs exact {exact}");
}
