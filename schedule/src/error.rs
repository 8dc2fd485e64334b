//! Errors of the schedule crate.

/// A schedule or time-utility parameter that is out of its domain.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("polynomial exponent must be finite and > 0, got {0}")]
    BadExponent(f64),
    #[error("geometric schedule needs 0 < beta_min < beta_max (finite), got beta_min={beta_min}, beta_max={beta_max}")]
    BadGeometric { beta_min: f64, beta_max: f64 },
    #[error("shift epsilon must be in [0, 0.5), got {0}")]
    BadEpsilon(f64),
    #[error("time must be a finite number in [0, 1], got {0}")]
    BadTime(f64),
    #[error("t1 must be in [0, 1), got {0}")]
    BadT1(f64),
    #[error("number of steps must be >= 1, got {0}")]
    BadSteps(usize),
    #[error("unknown schedule {0:?}; expected linear, cosine, polyK (e.g. poly3), or geometric")]
    UnknownSchedule(String),
    #[error("unknown sampling grid {0:?}; expected uniform or cosine")]
    UnknownGrid(String),
    #[error("mask-rate interval [{lo}, {hi}] is invalid: need finite 0 <= lo < hi <= 1")]
    BadMaskRate { lo: f64, hi: f64 },
    #[error("mask-rate interval {0:?} is not of the form LO,HI (e.g. 0.3,0.8)")]
    BadMaskRateText(String),
    #[error("the schedule has no closed-form time for mask rate {0}")]
    NoInverse(f64),
    #[error("GenMD4 needs at least one exponent")]
    NoExponents,
}
