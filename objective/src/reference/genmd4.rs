//! GenMD4's loss in f64 (paper eq. (12), App. I; spec §5.3–§5.5) with the poly state-dependent
//! schedule α_{t,v} = 1 − (1 − ε)t^{w_v}: the per-position integrand, the one-sample diffusion
//! estimate, log q(x_t | x_0) of a mask pattern, the reconstruction term at t1, the prior KL,
//! and the two-sample REINFORCE leave-one-out (RLOO) surrogate.

use super::check_log_probs;
use crate::tensor::{check_x0, check_xt};
use crate::ObjectiveError;
use maskdiff_schedule::PerTokenPolynomial;

fn check_t(t: f64) -> Result<f64, ObjectiveError> {
    if t.is_finite() && 0.0 < t && t <= 1.0 {
        Ok(t)
    } else {
        Err(ObjectiveError::BadValue {
            name: "t",
            value: t,
        })
    }
}

/// The integrand of one masked position with true token `x` at time t:
/// (1/t)·(Σ_v w_v μ_v − w_x − w_x log μ_x) ≥ 0 (0 iff μ = onehot(x)). `log_mu` has V entries.
pub fn genmd4_integrand(w: &[f64], t: f64, x: usize, log_mu: &[f64]) -> f64 {
    let mean_w: f64 = w.iter().zip(log_mu).map(|(wv, lm)| wv * lm.exp()).sum();
    (mean_w - w[x] - w[x] * log_mu[x]) / t
}

/// One-sample GenMD4 diffusion loss of a sequence: Σ_{n masked} integrand (nats).
pub fn genmd4_diffusion_estimate(
    schedule: &PerTokenPolynomial,
    t: f64,
    x0: &[u32],
    xt: &[u32],
    log_probs: &[f64],
) -> Result<f64, ObjectiveError> {
    let (n, vocab) = (x0.len(), schedule.vocab());
    check_x0(x0, 1, n, vocab)?;
    check_xt(x0, xt, vocab)?;
    check_log_probs(log_probs, n, vocab)?;
    let t = check_t(t)?;
    let w = schedule.exponents();
    Ok((0..n)
        .filter(|&i| xt[i] as usize == vocab)
        .map(|i| genmd4_integrand(w, t, x0[i] as usize, &log_probs[i * vocab..(i + 1) * vocab]))
        .sum())
}

/// log q(x_t | x_0) of a mask pattern: Σ_masked [log(1 − ε) + w_x log t] +
/// Σ_unmasked log(1 − (1 − ε)t^{w_x}).
pub fn genmd4_log_q(
    schedule: &PerTokenPolynomial,
    t: f64,
    x0: &[u32],
    xt: &[u32],
) -> Result<f64, ObjectiveError> {
    let (n, vocab) = (x0.len(), schedule.vocab());
    check_x0(x0, 1, n, vocab)?;
    check_xt(x0, xt, vocab)?;
    let t = check_t(t)?;
    Ok((0..n)
        .map(|i| {
            let v = x0[i] as usize;
            if xt[i] as usize == vocab {
                schedule.log_one_minus_alpha(t, v)
            } else {
                schedule.log_alpha(t, v)
            }
        })
        .sum())
}

/// Reconstruction term at t1 (spec §5.4): Σ_n (1 − ε)t1^{w_x}·(−log softmax_v(w_v log t1)\[x\]).
pub fn genmd4_recon(
    schedule: &PerTokenPolynomial,
    t1: f64,
    x0: &[u32],
) -> Result<f64, ObjectiveError> {
    let vocab = schedule.vocab();
    check_x0(x0, 1, x0.len(), vocab)?;
    let t1 = check_t(t1)?;
    let z: Vec<f64> = schedule.exponents().iter().map(|w| w * t1.ln()).collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    Ok(x0
        .iter()
        .map(|&x| {
            let v = x as usize;
            schedule.one_minus_alpha(t1, v) * (lse - z[v])
        })
        .sum())
}

/// Prior KL with the paper's modified prior: Σ_n α_{1,x_n}·log V = N·ε·log V.
pub fn genmd4_prior_kl(schedule: &PerTokenPolynomial, len: usize) -> f64 {
    // α_{1,v} = 1 − (1 − ε) = ε for every v.
    len as f64 * schedule.eps() * (schedule.vocab() as f64).ln()
}

/// The RLOO term 0.5·(L1 − L2)·(log q1 − log q2) (spec §5.5, §11.20); in training L1 − L2 is
/// held constant (stop-gradient).
pub fn rloo_term(l1: f64, l2: f64, log_q1: f64, log_q2: f64) -> f64 {
    0.5 * (l1 - l2) * (log_q1 - log_q2)
}

/// The terms of one sequence's two-sample GenMD4 loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenMd4Estimate {
    /// The two one-sample diffusion losses.
    pub l1: f64,
    pub l2: f64,
    /// log q(x_t^k | x_0) of the two mask patterns.
    pub log_q1: f64,
    pub log_q2: f64,
    /// Reconstruction at t1.
    pub recon: f64,
    /// Prior KL N·ε·log V (the official code drops it).
    pub prior: f64,
}

impl GenMd4Estimate {
    /// The diffusion estimate 0.5(L1 + L2).
    pub fn diffusion(&self) -> f64 {
        0.5 * (self.l1 + self.l2)
    }
    /// The RLOO term (its forward value is not part of the NELBO).
    pub fn rloo(&self) -> f64 {
        rloo_term(self.l1, self.l2, self.log_q1, self.log_q2)
    }
    /// The differentiated surrogate: diffusion + RLOO + recon.
    pub fn surrogate(&self) -> f64 {
        self.diffusion() + self.rloo() + self.recon
    }
    /// The official `loss_nelbo`: diffusion + recon (prior dropped).
    pub fn nelbo(&self) -> f64 {
        self.diffusion() + self.recon
    }
}

/// One sequence's two-sample estimate: both mask patterns at the same t.
#[allow(clippy::too_many_arguments)]
pub fn genmd4_two_sample(
    schedule: &PerTokenPolynomial,
    t: f64,
    t1: f64,
    x0: &[u32],
    xt1: &[u32],
    xt2: &[u32],
    log_probs1: &[f64],
    log_probs2: &[f64],
) -> Result<GenMd4Estimate, ObjectiveError> {
    Ok(GenMd4Estimate {
        l1: genmd4_diffusion_estimate(schedule, t, x0, xt1, log_probs1)?,
        l2: genmd4_diffusion_estimate(schedule, t, x0, xt2, log_probs2)?,
        log_q1: genmd4_log_q(schedule, t, x0, xt1)?,
        log_q2: genmd4_log_q(schedule, t, x0, xt2)?,
        recon: genmd4_recon(schedule, t1, x0)?,
        prior: genmd4_prior_kl(schedule, x0.len()),
    })
}
