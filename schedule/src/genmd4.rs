//! GenMD4's state-dependent polynomial schedule (paper §6, App. I; spec §5.1):
//! α_{t,v} = 1 − (1 − ε) t^{w_v}, one exponent w_v > 0 per real token value v.
//!
//! The ε factor follows the official code (α_{0,v} = 1, α_{1,v} = ε); it cancels in the
//! weight −w_v/t and in the reverse-step ratios (s/t)^{w_v}.

use crate::{kinds::DEFAULT_EPS, ScheduleError};

/// GenMD4's lower end of the training time range, t ∈ [t1, 1] (spec §5.4).
pub const GENMD4_T1: f64 = 1e-3;

/// θ such that softplus(θ) = 1, the official initialisation (every w_v = 1): log(e − 1).
pub const THETA_INIT_FOR_W1: f64 = 0.541_324_854_612_918_1;

/// softplus(x) = log(1 + e^x), stable for large |x|.
pub fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// The inverse of [`softplus`] for y > 0: log(e^y − 1) = y + log(1 − e^{−y}).
pub fn inverse_softplus(y: f64) -> f64 {
    y + (-(-y).exp_m1()).ln()
}

/// One polynomial exponent per token value; all quantities are per value `v`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PerTokenPolynomial {
    exponents: Vec<f64>,
    eps: f64,
}

impl PerTokenPolynomial {
    /// Exponents `w` (all finite and > 0) with the official ε = 1e−4.
    pub fn new(exponents: Vec<f64>) -> Result<Self, ScheduleError> {
        Self::with_eps(exponents, DEFAULT_EPS)
    }

    /// Exponents `w` with an explicit ε ∈ [0, 0.5).
    pub fn with_eps(exponents: Vec<f64>, eps: f64) -> Result<Self, ScheduleError> {
        if exponents.is_empty() {
            return Err(ScheduleError::NoExponents);
        }
        if let Some(&w) = exponents.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
            return Err(ScheduleError::BadExponent(w));
        }
        if !(eps.is_finite() && (0.0..0.5).contains(&eps)) {
            return Err(ScheduleError::BadEpsilon(eps));
        }
        Ok(Self { exponents, eps })
    }

    /// All exponents equal to `w` (reduces GenMD4 to MD4 with the poly-w schedule).
    pub fn uniform(vocab: usize, w: f64) -> Result<Self, ScheduleError> {
        Self::new(vec![w; vocab])
    }

    /// Exponents from unconstrained parameters θ: w = softplus(θ).
    pub fn from_theta(theta: &[f64]) -> Result<Self, ScheduleError> {
        Self::new(theta.iter().map(|&x| softplus(x)).collect())
    }

    pub fn exponents(&self) -> &[f64] {
        &self.exponents
    }
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// Number of real token values V.
    pub fn vocab(&self) -> usize {
        self.exponents.len()
    }

    /// α_{t,v} = 1 − (1 − ε) t^{w_v}.
    pub fn alpha(&self, t: f64, v: usize) -> f64 {
        1.0 - self.one_minus_alpha(t, v)
    }
    /// 1 − α_{t,v} = (1 − ε) t^{w_v}, no cancellation.
    pub fn one_minus_alpha(&self, t: f64, v: usize) -> f64 {
        (1.0 - self.eps) * t.powf(self.exponents[v])
    }
    /// log(1 − α_{t,v}) = log(1 − ε) + w_v log t.
    pub fn log_one_minus_alpha(&self, t: f64, v: usize) -> f64 {
        (-self.eps).ln_1p() + self.exponents[v] * t.ln()
    }
    /// log α_{t,v} = log1p(−(1 − ε) t^{w_v}).
    pub fn log_alpha(&self, t: f64, v: usize) -> f64 {
        (-self.one_minus_alpha(t, v)).ln_1p()
    }
    /// α'_{t,v} = −(1 − ε) w_v t^{w_v − 1}.
    pub fn dalpha(&self, t: f64, v: usize) -> f64 {
        let w = self.exponents[v];
        -(1.0 - self.eps) * w * t.powf(w - 1.0)
    }
    /// Weight α'_{t,v}/(1 − α_{t,v}) = −w_v/t exactly (ε cancels).
    pub fn weight(&self, t: f64, v: usize) -> f64 {
        -self.exponents[v] / t
    }
    /// Log-SNR per value.
    pub fn log_snr(&self, t: f64, v: usize) -> f64 {
        self.log_alpha(t, v) - self.log_one_minus_alpha(t, v)
    }
    /// (1 − α_{s,v})/(1 − α_{t,v}) = (s/t)^{w_v}: a masked token of value v stays masked to s.
    pub fn stay_masked_prob(&self, s: f64, t: f64, v: usize) -> f64 {
        (s / t).powf(self.exponents[v])
    }
    /// (α_{s,v} − α_{t,v})/(1 − α_{t,v}) = 1 − (s/t)^{w_v}, via expm1 for s ≈ t.
    pub fn reveal_prob(&self, s: f64, t: f64, v: usize) -> f64 {
        -(self.exponents[v] * (s / t).ln()).exp_m1()
    }
}
