//! The [`Objective`] trait: everything a training objective of masked diffusion brings to a
//! trainer, an evaluator and a sampler, as one unit per model (as the official md4 keeps each
//! model's schedule, forward process, loss and sampling step in one module):
//!
//! * drawing the noised batch (t and x_t ~ q(x_t | x_0), paper eq. (1)) from a [`CleanBatch`];
//! * the differentiable loss of a (micro-)batch, running the network through [`LogitsNet`]
//!   (paper eq. (4) for MD4, eq. (12) with the RLOO surrogate for GenMD4);
//! * its own learnable parameters (GenMD4's exponents θ), which the trainer optimises with the
//!   network's AdamW settings, keeps an EMA of and checkpoints under the names given here;
//! * the validation NELBO on a batch and the Monte-Carlo NELBO estimator over any
//!   `maskdiff_process::Denoiser` ([`crate::estimate`]);
//! * the reverse process a sampler runs ([`ReverseModel`], paper eq. (3) / eq. (11)).
//!
//! Implemented by [`crate::Md4`], [`crate::GenMd4`] and [`crate::Block`] (either of them inside
//! blocks). A trainer generic over this trait needs no edit for a third objective; the choice
//! among them is made once, from [`ObjectiveSpec`].

use crate::estimate::{ClipVariance, EvalOptions, NelboEstimate};
use crate::ObjectiveError;
use dfdx::prelude::*;
use maskdiff_process::{DenoiseBatch, Denoiser, Vocab};
use maskdiff_schedule::{
    AnySchedule, MaskRate, PerTokenPolynomial, ScheduleSpec, Shifted, TimeSampling,
};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// Logits `[batch, len, V]`.
pub type Logits<D, T> = Tensor<(usize, usize, usize), f32, D, T>;
/// Logits at selected rows of a batch, `[rows, vocab]` ([`LogitsNet::logits_at`]).
pub type RowLogits<D, T> = Tensor<(usize, usize), f32, D, T>;
/// A flat parameter (or gradient) tensor.
pub type Flat<D> = Tensor<(usize,), f32, D>;

/// Which objective a run trains, as recorded in configs and checkpoint manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveSpec {
    /// MD4: `weight(t) · Σ_masked −log μ_θ[x_0]`, one t per sequence (paper eq. (4)).
    #[default]
    Md4,
    /// GenMD4: per-token-value exponents w = softplus(θ) learned with the network, t on
    /// [t1, 1], two masks per sequence for the RLOO gradient of θ. `one_sample`: the network's
    /// gradient uses the first mask only (as MD4 does; official repository issue #4).
    #[serde(rename = "genmd4")]
    GenMd4 {
        #[serde(default)]
        one_sample: bool,
    },
    /// Block diffusion (BD3-LM): MD4 or GenMD4 (`inner`) inside blocks of `block_size` tokens,
    /// each conditioned on the clean blocks before it ([`crate::Block`]); the network must be
    /// built with the same block size.
    Block {
        block_size: usize,
        /// The objective inside each block; MD4 when absent (manifests written before GenMD4
        /// blocks existed), and not written for MD4, so those manifests are unchanged.
        #[serde(default, skip_serializing_if = "InnerSpec::is_md4")]
        inner: InnerSpec,
        /// One t per sequence shared by its blocks, or one per block (BD3-LM); per sequence
        /// when absent (manifests written before per-block times existed), and not written for
        /// it, so those manifests are unchanged.
        #[serde(default, skip_serializing_if = "BlockTime::is_sequence")]
        time: BlockTime,
    },
}

/// How the diffusion times of a block-diffusion batch are drawn ([`crate::Block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BlockTime {
    /// One t per sequence, shared by its blocks: an unbiased estimate of every block's integral
    /// over t, so of their sum; works with a network conditioned on one time per sequence.
    #[default]
    Sequence,
    /// One t per block (BD3-LM's `_sample_t`, antithetic over batch × blocks): the blocks'
    /// terms are independent draws, so the summed NELBO estimate has lower variance. The
    /// network must be time-free (its input has one time per sequence).
    Block,
}

