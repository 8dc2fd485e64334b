//! Property 1 — schedule maths (paper Table 4, App. J.1; spec §2, §11.1–§11.6, §11.12).
//! Random schedules of all four kinds with random ε shifts; exact spec values to 1e−6 relative.

mod common;

use approx::assert_relative_eq;
use common::any_schedule;
use maskdiff_objective::reference::{discrete_coefficient, discrete_times};
use maskdiff_schedule::time::antithetic;
use maskdiff_schedule::{
    AnySchedule, Cosine, Geometric, Linear, MaskingSchedule, PerTokenPolynomial, Polynomial,
    Shifted, TimeSampling,
};
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

proptest! {
    #![proptest_config(common::config(256))]

    /// α(0) = 1 − ε and α(1) = ε up to the geometric schedule's own endpoint offsets
    /// (e^{−β̄_min} ≥ 1 − 1e−4 and e^{−β̄_max} ≤ 5e−5 here), and α strictly decreasing.
    #[test]
    fn endpoints_and_monotone(s in any_schedule(), t in 0.0f64..1.0, dt in 1e-3f64..1.0) {
        let eps = s.eps();
        prop_assert!((MaskingSchedule::<f64>::alpha(&s, 0.0) - (1.0 - eps)).abs() <= 1e-4);
        prop_assert!((MaskingSchedule::<f64>::alpha(&s, 1.0) - eps).abs() <= 1e-4);
        let t2 = (t + dt).min(1.0);
        if t2 > t {
            prop_assert!(MaskingSchedule::<f64>::alpha(&s, t2) < MaskingSchedule::<f64>::alpha(&s, t));
        }
    }

    /// α' equals a central finite difference (h = 1e−6; tolerance 1e−6·(1 + |α'|)), 1 − α equals
    /// the subtraction (1e−12), the weight equals α'/(1 − α) in f64 (1e−9 relative where
    /// 1 − α > 1e−3), the log-SNR equals ln(α/(1 − α)) (1e−9 absolute), and the f32 weight
    /// agrees with f64 to 1e−4 relative.
    #[test]
    fn derivative_weight_logsnr(s in any_schedule(), t in 0.01f64..0.99) {
        let h = 1e-6;
        let a = |x: f64| MaskingSchedule::<f64>::alpha(&s, x);
        let fd = (a(t + h) - a(t - h)) / (2.0 * h);
        let da = MaskingSchedule::<f64>::dalpha(&s, t);
        prop_assert!((da - fd).abs() <= 1e-6 * (1.0 + da.abs()), "alpha' {da} vs fd {fd}");
        let om = MaskingSchedule::<f64>::one_minus_alpha(&s, t);
        prop_assert!((om - (1.0 - a(t))).abs() <= 1e-12);
        if 1.0 - a(t) > 1e-3 {
            let w = MaskingSchedule::<f64>::weight(&s, t);
            let expect = da / (1.0 - a(t));
            prop_assert!((w - expect).abs() <= 1e-9 * expect.abs().max(1e-12));
            let w32 = MaskingSchedule::<f32>::weight(&s, t as f32) as f64;
            prop_assert!((w32 - w).abs() <= 1e-4 * w.abs().max(1e-6), "f32 {w32} vs f64 {w}");
        }
        let lam = MaskingSchedule::<f64>::log_snr(&s, t);
        prop_assert!((lam - (a(t) / (1.0 - a(t))).ln()).abs() <= 1e-9 * (1.0 + lam.abs()));
    }

    /// t(α(t)) = t and λ(t(α)) = ln(α/(1 − α)) wherever the inverse exists (1e−7).
    #[test]
    fn inverse_round_trips(s in any_schedule(), t in 0.05f64..0.95) {
        let a = MaskingSchedule::<f64>::alpha(&s, t);
        let back = MaskingSchedule::<f64>::t_of_alpha(&s, a).expect("all four have an inverse");
        prop_assert!((back - t).abs() <= 1e-7, "t {t} -> alpha {a} -> {back}");
        let lam = MaskingSchedule::<f64>::log_snr(&s, back);
        prop_assert!((lam - (a / (1.0 - a)).ln()).abs() <= 1e-7 * (1.0 + lam.abs()));
    }

    /// Unshifted poly-w: weight = −w/t for every t (§11.3), 1e−12 relative.
    #[test]
    fn poly_weight_is_minus_w_over_t(w in 0.1f64..8.0, t in 1e-6f64..1.0) {
        let p = Polynomial::new(w).unwrap();
        let got = MaskingSchedule::<f64>::weight(&p, t);
        prop_assert!((got + w / t).abs() <= 1e-12 * (w / t));
    }

    /// Discrete coefficient identity (§11.5): the code's −expm1(γ_t − γ_s)·α_s equals
    /// (α_s − α_t)/(1 − α_t) computed directly (1e−9 relative + 1e−14·α_s(1 + |λ_t| + |λ_s|) for
    /// the conditioning of λ_t − λ_s), for every schedule. The direct
    /// difference is taken in 1 − α where α ≈ 1 (else it cancels catastrophically near t = 0).
    #[test]
    fn discrete_coefficient_identity(s in any_schedule(), t in 0.01f64..1.0, f in 0.0f64..1.0) {
        let sv = t * f;
        let a = |x: f64| MaskingSchedule::<f64>::alpha(&s, x);
        let om = |x: f64| MaskingSchedule::<f64>::one_minus_alpha(&s, x);
        let num = if a(sv) > 0.5 { om(t) - om(sv) } else { a(sv) - a(t) };
        let direct = num / om(t);
        let got = discrete_coefficient(&s, sv, t).unwrap();
        // The log-SNR form differences two O(|λ|) numbers: allow a few ulps of λ on top.
        let lam = |x: f64| MaskingSchedule::<f64>::log_snr(&s, x).abs();
        let tol = 1e-9 * direct.abs() + 1e-14 * a(sv) * (1.0 + lam(t) + lam(sv));
        prop_assert!((got - direct).abs() <= tol, "{got} vs {direct}");
    }

    /// Unshifted linear on the grid i/T: (α_s − α_t)/(1 − α_t) = 1/i (§11.6), 1e−12 relative.
    #[test]
    fn linear_grid_coefficient(steps in 1usize..2000, frac in 0.0f64..1.0) {
        let i = 1 + ((frac * steps as f64) as usize).min(steps - 1);
        let c = discrete_coefficient(&Linear, (i - 1) as f64 / steps as f64, i as f64 / steps as f64).unwrap();
        prop_assert!((c - 1.0 / i as f64).abs() <= 1e-12 / i as f64 + 1e-15);
    }

    /// Antithetic times are a shifted regular grid: sorted, consecutive gaps are exactly 1/B
    /// (1e−12), all in [t1, 1) (§2.3, §11.12).
    #[test]
    fn antithetic_is_shifted_grid(b in 1usize..64, seed in any::<u64>(), t1 in prop_oneof![Just(0.0), Just(1e-3)]) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut ts = TimeSampling::Antithetic.sample(b, t1, &mut rng).unwrap();
        ts.sort_by(f64::total_cmp);
        prop_assert!(ts.iter().all(|&t| (t1..1.0).contains(&t)));
        for w in ts.windows(2) {
            prop_assert!(((w[1] - w[0]) - (1.0 - t1) / b as f64).abs() <= 1e-12);
        }
    }

    /// GenMD4 per-value schedule: α_{t,v} = 1 − (1 − ε)t^{w_v}, weight −w_v/t, reveal
    /// probability 1 − (s/t)^{w_v}, log terms consistent (1e−12).
    #[test]
    fn per_token_polynomial(ws in prop::collection::vec(0.05f64..6.0, 1..6), t in 1e-3f64..1.0, f in 0.0f64..1.0) {
        let sch = PerTokenPolynomial::new(ws.clone()).unwrap();
        let s = t * f;
        for (v, &w) in ws.iter().enumerate() {
            let om = (1.0 - 1e-4) * t.powf(w);
            prop_assert!((sch.alpha(t, v) - (1.0 - om)).abs() <= 1e-12);
            prop_assert!((sch.weight(t, v) + w / t).abs() <= 1e-12 * w / t);
            prop_assert!((sch.reveal_prob(s, t, v) - (1.0 - (s / t).powf(w))).abs() <= 1e-12);
            prop_assert!((sch.log_one_minus_alpha(t, v) - om.ln()).abs() <= 1e-12 * (1.0 + om.ln().abs()));
            prop_assert!((sch.log_alpha(t, v) - (1.0 - om).ln()).abs() <= 1e-9);
        }
    }
}

