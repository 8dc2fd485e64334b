//! [`Trainer`]: one MD4 training step at a time (spec §8, paper Alg. 1) — sample antithetic t and
//! x_t ~ q(x_t | x_0), forward with the gradient tape, per-sequence loss, backward (accumulated
//! over micro-batches), NaN/Inf check, global-norm clipping, AdamW at the scheduled learning
//! rate, EMA. Every random draw of step k comes from an RNG seeded by (seed, k), so the RNG
//! state is just the step counter and a resumed run continues bit for bit.

use super::{ema_update, AdamW, GenMd4State, Objective, TrainConfig};
use crate::{Kernels, Md4Transformer, NetworkConfig, NetworkDenoiser, NetworkError};
use dfdx::prelude::*;
use maskdiff_objective::tensor::{md4_recon_constant, MaskedBatch};
use maskdiff_process::DenoiseBatch;
use maskdiff_schedule::{AnySchedule, Shifted};
use rand::{rngs::StdRng, Rng, SeedableRng};

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
    /// NELBO estimate: diffusion loss + the constant reconstruction term (spec §3.3).
    pub loss: f64,
    pub diffusion: f64,
    /// `loss / (len · ln 2)`.
    pub bits_per_token: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub clipped: bool,
    pub lr: f64,
    /// Fraction of positions that were masked.
    pub masked_fraction: f64,
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

/// Model, EMA model, optimizer state and progress of one training run.
#[derive(Debug, Clone)]
pub struct Trainer<D: Kernels<f32>> {
    pub(crate) net_cfg: NetworkConfig,
    pub(crate) train_cfg: TrainConfig,
    pub(crate) seed: u64,
    pub(crate) step: u64,
    pub(crate) model: Md4Transformer<f32, D>,
    pub(crate) ema: Md4Transformer<f32, D>,
    pub(crate) opt: AdamW<D>,
    pub(crate) schedule: Shifted<AnySchedule>,
    pub(crate) extra: serde_json::Value,
    /// GenMD4's learnable exponents (`None` for MD4).
    pub(crate) genmd4: Option<GenMd4State<D>>,
}

