//! Errors of the sampler crate: bad configuration, constraints or labels, unsupported
//! combinations, and failures passed up from the denoiser or the schedule.

use maskdiff_process::ProcessError;
use maskdiff_schedule::ScheduleError;

/// Everything that can go wrong when sampling.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    #[error("number of sampling steps must be >= 1, got {0}")]
    BadSteps(usize),
    #[error("sequence length must be >= 1")]
    EmptySequence,
    #[error("batch size must be >= 1")]
    BadBatchSize,
    #[error("block size must be >= 1")]
    BadBlockSize,
    #[error("{steps} steps cannot cover {blocks} blocks (need at least one step per block)")]
    TooFewSteps { steps: usize, blocks: usize },
    #[error("top-p must be a finite number in (0, 1], got {0}")]
    BadTopP(f64),
    #[error("temperature must be 0 (greedy) or a finite number >= 1e-6 (smaller ones overflow to NaN probabilities), got {0:e}")]
    BadTemperature(f64),
    #[error("threshold tau must be a finite number in [0, 1], got {0}")]
    BadThreshold(f64),
    #[error("remdm: {0}")]
    BadRemdm(String),
    #[error(
        "unknown sampler kind {0:?}; expected ancestral, mean, cached, first-hitting, confidence, remdm or threshold"
    )]
    UnknownKind(String),
    #[error("constraint fixes position {position}, outside a sequence of length {length}")]
    ConstraintOutOfRange { position: usize, length: usize },
    #[error(
        "constraint token {token} at position {position} is not below the vocabulary size {vocab}"
    )]
    ConstraintToken {
        position: usize,
        token: u32,
        vocab: usize,
    },
    #[error("constraint fixes position {position} to both {first} and {second}")]
    ConflictingConstraint {
        position: usize,
        first: u32,
        second: u32,
    },
    #[error("got {got} constraints for {samples} samples (need 0, 1 or one per sample)")]
    ConstraintCount { got: usize, samples: usize },
    #[error("got {got} labels for {samples} samples")]
    LabelCount { got: usize, samples: usize },
    #[error("label {label} is out of range for a denoiser with {classes} classes")]
    LabelOutOfRange { label: u32, classes: usize },
    #[error("labels were given but the denoiser is unconditional")]
    LabelsUnsupported,
    #[error("the {kind} sampler does not support {what}")]
    Unsupported {
        kind: &'static str,
        what: &'static str,
    },
    #[error(
        "the denoiser predicts {denoiser} tokens but the GenMD4 schedule has {schedule} exponents"
    )]
    VocabMismatch { denoiser: usize, schedule: usize },
    #[error("schedule gives an invalid unmasking probability {value} for the step {t} -> {s}")]
    BadSchedule { value: f64, t: f64, s: f64 },
    #[error("denoiser returned an invalid prediction: {0}")]
    BadPrediction(String),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
}
