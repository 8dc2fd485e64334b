//! File helpers: whole-file reads with typed errors, transparent gzip, atomic writes (temp + rename).

use std::fs;
use std::io::{Read, Write};
use std::path::Path;

use crate::error::{DataError, Result};

/// Read a whole file.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|e| DataError::io(path, e))
}

/// True if `bytes` start with the gzip magic 1f 8b.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b
}

/// The most bytes any gzip input may decompress to (a guard against decompression bombs; the
/// largest real input, Fashion-MNIST's training images, is 47 MB).
pub const MAX_DECOMPRESSED_BYTES: u64 = 1 << 31;

fn gzip_error(what: &str, e: std::io::Error) -> DataError {
    DataError::BadHeader {
        what: what.to_string(),
        detail: format!("gzip stream: {e}"),
    }
}

/// Append at most `cap` more bytes of `r` to `out`; an error naming `what` when `r` holds more.
pub(crate) fn read_capped(
    r: &mut impl Read,
    out: &mut Vec<u8>,
    cap: u64,
    what: &str,
) -> Result<()> {
    let before = out.len() as u64;
    r.take(cap.saturating_add(1))
        .read_to_end(out)
        .map_err(|e| gzip_error(what, e))?;
    let got = out.len() as u64 - before;
    if got > cap {
        return Err(DataError::WrongSize {
            what: format!("{what} (decompressed)"),
            expected: cap,
            found: got,
        });
    }
    Ok(())
}

/// Decompress gzip (all members) if `bytes` are gzip, else return them unchanged. The output is
/// capped at [`MAX_DECOMPRESSED_BYTES`].
pub fn maybe_gunzip(bytes: Vec<u8>, what: &str) -> Result<Vec<u8>> {
    if !is_gzip(&bytes) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(&bytes[..]);
    read_capped(&mut dec, &mut out, MAX_DECOMPRESSED_BYTES, what)?;
    Ok(out)
}

/// Read a file, decompressing it when it is gzip (by content, not by name).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    maybe_gunzip(read_file(path)?, &path.display().to_string())
}

/// Write `bytes` to `path` atomically — the project's one atomic writer (checkpoints, metrics,
/// configs, token files, samples): a temp file `.NAME.tmp-PID` in the same directory, fsync,
/// rename over `path`, then fsync the directory so the rename itself is durable. A crash leaves
/// either the old or the new file, never a torn one (and at most a stale temp file, which no
/// reader names). The directory must exist: a missing one is an error naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| {
        DataError::InvalidArgument(format!("not a file path: {}", path.display()))
    })?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(DataError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
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
        let err = write_atomic(p, b"x").unwrap_err();
        assert!(matches!(err, DataError::Write { .. }));
        assert!(
            err.to_string().contains("/nonexistent-maskdiff-dir/x.json"),
            "{err}"
        );
    }
}
