//! A keyed pseudo-random permutation of `0..n` in O(1) memory: a 4-round Feistel network on the
//! smallest even-bit power-of-two domain ≥ n, with cycle walking back into `0..n`. It lets the
//! window sampler visit every window once per epoch in shuffled order (as the text8 pipeline's
//! global shuffle does, §9.1) and resume at any index without storing the shuffle.

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 4],
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser.
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Permutation {
    /// A permutation of `0..n` (n ≥ 1) keyed by `keys`.
    pub fn new(n: u64, keys: [u64; 4]) -> Self {
        let bits = 64 - (n.max(2) - 1).leading_zeros(); // ceil(log2 n), ≥ 1
        let bits = bits + (bits & 1); // even, so both halves have equal width
        Self {
            n,
            half_bits: bits / 2,
            keys,
        }
    }

    fn feistel(&self, x: u64) -> u64 {
        let h = self.half_bits;
        let mask = (1u64 << h) - 1;
        let (mut l, mut r) = (x >> h, x & mask);
        for &k in &self.keys {
            let f = mix(r ^ k) & mask;
            (l, r) = (r, l ^ f);
        }
        (l << h) | r
    }

    /// The image of `i < n`.
    pub fn apply(&self, i: u64) -> u64 {
        let mut x = self.feistel(i);
        // Cycle walking: the domain is < 4n, so this loop is short in expectation.
        while x >= self.n {
            x = self.feistel(x);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_a_bijection_for_many_sizes() {
        for n in [1u64, 2, 3, 5, 16, 17, 100, 1000, 4097] {
            let p = Permutation::new(n, [1, 2, 3, n]);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i) as usize;
                assert!(!seen[j], "n = {n}: {j} hit twice");
                seen[j] = true;
            }
        }
    }

    #[test]
    fn different_keys_shuffle_differently() {
        let a = Permutation::new(1000, [1, 2, 3, 4]);
        let b = Permutation::new(1000, [5, 6, 7, 8]);
        let same = (0..1000).filter(|&i| a.apply(i) == b.apply(i)).count();
        // Two independent random permutations agree on ~1 point on average.
        assert!(same < 20, "{same} fixed agreements");
    }
}
