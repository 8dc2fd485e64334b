//! Learning-rate schedule of the official training loop (spec §8): linear warm-up from 0 to the
//! peak over `warmup_steps`, then cosine decay to 0 at `total_steps` (optax
//! `warmup_cosine_decay_schedule`; the step counts from 0, so the very first update uses lr 0).

use crate::TrainError;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    /// Step at which the cosine reaches 0 (counted from step 0, warm-up included).
    pub total_steps: u64,
}

impl LrSchedule {
    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.peak.is_finite() && self.peak >= 0.0) {
            return Err(TrainError::Config(format!(
                "lr {} must be finite and >= 0",
                self.peak
            )));
        }
        if self.total_steps == 0 || self.warmup_steps > self.total_steps {
            return Err(TrainError::Config(format!(
                "need 0 < total_steps ({}) and warmup_steps ({}) <= total_steps",
                self.total_steps, self.warmup_steps
            )));
        }
        Ok(())
    }

    /// The learning rate used by the update at `step` (0-based); 0 after `total_steps`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        if step >= self.total_steps {
            return 0.0;
        }
        let span = (self.total_steps - self.warmup_steps) as f64;
        let frac = (step - self.warmup_steps) as f64 / span;
        0.5 * self.peak * (1.0 + (std::f64::consts::PI * frac).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_config_values_from_spec() {
        // spec §11.23: peak 3e-4, warm-up 2000, 1M steps
        let s = LrSchedule {
            peak: 3e-4,
            warmup_steps: 2000,
            total_steps: 1_000_000,
        };
        s.validate().unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1000) - 1.5e-4).abs() < 1e-18);
        assert!((s.lr(2000) - 3e-4).abs() < 1e-18);
        assert!((s.lr(501_000) - 1.5e-4).abs() < 1e-15);
        assert!(s.lr(1_000_000).abs() < 1e-20);
        assert_eq!(s.lr(2_000_000), 0.0);
        // monotone decay after warm-up
        assert!(s.lr(3000) > s.lr(400_000) && s.lr(400_000) > s.lr(900_000));
        assert!(LrSchedule {
            peak: 1.0,
            warmup_steps: 5,
            total_steps: 4
        }
        .validate()
        .is_err());
    }
}
