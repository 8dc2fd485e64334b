//! GenMD4 as one unit (paper §6, eq. (12), App. I; spec §5): the learnable state-dependent
//! schedule α_{t,v} = 1 − (1 − ε) t^{w_v}, w = softplus(θ), θ ∈ R^V initialised to log(e − 1)
//! so every w_v = 1 (spec §5.1); the forward process with two independent masks per sequence
//! at one t ∈ [t1, 1); the loss whose gradient is the network's two-sample gradient plus the
//! unbiased leave-one-out REINFORCE estimate of θ's (the surrogate of
//! [`crate::tensor::genmd4_loss`]); the validation NELBO and the Monte-Carlo estimator in the
//! official `loss_nelbo` convention; the reverse process of eq. (11).
//!
//! θ is the objective's parameter (checkpoint name `theta`): the trainer gives it AdamW with the
//! network's hyper-parameters, learning rate and weight decay (the official code decays θ too),
//! and an EMA with the network's rate (spec §5.6); gradient clipping applies to the network only
//! (θ's RLOO gradient is heavy-tailed: a joint clip at 1.0 drove every w towards 0.4 on English
//! text, measured).
//!
//! One-sample variant (official repository issue #4: GenMD4's network gradient averages two x_t
//! samples, MD4's uses one), `ObjectiveSpec::GenMd4 { one_sample: true }`: the network's
//! gradient is ∇ mean_b L1 — from the first mask only (the second pattern's forward pass runs
//! without a tape, and the first half's gradient, which the surrogate weights by 0.5, is
//! doubled); θ's gradient and the reported NELBO 0.5(L1 + L2) + recon are unchanged. Cost: two
//! forward passes, one backward pass through the network.

use crate::estimate::{self, EvalOptions, NelboEstimate};
use crate::objective::{
    mean, CleanBatch, Flat, LogitsNet, MicroLoss, Noised, Objective, ObjectiveSettings,
    ObjectiveSpec, ReverseModel, Share, StepLosses,
};
use crate::tensor::{genmd4_loss, GenMd4Batch, GenMd4Loss, GenMd4Options};
use crate::ObjectiveError;
use dfdx::prelude::*;
use maskdiff_process::{DenoiseBatch, Denoiser};
use maskdiff_schedule::{
    inverse_softplus, softplus, PerTokenPolynomial, GENMD4_T1, THETA_INIT_FOR_W1,
};
use rand::rngs::StdRng;

/// Clipped mask rates with GenMD4's learned schedule.
pub(crate) const NO_MASK_RATE: &str = "clipped mask rates (mask_rate, BD3-LM's clipped schedules) \
     need one mask rate per time; GenMD4's learned per-token schedule masks each token value at \
     its own rate t^w_v, so there is no single rate to clip (use MD4, alone or inside blocks)";

/// Checkpoint name of θ.
pub const THETA_NAME: &str = "theta";

/// θ must stay below this (softplus(80) = 80 up to 1e−35; the loss refuses larger values).
const THETA_LIMIT: f32 = 80.0;

/// The GenMD4 objective: the exponents' parameters θ (on the device), the loss settings and the
/// one-sample switch.
#[derive(Debug, Clone)]
pub struct GenMd4<D: Device<f32>> {
    theta: Flat<D>,
    options: GenMd4Options,
    one_sample: bool,
}

