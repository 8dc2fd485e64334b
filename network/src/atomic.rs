//! Atomic file writes: write a sibling temp file, fsync it, rename it over the target, so a
//! crash leaves either the old or the new file, never a torn one.

use crate::NetworkError;
use std::io::Write;
use std::path::Path;

/// Atomically replace `path` with `bytes`.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), NetworkError> {
    let name = path
        .file_name()
        .ok_or_else(|| NetworkError::ckpt(path, "not a file path"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(NetworkError::io(path, e));
    }
    Ok(())
}
