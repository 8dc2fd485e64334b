//! The backend-agnostic denoiser interface: x_t (input ids, mask = V), one time per sequence and
//! an optional class label per sequence → log μ_θ over the V real tokens at every position
//! (paper §4, mean parameterisation). Samplers and evaluators use only this trait.

use crate::{ProcessError, Vocab};

/// A batch of noisy sequences to denoise, row-major `[batch, len]`.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseBatch<'a> {
    /// Input ids in `0..=V` (V is the mask), `batch * len` of them.
    pub ids: &'a [u32],
    pub batch: usize,
    pub len: usize,
    /// One time t ∈ [0, 1] per sequence (ignored by time-free denoisers).
    pub t: &'a [f64],
    /// Optional class label per sequence.
    pub labels: Option<&'a [u32]>,
}

impl DenoiseBatch<'_> {
    /// Check the slice lengths and ids against `vocab`.
    pub fn validate(&self, vocab: Vocab) -> Result<(), ProcessError> {
        if self.ids.len() != self.batch * self.len {
            return Err(ProcessError::Shape(format!(
                "{} ids for batch {} x len {}",
                self.ids.len(),
                self.batch,
                self.len
            )));
        }
        if self.t.len() != self.batch {
            return Err(ProcessError::Shape(format!(
                "{} times for batch {}",
                self.t.len(),
                self.batch
            )));
        }
        if let Some(l) = self.labels {
            if l.len() != self.batch {
                return Err(ProcessError::Shape(format!(
                    "{} labels for batch {}",
                    l.len(),
                    self.batch
                )));
            }
        }
        if let Some(&bad) = self.ids.iter().find(|&&i| i > vocab.mask_id()) {
            return Err(ProcessError::TokenOutOfRange {
                id: bad as u64,
                vocab: vocab.size(),
            });
        }
        Ok(())
    }
}

/// Normalised log-probabilities log μ, row-major `[batch, len, vocab]`, f32 (network precision;
/// consumers convert to f64 before sampling).
#[derive(Debug, Clone, PartialEq)]
pub struct LogProbs {
    pub data: Vec<f32>,
    pub batch: usize,
    pub len: usize,
    pub vocab: usize,
}

impl LogProbs {
    /// log μ at sequence `b`, position `n`.
    pub fn row(&self, b: usize, n: usize) -> &[f32] {
        let o = (b * self.len + n) * self.vocab;
        &self.data[o..o + self.vocab]
    }
    /// μ at (b, n) in f64, renormalised in f64 so it sums to 1 to machine precision.
    pub fn probs_f64(&self, b: usize, n: usize) -> Vec<f64> {
        let row = self.row(b, n);
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        let mut p: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        p
    }
}

/// A network (or any hand-written model) that predicts x_0 from x_t.
pub trait Denoiser {
    /// The vocabulary of real tokens it predicts over.
    fn vocab(&self) -> Vocab;
    /// Whether the output depends on t. A time-free denoiser lets samplers reuse outputs while
    /// x_t is unchanged (cached / first-hitting sampling).
    fn is_time_conditioned(&self) -> bool;
    /// Number of class labels it accepts (0 = unconditional).
    fn num_classes(&self) -> usize {
        0
    }
    /// log μ_θ(x_t, t) at every position of every sequence of the batch.
    fn log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError>;
}

impl<D: Denoiser + ?Sized> Denoiser for &mut D {
    fn vocab(&self) -> Vocab {
        (**self).vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        (**self).is_time_conditioned()
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        (**self).log_probs(batch)
    }
}
