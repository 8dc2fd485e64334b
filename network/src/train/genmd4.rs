//! GenMD4 in the trainer (paper §6, eq. (12), App. I.2; spec §5): the learnable state-dependent
//! schedule α_{t,v} = 1 − (1 − ε) t^{w_v}, w = softplus(θ), θ ∈ R^V initialised to
//! log(e − 1) so every w_v = 1 (spec §5.1). θ is an ordinary parameter: it gets AdamW with the
//! network's hyper-parameters, learning rate and weight decay (the official code decays θ too),
//! and it is EMA'd with the network's rate (spec §5.6). Gradient clipping (not used by the
//! official configs) applies to the network's norm only — see `genmd4_step`.
//!
//! One step (spec §5.3–§5.5): antithetic t on [t1, 1), two independent masks per sequence drawn
//! with the live w, the network run once on the stacked `[2B, len]` ids, and
//! `maskdiff_objective::tensor::genmd4_loss`'s surrogate
//! `0.5(L1 + L2) + 0.5·sg(L1 − L2)(log q1 − log q2) + recon(t1)` differentiated. The reported
//! loss is the NELBO `0.5(L1 + L2) + recon`, never the surrogate.
//!
//! One-sample variant (official repository issue #4: GenMD4's network gradient averages two x_t
//! samples, MD4's uses one). With `Objective::GenMd4 { one_sample: true }`:
//! * the network's gradient is ∇ mean_b L1 — from the first mask only, as in MD4 (the second
//!   pattern's forward pass runs without a tape, and the first half's gradient, which the
//!   surrogate weights by 0.5, is doubled);
//! * θ's gradient is unchanged — the two-sample RLOO estimate needs both losses L1, L2 (the
//!   pathwise part averages both masks, the score-function part uses their difference);
//! * the reported NELBO is still 0.5(L1 + L2) + recon;
//! * cost: two forward passes but one backward pass through the network (two-sample: two and
//!   two; MD4: one and one). So the variant isolates the network's gradient variance, not the
//!   compute.

