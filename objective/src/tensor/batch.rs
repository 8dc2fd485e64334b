//! [`MaskedBatch`]: one noised MD4 training batch — x_0, x_t ~ q(x_t | x_0) with one time per
//! sequence (spec §1.3, §2.3), and the per-sequence loss weight; or, for block diffusion with
//! per-block times (BD3-LM's estimator, [`MaskedBatch::sample_in_blocks`]), one time and one
//! weight per block of each sequence.

use crate::reference::discrete_coefficient;
use crate::ObjectiveError;
use maskdiff_process::{forward_sample, Vocab};
use maskdiff_schedule::{MaskRate, MaskingSchedule, TimeSampling};
use rand::Rng;

/// One noised batch: x0 and x_t ids row-major `[batch, len]` (mask id = `vocab`), and the
/// per-sequence loss weight (f64, ≥ 0). Its fields are private and checked once, when it is
/// built ([`MaskedBatch::new`], [`MaskedBatch::sample`], …): ids in range, x_t consistent with
/// x_0, times in [0, 1], finite weights — so the losses need not check them again.
///
/// For the continuous-time loss (paper eq. (4)) the weight is −α'_t/(1 − α_t); for the
/// discrete-time T-step loss ([`MaskedBatch::sample_discrete`]) it is
/// T·(α_s − α_t)/(1 − α_t), so one loss function serves both.
///
/// Times and weights belong to segments of `segment` positions of each row: the whole row
/// (`segment = len`, one time per sequence) or the blocks of a block-diffusion model
/// (`segment = B`, ⌈len / B⌉ times per row, row-major; the last block may be shorter).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedBatch {
    pub(crate) x0: Vec<u32>,
    pub(crate) xt: Vec<u32>,
    pub(crate) batch: usize,
    pub(crate) len: usize,
    pub(crate) vocab: usize,
    pub(crate) t: Vec<f64>,
    pub(crate) weight: Vec<f64>,
    pub(crate) segment: usize,
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

/// One u ∈ [0, 1) per block of each of `batch` rows, row-major (`[batch, blocks]`): BD3-LM's
/// per-block times. `Iid`: independent uniforms. `Antithetic`: MD4's shifted grid (spec §2.3)
/// over all batch × blocks draws, u_{r,j} = (u + (j·batch + r)/M) mod 1 with one u ~ U[0, 1)
/// and M = batch · blocks — exactly one draw in each [k/M, (k + 1)/M), and every draw is
/// marginally U[0, 1), so each block's loss (not only the batch sum) is unbiased. (bd3lms'
/// `_sample_t` gives draw k a fixed stratum with its own jitter, which is unbiased only for the
/// batch sum over exchangeable rows.) The grid runs block-major, so the blocks of one row are
/// 1/blocks apart and spread over [0, 1) like the antithetic times of a batch.
pub fn block_times<R: Rng + ?Sized>(
    sampling: TimeSampling,
    batch: usize,
    blocks: usize,
    rng: &mut R,
) -> Vec<f64> {
    match sampling {
        TimeSampling::Iid => (0..batch * blocks).map(|_| rng.gen::<f64>()).collect(),
        TimeSampling::Antithetic => block_grid(rng.gen::<f64>(), batch, blocks),
    }
}

