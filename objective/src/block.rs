//! Block diffusion (BD3-LM: Arriola et al., ICLR 2025, "Block Diffusion: Interpolating Between
//! Autoregressive and Diffusion Language Models", eq. (6)–(8)) with MD4's or GenMD4's masking
//! process inside each block: the sequence is cut into blocks of B tokens, and
//!
//!   −log p(x_0) ≤ Σ_b L(x_0^b | x_0^{<b}),
//!
//! each block's NELBO (MD4: spec §3.1, eq. (4); GenMD4: paper eq. (12), spec §5) conditioned on
//! the clean blocks before it. One network call gives every block's denoiser: the network (built
//! with `block_size = B`) reads x_t followed by x_0 (2N ids) under the BD3-LM attention mask and
//! returns the logits of the N noised positions (`maskdiff_network::BlockMask`).
//!
//! [`Block<O>`] is the inner objective `O` ([`crate::Md4`] or [`crate::GenMd4`]) run on that
//! network: its loss, parameters, step report and reverse process are O's own, unchanged; only
//! the network call differs — [`BlockNet`] appends each row's clean x_0 to the x_t the inner
//! objective passes — and, with per-block times, the noising.
//!
//! Times ([`BlockTime`]): `Sequence` draws one t per sequence shared by its blocks (O's own
//! noising): an unbiased estimate of every block's integral over t, so of their sum, which keeps
//! a network conditioned on one time per sequence usable. `Block` is the paper's estimator
//! (BD3-LM eq. (8) with bd3lms' `_sample_t`): every block draws its own t (antithetic over
//! batch × blocks, [`crate::tensor::block_times`]), is masked with its own α_t and weighted with
//! its own −α'_t/(1 − α_t), so the summed per-block ELBO adds independent draws instead of one
//! draw per sequence (lower variance). The network input has one time per row, so per-block
//! times need a time-free network (as BD3-LM's are; refused with
//! [`ObjectiveError::PerBlockTimeNeedsTimeFree`] otherwise), and they are implemented with MD4
//! inside the blocks (GenMD4's two-mask RLOO batch holds one t per sequence: refused).
//!
//! With GenMD4 inside, the per-token-value exponents
//! w = softplus(θ) are shared by all blocks and learned with the network: x_t ~ q_w factorises
//! over positions, so GenMD4's two masks per sequence and its leave-one-out REINFORCE gradient of
//! θ (log q of the whole pattern) stay unbiased for the block NELBO.
//!
//! The finite-step (T-step) NELBO (MD4 paper §3.2, spec §3.2) is MD4's bound per block, summed:
//! Σ_b Σ_{i=1}^T E_q[(α_{s(i)} − α_{t(i)})/(1 − α_{t(i)}) Σ_{masked n ∈ b} −log μ_n[x_0^n]],
//! estimated with one step index per sequence or per block ([`block_estimate`]).
//!
//! Clipped noise schedules (BD3-LM §5, "data-driven noise schedules"): with MD4 inside, the
//! training draws (per sequence or per block) can be restricted to a mask-rate interval
//! ([`maskdiff_schedule::MaskRate`], [`Md4::with_mask_rate`]); each block's term is then weighted
//! by the ELBO density in mask-rate coordinates, validation and evaluation stay the NELBO, and
//! [`Objective::clip_variance`] gives bd3lms' search statistic (the variance of the per-block
//! clipped loss). GenMD4 inside has no single mask rate and refuses a clip.
//!
//! Limits (tested): B = N is the inner objective itself (same x_t, same t); with MD4 inside,
//! B = 1 is (α_0 − α_1) times the autoregressive cross-entropy of the same network.

