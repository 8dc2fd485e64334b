//! Exact categorical draws in f64 by inverse CDF (spec §6.2: unlike float32 Gumbel-max, no
//! category with positive probability is ever excluded), and the argmax used by the final fill.

/// The index `k` with `c_{k-1} <= u·Σp < c_k` for cumulative sums `c`; zero-probability categories
/// are never returned. `probs` must be non-negative with a positive sum, `u ∈ [0, 1)`.
pub fn inverse_cdf(probs: &[f64], u: f64) -> usize {
    let total: f64 = probs.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    for (k, &p) in probs.iter().enumerate() {
        cum += p;
        if target < cum {
            return k;
        }
    }
    // Rounding left `target` at the very top: the last category with positive mass.
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0)
}

/// The index of the largest value; ties go to the lowest index.
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (k, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = k;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_cdf_boundaries_by_hand() {
        let p = [0.25, 0.0, 0.5, 0.25];
        assert_eq!(inverse_cdf(&p, 0.0), 0);
        assert_eq!(inverse_cdf(&p, 0.2499), 0);
        assert_eq!(inverse_cdf(&p, 0.25), 2); // the zero-mass category 1 is skipped
        assert_eq!(inverse_cdf(&p, 0.7499), 2);
        assert_eq!(inverse_cdf(&p, 0.75), 3);
        assert_eq!(inverse_cdf(&p, 0.999_999_999), 3);
        // Unnormalised input is scaled by its total.
        assert_eq!(inverse_cdf(&[1.0, 3.0], 0.26), 1);
        assert_eq!(inverse_cdf(&[1.0, 3.0], 0.24), 0);
        // A trailing zero is never chosen even at the top of [0, 1).
        assert_eq!(inverse_cdf(&[0.5, 0.5, 0.0], 1.0 - f64::EPSILON), 1);
    }

    #[test]
    fn tiny_probabilities_are_reachable() {
        // A category of mass 1e-12 owns [1 − 1e-12, 1): f64 uniforms can land there.
        let p = [1.0 - 1e-12, 1e-12];
        assert_eq!(inverse_cdf(&p, 1.0 - 5e-13), 1);
    }

    #[test]
    fn argmax_ties_go_low() {
        assert_eq!(argmax(&[0.1, 0.4, 0.4, 0.1]), 1);
        assert_eq!(argmax(&[0.9]), 0);
    }
}
