//! Batches of token windows (MD4 §9.1): training draws windows of length L from a split — every
//! overlapping start offset once per epoch, in a seeded shuffled order that can be resumed from a
//! saved (epoch, index) position; evaluation walks consecutive non-overlapping chunks, tail dropped.

use std::ops::Range;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::permutation::Permutation;
use crate::tokenfile::TokenFile;

/// A row-major `[batch, len]` block of real token ids (what `maskdiff_process::DenoiseBatch` takes),
/// with where each row came from and optional class labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    /// Per row: the start offset in the token file (text) or the item index (images).
    pub offsets: Vec<usize>,
    /// Per row class labels, when the data has them.
    pub labels: Option<Vec<u32>>,
}

impl TokenBatch {
    /// Row `b`; an error when `b` is not a row of the batch (or the batch's fields disagree).
    pub fn row(&self, b: usize) -> Result<&[u32]> {
        let range = b
            .checked_mul(self.len)
            .and_then(|s| Some(s..s.checked_add(self.len)?));
        match range {
            Some(r) if b < self.batch => self.ids.get(r).ok_or_else(|| {
                DataError::InvalidArgument(format!(
                    "batch of {} ids is too short for row {b} of length {}",
                    self.ids.len(),
                    self.len
                ))
            }),
            _ => Err(DataError::InvalidArgument(format!(
                "row {b} of a batch of {} rows",
                self.batch
            ))),
        }
    }
}

fn check_window(range: &Range<usize>, window: usize) -> Result<()> {
    if window == 0 {
        return Err(DataError::InvalidArgument(
            "window length must be >= 1".into(),
        ));
    }
    if range.start > range.end || range.len() < window {
        return Err(DataError::TooShort {
            len: range.end.saturating_sub(range.start),
            window,
        });
    }
    Ok(())
}

/// Everything needed to resume a [`WindowSampler`] exactly (serialise it with the checkpoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSamplerState {
    pub seed: u64,
    pub range_start: usize,
    pub range_end: usize,
    pub window: usize,
    /// Completed passes over all windows.
    pub epoch: u64,
    /// Windows already drawn in the current epoch.
    pub index: u64,
}

/// Seeded random windows of length `window` from `range`: each of the `len − window + 1` start
/// offsets exactly once per epoch, in an order that depends only on (seed, epoch).
#[derive(Debug, Clone)]
pub struct WindowSampler {
    state: WindowSamplerState,
    perm: Permutation,
}

fn epoch_permutation(seed: u64, epoch: u64, n: u64) -> Permutation {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    let keys = [
        rng.next_u64(),
        rng.next_u64(),
        rng.next_u64(),
        rng.next_u64(),
    ];
    Permutation::new(n, keys)
}

impl WindowSampler {
    /// A sampler at the start of epoch 0.
    pub fn new(range: Range<usize>, window: usize, seed: u64) -> Result<Self> {
        Self::from_state(WindowSamplerState {
            seed,
            range_start: range.start,
            range_end: range.end,
            window,
            epoch: 0,
            index: 0,
        })
    }

    /// Resume from a saved state.
    pub fn from_state(state: WindowSamplerState) -> Result<Self> {
        check_window(&(state.range_start..state.range_end), state.window)?;
        let n = (state.range_end - state.range_start - state.window + 1) as u64;
        if state.index >= n {
            return Err(DataError::InvalidArgument(format!(
                "sampler index {} >= {} windows",
                state.index, n
            )));
        }
        let perm = epoch_permutation(state.seed, state.epoch, n);
        Ok(Self { state, perm })
    }

    /// The state to save; [`WindowSampler::from_state`] continues from exactly here.
    pub fn state(&self) -> &WindowSamplerState {
        &self.state
    }

    /// Number of distinct windows (start offsets) per epoch.
    pub fn num_windows(&self) -> u64 {
        (self.state.range_end - self.state.range_start - self.state.window + 1) as u64
    }

    /// The start offset of the next window; advances the position.
    pub fn next_start(&mut self) -> usize {
        let start = self.state.range_start + self.perm.apply(self.state.index) as usize;
        self.state.index += 1;
        if self.state.index == self.num_windows() {
            self.state.index = 0;
            self.state.epoch += 1;
            self.perm = epoch_permutation(self.state.seed, self.state.epoch, self.num_windows());
        }
        start
    }

    /// The next `batch` windows of `file` as one `[batch, window]` batch.
    pub fn next_batch(&mut self, file: &TokenFile, batch: usize) -> Result<TokenBatch> {
        if self.state.range_end > file.len() {
            return Err(DataError::InvalidArgument(format!(
                "sampler range ends at {} but the file has {} tokens",
                self.state.range_end,
                file.len()
            )));
        }
        let len = self.state.window;
        let mut ids = Vec::with_capacity(batch * len);
        let mut offsets = Vec::with_capacity(batch);
        for _ in 0..batch {
            let s = self.next_start();
            file.read_into(s..s + len, &mut ids)?;
            offsets.push(s);
        }
        Ok(TokenBatch {
            ids,
            batch,
            len,
            offsets,
            labels: None,
        })
    }
}

/// Consecutive non-overlapping chunks of length `len` covering `range`, the tail dropped
/// (text8: 19,531 chunks of 256 per 5M-character split).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalChunks {
    range: Range<usize>,
    len: usize,
}

impl EvalChunks {
    pub fn new(range: Range<usize>, len: usize) -> Result<Self> {
        check_window(&range, len)?;
        Ok(Self { range, len })
    }
    /// Number of full chunks.
    pub fn count(&self) -> usize {
        self.range.len() / self.len
    }
    /// Chunk length.
    pub fn chunk_len(&self) -> usize {
        self.len
    }
    /// Offsets of chunk `i`; an error unless `i < count()`.
    pub fn chunk(&self, i: usize) -> Result<Range<usize>> {
        if i >= self.count() {
            return Err(DataError::InvalidArgument(format!(
                "evaluation chunk {i} of {}",
                self.count()
            )));
        }
        // i < count() = range.len() / len, so i·len + len ≤ range.len(): no overflow.
        let s = self.range.start + i * self.len;
        Ok(s..s + self.len)
    }
    /// Chunks `first..first + n` (clipped to the end) as one batch.
    pub fn batch(&self, file: &TokenFile, first: usize, n: usize) -> Result<TokenBatch> {
        let end = first.saturating_add(n).min(self.count());
        let first = first.min(end);
        let mut ids = Vec::with_capacity((end - first) * self.len);
        let mut offsets = Vec::with_capacity(end - first);
        for i in first..end {
            let r = self.chunk(i)?;
            offsets.push(r.start);
            file.read_into(r, &mut ids)?;
        }
        Ok(TokenBatch {
            ids,
            batch: end - first,
            len: self.len,
            offsets,
            labels: None,
        })
    }
    /// All chunks in batches of `batch` (the last one may be smaller).
    pub fn batches<'a>(
        &'a self,
        file: &'a TokenFile,
        batch: usize,
    ) -> impl Iterator<Item = Result<TokenBatch>> + 'a {
        let b = batch.max(1);
        (0..self.count())
            .step_by(b)
            .map(move |first| self.batch(file, first, b))
    }
}