use crate::estimate::{self, ClipVariance, EvalOptions, NelboEstimate, NetInput};
use crate::objective::{
    BlockTime, CleanBatch, Flat, InnerSpec, Logits, LogitsNet, MicroLoss, Objective,
    ObjectiveSettings, ObjectiveSpec, ReverseModel, Share, StepLosses,
};
use crate::tensor::{GenMd4Batch, MaskedBatch};
use crate::{GenMd4, Md4, ObjectiveError};
use maskdiff_process::{DenoiseBatch, Denoiser};
use maskdiff_schedule::{AnySchedule, MaskRate, MaskingSchedule, Shifted, TimeSampling};
use rand::rngs::StdRng;

use dfdx::prelude::*;

/// Block diffusion with objective `O` inside blocks of `block_size` tokens (MD4 by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Block<O = Md4> {
    inner: O,
    block_size: usize,
    time: BlockTime,
}

/// `[x_t ; x_0]` per sequence: the input of a block-diffusion network.
pub fn block_input(xt: &[u32], x0: &[u32], batch: usize, len: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(2 * batch * len);
    for (a, b) in xt.chunks(len).zip(x0.chunks(len)) {
        ids.extend_from_slice(a);
        ids.extend_from_slice(b);
    }
    ids
}

/// What an objective brings to run inside blocks, besides being an objective: its name inside
/// [`ObjectiveSpec::Block`], the clean sequences of its noised batch (the second half of the
/// network's input), and its Monte-Carlo NELBO with a block denoiser.
pub trait InBlocks<D: Device<f32>>: Objective<D> {
    fn inner_spec(&self) -> InnerSpec;
    /// x_0 of a noised batch, row-major `[batch, len]`.
    fn clean(noised: &Self::Noised) -> &[u32];
    /// Whether the objective implements one time per block ([`BlockTime::Block`]).
    fn supports_block_time(&self) -> bool;
    /// The noised batch with one time per block of `block` tokens.
    fn noise_per_block(
        &self,
        batch: &CleanBatch<'_>,
        block: usize,
        rng: &mut StdRng,
    ) -> Result<Self::Noised, ObjectiveError>;
    /// Per-sequence NELBO estimates (as [`Objective::eval_nelbo`]) with one time per block;
    /// `net` is already the block network seen as a plain one.
    fn eval_per_block<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        block: usize,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error>;
    /// The block NELBO of `sequences` under a block `denoiser` (it reads `[x_t ; x_0]` and
    /// returns log μ for the N noised positions): the objective's own estimator, with times
    /// drawn per sequence or per block of `block` tokens.
    #[allow(clippy::too_many_arguments)]
    fn estimate_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        block: usize,
        time: BlockTime,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError>;
    /// The variance of the clipped per-block loss ([`Objective::clip_variance`]) under a block
    /// `denoiser`, times drawn per sequence or per block of `block` tokens.
    #[allow(clippy::too_many_arguments)]
    fn clip_variance_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        block: usize,
        time: BlockTime,
        clip: MaskRate,
    ) -> Result<ClipVariance, ObjectiveError>;
}

/// Per-block times with an objective that has none.
const NO_BLOCK_TIME: &str = "per-block times (block_time = \"block\") are implemented with MD4 inside \
     the blocks; GenMD4's two-mask batch holds one time per sequence (use block_time = \"sequence\")";

impl<D: Device<f32>> InBlocks<D> for Md4 {
    fn inner_spec(&self) -> InnerSpec {
        InnerSpec::Md4
    }
    fn clean(noised: &MaskedBatch) -> &[u32] {
        &noised.x0
    }
    fn supports_block_time(&self) -> bool {
        true
    }
    fn noise_per_block(
        &self,
        batch: &CleanBatch<'_>,
        block: usize,
        rng: &mut StdRng,
    ) -> Result<MaskedBatch, ObjectiveError> {
        self.noise_in_blocks(batch, block, rng)
    }
    fn eval_per_block<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        block: usize,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error> {
        // The NELBO, whatever the training clip.
        let masked = self
            .clone()
            .with_mask_rate(None)
            .noise_in_blocks(batch, block, rng)?;
        self.eval_masked(net, batch, &masked)
    }
    fn clip_variance_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        block: usize,
        time: BlockTime,
        clip: MaskRate,
    ) -> Result<ClipVariance, ObjectiveError> {
        estimate::md4_clip_variance(
            denoiser,
            self.schedule(),
            sequences,
            labels,
            opts,
            NetInput::NoisedThenClean,
            Some((block, time == BlockTime::Block)),
            clip,
        )
    }
    fn estimate_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        block: usize,
        time: BlockTime,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        block_estimate(
            denoiser,
            self.schedule(),
            sequences,
            labels,
            opts,
            block,
            time,
            progress,
        )
    }
}

