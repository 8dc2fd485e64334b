//! Property 6 — the forward process and the reverse step (paper §2, App. C, eqs. (2)–(3), (11);
//! spec §1, §4.1, §5.2, §11.15, §11.18): binomial tests of the masked fraction (Chernoff tail
//! bound < 1e−9), the
//! posterior against Bayes' rule by enumeration over the V + 1 states (1e−12), reverse-step
//! probabilities non-negative and summing to 1 (1e−12) and equal to the posterior mixed over μ.

mod common;

use common::any_schedule;
use maskdiff_objective::{GenMd4Batch, GenMd4Options, MaskedBatch};
use maskdiff_process::{
    forward_sample, forward_sample_per_token, posterior, reverse_step, reverse_step_genmd4,
    transition_prob, State, Vocab,
};
use maskdiff_schedule::{MaskingSchedule, PerTokenPolynomial, TimeSampling};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Binomial test via the Chernoff bound P(X ≥ k) ≤ exp(−n·KL(k/n ‖ p)) (and the mirror bound
/// for the lower tail): reject only when the tail bound is below 1e−9 (≈ 6.4σ for large n·p;
/// unlike a z-test it stays valid when n·p is tiny).
fn binomial_ok(masked: usize, n: usize, p: f64) -> bool {
    let a = masked as f64 / n as f64;
    let term = |x: f64, y: f64| if x == 0.0 { 0.0 } else { x * (x / y).ln() };
    let kl = term(a, p) + term(1.0 - a, 1.0 - p);
    n as f64 * kl <= 1e9f64.ln()
}

fn random_mu(rng: &mut StdRng, v: usize) -> Vec<f64> {
    let raw: Vec<f64> = (0..v)
        .map(|_| rng.gen_range(0.0f64..1.0).powi(3) + 1e-12)
        .collect();
    let z: f64 = raw.iter().sum();
    raw.iter().map(|x| x / z).collect()
}

proptest! {
    #![proptest_config(common::config(64))]

    /// forward_sample with α: #masked ~ Binomial(n, 1 − α), real positions equal x_0.
    #[test]
    fn masked_fraction_binomial(alpha in 0.0f64..=1.0, vocab in 1usize..50, seed in any::<u64>()) {
        let v = Vocab::new(vocab).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let ids: Vec<u32> = (0..20_000).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let x0 = v.tokens(&ids).unwrap();
        let xt = forward_sample(&x0, alpha, &mut rng).unwrap();
        let masked = xt.iter().filter(|s| s.is_mask()).count();
        prop_assert!(binomial_ok(masked, x0.len(), 1.0 - alpha), "{masked} masks, alpha {alpha}");
        prop_assert!(xt.iter().zip(&x0).all(|(s, x)| s.is_mask() || *s == State::Real(*x)));
    }

    /// MaskedBatch at a fixed t: masked fraction ~ Binomial(B·N, 1 − α_t) for any schedule.
    #[test]
    fn masked_batch_fraction(s in any_schedule(), t in 0.0f64..=1.0, seed in any::<u64>()) {
        let (b, n, vocab) = (50, 200, 5);
        let mut rng = StdRng::seed_from_u64(seed);
        let x0: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let t = if MaskingSchedule::<f64>::one_minus_alpha(&s, t) == 0.0 { 0.5 } else { t };
        let mb = MaskedBatch::at_times(&x0, b, n, vocab, &s, vec![t; b], &mut rng).unwrap();
        let masked = mb.masked_counts().iter().sum::<usize>();
        prop_assert!(binomial_ok(masked, b * n, 1.0 - MaskingSchedule::<f64>::alpha(&s, t)));
        prop_assert!(x0.iter().zip(mb.xt()).all(|(a, x)| *x as usize == vocab || a == x));
    }

    /// GenMD4 forward (per-value α_{t,v} = 1 − (1 − ε)t^{w_v}): for each value v, the masked
    /// fraction of its positions ~ Binomial(n_v, (1 − ε)t^{w_v}) — via the process crate and via
    /// both copies of a GenMd4Batch.
    #[test]
    fn per_token_masked_fraction(ws in prop::collection::vec(0.2f64..5.0, 1..5), t in 0.01f64..0.99, seed in any::<u64>()) {
        let vocab = ws.len();
        let sch = PerTokenPolynomial::new(ws.clone()).unwrap();
        let v = Vocab::new(vocab).unwrap();
        let mut rng = StdRng::seed_from_u64(seed);
        let ids: Vec<u32> = (0..20_000).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let x0 = v.tokens(&ids).unwrap();
        let xt = forward_sample_per_token(&x0, |x| 1.0 - (1.0 - 1e-4) * t.powf(ws[x.index()]), &mut rng).unwrap();
        let (b, n) = (20, 1000);
        let gb = GenMd4Batch::at_times(&ids, b, n, &sch, vec![t; b], &mut rng).unwrap();
        for (val, &w) in ws.iter().enumerate() {
            let p = (1.0 - 1e-4) * t.powf(w);
            let pos: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] as usize == val).collect();
            let m = pos.iter().filter(|&&i| xt[i].is_mask()).count();
            prop_assert!(binomial_ok(m, pos.len(), p));
            for copy in 0..2 {
                let m = pos.iter().filter(|&&i| gb.xt()[copy * b * n + i] as usize == vocab).count();
                prop_assert!(binomial_ok(m, pos.len(), p), "copy {copy} value {val}");
            }
        }
    }

    /// q(x_s | x_t, x_0) from `posterior` equals Bayes' rule q(x_t|x_s)q(x_s|x_0)/q(x_t|x_0) with
    /// every x_s ∈ {0..V−1, mask} enumerated and the transitions written by hand (spec §1.1);
    /// transition_prob matches the hand-written q(x_t | x_s) and Chapman–Kolmogorov.
    #[test]
    fn posterior_is_bayes(s in any_schedule(), t in 0.01f64..=1.0, f in 0.0f64..0.99, vocab in 1usize..6, x in 0u32..6, masked in any::<bool>()) {
        let x = x % vocab as u32;
        let v = Vocab::new(vocab).unwrap();
        let sv = t * f;
        let (a_s, a_t) = (MaskingSchedule::<f64>::alpha(&s, sv), MaskingSchedule::<f64>::alpha(&s, t));
        let x0 = v.token(x).unwrap();
        let x_t = if masked { State::Mask } else { State::Real(x0) };
        let states: Vec<State> = (0..vocab as u32).map(|i| State::Real(v.token(i).unwrap())).chain([State::Mask]).collect();
        let q_s_given_0 = |st: State| match st { State::Mask => 1.0 - a_s, State::Real(y) => if y == x0 { a_s } else { 0.0 } };
        let q_t_given_s = |xs: State, xt: State| match (xs, xt) {
            (State::Mask, State::Mask) => 1.0,
            (State::Mask, State::Real(_)) => 0.0,
            (State::Real(a), State::Real(b)) => if a == b { a_t / a_s } else { 0.0 },
            (State::Real(_), State::Mask) => 1.0 - a_t / a_s,
        };
        let joint: Vec<f64> = states.iter().map(|&xs| q_t_given_s(xs, x_t) * q_s_given_0(xs)).collect();
        let evidence: f64 = joint.iter().sum();
        let q_t_given_0 = if masked { 1.0 - a_t } else { a_t };
        prop_assert!((evidence - q_t_given_0).abs() <= 1e-12);
        if evidence > 1e-12 {
            let post = posterior(x_t, x0, MaskingSchedule::<f64>::reveal_prob(&s, sv, t)).unwrap();
            for (k, &xs) in states.iter().enumerate() {
                let bayes = joint[k] / evidence;
                prop_assert!((post.prob(xs) - bayes).abs() <= 1e-10, "{xs:?}: {} vs {bayes}", post.prob(xs));
            }
        }
        for &xs in &states {
            if a_s > 0.0 {
                let got = transition_prob(xs, x_t, a_s, a_t).unwrap();
                prop_assert!((got - q_t_given_s(xs, x_t)).abs() <= 1e-12);
            }
        }
    }

    /// MD4 reverse step: probabilities ≥ 0, sum to 1 (1e−12), equal Σ_{x_0} μ(x_0)·q(x_s|mask, x_0).
    #[test]
    fn md4_reverse_step(s in any_schedule(), t in 0.01f64..=1.0, f in 0.0f64..0.99, vocab in 1usize..10, seed in any::<u64>()) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mu = random_mu(&mut rng, vocab);
        let sv = t * f;
        let a_s = MaskingSchedule::<f64>::alpha(&s, sv);
        let (om_s, om_t) = (MaskingSchedule::<f64>::one_minus_alpha(&s, sv), MaskingSchedule::<f64>::one_minus_alpha(&s, t));
        // (α_s − α_t)/(1 − α_t), differenced in 1 − α where α ≈ 1 (no cancellation).
        let reveal = if a_s > 0.5 { (om_t - om_s) / om_t } else { (a_s - MaskingSchedule::<f64>::alpha(&s, t)) / om_t };
        let step = reverse_step(&mu, MaskingSchedule::<f64>::reveal_prob(&s, sv, t)).unwrap();
        prop_assert!(step.real.iter().all(|&p| p >= 0.0) && step.mask >= 0.0);
        prop_assert!((step.real.iter().sum::<f64>() + step.mask - 1.0).abs() <= 1e-12);
        for (vv, &p) in step.real.iter().enumerate() {
            prop_assert!((p - mu[vv] * reveal).abs() <= 1e-9);
        }
        prop_assert!((step.mask - om_s / om_t).abs() <= 1e-9);
    }

    /// GenMD4 reverse step: ≥ 0, sums to 1 (1e−12), equals the posterior mixture
    /// Σ_{x_0} μ(x_0)·q_w(x_s | mask, x_0) with per-value α written by hand.
    #[test]
    fn genmd4_reverse_step(ws in prop::collection::vec(0.1f64..6.0, 1..6), t in 0.01f64..=1.0, f in 0.0f64..0.99, seed in any::<u64>()) {
        let vocab = ws.len();
        let mut rng = StdRng::seed_from_u64(seed);
        let mu = random_mu(&mut rng, vocab);
        let sch = PerTokenPolynomial::new(ws.clone()).unwrap();
        let sv = t * f;
        let step = reverse_step_genmd4(&mu, &sch, sv, t).unwrap();
        prop_assert!(step.real.iter().all(|&p| p >= 0.0) && step.mask >= 0.0);
        prop_assert!((step.real.iter().sum::<f64>() + step.mask - 1.0).abs() <= 1e-12);
        let om = |tt: f64, v: usize| (1.0 - 1e-4) * tt.powf(ws[v]);
        let mut mask = 0.0;
        for (v, &m) in mu.iter().enumerate() {
            // (α_s − α_t)/(1 − α_t) with α = 1 − om, written without the cancellation.
            let reveal = (om(t, v) - om(sv, v)) / om(t, v);
            prop_assert!((step.real[v] - m * reveal).abs() <= 1e-9);
            mask += m * om(sv, v) / om(t, v);
        }
        prop_assert!((step.mask - mask).abs() <= 1e-9);
    }
}

