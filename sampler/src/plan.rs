//! The schedule as the sampler sees it: which family (MD4 scalar α_t or GenMD4 per-token α_{t,v}),
//! and the per-step quantities on a sampling grid (spec §6.3, paper eq. (6)): the unmasking
//! probability p_unmask = (α_s − α_t)/(1 − α_t) of each step, the telescoped survival
//! Π (1 − α_s)/(1 − α_t) = (1 − α_s)/(1 − α_1) after each step, the expected number of tokens
//! revealed per step, the deterministic per-step counts of the confidence sampler, and ReMDM's
//! per-step quantities (σ_max, the strategies' σ, the loop schedule's time map).

use crate::{RemdmLoop, RemdmStrategy, SamplerError};
use maskdiff_schedule::{
    AnySchedule, Cosine, Geometric, Linear, MaskingSchedule, PerTokenPolynomial, Polynomial,
    SamplingGrid, Shifted,
};
use std::fmt;

/// The masking schedule a sampler runs with.
#[derive(Clone, Copy)]
pub enum ScheduleRef<'a> {
    /// One α_t for every token (MD4).
    Md4(&'a dyn MaskingSchedule<f64>),
    /// α_{t,v} = 1 − (1 − ε) t^{w_v} (GenMD4, spec §5).
    GenMd4(&'a PerTokenPolynomial),
}

impl<'a> ScheduleRef<'a> {
    /// Any scalar schedule.
    pub fn md4<S: MaskingSchedule<f64>>(s: &'a S) -> Self {
        ScheduleRef::Md4(s)
    }
    /// A GenMD4 per-token schedule.
    pub fn genmd4(s: &'a PerTokenPolynomial) -> Self {
        ScheduleRef::GenMd4(s)
    }
    pub fn is_genmd4(&self) -> bool {
        matches!(self, ScheduleRef::GenMd4(_))
    }
}

impl fmt::Debug for ScheduleRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleRef::Md4(_) => f.write_str("ScheduleRef::Md4(..)"),
            ScheduleRef::GenMd4(p) => write!(f, "ScheduleRef::GenMd4({:?})", p.exponents()),
        }
    }
}

impl<'a> From<&'a PerTokenPolynomial> for ScheduleRef<'a> {
    fn from(s: &'a PerTokenPolynomial) -> Self {
        ScheduleRef::GenMd4(s)
    }
}

macro_rules! from_md4 {
    ($($t:ty),*) => {$(
        impl<'a> From<&'a $t> for ScheduleRef<'a> {
            fn from(s: &'a $t) -> Self {
                ScheduleRef::Md4(s)
            }
        }
    )*};
}
from_md4!(
    Linear,
    Cosine,
    Polynomial,
    Geometric,
    AnySchedule,
    Shifted<Linear>,
    Shifted<Cosine>,
    Shifted<Polynomial>,
    Shifted<Geometric>,
    Shifted<AnySchedule>
);

/// The (t, s) pair of local step `j` (0-based, in sampling order) of a `steps`-step grid:
/// t = t(steps − j), s = t(steps − j − 1).
pub fn step_times(grid: SamplingGrid, steps: usize, j: usize) -> (f64, f64) {
    (grid.time(steps - j, steps), grid.time(steps - j - 1, steps))
}

fn check_steps(steps: usize) -> Result<(), SamplerError> {
    if steps == 0 {
        Err(SamplerError::BadSteps(0))
    } else {
        Ok(())
    }
}

/// p_unmask of one step, checked to lie in [0, 1] (rounding within 1e−12 is clamped).
pub fn unmask_prob(
    schedule: &dyn MaskingSchedule<f64>,
    t: f64,
    s: f64,
) -> Result<f64, SamplerError> {
    let p = schedule.reveal_prob(s, t);
    if p.is_finite() && (-1e-12..=1.0 + 1e-12).contains(&p) {
        Ok(p.clamp(0.0, 1.0))
    } else {
        Err(SamplerError::BadSchedule { value: p, t, s })
    }
}

/// p_unmask of each of the `steps` steps, in sampling order (spec §11.13).
pub fn unmask_probs(
    schedule: &dyn MaskingSchedule<f64>,
    grid: SamplingGrid,
    steps: usize,
) -> Result<Vec<f64>, SamplerError> {
    check_steps(steps)?;
    (0..steps)
        .map(|j| {
            let (t, s) = step_times(grid, steps, j);
            unmask_prob(schedule, t, s)
        })
        .collect()
}