impl<D: Device<f32>> InBlocks<D> for GenMd4<D> {
    fn inner_spec(&self) -> InnerSpec {
        InnerSpec::GenMd4 {
            one_sample: self.one_sample(),
        }
    }
    fn clean(noised: &GenMd4Batch) -> &[u32] {
        &noised.x0
    }
    fn supports_block_time(&self) -> bool {
        false
    }
    fn noise_per_block(
        &self,
        _: &CleanBatch<'_>,
        _: usize,
        _: &mut StdRng,
    ) -> Result<GenMd4Batch, ObjectiveError> {
        Err(ObjectiveError::Unsupported(NO_BLOCK_TIME))
    }
    fn eval_per_block<N: LogitsNet<D>>(
        &self,
        _: &N,
        _: &CleanBatch<'_>,
        _: usize,
        _: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error> {
        Err(ObjectiveError::Unsupported(NO_BLOCK_TIME).into())
    }
    fn estimate_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        _block: usize,
        time: BlockTime,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        if time == BlockTime::Block {
            return Err(ObjectiveError::Unsupported(NO_BLOCK_TIME));
        }
        estimate::genmd4_on(
            denoiser,
            &self.schedule()?,
            sequences,
            labels,
            opts,
            progress,
            NetInput::NoisedThenClean,
        )
    }
    fn clip_variance_in_blocks<M: Denoiser + ?Sized>(
        &self,
        _: &mut M,
        _: &[Vec<u32>],
        _: Option<&[u32]>,
        _: EvalOptions,
        _: usize,
        _: BlockTime,
        _: MaskRate,
    ) -> Result<ClipVariance, ObjectiveError> {
        Err(ObjectiveError::Unsupported(crate::genmd4::NO_MASK_RATE))
    }
}

/// A block network seen as a plain one by an inner objective: each row of x_t it is given is
/// followed by the clean row of its sequence, row `r` of the noised batch belonging to sequence
/// `r mod b` of the b clean ones (GenMD4 stacks its two masks as `[first ; second]`).
pub struct BlockNet<'a, N> {
    net: &'a N,
    x0: &'a [u32],
}

impl<'a, N> BlockNet<'a, N> {
    /// `net` (a block network) with the clean sequences `x0`, row-major.
    pub fn new(net: &'a N, x0: &'a [u32]) -> Self {
        Self { net, x0 }
    }
}

impl<D: Device<f32>, N: LogitsNet<D>> LogitsNet<D> for BlockNet<'_, N> {
    type Error = N::Error;
    fn logits<T: Tape<f32, D>>(
        &self,
        input: &DenoiseBatch<'_>,
        tape: T,
        dropout: Option<&mut StdRng>,
    ) -> Result<Logits<D, T>, N::Error> {
        let len = input.len;
        let rows = self.x0.len().checked_div(len).unwrap_or(0);
        if rows == 0
            || rows * len != self.x0.len()
            || !input.batch.is_multiple_of(rows)
            || input.ids.len() != input.batch * len
        {
            return Err(ObjectiveError::Shape(format!(
                "block network: {} x_t ids in {} rows of {len} for {} clean ids",
                input.ids.len(),
                input.batch,
                self.x0.len()
            ))
            .into());
        }
        let mut ids = Vec::with_capacity(2 * input.ids.len());
        for (r, xt) in input.ids.chunks(len).enumerate() {
            let s = r % rows;
            ids.extend_from_slice(xt);
            ids.extend_from_slice(&self.x0[s * len..(s + 1) * len]);
        }
        let doubled = DenoiseBatch {
            ids: &ids,
            len: 2 * len,
            ..*input
        };
        self.net.logits(&doubled, tape, dropout)
    }
    fn is_time_conditioned(&self) -> bool {
        self.net.is_time_conditioned()
    }
}

