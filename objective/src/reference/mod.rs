//! The f64 reference implementation on plain slices (spec §3, §5): the estimators the training
//! loss must agree with, and exact oracles for tiny problems.
//!
//! Conventions: `x0` are real ids `< V`; `xt` are input ids in `0..=V` (V = mask) and must be a
//! possible noising of `x0`; `log_probs` are log μ row-major `[N, V]`, each row normalised
//! (checked to 1e−6). Every function returns nats.

mod discrete;
mod exact;
mod genmd4;
mod md4;

pub use discrete::{discrete_coefficient, discrete_estimate, discrete_times};
pub use exact::{
    ao_arm_nelbo, exact_continuous_nelbo, exact_discrete_nelbo, gauss_legendre,
    genmd4_exact_diffusion_at, masked_ce_by_pattern, quadrature_continuous_nelbo, PatternCost,
    MAX_ENUMERATED_POSITIONS,
};
pub use genmd4::{
    genmd4_diffusion_estimate, genmd4_integrand, genmd4_log_q, genmd4_prior_kl, genmd4_recon,
    genmd4_two_sample, rloo_term, GenMd4Estimate,
};
pub use md4::{
    check_log_probs, continuous_estimate, masked_cross_entropy, prior_kl, recon_term, Nelbo,
};
