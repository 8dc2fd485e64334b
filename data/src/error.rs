//! The one error type of the data crate: every reader and writer returns it instead of panicking.

use std::path::{Path, PathBuf};

use maskdiff_process::ProcessError;

/// Why data could not be read, written, tokenised or batched.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("file not found: {0}")]
    MissingFile(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: wrong magic number (found {found:02x?})")]
    BadMagic { what: String, found: Vec<u8> },
    #[error("{what}: unsupported version {found} (this build reads version {expected})")]
    BadVersion {
        what: String,
        found: u32,
        expected: u32,
    },
    #[error("{what}: checksum mismatch (header says {expected:#018x}, data gives {found:#018x})")]
    BadChecksum {
        what: String,
        expected: u64,
        found: u64,
    },
    #[error("{what}: malformed header: {detail}")]
    BadHeader { what: String, detail: String },
    #[error("{what}: truncated or oversized: expected {expected} bytes, found {found}")]
    WrongSize {
        what: String,
        expected: u64,
        found: u64,
    },
    #[error("token {id} at position {pos} is outside the vocabulary of size {vocab}")]
    TokenOutOfVocab { id: u64, pos: usize, vocab: usize },
    #[error("character {ch:?} at byte {pos} is not in the {alphabet} alphabet (normalise first)")]
    NotInAlphabet {
        ch: char,
        pos: usize,
        alphabet: &'static str,
    },
    #[error("sequence of {len} tokens is shorter than one window of {window}")]
    TooShort { len: usize, window: usize },
    #[error("{what}, line {line}: {detail}")]
    Parse {
        what: String,
        line: usize,
        detail: String,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl DataError {
    /// Wrap an I/O error, turning "not found" into [`DataError::MissingFile`].
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::MissingFile(path.to_path_buf())
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Result alias of the data crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