#[test]
fn spec_11_1_shifted_linear() {
    let s = Shifted::official(Linear);
    let a = |t: f64| MaskingSchedule::<f64>::alpha(&s, t);
    let w = |t: f64| MaskingSchedule::<f64>::weight(&s, t);
    assert_relative_eq!(a(0.0), 0.9999, max_relative = 1e-12);
    assert_relative_eq!(a(0.5), 0.5, max_relative = 1e-12);
    assert_relative_eq!(a(1.0), 1e-4, max_relative = 1e-9);
    assert_relative_eq!(w(0.5), -1.9996, max_relative = 1e-9);
    assert_relative_eq!(w(0.0), -9998.0, max_relative = 1e-9);
    assert_relative_eq!(w(1.0), -0.9999, max_relative = 1e-6);
    assert_relative_eq!(w(0.1), -9.990008, max_relative = 1e-6);
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&Linear, 0.5),
        -2.0,
        max_relative = 1e-12
    );
}

#[test]
fn spec_11_2_shifted_cosine() {
    let s = Shifted::official(Cosine);
    assert_relative_eq!(
        MaskingSchedule::<f64>::alpha(&s, 0.5),
        0.29293464,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&s, 0.5),
        -1.570574,
        max_relative = 1e-6
    );
    assert_eq!(MaskingSchedule::<f64>::weight(&s, 1.0), 0.0);
    assert_relative_eq!(
        MaskingSchedule::<f64>::alpha(&s, 0.9),
        0.01240920,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::dalpha(&s, 0.9),
        -0.24567754,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&s, 0.9),
        -0.248765,
        max_relative = 1e-5
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&Cosine, 0.5),
        -std::f64::consts::FRAC_PI_2,
        max_relative = 1e-12
    );
}

