//! The interface of a block-diffusion denoiser (BD3-LM, Arriola et al., ICLR 2025): log μ_θ for
//! one block of x_t given a clean prefix that grows by committed blocks. Block samplers use only
//! this trait; a network backend implements it with or without a key/value cache of the prefix.

use crate::{DenoiseBatch, LogProbs, ProcessError, Vocab};

/// A denoiser of the next block given the committed clean prefix of one sequence.
pub trait PrefixDenoiser {
    /// The vocabulary of real tokens it predicts over.
    fn vocab(&self) -> Vocab;
    /// Whether the output depends on t.
    fn is_time_conditioned(&self) -> bool;
    /// Number of class labels it accepts (0 = unconditional).
    fn num_classes(&self) -> usize {
        0
    }
    /// The block size B it was trained with.
    fn block_size(&self) -> usize;
    /// The longest prefix + block it accepts.
    fn max_len(&self) -> usize;
    /// Length of the committed prefix.
    fn prefix_len(&self) -> usize;
    /// Start a new sequence with an empty prefix (and its class label, if any).
    fn reset(&mut self, label: Option<u32>);
    /// log μ_θ at each position of the block `batch` (one row: x_t of the block, its t), given
    /// the prefix.
    fn block_log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError>;
    /// Append a clean block (ids < V) to the prefix.
    fn commit(&mut self, block: &[u32]) -> Result<(), ProcessError>;
}
