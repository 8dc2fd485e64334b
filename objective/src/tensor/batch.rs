//! [`MaskedBatch`]: one noised MD4 training batch — x_0, x_t ~ q(x_t | x_0) with one time per
//! sequence (spec §1.3, §2.3), and the per-sequence loss weight.

use crate::reference::discrete_coefficient;
use crate::ObjectiveError;
use maskdiff_process::{forward_sample, Vocab};
use maskdiff_schedule::{MaskingSchedule, TimeSampling};
use rand::Rng;

/// One noised batch: x0 and x_t ids row-major `[batch, len]` (mask id = `vocab`), and the
/// per-sequence loss weight (f64, ≥ 0). Its fields are private and checked once, when it is
/// built ([`MaskedBatch::new`], [`MaskedBatch::sample`], …): ids in range, x_t consistent with
/// x_0, times in [0, 1], finite weights — so the losses need not check them again.
///
/// For the continuous-time loss (paper eq. (4)) the weight is −α'_t/(1 − α_t); for the
/// discrete-time T-step loss ([`MaskedBatch::sample_discrete`]) it is
/// T·(α_s − α_t)/(1 − α_t), so one loss function serves both.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedBatch {
    pub(crate) x0: Vec<u32>,
    pub(crate) xt: Vec<u32>,
    pub(crate) batch: usize,
    pub(crate) len: usize,
    pub(crate) vocab: usize,
    pub(crate) t: Vec<f64>,
    pub(crate) weight: Vec<f64>,
}

/// Check `x0` against `[batch, len]` and the vocabulary.
pub(crate) fn check_x0(
    x0: &[u32],
    batch: usize,
    len: usize,
    vocab: usize,
) -> Result<Vocab, ObjectiveError> {
    let v = Vocab::new(vocab)?;
    if x0.len() != batch * len {
        return Err(ObjectiveError::Shape(format!(
            "{} ids for batch {batch} x len {len}",
            x0.len()
        )));
    }
    if let Some((index, &id)) = x0.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(ObjectiveError::TokenOutOfRange { id, index, vocab });
    }
    Ok(v)
}

