//! [`Trainer`]: one optimizer step at a time for any [`Objective`] (spec §8, paper Alg. 1). A
//! step reads top to bottom:
//!
//! 1. the clean batch is checked once ([`CleanBatch`]) and noised by the objective (t, x_t);
//! 2. per micro-batch: the objective runs the network with the tape and returns the weighted
//!    loss; backward; the network's and the objective's parameter gradients are accumulated;
//! 3. NaN/Inf checks, global-norm clipping (network only; the threshold bounds the norm of the
//!    gradient of the bits-per-token loss, as the official `clip`, see [`crate::ClipLoss`]),
//!    AdamW at the scheduled learning rate
//!    for the network and the objective's parameters (the latter on a copy first, checked),
//!    EMA of both.
//!
//! Every random draw of step k comes from an RNG seeded by (seed, k), so the RNG state is just
//! the step counter and a resumed run continues bit for bit. With more than one micro-batch,
//! each micro-batch's own draws (dropout) come from a stream of its own, so they do not depend
//! on the micro-batches before it or on which data-parallel rank runs it
//! ([`Trainer::step_on`], [`crate::Collective`]).

use crate::{ema_tensors, ema_update, AdamW, Collective, SingleProcess, TrainConfig, TrainError};
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{Kernels, Md4Transformer, Network, NetworkConfig, NetworkDenoiser};
use maskdiff_objective::{
    CleanBatch, Flat, Logits, LogitsNet, MicroLoss, Noised, Objective, ObjectiveSettings,
    RowLogits, Share,
};
use maskdiff_process::DenoiseBatch;
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// A batch of clean training sequences, row-major `[batch, len]`, ids in `0..V`.
#[derive(Debug, Clone, Copy)]
pub struct TrainBatch<'a> {
    pub x0: &'a [u32],
    pub batch: usize,
    pub len: usize,
    /// One class label per sequence for class-conditional models.
    pub labels: Option<&'a [u32]>,
}

/// What one step did. Losses are batch means in nats per sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Index of the step just taken (0-based); `Trainer::step_count()` is now `step + 1`.
    pub step: u64,
    /// NELBO estimate: diffusion loss + the reconstruction term (spec §3.3). With clipped mask
    /// rates ([`TrainConfig::mask_rate`], BD3-LM §5) the diffusion part is the clipped
    /// objective `L_[β,ω]` instead, which is not a bound: the "clipped loss".
    pub loss: f64,
    pub diffusion: f64,
    /// `loss / (len · ln 2)`.
    pub bits_per_token: f64,
    /// Global norm of the network's gradient before clipping, on the scale of the clip
    /// threshold (`TrainConfig::clip_loss`; for new configs the gradient of the bits-per-token
    /// loss, i.e. the nats-per-sequence gradient divided by `len · ln 2`).
    pub grad_norm: f64,
    pub clipped: bool,
    pub lr: f64,
    /// Fraction of positions that were masked.
    pub masked_fraction: f64,
}

/// The gradients a step applies, before clipping: the network's (in `params()` order, times
/// the objective's network factor) and the objective's parameters', with the noised batch and
/// each micro-batch's numbers.
#[derive(Debug, Clone)]
pub struct StepGradients<D: Kernels<f32>, O: Objective<D>> {
    pub network: Vec<Flat<D>>,
    pub objective: Vec<Flat<D>>,
    pub noised: O::Noised,
    pub stats: Vec<O::Stats>,
}

/// Accumulated gradients: the network's and the objective's parameters'.
type NetAndObjective<D> = (Vec<Flat<D>>, Vec<Flat<D>>);

/// What a rank sends after its micro-batches: their numbers (a non-finite one last) and the
/// error that stopped it, if any. `T` is `&[Stats]` to send and `Vec<Stats>` to receive.
#[derive(Serialize, Deserialize)]
struct RankOutcome<T> {
    stats: T,
    error: Option<String>,
}

