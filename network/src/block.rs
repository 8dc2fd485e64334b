//! The attention structure of block diffusion (BD3-LM: Arriola et al., ICLR 2025, "Block
//! Diffusion", §3.2 and App. B.6): the network runs once on 2N positions, the noised sequence
//! x_t (positions `0..N`) followed by the clean x_0 (positions `N..2N`), both cut into blocks of
//! `B` tokens (the last block may be shorter). The mask is the union of three parts:
//!
//! * block-diagonal (M_BD): a noised token attends to the noised tokens of its own block;
//! * offset block-causal (M_OBC): a noised token of block b attends to the clean blocks < b;
//! * block-causal (M_BC): a clean token of block b attends to the clean blocks ≤ b.
//!
//! So block b's prediction depends only on x_t of block b and x_0 of the blocks before it: one
//! forward pass gives every block's MD4 denoiser conditioned on the clean prefix. Both copies use
//! the same RoPE positions (`n mod N`), so a clean token is encoded exactly as a key/value cache of
//! the prefix would encode it at sampling time.

use std::ops::Range;

/// The BD3-LM mask over `2 · len` positions with blocks of `block` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMask {
    /// N: the length of one copy (noised or clean).
    pub len: usize,
    /// B: tokens per block (≥ 1).
    pub block: usize,
}

impl BlockMask {
    /// The mask for sequences of `len` tokens cut into blocks of `block`; `None` if either is 0.
    pub fn new(len: usize, block: usize) -> Option<Self> {
        (len > 0 && block > 0).then_some(Self { len, block })
    }

    /// Number of positions the network runs on (2N).
    pub fn positions(&self) -> usize {
        2 * self.len
    }

    /// The keys query `i` (in `0..2N`) may attend to, as two index ranges (either may be empty):
    /// for a noised query of block b, the clean blocks < b and its own noised block; for a clean
    /// query of block b, the clean blocks ≤ b and nothing else. Clean keys come first so that a
    /// row is laid out as the sampler's (cached prefix, current block).
    pub fn key_ranges(&self, i: usize) -> [Range<usize>; 2] {
        let (n, bs) = (self.len, self.block);
        if i < n {
            let start = (i / bs) * bs;
            let end = (start + bs).min(n);
            [n..n + start, start..end]
        } else {
            let end = (((i - n) / bs) * bs + bs).min(n);
            [n..n + end, 0..0]
        }
    }

    /// Whether query `i` attends to key `j` (both in `0..2N`).
    pub fn allowed(&self, i: usize, j: usize) -> bool {
        self.key_ranges(i).iter().any(|r| r.contains(&j))
    }

    /// The RoPE position of each of the 2N positions: the clean copy repeats the noised one.
    pub fn rope_positions(&self) -> Vec<usize> {
        (0..self.len).chain(0..self.len).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's three masks, position by position, from block indices alone.
    fn brute_force(n: usize, bs: usize, i: usize, j: usize) -> bool {
        let noised = |p: usize| p < n;
        let block = |p: usize| if p < n { p / bs } else { (p - n) / bs };
        let bd = noised(i) && noised(j) && block(i) == block(j);
        let obc = noised(i) && !noised(j) && block(j) < block(i);
        let bc = !noised(i) && !noised(j) && block(j) <= block(i);
        bd || obc || bc
    }

    #[test]
    fn mask_equals_the_three_part_definition() {
        for n in 1..=13 {
            for bs in 1..=n + 2 {
                let m = BlockMask::new(n, bs).unwrap();
                for i in 0..2 * n {
                    let mut row = 0;
                    for j in 0..2 * n {
                        let want = brute_force(n, bs, i, j);
                        assert_eq!(m.allowed(i, j), want, "n {n} B {bs} ({i}, {j})");
                        row += want as usize;
                    }
                    // every row attends to something (the softmax is defined)
                    assert!(row > 0);
                    // the ranges are disjoint and inside 0..2N
                    let [a, b] = m.key_ranges(i);
                    assert_eq!(a.len() + b.len(), row);
                    assert!(a.end <= 2 * n && b.end <= 2 * n);
                }
            }
        }
        // B = N: the noised half is plain bidirectional attention over itself
        let m = BlockMask::new(4, 4).unwrap();
        assert!((0..4).all(|i| (0..8).all(|j| m.allowed(i, j) == (j < 4))));
        assert!(BlockMask::new(0, 1).is_none() && BlockMask::new(3, 0).is_none());
        let pos = BlockMask::new(3, 2).unwrap().rope_positions();
        assert_eq!(pos, [0, 1, 2, 0, 1, 2]);
    }
}
