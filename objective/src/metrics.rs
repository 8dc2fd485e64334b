//! Metric conversions (spec §3.4, §11.21): nats per sequence → bits per token → perplexity.
//! Bits per token = nats / (N·ln 2); perplexity = 2^{bits/token} = exp(nats/token).

use crate::ObjectiveError;

fn check(name: &'static str, x: f64) -> Result<f64, ObjectiveError> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(ObjectiveError::BadValue { name, value: x })
    }
}

/// Nats per sequence of `tokens` tokens → bits per token (bits/char, bits/dim).
pub fn bits_per_token(nats_per_sequence: f64, tokens: usize) -> Result<f64, ObjectiveError> {
    check("nats", nats_per_sequence)?;
    if tokens == 0 {
        return Err(ObjectiveError::BadValue {
            name: "tokens",
            value: 0.0,
        });
    }
    Ok(nats_per_sequence / (tokens as f64 * std::f64::consts::LN_2))
}

/// Bits per token → perplexity 2^bits.
pub fn perplexity_from_bits(bits_per_token: f64) -> Result<f64, ObjectiveError> {
    Ok(check("bits", bits_per_token)?.exp2())
}

/// Nats per token → perplexity e^nats.
pub fn perplexity_from_nats(nats_per_token: f64) -> Result<f64, ObjectiveError> {
    Ok(check("nats", nats_per_token)?.exp())
}

/// Perplexity → bits per token log2(ppl).
pub fn bits_from_perplexity(ppl: f64) -> Result<f64, ObjectiveError> {
    if !(ppl.is_finite() && ppl >= 1.0) {
        return Err(ObjectiveError::BadValue {
            name: "perplexity",
            value: ppl,
        });
    }
    Ok(ppl.log2())
}

/// Entropy in bits of the empirical unigram distribution of `tokens`, −Σ_v p_v log2 p_v over the
/// distinct values. Reported next to generative perplexity (ReMDM, MDLM): a judge scores
/// repetitive samples too well, and their low unigram entropy exposes them. Empty input is an
/// error (the distribution is undefined).
pub fn unigram_entropy_bits(tokens: &[u32]) -> Result<f64, ObjectiveError> {
    if tokens.is_empty() {
        return Err(ObjectiveError::BadValue {
            name: "tokens",
            value: 0.0,
        });
    }
    let mut sorted = tokens.to_vec();
    sorted.sort_unstable();
    let n = tokens.len() as f64;
    let mut h = 0.0;
    for run in sorted.chunk_by(|a, b| a == b) {
        let p = run.len() as f64 / n;
        h -= p * p.log2();
    }
    // −Σ p log p of a one-value distribution is −0.0: report 0.
    Ok(h.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unigram_entropy_matches_hand_values() {
        // one value: no uncertainty
        assert_eq!(unigram_entropy_bits(&[7; 256]).unwrap(), 0.0);
        // k equally frequent values: log2 k, in any order
        let four: Vec<u32> = (0..64).map(|i| (i * 7 % 4) as u32).collect();
        assert!((unigram_entropy_bits(&four).unwrap() - 2.0).abs() < 1e-15);
        let all: Vec<u32> = (0..27).rev().collect();
        assert!((unigram_entropy_bits(&all).unwrap() - 27f64.log2()).abs() < 1e-14);
        // p = (1/2, 1/4, 1/4): 1/2·1 + 2·(1/4·2) = 1.5 bits
        assert!((unigram_entropy_bits(&[3, 3, 1, 2]).unwrap() - 1.5).abs() < 1e-15);
        assert!(unigram_entropy_bits(&[]).is_err());
    }
}
