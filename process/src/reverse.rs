//! The reverse step p_θ(x_s | x_t) = q(x_s | x_t, x_0 ← μ_θ(x_t, t)) for a masked position
//! (paper eqs. (2)–(3); GenMD4 eq. (11)). Already-revealed positions are carried over unchanged
//! by the caller; only masked positions need this distribution.

use crate::ProcessError;
use maskdiff_schedule::PerTokenPolynomial;

/// The (V + 1)-way distribution of x_s for a masked position: `real[v]` and `mask`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReverseStep {
    pub real: Vec<f64>,
    pub mask: f64,
}

impl ReverseStep {
    /// Total probability of revealing a real token.
    pub fn reveal_total(&self) -> f64 {
        1.0 - self.mask
    }
}

fn check_mu(mu: &[f64]) -> Result<(), ProcessError> {
    if mu.is_empty() {
        return Err(ProcessError::BadPrediction("empty distribution".into()));
    }
    if mu.iter().any(|p| !(p.is_finite() && *p >= 0.0)) {
        return Err(ProcessError::BadPrediction(
            "a probability is negative or not finite".into(),
        ));
    }
    let total: f64 = mu.iter().sum();
    if (total - 1.0).abs() > 1e-6 {
        return Err(ProcessError::BadPrediction(format!(
            "probabilities sum to {total}, not 1"
        )));
    }
    Ok(())
}

/// MD4: real v with probability `reveal_prob · μ_v`, mask with `1 − reveal_prob`, where
/// `reveal_prob = (α_s − α_t)/(1 − α_t)`.
pub fn reverse_step(mu: &[f64], reveal_prob: f64) -> Result<ReverseStep, ProcessError> {
    check_mu(mu)?;
    if !(reveal_prob.is_finite() && (0.0..=1.0).contains(&reveal_prob)) {
        return Err(ProcessError::BadProbability {
            name: "reveal_prob",
            value: reveal_prob,
        });
    }
    Ok(ReverseStep {
        real: mu.iter().map(|m| reveal_prob * m).collect(),
        mask: 1.0 - reveal_prob,
    })
}

/// GenMD4 (spec §5.2): real v with probability (1 − (s/t)^{w_v}) μ_v, mask with
/// Σ_v (s/t)^{w_v} μ_v.
pub fn reverse_step_genmd4(
    mu: &[f64],
    schedule: &PerTokenPolynomial,
    s: f64,
    t: f64,
) -> Result<ReverseStep, ProcessError> {
    check_mu(mu)?;
    if mu.len() != schedule.vocab() {
        return Err(ProcessError::Shape(format!(
            "prediction has {} values, schedule has {} exponents",
            mu.len(),
            schedule.vocab()
        )));
    }
    if !(s.is_finite() && t.is_finite() && 0.0 <= s && s < t && t <= 1.0) {
        return Err(ProcessError::BadTimes { s, t });
    }
    let real: Vec<f64> = mu
        .iter()
        .enumerate()
        .map(|(v, m)| schedule.reveal_prob(s, t, v) * m)
        .collect();
    let mask = mu
        .iter()
        .enumerate()
        .map(|(v, m)| schedule.stay_masked_prob(s, t, v) * m)
        .sum();
    Ok(ReverseStep { real, mask })
}
