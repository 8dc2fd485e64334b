//! Errors of the objective crate.

use maskdiff_process::ProcessError;
use maskdiff_schedule::ScheduleError;

/// Bad input to a loss or an oracle.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ObjectiveError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error(
        "token id {id} at index {index} is out of range for vocabulary {vocab} (mask id = {vocab})"
    )]
    TokenOutOfRange { id: u32, index: usize, vocab: usize },
    #[error("x_t at index {index} is the real token {xt}, but x_0 is {x0}: impossible under the forward process")]
    InconsistentPair { index: usize, x0: u32, xt: u32 },
    #[error("{name} = {value} is not a valid value here")]
    BadValue { name: &'static str, value: f64 },
    #[error("need 0 <= s < t <= 1, got s = {s}, t = {t}")]
    BadTimes { s: f64, t: f64 },
    #[error("number of steps must be >= 1, got {0}")]
    BadSteps(usize),
    #[error("exact enumeration is limited to {limit} states, asked for {asked}")]
    TooLarge { asked: u128, limit: u128 },
    #[error("log-probabilities at row {row} are not normalised (log-sum-exp = {lse})")]
    NotNormalised { row: usize, lse: f64 },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("the run's objective is {found}, not {expected}")]
    WrongObjective {
        expected: &'static str,
        found: String,
    },
    #[error("per-block times (block_time = \"block\") need a time-free network, but this one is conditioned on one time per sequence: train with --time-free, or use block_time = \"sequence\"")]
    PerBlockTimeNeedsTimeFree,
    #[error("tensor backend failed: {0}")]
    Backend(String),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl ObjectiveError {
    /// Wrap a tensor-backend error.
    pub(crate) fn backend<E: std::fmt::Display>(e: E) -> Self {
        ObjectiveError::Backend(e.to_string())
    }
}
