//! Property 4 — the discrete-time NELBO L_T (paper §3, App. D; spec §3.2, §11.9).
//!
//! In α-space L_T is a Riemann sum of L_∞ = ∫ h(a) da, h(a) = Σ_S C(S) a^{N−|S|}(1 − a)^{|S|−1},
//! with h evaluated at the lower end a = α_{t(i)} of each interval [α_{t(i)}, α_{s(i)}]. So
//! L_T ≥ L_∞, L_T decreases under grid refinement and L_T − L_∞ ≤ max_i Δα_i·(h(α_1) − h(α_0))
//! whenever h is non-increasing — which holds when more context never hurts the predictor
//! (each masked position's CE grows with the masked set; `TablePredictor::monotone`), e.g. for the
//! §11.9 toy. For other predictors L_T < L_∞ is possible (`non_monotone_predictor_counterexample`).

mod common;

use approx::assert_relative_eq;
use common::{
    discrete_nelbo_by_enumeration, exact_endpoint_schedule, t_quadrature_nelbo, TablePredictor,
};
use maskdiff_objective::reference::{exact_continuous_nelbo, exact_discrete_nelbo};
use maskdiff_schedule::{Cosine, Linear, MaskingSchedule, Shifted};
use proptest::prelude::*;

fn h(x0: &[u32], p: &TablePredictor, a: f64) -> f64 {
    let n = x0.len() as i32;
    (1u64..1 << x0.len())
        .map(|m| {
            let k = m.count_ones() as i32;
            p.cost(x0, m) * a.powi(n - k) * (1.0 - a).powi(k - 1)
        })
        .sum()
}

proptest! {
    #![proptest_config(common::config(64))]

    /// Monotone predictors, random schedule (linear/cosine/poly-w, ε ∈ {0, 1e−4, 0.05}):
    /// L_T ≥ L_∞ for T = 1..12 (up to 1e−12 relative), L_T non-increasing along
    /// T = 1, 2, 4, …, 1024 and along T = 3, 6, 12, and L_T − L_∞ ≤ max Δα·(h(α_1) − h(α_0))
    /// (+1e−12). The library's exact L_T equals the test's enumeration (1e−10 relative).
    #[test]
    fn discrete_bounds_continuous(
        n in 1usize..=4, vocab in 2usize..=4, seed in any::<u64>(), x0_seed in any::<u64>(),
        k in 0u8..3, w in 0.5f64..4.0,
        eps in prop_oneof![Just(0.0), Just(1e-4), Just(0.05)],
    ) {
        let x0: Vec<u32> = (0..n).map(|i| ((x0_seed >> (8 * i)) % vocab as u64) as u32).collect();
        let p = TablePredictor::monotone(&x0, vocab, seed);
        let s = exact_endpoint_schedule(k, w, eps);
        let linf = exact_continuous_nelbo(&s, &x0, vocab, |xt: &[u32]| p.log_probs(xt)).unwrap();
        let tol = 1e-12 * linf.max(1e-6);
        let lt = |steps: usize| discrete_nelbo_by_enumeration(&s, steps, &x0, &p);
        for steps in 1..=12 {
            prop_assert!(lt(steps) >= linf - tol, "L_{steps} = {} < L_inf = {linf}", lt(steps));
        }
        let chain: Vec<f64> = (0..=10).map(|j| lt(1 << j)).collect();
        for c in chain.windows(2) {
            prop_assert!(c[1] <= c[0] + tol, "refinement increased L_T: {} -> {}", c[0], c[1]);
        }
        prop_assert!(lt(6) <= lt(3) + tol && lt(12) <= lt(6) + tol);
        let (a0, a1) = (MaskingSchedule::<f64>::alpha(&s, 0.0), MaskingSchedule::<f64>::alpha(&s, 1.0));
        let bound_gap = h(&x0, &p, a1) - h(&x0, &p, a0);
        for steps in [16usize, 256, 1024] {
            let max_da = (1..=steps)
                .map(|i| {
                    MaskingSchedule::<f64>::alpha(&s, (i - 1) as f64 / steps as f64)
                        - MaskingSchedule::<f64>::alpha(&s, i as f64 / steps as f64)
                })
                .fold(0.0, f64::max);
            let gap = lt(steps) - linf;
            prop_assert!(gap <= max_da * bound_gap + tol, "T = {steps}: gap {gap} > {}", max_da * bound_gap);
        }
        for steps in [1usize, 7, 100] {
            let lib = exact_discrete_nelbo(&s, steps, &x0, vocab, |xt: &[u32], _| p.log_probs(xt)).unwrap();
            prop_assert!((lib - lt(steps)).abs() <= 1e-10 * lt(steps).max(1e-6));
        }
    }

    /// The library's exact L_T equals the enumeration for arbitrary (non-monotone) predictors.
    #[test]
    fn exact_discrete_matches_enumeration(
        n in 1usize..=4, vocab in 2usize..=4, seed in any::<u64>(), steps in 1usize..50,
        k in 0u8..3, w in 0.5f64..4.0, eps in prop_oneof![Just(0.0), Just(1e-4)],
    ) {
        let x0 = vec![0u32; n];
        let p = TablePredictor::random(n, vocab, 3.0, seed);
        let s = exact_endpoint_schedule(k, w, eps);
        let lib = exact_discrete_nelbo(&s, steps, &x0, vocab, |xt: &[u32], _| p.log_probs(xt)).unwrap();
        let e = discrete_nelbo_by_enumeration(&s, steps, &x0, &p);
        prop_assert!((lib - e).abs() <= 1e-10 * e.max(1e-6));
    }
}