#[test]
fn spec_11_3_shifted_poly() {
    let p3 = Shifted::official(Polynomial::new(3.0).unwrap());
    assert_relative_eq!(
        MaskingSchedule::<f64>::alpha(&p3, 0.5),
        0.874925,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&p3, 0.5),
        -5.995203,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::alpha(&p3, 0.9),
        0.27104580,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::dalpha(&p3, 0.9),
        -2.429514,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&p3, 0.9),
        -3.332876,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::dalpha(&p3, 0.5),
        -0.74985,
        max_relative = 1e-9
    );
    let p2 = Shifted::official(Polynomial::new(2.0).unwrap());
    assert_relative_eq!(
        MaskingSchedule::<f64>::alpha(&p2, 0.5),
        0.74995,
        max_relative = 1e-9
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&p2, 0.5),
        -3.9984,
        max_relative = 1e-6
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&Polynomial::new(3.0).unwrap(), 0.5),
        -6.0,
        max_relative = 1e-12
    );
}

#[test]
fn spec_11_4_log_snr() {
    assert!(MaskingSchedule::<f64>::log_snr(&Shifted::official(Linear), 0.5).abs() < 1e-12);
    let ln9999 = 9999f64.ln();
    assert_relative_eq!(ln9999, 9.210240, max_relative = 1e-7);
    let all = [
        Shifted::official(AnySchedule::Linear(Linear)),
        Shifted::official(AnySchedule::Cosine(Cosine)),
        Shifted::official(AnySchedule::Poly(Polynomial::new(3.0).unwrap())),
    ];
    for s in &all {
        assert_relative_eq!(
            MaskingSchedule::<f64>::log_snr(s, 0.0),
            ln9999,
            max_relative = 1e-9
        );
        assert_relative_eq!(
            MaskingSchedule::<f64>::log_snr(s, 1.0),
            -ln9999,
            max_relative = 1e-9
        );
    }
}

#[test]
fn spec_11_5_discrete_coefficient_examples() {
    let s = Shifted::official(Linear);
    let (t, sv) = discrete_times(0.4999, 1000).unwrap();
    assert_relative_eq!(t, 0.5, max_relative = 1e-12);
    assert_relative_eq!(sv, 0.499, max_relative = 1e-12);
    assert_relative_eq!(
        1000.0 * discrete_coefficient(&s, sv, t).unwrap(),
        1.9996,
        max_relative = 1e-6
    );
    let (t, sv) = discrete_times(0.0, 1000).unwrap();
    assert_eq!((t, sv), (0.001, 0.0));
    assert_relative_eq!(
        1000.0 * discrete_coefficient(&s, sv, t).unwrap(),
        909.07438,
        max_relative = 1e-7
    );
}

#[test]
fn geometric_paper_constants() {
    let g = Geometric::PAPER;
    assert_relative_eq!(
        MaskingSchedule::<f64>::alpha(&g, 0.5),
        0.98595739,
        max_relative = 1e-7
    );
    assert_relative_eq!(
        MaskingSchedule::<f64>::weight(&g, 0.5),
        -14.406308,
        max_relative = 1e-6
    );
}

#[test]
fn spec_11_12_antithetic_example() {
    let ts = antithetic(0.3, 4);
    for (a, b) in ts.iter().zip([0.3, 0.55, 0.8, 0.05]) {
        assert_relative_eq!(*a, b, max_relative = 1e-12);
    }
}
