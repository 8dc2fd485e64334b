//! The forward (masking) and reverse (unmasking) Markov processes of masked diffusion over V real
//! tokens plus one absorbing mask state — MD4 paper §2 (forward, eq. (1)), App. C (posterior),
//! §4 eqs. (2)–(3) (mean-parameterised reverse model) and GenMD4 §6 / App. I.2 (eq. 11).
//!
//! Types keep the mask apart from real tokens: a [`Token`] is a checked id `< V` of a [`Vocab`];
//! a noisy position is a [`State`] (`Real(Token)` or `Mask`). Ids cross into tensors only through
//! [`Vocab::input_id`] (mask ↦ V) and back through [`Vocab::state`]. All probabilities are f64.
//!
//! The backend-agnostic [`Denoiser`] trait (a network's view from the samplers and evaluators)
//! lives here so that nothing downstream of a network depends on a tensor library.

mod denoiser;
mod error;
mod forward;
mod prefix;
mod reverse;
mod token;

pub use denoiser::{DenoiseBatch, Denoiser, LogProbs, RowLogProbs};
pub use error::{BackendError, ProcessError};
pub use forward::{
    forward_sample, forward_sample_per_token, posterior, transition_prob, Posterior,
};
pub use prefix::PrefixDenoiser;
pub use reverse::{reverse_step, reverse_step_genmd4, ReverseStep};
pub use token::{State, Token, Vocab};
