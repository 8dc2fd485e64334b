//! Block diffusion (BD3-LM: Arriola et al., ICLR 2025, "Block Diffusion: Interpolating Between
//! Autoregressive and Diffusion Language Models", eq. (6)–(8)) with MD4's masking process inside
//! each block: the sequence is cut into blocks of B tokens, and
//!
//!   −log p(x_0) ≤ Σ_b L_MD4(x_0^b | x_0^{<b}),
//!
//! each block's MD4 NELBO (spec §3.1, eq. (4)) conditioned on the clean blocks before it. One
//! network call gives every block's denoiser: the network (built with `block_size = B`) reads
//! x_t followed by x_0 (2N ids) under the BD3-LM attention mask and returns the logits of the N
//! noised positions (`maskdiff_network::BlockMask`).
//!
//! Noising draws one t per sequence, shared by its blocks (the paper draws one per block; a
//! shared t keeps the network's per-sequence time conditioning and is still an unbiased estimate
//! of every block's integral over t, so of their sum). The estimate per sequence is then
//! `−α'_t/(1 − α_t) · Σ_{masked n} −log μ_θ(x_t^{b(n)}, x_0^{<b(n)}, t)[x_0^n]` plus MD4's
//! reconstruction term N·(1 − α̃_0)·log V: MD4's loss with the block-conditioned denoiser, so
//! any schedule of [`ScheduleSpec`](maskdiff_schedule::ScheduleSpec) works unchanged.
//! Two limits (tested): B = N is MD4 itself; B = 1 is (α_0 − α_1) times the autoregressive
//! cross-entropy of the same network.

use crate::estimate::{self, mc_means, mean_stderr, Draw, EvalOptions, NelboEstimate};
use crate::objective::{
    CleanBatch, Flat, LogitsNet, MicroLoss, Objective, ObjectiveSettings, ObjectiveSpec,
    ReverseModel, Share, StepLosses,
};
use crate::tensor::{md4_diffusion_loss, MaskedBatch};
use crate::{Md4, Md4Stats, ObjectiveError};
use maskdiff_process::{forward_sample, DenoiseBatch, Denoiser, LogProbs, State, Token};
use maskdiff_schedule::{AnySchedule, MaskingSchedule, Shifted, TimeSampling};
use rand::{rngs::StdRng, Rng};

use dfdx::prelude::*;

/// The block-diffusion objective: MD4 inside blocks of `block_size` tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    md4: Md4,
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

impl Block {
    /// MD4 with `schedule` inside blocks of `block_size ≥ 1` tokens.
    pub fn new(
        schedule: Shifted<AnySchedule>,
        time_sampling: TimeSampling,
        vocab: usize,
        block_size: usize,
    ) -> Result<Self, ObjectiveError> {
        if block_size == 0 {
            return Err(ObjectiveError::Input(
                "block size must be at least 1".into(),
            ));
        }
        Ok(Self {
            md4: Md4::new(schedule, time_sampling, vocab),
            block_size,
        })
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn schedule(&self) -> &Shifted<AnySchedule> {
        self.md4.schedule()
    }
    /// MD4's reconstruction term for sequences of `len` (every block's, summed).
    pub fn recon(&self, len: usize) -> f64 {
        self.md4.recon(len)
    }

    /// Per-sequence diffusion losses (nats) of a noised batch: the network gets `[x_t ; x_0]`.
    fn per_seq<D: Device<f32>, N: LogitsNet<D>, T: Tape<f32, D>>(
        &self,
        net: &N,
        mb: &MaskedBatch,
        labels: Option<&[u32]>,
        tape: T,
        dropout: Option<&mut StdRng>,
    ) -> Result<Tensor<(usize,), f32, D, T>, N::Error> {
        let ids = block_input(&mb.xt, &mb.x0, mb.batch, mb.len);
        let input = DenoiseBatch {
            ids: &ids,
            batch: mb.batch,
            len: 2 * mb.len,
            t: &mb.t,
            labels,
        };
        let logits = net.logits(&input, tape, dropout)?;
        Ok(md4_diffusion_loss(logits, mb)?)
    }
}

impl<D: Device<f32>> Objective<D> for Block {
    type Noised = MaskedBatch;
    type Stats = Md4Stats;
    type Report = ();

