//! The schedule as the sampler sees it: which family (MD4 scalar α_t or GenMD4 per-token α_{t,v}),
//! and the per-step quantities on a sampling grid (spec §6.3, paper eq. (6)): the unmasking
//! probability p_unmask = (α_s − α_t)/(1 − α_t) of each step, the telescoped survival
//! Π (1 − α_s)/(1 − α_t) = (1 − α_s)/(1 − α_1) after each step, the expected number of tokens
//! revealed per step, and the deterministic per-step counts of the confidence sampler.

use crate::SamplerError;
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
