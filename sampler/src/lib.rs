//! Samplers for masked (absorbing-state) diffusion — MD4 and GenMD4 (Shi et al., NeurIPS 2024).
//!
//! * Ancestral sampling, paper Alg. 2 (spec §6.1): T reverse steps t → s over a uniform or cosine
//!   grid (paper eq. (6), spec §6.3); per masked position an exact (V+1)-way categorical with
//!   p(x_s = v) = ((α_s − α_t)/(1 − α_t)) μ_v, revealed tokens carried over, leftover masks filled
//!   by the argmax of μ at t = 0.
//! * The two-stage "mean" sampler, paper Alg. 3 (App. G); temperature and top-p (spec §6.2).
//! * GenMD4 sampling with per-token exponents, paper eq. (11) / App. I.2 (spec §5.2; the
//!   official code has none).
//! * Cached and first-hitting samplers that call the network only when its answer matters (the
//!   idea of Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic", applied on
//!   the paper's time grid: the output law is exactly Alg. 2's).
//! * Confidence-based unmasking (MaskGIT, Chang et al. 2022; LLaDA, Nie et al. 2025) and
//!   semi-autoregressive block generation.
//! * Remasking (ReMDM, Wang et al. 2025): revealed tokens may be masked again with probability
//!   σ_t (max-capped, rescaled or confidence-based σ, and the "loop" schedule), with the
//!   masked-position law adjusted so each step keeps the forward marginal.
//! * Confidence-threshold parallel decoding (Fast-dLLM, Wu et al. 2025): per network call,
//!   reveal every masked position the model is more than τ sure of (at least one).
//! * Both work per block, so a block sampler reuses them inside each block: [`sample_blocks`]
//!   draws block-diffusion (BD3-LM) sequences block by block over a
//!   `maskdiff_process::PrefixDenoiser` (a clean prefix, cached or recomputed by the backend),
//!   with any of the samplers above inside each block, stopping at a length or end-of-text;
//!   [`sample_blocks_streamed`] adds fixed tokens (prompts, infill) and the same step events.
//! * Conditioning by fixed tokens ([`Constraint`], spec §6.4) and per-sequence class labels.
//! * Streaming: a [`Sampler`] is an iterator of [`StepEvent`]s.
//!
//! All probabilities are f64 and every categorical is an exact inverse-CDF draw; uniforms come
//! from a counter-based RNG keyed by (seed, sample index, step, position), so sample i is the same
//! bit for bit whether drawn alone or in any batch. Only the backend-agnostic
//! [`maskdiff_process::Denoiser`] trait is used.
//!
//! ```
//! use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
//! use maskdiff_sampler::{sample, Constraint, SamplerConfig, SamplerKind};
//! use maskdiff_schedule::{Linear, SamplingGrid, Shifted};
//!
//! /// Predicts token 1 with probability 0.9 at every position, whatever it sees.
//! struct Fixed;
//! impl Denoiser for Fixed {
//!     fn vocab(&self) -> Vocab { Vocab::new(2).unwrap() }
//!     fn is_time_conditioned(&self) -> bool { false }
//!     fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
//!         let row = [0.1f32.ln(), 0.9f32.ln()];
//!         Ok(LogProbs { data: row.repeat(b.batch * b.len), batch: b.batch, len: b.len, vocab: 2 })
//!     }
//! }
//!
//! let schedule = Shifted::official(Linear);
//! let config = SamplerConfig {
//!     kind: SamplerKind::FirstHitting, steps: 64, grid: SamplingGrid::Cosine,
//!     num_samples: 2, length: 8, ..SamplerConfig::default()
//! };
//! let out = sample(&mut Fixed, &schedule, &config, &[Constraint::prefix(&[0, 0])], None).unwrap();
//! assert!(out.sequences.iter().all(|s| s[..2] == [0, 0] && s.iter().all(|&x| x < 2)));
//! assert!(out.nfe.iter().all(|&n| n <= 6)); // at most one call per generated position
//! ```

mod blocks;
pub mod categorical;
mod config;
mod constraint;
mod engine;
mod error;
mod event;
pub mod plan;
pub mod rng;
mod shaping;

pub use blocks::{sample_blocks, sample_blocks_streamed, BlockSampleOutput};
pub use config::{RemdmConfig, RemdmLoop, RemdmStrategy, SamplerConfig, SamplerKind};
pub use constraint::{Anchor, Constraint, Span};
pub use engine::Sampler;
pub use error::SamplerError;
pub use event::{Remask, Reveal, SampleOutput, StepEvent};
pub use plan::ScheduleRef;
pub use shaping::{top_p, Shaping, MIN_TEMPERATURE};

use maskdiff_process::Denoiser;

/// Draw `config.num_samples` sequences of `config.length` tokens.
///
/// `schedule`: any MD4 schedule (`&Shifted<AnySchedule>`, `&Linear`, …) or a GenMD4
/// `&PerTokenPolynomial`, or an explicit [`ScheduleRef`]. `constraints`: none, one shared by every
/// sample, or one per sample. `labels`: one class label per sample for class-conditional
/// denoisers.
pub fn sample<'a, D: Denoiser + ?Sized>(
    denoiser: &'a mut D,
    schedule: impl Into<ScheduleRef<'a>>,
    config: &SamplerConfig,
    constraints: &[Constraint],
    labels: Option<&[u32]>,
) -> Result<SampleOutput, SamplerError> {
    Sampler::new(denoiser, schedule, config, constraints, labels)?.run()
}