    fn from_settings(s: &ObjectiveSettings<'_>, _dev: &D) -> Result<Self, ObjectiveError> {
        match s.spec {
            ObjectiveSpec::Block { block_size } => {
                Block::new(s.schedule.build()?, s.time_sampling, s.vocab, *block_size)
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
        }
    }

    fn noise(&self, b: &CleanBatch<'_>, rng: &mut StdRng) -> Result<MaskedBatch, ObjectiveError> {
        <Md4 as Objective<D>>::noise(&self.md4, b, rng)
    }

    fn loss<N: LogitsNet<D>>(
        &self,
        net: &N,
        mb: &MaskedBatch,
        labels: Option<&[u32]>,
        share: Share,
        rng: &mut StdRng,
    ) -> Result<MicroLoss<D, Md4Stats>, N::Error> {
        let per_seq = self.per_seq(net, mb, labels, OwnedTape::default(), Some(rng))?;
        let sum: f64 = per_seq.as_vec().iter().map(|&x| x as f64).sum();
        let inv_b = 1.0 / share.total as f32;
        let scalar = per_seq
            .try_sum::<Rank0, _>()
            .and_then(|s| s.try_mul(inv_b))
            .map_err(ObjectiveError::backend)?;
        Ok(MicroLoss {
            scalar,
            stats: Md4Stats::new(sum, mb.len, share.total),
        })
    }

    fn check_finite(&self, s: &Md4Stats) -> Result<(), (&'static str, f64)> {
        <Md4 as Objective<D>>::check_finite(&self.md4, s)
    }

    fn summarize(&self, stats: &[Md4Stats]) -> StepLosses {
        <Md4 as Objective<D>>::summarize(&self.md4, stats)
    }

    fn report(&self, _stats: &[Md4Stats], _grads: &[Flat<D>]) {}

    fn eval_nelbo<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error> {
        let masked = <Self as Objective<D>>::noise(self, batch, rng)?;
        let per_seq = self.per_seq(net, &masked, batch.labels(), NoneTape, None)?;
        let recon = self.recon(batch.len());
        Ok(per_seq
            .as_vec()
            .into_iter()
            .map(|x| x as f64 + recon)
            .collect())
    }

    fn estimate<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        block_estimate(
            denoiser,
            self.md4.schedule(),
            sequences,
            labels,
            opts,
            progress,
        )
    }

    fn reverse_model(&self) -> Result<ReverseModel, ObjectiveError> {
        Ok(ReverseModel::Md4(*self.md4.schedule()))
    }
}

/// The block NELBO of `sequences` under a block-diffusion `denoiser` (it reads `[x_t ; x_0]` and
/// returns log μ for the N noised positions): K draws of (t, x_t) per sequence, continuous time
/// only (the T-step bound is MD4's, per block, and is not offered here).
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
    let vocab = denoiser.vocab();
    let v = vocab.size();
    let draw = |toks: &[Token], rng: &mut StdRng| {
        let t: f64 = rng.gen();
        let mut states = forward_sample(toks, schedule.alpha(t), rng)?;
        states.extend(toks.iter().map(|&tok| State::Real(tok)));
        Ok((t, t, states))
    };
    let score = |r: &Draw, x0: &[u32], lp: &LogProbs, b: usize| {
        let mut ce = 0.0f64;
        for (n, (&xt, &x)) in r.xt.iter().zip(x0).enumerate() {
            if xt == vocab.mask_id() {
                ce -= estimate::log_prob(lp.row(b, n), x as usize);
            }
        }
        if ce == 0.0 {
            return Ok(0.0);
        }
        Ok(-schedule.weight(r.t) * ce)
    };
    let (len, means) = mc_means(
        denoiser,
        sequences,
        labels,
        opts,
        estimate::MD4_STREAM,
        progress,
        draw,
        score,
    )?;
    let (mean, stderr) = mean_stderr(&means);
    let recon = crate::reference::recon_term(schedule, len, v);
    let prior = crate::reference::prior_kl(schedule, len, v);
    let to_bits = |nats: f64| nats / (len as f64 * std::f64::consts::LN_2);
    let bits = to_bits(mean + recon);
    Ok(NelboEstimate {
        sequences: means.len(),
        seq_len: len,
        mc_samples: opts.mc_samples,
        discrete_steps: None,
        diffusion_nats: mean,
        recon_nats: recon,
        prior_nats: prior,
        stderr_nats: stderr,
        bits_per_token: bits,
        stderr_bits: to_bits(stderr),
        bits_per_token_with_prior: to_bits(mean + recon + prior),
        perplexity: bits.exp2(),
    })
}