impl<D: Device<f32>> GenMd4<D> {
    /// θ = log(e − 1) for every token value (all w_v = 1).
    pub fn new(
        vocab: usize,
        options: GenMd4Options,
        one_sample: bool,
        dev: &D,
    ) -> Result<Self, ObjectiveError> {
        if vocab == 0 {
            return Err(ObjectiveError::Input("GenMD4 needs a vocabulary".into()));
        }
        let theta = dev
            .try_tensor_from_vec(vec![THETA_INIT_FOR_W1 as f32; vocab], (vocab,))
            .map_err(ObjectiveError::backend)?;
        Ok(Self {
            theta,
            options,
            one_sample,
        })
    }
    pub fn theta(&self) -> &Flat<D> {
        &self.theta
    }
    pub fn options(&self) -> &GenMd4Options {
        &self.options
    }
    pub fn one_sample(&self) -> bool {
        self.one_sample
    }
    fn theta_values(&self) -> Vec<f64> {
        self.theta.as_vec().iter().map(|&x| x as f64).collect()
    }
    /// The exponents w = softplus(θ).
    pub fn exponents(&self) -> Vec<f64> {
        self.theta_values().into_iter().map(softplus).collect()
    }
    /// The per-token schedule of the current exponents (official ε = 1e−4).
    pub fn schedule(&self) -> Result<PerTokenPolynomial, ObjectiveError> {
        Ok(PerTokenPolynomial::from_theta(&self.theta_values())?)
    }
    /// Set the exponents to `w` (all in (0, 80), one per token value), e.g. to freeze them at
    /// equal values.
    pub fn set_exponents(&mut self, w: &[f64]) -> Result<(), ObjectiveError> {
        let v = self.theta.shape().0;
        if w.len() != v {
            return Err(ObjectiveError::Input(format!(
                "{} exponents for vocabulary {v}",
                w.len()
            )));
        }
        if let Some(bad) = w
            .iter()
            .find(|x| !(x.is_finite() && **x > 0.0 && **x < THETA_LIMIT as f64))
        {
            return Err(ObjectiveError::Input(format!(
                "exponent {bad} not in (0, 80)"
            )));
        }
        let theta: Vec<f32> = w.iter().map(|&x| inverse_softplus(x) as f32).collect();
        self.theta = self
            .theta
            .device()
            .try_tensor_from_vec(theta, (v,))
            .map_err(ObjectiveError::backend)?;
        Ok(())
    }
    /// The GenMD4 loss of a stacked batch with this θ, no dropout, no tape.
    pub fn loss_on<N: LogitsNet<D>>(
        &self,
        net: &N,
        gb: &GenMd4Batch,
        labels: Option<&[u32]>,
    ) -> Result<GenMd4Loss<D, NoneTape>, N::Error> {
        let labels2 = labels.map(|l| [l, l].concat());
        let times = gb.stacked_times();
        let input = DenoiseBatch {
            ids: &gb.xt,
            batch: 2 * gb.batch,
            len: gb.len,
            t: &times,
            labels: labels2.as_deref(),
        };
        let logits = net.logits(&input, NoneTape, None)?;
        Ok(genmd4_loss(logits, self.theta.clone(), gb, &self.options)?)
    }
}

impl Noised for GenMd4Batch {
    fn batch(&self) -> usize {
        self.batch
    }
    /// Rows `lo..hi` of both mask copies.
    fn slice(&self, lo: usize, hi: usize) -> Result<Self, ObjectiveError> {
        let (b, l) = (self.batch, self.len);
        let xt = [
            &self.xt[lo * l..hi * l],
            &self.xt[(b + lo) * l..(b + hi) * l],
        ]
        .concat();
        GenMd4Batch::new(
            self.x0[lo * l..hi * l].to_vec(),
            xt,
            hi - lo,
            l,
            self.vocab,
            self.t[lo..hi].to_vec(),
            self.eps,
        )
    }
    fn masked_fraction(&self) -> f64 {
        let masked = self
            .xt
            .iter()
            .filter(|&&x| x as usize == self.vocab)
            .count();
        masked as f64 / self.xt.len() as f64
    }
}

/// A micro-batch's numbers: per sequence NELBO 0.5(L1 + L2) + recon, diffusion 0.5(L1 + L2),
/// RLOO term and recon; the batch mean of the surrogate and the micro-batch's share.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenMd4Stats {
    pub nelbo: Vec<f64>,
    pub diffusion: Vec<f64>,
    pub rloo: Vec<f64>,
    pub recon: Vec<f64>,
    pub surrogate: f64,
    pub fraction: f64,
}

/// What a GenMD4 step did beyond its losses (batch means in nats per sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct GenMd4Report {
    /// The differentiated surrogate (includes the RLOO term; not a likelihood bound).
    pub surrogate: f64,
    /// The RLOO term 0.5(L1 − L2)(log q1 − log q2).
    pub rloo: f64,
    /// Reconstruction at t1.
    pub recon: f64,
    /// θ's gradient (the surrogate's, batch mean; never clipped), and its norm.
    pub theta_grad: Vec<f64>,
    pub theta_grad_norm: f64,
    /// Exponents w = softplus(θ) after the update.
    pub exponents: Vec<f64>,
}

