//! Scoring samples under a judge model (`maskdiff eval JUDGE --samples FILE`): the generative
//! perplexity of text samples — 2^{NELBO bits/token} of the judge on them, exact for an
//! autoregressive judge up to its Monte-Carlo error, an upper bound for a diffusion judge — and
//! their unigram entropy, which a judge's perplexity alone misses (repetitive samples score too
//! well). This is the quality axis of the sampler frontier (`bench/frontier.sh`).

use crate::error::{CliError, Result};
use maskdiff_data::{AnyTokenizer, Tokenizer};
use maskdiff_objective::metrics::unigram_entropy_bits;
use std::path::Path;

/// The samples of a file, tokenised, and the judge's sequences cut from them.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSet {
    /// Number of samples (non-empty lines).
    pub samples: usize,
    /// Mean over samples of each sample's unigram entropy (bits).
    pub entropy_mean: f64,
    /// Unigram entropy of all samples' tokens together (bits).
    pub entropy_pooled: f64,
    /// The tokens of all samples concatenated, cut into sequences of the judge's length.
    pub sequences: Vec<Vec<u32>>,
    /// Tokens after the last whole sequence, not scored.
    pub dropped: usize,
}

/// Reads `path` (one sample per line, as `maskdiff sample -o` writes text), tokenises each line
/// with the judge's tokenizer and cuts the concatenation into sequences of `seq_len`.
pub fn read_samples(path: &Path, tok: &AnyTokenizer, seq_len: usize) -> Result<SampleSet> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::io("cannot read", path, e))?;
    samples_from_text(&text, tok, seq_len)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))
}

/// [`read_samples`] on text already read.
pub fn samples_from_text(text: &str, tok: &AnyTokenizer, seq_len: usize) -> Result<SampleSet> {
    if seq_len == 0 {
        return Err(CliError::Input("the judge's sequence length is 0".into()));
    }
    let mut all = Vec::new();
    let (mut samples, mut entropy_sum) = (0usize, 0.0);
    // Lines end at '\n' (and a '\r' before it); spaces are tokens and stay.
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let ids = tok
            .encode(line)
            .map_err(|e| CliError::Input(format!("sample on line {}: {e}", i + 1)))?;
        if ids.is_empty() {
            continue;
        }
        entropy_sum += unigram_entropy_bits(&ids)?;
        samples += 1;
        all.extend(ids);
    }
    if all.len() < seq_len {
        return Err(CliError::Input(format!(
            "{samples} samples hold {} tokens, fewer than one sequence of the judge's length {seq_len}",
            all.len()
        )));
    }
    let entropy_pooled = unigram_entropy_bits(&all)?;
    let sequences: Vec<Vec<u32>> = all.chunks_exact(seq_len).map(<[u32]>::to_vec).collect();
    Ok(SampleSet {
        samples,
        entropy_mean: entropy_sum / samples as f64,
        entropy_pooled,
        dropped: all.len() % seq_len,
        sequences,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_data::TokenizerId;

    fn text8() -> AnyTokenizer {
        AnyTokenizer::new(TokenizerId::Text8).expect("text8 tokenizer")
    }

    #[test]
    fn lines_are_tokenised_concatenated_and_cut() {
        // two samples of 6 characters (spaces are tokens), a blank line, CRLF endings
        let s = samples_from_text("ab ab \r\n\naaaaaa\n", &text8(), 4).unwrap();
        assert_eq!(s.samples, 2);
        assert_eq!(s.sequences.len(), 3);
        assert_eq!(s.dropped, 0);
        assert!(s.sequences.iter().all(|q| q.len() == 4));
        // "ab ab " has p = (1/3, 1/3, 1/3): log2 3; "aaaaaa" has 0; the mean of the two
        assert!((s.entropy_mean - 3f64.log2() / 2.0).abs() < 1e-15);
        // pooled: a 8/12, b 2/12, space 2/12
        let p = [8.0 / 12.0, 2.0 / 12.0, 2.0 / 12.0];
        let h: f64 = p.iter().map(|&q: &f64| -q * q.log2()).sum();
        assert!((s.entropy_pooled - h).abs() < 1e-15);
        let s = samples_from_text("abcde\n", &text8(), 2).unwrap();
        assert_eq!((s.sequences.len(), s.dropped), (2, 1));
    }

    #[test]
    fn too_few_tokens_and_foreign_characters_are_errors() {
        let e = samples_from_text("abc\n", &text8(), 8).unwrap_err();
        assert!(e.to_string().contains("fewer than one sequence"), "{e}");
        let e = samples_from_text("abc\nAB#\n", &text8(), 2).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(samples_from_text("abc\n", &text8(), 0).is_err());
    }
}
