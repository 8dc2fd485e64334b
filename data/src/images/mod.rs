//! Images as token sequences (MD4 §9.4): every pixel channel value is one token, in row-major
//! height × width × channels order (TFDS layout), V = number of intensity levels (256 for 8-bit
//! images, 17 for the 8×8 digits), mask id V. Class labels are kept for class-conditioning.
//! Decoding turns tokens back into 8-bit pixel arrays; writing PNGs is the CLI's job.

mod cifar;
mod digits;
mod idx;

pub use cifar::{load_cifar10, parse_cifar10_batch, CIFAR10_RECORD_LEN};
pub use digits::{load_digits, parse_digits_csv};
pub use idx::{load_fashion_mnist, load_idx_dataset, parse_idx, read_idx, IdxArray};

use maskdiff_process::Vocab;

use crate::batch::{TokenBatch, WindowSampler};
use crate::error::{DataError, Result};

/// Geometry and intensity levels of one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageShape {
    pub height: usize,
    pub width: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Intensity levels = V; token v stands for intensity v / (levels − 1).
    pub levels: u32,
}

/// Decoded 8-bit pixels, row-major height × width × channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

impl ImageShape {
    /// Tokens per image, H·W·C (saturating at `usize::MAX`; see
    /// [`ImageShape::checked_tokens_per_image`]).
    pub fn tokens_per_image(&self) -> usize {
        self.height
            .saturating_mul(self.width)
            .saturating_mul(self.channels)
    }
    /// The vocabulary (V = levels).
    pub fn vocab(&self) -> Result<Vocab> {
        Ok(Vocab::new(self.levels as usize)?)
    }
    /// Tokens per image, H·W·C, or `None` when the product overflows.
    pub fn checked_tokens_per_image(&self) -> Option<usize> {
        self.height
            .checked_mul(self.width)?
            .checked_mul(self.channels)
    }
    fn check_len(&self, n: usize) -> Result<()> {
        if self.height == 0 || self.width == 0 || !matches!(self.channels, 1 | 3) {
            return Err(DataError::InvalidArgument(format!(
                "a {}x{}x{} image (height and width must be >= 1, channels 1 or 3)",
                self.height, self.width, self.channels
            )));
        }
        if self.checked_tokens_per_image() != Some(n) {
            return Err(DataError::InvalidArgument(format!(
                "{n} tokens for a {}x{}x{} image",
                self.height, self.width, self.channels
            )));
        }
        if self.levels < 2 || self.levels > 256 {
            return Err(DataError::InvalidArgument(format!(
                "{} intensity levels cannot be shown as 8-bit pixels",
                self.levels
            )));
        }
        Ok(())
    }
    fn level_to_u8(&self, v: u32) -> u8 {
        // Round-to-nearest of v·255/(L−1) in integers.
        let l = self.levels - 1;
        ((v * 255 + l / 2) / l) as u8
    }
    /// Tokens → 8-bit pixels; ids ≥ levels (including the mask) are errors.
    pub fn decode(&self, ids: &[u32]) -> Result<Image> {
        self.check_len(ids.len())?;
        crate::tokenizer::check_ids(ids, self.levels as usize)?;
        Ok(Image {
            height: self.height,
            width: self.width,
            channels: self.channels,
            pixels: ids.iter().map(|&v| self.level_to_u8(v)).collect(),
        })
    }
    /// Tokens (mask id = levels allowed) → RGB pixels, masked pixels painted `mask_rgb`; for
    /// showing partially denoised samples.
    pub fn decode_with_mask(&self, ids: &[u32], mask_rgb: [u8; 3]) -> Result<Image> {
        self.check_len(ids.len())?;
        crate::tokenizer::check_ids(ids, self.levels as usize + 1)?;
        let mut pixels = Vec::with_capacity(self.height * self.width * 3);
        for px in ids.chunks_exact(self.channels) {
            if px.contains(&self.levels) {
                pixels.extend_from_slice(&mask_rgb);
            } else if self.channels == 3 {
                pixels.extend(px.iter().map(|&v| self.level_to_u8(v)));
            } else {
                let g = self.level_to_u8(px[0]);
                pixels.extend_from_slice(&[g, g, g]);
            }
        }
        Ok(Image {
            height: self.height,
            width: self.width,
            channels: 3,
            pixels,
        })
    }
}

/// A set of equally shaped images as tokens, with optional labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    pub shape: ImageShape,
    /// `len() · tokens_per_image` tokens, image after image.
    pub tokens: Vec<u8>,
    pub labels: Option<Vec<u8>>,
    /// Number of classes the labels range over (0 without labels).
    pub num_classes: usize,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        // A shape without tokens holds no images.
        self.tokens
            .len()
            .checked_div(self.shape.tokens_per_image())
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The tokens of image `i`.
    pub fn image(&self, i: usize) -> Option<&[u8]> {
        let n = self.shape.checked_tokens_per_image().filter(|&n| n > 0)?;
        let start = i.checked_mul(n)?;
        self.tokens.get(start..start.checked_add(n)?)
    }
    /// The label of image `i`.
    pub fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref()?.get(i).map(|&l| l as u32)
    }
    /// The given images as a `[batch, H·W·C]` batch (labels included when present).
    pub fn batch(&self, indices: &[usize]) -> Result<TokenBatch> {
        let n = self.shape.tokens_per_image();
        let mut ids = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            let img = self.image(i).ok_or_else(|| {
                DataError::InvalidArgument(format!("image {i} of {}", self.len()))
            })?;
            ids.extend(img.iter().map(|&v| v as u32));
        }
        let labels = match &self.labels {
            Some(l) => Some(
                indices
                    .iter()
                    .map(|&i| {
                        l.get(i).map(|&v| v as u32).ok_or_else(|| {
                            DataError::InvalidArgument(format!("no label for image {i}"))
                        })
                    })
                    .collect::<Result<Vec<u32>>>()?,
            ),
            None => None,
        };
        Ok(TokenBatch {
            ids,
            batch: indices.len(),
            len: n,
            offsets: indices.to_vec(),
            labels,
        })
    }
    /// A seeded, resumable shuffler over the images: each image once per epoch (a
    /// [`WindowSampler`] with windows of length 1 over `0..len`).
    pub fn sampler(&self, seed: u64) -> Result<WindowSampler> {
        WindowSampler::new(0..self.len(), 1, seed)
    }
    /// The next `batch` images from `sampler`.
    pub fn next_batch(&self, sampler: &mut WindowSampler, batch: usize) -> Result<TokenBatch> {
        let idx: Vec<usize> = (0..batch).map(|_| sampler.next_start()).collect();
        self.batch(&idx)
    }
}
