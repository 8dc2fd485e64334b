//! File helpers: whole-file reads with typed errors, transparent gzip, atomic writes (temp + rename).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};

/// Read a whole file.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| DataError::io(path, e))
}

/// True if `bytes` start with the gzip magic 1f 8b.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// Decompress gzip (all members) if `bytes` are gzip, else return them unchanged.
pub fn maybe_gunzip(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if !is_gzip(&bytes) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|e| DataError::BadHeader {
            what: what.to_string(),
            detail: format!("gzip stream: {e}"),
        })?;
    Ok(out)
}

/// Read a file, decompressing it when it is gzip (by content, not by name).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    maybe_gunzip(read_file(path)?, &path.display().to_string())
}

/// Write `bytes` to `path` atomically: a temp file in the same directory, fsync, then rename, so
/// readers never see a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
    let name = path.file_name().ok_or_else(|| {
        DataError::InvalidArgument(format!("not a file path: {}", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(DataError::io(path, e));
    }
    Ok(())
}
