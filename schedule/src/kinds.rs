//! The paper's schedules (Table 4) and the official code's ε shift (App. J.1).

use crate::{c, MaskingSchedule, ScheduleError};
use num_traits::Float;
use serde::{Deserialize, Serialize};

/// α values a schedule on [0, 1] can take (t(α) exists only for these).
fn in_unit<F: Float>(a: F) -> bool {
    a >= F::zero() && a <= F::one()
}

/// The official code's default shift ε = 1e−4: α̃(0) = 1 − ε, α̃(1) = ε.
pub const DEFAULT_EPS: f64 = 1e-4;

/// α_t = 1 − t. The schedule with the best final ELBO in the paper.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Linear;

impl<F: Float> MaskingSchedule<F> for Linear {
    fn alpha(&self, t: F) -> F {
        F::one() - t
    }
    fn dalpha(&self, _t: F) -> F {
        -F::one()
    }
    fn one_minus_alpha(&self, t: F) -> F {
        t
    }
    fn t_of_alpha(&self, a: F) -> Option<F> {
        in_unit(a).then(|| F::one() - a)
    }
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        in_unit(m).then_some(m)
    }
}

/// α_t = 1 − cos(π/2 · (1 − t)) (MaskGIT's schedule; slows unmasking near t = 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cosine;

impl<F: Float> MaskingSchedule<F> for Cosine {
    fn alpha(&self, t: F) -> F {
        // 1 − cos(x) = 2 sin²(x/2): no cancellation when x is small (t ≈ 1).
        let half = c::<F>(std::f64::consts::FRAC_PI_4) * (F::one() - t);
        let s = half.sin();
        c::<F>(2.0) * s * s
    }
    fn dalpha(&self, t: F) -> F {
        let h = c::<F>(std::f64::consts::FRAC_PI_2);
        -h * (h * (F::one() - t)).sin()
    }
    fn one_minus_alpha(&self, t: F) -> F {
        // cos(π/2 (1 − t)) = sin(π/2 t): exact 0 at t = 0 and accurate near it.
        (c::<F>(std::f64::consts::FRAC_PI_2) * t).sin()
    }
    fn t_of_alpha(&self, a: F) -> Option<F> {
        // 1 − α = sin(π t / 2).
        in_unit(a).then(|| (F::one() - a).asin() / c::<F>(std::f64::consts::FRAC_PI_2))
    }
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        in_unit(m).then(|| m.asin() / c::<F>(std::f64::consts::FRAC_PI_2))
    }
}

/// α_t = 1 − t^w (poly-w; w = 1 is linear).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Polynomial {
    exponent: f64,
}

impl Polynomial {
    /// A polynomial schedule with exponent `w > 0`.
    pub fn new(exponent: f64) -> Result<Self, ScheduleError> {
        if exponent.is_finite() && exponent > 0.0 {
            Ok(Self { exponent })
        } else {
            Err(ScheduleError::BadExponent(exponent))
        }
    }
    /// The exponent w.
    pub fn exponent(&self) -> f64 {
        self.exponent
    }
}

impl<F: Float> MaskingSchedule<F> for Polynomial {
    fn alpha(&self, t: F) -> F {
        F::one() - t.powf(c(self.exponent))
    }
    fn dalpha(&self, t: F) -> F {
        let w: F = c(self.exponent);
        -w * t.powf(w - F::one())
    }
    fn one_minus_alpha(&self, t: F) -> F {
        t.powf(c(self.exponent))
    }
    fn weight(&self, t: F) -> F {
        // α'/(1 − α) = −w/t exactly.
        -c::<F>(self.exponent) / t
    }
    fn t_of_alpha(&self, a: F) -> Option<F> {
        in_unit(a).then(|| (F::one() - a).powf(F::one() / c(self.exponent)))
    }
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        in_unit(m).then(|| m.powf(F::one() / c(self.exponent)))
    }
}

/// α_t = exp(−B(t)), B(t) = β̄_min^{1−t} β̄_max^t (paper Table 4; not in the official code).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Geometric {
    beta_min: f64,
    beta_max: f64,
}

impl Geometric {
    /// The paper's plotted constants β̄_min = 1e−5, β̄_max = 20.
    pub const PAPER: Geometric = Geometric {
        beta_min: 1e-5,
        beta_max: 20.0,
    };

    /// A geometric schedule; needs 0 < β̄_min < β̄_max.
    pub fn new(beta_min: f64, beta_max: f64) -> Result<Self, ScheduleError> {
        if beta_min.is_finite() && beta_max.is_finite() && 0.0 < beta_min && beta_min < beta_max {
            Ok(Self { beta_min, beta_max })
        } else {
            Err(ScheduleError::BadGeometric { beta_min, beta_max })
        }
    }
    pub fn beta_min(&self) -> f64 {
        self.beta_min
    }
    pub fn beta_max(&self) -> f64 {
        self.beta_max
    }
    fn big_b<F: Float>(&self, t: F) -> F {
        let (lo, hi): (F, F) = (c(self.beta_min.ln()), c(self.beta_max.ln()));
        (lo + t * (hi - lo)).exp()
    }
}

