//! Atomic file output: write to a temporary file in the destination directory, fsync it, then
//! rename it over the target, so a crash never leaves a half-written file under the real name.

use crate::error::{CliError, Result};
use std::fs;
use std::path::Path;

/// Write `bytes` to `path` atomically with the project's one writer
/// ([`maskdiff_data::write_atomic`]: temp file + fsync + rename + directory fsync), its error
/// reported as the CLI's "cannot write PATH".
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    maskdiff_data::write_atomic(path, bytes).map_err(|e| match e {
        maskdiff_data::DataError::Write { path, source } => {
            CliError::io("cannot write", path, source)
        }
        other => other.into(),
    })
}

/// Create `dir` (and parents) and check that files can be created in it, so an unwritable output
/// directory fails before any work is done rather than at the first checkpoint.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| CliError::io("cannot create directory", dir, e))?;
    let probe = dir.join(format!(".maskdiff-write-test{}", std::process::id()));
    fs::write(&probe, b"ok").map_err(|e| CliError::io("cannot write to directory", dir, e))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Read a whole file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| CliError::io("cannot read", path, e))
}

/// Read a whole UTF-8 file, naming it in the error.
pub fn read_string(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| CliError::io("cannot read", path, e))
}