/// Probability that a position masked at t = 1 is still masked after each step:
/// S_j = (1 − α_{s_j})/(1 − α_1).
pub fn survival(
    schedule: &dyn MaskingSchedule<f64>,
    grid: SamplingGrid,
    steps: usize,
) -> Result<Vec<f64>, SamplerError> {
    check_steps(steps)?;
    let top = schedule.one_minus_alpha(1.0);
    if !(top.is_finite() && top > 0.0) {
        return Err(SamplerError::BadSchedule {
            value: top,
            t: 1.0,
            s: 1.0,
        });
    }
    Ok((0..steps)
        .map(|j| {
            let (_, s) = step_times(grid, steps, j);
            (schedule.one_minus_alpha(s) / top).clamp(0.0, 1.0)
        })
        .collect())
}

/// Expected number of positions revealed at each step when `masked` positions start masked at
/// t = 1: masked · (S_{j−1} − S_j) (spec §6.3). Positions surviving the last step (masked · S_{T−1},
/// non-zero only for shifted schedules) are filled by the final argmax and not counted here.
pub fn expected_reveals(
    schedule: &dyn MaskingSchedule<f64>,
    grid: SamplingGrid,
    steps: usize,
    masked: usize,
) -> Result<Vec<f64>, SamplerError> {
    let surv = survival(schedule, grid, steps)?;
    let mut prev = 1.0;
    Ok(surv
        .into_iter()
        .map(|s| {
            let e = masked as f64 * (prev - s);
            prev = s;
            e
        })
        .collect())
}

/// Per-step reveal counts k_j of the confidence sampler for `masked` positions: the masked count
/// after step j is ⌊masked · S_j⌋ (made non-increasing; 0 after the last step).
pub fn confidence_counts(
    schedule: &dyn MaskingSchedule<f64>,
    grid: SamplingGrid,
    steps: usize,
    masked: usize,
) -> Result<Vec<usize>, SamplerError> {
    let surv = survival(schedule, grid, steps)?;
    let mut left = masked;
    Ok(surv
        .iter()
        .enumerate()
        .map(|(j, &s)| {
            // 1e−9 absorbs rounding in products that are integers in exact arithmetic.
            let target = if j + 1 == steps {
                0
            } else {
                ((masked as f64 * s + 1e-9).floor() as usize).min(left)
            };
            let k = left - target;
            left = target;
            k
        })
        .collect())
}

/// ReMDM's bound on the remasking probability of a step t → s: σ_max = min(1, (1 − α_s)/α_t),
/// the largest σ for which the probability of staying masked, (1 − α_s − σ α_t)/(1 − α_t), is
/// non-negative (1 when α_t = 0). Arguments: 1 − α_s and α_t.
pub fn remdm_sigma_max(one_minus_alpha_s: f64, alpha_t: f64) -> f64 {
    if alpha_t > 0.0 {
        (one_minus_alpha_s / alpha_t).clamp(0.0, 1.0)
    } else {
        1.0
    }
}

/// σ of the max-capped (`min(η, σ_max)`) and rescaled (`η σ_max`) strategies; the confidence
/// strategy's per-position σ is its softmax weight times σ_max ([`remdm_conf_weights`]).
pub fn remdm_sigma(strategy: RemdmStrategy, eta: f64, sigma_max: f64) -> f64 {
    match strategy {
        RemdmStrategy::Cap => eta.min(sigma_max),
        RemdmStrategy::Rescale => (eta * sigma_max).min(sigma_max),
        RemdmStrategy::Conf => sigma_max,
    }
}

