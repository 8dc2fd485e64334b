//! Reshaping the predicted distribution μ before drawing: temperature (μ^{1/τ}, renormalised) and
//! nucleus / top-p truncation (spec §6.2: keep the smallest set of tokens whose mass is ≥ p; here
//! tokens tied with the smallest kept probability are all kept, so the result does not depend on
//! an arbitrary order). Temperature is applied first, as is usual.

use crate::SamplerError;

/// The smallest positive temperature [`Shaping::new`] accepts; `0` (greedy) is accepted too.
///
/// μ^{1/τ} is computed as exp(ln μ/τ − max ln μ/τ). Below τ ≈ 5.6e-309 the factor 1/τ is
/// infinite and 0·∞ = NaN; below τ ≈ 1e-306, (ln μ)/τ overflows to −∞ for every token of a large
/// vocabulary and −∞ − (−∞) = NaN — either way NaN probabilities would reach the categorical
/// draw. At τ ≥ 1e-6, |ln μ|/τ ≤ 745·10⁶ stays finite for any μ, and such a τ already keeps
/// more than e⁻¹⁰ of the top token's mass only for tokens whose probability is within 0.001 % of
/// the top one: greedy in all but name. For greedy decoding use exactly 0.
pub const MIN_TEMPERATURE: f64 = 1e-6;

/// Temperature and top-p. `temperature = 1` and `top_p = 1` leave μ untouched;
/// `temperature = 0` is greedy (all mass on the argmax, ties to the lowest id); a positive
/// temperature must be at least [`MIN_TEMPERATURE`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shaping {
    temperature: f64,
    top_p: f64,
}

impl Shaping {
    pub const IDENTITY: Shaping = Shaping {
        temperature: 1.0,
        top_p: 1.0,
    };

    /// Checked: temperature 0 or finite and ≥ [`MIN_TEMPERATURE`], top-p finite in (0, 1].
    pub fn new(temperature: f64, top_p: f64) -> Result<Self, SamplerError> {
        if !(temperature.is_finite() && (temperature == 0.0 || temperature >= MIN_TEMPERATURE)) {
            return Err(SamplerError::BadTemperature(temperature));
        }
        if !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(SamplerError::BadTopP(top_p));
        }
        Ok(Self { temperature, top_p })
    }
    pub fn temperature(&self) -> f64 {
        self.temperature
    }
    pub fn top_p(&self) -> f64 {
        self.top_p
    }

    /// Apply to a normalised distribution `mu` (returns a normalised distribution).
    pub fn apply(&self, mut mu: Vec<f64>) -> Vec<f64> {
        if self.temperature == 0.0 {
            let k = crate::categorical::argmax(&mu);
            mu.iter_mut().for_each(|p| *p = 0.0);
            mu[k] = 1.0;
            return mu;
        }
        if self.temperature != 1.0 {
            let inv = 1.0 / self.temperature;
            // log μ / τ, shifted by its max so the largest term is exp(0) = 1.
            let logs: Vec<f64> = mu.iter().map(|p| p.ln() * inv).collect();
            let m = logs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            mu = logs.iter().map(|l| (l - m).exp()).collect();
            let z: f64 = mu.iter().sum();
            mu.iter_mut().for_each(|p| *p /= z);
        }
        if self.top_p < 1.0 {
            mu = top_p(mu, self.top_p);
        }
        mu
    }
}