impl BlockTime {
    pub fn is_sequence(&self) -> bool {
        *self == BlockTime::Sequence
    }
}

/// The objective inside the blocks of [`ObjectiveSpec::Block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InnerSpec {
    /// MD4 with the run's schedule.
    #[default]
    Md4,
    /// GenMD4: learned per-token exponents shared by all blocks (see [`ObjectiveSpec::GenMd4`]).
    #[serde(rename = "genmd4")]
    GenMd4 {
        #[serde(default)]
        one_sample: bool,
    },
}

impl InnerSpec {
    pub fn is_md4(&self) -> bool {
        *self == InnerSpec::Md4
    }
    /// The objective this names, as a spec of its own.
    pub fn objective(self) -> ObjectiveSpec {
        match self {
            InnerSpec::Md4 => ObjectiveSpec::Md4,
            InnerSpec::GenMd4 { one_sample } => ObjectiveSpec::GenMd4 { one_sample },
        }
    }
}

/// What an objective is built from: its spec, the masking schedule of the run (ε-shifted),
/// how training times are drawn, and the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveSettings<'a> {
    pub spec: &'a ObjectiveSpec,
    pub schedule: &'a ScheduleSpec,
    pub time_sampling: TimeSampling,
    pub vocab: usize,
    /// BD3-LM's clipped training mask rates (MD4, alone or inside blocks); `None` = the NELBO.
    pub mask_rate: Option<MaskRate>,
}

/// A batch of clean sequences, row-major `[batch, len]`, ids checked `< V` once, at
/// construction; class labels (if any) checked for length.
#[derive(Debug, Clone, Copy)]
pub struct CleanBatch<'a> {
    x0: &'a [u32],
    batch: usize,
    len: usize,
    vocab: Vocab,
    labels: Option<&'a [u32]>,
}

impl<'a> CleanBatch<'a> {
    pub fn new(
        x0: &'a [u32],
        batch: usize,
        len: usize,
        vocab: usize,
        labels: Option<&'a [u32]>,
    ) -> Result<Self, ObjectiveError> {
        let v = crate::tensor::check_x0(x0, batch, len, vocab)?;
        if batch == 0 || len == 0 {
            return Err(ObjectiveError::Shape("empty batch".into()));
        }
        if let Some(l) = labels {
            if l.len() != batch {
                return Err(ObjectiveError::Shape(format!(
                    "{} labels for batch {batch}",
                    l.len()
                )));
            }
        }
        Ok(Self {
            x0,
            batch,
            len,
            vocab: v,
            labels,
        })
    }
    pub fn x0(&self) -> &'a [u32] {
        self.x0
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn vocab(&self) -> Vocab {
        self.vocab
    }
    pub fn labels(&self) -> Option<&'a [u32]> {
        self.labels
    }
}

