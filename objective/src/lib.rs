//! The negative ELBO of MD4 and GenMD4 masked diffusion (Shi et al., NeurIPS 2024): paper §3
//! (eqs. (4)–(5), continuous and discrete time, App. D–E for the reconstruction and prior terms),
//! §6 / App. I (GenMD4, eq. (12), REINFORCE leave-one-out gradients), spec §3 and §5.
//!
//! Two implementations, tested against each other:
//! * [`mod@reference`] — f64 on plain slices: Monte-Carlo estimators (continuous, discrete T-step,
//!   GenMD4 with its RLOO surrogate), the reconstruction and prior terms, and exact oracles by
//!   enumeration of mask patterns for tiny N and V (exact ELBO of a time-independent predictor,
//!   the any-order-autoregressive closed form, the exact discrete-time L_T).
//! * [`tensor`] — the training losses on dfdx tensors: gradients flow into the logits (the network)
//!   and, for GenMD4, into the unconstrained exponent parameters θ (w = softplus(θ)).
//!
//! On top of them, the [`Objective`] trait puts each model's schedule, noising, loss, learnable
//! parameters, NELBO estimator and reverse process together as one type: [`Md4`] and
//! [`GenMd4`], and block diffusion (BD3-LM) with either inside the blocks, [`Block`]; trainers and evaluators
//! are generic over it. [`estimate`] is the Monte-Carlo
//! NELBO (continuous or T-step, K samples per sequence, standard error over sequences,
//! reconstruction and prior apart) over any `maskdiff_process::Denoiser`.
//!
//! [`metrics`] converts nats to bits per token and perplexity (spec §3.4).
//!
//! Sign convention: every loss here is a non-negative number of nats (the negative ELBO); the
//! schedule's weight α'/(1 − α) is negative, so the per-sequence loss weight is −α'/(1 − α) ≥ 0.

mod block;
mod error;
pub mod estimate;
mod genmd4;
mod md4;
pub mod metrics;
mod objective;
pub mod reference;
pub mod tensor;

pub use block::{block_estimate, block_input, Block, BlockNet, InBlocks};
pub use error::ObjectiveError;
pub use estimate::{ClipVariance, EvalOptions, NelboEstimate, NetInput};
pub use genmd4::{GenMd4, GenMd4Report, GenMd4Stats, THETA_NAME};
pub use md4::{Md4, Md4Stats};
pub use objective::{
    BlockTime, CleanBatch, Flat, InnerSpec, Logits, LogitsNet, MicroLoss, Noised, Objective,
    ObjectiveSettings, ObjectiveSpec, ReverseModel, RowLogits, Share, StepLosses,
};
pub use tensor::{
    genmd4_loss, md4_diffusion_loss, md4_recon_constant, md4_row_losses, GenMd4Batch, GenMd4Loss,
    GenMd4Options, MaskedBatch,
};
