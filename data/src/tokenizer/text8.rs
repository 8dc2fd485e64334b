//! The text8 character tokenizer (MD4 §9.1, spec §11.24): 'a'..'z' → 0..25, space → 26, V = 27,
//! mask id 27; plus the normaliser that turns any English text into text8 style, following Matt
//! Mahoney's `wikifil.pl` (which produced text8): ASCII letters lowercased, each digit spelled out
//! as a word, every run of other characters collapsed to one space.

use super::{check_ids, Tokenizer, TokenizerId};
use crate::error::{DataError, Result};

/// V of text8.
pub const TEXT8_VOCAB: usize = 27;
/// The id of the space character.
pub const TEXT8_SPACE: u32 = 26;

/// The 27-symbol text8 alphabet. `encode` is strict: only 'a'..='z' and ' ' are accepted (use
/// [`normalize_text8`] first for arbitrary text).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Text8Tokenizer;

const DIGITS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// Turn any text into text8 style: lowercase a–z, digits spelled out ("2" → "two"), every run of
/// other characters (punctuation, whitespace, non-ASCII) → a single space. Leading/trailing spaces
/// are kept (text8 itself starts with a space).
pub fn normalize_text8(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let push_space = |out: &mut String| {
        if !out.ends_with(' ') {
            out.push(' ');
        }
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_digit() {
            push_space(&mut out);
            out.push_str(DIGITS[(c as u8 - b'0') as usize]);
            out.push(' ');
        } else {
            push_space(&mut out);
        }
    }
    out
}

impl Tokenizer for Text8Tokenizer {
    fn id(&self) -> TokenizerId {
        TokenizerId::Text8
    }
    fn vocab_size(&self) -> usize {
        TEXT8_VOCAB
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.char_indices()
            .map(|(pos, ch)| match ch {
                'a'..='z' => Ok(ch as u32 - 'a' as u32),
                ' ' => Ok(TEXT8_SPACE),
                _ => Err(DataError::NotInAlphabet {
                    ch,
                    pos,
                    alphabet: "text8",
                }),
            })
            .collect()
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        check_ids(ids, TEXT8_VOCAB)?;
        Ok(ids
            .iter()
            .map(|&i| {
                if i == TEXT8_SPACE {
                    ' '
                } else {
                    (b'a' + i as u8) as char
                }
            })
            .collect())
    }
}
