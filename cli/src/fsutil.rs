//! Atomic file output: write to a temporary file in the destination directory, fsync it, then
//! rename it over the target, so a crash never leaves a half-written file under the real name
//! (whole buffers through [`write_atomic`], streamed output through [`AtomicFile`]). The run
//! directory lock ([`RunLock`]) that keeps two `train` processes out of one directory.

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

/// A file written as a stream and published atomically: the bytes go to `.NAME.tmp-PID` beside
/// `path` (the naming of [`maskdiff_data::write_atomic`]); [`AtomicFile::commit`] fsyncs it,
/// renames it over `path` and fsyncs the directory. Dropped without a commit (an error, a
/// panic), the temp file is removed and `path` is untouched.
#[derive(Debug)]
pub struct AtomicFile {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: Option<std::io::BufWriter<fs::File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .ok_or_else(|| CliError::Input(format!("not a file path: {}", path.display())))?;
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = fs::File::create(&tmp).map_err(|e| CliError::io("cannot write", path, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(std::io::BufWriter::new(file)),
        })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let f = self.file.as_mut().expect("written before commit");
        f.write_all(bytes)
            .map_err(|e| CliError::io("cannot write", &self.path, e))
    }

    pub fn commit(mut self) -> Result<()> {
        let w = self.file.take().expect("committed once");
        let res = w
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|()| fs::rename(&self.tmp, &self.path));
        if let Err(e) = res {
            let _ = fs::remove_file(&self.tmp);
            return Err(CliError::io("cannot write", &self.path, e));
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
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

/// Check, before any work, that the output file `path` can be created: its directory exists
/// (it is not created: a missing one is more likely a typo) and accepts new files. Evaluation
/// and sampling can run for minutes; failing at the final write would lose their result.
pub fn ensure_output_file(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(CliError::Input(format!(
            "cannot write {}: directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    if path.is_dir() {
        return Err(CliError::Input(format!(
            "cannot write {}: it is a directory",
            path.display()
        )));
    }
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

/// The lock file of a run directory.
pub const LOCK_FILE: &str = ".maskdiff.lock";

/// An exclusive OS lock (`flock` on Unix, `LockFileEx` on Windows) on `DIR/.maskdiff.lock`, held
/// by a `train` process for its whole life: a second `train` (new or `--resume`) on the same
/// directory is refused before it touches anything. The OS releases the lock when the process
/// exits, however it exits (also `kill -9`); the empty file stays behind, harmlessly.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CliError::io("cannot create lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(RunLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(CliError::Input(format!(
                "{} is in use by another `maskdiff train` (it holds {}); wait for it to finish \
                 or choose another --out",
                dir.display(),
                path.display()
            ))),
            Err(fs::TryLockError::Error(e)) => Err(CliError::io("cannot lock", &path, e)),
        }
    }
}
