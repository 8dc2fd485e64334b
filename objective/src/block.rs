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
//! network: its noising, loss, parameters, step report and reverse process are O's own, unchanged;
//! only the network call differs — [`BlockNet`] appends each row's clean x_0 to the x_t the inner
//! objective passes. So the sum of per-block ELBOs is O's loss with the block-conditioned
//! denoiser, one t per sequence shared by its blocks (the paper draws one per block; a shared t
//! keeps the network's per-sequence time conditioning and is still an unbiased estimate of every
//! block's integral over t, so of their sum). With GenMD4 inside, the per-token-value exponents
//! w = softplus(θ) are shared by all blocks and learned with the network: x_t ~ q_w factorises
//! over positions, so GenMD4's two masks per sequence and its leave-one-out REINFORCE gradient of
//! θ (log q of the whole pattern) stay unbiased for the block NELBO.
//!
//! Limits (tested): B = N is the inner objective itself (same x_t, same t); with MD4 inside,
//! B = 1 is (α_0 − α_1) times the autoregressive cross-entropy of the same network.

use crate::estimate::{self, EvalOptions, NelboEstimate, NetInput};
use crate::objective::{
    CleanBatch, Flat, InnerSpec, Logits, LogitsNet, MicroLoss, Objective, ObjectiveSettings,
    ObjectiveSpec, ReverseModel, Share, StepLosses,
};
use crate::tensor::{GenMd4Batch, MaskedBatch};
use crate::{GenMd4, Md4, ObjectiveError};
use maskdiff_process::{DenoiseBatch, Denoiser};
use maskdiff_schedule::{AnySchedule, MaskingSchedule, Shifted, TimeSampling};
use rand::rngs::StdRng;

use dfdx::prelude::*;

/// Block diffusion with objective `O` inside blocks of `block_size` tokens (MD4 by default).
#[derive(Debug, Clone, PartialEq)]
pub struct Block<O = Md4> {
    inner: O,
    block_size: usize,
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
    /// The block NELBO of `sequences` under a block `denoiser` (it reads `[x_t ; x_0]` and
    /// returns log μ for the N noised positions): the objective's own estimator.
    fn estimate_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError>;
}

impl<D: Device<f32>> InBlocks<D> for Md4 {
    fn inner_spec(&self) -> InnerSpec {
        InnerSpec::Md4
    }
    fn clean(noised: &MaskedBatch) -> &[u32] {
        &noised.x0
    }
    fn estimate_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        block_estimate(denoiser, self.schedule(), sequences, labels, opts, progress)
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
    fn estimate_in_blocks<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
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
        Ok(Self { inner, block_size })
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// The objective inside the blocks.
    pub fn inner(&self) -> &O {
        &self.inner
    }
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }
}

impl<D: Device<f32>, O: InBlocks<D>> Objective<D> for Block<O> {
    type Noised = O::Noised;
    type Stats = O::Stats;
    type Report = O::Report;

    fn from_settings(s: &ObjectiveSettings<'_>, dev: &D) -> Result<Self, ObjectiveError> {
        match *s.spec {
            ObjectiveSpec::Block { block_size, inner } => {
                let spec = inner.objective();
                let inner = O::from_settings(&ObjectiveSettings { spec: &spec, ..*s }, dev)?;
                Block::with_inner(inner, block_size)
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
        }
    }

    fn noise(&self, b: &CleanBatch<'_>, rng: &mut StdRng) -> Result<O::Noised, ObjectiveError> {
        self.inner.noise(b, rng)
    }

    fn loss<N: LogitsNet<D>>(
        &self,
        net: &N,
        mb: &O::Noised,
        labels: Option<&[u32]>,
        share: Share,
        rng: &mut StdRng,
    ) -> Result<MicroLoss<D, O::Stats>, N::Error> {
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
        self.inner
            .eval_nelbo(&BlockNet::new(net, batch.x0()), batch, rng)
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
        self.inner
            .estimate_in_blocks(denoiser, sequences, labels, opts, progress)
    }

    fn exponents(&self) -> Option<Vec<f64>> {
        self.inner.exponents()
    }

    fn reverse_model(&self) -> Result<ReverseModel, ObjectiveError> {
        self.inner.reverse_model()
    }
}

/// The MD4 block NELBO of `sequences` under a block-diffusion `denoiser` (it reads `[x_t ; x_0]`
/// and returns log μ for the N noised positions): MD4's estimator ([`estimate::md4`]) on that
/// input, K draws of (t, x_t) per sequence, continuous time only (the T-step bound is MD4's,
/// per block, and is not offered here).
pub fn block_estimate<D: Denoiser + ?Sized, S: MaskingSchedule<f64>>(
    denoiser: &mut D,
    schedule: &S,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<NelboEstimate, ObjectiveError> {
    if opts.discrete_steps.is_some() {
        return Err(ObjectiveError::Unsupported(
            "the block-diffusion NELBO is estimated in continuous time only",
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
    )
}
