//! The training losses on dfdx tensors (spec §3.1, §5.3–§5.5). Logits `[batch, len, vocab]` (f32,
//! any tape) go in; per-sequence losses in nats come out with the tape, so `backward` reaches the
//! network and, for GenMD4, the exponent parameters θ. Masks, weights and indices are built on the
//! host (f64, then cast) from a [`MaskedBatch`] / [`GenMd4Batch`].

mod batch;
mod genmd4;
mod md4;

pub use batch::{block_grid, block_times, MaskedBatch};
pub(crate) use batch::{check_x0, check_xt};
pub use genmd4::{genmd4_loss, softplus_tensor, GenMd4Batch, GenMd4Loss, GenMd4Options};
pub use md4::{md4_diffusion_loss, md4_recon_constant, md4_row_losses};

use crate::ObjectiveError;
use dfdx::prelude::*;

/// A host vector as a NoneTape tensor on `dev`.
pub(crate) fn host<S: Shape, E: Unit, D: TensorFromVec<E>>(
    dev: &D,
    data: Vec<E>,
    shape: S,
) -> Result<Tensor<S, E, D>, ObjectiveError> {
    dev.try_tensor_from_vec(data, shape)
        .map_err(ObjectiveError::backend)
}

/// Check that logits are `[batch, len, vocab]`.
pub(crate) fn check_logits(
    got: (usize, usize, usize),
    batch: usize,
    len: usize,
    vocab: usize,
) -> Result<(), ObjectiveError> {
    if got != (batch, len, vocab) {
        return Err(ObjectiveError::Shape(format!(
            "logits are {got:?}, expected [batch {batch}, len {len}, vocab {vocab}]"
        )));
    }
    Ok(())
}
