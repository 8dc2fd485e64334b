//! Training configuration (spec §8), serialised into every checkpoint manifest.

use crate::{AdamWConfig, LrSchedule, TrainError};
use maskdiff_objective::ObjectiveSpec;

use maskdiff_schedule::{AnySchedule, Linear, ScheduleSpec, TimeSampling};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub objective: ObjectiveSpec,
    /// Masking schedule (ε-shifted as in the official code).
    pub schedule: ScheduleSpec,
    /// Per-sequence training times: antithetic (official default) or i.i.d.
    pub time_sampling: TimeSampling,
    pub lr: LrSchedule,
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this value; 0 = off (the official default).
    pub grad_clip: f64,
    /// Split each step's batch into this many micro-batches and accumulate gradients
    /// (the same update as the full batch up to float rounding and dropout draws).
    pub micro_batches: usize,
    /// EMA rate r (ema ← ema + (1 − r)(θ − ema)); official 0.9999.
    pub ema_decay: f64,
}

impl Default for TrainConfig {
    /// The official text8 setup (spec §8, paper App. J.1): MD4, linear schedule with ε = 1e−4,
    /// antithetic t, AdamW lr 3e−4 with 2000 warm-up steps and cosine decay over 1M steps,
    /// β = (0.9, 0.999), weight decay 0.03, no clipping, EMA 0.9999.
    fn default() -> Self {
        TrainConfig {
            objective: ObjectiveSpec::Md4,
            schedule: ScheduleSpec::official(AnySchedule::Linear(Linear)),
            time_sampling: TimeSampling::Antithetic,
            lr: LrSchedule {
                peak: 3e-4,
                warmup_steps: 2000,
                total_steps: 1_000_000,
            },
            adamw: AdamWConfig::default(),
            grad_clip: 0.0,
            micro_batches: 1,
            ema_decay: 0.9999,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        self.lr.validate()?;
        self.adamw.validate()?;
        self.schedule.build()?;
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(TrainError::Config(format!(
                "grad_clip {} must be >= 0",
                self.grad_clip
            )));
        }
        if self.micro_batches == 0 {
            return Err(TrainError::Config("micro_batches must be >= 1".into()));
        }
        if !(self.ema_decay.is_finite() && (0.0..=1.0).contains(&self.ema_decay)) {
            return Err(TrainError::Config(format!(
                "ema_decay {} not in [0, 1]",
                self.ema_decay
            )));
        }
        Ok(())
    }
}
