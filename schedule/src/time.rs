//! Times: a checked [`Time`] newtype and the training-time samplers of spec §2.3 (Alg. 1):
//! i.i.d. uniform, or antithetic/stratified t_i = (u + i/B) mod 1 with one u per batch; and
//! [`MaskRate`], the clipped mask-rate interval of BD3-LM's data-driven noise schedules
//! (Arriola et al., ICLR 2025, §5, "data-driven noise schedules"; bd3lms `_sample_t`, `_clipped_schedule_search`).

use crate::{MaskingSchedule, ScheduleError};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

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

/// A clipped interval [lo, hi] ⊆ [0, 1] of training mask rates (BD3-LM §5: "clipped" schedules
/// whose mask rate is uniform on [β, ω], chosen to minimise the variance of the training loss).
///
/// The rates are measured on the range of the schedule: r = (m − m_0)/(m_1 − m_0) with
/// m = 1 − α_t and m_0 = 1 − α_0, m_1 = 1 − α_1 (for the ε-shifted schedules m_0 = ε,
/// m_1 = 1 − ε; unshifted, r = m). So [0, 1] is every rate the schedule reaches — no clipping,
/// the NELBO — and with the linear schedule r = t, bd3lms' `sampling_eps_min/max` exactly.
///
/// A draw u ∈ [0, 1) maps to r = lo + (hi − lo)·u, m = m_0 + (m_1 − m_0)·r and t = t(m)
/// ([`MaskingSchedule::t_of_mask_rate`]), with the ELBO density in mask-rate coordinates
/// (−α'_t/(1 − α_t) dt = dm/m) as the loss weight, (m_1 − m_0)/m ([`MaskRate::time_and_weight`]).
/// The expected weighted loss is then
///
/// ```text
/// L_[lo,hi] = 1/(hi − lo) · ∫_{m(lo)}^{m(hi)} (1/m) · E[Σ_masked −log μ[x_0] | m] dm,
/// ```
///
/// the NELBO's integrand averaged over the clipped rates: the NELBO itself for [0, 1], a biased
/// (not a bound) but lower-variance training loss otherwise — as in bd3lms, whose loglinear
/// schedule carries the same factor m_1 − m_0 = 1 − ε.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "[f64; 2]", into = "[f64; 2]")]
pub struct MaskRate {
    lo: f64,
    hi: f64,
}

impl MaskRate {
    /// Every mask rate of the schedule: no clipping.
    pub const FULL: MaskRate = MaskRate { lo: 0.0, hi: 1.0 };

    /// A checked interval: finite, 0 ≤ lo < hi ≤ 1.
    pub fn new(lo: f64, hi: f64) -> Result<Self, ScheduleError> {
        if lo.is_finite() && hi.is_finite() && 0.0 <= lo && lo < hi && hi <= 1.0 {
            Ok(MaskRate { lo, hi })
        } else {
            Err(ScheduleError::BadMaskRate { lo, hi })
        }
    }
    pub fn lo(&self) -> f64 {
        self.lo
    }
    pub fn hi(&self) -> f64 {
        self.hi
    }
    /// Whether this is [0, 1] (no clipping).
    pub fn is_full(&self) -> bool {
        self.lo == 0.0 && self.hi == 1.0
    }

    /// The training time and loss weight of a draw u ∈ [0, 1) (see the type's docs):
    /// t = t(m) with m = m_0 + (m_1 − m_0)(lo + (hi − lo)u), weight (m_1 − m_0)/m ≥ 0.
    pub fn time_and_weight<S: MaskingSchedule<f64> + ?Sized>(
        &self,
        schedule: &S,
        u: f64,
    ) -> Result<(f64, f64), ScheduleError> {
        let (m0, m1) = (schedule.one_minus_alpha(0.0), schedule.one_minus_alpha(1.0));
        let span = m1 - m0;
        let m = m0 + span * (self.lo + (self.hi - self.lo) * u);
        let t = schedule
            .t_of_mask_rate(m)
            .filter(|t| t.is_finite())
            .ok_or(ScheduleError::NoInverse(m))?;
        // the closed forms may round a hair outside [0, 1] at the ends
        Ok((t.clamp(0.0, 1.0), span / m))
    }

    /// BD3-LM's search candidates (bd3lms `init_valid_vars`): the full range, then for each
    /// width w every [s, s + w] with s = 0, δ, 2δ, … and s + w ≤ 1; duplicates dropped.
    pub fn candidates(widths: &[f64], delta: f64) -> Result<Vec<MaskRate>, ScheduleError> {
        if !(delta.is_finite() && delta > 0.0 && delta <= 1.0) {
            return Err(ScheduleError::BadMaskRate { lo: 0.0, hi: delta });
        }
        let mut out = vec![MaskRate::FULL];
        for &w in widths {
            MaskRate::new(0.0, w)?;
            let mut k = 0u32;
            loop {
                // rounded to 12 decimals: k·δ is not exact in binary (3 · 0.05 = 0.15000000000000002)
                let lo = (k as f64 * delta * 1e12).round() / 1e12;
                // a start within rounding of 1 − w still counts (0.05 steps do not add up exactly)
                if lo + w > 1.0 + 1e-9 {
                    break;
                }
                let c = MaskRate::new(lo, ((lo + w) * 1e12).round().min(1e12) / 1e12)?;
                if !out.contains(&c) {
                    out.push(c);
                }
                k += 1;
            }
        }
        Ok(out)
    }
}

