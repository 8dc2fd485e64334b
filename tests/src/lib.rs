//! Cross-crate property tests of the MD4/GenMD4 maths (Shi et al., NeurIPS 2024, §2–§6 and the
//! spec's §11 facts): schedules, the forward/reverse process, the ELBO's invariances, the
//! estimators' unbiasedness, GenMD4's RLOO gradient, and the dfdx loss against the f64 reference.
//! The tests live in `tests/tests/*.rs`; their independent oracles in `tests/tests/common/`.

// Compile and run the README's Rust example as a doctest, so it cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
