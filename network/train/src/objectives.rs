//! Conveniences on a [`Trainer`] of a known objective: MD4's schedule and reconstruction
//! constant; for [`GenMd4`] (paper §6; spec §5) the
//! learned exponents and schedule of the live or EMA parameters, setting them by hand, and the
//! loss of a given two-mask batch. Everything else (the step, the gradients, checkpoints) is the
//! generic trainer's.

use crate::{ModelNet, StepGradients, TrainBatch, TrainError, Trainer};
use maskdiff_network::dfdx::prelude::NoneTape;
use maskdiff_network::Kernels;
use maskdiff_objective::tensor::{GenMd4Batch, GenMd4Loss};
use maskdiff_objective::{Flat, GenMd4, Md4};
use maskdiff_schedule::{AnySchedule, PerTokenPolynomial, Shifted};

impl<D: Kernels<f32>> Trainer<D, Md4> {
    /// The masking schedule in use (ε-shifted).
    pub fn schedule(&self) -> &Shifted<AnySchedule> {
        self.objective.schedule()
    }
    /// The constant reconstruction term N·(1 − α̃_0)·log V (spec §3.3).
    pub fn recon(&self, len: usize) -> f64 {
        self.objective.recon(len)
    }
}

/// The gradients of one GenMD4 step before clipping (see [`Trainer::genmd4_gradients`]).
#[derive(Debug, Clone)]
pub struct GenMd4Gradients<D: Kernels<f32>> {
    /// d surrogate / d network parameter, in `params()` order (one-sample: d mean_b L1).
    pub network: Vec<Flat<D>>,
    /// d surrogate / d θ (pathwise + RLOO score-function + reconstruction).
    pub theta: Flat<D>,
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

impl<D: Kernels<f32>> Trainer<D, GenMd4<D>> {
    /// The gradients the next step would apply, in GenMD4's terms (see
    /// [`Trainer::gradients`]).
    pub fn genmd4_gradients(
        &self,
        batch: &TrainBatch<'_>,
    ) -> Result<GenMd4Gradients<D>, TrainError> {
        let StepGradients {
            network,
            mut objective,
            noised,
            stats,
        } = self.gradients(batch)?;
        let cat = |f: fn(&maskdiff_objective::GenMd4Stats) -> &Vec<f64>| -> Vec<f64> {
            stats.iter().flat_map(|s| f(s).iter().copied()).collect()
        };
        Ok(GenMd4Gradients {
            network,
            theta: objective.remove(0),
            nelbo: cat(|s| &s.nelbo),
            diffusion: cat(|s| &s.diffusion),
            rloo: cat(|s| &s.rloo),
            recon: cat(|s| &s.recon),
            surrogate: stats.iter().map(|s| s.fraction * s.surrogate).sum(),
            batch: noised,
        })
    }

    /// The times and the two mask patterns the next step will draw for `batch`.
    pub fn genmd4_next_batch(&self, batch: &TrainBatch<'_>) -> Result<GenMd4Batch, TrainError> {
        self.next_noised(batch)
    }

    fn genmd4_side(&self, use_ema: bool) -> &GenMd4<D> {
        if use_ema {
            &self.ema_objective
        } else {
            &self.objective
        }
    }

    /// The learned exponents w = softplus(θ), live or EMA.
    pub fn genmd4_exponents(&self, use_ema: bool) -> Vec<f64> {
        self.genmd4_side(use_ema).exponents()
    }

    /// The learned per-token schedule (live or EMA θ) for sampling and evaluation.
    pub fn genmd4_schedule(&self, use_ema: bool) -> Result<PerTokenPolynomial, TrainError> {
        Ok(self.genmd4_side(use_ema).schedule()?)
    }

    /// Set the live and EMA exponents to `w` (all in (0, 80), one per token value), e.g. to
    /// freeze them at equal values; the optimizer moments are kept.
    pub fn set_genmd4_exponents(&mut self, w: &[f64]) -> Result<(), TrainError> {
        self.objective.set_exponents(w)?;
        self.sync_ema_objective();
        Ok(())
    }

    /// The GenMD4 loss of a given stacked batch with the live or EMA network and θ, no dropout,
    /// no tape. `labels`: one per sequence (B), for class-conditional models.
    pub fn genmd4_loss_on(
        &self,
        gb: &GenMd4Batch,
        labels: Option<&[u32]>,
        use_ema: bool,
    ) -> Result<GenMd4Loss<D, NoneTape>, TrainError> {
        let model = if use_ema { &self.ema } else { &self.model };
        self.genmd4_side(use_ema)
            .loss_on(&ModelNet(model), gb, labels)
    }
}