/// §11.9: linear L_1 = 1.3862944, L_2 = 1.0924010, L_4 = 0.9454544, L_10 = 0.8572864,
/// L_100 = 0.8043856, L_1000 = 0.7990955; cosine L_2 = 1.1428252, L_4 = 0.9774781,
/// L_10 = 0.8708740, L_100 = 0.8057591, L_1000 = 0.7992328 (unshifted; 1e−6 relative), by the
/// library and by the test's enumeration; all above L_∞ = 0.7985077 and decreasing.
#[test]
fn spec_11_9_discrete_values() {
    let (x0, p) = common::toy_11_9();
    let lin = Shifted::new(Linear, 0.0).unwrap();
    let cos = Shifted::new(Cosine, 0.0).unwrap();
    let linf = 0.7985077;
    type Case<'a> = (&'a dyn Fn(usize) -> f64, &'a [(usize, f64)]);
    let cases: [Case; 2] = [
        (
            &|t| exact_discrete_nelbo(&lin, t, &x0, 2, |xt: &[u32], _| p.log_probs(xt)).unwrap(),
            &[
                (1, 1.3862944),
                (2, 1.0924010),
                (4, 0.9454544),
                (10, 0.8572864),
                (100, 0.8043856),
                (1000, 0.7990955),
            ],
        ),
        (
            &|t| exact_discrete_nelbo(&cos, t, &x0, 2, |xt: &[u32], _| p.log_probs(xt)).unwrap(),
            &[
                (2, 1.1428252),
                (4, 0.9774781),
                (10, 0.8708740),
                (100, 0.8057591),
                (1000, 0.7992328),
            ],
        ),
    ];
    for (f, vals) in cases {
        let mut prev = f64::INFINITY;
        for &(t, v) in vals {
            let got = f(t);
            assert_relative_eq!(got, v, max_relative = 1e-6);
            assert!(got > linf && got < prev);
            prev = got;
        }
    }
    assert_relative_eq!(
        discrete_nelbo_by_enumeration(&lin, 10, &x0, &p),
        0.8572864,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        discrete_nelbo_by_enumeration(&cos, 10, &x0, &p),
        0.8708740,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        t_quadrature_nelbo(&cos, &x0, &p, 4000),
        linf,
        max_relative = 1e-6
    );
}

/// L_T ≥ L_∞ needs a predictor that context helps: with C({n}) = c and C({0,1}) = 0 (N = 2,
/// linear), L_T = c(T − 1)/T < L_∞ = c (derived by hand: Σ_i (1/i)·2(i/T)(1 − i/T)·c).
#[test]
fn non_monotone_predictor_counterexample() {
    let c = 0.7f64;
    let good = [0.0, f64::NEG_INFINITY];
    let bad = [-c, (-(-c).exp_m1()).ln()];
    let table = vec![
        [good, good].concat(),
        [bad, good].concat(),
        [good, bad].concat(),
        [good, good].concat(),
    ];
    let p = TablePredictor {
        n: 2,
        vocab: 2,
        table,
    };
    let x0 = [0u32, 0];
    let lin = Shifted::new(Linear, 0.0).unwrap();
    let linf = exact_continuous_nelbo(&lin, &x0, 2, |xt: &[u32]| p.log_probs(xt)).unwrap();
    assert_relative_eq!(linf, c, max_relative = 1e-12);
    for t in [1usize, 2, 5, 50] {
        let lt = exact_discrete_nelbo(&lin, t, &x0, 2, |xt: &[u32], _| p.log_probs(xt)).unwrap();
        assert_relative_eq!(
            lt,
            c * (t as f64 - 1.0) / t as f64,
            max_relative = 1e-12,
            epsilon = 1e-15
        );
    }
}