/// Sum the ranks' gradients (the network's, then the objective's) in place: on the device where
/// the collective can (even with one rank, so that a one-rank run exercises it), else in one
/// host buffer (skipped with one rank).
fn all_reduce<D: Kernels<f32>>(
    comm: &dyn Collective,
    network: &mut [Flat<D>],
    objective: &mut [Flat<D>],
) -> Result<(), TrainError> {
    // On the device where the engine can (NCCL on CUDA): one list, then split back.
    let mut all: Vec<Flat<D>> = network.iter().chain(objective.iter()).cloned().collect();
    if let Some(r) = comm.all_reduce_device(&mut all) {
        r?;
        let (net, obj) = all.split_at(network.len());
        network.clone_from_slice(net);
        objective.clone_from_slice(obj);
        return Ok(());
    }
    if comm.size() == 1 {
        return Ok(());
    }
    let n: usize = network
        .iter()
        .chain(objective.iter())
        .map(|t| t.shape().0)
        .sum();
    let mut buf = Vec::with_capacity(n);
    for t in network.iter().chain(objective.iter()) {
        buf.extend(t.as_vec());
    }
    comm.all_reduce_sum(&mut buf)?;
    let mut at = 0;
    for t in network.iter_mut().chain(objective.iter_mut()) {
        let len = t.shape().0;
        *t = t
            .device()
            .try_tensor_from_vec(buf[at..at + len].to_vec(), (len,))
            .map_err(TrainError::device)?;
        at += len;
    }
    Ok(())
}

/// SplitMix64 finaliser: decorrelates (seed, step, stream) into an RNG seed.
pub(crate) fn mix(seed: u64, step: u64, stream: u64) -> u64 {
    let mut z = seed
        ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A model as the objective's [`LogitsNet`]: a [`Network`] (what the trainer holds) or a bare
/// [`Md4Transformer`].
pub struct ModelNet<'a, M>(pub &'a M);

macro_rules! logits_net {
    ($model:ident) => {
        impl<D: Kernels<f32>> LogitsNet<D> for ModelNet<'_, $model<f32, D>> {
            type Error = TrainError;
            fn logits<T: Tape<f32, D>>(
                &self,
                input: &DenoiseBatch<'_>,
                tape: T,
                dropout: Option<&mut StdRng>,
            ) -> Result<Logits<D, T>, TrainError> {
                Ok(self
                    .0
                    .forward(input, tape, dropout.map(|r| r as &mut dyn RngCore))?)
            }
            fn logits_at<T: Tape<f32, D>>(
                &self,
                input: &DenoiseBatch<'_>,
                tape: T,
                dropout: Option<&mut StdRng>,
                rows: &[usize],
            ) -> Result<RowLogits<D, T>, TrainError> {
                let dropout = dropout.map(|r| r as &mut dyn RngCore);
                Ok(self.0.forward_at(input, tape, dropout, rows)?)
            }
            fn is_time_conditioned(&self) -> bool {
                self.0.config().time_conditioning
            }
        }
    };
}
logits_net!(Network);
logits_net!(Md4Transformer);

/// Model, EMA model, objective (with its parameters and their EMA), optimizer state and
/// progress of one training run.
#[derive(Debug, Clone)]
pub struct Trainer<D: Kernels<f32>, O: Objective<D>> {
    pub(crate) net_cfg: NetworkConfig,
    pub(crate) train_cfg: TrainConfig,
    pub(crate) seed: u64,
    pub(crate) step: u64,
    pub(crate) model: Network<f32, D>,
    pub(crate) ema: Network<f32, D>,
    pub(crate) opt: AdamW<D>,
    pub(crate) objective: O,
    pub(crate) ema_objective: O,
    /// AdamW of the objective's parameters (same settings, same update count as `opt`).
    pub(crate) objective_opt: AdamW<D>,
    pub(crate) last_report: Option<O::Report>,
    pub(crate) extra: serde_json::Value,
}

