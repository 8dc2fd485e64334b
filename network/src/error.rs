//! Errors of the network crate: bad configuration or input, device failures, numerical blow-ups
//! and checkpoint problems, each with enough context to act on.

use std::path::PathBuf;

/// Everything that can go wrong building, running, training or checkpointing a network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("unknown preset {0:?} (known: tiny, cpu-small, md4-s, md4-m, unet-tiny, unet-small, unet-cifar10, uvit-tiny, uvit-small, uvit-imagenet64)")]
    UnknownPreset(String),
    #[error("bad input: {0}")]
    Input(String),
    #[error("device error: {0}")]
    Device(String),
    #[error(transparent)]
    Process(#[from] maskdiff_process::ProcessError),
    #[error(transparent)]
    Schedule(#[from] maskdiff_schedule::ScheduleError),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("checkpoint {path} does not match: {msg}")]
    CheckpointMismatch { path: PathBuf, msg: String },
    #[error("i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NetworkError {
    /// Wraps a dfdx device error (out of memory, CUDA failure).
    pub fn device(e: impl std::fmt::Display) -> Self {
        NetworkError::Device(e.to_string())
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        NetworkError::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn ckpt(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        NetworkError::Checkpoint {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