use super::trainer::mix;
use super::{
    ema_update, global_norm, AdamW, AdamWConfig, Objective, StepStats, TrainBatch, Trainer,
};
use crate::param::{NamedTensor, TensorMap};
use crate::{Kernels, NetworkError, Param};
use dfdx::prelude::*;
use maskdiff_objective::tensor::{genmd4_loss, GenMd4Batch, GenMd4Loss, GenMd4Options};
use maskdiff_process::DenoiseBatch;
use maskdiff_schedule::{
    inverse_softplus, softplus, PerTokenPolynomial, GENMD4_T1, THETA_INIT_FOR_W1,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;

/// Name of the θ tensor in checkpoints (`genmd4-S.safetensors` holds `theta`, `ema.theta`,
/// `m.theta`, `v.theta`).
pub const THETA_NAME: &str = "genmd4.theta";

/// The learnable GenMD4 exponents: θ (live, as a named parameter), its EMA, its AdamW moments.
/// θ's AdamW update count always equals the network optimizer's (they step together).
#[derive(Debug, Clone)]
pub struct GenMd4State<D: Device<f32>> {
    pub theta: Param<f32, D>,
    pub ema_theta: Tensor<(usize,), f32, D>,
    pub opt: AdamW<D>,
    /// Diagnostics of the last step, if any.
    pub last: Option<GenMd4StepInfo>,
}

/// The gradients of one GenMD4 step before clipping (see [`Trainer::genmd4_gradients`]).
#[derive(Debug, Clone)]
pub struct GenMd4Gradients<D: Device<f32>> {
    /// d surrogate / d network parameter, in `Trainer::model().params()` order (one-sample:
    /// d mean_b L1 / d parameter).
    pub network: Vec<Tensor<(usize,), f32, D>>,
    /// d surrogate / d θ (pathwise + RLOO score-function + reconstruction).
    pub theta: Tensor<(usize,), f32, D>,
    /// The times and two masks drawn.
    pub batch: GenMd4Batch,
    /// Per sequence: NELBO 0.5(L1 + L2) + recon, diffusion 0.5(L1 + L2), RLOO term, recon.
    pub nelbo: Vec<f64>,
    pub diffusion: Vec<f64>,
    pub rloo: Vec<f64>,
    pub recon: Vec<f64>,
    /// Batch mean of the surrogate.
    pub surrogate: f64,
}

/// What a GenMD4 step did beyond [`StepStats`] (batch means in nats per sequence).
#[derive(Debug, Clone, PartialEq)]
pub struct GenMd4StepInfo {
    /// The differentiated surrogate (includes the RLOO term; not a likelihood bound).
    pub surrogate: f64,
    /// The RLOO term 0.5(L1 − L2)(log q1 − log q2).
    pub rloo: f64,
    /// Reconstruction at t1.
    pub recon: f64,
    /// θ's gradient (the surrogate's, batch mean; never clipped), and its norm.
    pub theta_grad: Vec<f64>,
    pub theta_grad_norm: f64,
    /// Live exponents w = softplus(θ) after the update.
    pub exponents: Vec<f64>,
}

impl<D: Device<f32>> GenMd4State<D> {
    /// θ = log(e − 1) for every token value (all w_v = 1), EMA = θ, zero moments.
    pub fn new(vocab: usize, adamw: AdamWConfig, dev: &D) -> Result<Self, NetworkError> {
        if vocab == 0 {
            return Err(NetworkError::Config("GenMD4 needs a vocabulary".into()));
        }
        let value = dev
            .try_tensor_from_vec(vec![THETA_INIT_FOR_W1 as f32; vocab], (vocab,))
            .map_err(NetworkError::device)?;
        let theta = Param {
            name: THETA_NAME.into(),
            shape: vec![vocab],
            value,
        };
        let opt = AdamW::new(adamw, std::slice::from_ref(&theta))?;
        Ok(GenMd4State {
            ema_theta: theta.value.clone(),
            theta,
            opt,
            last: None,
        })
    }

    fn theta_values(&self, use_ema: bool) -> Vec<f64> {
        let t = if use_ema {
            &self.ema_theta
        } else {
            &self.theta.value
        };
        t.as_vec().iter().map(|&x| x as f64).collect()
    }

    /// w = softplus(θ) of the live or EMA parameters.
    pub fn exponents(&self, use_ema: bool) -> Vec<f64> {
        self.theta_values(use_ema)
            .into_iter()
            .map(softplus)
            .collect()
    }

    /// The schedule of the live or EMA exponents (official ε = 1e−4), for sampling and eval.
    pub fn schedule(&self, use_ema: bool) -> Result<PerTokenPolynomial, NetworkError> {
        Ok(PerTokenPolynomial::from_theta(&self.theta_values(use_ema))?)
    }
}

/// A flat gradient tensor.
type Grad<D> = Tensor<(usize,), f32, D>;

fn obj(e: impl std::fmt::Display) -> NetworkError {
    NetworkError::Objective(e.to_string())
}

/// Rows `lo..hi` of both mask copies of a stacked batch, as a batch of its own.
fn slice_batch(gb: &GenMd4Batch, lo: usize, hi: usize) -> Result<GenMd4Batch, NetworkError> {
    let (b, l) = (gb.batch, gb.len);
    let xt = [&gb.xt[lo * l..hi * l], &gb.xt[(b + lo) * l..(b + hi) * l]].concat();
    GenMd4Batch::new(
        gb.x0[lo * l..hi * l].to_vec(),
        xt,
        hi - lo,
        l,
        gb.vocab,
        gb.t[lo..hi].to_vec(),
        gb.eps,
    )
    .map_err(obj)
}

/// Remove `name` from `map` as a tensor of shape `shape`.
fn take_tensor<D: Device<f32>>(
    map: &mut TensorMap<f32>,
    name: &str,
    shape: &[usize],
    dev: &D,
    path: &Path,
) -> Result<Tensor<(usize,), f32, D>, NetworkError> {
    let mismatch = |msg: String| NetworkError::CheckpointMismatch {
        path: path.into(),
        msg,
    };
    let (s, vals) = map
        .remove(name)
        .ok_or_else(|| mismatch(format!("GenMD4 tensor {name} missing")))?;
    if s != shape {
        return Err(mismatch(format!(
            "GenMD4 tensor {name} has shape {s:?}, expected {shape:?}"
        )));
    }
    let n = vals.len();
    dev.try_tensor_from_vec(vals, (n,))
        .map_err(NetworkError::device)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

impl<D: Kernels<f32>> Trainer<D> {
    /// The GenMD4 state, `None` for MD4 runs.
    pub fn genmd4(&self) -> Option<&GenMd4State<D>> {
        self.genmd4.as_ref()
    }

    fn genmd4_state(&self) -> Result<&GenMd4State<D>, NetworkError> {
        self.genmd4
            .as_ref()
            .ok_or_else(|| NetworkError::TrainConfig("the objective is not GenMD4".into()))
    }

    /// The learned exponents w = softplus(θ) (live or EMA), `None` for MD4 runs.
    pub fn genmd4_exponents(&self, use_ema: bool) -> Option<Vec<f64>> {
        self.genmd4.as_ref().map(|g| g.exponents(use_ema))
    }

    /// The learned per-token schedule (live or EMA θ) for `maskdiff_sampler`'s
    /// `ScheduleRef::genmd4` and for evaluation; an error for MD4 runs.
    pub fn genmd4_schedule(&self, use_ema: bool) -> Result<PerTokenPolynomial, NetworkError> {
        self.genmd4_state()?.schedule(use_ema)
    }

    /// Set the live and EMA exponents to `w` (all > 0, one per token value), e.g. to freeze
    /// them at equal values; the optimizer moments are kept.
    pub fn set_genmd4_exponents(&mut self, w: &[f64]) -> Result<(), NetworkError> {
        let v = self.net_cfg.vocab_size;
        if w.len() != v {
            return Err(NetworkError::Input(format!(
                "{} exponents for vocabulary {v}",
                w.len()
            )));
        }
        // softplus(θ) for θ < 80 (the objective's limit) covers w up to 80.
        if let Some(bad) = w
            .iter()
            .find(|x| !(x.is_finite() && **x > 0.0 && **x < 80.0))
        {
            return Err(NetworkError::Input(format!(
                "exponent {bad} not in (0, 80)"
            )));
        }
        let g = self
            .genmd4
            .as_mut()
            .ok_or_else(|| NetworkError::TrainConfig("the objective is not GenMD4".into()))?;
        let theta: Vec<f32> = w.iter().map(|&x| inverse_softplus(x) as f32).collect();
        let dev = g.theta.value.device().clone();
        g.theta.value = dev
            .try_tensor_from_vec(theta, (v,))
            .map_err(NetworkError::device)?;
        g.ema_theta = g.theta.value.clone();
        Ok(())
    }

    /// The loss settings: t ∈ [t1, 1) with the configured time sampling, official t1 = 1e−3,
    /// no (1 − t1) factor (spec §5.4).
    pub fn genmd4_options(&self) -> GenMd4Options {
        GenMd4Options {
            t1: GENMD4_T1,
            sampling: self.train_cfg.time_sampling,
            scale_by_time_range: false,
        }
    }

    fn genmd4_sample(
        &self,
        b: &TrainBatch<'_>,
        rng: &mut StdRng,
        use_ema: bool,
    ) -> Result<GenMd4Batch, NetworkError> {
        let sched = self.genmd4_schedule(use_ema)?;
        GenMd4Batch::sample(b.x0, b.batch, b.len, &sched, &self.genmd4_options(), rng).map_err(obj)
    }

    /// The times and the two mask patterns the next [`Trainer::step`] will draw for `batch`
    /// (they come first from the step's RNG), for tests and diagnostics.
    pub fn genmd4_next_batch(&self, batch: &TrainBatch<'_>) -> Result<GenMd4Batch, NetworkError> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, self.step, 0));
        self.genmd4_sample(batch, &mut rng, false)
    }

    /// The GenMD4 loss of a given stacked batch with the live or EMA network and θ, no dropout,
    /// no tape. `labels`: one per sequence (B), for class-conditional models.
    pub fn genmd4_loss_on(
        &self,
        gb: &GenMd4Batch,
        labels: Option<&[u32]>,
        use_ema: bool,
    ) -> Result<GenMd4Loss<D, NoneTape>, NetworkError> {
        let g = self.genmd4_state()?;
        let (model, theta) = if use_ema {
            (&self.ema, g.ema_theta.clone())
        } else {
            (&self.model, g.theta.value.clone())
        };
        let labels2 = labels.map(|l| [l, l].concat());
        let times = gb.stacked_times();
        let input = DenoiseBatch {
            ids: &gb.xt,
            batch: 2 * gb.batch,
            len: gb.len,
            t: &times,
            labels: labels2.as_deref(),
        };
        let logits = model.forward(&input, NoneTape, None)?;
        genmd4_loss(logits, theta, gb, &self.genmd4_options()).map_err(obj)
    }

    /// Per-sequence GenMD4 NELBO estimates in nats with one t ∈ [t1, 1) and ONE x_t per
    /// sequence (like MD4's evaluation): L + recon(t1), the official `loss_nelbo` convention
    /// (no prior term, no (1 − t1) factor). Live or EMA network and θ, no dropout.
    pub(crate) fn genmd4_eval_loss<R: Rng>(
        &self,
        batch: &TrainBatch<'_>,
        rng: &mut R,
        use_ema: bool,
    ) -> Result<Vec<f64>, NetworkError> {
        let g = self.genmd4_state()?;
        let mut r = StdRng::seed_from_u64(rng.gen());
        let drawn = self.genmd4_sample(batch, &mut r, use_ema)?;
        let (b, l) = (batch.batch, batch.len);
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
        )
        .map_err(obj)?;
        let (model, theta) = if use_ema {
            (&self.ema, g.ema_theta.clone())
        } else {
            (&self.model, g.theta.value.clone())
        };
        let input = DenoiseBatch {
            ids: first,
            batch: b,
            len: l,
            t: &gb.t,
            labels: batch.labels,
        };
        let half = model.forward(&input, NoneTape, None)?;
        let logits = (half.clone(), half)
            .try_concat_along(Axis::<0>)
            .map_err(NetworkError::device)?;
        let out = genmd4_loss(logits, theta, &gb, &self.genmd4_options()).map_err(obj)?;
        Ok(out.nelbo())
    }

    /// The gradients the next [`Trainer::step`] would apply (same RNG draws: times, masks,
    /// dropout), before clipping, without changing anything: the network's (in parameter
    /// order) and θ's, with the batch and its losses. For diagnostics and tests.
    pub fn genmd4_gradients(
        &self,
        batch: &TrainBatch<'_>,
    ) -> Result<GenMd4Gradients<D>, NetworkError> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, self.step, 0));
        self.genmd4_gradients_with(batch, &mut rng)
    }

    /// Like [`Trainer::genmd4_gradients`] with the times, masks and dropout drawn from `rng`
    /// (e.g. to average the gradient estimator over independent draws at fixed parameters).
    pub fn genmd4_gradients_with(
        &self,
        batch: &TrainBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<GenMd4Gradients<D>, NetworkError> {
        let one_sample = match self.train_cfg.objective {
            Objective::GenMd4 { one_sample } => one_sample,
            Objective::Md4 => {
                return Err(NetworkError::TrainConfig(
                    "the objective is not GenMD4".into(),
                ))
            }
        };
        let gb = self.genmd4_sample(batch, rng, false)?;
        let (bsz, len) = (batch.batch, batch.len);
        let k = self.train_cfg.micro_batches;
        if k > bsz {
            return Err(NetworkError::TrainConfig(format!(
                "{k} micro-batches for a batch of {bsz}"
            )));
        }
        let opts = self.genmd4_options();
        let theta = self.genmd4_state()?.theta.value.clone();
        let mut acc: Option<(Vec<Grad<D>>, Grad<D>)> = None;
        let (mut nelbo, mut diffusion, mut rloo, mut recon) = (vec![], vec![], vec![], vec![]);
        let mut surrogate = 0.0f64;
        for j in 0..k {
            let (lo, hi) = (j * bsz / k, (j + 1) * bsz / k);
            let m = hi - lo;
            let mb = if k == 1 {
                gb.clone()
            } else {
                slice_batch(&gb, lo, hi)?
            };
            let labels = batch.labels.map(|l| [&l[lo..hi], &l[lo..hi]].concat());
            let logits = if one_sample {
                let half = |r: std::ops::Range<usize>| DenoiseBatch {
                    ids: &mb.xt[r.start * len..r.end * len],
                    batch: m,
                    len,
                    t: &mb.t,
                    labels: labels.as_deref().map(|l| &l[r]),
                };
                let a = self
                    .model
                    .forward(&half(0..m), self.model.tape(), Some(&mut *rng))?;
                let b = self
                    .model
                    .forward(&half(m..2 * m), NoneTape, Some(&mut *rng))?;
                (a, b)
                    .try_concat_along(Axis::<0>)
                    .map_err(NetworkError::device)?
            } else {
                let times = mb.stacked_times();
                let input = DenoiseBatch {
                    ids: &mb.xt,
                    batch: 2 * m,
                    len,
                    t: &times,
                    labels: labels.as_deref(),
                };
                self.model
                    .forward(&input, self.model.tape(), Some(&mut *rng))?
            };
            let out = genmd4_loss(logits, theta.leaky_trace(), &mb, &opts).map_err(obj)?;
            let s = out.surrogate.as_vec()[0] as f64;
            let nb = out.nelbo();
            let total = s + nb.iter().sum::<f64>();
            if !total.is_finite() {
                return Err(NetworkError::NonFinite {
                    what: "loss",
                    step: self.step,
                    value: total,
                });
            }
            let frac = m as f64 / bsz as f64;
            surrogate += frac * s;
            nelbo.extend(nb);
            diffusion.extend(out.diffusion());
            rloo.extend(out.rloo());
            recon.extend(out.recon.iter().copied());
            let grads = out
                .surrogate
                .try_mul(frac as f32)
                .and_then(|x| x.try_backward())
                .map_err(NetworkError::device)?;
            // one-sample: the surrogate weights L1 by 0.5; the network's gradient is ∇ L1.
            let net_scale = if one_sample { 2.0f32 } else { 1.0 };
            let g: Vec<_> = self
                .model
                .params()
                .iter()
                .map(|p| grads.get(&p.value) * net_scale)
                .collect();
            let gt = grads.get(&theta);
            acc = Some(match acc {
                None => (g, gt),
                Some((a, at)) => (a.into_iter().zip(g).map(|(a, g)| a + g).collect(), at + gt),
            });
        }
        let (network, theta) = acc.expect("at least one micro-batch");
        Ok(GenMd4Gradients {
            network,
            theta,
            batch: gb,
            nelbo,
            diffusion,
            rloo,
            recon,
            surrogate,
        })
    }

    /// One GenMD4 optimizer step (see the module docs).
    pub(crate) fn genmd4_step(
        &mut self,
        batch: &TrainBatch<'_>,
    ) -> Result<StepStats, NetworkError> {
        let len = batch.len;
        let GenMd4Gradients {
            network: grads,
            theta: g_theta,
            batch: gb,
            nelbo,
            diffusion,
            rloo,
            recon,
            surrogate,
        } = self.genmd4_gradients(batch)?;
        // Clipping applies to the network's gradient norm only (the same rule as MD4). θ's
        // RLOO gradient is heavy-tailed (1/t weights near t1) and often dominates a joint norm:
        // clipping it rescales exactly the rare large draws that keep the estimator unbiased
        // (measured: a joint clip at 1.0 drove every w towards 0.4 on English text, no clip
        // kept them near 1), and would throttle the network's steps by θ's noise.
        let grad_norm = global_norm(&grads)?;
        let theta_grad_norm = global_norm(std::slice::from_ref(&g_theta))?;
        let theta_grad: Vec<f64> = g_theta.as_vec().iter().map(|&x| x as f64).collect();
        for (what, value) in [
            ("gradient norm", grad_norm),
            ("GenMD4 theta gradient", theta_grad_norm),
        ] {
            if !value.is_finite() {
                return Err(NetworkError::NonFinite {
                    what,
                    step: self.step,
                    value,
                });
            }
        }
        let clip = self.train_cfg.grad_clip;
        let clipped = clip > 0.0 && grad_norm > clip;
        let scale = clipped.then(|| clip / grad_norm);
        let lr = self.train_cfg.lr.lr(self.step);
        let decay = self.train_cfg.ema_decay;
        // Update θ on a copy first: a failure leaves the run unchanged.
        let mut g = self.genmd4_state()?.clone();
        g.opt
            .update(std::slice::from_mut(&mut g.theta), &[g_theta], lr, None)?;
        let new_theta = g.theta.value.as_vec();
        if let Some(bad) = new_theta.iter().find(|x| !(x.is_finite() && **x < 80.0)) {
            return Err(NetworkError::NonFinite {
                what: "GenMD4 theta",
                step: self.step,
                value: *bad as f64,
            });
        }
        self.opt
            .update(self.model.params_mut(), &grads, lr, scale)?;
        ema_update(&mut self.ema, &self.model, decay)?;
        g.ema_theta =
            D::ema(&g.ema_theta, &g.theta.value, 1.0 - decay).map_err(NetworkError::device)?;
        let masked = gb.xt.iter().filter(|&&x| x as usize == gb.vocab).count();
        g.last = Some(GenMd4StepInfo {
            surrogate,
            rloo: mean(&rloo),
            recon: mean(&recon),
            theta_grad,
            theta_grad_norm,
            exponents: g.exponents(false),
        });
        self.genmd4 = Some(g);
        let loss = mean(&nelbo);
        let stats = StepStats {
            step: self.step,
            loss,
            diffusion: mean(&diffusion),
            bits_per_token: loss / (len as f64 * std::f64::consts::LN_2),
            grad_norm,
            clipped,
            lr,
            masked_fraction: masked as f64 / gb.xt.len() as f64,
        };
        self.step += 1;
        Ok(stats)
    }

    /// θ, its EMA and moments as named tensors for the `genmd4` checkpoint file.
    pub(crate) fn genmd4_items(&self) -> Option<Vec<NamedTensor<'_, f32, D>>> {
        self.genmd4.as_ref().map(|g| {
            let s = g.theta.shape.clone();
            vec![
                ("theta".to_string(), s.clone(), &g.theta.value),
                ("ema.theta".to_string(), s.clone(), &g.ema_theta),
                ("m.theta".to_string(), s.clone(), &g.opt.m[0]),
                ("v.theta".to_string(), s, &g.opt.v[0]),
            ]
        })
    }

    /// Restore θ, its EMA and moments from a parsed `genmd4` file; `count` = AdamW updates.
    pub(crate) fn load_genmd4(
        &mut self,
        mut map: TensorMap<f32>,
        count: u64,
        path: &Path,
    ) -> Result<(), NetworkError> {
        let v = self.net_cfg.vocab_size;
        let g = self
            .genmd4
            .as_mut()
            .ok_or_else(|| NetworkError::CheckpointMismatch {
                path: path.into(),
                msg: "GenMD4 parameters in a checkpoint whose objective is not GenMD4".into(),
            })?;
        let dev = g.theta.value.device().clone();
        let mut get = |name: &str| take_tensor(&mut map, name, &[v], &dev, path);
        g.theta.value = get("theta")?;
        g.ema_theta = get("ema.theta")?;
        g.opt.m[0] = get("m.theta")?;
        g.opt.v[0] = get("v.theta")?;
        g.opt.count = count;
        if !map.is_empty() {
            return Err(NetworkError::CheckpointMismatch {
                path: path.into(),
                msg: format!(
                    "unexpected GenMD4 tensors {:?}",
                    map.keys().collect::<Vec<_>>()
                ),
            });
        }
        Ok(())
    }
}
