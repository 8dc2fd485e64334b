//! AdamW with decoupled weight decay (Loshchilov & Hutter), as optax `adamw` used by the official
//! code (spec §8): m ← β1 m + (1−β1) g, v ← β2 v + (1−β2) g², m̂ = m/(1−β1^k), v̂ = v/(1−β2^k),
//! θ ← θ − lr·(m̂/(√v̂ + ε) + wd·θ), k = number of updates so far including this one. Its moments
//! are ordinary named tensors so they can be checkpointed (dfdx's Adam state is private).

use crate::TrainError;
use maskdiff_network::dfdx::prelude::*;
use maskdiff_network::{AdamWStep, Kernels};
use maskdiff_objective::Flat;
use serde::{Deserialize, Serialize};

/// Optimizer hyper-parameters (the learning rate comes from [`super::LrSchedule`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The text configs: β = (0.9, 0.999), ε = 1e−8, weight decay 0.03 (paper App. J).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.03,
        }
    }
}

impl AdamWConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        let ok_beta = |b: f64| b.is_finite() && (0.0..1.0).contains(&b);
        if !ok_beta(self.beta1) || !ok_beta(self.beta2) {
            return Err(TrainError::Config(format!(
                "betas ({}, {}) must be in [0, 1)",
                self.beta1, self.beta2
            )));
        }
        let eps_ok = self.eps.is_finite() && self.eps > 0.0;
        let wd_ok = self.weight_decay.is_finite() && self.weight_decay >= 0.0;
        if !(eps_ok && wd_ok) {
            return Err(TrainError::Config(
                "eps must be > 0 and weight_decay >= 0".into(),
            ));
        }
        Ok(())
    }
}

/// AdamW state: first and second moments per parameter, and the update count.
#[derive(Debug, Clone)]
pub struct AdamW<D: Device<f32>> {
    pub cfg: AdamWConfig,
    /// Number of updates applied so far.
    pub count: u64,
    pub m: Vec<Tensor<(usize,), f32, D>>,
    pub v: Vec<Tensor<(usize,), f32, D>>,
}

impl<D: Device<f32>> AdamW<D> {
    /// Zero moments shaped like `params`.
    pub fn new<'a>(
        cfg: AdamWConfig,
        params: impl IntoIterator<Item = &'a Flat<D>>,
    ) -> Result<Self, TrainError>
    where
        D: 'a,
    {
        cfg.validate()?;
        let zeros = |p: &Flat<D>| {
            p.device()
                .try_zeros_like(p.shape())
                .map_err(TrainError::device)
        };
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for p in params {
            m.push(zeros(p)?);
            v.push(zeros(p)?);
        }
        Ok(AdamW {
            cfg,
            count: 0,
            m,
            v,
        })
    }
}

impl<D: Kernels<f32>> AdamW<D> {
    /// One update of every parameter with its gradient at learning rate `lr`, the gradients
    /// first multiplied by `grad_scale` if given (global-norm clipping). One fused pass per
    /// parameter on the CPU ([`Kernels::adamw`]).
    pub fn update<'a>(
        &mut self,
        params: impl IntoIterator<Item = &'a mut Flat<D>>,
        grads: &[Flat<D>],
        lr: f64,
        grad_scale: Option<f64>,
    ) -> Result<(), TrainError>
    where
        D: 'a,
    {
        let mut params: Vec<&mut Flat<D>> = params.into_iter().collect();
        if params.len() != grads.len() || params.len() != self.m.len() {
            return Err(TrainError::Input(format!(
                "{} params, {} grads, {} moments",
                params.len(),
                grads.len(),
                self.m.len()
            )));
        }
        if !lr.is_finite() || grad_scale.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
            return Err(TrainError::Input(format!(
                "learning rate {lr} and gradient scale {grad_scale:?} must be finite (scale > 0)"
            )));
        }
        let len = |t: &Flat<D>| t.shape().0;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let n = len(p);
            if len(g) != n || len(&self.m[i]) != n || len(&self.v[i]) != n {
                return Err(TrainError::Input(format!(
                    "parameter {i} has {n} values but its gradient {} and moments {}/{}",
                    len(g),
                    len(&self.m[i]),
                    len(&self.v[i])
                )));
            }
        }
        self.count += 1;
        let k = self.count as i32;
        let c = &self.cfg;
        let step = AdamWStep {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bias_correction1: 1.0 - c.beta1.powi(k),
            bias_correction2: 1.0 - c.beta2.powi(k),
            grad_scale,
        };
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let (p2, m2, v2) =
                D::adamw(p, g, &self.m[i], &self.v[i], &step).map_err(TrainError::device)?;
            **p = p2;
            self.m[i] = m2;
            self.v[i] = v2;
        }
        Ok(())
    }
}
