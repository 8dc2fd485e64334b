//! The training objective, pluggable by name so checkpoints record it. Only MD4's
//! continuous-time loss (paper eq. (4), spec §3.1) is wired in; GenMD4 (spec §5) needs learnable
//! exponents and its own batch type and will be added as another variant.

use crate::NetworkError;
use dfdx::prelude::*;
use maskdiff_objective::tensor::{md4_diffusion_loss, MaskedBatch};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// `weight(t) · Σ_masked −log μ_θ[x_0]`, one t per sequence (paper eq. (4)).
    #[default]
    Md4,
}

impl Objective {
    /// Per-sequence loss in nats, keeping the tape.
    pub fn loss<D: Device<f32>, T: Tape<f32, D>>(
        &self,
        logits: Tensor<(usize, usize, usize), f32, D, T>,
        batch: &MaskedBatch,
    ) -> Result<Tensor<(usize,), f32, D, T>, NetworkError> {
        match self {
            Objective::Md4 => md4_diffusion_loss(logits, batch)
                .map_err(|e| NetworkError::Objective(e.to_string())),
        }
    }
}