impl<F: Float> MaskingSchedule<F> for Geometric {
    fn alpha(&self, t: F) -> F {
        (-self.big_b(t)).exp()
    }
    fn dalpha(&self, t: F) -> F {
        let b = self.big_b(t);
        -(-b).exp() * b * c::<F>((self.beta_max / self.beta_min).ln())
    }
    fn one_minus_alpha(&self, t: F) -> F {
        -(-self.big_b(t)).exp_m1()
    }
    fn log_snr(&self, t: F) -> F {
        // log α − log(1 − α) = −B − log(−expm1(−B)).
        let b = self.big_b(t);
        -b - (-(-b).exp_m1()).ln()
    }
    fn t_of_alpha(&self, a: F) -> Option<F> {
        if !(a > F::zero() && a < F::one()) {
            return None;
        }
        let b = -a.ln();
        let (lo, hi): (F, F) = (c(self.beta_min.ln()), c(self.beta_max.ln()));
        Some((b.ln() - lo) / (hi - lo))
    }
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        if !(m > F::zero() && m < F::one()) {
            return None;
        }
        // B = −log(1 − m), without forming 1 − m.
        let b = -(-m).ln_1p();
        let (lo, hi): (F, F) = (c(self.beta_min.ln()), c(self.beta_max.ln()));
        Some((b.ln() - lo) / (hi - lo))
    }
}

/// The ε-shifted schedule α̃ = (1 − 2ε)α + ε of the official code (App. J.1): α̃(0) = 1 − ε,
/// α̃(1) = ε, the weight stays finite at t = 0 and the log-SNR is bounded by ±log((1 − ε)/ε).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Shifted<S> {
    inner: S,
    eps: f64,
}

impl<S> Shifted<S> {
    /// Shift `inner` by `eps ∈ [0, 0.5)`.
    pub fn new(inner: S, eps: f64) -> Result<Self, ScheduleError> {
        if eps.is_finite() && (0.0..0.5).contains(&eps) {
            Ok(Self { inner, eps })
        } else {
            Err(ScheduleError::BadEpsilon(eps))
        }
    }
    /// Shift by the official default ε = 1e−4.
    pub fn official(inner: S) -> Self {
        Self {
            inner,
            eps: DEFAULT_EPS,
        }
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<F: Float, S: MaskingSchedule<F>> MaskingSchedule<F> for Shifted<S> {
    fn alpha(&self, t: F) -> F {
        let e: F = c(self.eps);
        (F::one() - e - e) * self.inner.alpha(t) + e
    }
    fn dalpha(&self, t: F) -> F {
        let e: F = c(self.eps);
        (F::one() - e - e) * self.inner.dalpha(t)
    }
    fn one_minus_alpha(&self, t: F) -> F {
        let e: F = c(self.eps);
        (F::one() - e - e) * self.inner.one_minus_alpha(t) + e
    }
    fn t_of_alpha(&self, a: F) -> Option<F> {
        let e: F = c(self.eps);
        self.inner.t_of_alpha((a - e) / (F::one() - e - e))
    }
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        // 1 − α̃ = (1 − 2ε)(1 − α) + ε.
        let e: F = c(self.eps);
        self.inner.t_of_mask_rate((m - e) / (F::one() - e - e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_is_none_outside_the_range_of_alpha() {
        for a in [-0.1f64, 1.5] {
            assert_eq!(MaskingSchedule::<f64>::t_of_alpha(&Linear, a), None);
            assert_eq!(MaskingSchedule::<f64>::t_of_alpha(&Cosine, a), None);
            let p = Polynomial::new(3.0).unwrap();
            assert_eq!(MaskingSchedule::<f64>::t_of_alpha(&p, a), None);
            assert_eq!(
                MaskingSchedule::<f64>::t_of_alpha(&Geometric::PAPER, a),
                None
            );
        }
        // Shifted linear: α̃ ∈ [ε, 1 − ε]; α̃ = ε/2 lies outside.
        let s = Shifted::official(Linear);
        assert_eq!(
            MaskingSchedule::<f64>::t_of_alpha(&s, 0.5 * DEFAULT_EPS),
            None
        );
        // Hand value: α̃ = 0.5 ⇒ t = 0.5.
        assert_eq!(MaskingSchedule::<f64>::t_of_alpha(&s, 0.5), Some(0.5));
    }
}
