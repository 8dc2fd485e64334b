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
