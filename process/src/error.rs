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
    /// The denoiser's own error (e.g. a network's device or input error), kept as a typed source
    /// (`std::error::Error::source`, downcastable) rather than flattened to text.
    #[error("denoiser backend failed")]
    Backend(#[source] BackendError),
    #[error("predicted distribution is invalid: {0}")]
    BadPrediction(String),
}

/// A denoiser backend's error, shared so that [`ProcessError`] stays `Clone`; equal when it is
/// the same error value.
#[derive(Debug, Clone)]
pub struct BackendError(pub std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl BackendError {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        BackendError(std::sync::Arc::new(e))
    }
    /// The backend's error as its own type, if it is `E`.
    pub fn downcast_ref<E: std::error::Error + 'static>(&self) -> Option<&E> {
        self.0.downcast_ref::<E>()
    }
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for BackendError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}
