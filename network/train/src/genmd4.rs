//! GenMD4 conveniences on a [`Trainer`] whose objective is [`GenMd4`] (paper §6; spec §5): the
//! learned exponents and schedule of the live or EMA parameters, setting them by hand, and the
//! loss of a given two-mask batch. Everything else (the step, the gradients, checkpoints) is the
//! generic trainer's.

use crate::{ModelNet, Trainer, TrainError};
use maskdiff_network::dfdx::prelude::NoneTape;
use maskdiff_network::Kernels;
use maskdiff_objective::tensor::{GenMd4Batch, GenMd4Loss};
use maskdiff_objective::GenMd4;
use maskdiff_schedule::PerTokenPolynomial;

impl<D: Kernels<f32>> Trainer<D, GenMd4<D>> {
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