/// What an objective needs of a network: logits for a noised batch, with the gradient tape
/// (training) or without, and with channel dropout when given an RNG. The trainer implements
/// it for its model; its error type carries [`ObjectiveError`]s too.
pub trait LogitsNet<D: Device<f32>> {
    type Error: From<ObjectiveError>;
    fn logits<T: Tape<f32, D>>(
        &self,
        input: &DenoiseBatch<'_>,
        tape: T,
        dropout: Option<&mut StdRng>,
    ) -> Result<Logits<D, T>, Self::Error>;
    /// The rows `rows` (flat indices `b·len + pos` of the output, strictly increasing, at least
    /// one) of [`LogitsNet::logits`], `[rows, vocab]`, same tape and dropout draws. This default
    /// runs the whole network and gathers; a network that can skip the work of the other rows
    /// overrides it (the MD4 transformer: its last block's output projection, FFN and output
    /// layer run at `rows` only). The losses read logits at masked positions only.
    fn logits_at<T: Tape<f32, D>>(
        &self,
        input: &DenoiseBatch<'_>,
        tape: T,
        dropout: Option<&mut StdRng>,
        rows: &[usize],
    ) -> Result<RowLogits<D, T>, Self::Error> {
        let logits = self.logits(input, tape, dropout)?;
        let (b, n, v) = *logits.shape();
        if rows.is_empty() || rows.windows(2).any(|w| w[0] >= w[1]) || rows[rows.len() - 1] >= b * n
        {
            return Err(ObjectiveError::Shape(format!(
                "rows for {} outputs must be strictly increasing and in range",
                b * n
            ))
            .into());
        }
        let ids = logits
            .device()
            .try_tensor_from_vec(rows.to_vec(), (rows.len(),))
            .map_err(ObjectiveError::backend)?;
        Ok(logits
            .try_reshape_like(&(b * n, v))
            .and_then(|l| l.try_gather(ids))
            .map_err(ObjectiveError::backend)?)
    }
    /// Whether the network reads the time of each row (objectives that draw more than one time
    /// per row, per-block block diffusion, need a time-free network).
    fn is_time_conditioned(&self) -> bool;
}

/// Which part of a step's batch a micro-batch is: sequences `lo..hi` of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub lo: usize,
    pub hi: usize,
    pub total: usize,
}

/// The loss of one micro-batch: the scalar to differentiate (already weighted by the
/// micro-batch's share of the step), and the objective's host-side numbers for reporting.
pub struct MicroLoss<D: Device<f32>, S> {
    pub scalar: Tensor<(), f32, D, OwnedTape<f32, D>>,
    pub stats: S,
}

/// A step's report in nats per sequence: the NELBO estimate (diffusion + reconstruction) and
/// its diffusion part, batch means.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    pub nelbo: f64,
    pub diffusion: f64,
}

/// A noised batch: the one type that travels from noising to the loss. Micro-batches are
/// slices of it.
pub trait Noised: Clone + Sized {
    /// Number of clean sequences.
    fn batch(&self) -> usize;
    /// Sequences `lo..hi` as a batch of their own.
    fn slice(&self, lo: usize, hi: usize) -> Result<Self, ObjectiveError>;
    /// Fraction of the noised positions that are masked.
    fn masked_fraction(&self) -> f64;
}

/// The reverse process a sampler runs for an objective (paper eq. (3); GenMD4 eq. (11)).
#[derive(Debug, Clone, PartialEq)]
pub enum ReverseModel {
    /// One ε-shifted schedule for every token.
    Md4(Shifted<AnySchedule>),
    /// GenMD4's learned per-token-value schedule.
    GenMd4(PerTokenPolynomial),
}

/// A masked-diffusion training objective (see the module docs). `D` is the tensor device.
pub trait Objective<D: Device<f32>>: Clone + Sized {
    /// The noised batch.
    type Noised: Noised;
    /// Per micro-batch numbers for [`Objective::summarize`] and [`Objective::Report`];
    /// serialisable so that data-parallel ranks can exchange them.
    type Stats: Clone + serde::Serialize + serde::de::DeserializeOwned;
    /// What a finished step reports beyond its losses (GenMD4: the RLOO term, θ's gradient
    /// and the exponents); `()` for MD4.
    type Report: Clone + std::fmt::Debug;

