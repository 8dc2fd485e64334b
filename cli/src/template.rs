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
                let n: usize = num.trim().parse().map_err(|_| {
                    bad(format!(
                        "`{{{num}}}` is not `{{N}}` with N a number of tokens"
                    ))
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
    let mut out: Vec<Option<u32>> = Vec::with_capacity(len);
    for s in segments {
        match s {
            Segment::Text(t) => out.extend(encode(t)?.into_iter().map(Some)),
            Segment::Gap(n) => out.resize(out.len() + n, None),
        }
    }
    if out.len() > len {
        return Err(CliError::Input(format!(
            "the prompt/template is {} tokens long but the model's sequence length is {len}",
            out.len()
        )));
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
}
