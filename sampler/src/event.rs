//! What the sampler reports: one [`StepEvent`] per step that did work (streaming, for progress bars
//! and the unmasking picture of the paper's Fig. 3) and the final [`SampleOutput`].

use serde::{Deserialize, Serialize};

/// One position revealed at a step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reveal {
    /// Index of the sample in the output (0-based; its RNG stream is `first_index + sequence`).
    pub sequence: usize,
    pub position: usize,
    /// The real token id (< V).
    pub token: u32,
    /// Probability of `token` under the (tempered / top-p) distribution it was drawn from; for
    /// the confidence sampler, the model's μ_token (its confidence); for the final fill, the
    /// argmax's probability under μ at t = 0.
    pub prob: f64,
}

/// One revealed position masked again at a step (ReMDM).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Remask {
    pub sequence: usize,
    pub position: usize,
    /// The token it held before.
    pub token: u32,
}

/// One step of the reverse process for the sequences of one chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    /// Chunk (group of at most `batch_size` samples) this step belongs to, of `num_chunks`.
    pub chunk: usize,
    pub num_chunks: usize,
    /// Block (semi-autoregressive generation), of `num_blocks`.
    pub block: usize,
    pub num_blocks: usize,
    /// Global step number in 1..=total_steps; for a final fill, the last step of its block.
    pub step: usize,
    pub total_steps: usize,
    /// The step's times t > s on the grid (both 0 for a final fill).
    pub t: f64,
    pub s: f64,
    /// True for the argmax fill of leftover masks at t = 0.
    pub final_fill: bool,
    /// Positions revealed by this step, ordered by (sequence, position).
    pub revealed: Vec<Reveal>,
    /// Revealed positions masked again by this step (ReMDM; empty for every other sampler),
    /// ordered by (sequence, position). Disjoint from `revealed`: both are decided from the
    /// state at the step's start, where a position is either masked or revealed.
    #[serde(default)]
    pub remasked: Vec<Remask>,
    /// Denoiser calls made for this step, and made so far by the whole run.
    pub calls: u64,
    pub calls_so_far: u64,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleOutput {
    /// Token ids, `[num_samples][length]`; all real (< V) once the run is complete (a partial
    /// snapshot shows masks as V).
    pub sequences: Vec<Vec<u32>>,
    /// Per position, the global step (1..=total_steps) after which it stopped being a mask:
    /// 0 for constraint-fixed positions, the block's last step for final-fill positions, and
    /// u32::MAX for positions still masked in a partial snapshot.
    pub reveal_step: Vec<Vec<u32>>,
    /// Number of denoiser calls each sample took part in (its NFE).
    pub nfe: Vec<u32>,
    /// Total batched denoiser calls.
    pub calls: u64,
    pub total_steps: usize,
    /// True when every step of every chunk has run.
    pub complete: bool,
}