impl TryFrom<[f64; 2]> for MaskRate {
    type Error = ScheduleError;
    fn try_from([lo, hi]: [f64; 2]) -> Result<Self, ScheduleError> {
        MaskRate::new(lo, hi)
    }
}

impl From<MaskRate> for [f64; 2] {
    fn from(m: MaskRate) -> [f64; 2] {
        [m.lo, m.hi]
    }
}

impl FromStr for MaskRate {
    type Err = ScheduleError;
    /// `"LO,HI"`, e.g. `0.3,0.8`.
    fn from_str(s: &str) -> Result<Self, ScheduleError> {
        let bad = || ScheduleError::BadMaskRateText(s.to_string());
        let (a, b) = s.split_once(',').ok_or_else(bad)?;
        let lo: f64 = a.trim().parse().map_err(|_| bad())?;
        let hi: f64 = b.trim().parse().map_err(|_| bad())?;
        MaskRate::new(lo, hi)
    }
}

impl fmt::Display for MaskRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, {}]", self.lo, self.hi)
    }
}

#[cfg(test)]
mod mask_rate_tests {
    use super::*;
    use crate::{AnySchedule, Cosine, Geometric, Linear, Polynomial, Shifted};

    #[test]
    fn bad_intervals_are_errors() {
        for (lo, hi) in [
            (0.5, 0.5),
            (0.8, 0.3),
            (-0.1, 0.5),
            (0.2, 1.1),
            (f64::NAN, 0.5),
            (0.0, f64::INFINITY),
        ] {
            assert!(
                matches!(
                    MaskRate::new(lo, hi),
                    Err(ScheduleError::BadMaskRate { .. })
                ),
                "{lo} {hi}"
            );
        }
        for s in ["0.3", "a,b", "0.3;0.8", "0.9,0.1"] {
            assert!(s.parse::<MaskRate>().is_err(), "{s}");
        }
        let m: MaskRate = " 0.3 , 0.8".parse().unwrap();
        assert_eq!((m.lo(), m.hi()), (0.3, 0.8));
        assert!(MaskRate::FULL.is_full() && !m.is_full());
        // serde goes through the same check
        assert!(serde_json::from_str::<MaskRate>("[0.8, 0.3]").is_err());
        assert_eq!(serde_json::to_string(&m).unwrap(), "[0.3,0.8]");
    }

    /// The drawn time has mask rate m = m_0 + (m_1 − m_0)·r for every schedule (closed forms
    /// checked against α itself), and the weight is the ELBO density dm/m: (m_1 − m_0)/m.
    #[test]
    fn times_have_the_drawn_mask_rate() {
        let scheds: Vec<Shifted<AnySchedule>> = [
            AnySchedule::Linear(Linear),
            AnySchedule::Cosine(Cosine),
            AnySchedule::Poly(Polynomial::new(3.0).unwrap()),
            AnySchedule::Geometric(Geometric::PAPER),
        ]
        .into_iter()
        .map(|a| Shifted::new(a, 1e-3).unwrap())
        .collect();
        let clip = MaskRate::new(0.3, 0.8).unwrap();
        for s in &scheds {
            let (m0, m1) = (s.one_minus_alpha(0.0), s.one_minus_alpha(1.0));
            for u in [0.0, 0.25, 0.5, 0.999] {
                let (t, w) = clip.time_and_weight(s, u).unwrap();
                let r = 0.3 + 0.5 * u;
                let m = m0 + (m1 - m0) * r;
                assert!((s.one_minus_alpha(t) - m).abs() < 1e-9, "{s:?} {u}");
                assert!((1.0 - s.alpha(t) - m).abs() < 1e-9);
                assert!((w - (m1 - m0) / m).abs() < 1e-12);
            }
        }
        // Shifted linear: r = t exactly as bd3lms' sampling_eps interval in t.
        let lin = Shifted::official(AnySchedule::Linear(Linear));
        let (t, _) = clip.time_and_weight(&lin, 0.5).unwrap();
        assert!((t - 0.55).abs() < 1e-12);
    }

    #[test]
    fn candidates_follow_bd3lms_grid() {
        let c = MaskRate::candidates(&[0.5], 0.25).unwrap();
        let want = [(0.0, 1.0), (0.0, 0.5), (0.25, 0.75), (0.5, 1.0)];
        assert_eq!(c.len(), want.len());
        for (m, (lo, hi)) in c.iter().zip(want) {
            assert_eq!((m.lo(), m.hi()), (lo, hi));
        }
        // δ = 0.05, width 0.5: starts 0, 0.05, …, 0.5 (11) plus the full range
        let c = MaskRate::candidates(&[0.5], 0.05).unwrap();
        assert_eq!(c.len(), 12);
        // starts print as the decimals they stand for
        assert_eq!(c[4].to_string(), "[0.15, 0.65]");
        assert_eq!(c[7].to_string(), "[0.3, 0.8]");
        assert!(MaskRate::candidates(&[0.5], 0.0).is_err());
        assert!(MaskRate::candidates(&[1.5], 0.1).is_err());
    }
}