impl<D: Kernels<f32>, O: Objective<D>> Trainer<D, O> {
    /// A fresh run: model initialised from `seed`, EMA = initial parameters, zero moments; the
    /// objective built from `train_cfg` (an error if it names another objective than `O`).
    pub fn new(
        net_cfg: NetworkConfig,
        train_cfg: TrainConfig,
        seed: u64,
        dev: &D,
    ) -> Result<Self, TrainError> {
        train_cfg.validate()?;
        let model = Network::new(net_cfg.clone(), dev, seed)?;
        let opt = AdamW::new(train_cfg.adamw, model.params().iter().map(|p| &p.value))?;
        let objective = O::from_settings(&settings(&train_cfg, net_cfg.vocab_size), dev)?;
        if objective.needs_time_free_network() && net_cfg.time_conditioning {
            return Err(maskdiff_objective::ObjectiveError::PerBlockTimeNeedsTimeFree.into());
        }
        let objective_opt = AdamW::new(
            train_cfg.adamw,
            objective.params().into_iter().map(|(_, t)| t),
        )?;
        Ok(Trainer {
            ema: model.clone(),
            model,
            opt,
            ema_objective: objective.clone(),
            objective,
            objective_opt,
            last_report: None,
            net_cfg,
            train_cfg,
            seed,
            step: 0,
            extra: serde_json::Value::Null,
        })
    }

