//! Conditioning by fixed tokens (spec §6.4; paper Alg. 2 and Fig. 10): a [`Constraint`] fixes any
//! set of positions — a prefix, a suffix, arbitrary infill spans. Fixed tokens are in the state
//! from the first step (the denoiser sees them), are never resampled, and are reported with
//! reveal step 0.

use crate::SamplerError;
use maskdiff_process::Vocab;
use serde::{Deserialize, Serialize};

/// Where a span is anchored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Anchor {
    /// The span starts `offset` positions after the start of the sequence.
    Start,
    /// The span ends `offset` positions before the end of the sequence.
    End,
}

/// A run of fixed tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub anchor: Anchor,
    pub offset: usize,
    pub tokens: Vec<u32>,
}

/// A set of fixed positions; empty means unconditional generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Constraint {
    pub spans: Vec<Span>,
}

impl Constraint {
    /// No fixed positions.
    pub fn none() -> Self {
        Self::default()
    }
    /// Fix the first `tokens.len()` positions.
    pub fn prefix(tokens: &[u32]) -> Self {
        Self::none().with_span(0, tokens)
    }
    /// Fix the last `tokens.len()` positions.
    pub fn suffix(tokens: &[u32]) -> Self {
        Self::none().with_suffix(tokens)
    }
    /// From a template: `Some(id)` is fixed, `None` is generated (infilling).
    pub fn from_template(template: &[Option<u32>]) -> Self {
        let mut c = Self::none();
        for (n, t) in template.iter().enumerate() {
            if let Some(id) = *t {
                c = c.with_token(n, id);
            }
        }
        c
    }
    /// Also fix `tokens` starting at position `start`.
    pub fn with_span(mut self, start: usize, tokens: &[u32]) -> Self {
        self.spans.push(Span {
            anchor: Anchor::Start,
            offset: start,
            tokens: tokens.to_vec(),
        });
        self
    }
    /// Also fix the last `tokens.len()` positions.
    pub fn with_suffix(mut self, tokens: &[u32]) -> Self {
        self.spans.push(Span {
            anchor: Anchor::End,
            offset: 0,
            tokens: tokens.to_vec(),
        });
        self
    }
    /// Also fix one position.
    pub fn with_token(self, position: usize, token: u32) -> Self {
        self.with_span(position, &[token])
    }
    /// True when nothing is fixed.
    pub fn is_empty(&self) -> bool {
        self.spans.iter().all(|s| s.tokens.is_empty())
    }

    /// The fixed token (if any) of every position of a sequence of length `len`. Errors on
    /// positions outside the sequence, tokens ≥ V and two spans fixing one position differently.
    pub fn resolve(&self, len: usize, vocab: Vocab) -> Result<Vec<Option<u32>>, SamplerError> {
        let mut out = vec![None; len];
        for span in &self.spans {
            let k = span.tokens.len();
            let start = match span.anchor {
                Anchor::Start => span.offset,
                Anchor::End => match len.checked_sub(span.offset + k) {
                    Some(s) => s,
                    None => {
                        return Err(SamplerError::ConstraintOutOfRange {
                            position: span.offset + k,
                            length: len,
                        })
                    }
                },
            };
            for (i, &tok) in span.tokens.iter().enumerate() {
                let position = start + i;
                if position >= len {
                    return Err(SamplerError::ConstraintOutOfRange {
                        position,
                        length: len,
                    });
                }
                if tok as usize >= vocab.size() {
                    return Err(SamplerError::ConstraintToken {
                        position,
                        token: tok,
                        vocab: vocab.size(),
                    });
                }
                match out[position] {
                    Some(first) if first != tok => {
                        return Err(SamplerError::ConflictingConstraint {
                            position,
                            first,
                            second: tok,
                        })
                    }
                    _ => out[position] = Some(tok),
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_suffix_and_spans_resolve() {
        let v = Vocab::new(5).unwrap();
        let c = Constraint::prefix(&[1, 2])
            .with_suffix(&[4])
            .with_span(3, &[0]);
        assert_eq!(
            c.resolve(6, v).unwrap(),
            vec![Some(1), Some(2), None, Some(0), None, Some(4)]
        );
        let t = Constraint::from_template(&[None, Some(3), None]);
        assert_eq!(t.resolve(3, v).unwrap(), vec![None, Some(3), None]);
        assert!(Constraint::none().is_empty());
        // Agreeing overlaps are fine.
        let o = Constraint::prefix(&[1, 2]).with_token(1, 2);
        assert_eq!(o.resolve(2, v).unwrap(), vec![Some(1), Some(2)]);
    }

    #[test]
    fn bad_constraints_are_errors() {
        let v = Vocab::new(5).unwrap();
        assert!(matches!(
            Constraint::prefix(&[1, 2, 3]).resolve(2, v),
            Err(SamplerError::ConstraintOutOfRange {
                position: 2,
                length: 2
            })
        ));
        assert!(matches!(
            Constraint::suffix(&[1, 2, 3]).resolve(2, v),
            Err(SamplerError::ConstraintOutOfRange { .. })
        ));
        assert!(matches!(
            Constraint::prefix(&[5]).resolve(2, v),
            Err(SamplerError::ConstraintToken { token: 5, .. })
        ));
        assert!(matches!(
            Constraint::prefix(&[1]).with_token(0, 2).resolve(2, v),
            Err(SamplerError::ConflictingConstraint {
                position: 0,
                first: 1,
                second: 2
            })
        ));
    }
}
