//! Host-side parameter initialisers matching Flax's defaults as used by the official code
//! (spec §7.2): LeCun normal (truncated, variance 1/fan_in) for Dense layers, variance-scaled
//! truncated normal with scale 2/n_layers for the FFN (`depth_scaled_init`), N(0, 1/dim) for the
//! embedding, zeros for every adaLN-zero projection and the output layer, ones for RMSNorm scales.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Plain normal with this standard deviation.
    Normal(f64),
    /// Flax `variance_scaling(scale, "fan_in", "truncated_normal")`: a normal truncated to ±2σ,
    /// rescaled so that its variance is scale/fan_in.
    TruncatedFanIn {
        scale: f64,
        fan_in: usize,
    },
}

/// Flax's default Dense/Conv initialiser: LeCun normal (truncated, variance 1/fan_in).
pub(crate) fn lecun(fan_in: usize) -> Init {
    Init::TruncatedFanIn { scale: 1.0, fan_in }
}

/// Standard deviation of a unit normal truncated to [−2, 2] (Flax's correction constant).
const TRUNC_STD: f64 = 0.879_625_661_034_239_8;

impl Init {
    /// `n` values drawn in f64.
    pub fn sample<R: Rng + ?Sized>(self, n: usize, rng: &mut R) -> Vec<f64> {
        match self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal(std) => (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    std * z
                })
                .collect(),
            Init::TruncatedFanIn { scale, fan_in } => {
                let std = (scale / fan_in as f64).sqrt() / TRUNC_STD;
                (0..n)
                    .map(|_| loop {
                        let z: f64 = StandardNormal.sample(rng);
                        if z.abs() <= 2.0 {
                            break std * z;
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn truncated_fan_in_has_the_target_variance() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let xs = Init::TruncatedFanIn {
            scale: 2.0,
            fan_in: 50,
        }
        .sample(200_000, &mut rng);
        let var = xs.iter().map(|x| x * x).sum::<f64>() / xs.len() as f64;
        // target 2/50 = 0.04; std error of the variance estimate ≈ 0.04·sqrt(2/2e5) ≈ 1.3e-4
        assert!((var - 0.04).abs() < 1e-3, "var {var}");
        let bound = 2.0 * (0.04f64).sqrt() / TRUNC_STD;
        assert!(xs.iter().all(|x| x.abs() <= bound + 1e-12));
    }
}
