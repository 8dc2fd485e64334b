//! The training objective, pluggable by name so checkpoints record it: MD4's continuous-time
//! loss (paper eq. (4), spec §3.1), or GenMD4 (paper §6, spec §5), whose learnable exponents,
//! two-mask batches and step live in `genmd4.rs` (the trainer dispatches on the variant).

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
    /// GenMD4: per-token-value exponents w = softplus(θ) learned with the network, t on
    /// [t1, 1], two masks per sequence for the RLOO gradient of θ. `one_sample`: the network's
    /// gradient uses the first mask only (as MD4 does; official repository issue #4).
    #[serde(rename = "genmd4")]
    GenMd4 {
        #[serde(default)]
        one_sample: bool,
    },
}

impl Objective {
    /// Per-sequence MD4 loss in nats, keeping the tape (an error for GenMD4).
    pub fn loss<D: Device<f32>, T: Tape<f32, D>>(
        &self,
        logits: Tensor<(usize, usize, usize), f32, D, T>,
        batch: &MaskedBatch,
    ) -> Result<Tensor<(usize,), f32, D, T>, NetworkError> {
        match self {
            Objective::Md4 => md4_diffusion_loss(logits, batch)
                .map_err(|e| NetworkError::Objective(e.to_string())),
            Objective::GenMd4 { .. } => Err(NetworkError::Objective(
                "GenMD4 needs its two-mask batch and θ: use Trainer::step / eval_loss".into(),
            )),
        }
    }
}