impl<D: Kernels<f32>> Trainer<D> {
    /// A fresh run: model initialised from `seed`, EMA = initial parameters, zero moments.
    pub fn new(
        net_cfg: NetworkConfig,
        train_cfg: TrainConfig,
        seed: u64,
        dev: &D,
    ) -> Result<Self, NetworkError> {
        train_cfg.validate()?;
        let model = Md4Transformer::new(net_cfg.clone(), dev, seed)?;
        let opt = AdamW::new(train_cfg.adamw, model.params())?;
        let schedule = train_cfg.schedule.build()?;
        let genmd4 = match train_cfg.objective {
            Objective::GenMd4 { .. } => {
                Some(GenMd4State::new(net_cfg.vocab_size, train_cfg.adamw, dev)?)
            }
            Objective::Md4 => None,
        };
        Ok(Trainer {
            genmd4,
            ema: model.clone(),
            model,
            opt,
            schedule,
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
    pub fn model(&self) -> &Md4Transformer<f32, D> {
        &self.model
    }
    /// Mutable access to the live model (e.g. to import weights before training).
    pub fn model_mut(&mut self) -> &mut Md4Transformer<f32, D> {
        &mut self.model
    }
    pub fn ema_model(&self) -> &Md4Transformer<f32, D> {
        &self.ema
    }
    pub fn optimizer(&self) -> &AdamW<D> {
        &self.opt
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
    /// The masking schedule in use (ε-shifted); GenMD4 ignores it (see
    /// [`Trainer::genmd4_schedule`]).
    pub fn schedule(&self) -> &Shifted<AnySchedule> {
        &self.schedule
    }

    fn masked(&self, b: &TrainBatch<'_>, rng: &mut StdRng) -> Result<MaskedBatch, NetworkError> {
        MaskedBatch::sample(
            b.x0,
            b.batch,
            b.len,
            self.net_cfg.vocab_size,
            &self.schedule,
            self.train_cfg.time_sampling,
            rng,
        )
        .map_err(|e| NetworkError::Objective(e.to_string()))
    }

    /// One optimizer step on `batch`. On a non-finite loss or gradient nothing is updated and
    /// [`NetworkError::NonFinite`] is returned.
    pub fn step(&mut self, batch: &TrainBatch<'_>) -> Result<StepStats, NetworkError> {
        if let Objective::GenMd4 { .. } = self.train_cfg.objective {
            return self.genmd4_step(batch);
        }
        let mut rng = StdRng::seed_from_u64(mix(self.seed, self.step, 0));
        let masked = self.masked(batch, &mut rng)?;
        let (bsz, len) = (batch.batch, batch.len);
        let k = self.train_cfg.micro_batches;
        if k > bsz {
            return Err(NetworkError::TrainConfig(format!(
                "{k} micro-batches for a batch of {bsz}"
            )));
        }
        let inv_b = 1.0 / bsz as f32;
        let mut acc: Option<Vec<Tensor<(usize,), f32, D>>> = None;
        let mut diffusion = 0.0f64;
        for j in 0..k {
            let (lo, hi) = (j * bsz / k, (j + 1) * bsz / k);
            let mb = if k == 1 {
                masked.clone()
            } else {
                let r = lo * len..hi * len;
                MaskedBatch::new(
                    masked.x0[r.clone()].to_vec(),
                    masked.xt[r].to_vec(),
                    hi - lo,
                    len,
                    masked.vocab,
                    masked.t[lo..hi].to_vec(),
                    masked.weight[lo..hi].to_vec(),
                )
                .map_err(|e| NetworkError::Objective(e.to_string()))?
            };
            let labels = batch.labels.map(|l| &l[lo..hi]);
            let input = DenoiseBatch {
                ids: &mb.xt,
                batch: hi - lo,
                len,
                t: &mb.t,
                labels,
            };
            let logits = self
                .model
                .forward(&input, self.model.tape(), Some(&mut rng))?;
            let per_seq = self.train_cfg.objective.loss(logits, &mb)?;
            let vals = per_seq.as_vec();
            let sum: f64 = vals.iter().map(|&x| x as f64).sum();
            if !sum.is_finite() {
                return Err(NetworkError::NonFinite {
                    what: "loss",
                    step: self.step,
                    value: sum,
                });
            }
            diffusion += sum;
            let grads = per_seq
                .try_sum::<Rank0, _>()
                .and_then(|s| s.try_mul(inv_b))
                .and_then(|s| s.try_backward())
                .map_err(NetworkError::device)?;
            let g: Vec<_> = self
                .model
                .params()
                .iter()
                .map(|p| grads.get(&p.value))
                .collect();
            acc = Some(match acc {
                None => g,
                Some(a) => a.into_iter().zip(g).map(|(a, g)| a + g).collect(),
            });
        }
        let grads = acc.expect("at least one micro-batch");
        let grad_norm = global_norm(&grads)?;
        if !grad_norm.is_finite() {
            return Err(NetworkError::NonFinite {
                what: "gradient norm",
                step: self.step,
                value: grad_norm,
            });
        }
        let clip = self.train_cfg.grad_clip;
        let clipped = clip > 0.0 && grad_norm > clip;
        let lr = self.train_cfg.lr.lr(self.step);
        let scale = clipped.then(|| clip / grad_norm);
        self.opt
            .update(self.model.params_mut(), &grads, lr, scale)?;
        ema_update(&mut self.ema, &self.model, self.train_cfg.ema_decay)?;
        let diffusion = diffusion / bsz as f64;
        let loss = diffusion + self.recon(len);
        let masked_count: usize = masked.masked_counts().iter().sum();
        let stats = StepStats {
            step: self.step,
            loss,
            diffusion,
            bits_per_token: loss / (len as f64 * std::f64::consts::LN_2),
            grad_norm,
            clipped,
            lr,
            masked_fraction: masked_count as f64 / (bsz * len) as f64,
        };
        self.step += 1;
        Ok(stats)
    }

    /// The constant reconstruction term N·(1 − α̃_0)·log V (spec §3.3).
    pub fn recon(&self, len: usize) -> f64 {
        md4_recon_constant(&self.schedule, len, self.net_cfg.vocab_size)
    }

    /// Per-sequence NELBO estimates in nats (diffusion + reconstruction; one t and one x_t per
    /// sequence, times from the configured sampler), with the EMA (`use_ema`) or live weights,
    /// no dropout. Divide by `len · ln 2` for bits per token. GenMD4: t on [t1, 1) and the
    /// reconstruction at t1 with the live or EMA exponents (spec §5.4).
    pub fn eval_loss<R: Rng>(
        &self,
        batch: &TrainBatch<'_>,
        rng: &mut R,
        use_ema: bool,
    ) -> Result<Vec<f64>, NetworkError> {
        if let Objective::GenMd4 { .. } = self.train_cfg.objective {
            return self.genmd4_eval_loss(batch, rng, use_ema);
        }
        let mut r = StdRng::seed_from_u64(rng.gen());
        let masked = self.masked(batch, &mut r)?;
        let model = if use_ema { &self.ema } else { &self.model };
        let input = DenoiseBatch {
            ids: &masked.xt,
            batch: batch.batch,
            len: batch.len,
            t: &masked.t,
            labels: batch.labels,
        };
        let logits = model.forward(&input, NoneTape, None)?;
        let per_seq = self.train_cfg.objective.loss(logits, &masked)?;
        let recon = self.recon(batch.len);
        Ok(per_seq
            .as_vec()
            .into_iter()
            .map(|x| x as f64 + recon)
            .collect())
    }
}

/// sqrt(Σ g²) over all gradients, accumulated in f64.
pub fn global_norm<D: Kernels<f32>>(
    grads: &[Tensor<(usize,), f32, D>],
) -> Result<f64, NetworkError> {
    let mut s = 0.0f64;
    for g in grads {
        s += D::sum_squares(g).map_err(NetworkError::device)?;
    }
    Ok(s.sqrt())
}
