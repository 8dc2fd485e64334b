//! MD4 as one unit (paper §3–§4, spec §3): the ε-shifted schedule α_t, the forward process
//! (one t per sequence, each token masked independently with probability 1 − α_t), the
//! continuous-time loss of eq. (4), `−α'_t/(1 − α_t) · Σ_masked −log μ_θ(x_t, t)[x_0]`, plus
//! the constant reconstruction term N·(1 − α̃_0)·log V (spec §3.3), the Monte-Carlo NELBO
//! estimator, and the reverse process of eq. (3) for sampling.
//!
//! With a clipped mask-rate interval ([`MaskRate`], BD3-LM: Arriola et al., ICLR 2025, §5) the
//! training times are drawn so that the mask rate is uniform on the interval and the masked
//! cross-entropy is weighted by the ELBO density in mask-rate coordinates, dm/m
//! ([`MaskedBatch::sample_clipped`]): the training loss is then the clipped objective
//! L_[β,ω] (not a bound; the step's `nelbo` is L_[β,ω] plus the reconstruction constant), while
//! validation ([`Objective::eval_nelbo`]) and evaluation ([`Objective::estimate`]) stay the
//! full-range NELBO. The interval [0, 1] is no clipping: exactly the unclipped estimator.

use crate::estimate::{self, ClipVariance, EvalOptions, NelboEstimate, NetInput};
use crate::objective::{
    CleanBatch, Flat, LogitsNet, MicroLoss, Noised, Objective, ObjectiveSettings, ObjectiveSpec,
    ReverseModel, Share, StepLosses,
};
use crate::tensor::{md4_diffusion_loss, md4_recon_constant, md4_row_losses, MaskedBatch};
use crate::ObjectiveError;
use dfdx::prelude::*;
use maskdiff_process::{DenoiseBatch, Denoiser};
use maskdiff_schedule::{AnySchedule, MaskRate, Shifted, TimeSampling};
use rand::rngs::StdRng;

/// The MD4 objective: a masking schedule, how training times are drawn, the vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct Md4 {
    schedule: Shifted<AnySchedule>,
    time_sampling: TimeSampling,
    vocab: usize,
    /// Clipped training mask rates; `None` (also for [0, 1]) = the NELBO.
    mask_rate: Option<MaskRate>,
}

impl Md4 {
    pub fn new(schedule: Shifted<AnySchedule>, time_sampling: TimeSampling, vocab: usize) -> Self {
        Self {
            schedule,
            time_sampling,
            vocab,
            mask_rate: None,
        }
    }
    /// The same objective training on the clipped mask rates `clip` (BD3-LM §5); `None` or
    /// [0, 1]: no clipping.
    pub fn with_mask_rate(self, clip: Option<MaskRate>) -> Self {
        Self {
            mask_rate: clip.filter(|c| !c.is_full()),
            ..self
        }
    }
    /// The clipped training mask rates, if any.
    pub fn mask_rate(&self) -> Option<MaskRate> {
        self.mask_rate
    }
    pub fn schedule(&self) -> &Shifted<AnySchedule> {
        &self.schedule
    }
    /// The constant reconstruction term N·(1 − α̃_0)·log V for sequences of `len` (spec §3.3).
    pub fn recon(&self, len: usize) -> f64 {
        md4_recon_constant(&self.schedule, len, self.vocab)
    }
}

impl Md4 {
    /// Per-sequence NELBO estimates in nats of a drawn batch (no dropout, no tape): the
    /// diffusion loss of `masked` plus the reconstruction term.
    pub(crate) fn eval_masked<D: Device<f32>, N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        masked: &MaskedBatch,
    ) -> Result<Vec<f64>, N::Error> {
        let t = masked.row_times();
        let input = DenoiseBatch {
            ids: &masked.xt,
            batch: batch.batch(),
            len: batch.len(),
            t: &t,
            labels: batch.labels(),
        };
        let recon = self.recon(batch.len());
        let rows = masked.masked_rows();
        if rows.is_empty() {
            return Ok(vec![recon; batch.batch()]);
        }
        // the network's work at the masked rows only; per-sequence sums in f64
        let logits = net.logits_at(&input, NoneTape, None, &rows)?;
        let per_row = md4_row_losses(logits, masked)?.as_vec();
        let mut per_seq = vec![recon; batch.batch()];
        for (&r, &x) in rows.iter().zip(&per_row) {
            per_seq[r / batch.len()] += x as f64;
        }
        Ok(per_seq)
    }

    /// A noised batch with one time per block of `block` tokens (BD3-LM; see
    /// [`MaskedBatch::sample_in_blocks`]), drawn with this objective's time sampling.
    pub fn noise_in_blocks(
        &self,
        b: &CleanBatch<'_>,
        block: usize,
        rng: &mut StdRng,
    ) -> Result<MaskedBatch, ObjectiveError> {
        if let Some(clip) = self.mask_rate {
            return MaskedBatch::sample_clipped(
                b.x0(),
                b.batch(),
                b.len(),
                self.vocab,
                block,
                &self.schedule,
                self.time_sampling,
                clip,
                rng,
            );
        }
        MaskedBatch::sample_in_blocks(
            b.x0(),
            b.batch(),
            b.len(),
            self.vocab,
            block,
            &self.schedule,
            self.time_sampling,
            None,
            rng,
        )
    }
}

