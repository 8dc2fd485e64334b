//! Learning-rate schedules of the official training loop (spec §8): linear warm-up from 0 to the
//! peak over `warmup_steps`, then either cosine decay to 0 at `total_steps` (optax
//! `warmup_cosine_decay_schedule`, the official default) or the peak held constant (the official
//! `schedule_type = "constant"` after its linear warm-up). The step counts from 0, so the very
//! first update uses lr 0. The decay horizon `total_steps` is a setting of its own: it need not
//! be the number of steps a run takes.

use crate::TrainError;
use serde::{Deserialize, Serialize};

/// What the learning rate does after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrKind {
    /// Cosine decay from the peak to 0 at `total_steps` (the official default). Checkpoints
    /// written before the kind was recorded used this.
    #[default]
    Cosine,
    /// The peak, constant, for every step after the warm-up (`total_steps` is not used).
    Constant,
}

impl std::fmt::Display for LrKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LrKind::Cosine => "cosine",
            LrKind::Constant => "constant",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    pub peak: f64,
    pub warmup_steps: u64,
    /// Decay horizon: the step at which the cosine reaches 0 (counted from step 0, warm-up
    /// included). Not used by [`LrKind::Constant`].
    pub total_steps: u64,
    /// After the warm-up: cosine decay or constant (absent in old manifests: cosine).
    #[serde(default)]
    pub kind: LrKind,
}

impl LrSchedule {
    /// Warm-up, then cosine decay to 0 at `total_steps`.
    pub fn cosine(peak: f64, warmup_steps: u64, total_steps: u64) -> Self {
        LrSchedule {
            peak,
            warmup_steps,
            total_steps,
            kind: LrKind::Cosine,
        }
    }

    /// Warm-up, then the peak for ever (`total_steps` is recorded but not used).
    pub fn constant(peak: f64, warmup_steps: u64) -> Self {
        LrSchedule {
            peak,
            warmup_steps,
            total_steps: warmup_steps.max(1),
            kind: LrKind::Constant,
        }
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        if !(self.peak.is_finite() && self.peak >= 0.0) {
            return Err(TrainError::Config(format!(
                "lr {} must be finite and >= 0",
                self.peak
            )));
        }
        if self.kind == LrKind::Cosine
            && (self.total_steps == 0 || self.warmup_steps > self.total_steps)
        {
            return Err(TrainError::Config(format!(
                "need 0 < total_steps ({}) and warmup_steps ({}) <= total_steps",
                self.total_steps, self.warmup_steps
            )));
        }
        Ok(())
    }

    /// The learning rate used by the update at `step` (0-based); for the cosine 0 after
    /// `total_steps`.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps as f64;
        }
        if self.kind == LrKind::Constant {
            return self.peak;
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
        let s = LrSchedule::cosine(3e-4, 2000, 1_000_000);
        s.validate().unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(1000) - 1.5e-4).abs() < 1e-18);
        assert!((s.lr(2000) - 3e-4).abs() < 1e-18);
        assert!((s.lr(501_000) - 1.5e-4).abs() < 1e-15);
        assert!(s.lr(1_000_000).abs() < 1e-20);
        assert_eq!(s.lr(2_000_000), 0.0);
        // monotone decay after warm-up
        assert!(s.lr(3000) > s.lr(400_000) && s.lr(400_000) > s.lr(900_000));
        assert!(LrSchedule::cosine(1.0, 5, 4).validate().is_err());
    }

    #[test]
    fn constant_after_linear_warmup() {
        let s = LrSchedule::constant(2e-3, 20);
        s.validate().unwrap();
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-18);
        assert_eq!(s.lr(20), 2e-3);
        // no decay, not even past the recorded horizon
        assert_eq!(s.lr(1_000_000), 2e-3);
        // the same warm-up as the cosine schedule with the same peak
        let c = LrSchedule::cosine(2e-3, 20, 100);
        for k in 0..20 {
            assert_eq!(s.lr(k), c.lr(k));
        }
        // a warm-up longer than any horizon is fine for a constant schedule
        LrSchedule::constant(1.0, 5).validate().unwrap();
    }

    #[test]
    fn decay_horizon_is_its_own_setting() {
        // the cosine reaches half the peak half-way through its horizon, wherever a run stops
        let s = LrSchedule::cosine(1e-3, 0, 3000);
        assert!((s.lr(1500) - 5e-4).abs() < 1e-15);
        assert!(s.lr(1200) > 5e-4);
        assert_eq!(s.lr(3000), 0.0);
    }

    #[test]
    fn old_manifests_without_kind_read_as_cosine() {
        let json = r#"{"peak":0.001,"warmup_steps":10,"total_steps":100}"#;
        let s: LrSchedule = serde_json::from_str(json).unwrap();
        assert_eq!(s, LrSchedule::cosine(1e-3, 10, 100));
        let back: LrSchedule = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let c = LrSchedule::constant(1e-3, 10);
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""kind":"constant""#), "{json}");
    }
}