impl Block<Md4> {
    /// MD4 with `schedule` inside blocks of `block_size ≥ 1` tokens.
    pub fn new(
        schedule: Shifted<AnySchedule>,
        time_sampling: TimeSampling,
        vocab: usize,
        block_size: usize,
    ) -> Result<Self, ObjectiveError> {
        Self::with_inner(Md4::new(schedule, time_sampling, vocab), block_size)
    }
    pub fn schedule(&self) -> &Shifted<AnySchedule> {
        self.inner.schedule()
    }
    /// MD4's reconstruction term for sequences of `len` (every block's, summed).
    pub fn recon(&self, len: usize) -> f64 {
        self.inner.recon(len)
    }
}

impl<O> Block<O> {
    /// `inner` inside blocks of `block_size ≥ 1` tokens.
    pub fn with_inner(inner: O, block_size: usize) -> Result<Self, ObjectiveError> {
        if block_size == 0 {
            return Err(ObjectiveError::Input(
                "block size must be at least 1".into(),
            ));
        }
        Ok(Self {
            inner,
            block_size,
            time: BlockTime::Sequence,
        })
    }
    /// The same objective with its times drawn per sequence or per block (not checked against
    /// the inner objective here: [`Objective::from_settings`] and the noising are).
    pub fn with_time(self, time: BlockTime) -> Self {
        Self { time, ..self }
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn time(&self) -> BlockTime {
        self.time
    }
    /// The objective inside the blocks.
    pub fn inner(&self) -> &O {
        &self.inner
    }
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }
}

impl<O> Block<O> {
    /// Per-block times need a time-free network (its input has one time per row).
    fn check_net<D: Device<f32>, N: LogitsNet<D>>(&self, net: &N) -> Result<(), ObjectiveError> {
        if self.time == BlockTime::Block && net.is_time_conditioned() {
            return Err(ObjectiveError::PerBlockTimeNeedsTimeFree);
        }
        Ok(())
    }
}

impl<D: Device<f32>, O: InBlocks<D>> Objective<D> for Block<O> {
    type Noised = O::Noised;
    type Stats = O::Stats;
    type Report = O::Report;

    fn from_settings(s: &ObjectiveSettings<'_>, dev: &D) -> Result<Self, ObjectiveError> {
        match *s.spec {
            ObjectiveSpec::Block {
                block_size,
                inner,
                time,
            } => {
                let spec = inner.objective();
                let inner = O::from_settings(&ObjectiveSettings { spec: &spec, ..*s }, dev)?;
                if time == BlockTime::Block && !inner.supports_block_time() {
                    return Err(ObjectiveError::Unsupported(NO_BLOCK_TIME));
                }
                Ok(Block::with_inner(inner, block_size)?.with_time(time))
            }
            other => Err(ObjectiveError::WrongObjective {
                expected: "block",
                found: format!("{other:?}"),
            }),
        }
    }
    fn spec(&self) -> ObjectiveSpec {
        ObjectiveSpec::Block {
            block_size: self.block_size,
            inner: self.inner.inner_spec(),
            time: self.time,
        }
    }

    fn noise(&self, b: &CleanBatch<'_>, rng: &mut StdRng) -> Result<O::Noised, ObjectiveError> {
        match self.time {
            BlockTime::Sequence => self.inner.noise(b, rng),
            BlockTime::Block => self.inner.noise_per_block(b, self.block_size, rng),
        }
    }

    fn needs_time_free_network(&self) -> bool {
        self.time == BlockTime::Block
    }

