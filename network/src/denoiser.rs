//! [`NetworkDenoiser`]: a model behind the backend-agnostic `maskdiff_process::Denoiser` trait
//! (inference only: no tape, no dropout), returning normalised log μ_θ over the V real tokens.

use crate::{Elem, Kernels, Network};
use maskdiff_process::{
    BackendError, DenoiseBatch, Denoiser, LogProbs, ProcessError, RowLogProbs, Vocab,
};

/// Wraps a model (typically the EMA parameters) as a [`Denoiser`].
#[derive(Clone, Debug)]
pub struct NetworkDenoiser<E: Elem, D: Kernels<E>> {
    pub model: Network<E, D>,
}

impl<E: Elem, D: Kernels<E>> NetworkDenoiser<E, D> {
    pub fn new(model: impl Into<Network<E, D>>) -> Self {
        Self {
            model: model.into(),
        }
    }
}

impl<E: Elem, D: Kernels<E>> Denoiser for NetworkDenoiser<E, D> {
    fn vocab(&self) -> Vocab {
        self.model.vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        self.model.config().time_conditioning
    }
    fn num_classes(&self) -> usize {
        self.model.config().num_classes
    }
    fn log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        self.model.log_probs(batch).map_err(process_error)
    }
    /// The transformer runs its last block only at the requested rows.
    fn log_probs_rows(
        &mut self,
        batch: &DenoiseBatch<'_>,
        rows: &[Vec<usize>],
    ) -> Result<RowLogProbs, ProcessError> {
        self.model
            .log_probs_rows(batch, rows)
            .map_err(process_error)
    }
}

fn process_error(e: crate::NetworkError) -> ProcessError {
    match e {
        crate::NetworkError::Process(p) => p,
        other => ProcessError::Backend(BackendError::new(other)),
    }
}
