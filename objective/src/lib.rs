//! The negative ELBO of MD4 and GenMD4 masked diffusion (Shi et al., NeurIPS 2024): paper §3
//! (eqs. (4)–(5), continuous and discrete time, App. D–E for the reconstruction and prior terms),
//! §6 / App. I (GenMD4, eq. (12), REINFORCE leave-one-out gradients), spec §3 and §5.
//!
//! Two implementations, tested against each other:
//! * [`reference`] — f64 on plain slices: Monte-Carlo estimators (continuous, discrete T-step,
//!   GenMD4 with its RLOO surrogate), the reconstruction and prior terms, and exact oracles by
//!   enumeration of mask patterns for tiny N and V (exact ELBO of a time-independent predictor,
//!   the any-order-autoregressive closed form, the exact discrete-time L_T).
//! * [`tensor`] — the training losses on dfdx tensors: gradients flow into the logits (the network)
//!   and, for GenMD4, into the unconstrained exponent parameters θ (w = softplus(θ)).
//!
//! [`metrics`] converts nats to bits per token and perplexity (spec §3.4).
//!
//! Sign convention: every loss here is a non-negative number of nats (the negative ELBO); the
//! schedule's weight α'/(1 − α) is negative, so the per-sequence loss weight is −α'/(1 − α) ≥ 0.

mod error;
pub mod metrics;
pub mod reference;
pub mod tensor;

pub use error::ObjectiveError;
pub use tensor::{
    genmd4_loss, md4_diffusion_loss, md4_recon_constant, GenMd4Batch, GenMd4Loss, GenMd4Options,
    MaskedBatch,
};