/// The antithetic grid of [`block_times`] for a given u: `[batch, blocks]` row-major.
pub fn block_grid(u: f64, batch: usize, blocks: usize) -> Vec<f64> {
    let m = (batch * blocks) as f64;
    let mut out = Vec::with_capacity(batch * blocks);
    for r in 0..batch {
        for j in 0..blocks {
            let x = u + (j * batch + r) as f64 / m;
            out.push(if x >= 1.0 { x - 1.0 } else { x });
        }
    }
    out
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
    /// One time per sequence (per block of each sequence, row-major, for a batch drawn with
    /// [`MaskedBatch::sample_in_blocks`]).
    pub fn t(&self) -> &[f64] {
        &self.t
    }
    /// One loss weight per time of [`MaskedBatch::t`].
    pub fn weight(&self) -> &[f64] {
        &self.weight
    }
    /// Positions that share one time: `len`, or the block size B of a per-block batch.
    pub fn segment(&self) -> usize {
        self.segment
    }
    /// Times per sequence: 1, or ⌈len / B⌉ for a per-block batch.
    pub fn times_per_row(&self) -> usize {
        self.len.div_ceil(self.segment.max(1))
    }
    /// The time a network is given for each row: the row's time (its first block's for a
    /// per-block batch, which only a time-free network may read).
    pub fn row_times(&self) -> Vec<f64> {
        self.t
            .iter()
            .step_by(self.times_per_row())
            .copied()
            .collect()
    }
    /// The loss weight of position `i` (row-major index).
    pub fn weight_at(&self, i: usize) -> f64 {
        let (row, pos) = (i / self.len, i % self.len);
        self.weight[row * self.times_per_row() + pos / self.segment]
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
        Self::from_parts(x0, xt, (batch, len, vocab), 1, len, t, weight)
    }

    /// A per-block batch from its parts, validated as [`MaskedBatch::new`]: ⌈len / block⌉ times
    /// and weights per row, row-major.
    #[allow(clippy::too_many_arguments)]
    pub fn new_in_blocks(
        x0: Vec<u32>,
        xt: Vec<u32>,
        batch: usize,
        len: usize,
        vocab: usize,
        block: usize,
        t: Vec<f64>,
        weight: Vec<f64>,
    ) -> Result<Self, ObjectiveError> {
        if block == 0 {
            return Err(ObjectiveError::Input(
                "block size must be at least 1".into(),
            ));
        }
        let per_row = len.div_ceil(block);
        let segment = block.min(len.max(1));
        Self::from_parts(x0, xt, (batch, len, vocab), per_row, segment, t, weight)
    }

    /// The checks both constructors share: x_0 and x_t, `per_row` finite times in [0, 1] and
    /// finite weights per row; `segment` positions share each time.
    fn from_parts(
        x0: Vec<u32>,
        xt: Vec<u32>,
        (batch, len, vocab): (usize, usize, usize),
        per_row: usize,
        segment: usize,
        t: Vec<f64>,
        weight: Vec<f64>,
    ) -> Result<Self, ObjectiveError> {
        check_x0(&x0, batch, len, vocab)?;
        check_xt(&x0, &xt, vocab)?;
        if t.len() != batch * per_row || weight.len() != batch * per_row {
            return Err(ObjectiveError::Shape(format!(
                "{} times and {} weights for batch {batch} x {per_row} per row",
                t.len(),
                weight.len()
            )));
        }
        check_times(&t, batch * per_row, |x| (0.0..=1.0).contains(&x))?;
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
            segment,
        })
    }

    /// Block diffusion with one time per block (BD3-LM's training estimator): the ⌈len / B⌉
    /// blocks of every row get their own u ∈ [0, 1) ([`block_times`]), t = u (continuous time,
    /// weight −α'_t/(1 − α_t)) or the T-step t = (⌊u·T⌋ + 1)/T (`steps = Some(T)`, weight
    /// T·(α_s − α_t)/(1 − α_t), spec §3.2), and each block is masked with its own α_t.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_in_blocks<S: MaskingSchedule<f64>, R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        vocab: usize,
        block: usize,
        schedule: &S,
        sampling: TimeSampling,
        steps: Option<usize>,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        let time_and_weight = |ui: f64| -> Result<(f64, f64), ObjectiveError> {
            Ok(match steps {
                None => (ui, -schedule.weight(ui)),
                Some(steps) => {
                    let (ti, si) = crate::reference::discrete_times(ui, steps)?;
                    (ti, steps as f64 * discrete_coefficient(schedule, si, ti)?)
                }
            })
        };
        Self::sample_segments(
            (x0, batch, len, vocab),
            block,
            schedule,
            sampling,
            time_and_weight,
            rng,
        )
    }

    /// BD3-LM's clipped training batch (Arriola et al. 2025, §5): one draw u per sequence
    /// (`block ≥ len`) or per block of `block` tokens ([`block_times`]: i.i.d. or antithetic
    /// over batch × blocks), mapped by `clip` to a mask rate uniform on the clipped interval,
    /// its time t and the ELBO weight in mask-rate coordinates ([`MaskRate::time_and_weight`]);
    /// each segment is masked with its own α_t. The expected loss is the clipped objective
    /// `L_[lo,hi]` of [`MaskRate`], per segment.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_clipped<S: MaskingSchedule<f64>, R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        vocab: usize,
        block: usize,
        schedule: &S,
        sampling: TimeSampling,
        clip: MaskRate,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        let time_and_weight = |ui: f64| -> Result<(f64, f64), ObjectiveError> {
            Ok(clip.time_and_weight(schedule, ui)?)
        };
        Self::sample_segments(
            (x0, batch, len, vocab),
            block.min(len.max(1)),
            schedule,
            sampling,
            time_and_weight,
            rng,
        )
    }

    /// The shared body of [`MaskedBatch::sample_in_blocks`] and [`MaskedBatch::sample_clipped`]:
    /// one draw u per segment of `seg` tokens ([`block_times`]), its (t, weight) from
    /// `time_and_weight`, then each segment masked with its own α_t, segment by segment.
    fn sample_segments<S: MaskingSchedule<f64>, R: Rng>(
        (x0, batch, len, vocab): (&[u32], usize, usize, usize),
        seg: usize,
        schedule: &S,
        sampling: TimeSampling,
        mut time_and_weight: impl FnMut(f64) -> Result<(f64, f64), ObjectiveError>,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        let v = check_x0(x0, batch, len, vocab)?;
        if seg == 0 {
            return Err(ObjectiveError::Input(
                "block size must be at least 1".into(),
            ));
        }
        let per_row = len.div_ceil(seg);
        let u = block_times(sampling, batch, per_row, rng);
        let mut t = Vec::with_capacity(u.len());
        let mut weight = Vec::with_capacity(u.len());
        let mut alphas = Vec::with_capacity(u.len());
        for &ui in &u {
            let (ti, wi) = time_and_weight(ui)?;
            t.push(ti);
            alphas.push(schedule.alpha(ti));
            weight.push(finite_weight(wi)?);
        }
        let mut xt = Vec::with_capacity(x0.len());
        for (r, row) in x0.chunks(len.max(1)).enumerate() {
            for (j, part) in row.chunks(seg).enumerate() {
                let toks = v.tokens(part)?;
                let states = forward_sample(&toks, alphas[r * per_row + j], rng)?;
                xt.extend(v.input_ids(&states));
            }
        }
        Self::new_in_blocks(x0.to_vec(), xt, batch, len, vocab, seg, t, weight)
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
            segment: len,
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
            segment: len,
        })
    }

    /// Whether position `i` (row-major index) of x_t is masked.
    pub fn is_masked(&self, i: usize) -> bool {
        self.xt[i] as usize == self.vocab
    }

    /// The flat indices `b·len + pos` of the masked positions, increasing.
    pub fn masked_rows(&self) -> Vec<usize> {
        (0..self.xt.len()).filter(|&i| self.is_masked(i)).collect()
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