impl Noised for MaskedBatch {
    fn batch(&self) -> usize {
        self.batch
    }
    fn slice(&self, lo: usize, hi: usize) -> Result<Self, ObjectiveError> {
        let r = lo * self.len..hi * self.len;
        let k = self.times_per_row();
        MaskedBatch::new_in_blocks(
            self.x0[r.clone()].to_vec(),
            self.xt[r].to_vec(),
            hi - lo,
            self.len,
            self.vocab,
            self.segment,
            self.t[lo * k..hi * k].to_vec(),
            self.weight[lo * k..hi * k].to_vec(),
        )
    }
    fn masked_fraction(&self) -> f64 {
        let masked: usize = self.masked_counts().iter().sum();
        masked as f64 / (self.batch * self.len) as f64
    }
}

/// A micro-batch's Σ of per-sequence diffusion losses (nats), its length and the step's batch.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Md4Stats {
    sum: f64,
    len: usize,
    total: usize,
}

impl Md4Stats {
    /// Σ of a micro-batch's per-sequence diffusion losses, the sequence length, the step's batch.
    pub fn new(sum: f64, len: usize, total: usize) -> Self {
        Self { sum, len, total }
    }
}

impl<D: Device<f32>> Objective<D> for Md4 {
    type Noised = MaskedBatch;
    type Stats = Md4Stats;
    type Report = ();

    fn from_settings(s: &ObjectiveSettings<'_>, _dev: &D) -> Result<Self, ObjectiveError> {
        match s.spec {
            ObjectiveSpec::Md4 => {
                Ok(Md4::new(s.schedule.build()?, s.time_sampling, s.vocab)
                    .with_mask_rate(s.mask_rate))
            }
            other => Err(ObjectiveError::WrongObjective {
                expected: "md4",
                found: format!("{other:?}"),
            }),
        }
    }
    fn spec(&self) -> ObjectiveSpec {
        ObjectiveSpec::Md4
    }

    fn noise(&self, b: &CleanBatch<'_>, rng: &mut StdRng) -> Result<MaskedBatch, ObjectiveError> {
        if let Some(clip) = self.mask_rate {
            return MaskedBatch::sample_clipped(
                b.x0(),
                b.batch(),
                b.len(),
                self.vocab,
                b.len(),
                &self.schedule,
                self.time_sampling,
                clip,
                rng,
            );
        }
        MaskedBatch::sample(
            b.x0(),
            b.batch(),
            b.len(),
            self.vocab,
            &self.schedule,
            self.time_sampling,
            rng,
        )
    }

    fn loss<N: LogitsNet<D>>(
        &self,
        net: &N,
        mb: &MaskedBatch,
        labels: Option<&[u32]>,
        share: Share,
        rng: &mut StdRng,
    ) -> Result<MicroLoss<D, Md4Stats>, N::Error> {
        let t = mb.row_times();
        let input = DenoiseBatch {
            ids: &mb.xt,
            batch: mb.batch,
            len: mb.len,
            t: &t,
            labels,
        };
        // the loss reads the logits at masked positions only: the network skips the rest of
        // its last block there (a batch without any mask runs whole, for a zero loss)
        let rows = mb.masked_rows();
        let terms = if rows.is_empty() {
            md4_diffusion_loss(net.logits(&input, OwnedTape::default(), Some(rng))?, mb)?
        } else {
            let logits = net.logits_at(&input, OwnedTape::default(), Some(rng), &rows)?;
            md4_row_losses(logits, mb)?
        };
        let sum: f64 = terms.as_vec().iter().map(|&x| x as f64).sum();
        // d(batch mean)/dθ accumulates over micro-batches: each adds Σ_its sequences / B.
        let inv_b = 1.0 / share.total as f32;
        let scalar = terms
            .try_sum::<Rank0, _>()
            .and_then(|s| s.try_mul(inv_b))
            .map_err(ObjectiveError::backend)?;
        Ok(MicroLoss {
            scalar,
            stats: Md4Stats {
                sum,
                len: mb.len,
                total: share.total,
            },
        })
    }

    fn check_finite(&self, s: &Md4Stats) -> Result<(), (&'static str, f64)> {
        if s.sum.is_finite() {
            Ok(())
        } else {
            Err(("loss", s.sum))
        }
    }

    fn summarize(&self, stats: &[Md4Stats]) -> StepLosses {
        let mut sum = 0.0f64;
        for s in stats {
            sum += s.sum;
        }
        let (len, total) = stats.first().map_or((0, 1), |s| (s.len, s.total));
        let diffusion = sum / total as f64;
        StepLosses {
            nelbo: diffusion + self.recon(len),
            diffusion,
        }
    }

    fn report(&self, _stats: &[Md4Stats], _grads: &[Flat<D>]) {}

    fn eval_nelbo<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error> {
        // The NELBO, whatever the training clip.
        let full = self.clone().with_mask_rate(None);
        let masked = <Self as Objective<D>>::noise(&full, batch, rng)?;
        self.eval_masked(net, batch, &masked)
    }

    fn mask_rate(&self) -> Option<MaskRate> {
        self.mask_rate
    }

    fn set_mask_rate(&mut self, clip: Option<MaskRate>) -> Result<(), ObjectiveError> {
        self.mask_rate = clip.filter(|c| !c.is_full());
        Ok(())
    }

    fn clip_variance<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        clip: MaskRate,
    ) -> Result<ClipVariance, ObjectiveError> {
        estimate::md4_clip_variance(
            denoiser,
            &self.schedule,
            sequences,
            labels,
            opts,
            NetInput::Noised,
            None,
            clip,
        )
    }

    fn estimate<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        estimate::md4(denoiser, &self.schedule, sequences, labels, opts, progress)
    }

    fn reverse_model(&self) -> Result<ReverseModel, ObjectiveError> {
        Ok(ReverseModel::Md4(self.schedule))
    }
}