    /// Build from a run's settings; an error if `settings.spec` names another objective.
    fn from_settings(settings: &ObjectiveSettings<'_>, dev: &D) -> Result<Self, ObjectiveError>;
    /// The spec this objective was built from.
    fn spec(&self) -> ObjectiveSpec;

    /// Draw the times and noised sequences of a whole step's batch.
    fn noise(
        &self,
        batch: &CleanBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<Self::Noised, ObjectiveError>;
    /// The differentiable loss of micro-batch `mb` (sequences `share.lo..share.hi` of the
    /// step), running `net` with the tape and with dropout drawn from `rng`.
    fn loss<N: LogitsNet<D>>(
        &self,
        net: &N,
        mb: &Self::Noised,
        labels: Option<&[u32]>,
        share: Share,
        rng: &mut StdRng,
    ) -> Result<MicroLoss<D, Self::Stats>, N::Error>;
    /// Whether the objective needs a time-free network (it draws more than one time per
    /// sequence: block diffusion with per-block times); trainers refuse a time-conditioned one.
    fn needs_time_free_network(&self) -> bool {
        false
    }
    /// Factor on the network's gradient (GenMD4's one-sample variant: 2, see its docs).
    fn network_grad_scale(&self) -> Option<f32> {
        None
    }
    /// Check a micro-batch's numbers before its backward pass: `Err((what, value))` when not
    /// finite.
    fn check_finite(&self, stats: &Self::Stats) -> Result<(), (&'static str, f64)>;
    /// The step's losses from its micro-batches' numbers, in order.
    fn summarize(&self, stats: &[Self::Stats]) -> StepLosses;
    /// The step's report; `param_grads` are the objective parameters' gradients.
    fn report(&self, stats: &[Self::Stats], param_grads: &[Flat<D>]) -> Self::Report;

    /// Per-sequence NELBO estimates in nats (one t and one x_t per sequence, no dropout, no
    /// tape): the validation loss.
    fn eval_nelbo<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error>;

    /// The objective's learnable parameters: (checkpoint name, flat tensor). Empty for MD4.
    fn params(&self) -> Vec<(&'static str, &Flat<D>)> {
        Vec::new()
    }
    /// Mutable access in the order of [`Objective::params`].
    fn params_mut(&mut self) -> Vec<&mut Flat<D>> {
        Vec::new()
    }
    /// Check the parameters after an update: `Err((what, value))` for an unusable value.
    fn check_params(&self) -> Result<(), (&'static str, f64)> {
        Ok(())
    }

    /// The Monte-Carlo NELBO of `sequences` under `denoiser` ([`crate::estimate`]).
    fn estimate<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError>;

    /// The learned per-token exponents, for objectives that learn their schedule (GenMD4),
    /// recorded with validation metrics; `None` otherwise.
    fn exponents(&self) -> Option<Vec<f64>> {
        None
    }

    /// The reverse process for samplers.
    fn reverse_model(&self) -> Result<ReverseModel, ObjectiveError>;

    /// The clipped training mask rates (BD3-LM §5), `None` when training on the NELBO.
    fn mask_rate(&self) -> Option<MaskRate> {
        None
    }

    /// Train on the clipped mask rates `clip` from now on (`None` or [0, 1]: the NELBO), e.g.
    /// the interval an adaptive search chose; objectives without a single mask rate per time
    /// refuse a clip.
    fn set_mask_rate(&mut self, clip: Option<MaskRate>) -> Result<(), ObjectiveError> {
        match clip {
            Some(c) if !c.is_full() => {
                Err(ObjectiveError::Unsupported(crate::genmd4::NO_MASK_RATE))
            }
            _ => Ok(()),
        }
    }

    /// BD3-LM's clip search statistic for `clip` on `sequences` (bd3lms `valid_vars`): the
    /// mean and variance of the per-block clipped loss (nats per token) over sequences × K
    /// draws × blocks, with the objective's own time draws restricted to `clip`
    /// ([`crate::estimate::md4_clip_variance`]). Objectives without a single mask rate per
    /// time (GenMD4's learned per-token schedule) refuse.
    fn clip_variance<M: Denoiser + ?Sized>(
        &self,
        _denoiser: &mut M,
        _sequences: &[Vec<u32>],
        _labels: Option<&[u32]>,
        _opts: EvalOptions,
        _clip: MaskRate,
    ) -> Result<ClipVariance, ObjectiveError> {
        Err(ObjectiveError::Unsupported(crate::genmd4::NO_MASK_RATE))
    }
}

/// Mean of `v` (0 for an empty slice).
pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}
