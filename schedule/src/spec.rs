//! Run-time choice of a schedule (`"linear"`, `"cosine"`, `"poly3"`, `"geometric"`), as used by
//! configs and the CLI. [`ScheduleSpec::build`] returns the ε-shifted schedule of the official code.

use crate::{Cosine, Geometric, Linear, MaskingSchedule, Polynomial, ScheduleError, Shifted};
use num_traits::Float;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One of the paper's schedules, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum AnySchedule {
    Linear(Linear),
    Cosine(Cosine),
    Poly(Polynomial),
    Geometric(Geometric),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnySchedule::Linear($s) => $e,
            AnySchedule::Cosine($s) => $e,
            AnySchedule::Poly($s) => $e,
            AnySchedule::Geometric($s) => $e,
        }
    };
}

impl<F: Float> MaskingSchedule<F> for AnySchedule {
    fn alpha(&self, t: F) -> F {
        delegate!(self, s => s.alpha(t))
    }
    fn dalpha(&self, t: F) -> F {
        delegate!(self, s => s.dalpha(t))
    }
    fn one_minus_alpha(&self, t: F) -> F {
        delegate!(self, s => s.one_minus_alpha(t))
    }
    fn weight(&self, t: F) -> F {
        delegate!(self, s => MaskingSchedule::<F>::weight(s, t))
    }
    fn log_snr(&self, t: F) -> F {
        delegate!(self, s => MaskingSchedule::<F>::log_snr(s, t))
    }
    fn t_of_alpha(&self, a: F) -> Option<F> {
        delegate!(self, s => s.t_of_alpha(a))
    }
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        delegate!(self, s => s.t_of_mask_rate(m))
    }
    fn reveal_prob(&self, s_: F, t: F) -> F {
        delegate!(self, s => MaskingSchedule::<F>::reveal_prob(s, s_, t))
    }
}

/// A serialisable schedule description: the base schedule plus the ε shift.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScheduleSpec {
    pub base: AnySchedule,
    pub eps: f64,
}

impl ScheduleSpec {
    /// `base` with the official ε = 1e−4.
    pub fn official(base: AnySchedule) -> Self {
        Self {
            base,
            eps: crate::DEFAULT_EPS,
        }
    }
    /// The ε-shifted schedule.
    pub fn build(&self) -> Result<Shifted<AnySchedule>, ScheduleError> {
        Shifted::new(self.base, self.eps)
    }
}

impl FromStr for AnySchedule {
    type Err = ScheduleError;
    /// `linear`, `cosine`, `polyK` (K a positive float, e.g. `poly3`, `poly0.5`), `geometric`
    /// (β̄_min = 1e−5, β̄_max = 20) or `geometric:MIN:MAX`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let l = s.trim().to_ascii_lowercase();
        let unknown = || ScheduleError::UnknownSchedule(s.to_string());
        if l == "linear" {
            return Ok(AnySchedule::Linear(Linear));
        }
        if l == "cosine" {
            return Ok(AnySchedule::Cosine(Cosine));
        }
        if let Some(k) = l.strip_prefix("poly") {
            let w: f64 = k.parse().map_err(|_| unknown())?;
            return Ok(AnySchedule::Poly(Polynomial::new(w)?));
        }
        if l == "geometric" {
            return Ok(AnySchedule::Geometric(Geometric::PAPER));
        }
        if let Some(rest) = l.strip_prefix("geometric:") {
            let mut it = rest.split(':').map(str::parse::<f64>);
            if let (Some(Ok(lo)), Some(Ok(hi)), None) = (it.next(), it.next(), it.next()) {
                return Ok(AnySchedule::Geometric(Geometric::new(lo, hi)?));
            }
        }
        Err(unknown())
    }
}

impl fmt::Display for AnySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnySchedule::Linear(_) => write!(f, "linear"),
            AnySchedule::Cosine(_) => write!(f, "cosine"),
            AnySchedule::Poly(p) => write!(f, "poly{}", p.exponent()),
            AnySchedule::Geometric(g) => write!(f, "geometric:{}:{}", g.beta_min(), g.beta_max()),
        }
    }
}
