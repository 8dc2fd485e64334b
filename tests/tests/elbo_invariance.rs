//! Property 2 — the continuous-time ELBO of a time-independent predictor is invariant to the
//! schedule (given its endpoints) and equals the any-order-autoregressive closed form (paper §3,
//! spec §3.5, §11.9–§11.10). Oracles: Simpson quadrature over t written from eq. (4), and a
//! brute-force average over all N! reveal orders — both in `common`, independent of the library.

mod common;

use approx::assert_relative_eq;
use common::{ao_arm_by_permutations, exact_endpoint_schedule, t_quadrature_nelbo, TablePredictor};
use maskdiff_objective::reference::{
    ao_arm_nelbo, exact_continuous_nelbo, quadrature_continuous_nelbo,
};
use maskdiff_schedule::{AnySchedule, Cosine, Linear, Polynomial, Shifted};
use proptest::prelude::*;

proptest! {
    #![proptest_config(common::config(64))]

    /// Two different schedules with the same endpoints (linear / cosine / poly-w, w ∈ [1, 4], same
    /// ε ∈ {0, 1e−4, 0.05}) give the same ELBO by t-quadrature (1e−7 relative), equal to the
    /// library's exact value (1e−7); with ε = 0 all equal the AO-ARM average over N! orders
    /// (1e−9 for the library closed forms, 1e−7 for quadrature).
    #[test]
    fn elbo_schedule_invariant_and_ao_arm(
        n in 1usize..=4,
        vocab in 2usize..=4,
        seed in any::<u64>(),
        spread in 0.1f64..4.0,
        x0_seed in any::<u64>(),
        ka in 0u8..3, kb in 0u8..3,
        wa in 1.0f64..4.0, wb in 1.0f64..4.0,
        eps in prop_oneof![Just(0.0), Just(1e-4), Just(0.05)],
    ) {
        let x0: Vec<u32> = (0..n).map(|i| ((x0_seed >> (8 * i)) % vocab as u64) as u32).collect();
        let p = TablePredictor::random(n, vocab, spread, seed);
        let (sa, sb) = (exact_endpoint_schedule(ka, wa, eps), exact_endpoint_schedule(kb, wb, eps));
        let qa = t_quadrature_nelbo(&sa, &x0, &p, 4000);
        let qb = t_quadrature_nelbo(&sb, &x0, &p, 4000);
        prop_assert!((qa - qb).abs() <= 1e-7 * qa.abs().max(1e-3), "quadrature {qa} vs {qb}");
        let ea = exact_continuous_nelbo(&sa, &x0, vocab, |xt: &[u32]| p.log_probs(xt)).unwrap();
        prop_assert!((ea - qa).abs() <= 1e-7 * qa.abs().max(1e-3), "exact {ea} vs quadrature {qa}");
        let lq = quadrature_continuous_nelbo(&sb, &x0, vocab, |xt: &[u32], _t: f64| p.log_probs(xt), 64).unwrap();
        prop_assert!((lq - qb).abs() <= 1e-7 * qb.abs().max(1e-3), "library quadrature {lq} vs {qb}");
        if eps == 0.0 {
            let perm = ao_arm_by_permutations(&x0, &p);
            let ao = ao_arm_nelbo(&x0, vocab, |xt: &[u32]| p.log_probs(xt)).unwrap();
            prop_assert!((ao - perm).abs() <= 1e-9 * perm.max(1e-3), "closed form {ao} vs permutations {perm}");
            prop_assert!((ea - perm).abs() <= 1e-9 * perm.max(1e-3));
            prop_assert!((qa - perm).abs() <= 1e-7 * perm.max(1e-3));
        }
    }
}

/// §11.9: L_∞ = −ln 0.9 + ln 2 = 0.7985077 for linear, cosine and poly3 (unshifted), by every
/// route (1e−7 relative).
#[test]
fn spec_11_9_toy_continuous() {
    let (x0, p) = common::toy_11_9();
    let expect = -(0.9f64.ln()) + 2f64.ln();
    assert_relative_eq!(expect, 0.7985077, max_relative = 1e-7);
    assert_relative_eq!(
        ao_arm_by_permutations(&x0, &p),
        expect,
        max_relative = 1e-12
    );
    let lp = |xt: &[u32]| p.log_probs(xt);
    assert_relative_eq!(
        ao_arm_nelbo(&x0, 2, lp).unwrap(),
        expect,
        max_relative = 1e-12
    );
    let all = [
        Shifted::new(AnySchedule::Linear(Linear), 0.0).unwrap(),
        Shifted::new(AnySchedule::Cosine(Cosine), 0.0).unwrap(),
        Shifted::new(AnySchedule::Poly(Polynomial::new(3.0).unwrap()), 0.0).unwrap(),
    ];
    for s in &all {
        assert_relative_eq!(
            t_quadrature_nelbo(s, &x0, &p, 4000),
            expect,
            max_relative = 1e-9
        );
        assert_relative_eq!(
            exact_continuous_nelbo(s, &x0, 2, lp).unwrap(),
            expect,
            max_relative = 1e-12
        );
        let q =
            quadrature_continuous_nelbo(s, &x0, 2, |xt: &[u32], _| p.log_probs(xt), 64).unwrap();
        assert_relative_eq!(q, expect, max_relative = 1e-9);
    }
}
