//! MD4's continuous-time Monte-Carlo estimator (paper eq. (4), spec §3.1) and the
//! reconstruction / prior terms (App. D–E, spec §3.3).

use crate::tensor::{check_x0, check_xt};
use crate::ObjectiveError;
use maskdiff_schedule::MaskingSchedule;

/// Check that `log_probs` is `[n, vocab]` with every row normalised (|logsumexp| ≤ 1e−6).
pub fn check_log_probs(log_probs: &[f64], n: usize, vocab: usize) -> Result<(), ObjectiveError> {
    if log_probs.len() != n * vocab {
        return Err(ObjectiveError::Shape(format!(
            "{} log-probabilities for {n} positions x {vocab} values",
            log_probs.len()
        )));
    }
    for (row, r) in log_probs.chunks(vocab.max(1)).enumerate() {
        let m = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + r.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        if lse.is_nan() || lse.abs() > 1e-6 || r.iter().any(|x| x.is_nan() || *x > 1e-12) {
            return Err(ObjectiveError::NotNormalised { row, lse });
        }
    }
    Ok(())
}

/// Σ_{n: x_t^n = mask} −log μ_n[x_0^n]: the masked cross-entropy of one sequence.
pub fn masked_cross_entropy(
    x0: &[u32],
    xt: &[u32],
    vocab: usize,
    log_probs: &[f64],
) -> Result<f64, ObjectiveError> {
    let n = x0.len();
    check_x0(x0, 1, n, vocab)?;
    check_xt(x0, xt, vocab)?;
    check_log_probs(log_probs, n, vocab)?;
    Ok((0..n)
        .filter(|&i| xt[i] as usize == vocab)
        .map(|i| -log_probs[i * vocab + x0[i] as usize])
        .sum())
}

/// The one-sample continuous-time estimate −(α'_t/(1 − α_t))·Σ_masked −log μ\[x_0\] (≥ 0).
pub fn continuous_estimate<S: MaskingSchedule<f64>>(
    schedule: &S,
    t: f64,
    x0: &[u32],
    xt: &[u32],
    vocab: usize,
    log_probs: &[f64],
) -> Result<f64, ObjectiveError> {
    if !(t.is_finite() && (0.0..=1.0).contains(&t)) {
        return Err(ObjectiveError::BadValue {
            name: "t",
            value: t,
        });
    }
    let ce = masked_cross_entropy(x0, xt, vocab, log_probs)?;
    if ce == 0.0 {
        // No masked position (or a perfect prediction): the weight may be infinite at t = 0.
        return Ok(0.0);
    }
    Ok(-schedule.weight(t) * ce)
}

/// Reconstruction term of N positions, N·(1 − α_0)·log V (the official code's `loss_recon`).
pub fn recon_term<S: MaskingSchedule<f64>>(schedule: &S, len: usize, vocab: usize) -> f64 {
    len as f64 * schedule.one_minus_alpha(0.0) * (vocab as f64).ln()
}

/// Exact prior KL of N positions with the paper's modified prior, N·α_1·log V (App. E). The
/// official code drops it (reports 0).
pub fn prior_kl<S: MaskingSchedule<f64>>(schedule: &S, len: usize, vocab: usize) -> f64 {
    len as f64 * schedule.alpha(1.0) * (vocab as f64).ln()
}

/// A negative ELBO split into its terms (nats per sequence).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Nelbo {
    pub diffusion: f64,
    pub recon: f64,
    pub prior: f64,
}

impl Nelbo {
    /// The official code's total: diffusion + reconstruction (prior KL dropped).
    pub fn official(&self) -> f64 {
        self.diffusion + self.recon
    }
    /// The paper's bound: diffusion + reconstruction + prior KL.
    pub fn total(&self) -> f64 {
        self.diffusion + self.recon + self.prior
    }
}
