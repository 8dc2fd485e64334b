//! Errors of the process crate.

/// Invalid input at the process boundary.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProcessError {
    #[error("vocabulary size must be >= 1 and < 2^32 - 1, got {0}")]
    BadVocab(usize),
    #[error("token id {id} is out of the vocabulary of size {vocab}")]
    TokenOutOfRange { id: u64, vocab: usize },
    #[error("probability {name} = {value} is not in [0, 1]")]
    BadProbability { name: &'static str, value: f64 },
    #[error("need s < t with both in [0, 1], got s = {s}, t = {t}")]
    BadTimes { s: f64, t: f64 },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("denoiser backend failed: {0}")]
    Backend(String),
    #[error("predicted distribution is invalid: {0}")]
    BadPrediction(String),
}
