//! Document packing of the OpenWebText pipeline (MD4 §9.2): each document is tokenised and followed
//! by EOS, documents are concatenated into one stream, and the stream is cut into fixed blocks that
//! cross document boundaries (no BOS, no padding; the tail shorter than a block is dropped).
//! [`grouped_block_split`] holds out 2 % of the blocks of every 10,000 documents for evaluation,
//! as the official preparation script does.

use crate::error::{DataError, Result};

/// Concatenate tokenised documents, appending `eos` after each one.
pub fn pack_documents<I, D>(docs: I, eos: u32) -> Vec<u32>
where
    I: IntoIterator<Item = D>,
    D: AsRef<[u32]>,
{
    let mut out = Vec::new();
    for d in docs {
        out.extend_from_slice(d.as_ref());
        out.push(eos);
    }
    out
}

/// Cut a packed stream into consecutive blocks of `block_len` (tail dropped).
pub fn blocks(stream: &[u32], block_len: usize) -> Result<Vec<&[u32]>> {
    if block_len == 0 {
        return Err(DataError::InvalidArgument(
            "block length must be >= 1".into(),
        ));
    }
    Ok(stream.chunks_exact(block_len).collect())
}

/// The OpenWebText train/eval split of packed blocks (spec §9.2), as block indices into
/// [`blocks`] of the packed stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSplit {
    pub train: Vec<usize>,
    pub eval: Vec<usize>,
}

/// The official OWT preparation's split: documents (lengths `doc_lens` in tokens, each followed
/// by one EOS in the stream) are packed and cut into `block_len` blocks; after every
/// `group_docs` documents the blocks completed since the previous group (a block belongs to the
/// group during which its last token arrives; the final partial block is dropped) are shuffled
/// and `round(eval_fraction · count)` of them go to eval, the rest to train (official: 10,000
/// documents, 2 %). Groups keep their order; the shuffle of group g is seeded by (seed, g) with
/// a portable ChaCha8 stream. The rounding is this implementation's choice (the spec does not
/// state the official one).
pub fn grouped_block_split(
    doc_lens: &[usize],
    block_len: usize,
    group_docs: usize,
    eval_fraction: f64,
    seed: u64,
) -> Result<BlockSplit> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    if block_len == 0 || group_docs == 0 {
        return Err(DataError::InvalidArgument(
            "block length and documents per group must be >= 1".into(),
        ));
    }
    if !(eval_fraction.is_finite() && (0.0..=1.0).contains(&eval_fraction)) {
        return Err(DataError::InvalidArgument(format!(
            "eval fraction {eval_fraction} not in [0, 1]"
        )));
    }
    let mut split = BlockSplit {
        train: Vec::new(),
        eval: Vec::new(),
    };
    let (mut stream_len, mut done_blocks) = (0usize, 0usize);
    for (g, group) in doc_lens.chunks(group_docs).enumerate() {
        stream_len += group.iter().map(|&n| n + 1).sum::<usize>();
        let complete = stream_len / block_len;
        let mut ids: Vec<usize> = (done_blocks..complete).collect();
        done_blocks = complete;
        let key = seed ^ (g as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ids.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(key));
        let n_eval = (ids.len() as f64 * eval_fraction).round() as usize;
        split.eval.extend_from_slice(&ids[..n_eval]);
        split.train.extend_from_slice(&ids[n_eval..]);
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn packing_appends_eos_and_blocks_drop_the_tail() {
        let s = pack_documents([vec![1u32, 2], vec![3]], 9);
        assert_eq!(s, vec![1, 2, 9, 3, 9]);
        assert_eq!(blocks(&s, 2).unwrap(), vec![&[1, 2][..], &[9, 3][..]]);
        assert!(blocks(&s, 0).is_err());
    }

    #[test]
    fn groups_by_hand() {
        // 5 documents of 3 tokens (+ EOS = 4 each), blocks of 3, groups of 2 documents:
        // group 0 ends at stream offset 8 → blocks 0, 1; group 1 at 16 → blocks 2..5 (block 4
        // ends at 15); group 2 at 20 → block 5 (ends at 18); the tail (18..20) is dropped.
        let s = grouped_block_split(&[3; 5], 3, 2, 0.5, 7).unwrap();
        let mut all: Vec<usize> = s.train.iter().chain(&s.eval).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
        // per group round(0.5 · count), halves rounded away from zero: 1 of {0, 1}, 2 of
        // {2, 3, 4}, 1 of {5}
        assert_eq!(s.eval.len(), 4);
        assert!(s.eval[0] < 2 && s.eval[1..3].iter().all(|&b| (2..5).contains(&b)));
        assert_eq!(s.eval[3], 5);
        // same seed, same split; fraction 0 keeps everything for training
        assert_eq!(s, grouped_block_split(&[3; 5], 3, 2, 0.5, 7).unwrap());
        assert!(grouped_block_split(&[3; 5], 3, 2, 0.0, 7)
            .unwrap()
            .eval
            .is_empty());
        assert!(grouped_block_split(&[3; 5], 0, 2, 0.5, 7).is_err());
        assert!(grouped_block_split(&[3; 5], 3, 2, 1.5, 7).is_err());
    }

    proptest! {
        /// Every complete block of the packed stream lands in exactly one split, each group's
        /// eval share is round(fraction · its block count), and eval blocks of a group come
        /// from that group's blocks only.
        #[test]
        fn split_partitions_the_blocks(
            lens in proptest::collection::vec(0usize..40, 0..60),
            block_len in 1usize..17,
            group in 1usize..9,
            frac in 0.0f64..=1.0,
            seed in any::<u64>(),
        ) {
            let s = grouped_block_split(&lens, block_len, group, frac, seed).unwrap();
            let total: usize = lens.iter().map(|n| n + 1).sum::<usize>() / block_len;
            let mut all: Vec<usize> = s.train.iter().chain(&s.eval).copied().collect();
            all.sort();
            prop_assert_eq!(all, (0..total).collect::<Vec<_>>());
            // replay the group boundaries independently
            let (mut off, mut done, mut eval_pos) = (0usize, 0usize, 0usize);
            for g in lens.chunks(group) {
                off += g.iter().map(|n| n + 1).sum::<usize>();
                let count = off / block_len - done;
                let n_eval = (count as f64 * frac).round() as usize;
                for &b in &s.eval[eval_pos..eval_pos + n_eval] {
                    prop_assert!((done..done + count).contains(&b));
                }
                eval_pos += n_eval;
                done += count;
            }
            prop_assert_eq!(eval_pos, s.eval.len());
        }
    }
}
