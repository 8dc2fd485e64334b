//! Times: a checked [`Time`] newtype and the training-time samplers of spec §2.3 (Alg. 1):
//! i.i.d. uniform, or antithetic/stratified t_i = (u + i/B) mod 1 with one u per batch.

use crate::ScheduleError;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// A diffusion time in [0, 1] (0 = clean data, 1 = all masked); finite by construction.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
pub struct Time(f64);

impl Time {
    pub const ZERO: Time = Time(0.0);
    pub const ONE: Time = Time(1.0);

    /// A checked time.
    pub fn new(t: f64) -> Result<Self, ScheduleError> {
        if t.is_finite() && (0.0..=1.0).contains(&t) {
            Ok(Time(t))
        } else {
            Err(ScheduleError::BadTime(t))
        }
    }
    pub fn get(self) -> f64 {
        self.0
    }
}

/// How the per-sequence training times of a batch are drawn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeSampling {
    /// One independent U[0, 1) per sequence.
    Iid,
    /// One u ~ U[0, 1) per batch, t_i = (u + i/B) mod 1: a shifted regular grid (the
    /// official default). Unbiased for every element, lower variance for the batch mean.
    #[default]
    Antithetic,
}

impl TimeSampling {
    /// Draw `batch` times in [t1, 1) (t ← (1 − t1)·t + t1; t1 = 0 for MD4, 1e−3 for GenMD4).
    pub fn sample<R: Rng + ?Sized>(
        self,
        batch: usize,
        t1: f64,
        rng: &mut R,
    ) -> Result<Vec<f64>, ScheduleError> {
        if !(t1.is_finite() && (0.0..1.0).contains(&t1)) {
            return Err(ScheduleError::BadT1(t1));
        }
        let raw = match self {
            TimeSampling::Iid => (0..batch).map(|_| rng.gen::<f64>()).collect(),
            TimeSampling::Antithetic => antithetic(rng.gen::<f64>(), batch),
        };
        Ok(raw.into_iter().map(|t| (1.0 - t1) * t + t1).collect())
    }
}

/// The antithetic grid for a given u: t_i = (u + i/B) mod 1, i = 0..B.
pub fn antithetic(u: f64, batch: usize) -> Vec<f64> {
    (0..batch)
        .map(|i| {
            let t = u + i as f64 / batch as f64;
            if t >= 1.0 {
                t - 1.0
            } else {
                t
            }
        })
        .collect()
}