/// Check an x_t against its x_0: ids in 0..=V, and a real x_t equals x_0.
/// One time per sequence, each finite and accepted by `in_range` (MD4 takes [0, 1], GenMD4's
/// per-token schedule (0, 1)).
pub(crate) fn check_times(
    t: &[f64],
    batch: usize,
    in_range: impl Fn(f64) -> bool,
) -> Result<(), ObjectiveError> {
    if t.len() != batch {
        return Err(ObjectiveError::Shape(format!(
            "{} times for batch {batch}",
            t.len()
        )));
    }
    match t.iter().find(|&&x| !(x.is_finite() && in_range(x))) {
        Some(&bad) => Err(ObjectiveError::BadValue {
            name: "t",
            value: bad,
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_xt(x0: &[u32], xt: &[u32], vocab: usize) -> Result<(), ObjectiveError> {
    if xt.len() != x0.len() {
        return Err(ObjectiveError::Shape(format!(
            "x_t has {} ids, x_0 has {}",
            xt.len(),
            x0.len()
        )));
    }
    for (index, (&a, &b)) in x0.iter().zip(xt).enumerate() {
        if b as usize > vocab {
            return Err(ObjectiveError::TokenOutOfRange {
                id: b,
                index,
                vocab,
            });
        }
        if b as usize != vocab && a != b {
            return Err(ObjectiveError::InconsistentPair {
                index,
                x0: a,
                xt: b,
            });
        }
    }
    Ok(())
}

/// Sample x_t ~ q(x_t | x_0) row by row with α_t of each row (through the process crate).
pub(crate) fn noise_rows<R: Rng>(
    vocab: Vocab,
    x0: &[u32],
    len: usize,
    alphas: &[f64],
    rng: &mut R,
) -> Result<Vec<u32>, ObjectiveError> {
    let mut xt = Vec::with_capacity(x0.len());
    for (row, &a) in x0.chunks(len.max(1)).zip(alphas) {
        let toks = vocab.tokens(row)?;
        let states = forward_sample(&toks, a, rng)?;
        xt.extend(vocab.input_ids(&states));
    }
    Ok(xt)
}

fn finite_weight(w: f64) -> Result<f64, ObjectiveError> {
    if w.is_finite() && w >= 0.0 {
        Ok(w)
    } else {
        Err(ObjectiveError::BadValue {
            name: "loss weight",
            value: w,
        })
    }
}

impl MaskedBatch {
    pub fn x0(&self) -> &[u32] {
        &self.x0
    }
    /// x_t as input ids (mask = `vocab`).
    pub fn xt(&self) -> &[u32] {
        &self.xt
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.batch == 0 || self.len == 0
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// One time per sequence.
    pub fn t(&self) -> &[f64] {
        &self.t
    }
    /// One loss weight per sequence.
    pub fn weight(&self) -> &[f64] {
        &self.weight
    }
    /// A batch from its parts, validated (shapes, ids, x_t consistent with x_0, t ∈ [0, 1],
    /// weights finite and ≥ 0).
    pub fn new(
        x0: Vec<u32>,
        xt: Vec<u32>,
        batch: usize,
        len: usize,
        vocab: usize,
        t: Vec<f64>,
        weight: Vec<f64>,
    ) -> Result<Self, ObjectiveError> {
        check_x0(&x0, batch, len, vocab)?;
        check_xt(&x0, &xt, vocab)?;
        if t.len() != batch || weight.len() != batch {
            return Err(ObjectiveError::Shape(format!(
                "{} times and {} weights for batch {batch}",
                t.len(),
                weight.len()
            )));
        }
        check_times(&t, batch, |x| (0.0..=1.0).contains(&x))?;
        for &w in &weight {
            finite_weight(w)?;
        }
        Ok(Self {
            x0,
            xt,
            batch,
            len,
            vocab,
            t,
            weight,
        })
    }

    /// Sample t for each sequence with `sampling` (antithetic by default) and x_t ~ q(x_t | x0);
    /// weight = −α'_t/(1 − α_t) (continuous-time loss, paper eq. (4)).
    pub fn sample<S: MaskingSchedule<f64>, R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        vocab: usize,
        schedule: &S,
        sampling: TimeSampling,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        check_x0(x0, batch, len, vocab)?;
        let t = sampling.sample(batch, 0.0, rng)?;
        Self::at_times(x0, batch, len, vocab, schedule, t, rng)
    }

    /// Like [`MaskedBatch::sample`] with given times (e.g. a fixed t for evaluation curves).
    pub fn at_times<S: MaskingSchedule<f64>, R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        vocab: usize,
        schedule: &S,
        t: Vec<f64>,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        let v = check_x0(x0, batch, len, vocab)?;
        check_times(&t, batch, |x| (0.0..=1.0).contains(&x))?;
        let mut alphas = Vec::with_capacity(batch);
        let mut weight = Vec::with_capacity(batch);
        for &ti in &t {
            alphas.push(schedule.alpha(ti));
            weight.push(finite_weight(-schedule.weight(ti))?);
        }
        let xt = noise_rows(v, x0, len, &alphas, rng)?;
        Ok(Self {
            x0: x0.to_vec(),
            xt,
            batch,
            len,
            vocab,
            t,
            weight,
        })
    }

    /// The discrete-time T-step estimator of the official code (spec §3.2): u from `sampling`,
    /// t = (⌊u·T⌋ + 1)/T, s = t − 1/T, x_t ~ q(x_t | x_0), weight = T·(α_s − α_t)/(1 − α_t)
    /// (computed in the expm1-of-log-SNR form). Step i = 1 (s = 0) is included, as in the code.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_discrete<S: MaskingSchedule<f64>, R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        vocab: usize,
        schedule: &S,
        steps: usize,
        sampling: TimeSampling,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        let v = check_x0(x0, batch, len, vocab)?;
        if steps == 0 {
            return Err(ObjectiveError::BadSteps(steps));
        }
        let u = sampling.sample(batch, 0.0, rng)?;
        let mut t = Vec::with_capacity(batch);
        let mut alphas = Vec::with_capacity(batch);
        let mut weight = Vec::with_capacity(batch);
        for &ui in &u {
            let (ti, si) = crate::reference::discrete_times(ui, steps)?;
            t.push(ti);
            alphas.push(schedule.alpha(ti));
            weight.push(finite_weight(
                steps as f64 * discrete_coefficient(schedule, si, ti)?,
            )?);
        }
        let xt = noise_rows(v, x0, len, &alphas, rng)?;
        Ok(Self {
            x0: x0.to_vec(),
            xt,
            batch,
            len,
            vocab,
            t,
            weight,
        })
    }

    /// Whether position `i` (row-major index) of x_t is masked.
    pub fn is_masked(&self, i: usize) -> bool {
        self.xt[i] as usize == self.vocab
    }

    /// Number of masked positions of each sequence.
    pub fn masked_counts(&self) -> Vec<usize> {
        (0..self.batch)
            .map(|b| {
                (b * self.len..(b + 1) * self.len)
                    .filter(|&i| self.is_masked(i))
                    .count()
            })
            .collect()
    }
}