/// §11.18: w = (1, 2, 0.5), μ = (0.5, 0.3, 0.2), s = 0.25, t = 0.5: reveal 0.25, 0.225,
/// 0.0585786, stay mask 0.4664214 (1e−7).
#[test]
fn spec_11_18_genmd4_reverse_example() {
    let sch = PerTokenPolynomial::new(vec![1.0, 2.0, 0.5]).unwrap();
    let step = reverse_step_genmd4(&[0.5, 0.3, 0.2], &sch, 0.25, 0.5).unwrap();
    for (got, want) in step.real.iter().zip([0.25, 0.225, 0.0585786]) {
        assert!((got - want).abs() < 1e-7);
    }
    assert!((step.mask - 0.4664214).abs() < 1e-7);
}

/// §11.15: a step with p_unmask = 0 leaves the position masked with probability 1; with
/// p_unmask = 1 it reveals from μ exactly.
#[test]
fn spec_11_15_degenerate_steps() {
    let mu = [0.1, 0.6, 0.3];
    let none = reverse_step(&mu, 0.0).unwrap();
    assert_eq!(none.mask, 1.0);
    assert!(none.real.iter().all(|&p| p == 0.0));
    let all = reverse_step(&mu, 1.0).unwrap();
    assert_eq!(all.mask, 0.0);
    assert_eq!(all.real, mu.to_vec());
    let _ = TimeSampling::default();
    let _ = GenMd4Options::default();
}