/// The confidence strategy's weights η_ℓ = softmax_ℓ(−ψ_ℓ) over the revealed positions' token
/// probabilities ψ (max-subtracted, so it is exact for any ψ).
pub fn remdm_conf_weights(psi: &[f64]) -> Vec<f64> {
    let m = psi.iter().fold(f64::INFINITY, |a, &x| a.min(x));
    let e: Vec<f64> = psi.iter().map(|&x| (m - x).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// The probability that a masked position is revealed by a ReMDM step:
/// (α_s − (1 − σ) α_t)/(1 − α_t) = p_unmask + σ α_t/(1 − α_t). With σ = 0 it returns `p_unmask`
/// itself (bit for bit), so ReMDM with σ ≡ 0 is Alg. 2.
pub fn remdm_unmask_prob(p_unmask: f64, sigma: f64, alpha_t: f64, one_minus_alpha_t: f64) -> f64 {
    if sigma > 0.0 {
        (p_unmask + sigma * alpha_t / one_minus_alpha_t).clamp(0.0, 1.0)
    } else {
        p_unmask
    }
}

/// The t ∈ [0, 1] at which a non-decreasing `f` (with f(1) the largest value) reaches `target`,
/// by bisection to about 1e−15; t = 1 when `target >= f(1)` and t = 0 when `target <= f(0)`.
pub fn invert_increasing(f: impl Fn(f64) -> f64, target: f64) -> f64 {
    if target >= f(1.0) {
        return 1.0;
    }
    if target <= f(0.0) {
        return 0.0;
    }
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..52 {
        let mid = 0.5 * (lo + hi);
        if f(mid) < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    hi
}

/// ReMDM's loop schedule on a scalar schedule: the map from grid time t to schedule time τ(t)
/// (see [`RemdmLoop`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopMap {
    pub t_on: f64,
    pub t_off: f64,
    /// The schedule time with α(τ_on) = α_on.
    pub tau_on: f64,
}

impl LoopMap {
    pub fn new(schedule: &dyn MaskingSchedule<f64>, l: &RemdmLoop) -> Self {
        let tau_on = schedule
            .t_of_alpha(l.alpha_on)
            .filter(|t| t.is_finite() && (0.0..=1.0).contains(t))
            .unwrap_or_else(|| invert_increasing(|t| -schedule.alpha(t), -l.alpha_on));
        Self {
            t_on: l.t_on,
            t_off: l.t_off,
            tau_on,
        }
    }
    /// τ(t): linear from (1, 1) to (t_on, τ_on), constant τ_on on [t_off, t_on], linear from
    /// (t_off, τ_on) to (0, 0).
    pub fn tau(&self, t: f64) -> f64 {
        if t > self.t_on {
            self.tau_on + (t - self.t_on) / (1.0 - self.t_on) * (1.0 - self.tau_on)
        } else if t >= self.t_off {
            self.tau_on
        } else {
            self.tau_on * t / self.t_off
        }
    }
    /// Whether the step t → s lies in the hold (remasking) phase.
    pub fn holds(&self, t: f64, s: f64) -> bool {
        t <= self.t_on && s >= self.t_off
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_schedule::{Cosine, Linear, Shifted};

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn spec_11_13_unmask_probabilities_t4() {
        // Spec §6.3 / §11.13, T = 4.
        let lin = Linear;
        let u = unmask_probs(&lin, SamplingGrid::Uniform, 4).unwrap();
        close(&u, &[0.25, 1.0 / 3.0, 0.5, 1.0], 1e-12);
        let sh = Shifted::official(Linear);
        let u = unmask_probs(&sh, SamplingGrid::Uniform, 4).unwrap();
        close(&u, &[0.249975, 0.333289, 0.499900, 0.999600], 1e-6);
        let c = unmask_probs(&lin, SamplingGrid::Cosine, 4).unwrap();
        close(&c, &[0.076120, 0.234633, 0.458804, 1.0], 1e-6);
        let c = unmask_probs(&sh, SamplingGrid::Cosine, 4).unwrap();
        close(&c, &[0.076113, 0.234608, 0.458739, 0.999739], 1e-6);
        // Final step: 1 − ε/(1 − α̃(1/4)) with α̃(1/4) = 0.9998·0.75 + 1e−4 (§11.13).
        let last = 1.0 - 1e-4 / (1.0 - (0.9998 * 0.75 + 1e-4));
        assert!((u_last(&sh) - last).abs() < 1e-12);
    }

    fn u_last(s: &Shifted<Linear>) -> f64 {
        unmask_probs(s, SamplingGrid::Uniform, 4).unwrap()[3]
    }

    #[test]
    fn spec_11_14_linear_cosine_grid_equals_cosine_uniform() {
        for steps in [1, 4, 17, 256] {
            let a = unmask_probs(&Linear, SamplingGrid::Cosine, steps).unwrap();
            let b = unmask_probs(&Cosine, SamplingGrid::Uniform, steps).unwrap();
            close(&a, &b, 1e-12);
        }
    }

    #[test]
    fn spec_6_3_imagenet_expected_reveals() {
        // N = 12288, T = 256, linear schedule (unshifted).
        let e = expected_reveals(&Linear, SamplingGrid::Uniform, 256, 12288).unwrap();
        close(&e, &[48.0; 256], 1e-9);
        let e = expected_reveals(&Linear, SamplingGrid::Cosine, 256, 12288).unwrap();
        // 12288 (1 − cos(π/512)) = 0.2314 and 12288 (cos(π/512) − cos(2π/512)) = 0.6941.
        assert!((e[0] - 0.23).abs() < 0.005, "{}", e[0]);
        assert!((e[1] - 0.69).abs() < 0.005, "{}", e[1]);
        assert!((e[128] - 53.0).abs() < 0.5, "{}", e[128]);
        assert!((e[255] - 75.4).abs() < 0.05, "{}", e[255]);
        let total: f64 = e.iter().sum();
        assert!((total - 12288.0).abs() < 1e-6);
    }

    #[test]
    fn remdm_quantities_by_hand() {
        // Linear α = 1 − t, t = 0.5 → s = 0.25: α_t = 0.5, 1 − α_s = 0.25, σ_max = 0.5.
        let sm = remdm_sigma_max(0.25, 0.5);
        assert_eq!(sm, 0.5);
        assert_eq!(remdm_sigma(RemdmStrategy::Cap, 0.02, sm), 0.02);
        assert_eq!(remdm_sigma(RemdmStrategy::Cap, 0.9, sm), 0.5);
        assert_eq!(remdm_sigma(RemdmStrategy::Rescale, 0.5, sm), 0.25);
        // Early steps: (1 − α_s)/α_t > 1 → σ_max = 1; α_t = 0 → 1.
        assert_eq!(remdm_sigma_max(0.9, 0.05), 1.0);
        assert_eq!(remdm_sigma_max(0.9, 0.0), 1.0);
        // p = (0.75 − 0.5)/0.5 = 0.5; with σ = σ_max = 0.5: (0.75 − 0.25)/0.5 = 1 (stay = 0).
        assert_eq!(remdm_unmask_prob(0.5, 0.5, 0.5, 0.5), 1.0);
        assert_eq!(remdm_unmask_prob(0.5, 0.1, 0.5, 0.5), 0.6);
        assert_eq!(remdm_unmask_prob(0.3, 0.0, 0.5, 0.5), 0.3);
        // softmax(−ψ): ψ = (0.9, 0.5) → e^{−0.9}/(e^{−0.9} + e^{−0.5}).
        let w = remdm_conf_weights(&[0.9, 0.5]);
        let a = (-0.9f64).exp() / ((-0.9f64).exp() + (-0.5f64).exp());
        assert!((w[0] - a).abs() < 1e-15 && (w[1] - (1.0 - a)).abs() < 1e-15);
    }

    #[test]
    fn loop_map_matches_the_linear_reference() {
        // Linear α = 1 − t, α_on = 0.9 → τ_on = 0.1; t_on = 0.55, t_off = 0.05.
        let l = RemdmLoop {
            t_on: 0.55,
            t_off: 0.05,
            alpha_on: 0.9,
        };
        let m = LoopMap::new(&Linear, &l);
        assert!((m.tau_on - 0.1).abs() < 1e-12);
        // Reference: α(t) = (1 − t) α_on/(1 − t_on) above t_on; 1 − α = t (1 − α_on)/t_off below.
        for t in [1.0, 0.9, 0.7, 0.56] {
            let a = 1.0 - m.tau(t);
            assert!((a - (1.0 - t) * 0.9 / 0.45).abs() < 1e-12, "{t}");
        }
        for t in [0.04, 0.02, 0.0] {
            assert!((m.tau(t) - t * 0.1 / 0.05).abs() < 1e-12, "{t}");
        }
        assert_eq!(m.tau(0.3), m.tau_on);
        assert!(m.holds(0.5, 0.4) && !m.holds(0.6, 0.5) && !m.holds(0.06, 0.04));
        // A schedule without a closed-form inverse: bisection.
        let c = Shifted::official(Cosine);
        let m = LoopMap::new(&c, &l);
        assert!((c.alpha(m.tau_on) - 0.9).abs() < 1e-12);
        assert_eq!(invert_increasing(|t| t * t, 0.25), 0.5);
        assert_eq!(invert_increasing(|t| t, 2.0), 1.0);
        assert_eq!(invert_increasing(|t| t + 0.1, 0.0), 0.0);
    }

    #[test]
    fn confidence_counts_by_hand() {
        // Linear, uniform, 8 positions, 4 steps: S = 3/4, 1/2, 1/4, 0 → 2 per step.
        assert_eq!(
            confidence_counts(&Linear, SamplingGrid::Uniform, 4, 8).unwrap(),
            vec![2, 2, 2, 2]
        );
        // Shifted: S_0 = (0.9998·0.75 + 1e−4)/0.9999 = 0.750025 → still 6 left.
        assert_eq!(
            confidence_counts(&Shifted::official(Linear), SamplingGrid::Uniform, 4, 8).unwrap(),
            vec![2, 2, 2, 2]
        );
        // Cosine grid: S = sin(3π/8) = 0.924, sin(π/4) = 0.707, sin(π/8) = 0.383, 0
        // → left 7, 5, 3, 0.
        assert_eq!(
            confidence_counts(&Linear, SamplingGrid::Cosine, 4, 8).unwrap(),
            vec![1, 2, 2, 3]
        );
    }
}