    pub fn network_config(&self) -> &NetworkConfig {
        &self.net_cfg
    }
    pub fn train_config(&self) -> &TrainConfig {
        &self.train_cfg
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Number of steps taken so far (= index of the next step).
    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn model(&self) -> &Network<f32, D> {
        &self.model
    }
    /// Mutable access to the live model (e.g. to import weights before training).
    pub fn model_mut(&mut self) -> &mut Network<f32, D> {
        &mut self.model
    }
    pub fn ema_model(&self) -> &Network<f32, D> {
        &self.ema
    }
    pub fn optimizer(&self) -> &AdamW<D> {
        &self.opt
    }
    /// The AdamW state of the objective's parameters.
    pub fn objective_optimizer(&self) -> &AdamW<D> {
        &self.objective_opt
    }
    /// The live objective (with its learned parameters).
    pub fn objective(&self) -> &O {
        &self.objective
    }
    /// Mutable access to the live objective; [`Trainer::sync_ema_objective`] copies it to the
    /// EMA.
    pub fn objective_mut(&mut self) -> &mut O {
        &mut self.objective
    }
    /// The objective with the EMA of its parameters.
    pub fn ema_objective(&self) -> &O {
        &self.ema_objective
    }
    /// Set the EMA objective to the live one (e.g. after fixing its parameters by hand).
    pub fn sync_ema_objective(&mut self) {
        self.ema_objective = self.objective.clone();
    }
    /// Train on the clipped mask rates `clip` from the next step on (BD3-LM's adaptive search
    /// re-chooses them at each validation), live and EMA objective alike. The run's
    /// [`TrainConfig::mask_rate`] keeps the interval it started with; a caller that changes it
    /// saves the current one with its own state ([`Trainer::set_extra`]) and sets it again after
    /// [`Trainer::resume`], so a resumed run continues bit for bit.
    pub fn set_mask_rate(
        &mut self,
        clip: Option<maskdiff_schedule::MaskRate>,
    ) -> Result<(), TrainError> {
        self.objective.set_mask_rate(clip)?;
        self.ema_objective.set_mask_rate(clip)?;
        Ok(())
    }
    /// The objective's report of the last step, if any.
    pub fn last_report(&self) -> Option<&O::Report> {
        self.last_report.as_ref()
    }
    /// The EMA parameters as a `Denoiser` for sampling and evaluation (shares storage).
    pub fn ema_denoiser(&self) -> NetworkDenoiser<f32, D> {
        NetworkDenoiser::new(self.ema.clone())
    }
    /// Opaque caller state saved in the manifest (data position, CLI RNG, ...).
    pub fn extra(&self) -> &serde_json::Value {
        &self.extra
    }
    pub fn set_extra(&mut self, extra: serde_json::Value) {
        self.extra = extra;
    }

    fn clean<'a>(&self, b: &TrainBatch<'a>) -> Result<CleanBatch<'a>, TrainError> {
        Ok(CleanBatch::new(
            b.x0,
            b.batch,
            b.len,
            self.net_cfg.vocab_size,
            b.labels,
        )?)
    }

    /// The noised batch the next [`Trainer::step`] will draw for `batch` (it comes first from
    /// the step's RNG), for tests and diagnostics.
    pub fn next_noised(&self, batch: &TrainBatch<'_>) -> Result<O::Noised, TrainError> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, self.step, 0));
        Ok(self.objective.noise(&self.clean(batch)?, &mut rng)?)
    }

    /// The gradients the next [`Trainer::step`] would apply (same RNG draws: times, masks,
    /// dropout), before clipping, without changing anything.
    pub fn gradients(&self, batch: &TrainBatch<'_>) -> Result<StepGradients<D, O>, TrainError> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, self.step, 0));
        self.gradients_with(batch, &mut rng)
    }

    /// Like [`Trainer::gradients`] with the times, masks and dropout drawn from `rng` (e.g. to
    /// average the gradient estimator over independent draws at fixed parameters).
    pub fn gradients_with(
        &self,
        batch: &TrainBatch<'_>,
        rng: &mut StdRng,
    ) -> Result<StepGradients<D, O>, TrainError> {
        self.gradients_on(batch, rng, &SingleProcess)
    }

    /// [`Trainer::gradients_with`] shared by the ranks of `comm`: every rank draws the same
    /// noise for the whole `batch` and runs its share of the `micro_batches` (which the number
    /// of ranks must divide); the gradients are all-reduced and the micro-batches' numbers
    /// all-gathered, so every rank returns the same as one process would (bit for bit where
    /// the summation order allows: see [`crate::collective`]). A failure on any rank is an
    /// error on every rank.
    pub fn gradients_on(
        &self,
        batch: &TrainBatch<'_>,
        rng: &mut StdRng,
        comm: &dyn Collective,
    ) -> Result<StepGradients<D, O>, TrainError> {
        let clean = self.clean(batch)?;
        let noised = self.objective.noise(&clean, rng)?;
        let total = batch.batch;
        let k = self.train_cfg.micro_batches;
        if k > total {
            return Err(TrainError::Config(format!(
                "{k} micro-batches for a batch of {total}"
            )));
        }
        let (ranks, rank) = (comm.size(), comm.rank());
        if !k.is_multiple_of(ranks) {
            return Err(TrainError::Config(format!(
                "{k} micro-batches (grad_accum) cannot be shared by {ranks} ranks: use a \
                 multiple of {ranks}"
            )));
        }
        // k > 1: micro-batch j draws from its own stream (see the module docs).
        let streams: Option<u64> = (k > 1).then(|| rng.gen());
        let net = ModelNet(&self.model);
        let net_scale = self.objective.network_grad_scale();
        let mut acc: Option<NetAndObjective<D>> = None;
        let mut stats = Vec::with_capacity(k);
        let mine = rank * k / ranks..(rank + 1) * k / ranks;
        let mut failed: Option<TrainError> = None;
        for j in mine {
            let mut own;
            let rng: &mut StdRng = match streams {
                None => &mut *rng,
                Some(base) => {
                    own = StdRng::seed_from_u64(mix(base, j as u64, 1));
                    &mut own
                }
            };
            let (lo, hi) = (j * total / k, (j + 1) * total / k);
            let mb = if k == 1 {
                noised.clone()
            } else {
                noised.slice(lo, hi)?
            };
            let labels = clean.labels().map(|l| &l[lo..hi]);
            let share = Share { lo, hi, total };
            let MicroLoss { scalar, stats: s } =
                match self.objective.loss(&net, &mb, labels, share, rng) {
                    Ok(l) => l,
                    Err(e) if ranks > 1 => {
                        failed = Some(e);
                        break;
                    }
                    Err(e) => return Err(e),
                };
            if let Err((what, value)) = self.objective.check_finite(&s) {
                if ranks > 1 {
                    // Reported below, on every rank, in the micro-batches' order.
                    stats.push(s);
                    break;
                }
                return Err(TrainError::NonFinite {
                    what,
                    step: self.step,
                    value,
                });
            }
            let grads = match scalar.try_backward() {
                Ok(g) => g,
                Err(e) if ranks > 1 => {
                    failed = Some(TrainError::device(e));
                    break;
                }
                Err(e) => return Err(TrainError::device(e)),
            };
            let g: Vec<Flat<D>> = self
                .model
                .params()
                .iter()
                .map(|p| match net_scale {
                    Some(c) => grads.get(&p.value) * c,
                    None => grads.get(&p.value),
                })
                .collect();
            let go: Vec<Flat<D>> = self
                .objective
                .params()
                .into_iter()
                .map(|(_, t)| grads.get(t))
                .collect();
            acc = Some(match acc {
                None => (g, go),
                Some((a, ao)) => (
                    a.into_iter().zip(g).map(|(a, g)| a + g).collect(),
                    ao.into_iter().zip(go).map(|(a, g)| a + g).collect(),
                ),
            });
            stats.push(s);
        }
        if ranks > 1 {
            stats = self.gather_stats(comm, stats, failed)?;
        }
        let (mut network, mut objective) = acc.expect("at least one micro-batch");
        all_reduce(comm, &mut network, &mut objective)?;
        Ok(StepGradients {
            network,
            objective,
            noised,
            stats,
        })
    }

    /// Every rank's micro-batch numbers in the global order, or the first failure (in that
    /// order) as the same error on every rank (the failing rank keeps its own error).
    fn gather_stats(
        &self,
        comm: &dyn Collective,
        stats: Vec<O::Stats>,
        failed: Option<TrainError>,
    ) -> Result<Vec<O::Stats>, TrainError> {
        let rank = comm.rank();
        let bytes = postcard::to_allocvec(&RankOutcome {
            stats: &stats[..],
            error: failed.as_ref().map(|e| e.to_string()),
        })
        .map_err(|e| TrainError::Collective(format!("encoding micro-batch numbers: {e}")))?;
        let gathered = comm.all_gather(&bytes)?;
        let (mut local_stats, mut local_failed) = (Some(stats), failed);
        let mut all = Vec::new();
        for (q, b) in gathered.iter().enumerate() {
            let (theirs, error) = if q == rank {
                (local_stats.take().unwrap_or_default(), None)
            } else {
                let o: RankOutcome<Vec<O::Stats>> = postcard::from_bytes(b).map_err(|e| {
                    TrainError::Collective(format!("rank {q} sent unreadable numbers: {e}"))
                })?;
                (o.stats, o.error)
            };
            for s in theirs {
                if let Err((what, value)) = self.objective.check_finite(&s) {
                    return Err(self.non_finite(what, value));
                }
                all.push(s);
            }
            if q == rank {
                if let Some(e) = local_failed.take() {
                    return Err(e);
                }
            } else if let Some(msg) = error {
                return Err(TrainError::Collective(format!("rank {q} failed: {msg}")));
            }
        }
        Ok(all)
    }

    /// One optimizer step on `batch`. On a non-finite loss, gradient or updated objective
    /// parameter nothing is updated and [`TrainError::NonFinite`] is returned.
    pub fn step(&mut self, batch: &TrainBatch<'_>) -> Result<StepStats, TrainError> {
        self.step_on(batch, &SingleProcess)
    }

    /// [`Trainer::step`] as one rank of a data-parallel run over `comm` (see
    /// [`Trainer::gradients_on`]): every rank applies the same update, so the ranks' states stay
    /// equal (check with [`Trainer::check_in_sync`]).
    pub fn step_on(
        &mut self,
        batch: &TrainBatch<'_>,
        comm: &dyn Collective,
    ) -> Result<StepStats, TrainError> {
        let mut rng = StdRng::seed_from_u64(mix(self.seed, self.step, 0));
        let StepGradients {
            network: grads,
            objective: obj_grads,
            noised,
            stats,
        } = self.gradients_on(batch, &mut rng, comm)?;
        // Clipping applies to the network's gradient norm only (for GenMD4 see its docs). The
        // gradients are those of the batch mean of per-sequence nats (micro-batches weighted
        // by their share, GenMD4's network factor applied); the threshold is on the scale of
        // `clip_loss`, by default bits per token = nats per sequence / (len · ln 2).
        let nats_norm = global_norm(&grads)?;
        if !nats_norm.is_finite() {
            return Err(self.non_finite("gradient norm", nats_norm));
        }
        let grad_norm = nats_norm * self.train_cfg.clip_loss.per_nats(batch.len);
        for g in &obj_grads {
            let n = global_norm(std::slice::from_ref(g))?;
            if !n.is_finite() {
                return Err(self.non_finite("objective parameter gradient", n));
            }
        }
        let clip = self.train_cfg.grad_clip;
        let clipped = clip > 0.0 && grad_norm > clip;
        let scale = clipped.then(|| clip / grad_norm);
        let lr = self.train_cfg.lr.lr(self.step);
        let decay = self.train_cfg.ema_decay;
        // The objective's parameters on a copy first: a failure leaves the run unchanged.
        let (mut objective, mut objective_opt) =
            (self.objective.clone(), self.objective_opt.clone());
        objective_opt.update(objective.params_mut(), &obj_grads, lr, None)?;
        if let Err((what, value)) = objective.check_params() {
            return Err(self.non_finite(what, value));
        }
        self.opt.update(
            self.model.params_mut().iter_mut().map(|p| &mut p.value),
            &grads,
            lr,
            scale,
        )?;
        ema_update(&mut self.ema, &self.model, decay)?;
        ema_tensors(
            self.ema_objective.params_mut(),
            objective.params().into_iter().map(|(_, t)| t),
            decay,
        )?;
        self.objective = objective;
        self.objective_opt = objective_opt;
        self.last_report = Some(self.objective.report(&stats, &obj_grads));
        let losses = self.objective.summarize(&stats);
        let stats = StepStats {
            step: self.step,
            loss: losses.nelbo,
            diffusion: losses.diffusion,
            bits_per_token: losses.nelbo / (batch.len as f64 * std::f64::consts::LN_2),
            grad_norm,
            clipped,
            lr,
            masked_fraction: noised.masked_fraction(),
        };
        self.step += 1;
        Ok(stats)
    }

    fn non_finite(&self, what: &'static str, value: f64) -> TrainError {
        TrainError::NonFinite {
            what,
            step: self.step,
            value,
        }
    }

    /// Per-sequence NELBO estimates in nats (one t and one x_t per sequence, the objective's
    /// validation loss), with the EMA (`use_ema`: the EMA network and the EMA of the objective's
    /// parameters) or live weights, no dropout. Divide by `len · ln 2` for bits per token.
    pub fn eval_loss<R: Rng>(
        &self,
        batch: &TrainBatch<'_>,
        rng: &mut R,
        use_ema: bool,
    ) -> Result<Vec<f64>, TrainError> {
        let mut r = StdRng::seed_from_u64(rng.gen());
        let clean = self.clean(batch)?;
        let (model, objective) = if use_ema {
            (&self.ema, &self.ema_objective)
        } else {
            (&self.model, &self.objective)
        };
        objective.eval_nelbo(&ModelNet(model), &clean, &mut r)
    }
}

/// The objective's settings of a run.
pub(crate) fn settings(cfg: &TrainConfig, vocab: usize) -> ObjectiveSettings<'_> {
    ObjectiveSettings {
        spec: &cfg.objective,
        schedule: &cfg.schedule,
        time_sampling: cfg.time_sampling,
        vocab,
        mask_rate: cfg.mask_rate,
    }
}

/// sqrt(Σ g²) over all gradients, accumulated in f64.
pub fn global_norm<D: Kernels<f32>>(grads: &[Flat<D>]) -> Result<f64, TrainError> {
    let mut s = 0.0f64;
    for g in grads {
        s += D::sum_squares(g).map_err(TrainError::device)?;
    }
    Ok(s.sqrt())
}