/// Keep the smallest set of largest probabilities with mass ≥ `p` (plus ties with the smallest
/// kept one), zero the rest and renormalise. Returns `mu` unchanged if everything is kept.
pub fn top_p(mu: Vec<f64>, p: f64) -> Vec<f64> {
    let total: f64 = mu.iter().sum();
    let mut order: Vec<usize> = (0..mu.len()).collect();
    order.sort_by(|&a, &b| mu[b].total_cmp(&mu[a]).then(a.cmp(&b)));
    let mut cum = 0.0;
    let mut kept = 0;
    for &k in &order {
        cum += mu[k];
        kept += 1;
        if cum >= p * total {
            break;
        }
    }
    let threshold = mu[order[kept - 1]];
    while kept < order.len() && mu[order[kept]] == threshold {
        kept += 1;
    }
    if kept == order.len() {
        return mu;
    }
    let mut out = vec![0.0; mu.len()];
    let mut z = 0.0;
    for &k in &order[..kept] {
        out[k] = mu[k];
        z += mu[k];
    }
    out.iter_mut().for_each(|x| *x /= z);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn top_p_keeps_smallest_set_reaching_p() {
        let mu = vec![0.1, 0.5, 0.15, 0.25];
        // 0.5 < 0.6 ≤ 0.5 + 0.25: keep {1, 3}, renormalised by 0.75.
        close(
            &top_p(mu.clone(), 0.6),
            &[0.0, 0.5 / 0.75, 0.0, 0.25 / 0.75],
        );
        // Exactly reaching p: 0.5 ≥ 0.5 keeps only the top token.
        close(&top_p(mu.clone(), 0.5), &[0.0, 1.0, 0.0, 0.0]);
        // p = 1 keeps everything, bit for bit.
        assert_eq!(top_p(mu.clone(), 1.0), mu);
    }

    #[test]
    fn top_p_keeps_ties() {
        let mu = vec![0.4, 0.2, 0.2, 0.2];
        // 0.4 + 0.2 reaches 0.55; the two other 0.2s are tied with the last kept and stay.
        assert_eq!(top_p(mu.clone(), 0.55), mu);
        let mu = vec![0.3, 0.3, 0.3, 0.1];
        close(&top_p(mu, 0.35), &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 0.0]);
    }

    #[test]
    fn temperature_by_hand() {
        let s = Shaping::new(0.5, 1.0).unwrap();
        // τ = 0.5: μ² normalised, (0.2, 0.8) → (0.04, 0.64)/0.68.
        close(&s.apply(vec![0.2, 0.8]), &[0.04 / 0.68, 0.64 / 0.68]);
        let hot = Shaping::new(2.0, 1.0).unwrap();
        let r = (0.2f64).sqrt() + (0.8f64).sqrt();
        close(
            &hot.apply(vec![0.2, 0.8]),
            &[(0.2f64).sqrt() / r, (0.8f64).sqrt() / r],
        );
        let greedy = Shaping::new(0.0, 1.0).unwrap();
        assert_eq!(greedy.apply(vec![0.3, 0.3, 0.4]), vec![0.0, 0.0, 1.0]);
        assert_eq!(Shaping::IDENTITY.apply(vec![0.3, 0.7]), vec![0.3, 0.7]);
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(matches!(
            Shaping::new(1.0, 0.0),
            Err(SamplerError::BadTopP(_))
        ));
        assert!(matches!(
            Shaping::new(1.0, 1.5),
            Err(SamplerError::BadTopP(_))
        ));
        assert!(matches!(
            Shaping::new(1.0, f64::NAN),
            Err(SamplerError::BadTopP(_))
        ));
        assert!(matches!(
            Shaping::new(-1.0, 1.0),
            Err(SamplerError::BadTemperature(_))
        ));
        assert!(matches!(
            Shaping::new(f64::INFINITY, 1.0),
            Err(SamplerError::BadTemperature(_))
        ));
        // Positive but below the limit: 1/τ overflows (1e-310, subnormal) or (ln μ)/τ does.
        for t in [
            1e-310,
            f64::MIN_POSITIVE,
            1e-300,
            1e-7,
            MIN_TEMPERATURE * 0.999,
        ] {
            assert_eq!(
                Shaping::new(t, 1.0),
                Err(SamplerError::BadTemperature(t)),
                "{t:e}"
            );
        }
        let e = SamplerError::BadTemperature(1e-310).to_string();
        assert!(e.contains("0 (greedy)") && e.contains("1e-6"), "{e}");
    }

    #[test]
    fn the_smallest_temperature_never_gives_nan() {
        let mu = vec![0.2, 0.8];
        // At the limit, on a GPT-2-sized law with extreme probabilities (down to the smallest
        // subnormal), the result is a finite distribution with almost all mass on the argmax.
        let s = Shaping::new(MIN_TEMPERATURE, 1.0).unwrap();
        let v = 50257;
        let mut mu_big = vec![f64::from_bits(1); v];
        mu_big[7] = 1e-300;
        mu_big[123] = 1.0 / v as f64;
        mu_big[124] = 1.0 / v as f64 * (1.0 - 1e-4);
        let out = s.apply(mu_big);
        assert!(out.iter().all(|p| p.is_finite() && *p >= 0.0));
        assert!((out.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(out[123] > 1.0 - 1e-12, "{}", out[123]);
        // and the same holds on a two-token law
        let out = s.apply(mu);
        assert_eq!(out, vec![0.0, 1.0]);
    }
}
