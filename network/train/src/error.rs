//! Errors of training: the model's and the objective's errors carried as they are (`#[from]`),
//! bad training configuration, numerical blow-ups, and checkpoint problems with their path.

use std::path::PathBuf;

/// Everything that can go wrong training, checkpointing or loading a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Network(#[from] maskdiff_network::NetworkError),
    #[error(transparent)]
    Objective(#[from] maskdiff_objective::ObjectiveError),
    #[error(transparent)]
    Schedule(#[from] maskdiff_schedule::ScheduleError),
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("device error: {0}")]
    Device(String),
    #[error("non-finite {what} at step {step}: {value}")]
    NonFinite {
        what: &'static str,
        step: u64,
        value: f64,
    },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("checkpoint {path} does not match: {msg}")]
    CheckpointMismatch { path: PathBuf, msg: String },
    /// Data-parallel training: a collective operation failed, or another rank did.
    #[error("data-parallel training: {0}")]
    Collective(String),
    #[error(transparent)]
    Data(#[from] maskdiff_data::DataError),
}

impl TrainError {
    /// Wraps a dfdx device error (out of memory, CUDA failure).
    pub fn device(e: impl std::fmt::Display) -> Self {
        TrainError::Device(e.to_string())
    }
    pub(crate) fn ckpt(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        TrainError::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub(crate) fn mismatch(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        TrainError::CheckpointMismatch {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
