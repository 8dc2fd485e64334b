//! IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed: a 4-byte magic
//! `00 00 08 ndims` (unsigned bytes only), `ndims` big-endian u32 sizes, then the data.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{ImageSet, ImageShape};
use crate::error::{DataError, Result};
use crate::fsutil::{is_gzip, read_capped, read_file, MAX_DECOMPRESSED_BYTES};
use crate::split::Split;

/// An n-dimensional array of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Decompress a gzip'd IDX stream, reading no more than its header declares (computed with
/// checked arithmetic) plus one byte, and never more than [`MAX_DECOMPRESSED_BYTES`]; a larger
/// declaration or a longer stream is an error before anything big is allocated.
fn gunzip_idx(gz: &[u8], what: &str) -> Result<Vec<u8>> {
    let mut dec = flate2::read::MultiGzDecoder::new(gz);
    let mut out = Vec::new();
    // Magic (4 bytes), then the dimensions it announces.
    read_capped(&mut (&mut dec).take(4), &mut out, 4, what)?;
    if out.len() < 4 {
        return Ok(out); // too short: parse_idx reports it
    }
    let nd = out[3] as u64;
    read_capped(&mut (&mut dec).take(4 * nd), &mut out, 4 * nd, what)?;
    if (out.len() as u64) < 4 + 4 * nd || out[0] != 0 || out[1] != 0 {
        return Ok(out); // truncated header or bad magic: parse_idx reports it
    }
    let declared = (0..nd as usize)
        .map(|k| {
            let o = 4 + 4 * k;
            u32::from_be_bytes([out[o], out[o + 1], out[o + 2], out[o + 3]]) as u64
        })
        .try_fold(1u64, |a, d| a.checked_mul(d))
        .filter(|&n| n <= MAX_DECOMPRESSED_BYTES)
        .ok_or_else(|| DataError::BadHeader {
            what: what.to_string(),
            detail: format!("the header declares more than {MAX_DECOMPRESSED_BYTES} bytes of data"),
        })?;
    read_capped(&mut dec, &mut out, declared, what)?;
    Ok(out)
}

/// Parse IDX bytes (gzip is detected and decompressed, capped by the header's declared size).
pub fn parse_idx(bytes: &[u8], what: &str) -> Result<IdxArray> {
    let bytes = if is_gzip(bytes) {
        gunzip_idx(bytes, what)?
    } else {
        bytes.to_vec()
    };
    let bad = |detail: String| DataError::BadHeader {
        what: what.to_string(),
        detail,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::BadMagic {
            what: what.to_string(),
            found: bytes[..bytes.len().min(4)].to_vec(),
        });
    }
    if bytes[2] != 0x08 {
        return Err(bad(format!(
            "element type {:#04x} (only unsigned bytes, 0x08, are supported)",
            bytes[2]
        )));
    }
    let nd = bytes[3] as usize;
    if nd == 0 {
        return Err(bad("zero dimensions".into()));
    }
    let head = 4 + 4 * nd;
    if bytes.len() < head {
        return Err(DataError::WrongSize {
            what: what.to_string(),
            expected: head as u64,
            found: bytes.len() as u64,
        });
    }
    let dims: Vec<usize> = (0..nd)
        .map(|k| {
            let o = 4 + 4 * k;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
    let expected = (head as u64).saturating_add(count as u64);
    if expected != bytes.len() as u64 {
        return Err(DataError::WrongSize {
            what: what.to_string(),
            expected,
            found: bytes.len() as u64,
        });
    }
    Ok(IdxArray {
        dims,
        data: bytes[head..].to_vec(),
    })
}

/// Read an IDX file (plain or .gz).
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    parse_idx(&read_file(path)?, &path.display().to_string())
}

/// An 8-bit greyscale image set (V = 256) from an IDX images file (dims n × rows × cols) and an
/// optional IDX labels file (dims n, classes 0..=9).
pub fn load_idx_dataset(images: &Path, labels: Option<&Path>) -> Result<ImageSet> {
    let img = read_idx(images)?;
    if img.dims.len() != 3 {
        return Err(DataError::BadHeader {
            what: images.display().to_string(),
            detail: format!("images need 3 dimensions, found {:?}", img.dims),
        });
    }
    let (n, h, w) = (img.dims[0], img.dims[1], img.dims[2]);
    if h == 0 || w == 0 {
        return Err(DataError::BadHeader {
            what: images.display().to_string(),
            detail: format!("empty {h}x{w} images"),
        });
    }
    let labels = match labels {
        None => None,
        Some(p) => {
            let lab = read_idx(p)?;
            let what = p.display().to_string();
            if lab.dims != [n] {
                return Err(DataError::BadHeader {
                    what,
                    detail: format!("labels {:?} for {n} images", lab.dims),
                });
            }
            if let Some(pos) = lab.data.iter().position(|&l| l > 9) {
                return Err(DataError::Parse {
                    what,
                    line: pos,
                    detail: format!("label {} is not a class 0..=9", lab.data[pos]),
                });
            }
            Some(lab.data)
        }
    };
    Ok(ImageSet {
        shape: ImageShape {
            height: h,
            width: w,
            channels: 1,
            levels: 256,
        },
        tokens: img.data,
        num_classes: if labels.is_some() { 10 } else { 0 },
        labels,
    })
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [format!("{stem}.gz"), stem.to_string()] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(DataError::MissingFile(dir.join(format!("{stem}[.gz]"))))
}

/// Fashion-MNIST (or MNIST) from `dir` holding the standard file names
/// (`train-images-idx3-ubyte[.gz]`, `t10k-…`). `Split::Train` is the 60k training set; `Valid`
/// and `Test` both give the 10k test set (the dataset has no separate validation split).
pub fn load_fashion_mnist(dir: &Path, split: Split) -> Result<ImageSet> {
    let prefix = match split {
        Split::Train => "train",
        Split::Valid | Split::Test => "t10k",
    };
    let images = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    load_idx_dataset(&images, Some(&labels))
}