impl<D: Device<f32>> Objective<D> for GenMd4<D> {
    type Noised = GenMd4Batch;
    type Stats = GenMd4Stats;
    type Report = GenMd4Report;

    fn from_settings(s: &ObjectiveSettings<'_>, dev: &D) -> Result<Self, ObjectiveError> {
        match *s.spec {
            ObjectiveSpec::GenMd4 { one_sample } => {
                if s.mask_rate.is_some_and(|c| !c.is_full()) {
                    return Err(ObjectiveError::Unsupported(NO_MASK_RATE));
                }
                // t ∈ [t1, 1) with the configured sampling, official t1 = 1e−3, no (1 − t1)
                // factor (spec §5.4); the schedule spec's base is not used (w is learned).
                let options = GenMd4Options {
                    t1: GENMD4_T1,
                    sampling: s.time_sampling,
                    scale_by_time_range: false,
                };
                Self::new(s.vocab, options, one_sample, dev)
            }
            other => Err(ObjectiveError::WrongObjective {
                expected: "genmd4",
                found: format!("{other:?}"),
            }),
        }
    }
    fn spec(&self) -> ObjectiveSpec {
        ObjectiveSpec::GenMd4 {
            one_sample: self.one_sample,
        }
    }

    /// t_b ∈ [t1, 1) and two independent masks per sequence, drawn with the current w.
    fn noise(&self, b: &CleanBatch<'_>, rng: &mut StdRng) -> Result<GenMd4Batch, ObjectiveError> {
        GenMd4Batch::sample(
            b.x0(),
            b.batch(),
            b.len(),
            &self.schedule()?,
            &self.options,
            rng,
        )
    }

    fn loss<N: LogitsNet<D>>(
        &self,
        net: &N,
        mb: &GenMd4Batch,
        labels: Option<&[u32]>,
        share: Share,
        rng: &mut StdRng,
    ) -> Result<MicroLoss<D, GenMd4Stats>, N::Error> {
        let (m, len) = (mb.batch, mb.len);
        let labels = labels.map(|l| [l, l].concat());
        let logits = if self.one_sample {
            let half = |r: std::ops::Range<usize>| DenoiseBatch {
                ids: &mb.xt[r.start * len..r.end * len],
                batch: m,
                len,
                t: &mb.t,
                labels: labels.as_deref().map(|l| &l[r]),
            };
            let a = net.logits(&half(0..m), OwnedTape::default(), Some(&mut *rng))?;
            let b = net.logits(&half(m..2 * m), NoneTape, Some(&mut *rng))?;
            (a, b)
                .try_concat_along(Axis::<0>)
                .map_err(ObjectiveError::backend)?
        } else {
            let times = mb.stacked_times();
            let input = DenoiseBatch {
                ids: &mb.xt,
                batch: 2 * m,
                len,
                t: &times,
                labels: labels.as_deref(),
            };
            net.logits(&input, OwnedTape::default(), Some(&mut *rng))?
        };
        let out = genmd4_loss(logits, self.theta.leaky_trace(), mb, &self.options)?;
        let surrogate = out.surrogate.as_vec()[0] as f64;
        let fraction = (share.hi - share.lo) as f64 / share.total as f64;
        let stats = GenMd4Stats {
            nelbo: out.nelbo(),
            diffusion: out.diffusion(),
            rloo: out.rloo(),
            recon: out.recon.clone(),
            surrogate,
            fraction,
        };
        let scalar = out
            .surrogate
            .try_mul(fraction as f32)
            .map_err(ObjectiveError::backend)?;
        Ok(MicroLoss { scalar, stats })
    }

    fn network_grad_scale(&self) -> Option<f32> {
        // The surrogate weights L1 by 0.5; the one-sample network gradient is ∇ L1.
        self.one_sample.then_some(2.0)
    }

    fn check_finite(&self, s: &GenMd4Stats) -> Result<(), (&'static str, f64)> {
        let total = s.surrogate + s.nelbo.iter().sum::<f64>();
        if total.is_finite() {
            Ok(())
        } else {
            Err(("loss", total))
        }
    }

