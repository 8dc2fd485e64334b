//! Atomic file output: write to a temporary file in the destination directory, fsync it, then
//! rename it over the target, so a crash never leaves a half-written file under the real name.

use crate::error::{CliError, Result};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary name used while `path` is being written (same directory, so `rename` is atomic).
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let res = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(CliError::io("cannot write", path, e));
    }
    // Make the rename itself durable where the platform allows it.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("maskdiff-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temp files left behind: {names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn write_into_missing_dir_is_an_error_naming_the_path() {
        let p = Path::new("/nonexistent-maskdiff-dir/x.json");
        let err = write_atomic(p, b"x").unwrap_err().to_string();
        assert!(err.contains("/nonexistent-maskdiff-dir/x.json"), "{err}");
    }
}