    fn loss<N: LogitsNet<D>>(
        &self,
        net: &N,
        mb: &O::Noised,
        labels: Option<&[u32]>,
        share: Share,
        rng: &mut StdRng,
    ) -> Result<MicroLoss<D, O::Stats>, N::Error> {
        self.check_net(net)?;
        let net = BlockNet::new(net, O::clean(mb));
        self.inner.loss(&net, mb, labels, share, rng)
    }

    fn network_grad_scale(&self) -> Option<f32> {
        self.inner.network_grad_scale()
    }

    fn check_finite(&self, s: &O::Stats) -> Result<(), (&'static str, f64)> {
        self.inner.check_finite(s)
    }

    fn summarize(&self, stats: &[O::Stats]) -> StepLosses {
        self.inner.summarize(stats)
    }

    fn report(&self, stats: &[O::Stats], grads: &[Flat<D>]) -> O::Report {
        self.inner.report(stats, grads)
    }

    fn eval_nelbo<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error> {
        self.check_net(net)?;
        let net = BlockNet::new(net, batch.x0());
        match self.time {
            BlockTime::Sequence => self.inner.eval_nelbo(&net, batch, rng),
            BlockTime::Block => self.inner.eval_per_block(&net, batch, self.block_size, rng),
        }
    }

    fn params(&self) -> Vec<(&'static str, &Flat<D>)> {
        self.inner.params()
    }
    fn params_mut(&mut self) -> Vec<&mut Flat<D>> {
        self.inner.params_mut()
    }
    fn check_params(&self) -> Result<(), (&'static str, f64)> {
        self.inner.check_params()
    }

    fn estimate<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        self.inner.estimate_in_blocks(
            denoiser,
            sequences,
            labels,
            opts,
            self.block_size,
            self.time,
            progress,
        )
    }

    fn exponents(&self) -> Option<Vec<f64>> {
        self.inner.exponents()
    }

    fn mask_rate(&self) -> Option<MaskRate> {
        self.inner.mask_rate()
    }

    fn set_mask_rate(&mut self, clip: Option<MaskRate>) -> Result<(), ObjectiveError> {
        self.inner.set_mask_rate(clip)
    }

    fn clip_variance<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        clip: MaskRate,
    ) -> Result<ClipVariance, ObjectiveError> {
        self.inner.clip_variance_in_blocks(
            denoiser,
            sequences,
            labels,
            opts,
            self.block_size,
            self.time,
            clip,
        )
    }

    fn reverse_model(&self) -> Result<ReverseModel, ObjectiveError> {
        self.inner.reverse_model()
    }
}

/// The MD4 block NELBO of `sequences` under a block-diffusion `denoiser` (it reads `[x_t ; x_0]`
/// and returns log μ for the N noised positions): MD4's estimator ([`estimate::md4`]) on that
/// input, K draws per sequence, continuous time or the T-step bound (`opts.discrete_steps`, MD4's
/// per block, summed). `time`: one (t, x_t) draw per sequence shared by its blocks, or one t per
/// block of `block` tokens (an antithetic grid over the sequence's blocks; needs a time-free
/// denoiser). With one block (`block ≥ N`) both are MD4's own estimate, random numbers included.
#[allow(clippy::too_many_arguments)]
pub fn block_estimate<D: Denoiser + ?Sized, S: MaskingSchedule<f64>>(
    denoiser: &mut D,
    schedule: &S,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    block: usize,
    time: BlockTime,
    progress: &mut dyn FnMut(usize),
) -> Result<NelboEstimate, ObjectiveError> {
    if block == 0 {
        return Err(ObjectiveError::Input(
            "block size must be at least 1".into(),
        ));
    }
    estimate::md4_on(
        denoiser,
        schedule,
        sequences,
        labels,
        opts,
        progress,
        NetInput::NoisedThenClean,
        (time == BlockTime::Block).then_some(block),
    )
}