    fn summarize(&self, stats: &[GenMd4Stats]) -> StepLosses {
        let flat = |f: fn(&GenMd4Stats) -> &Vec<f64>| -> Vec<f64> {
            stats.iter().flat_map(|s| f(s).iter().copied()).collect()
        };
        StepLosses {
            nelbo: mean(&flat(|s| &s.nelbo)),
            diffusion: mean(&flat(|s| &s.diffusion)),
        }
    }

    fn report(&self, stats: &[GenMd4Stats], grads: &[Flat<D>]) -> GenMd4Report {
        let mut surrogate = 0.0f64;
        for s in stats {
            surrogate += s.fraction * s.surrogate;
        }
        let flat = |f: fn(&GenMd4Stats) -> &Vec<f64>| -> Vec<f64> {
            stats.iter().flat_map(|s| f(s).iter().copied()).collect()
        };
        let theta_grad: Vec<f64> = grads
            .first()
            .map(|g| g.as_vec().iter().map(|&x| x as f64).collect())
            .unwrap_or_default();
        let theta_grad_norm = theta_grad.iter().map(|g| g * g).sum::<f64>().sqrt();
        GenMd4Report {
            surrogate,
            rloo: mean(&flat(|s| &s.rloo)),
            recon: mean(&flat(|s| &s.recon)),
            theta_grad,
            theta_grad_norm,
            exponents: self.exponents(),
        }
    }

    /// One t ∈ [t1, 1) and ONE x_t per sequence (like MD4's validation): L + recon(t1), the
    /// official `loss_nelbo` convention (no prior term, no (1 − t1) factor).
    fn eval_nelbo<N: LogitsNet<D>>(
        &self,
        net: &N,
        batch: &CleanBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<Vec<f64>, N::Error> {
        let drawn = <Self as Objective<D>>::noise(self, batch, rng)?;
        let (b, l) = (batch.batch(), batch.len());
        // Keep the first pattern twice: then L1 = L2 and 0.5(L1 + L2) is the one-sample loss.
        let first = &drawn.xt[..b * l];
        let gb = GenMd4Batch::new(
            drawn.x0.clone(),
            [first, first].concat(),
            b,
            l,
            drawn.vocab,
            drawn.t.clone(),
            drawn.eps,
        )?;
        let input = DenoiseBatch {
            ids: first,
            batch: b,
            len: l,
            t: &gb.t,
            labels: batch.labels(),
        };
        let half = net.logits(&input, NoneTape, None)?;
        let logits = (half.clone(), half)
            .try_concat_along(Axis::<0>)
            .map_err(ObjectiveError::backend)?;
        let out = genmd4_loss(logits, self.theta.clone(), &gb, &self.options)?;
        Ok(out.nelbo())
    }

    fn params(&self) -> Vec<(&'static str, &Flat<D>)> {
        vec![(THETA_NAME, &self.theta)]
    }
    fn params_mut(&mut self) -> Vec<&mut Flat<D>> {
        vec![&mut self.theta]
    }
    fn check_params(&self) -> Result<(), (&'static str, f64)> {
        match self
            .theta
            .as_vec()
            .into_iter()
            .find(|x| !(x.is_finite() && *x < THETA_LIMIT))
        {
            Some(bad) => Err(("GenMD4 theta", bad as f64)),
            None => Ok(()),
        }
    }

    fn estimate<M: Denoiser + ?Sized>(
        &self,
        denoiser: &mut M,
        sequences: &[Vec<u32>],
        labels: Option<&[u32]>,
        opts: EvalOptions,
        progress: &mut dyn FnMut(usize),
    ) -> Result<NelboEstimate, ObjectiveError> {
        estimate::genmd4(
            denoiser,
            &self.schedule()?,
            sequences,
            labels,
            opts,
            progress,
        )
    }

    fn exponents(&self) -> Option<Vec<f64>> {
        Some(GenMd4::exponents(self))
    }

    fn reverse_model(&self) -> Result<ReverseModel, ObjectiveError> {
        Ok(ReverseModel::GenMd4(self.schedule()?))
    }
}
