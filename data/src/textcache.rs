//! Token caches of plain-text sources: a text file given as data is tokenised once and the token
//! file kept next to it, so later runs memory-map it instead of holding the text and its ids in
//! memory and tokenising again (the English corpus of `scripts/fetch-data.sh` is cached the same
//! way, in `corpus.rs`).
//!
//! The cache of `dir/NAME` for tokenizer `T` is `dir/.NAME.T-<fnv>-<len>.tok`, keyed by the
//! source's content fingerprint (FNV-1a 64 of its bytes and their number): an edited source gets
//! a new key, so a stale cache is never read; caches of older contents are removed when a new one
//! is written. Writes are atomic (temp + rename), so concurrent or killed runs leave either no
//! cache or a complete one. A directory that cannot be written to only loses the cache: the
//! tokens are then kept in memory.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::checksum::{fnv1a64, fnv1a64_update};
use crate::error::{DataError, Result};
use crate::tokenfile::TokenFile;
use crate::tokenizer::{normalize_text8, AnyTokenizer, Tokenizer, TokenizerId};

/// The content fingerprint of a file: FNV-1a 64 of its bytes, and their number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFingerprint {
    pub fnv1a64: u64,
    pub bytes: u64,
}

/// Fingerprint `path` by streaming it (constant memory).
pub fn source_fingerprint(path: &Path) -> Result<SourceFingerprint> {
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut h, mut n) = (fnv1a64(b""), 0u64);
    loop {
        let k = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if k == 0 {
            break;
        }
        h = fnv1a64_update(h, &buf[..k]);
        n += k as u64;
    }
    Ok(SourceFingerprint {
        fnv1a64: h,
        bytes: n,
    })
}

/// How [`open_or_build_text_cache`] got its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheStatus {
    /// The cache for this content and tokenizer existed and was read.
    Reused(PathBuf),
    /// The source was tokenised and the cache written.
    Built(PathBuf),
    /// The source was tokenised; the cache could not be written (the reason), tokens in memory.
    Uncached(String),
}

fn cache_prefix(source: &Path, tokenizer: TokenizerId) -> Option<(PathBuf, String)> {
    let name = source.file_name()?.to_string_lossy().into_owned();
    let dir = source.parent().unwrap_or(Path::new("")).to_path_buf();
    Some((dir, format!(".{name}.{}-", tokenizer.name())))
}

/// Where the cache of `source` with `fingerprint` for `tokenizer` lives.
pub fn text_cache_path(
    source: &Path,
    tokenizer: TokenizerId,
    fingerprint: SourceFingerprint,
) -> Result<PathBuf> {
    let (dir, prefix) = cache_prefix(source, tokenizer)
        .ok_or_else(|| DataError::InvalidArgument(format!("{} names no file", source.display())))?;
    Ok(dir.join(format!(
        "{prefix}{:016x}-{}.tok",
        fingerprint.fnv1a64, fingerprint.bytes
    )))
}

/// Tokenise text as the CLI's plain-text data does: text8 normalises first (lower case, a–z and
/// single spaces), the others take the text as it is (invalid UTF-8 repaired).
pub fn tokenize_text(bytes: &[u8], tokenizer: TokenizerId) -> Result<Vec<u32>> {
    let tok = AnyTokenizer::new(tokenizer)?;
    let text = String::from_utf8_lossy(bytes);
    match tokenizer {
        TokenizerId::Text8 => tok.encode(&normalize_text8(&text)),
        _ => tok.encode(&text),
    }
}

/// The tokens of the plain-text file `source` under `tokenizer`: from its cache when one of this
/// content exists, else tokenised and cached (see the module docs).
pub fn open_or_build_text_cache(
    source: &Path,
    tokenizer: TokenizerId,
) -> Result<(TokenFile, CacheStatus)> {
    let fp = source_fingerprint(source)?;
    let cache = text_cache_path(source, tokenizer, fp)?;
    if let Ok(f) = TokenFile::open(&cache) {
        if f.tokenizer() == tokenizer {
            return Ok((f, CacheStatus::Reused(cache)));
        }
    }
    let bytes = crate::fsutil::read_file(source)?;
    // The file may have changed since it was fingerprinted: key the cache by what is tokenised.
    let fp = SourceFingerprint {
        fnv1a64: fnv1a64(&bytes),
        bytes: bytes.len() as u64,
    };
    let cache = text_cache_path(source, tokenizer, fp)?;
    let ids = tokenize_text(&bytes, tokenizer)?;
    drop(bytes);
    let vocab = AnyTokenizer::new(tokenizer)?.vocab()?;
    match TokenFile::write(&cache, &ids, vocab, tokenizer) {
        Ok(f) => {
            remove_other_caches(source, tokenizer, &cache);
            Ok((f, CacheStatus::Built(cache)))
        }
        Err(e) => Ok((
            TokenFile::from_tokens(&ids, vocab, tokenizer)?,
            CacheStatus::Uncached(e.to_string()),
        )),
    }
}

/// Remove caches of `source` for `tokenizer` other than `keep` (older contents).
fn remove_other_caches(source: &Path, tokenizer: TokenizerId, keep: &Path) {
    let Some((dir, prefix)) = cache_prefix(source, tokenizer) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix)
            && name.ends_with(".tok")
            && e.file_name() != keep.file_name().unwrap_or_default()
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
