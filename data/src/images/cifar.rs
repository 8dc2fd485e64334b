//! The CIFAR-10 binary batch format (`data_batch_{1..5}.bin`, `test_batch.bin`): records of one
//! label byte followed by 3072 bytes — the 32×32 red plane, then green, then blue. Tokens are
//! re-ordered to height × width × channel (MD4 §9.4 / TFDS layout), V = 256.

use std::path::Path;

use super::{ImageSet, ImageShape};
use crate::error::{DataError, Result};
use crate::fsutil::read_file;
use crate::split::Split;

/// Bytes per CIFAR-10 record.
pub const CIFAR10_RECORD_LEN: usize = 1 + 3 * 32 * 32;

/// Parse one or more concatenated CIFAR-10 binary batches.
pub fn parse_cifar10_batch(bytes: &[u8], what: &str) -> Result<ImageSet> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR10_RECORD_LEN) {
        return Err(DataError::WrongSize {
            what: what.to_string(),
            expected: (bytes.len() / CIFAR10_RECORD_LEN).max(1) as u64 * CIFAR10_RECORD_LEN as u64,
            found: bytes.len() as u64,
        });
    }
    let n = bytes.len() / CIFAR10_RECORD_LEN;
    let mut tokens = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(CIFAR10_RECORD_LEN).enumerate() {
        if rec[0] > 9 {
            return Err(DataError::Parse {
                what: what.to_string(),
                line: i,
                detail: format!("label {} is not a class 0..=9", rec[0]),
            });
        }
        labels.push(rec[0]);
        let planes = &rec[1..];
        for p in 0..1024 {
            tokens.extend_from_slice(&[planes[p], planes[1024 + p], planes[2048 + p]]);
        }
    }
    Ok(ImageSet {
        shape: ImageShape {
            height: 32,
            width: 32,
            channels: 3,
            levels: 256,
        },
        tokens,
        labels: Some(labels),
        num_classes: 10,
    })
}

/// CIFAR-10 from the directory of the binary version (the batches directly in `dir` or in
/// `dir/cifar-10-batches-bin`): `Train` = the five training batches in order, `Valid`/`Test` = the
/// test batch (MD4 evaluates on the test split, §9.4).
pub fn load_cifar10(dir: &Path, split: Split) -> Result<ImageSet> {
    let sub = dir.join("cifar-10-batches-bin");
    let base = if sub.is_dir() { sub } else { dir.to_path_buf() };
    let names: Vec<String> = match split {
        Split::Train => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
        Split::Valid | Split::Test => vec!["test_batch.bin".to_string()],
    };
    let mut bytes = Vec::new();
    for name in names {
        bytes.extend(read_file(&base.join(name))?);
    }
    parse_cifar10_batch(&bytes, &base.display().to_string())
}
