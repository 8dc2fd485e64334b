//! The discrete-time T-step estimator (paper §3, App. D; spec §3.2), code convention: u ~ U[0, 1),
//! t = (⌊u·T⌋ + 1)/T, s = t − 1/T, loss = T·(α_s − α_t)/(1 − α_t)·Σ_masked −log μ[x_0], step
//! i = 1 (s = 0) included. The coefficient uses the log-SNR form −expm1(λ_t − λ_s)·α_s.

use super::masked_cross_entropy;
use crate::ObjectiveError;
use maskdiff_schedule::MaskingSchedule;

/// The grid step (t, s) that u ∈ [0, 1) selects: t = (⌊u·T⌋ + 1)/T, s = t − 1/T = ⌊u·T⌋/T.
pub fn discrete_times(u: f64, steps: usize) -> Result<(f64, f64), ObjectiveError> {
    if steps == 0 {
        return Err(ObjectiveError::BadSteps(steps));
    }
    if !(u.is_finite() && (0.0..1.0).contains(&u)) {
        return Err(ObjectiveError::BadValue {
            name: "u",
            value: u,
        });
    }
    let i = ((u * steps as f64).floor() as usize).min(steps - 1);
    Ok(((i + 1) as f64 / steps as f64, i as f64 / steps as f64))
}

/// (α_s − α_t)/(1 − α_t) ≥ 0 for s < t, as −expm1(λ_t − λ_s)·α_s (the code's form; exact even
/// when α_s = 1 or α_t = 0, where a log-SNR is infinite).
pub fn discrete_coefficient<S: MaskingSchedule<f64>>(
    schedule: &S,
    s: f64,
    t: f64,
) -> Result<f64, ObjectiveError> {
    if !(s.is_finite() && t.is_finite() && 0.0 <= s && s < t && t <= 1.0) {
        return Err(ObjectiveError::BadTimes { s, t });
    }
    let d = schedule.log_snr(t) - schedule.log_snr(s);
    // d = −∞ − (+∞) or similar: both ends saturated; expm1(−∞) = −1 is the right limit.
    let d = if d.is_nan() { f64::NEG_INFINITY } else { d };
    Ok(-d.exp_m1() * schedule.alpha(s))
}

/// The one-sample T-step estimate for the step (t, s) chosen by `u`: T·coef·masked CE.
pub fn discrete_estimate<S: MaskingSchedule<f64>>(
    schedule: &S,
    steps: usize,
    u: f64,
    x0: &[u32],
    xt: &[u32],
    vocab: usize,
    log_probs: &[f64],
) -> Result<f64, ObjectiveError> {
    let (t, s) = discrete_times(u, steps)?;
    let coef = discrete_coefficient(schedule, s, t)?;
    Ok(steps as f64 * coef * masked_cross_entropy(x0, xt, vocab, log_probs)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_schedule::Linear;

    /// Every u lands on a grid step with s = t − 1/T, t ∈ {1/T, …, 1}; bad input is an error.
    #[test]
    fn discrete_times_grid() {
        assert_eq!(discrete_times(0.0, 4).unwrap(), (0.25, 0.0));
        assert_eq!(discrete_times(0.999_999, 4).unwrap(), (1.0, 0.75));
        assert_eq!(discrete_times(0.5, 4).unwrap(), (0.75, 0.5));
        assert!(discrete_times(1.0, 4).is_err());
        assert!(discrete_times(0.5, 0).is_err());
        // Unshifted linear, step i = 1: α_0 = 1 and λ_0 = +∞, coefficient exactly 1.
        assert_eq!(discrete_coefficient(&Linear, 0.0, 0.25).unwrap(), 1.0);
        // t = 1: α_1 = 0 and λ_1 = −∞; coefficient α_s = 0.25.
        assert!((discrete_coefficient(&Linear, 0.75, 1.0).unwrap() - 0.25).abs() < 1e-15);
        assert!(discrete_coefficient(&Linear, 0.5, 0.5).is_err());
    }
}
