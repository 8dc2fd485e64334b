//! The backend-agnostic denoiser interface: x_t (input ids, mask = V), one time per sequence and
//! an optional class label per sequence → log μ_θ over the V real tokens at every position
//! (paper §4, mean parameterisation). Samplers and evaluators use only this trait.

use crate::{ProcessError, Vocab};

/// A batch of noisy sequences to denoise, row-major `[batch, len]`.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseBatch<'a> {
    /// Input ids in `0..=V` (V is the mask), `batch * len` of them.
    pub ids: &'a [u32],
    pub batch: usize,
    pub len: usize,
    /// One time t ∈ [0, 1] per sequence (ignored by time-free denoisers).
    pub t: &'a [f64],
    /// Optional class label per sequence.
    pub labels: Option<&'a [u32]>,
}

impl DenoiseBatch<'_> {
    /// Check the slice lengths and ids against `vocab`.
    pub fn validate(&self, vocab: Vocab) -> Result<(), ProcessError> {
        if self.ids.len() != self.batch * self.len {
            return Err(ProcessError::Shape(format!(
                "{} ids for batch {} x len {}",
                self.ids.len(),
                self.batch,
                self.len
            )));
        }
        if self.t.len() != self.batch {
            return Err(ProcessError::Shape(format!(
                "{} times for batch {}",
                self.t.len(),
                self.batch
            )));
        }
        if let Some(l) = self.labels {
            if l.len() != self.batch {
                return Err(ProcessError::Shape(format!(
                    "{} labels for batch {}",
                    l.len(),
                    self.batch
                )));
            }
        }
        if let Some(&bad) = self.ids.iter().find(|&&i| i > vocab.mask_id()) {
            return Err(ProcessError::TokenOutOfRange {
                id: bad as u64,
                vocab: vocab.size(),
            });
        }
        Ok(())
    }
}

/// Normalised log-probabilities log μ, row-major `[batch, len, vocab]`, f32 (network precision;
/// consumers convert to f64 before sampling).
#[derive(Debug, Clone, PartialEq)]
pub struct LogProbs {
    pub data: Vec<f32>,
    pub batch: usize,
    pub len: usize,
    pub vocab: usize,
}

impl LogProbs {
    /// log μ at sequence `b`, position `n`.
    pub fn row(&self, b: usize, n: usize) -> &[f32] {
        let o = (b * self.len + n) * self.vocab;
        &self.data[o..o + self.vocab]
    }
    /// μ at (b, n) in f64, renormalised in f64 so it sums to 1 to machine precision.
    pub fn probs_f64(&self, b: usize, n: usize) -> Vec<f64> {
        let row = self.row(b, n);
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        let mut p: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        p
    }
}

/// log μ at chosen positions only: the answer to [`Denoiser::log_probs_rows`]. Row `k` of
/// sequence `b` is position `positions[offsets[b] + k]`; rows are row-major `[rows, vocab]`, f32.
#[derive(Debug, Clone, PartialEq)]
pub struct RowLogProbs {
    pub data: Vec<f32>,
    /// `batch + 1` offsets into `positions`: sequence b's rows are `offsets[b]..offsets[b + 1]`.
    pub offsets: Vec<usize>,
    /// The requested positions, sequence after sequence, each sequence's in increasing order.
    pub positions: Vec<usize>,
    pub vocab: usize,
}

impl RowLogProbs {
    /// Check `rows` (one list per sequence of a `batch × len` input, strictly increasing
    /// positions `< len`) and flatten it into (offsets, positions).
    pub fn layout(
        rows: &[Vec<usize>],
        batch: usize,
        len: usize,
    ) -> Result<(Vec<usize>, Vec<usize>), ProcessError> {
        if rows.len() != batch {
            return Err(ProcessError::Shape(format!(
                "{} row lists for batch {batch}",
                rows.len()
            )));
        }
        let mut offsets = Vec::with_capacity(batch + 1);
        let mut positions = Vec::with_capacity(rows.iter().map(Vec::len).sum());
        offsets.push(0);
        for r in rows {
            if r.windows(2).any(|w| w[0] >= w[1]) || r.last().is_some_and(|&p| p >= len) {
                return Err(ProcessError::Shape(format!(
                    "row positions {r:?} are not increasing positions below {len}"
                )));
            }
            positions.extend_from_slice(r);
            offsets.push(positions.len());
        }
        Ok((offsets, positions))
    }

    /// The requested rows of a full output `out` (what a denoiser without a row-restricted
    /// forward answers).
    pub fn select(out: &LogProbs, rows: &[Vec<usize>]) -> Result<Self, ProcessError> {
        let (offsets, positions) = Self::layout(rows, out.batch, out.len)?;
        let mut data = Vec::with_capacity(positions.len() * out.vocab);
        for (b, r) in rows.iter().enumerate() {
            for &n in r {
                data.extend_from_slice(out.row(b, n));
            }
        }
        Ok(Self {
            data,
            offsets,
            positions,
            vocab: out.vocab,
        })
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.offsets.len() - 1
    }

