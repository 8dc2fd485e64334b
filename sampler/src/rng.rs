//! A counter-based random number generator: every uniform is a pure hash of
//! (seed, sequence index, step, position, lane), so a sequence's sample does not depend on which
//! other sequences share its batch, on the batch size, or on the order of evaluation
//! (spec §6.1 folds the step index into the key in the same spirit).
//!
//! The hash chains SplitMix64's finaliser (Steele, Lea & Flood 2014), a bijection on u64 with full
//! avalanche; the top 53 bits become an f64 in [0, 1).

/// Independent random streams for the different draws made at one (sequence, step, position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum Lane {
    /// The (V+1)-way ancestral draw, or the reveal coin of the two-stage sampler.
    Reveal = 1,
    /// The token draw (two-stage, first-hitting and confidence samplers).
    Token = 2,
    /// The first-hitting sampler's per-position reveal-step draw.
    Hit = 3,
    /// ReMDM's remasking coin for a revealed position.
    Remask = 4,
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A keyed, stateless source of uniforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRng {
    seed: u64,
}

impl CounterRng {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// 64 random bits for one key.
    pub fn bits(&self, sequence: u64, step: u64, position: u64, lane: Lane) -> u64 {
        let mut h = mix64(self.seed.wrapping_add(GOLDEN));
        // Each field is pre-mixed with its own offset so that equal values in different fields
        // give different contributions.
        for (k, w) in [sequence, step, position, lane as u64]
            .into_iter()
            .enumerate()
        {
            let salt = GOLDEN.wrapping_mul(k as u64 + 2);
            h = mix64(h ^ mix64(w.wrapping_add(salt)));
        }
        h
    }
    /// A uniform in [0, 1) with 53 random bits.
    pub fn uniform(&self, sequence: u64, step: u64, position: u64, lane: Lane) -> f64 {
        (self.bits(sequence, step, position, lane) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniforms_are_in_range_and_roughly_uniform() {
        // 10 equal bins over 100 000 draws: each count is Binomial(1e5, 0.1), sd ≈ 95; 6 sd bound.
        let r = CounterRng::new(7);
        let mut bins = [0usize; 10];
        for i in 0..100_000u64 {
            let u = r.uniform(i % 13, i / 13, i % 7, Lane::Reveal);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 10.0) as usize] += 1;
        }
        for b in bins {
            assert!((b as i64 - 10_000).abs() < 570, "bin count {b}");
        }
    }

    #[test]
    fn fields_and_lanes_give_different_streams() {
        let r = CounterRng::new(1);
        let a = r.bits(1, 2, 3, Lane::Reveal);
        assert_ne!(a, r.bits(2, 1, 3, Lane::Reveal));
        assert_ne!(a, r.bits(1, 3, 2, Lane::Reveal));
        assert_ne!(a, r.bits(1, 2, 3, Lane::Token));
        assert_ne!(a, CounterRng::new(2).bits(1, 2, 3, Lane::Reveal));
        assert_eq!(a, r.bits(1, 2, 3, Lane::Reveal));
    }
}
