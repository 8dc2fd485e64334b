//! Masking schedules α_t of masked (absorbing-state) diffusion — MD4/GenMD4 (Shi et al., 2024), §2
//! and Table 4 of the paper, App. J.1 for the ε shift, §6 (eq. 6) for sampling grids.
//!
//! A token of a sequence survives unmasked until time `t ∈ [0, 1]` with probability α_t; α_0 ≈ 1,
//! α_1 ≈ 0, strictly decreasing. Every schedule here exposes α, α', 1 − α (in a closed form, never
//! as `1 - α`), the ELBO weight α'/(1 − α), the log-SNR λ = log(α/(1 − α)) and, where it exists,
//! the inverse t(α). All schedules are generic over [`num_traits::Float`] (f32 and f64); their
//! parameters are stored in f64.
//!
//! * [`Linear`], [`Cosine`], [`Polynomial`], [`Geometric`] — the paper's Table 4.
//! * [`Shifted`] — the official code's numerical shift α̃ = (1 − 2ε)α + ε, composable with any of
//!   them at the type level (`Shifted<Cosine>`).
//! * [`PerTokenPolynomial`] — GenMD4's state-dependent schedule α_{t,v} = 1 − (1 − ε)t^{w_v}.
//! * [`grid`] — sampling time grids; [`time`] — training-time samplers (i.i.d. and antithetic)
//!   and BD3-LM's clipped mask rates ([`MaskRate`]).
//! * [`ScheduleSpec`] / [`AnySchedule`] — a schedule chosen at run time (CLI, configs).

mod error;
mod genmd4;
pub mod grid;
mod kinds;
mod spec;
pub mod time;

pub use error::ScheduleError;
pub use genmd4::{inverse_softplus, softplus, PerTokenPolynomial, GENMD4_T1, THETA_INIT_FOR_W1};
pub use grid::SamplingGrid;
pub use kinds::{Cosine, Geometric, Linear, Polynomial, Shifted, DEFAULT_EPS};
pub use spec::{AnySchedule, ScheduleSpec};
pub use time::{MaskRate, Time, TimeSampling};

use num_traits::Float;

/// Converts an f64 constant into `F`. Every `Float` we support represents f64 constants
/// (possibly rounded), so this cannot fail.
#[inline]
pub(crate) fn c<F: Float>(x: f64) -> F {
    F::from(x).expect("Float types represent f64 constants")
}

/// A masking schedule α_t on t ∈ [0, 1] (paper §2).
///
/// Implementors provide α, α' and 1 − α in closed form; the other quantities have defaults
/// built from them that avoid catastrophic cancellation.
pub trait MaskingSchedule<F: Float>: Send + Sync {
    /// α_t: probability that a token is still unmasked at time t.
    fn alpha(&self, t: F) -> F;
    /// dα/dt (≤ 0).
    fn dalpha(&self, t: F) -> F;
    /// 1 − α_t, computed without the subtraction (accurate when α_t ≈ 1, i.e. t ≈ 0).
    fn one_minus_alpha(&self, t: F) -> F;

    /// The continuous-time ELBO weight α'_t / (1 − α_t) (≤ 0), paper eq. (4).
    fn weight(&self, t: F) -> F {
        self.dalpha(t) / self.one_minus_alpha(t)
    }

    /// The log signal-to-noise ratio λ_t = log(α_t / (1 − α_t)) (the code's γ_t).
    fn log_snr(&self, t: F) -> F {
        self.alpha(t).ln() - self.one_minus_alpha(t).ln()
    }

    /// The time at which α_t = `alpha`, where a closed form exists.
    fn t_of_alpha(&self, _alpha: F) -> Option<F> {
        None
    }

    /// The time at which the mask rate 1 − α_t equals `m`, where a closed form exists. The
    /// default inverts α at 1 − m; the schedules here override it with a form in m itself, so a
    /// small mask rate keeps its relative precision.
    fn t_of_mask_rate(&self, m: F) -> Option<F> {
        self.t_of_alpha(F::one() - m)
    }

    /// Probability that a token masked at time t is revealed by the earlier time s < t:
    /// (α_s − α_t)/(1 − α_t) (paper §2 / App. C). The difference is taken in whichever of α or
    /// 1 − α is small, so it keeps full relative precision at both ends of [0, 1].
    fn reveal_prob(&self, s: F, t: F) -> F {
        let (a_s, a_t) = (self.alpha(s), self.alpha(t));
        let om_t = self.one_minus_alpha(t);
        let num = if a_s < c(0.5) {
            a_s - a_t
        } else {
            om_t - self.one_minus_alpha(s)
        };
        num / om_t
    }

    /// Probability that a token masked at t is still masked at s < t: (1 − α_s)/(1 − α_t).
    fn stay_masked_prob(&self, s: F, t: F) -> F {
        self.one_minus_alpha(s) / self.one_minus_alpha(t)
    }
}

/// Forward every method through a pointer type, so `&S` and `Box<dyn MaskingSchedule<F>>` are
/// schedules too.
macro_rules! forward_schedule {
    ($($ptr:ty),*) => {$(
        impl<F: Float, S: MaskingSchedule<F> + ?Sized> MaskingSchedule<F> for $ptr {
            fn alpha(&self, t: F) -> F {
                (**self).alpha(t)
            }
            fn dalpha(&self, t: F) -> F {
                (**self).dalpha(t)
            }
            fn one_minus_alpha(&self, t: F) -> F {
                (**self).one_minus_alpha(t)
            }
            fn weight(&self, t: F) -> F {
                (**self).weight(t)
            }
            fn log_snr(&self, t: F) -> F {
                (**self).log_snr(t)
            }
            fn t_of_alpha(&self, a: F) -> Option<F> {
                (**self).t_of_alpha(a)
            }
            fn t_of_mask_rate(&self, m: F) -> Option<F> {
                (**self).t_of_mask_rate(m)
            }
            fn reveal_prob(&self, s: F, t: F) -> F {
                (**self).reveal_prob(s, t)
            }
            fn stay_masked_prob(&self, s: F, t: F) -> F {
                (**self).stay_masked_prob(s, t)
            }
        }
    )*};
}

forward_schedule!(&S, Box<S>);