    /// log μ at sequence `b`, position `n`, if that position was requested.
    pub fn find(&self, b: usize, n: usize) -> Option<&[f32]> {
        let (lo, hi) = (self.offsets[b], self.offsets[b + 1]);
        let k = self.positions[lo..hi].binary_search(&n).ok()?;
        let o = (lo + k) * self.vocab;
        Some(&self.data[o..o + self.vocab])
    }

    /// Whether every position of `wanted` was requested for sequence `b`.
    pub fn has_all(&self, b: usize, wanted: &[usize]) -> bool {
        let have = &self.positions[self.offsets[b]..self.offsets[b + 1]];
        wanted.iter().all(|n| have.binary_search(n).is_ok())
    }
}

/// A network (or any hand-written model) that predicts x_0 from x_t.
pub trait Denoiser {
    /// The vocabulary of real tokens it predicts over.
    fn vocab(&self) -> Vocab;
    /// Whether the output depends on t. A time-free denoiser lets samplers reuse outputs while
    /// x_t is unchanged (cached / first-hitting sampling).
    fn is_time_conditioned(&self) -> bool;
    /// Number of class labels it accepts (0 = unconditional).
    fn num_classes(&self) -> usize {
        0
    }
    /// log μ_θ(x_t, t) at every position of every sequence of the batch.
    fn log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError>;
    /// log μ_θ(x_t, t) at only the positions `rows[b]` (strictly increasing) of each sequence
    /// b — the same values as the matching rows of [`Self::log_probs`] (up to float rounding).
    /// A sampler asks for the positions it reads: in the MD4 reverse step which positions
    /// unmask does not depend on the network (paper Alg. 2), so ancestral-type steps ask for
    /// their reveals only; steps that rank or reveal by μ (confidence, threshold, GenMD4) ask
    /// for the masked positions; no step reads a decoded one. The default runs the full forward
    /// and selects; a network may skip work (see `maskdiff_network`, which runs its last block
    /// only at those rows).
    fn log_probs_rows(
        &mut self,
        batch: &DenoiseBatch<'_>,
        rows: &[Vec<usize>],
    ) -> Result<RowLogProbs, ProcessError> {
        let out = self.log_probs(batch)?;
        if out.batch != batch.batch
            || out.len != batch.len
            || out.data.len() != out.batch * out.len * out.vocab
        {
            return Err(ProcessError::Shape(format!(
                "denoiser returned [{}, {}, {}] ({} values) for a batch of [{}, {}]",
                out.batch,
                out.len,
                out.vocab,
                out.data.len(),
                batch.batch,
                batch.len
            )));
        }
        RowLogProbs::select(&out, rows)
    }
}

impl<D: Denoiser + ?Sized> Denoiser for &mut D {
    fn vocab(&self) -> Vocab {
        (**self).vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        (**self).is_time_conditioned()
    }
    fn num_classes(&self) -> usize {
        (**self).num_classes()
    }
    fn log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        (**self).log_probs(batch)
    }
    fn log_probs_rows(
        &mut self,
        batch: &DenoiseBatch<'_>,
        rows: &[Vec<usize>],
    ) -> Result<RowLogProbs, ProcessError> {
        (**self).log_probs_rows(batch, rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_selection_by_hand() {
        // 2 sequences × 3 positions × V = 2, value = 10·b + n + v/10
        let data: Vec<f32> = (0..2)
            .flat_map(|b| {
                (0..3).flat_map(move |n| (0..2).map(move |v| (10 * b + n) as f32 + v as f32 / 10.0))
            })
            .collect();
        let full = LogProbs {
            data,
            batch: 2,
            len: 3,
            vocab: 2,
        };
        let rows = vec![vec![0, 2], vec![1]];
        let r = RowLogProbs::select(&full, &rows).unwrap();
        assert_eq!(r.offsets, vec![0, 2, 3]);
        assert_eq!(r.positions, vec![0, 2, 1]);
        assert_eq!(r.data, vec![0.0, 0.1, 2.0, 2.1, 11.0, 11.1]);
        assert_eq!(r.batch(), 2);
        assert_eq!(r.find(0, 2), Some(&[2.0, 2.1][..]));
        assert_eq!(r.find(1, 1), Some(&[11.0, 11.1][..]));
        assert_eq!(r.find(0, 1), None);
        assert!(r.has_all(0, &[2, 0]) && !r.has_all(1, &[0]) && r.has_all(1, &[]));
        for bad in [
            vec![vec![0]],
            vec![vec![1, 0], vec![]],
            vec![vec![0, 0], vec![]],
            vec![vec![], vec![3]],
        ] {
            assert!(RowLogProbs::select(&full, &bad).is_err(), "{bad:?}");
        }
    }
}
