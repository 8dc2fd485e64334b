//! Sampling time grids (paper eq. (6), spec §6.3): the reverse process visits
//! t(T) = 1 > t(T−1) > … > t(0) = 0.

use crate::ScheduleError;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// How the T sampling steps are spaced in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamplingGrid {
    /// t(i) = i/T.
    Uniform,
    /// t(i) = cos(π/2 · (1 − i/T)) — the official default; with a linear schedule it reproduces
    /// the per-step unmasking probabilities of a cosine schedule on a uniform grid.
    #[default]
    Cosine,
}

impl SamplingGrid {
    /// The time of grid point `i ∈ 0..=steps`, checked: an error for `steps = 0` or `i > steps`.
    pub fn try_time(self, i: usize, steps: usize) -> Result<f64, ScheduleError> {
        if steps == 0 || i > steps {
            return Err(ScheduleError::BadSteps(steps));
        }
        Ok(self.time(i, steps))
    }

    /// The time of grid point `i ∈ 0..=steps`; exactly 0 at i = 0 and 1 at i = steps.
    ///
    /// # Panics
    /// If `steps == 0` or `i > steps` (a caller's logic error; [`Self::try_time`] checks).
    pub fn time(self, i: usize, steps: usize) -> f64 {
        assert!(steps > 0 && i <= steps, "grid index {i} out of 0..={steps}");
        if i == 0 {
            return 0.0;
        }
        if i == steps {
            return 1.0;
        }
        let u = i as f64 / steps as f64;
        match self {
            SamplingGrid::Uniform => u,
            // cos(π/2 (1 − u)) = sin(π/2 u).
            SamplingGrid::Cosine => (std::f64::consts::FRAC_PI_2 * u).sin(),
        }
    }

    /// All T + 1 grid times, increasing: [t(0) = 0, …, t(T) = 1].
    pub fn times(self, steps: usize) -> Result<Vec<f64>, ScheduleError> {
        if steps == 0 {
            return Err(ScheduleError::BadSteps(steps));
        }
        Ok((0..=steps).map(|i| self.time(i, steps)).collect())
    }

    /// The reverse-process (t, s) pairs in sampling order: (t(T), t(T−1)), …, (t(1), t(0)).
    pub fn reverse_steps(self, steps: usize) -> Result<Vec<(f64, f64)>, ScheduleError> {
        let ts = self.times(steps)?;
        Ok((1..=steps).rev().map(|i| (ts[i], ts[i - 1])).collect())
    }
}

impl FromStr for SamplingGrid {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "uniform" => Ok(SamplingGrid::Uniform),
            "cosine" => Ok(SamplingGrid::Cosine),
            _ => Err(ScheduleError::UnknownGrid(s.to_string())),
        }
    }
}
