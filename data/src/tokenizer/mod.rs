//! Tokenizers behind one trait (MD4 §9): text8 characters (V = 27, §9.1), raw bytes (V = 256) and
//! GPT-2 BPE (V = 50257, §9.2). Real ids are `0..V`; the mask id `V` is never produced by `encode`
//! and is rejected by `decode`.

mod bytes;
mod gpt2;
mod text8;

pub use bytes::ByteTokenizer;
pub use gpt2::{Gpt2Tokenizer, GPT2_EOS, GPT2_VOCAB};
pub use text8::{normalize_text8, Text8Tokenizer, TEXT8_SPACE, TEXT8_VOCAB};

use maskdiff_process::{Token, Vocab};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Which tokenizer produced a token stream; stored in token-file headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerId {
    /// Anything else (ids are opaque).
    Custom,
    Text8,
    Bytes,
    Gpt2,
    /// Image intensities as tokens (one token per pixel channel).
    Pixels,
}

impl TokenizerId {
    /// The code stored in token-file headers.
    pub fn code(self) -> u32 {
        match self {
            TokenizerId::Custom => 0,
            TokenizerId::Text8 => 1,
            TokenizerId::Bytes => 2,
            TokenizerId::Gpt2 => 3,
            TokenizerId::Pixels => 4,
        }
    }
    /// Inverse of [`TokenizerId::code`].
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => TokenizerId::Custom,
            1 => TokenizerId::Text8,
            2 => TokenizerId::Bytes,
            3 => TokenizerId::Gpt2,
            4 => TokenizerId::Pixels,
            _ => return None,
        })
    }
    /// The vocabulary size a text tokenizer defines (text8 27, bytes 256, GPT-2 50257); `None`
    /// for custom ids and pixels, whose vocabulary the data decides.
    pub fn vocab_size(self) -> Option<usize> {
        match self {
            TokenizerId::Text8 => Some(TEXT8_VOCAB),
            TokenizerId::Bytes => Some(256),
            TokenizerId::Gpt2 => Some(GPT2_VOCAB),
            TokenizerId::Custom | TokenizerId::Pixels => None,
        }
    }
    /// Short lowercase name ("text8", "bytes", "gpt2", ...).
    pub fn name(self) -> &'static str {
        match self {
            TokenizerId::Custom => "custom",
            TokenizerId::Text8 => "text8",
            TokenizerId::Bytes => "bytes",
            TokenizerId::Gpt2 => "gpt2",
            TokenizerId::Pixels => "pixels",
        }
    }
}

impl std::fmt::Display for TokenizerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TokenizerId {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "custom" => TokenizerId::Custom,
            "text8" | "char" | "chars" => TokenizerId::Text8,
            "bytes" | "byte" | "raw" => TokenizerId::Bytes,
            "gpt2" | "gpt-2" | "r50k" | "r50k_base" => TokenizerId::Gpt2,
            "pixels" => TokenizerId::Pixels,
            _ => {
                return Err(DataError::InvalidArgument(format!(
                    "unknown tokenizer {s:?} (text8, bytes, gpt2)"
                )))
            }
        })
    }
}

/// Text ↔ token ids. `encode` never emits the mask id; `decode` rejects ids `>= V`.
pub trait Tokenizer: Send + Sync {
    /// Which tokenizer this is.
    fn id(&self) -> TokenizerId;
    /// V, the number of real tokens.
    fn vocab_size(&self) -> usize;
    /// Text → ids in `0..V`.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Ids in `0..V` → text (invalid UTF-8 from bytes/BPE pieces is replaced by U+FFFD).
    fn decode(&self, ids: &[u32]) -> Result<String>;

    /// The vocabulary (mask id V) of this tokenizer.
    fn vocab(&self) -> Result<Vocab> {
        Ok(Vocab::new(self.vocab_size())?)
    }
    /// Text → checked [`Token`]s.
    fn encode_tokens(&self, text: &str) -> Result<Vec<Token>> {
        Ok(self.vocab()?.tokens(&self.encode(text)?)?)
    }
    /// [`Token`]s → text.
    fn decode_tokens(&self, tokens: &[Token]) -> Result<String> {
        let ids: Vec<u32> = tokens.iter().map(|t| t.id()).collect();
        self.decode(&ids)
    }
}

/// Reject any id `>= vocab` with its position.
pub(crate) fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&i| i as usize >= vocab) {
        Some(pos) => Err(DataError::TokenOutOfVocab {
            id: ids[pos] as u64,
            pos,
            vocab,
        }),
        None => Ok(()),
    }
}

/// One of the built-in text tokenizers, chosen at run time.
#[derive(Debug, Clone)]
pub enum AnyTokenizer {
    Text8(Text8Tokenizer),
    Bytes(ByteTokenizer),
    Gpt2(Gpt2Tokenizer),
}

impl AnyTokenizer {
    /// The built-in tokenizer for `id` (`Custom`/`Pixels` are not text tokenizers).
    pub fn new(id: TokenizerId) -> Result<Self> {
        match id {
            TokenizerId::Text8 => Ok(AnyTokenizer::Text8(Text8Tokenizer)),
            TokenizerId::Bytes => Ok(AnyTokenizer::Bytes(ByteTokenizer)),
            TokenizerId::Gpt2 => Ok(AnyTokenizer::Gpt2(Gpt2Tokenizer::new()?)),
            other => Err(DataError::InvalidArgument(format!(
                "{other} is not a text tokenizer"
            ))),
        }
    }
    fn inner(&self) -> &dyn Tokenizer {
        match self {
            AnyTokenizer::Text8(t) => t,
            AnyTokenizer::Bytes(t) => t,
            AnyTokenizer::Gpt2(t) => t,
        }
    }
}

impl Tokenizer for AnyTokenizer {
    fn id(&self) -> TokenizerId {
        self.inner().id()
    }
    fn vocab_size(&self) -> usize {
        self.inner().vocab_size()
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner().encode(text)
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner().decode(ids)
    }
}
