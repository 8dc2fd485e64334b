//! Raw UTF-8 bytes as tokens (V = 256, mask id 256).

use super::{check_ids, Tokenizer, TokenizerId};
use crate::error::Result;

/// Every byte is a token.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    /// Ids → the exact bytes (no UTF-8 repair).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        check_ids(ids, 256)?;
        Ok(ids.iter().map(|&i| i as u8).collect())
    }
}

impl Tokenizer for ByteTokenizer {
    fn id(&self) -> TokenizerId {
        TokenizerId::Bytes
    }
    fn vocab_size(&self) -> usize {
        256
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}
