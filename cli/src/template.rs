//! Conditioning templates for `maskdiff sample` (paper §6 / App. on conditional generation:
//! fixed positions are clamped, the rest is generated). `--prompt TEXT` fixes a prefix;
//! `--infill TEMPLATE` fixes every piece of text and generates `{N}` tokens at each placeholder
//! (`{{` and `}}` are literal braces). Positions after the template are generated too.

use crate::error::{CliError, Result};

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text whose tokens are fixed.
    Text(String),
    /// This many positions to generate.
    Gap(usize),
}

/// Parse an infill template.
pub fn parse(template: &str) -> Result<Vec<Segment>> {
    let bad = |m: String| CliError::Input(format!("bad --infill template: {m}"));
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut num = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(d) => num.push(d),
                        None => return Err(bad("unclosed `{`".into())),
                    }
                }
                let digits = num.trim();
                let n: usize = digits.parse().map_err(|_| {
                    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                        bad(format!(
                            "`{{{digits}}}` is more tokens than any sequence holds"
                        ))
                    } else {
                        bad(format!(
                            "`{{{num}}}` is not `{{N}}` with N a number of tokens"
                        ))
                    }
                })?;
                if n == 0 {
                    return Err(bad("`{0}` generates nothing".into()));
                }
                if !text.is_empty() {
                    out.push(Segment::Text(std::mem::take(&mut text)));
                }
                out.push(Segment::Gap(n));
            }
            '}' => return Err(bad("unmatched `}` (write `}}` for a literal brace)".into())),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Segment::Text(text));
    }
    Ok(out)
}

/// Turn segments into a per-position constraint of length `len`: `Some(id)` fixed, `None`
/// generated. `encode` tokenises a text piece.
pub fn constraint(
    segments: &[Segment],
    len: usize,
    mut encode: impl FnMut(&str) -> Result<Vec<u32>>,
) -> Result<Vec<Option<u32>>> {
    // The total is summed (with overflow checked) and compared with `len` before anything is
    // allocated: a gap of 10^16 (or usize::MAX) tokens is an error, not an allocation.
    let mut fixed = Vec::with_capacity(segments.len());
    let mut total = Some(0usize);
    for s in segments {
        let (n, ids) = match s {
            Segment::Text(t) => {
                let ids = encode(t)?;
                (ids.len(), Some(ids))
            }
            Segment::Gap(n) => (*n, None),
        };
        total = total.and_then(|t| t.checked_add(n));
        fixed.push((n, ids));
    }
    match total {
        Some(t) if t <= len => {}
        t => {
            return Err(CliError::Input(format!(
                "the prompt/template is {} tokens long but the model's sequence length is {len}",
                t.map_or_else(|| "at least 2^64".to_string(), |t| t.to_string())
            )))
        }
    }
    let mut out: Vec<Option<u32>> = Vec::with_capacity(len);
    for (n, ids) in fixed {
        match ids {
            Some(ids) => out.extend(ids.into_iter().map(Some)),
            None => out.resize(out.len() + n, None),
        }
    }
    out.resize(len, None);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_gaps_and_escaped_braces() {
        let s = parse("a {3} b{{c}} {12}").unwrap();
        assert_eq!(
            s,
            vec![
                Segment::Text("a ".into()),
                Segment::Gap(3),
                Segment::Text(" b{c} ".into()),
                Segment::Gap(12)
            ]
        );
        for bad in ["{x}", "a {3", "b }", "{0}"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn constraint_places_fixed_tokens_and_checks_length() {
        let enc = |t: &str| Ok(t.bytes().map(u32::from).collect());
        let c = constraint(&parse("ab{2}c").unwrap(), 7, enc).unwrap();
        let (a, b, cc) = (Some(97), Some(98), Some(99));
        assert_eq!(c, vec![a, b, None, None, cc, None, None]);
        let e = constraint(&parse("abcdefgh").unwrap(), 7, enc)
            .unwrap_err()
            .to_string();
        assert!(e.contains("8 tokens") && e.contains("7"), "{e}");
    }

    #[test]
    fn huge_gaps_are_errors_before_any_allocation() {
        let enc = |t: &str| Ok(t.bytes().map(u32::from).collect());
        // usize::MAX parses; the sum with the text before it overflows a usize.
        let segs = parse("ab{18446744073709551615}").unwrap();
        let e = constraint(&segs, 32, enc).unwrap_err().to_string();
        assert!(e.contains("at least 2^64") && e.contains("32"), "{e}");
        // 10^16 tokens would be an 160 PB allocation: refused by size.
        let segs = parse("{9999999999999999}").unwrap();
        let e = constraint(&segs, 32, enc).unwrap_err().to_string();
        assert!(e.contains("is 9999999999999999 tokens"), "{e}");
        // Beyond usize: a parse error that says so.
        let e = parse("{99999999999999999999999}").unwrap_err().to_string();
        assert!(e.contains("more tokens than any sequence"), "{e}");
        // Exactly filling the length is fine.
        assert_eq!(
            constraint(&parse("a{31}").unwrap(), 32, enc).unwrap().len(),
            32
        );
    }
}
