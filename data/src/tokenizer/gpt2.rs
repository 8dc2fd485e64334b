//! GPT-2 byte-level BPE (MD4 §9.2: V = 50257, EOS = 50256, mask id 50257) through `tiktoken-rs`'s
//! `r50k_base` encoding, whose merge ranks are compiled into the crate (no download at run time).
//! Text is encoded as ordinary text: a literal "<|endoftext|>" in data is not turned into EOS.

use std::sync::{Arc, OnceLock};

use tiktoken_rs::CoreBPE;

use super::{check_ids, Tokenizer, TokenizerId};
use crate::error::{DataError, Result};

/// V of GPT-2.
pub const GPT2_VOCAB: usize = 50257;
/// The `<|endoftext|>` id appended after each document (§9.2).
pub const GPT2_EOS: u32 = 50256;

/// GPT-2 BPE; cheap to clone (the ranks are parsed once per process).
#[derive(Clone)]
pub struct Gpt2Tokenizer {
    bpe: Arc<CoreBPE>,
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gpt2Tokenizer(r50k_base)")
    }
}

fn shared() -> &'static std::result::Result<Arc<CoreBPE>, String> {
    static BPE: OnceLock<std::result::Result<Arc<CoreBPE>, String>> = OnceLock::new();
    BPE.get_or_init(|| {
        tiktoken_rs::r50k_base()
            .map(Arc::new)
            .map_err(|e| e.to_string())
    })
}

impl Gpt2Tokenizer {
    /// The r50k_base (= GPT-2) encoding.
    pub fn new() -> Result<Self> {
        match shared() {
            Ok(bpe) => Ok(Self { bpe: bpe.clone() }),
            Err(e) => Err(DataError::Tokenizer(format!("loading r50k_base: {e}"))),
        }
    }
    /// Ids → the exact bytes they stand for (may split a UTF-8 character).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        check_ids(ids, GPT2_VOCAB)?;
        self.bpe
            .decode_bytes(ids)
            .map_err(|e| DataError::Tokenizer(format!("decoding: {e:?}")))
    }
    /// Encode a document and append EOS (one document of the §9.2 packed stream).
    pub fn encode_document(&self, text: &str) -> Vec<u32> {
        let mut ids = self.bpe.encode_ordinary(text);
        ids.push(GPT2_EOS);
        ids
    }
}

impl Tokenizer for Gpt2Tokenizer {
    fn id(&self) -> TokenizerId {
        TokenizerId::Gpt2
    }
    fn vocab_size(&self) -> usize {
        GPT2_VOCAB
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.bpe.encode_ordinary(text))
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.decode_bytes(ids)?).into_owned())
    }
}
