//! Zero-shot perplexity sets (MD4 Table 1, §9.2: LAMBADA, WikiText-2/103, PTB, One Billion Words)
//! read from local files, detokenised and GPT-2-tokenised the way SEDD's evaluation does: each
//! document is detokenised, BPE-encoded, followed by EOS, all documents are concatenated, and the
//! stream is cut into blocks of the model length with the tail dropped.
//!
//! SEDD groups with Hugging Face `datasets.map(batched=True)`, whose default batch of 1000
//! documents means the tail is dropped per group of 1000 documents; [`Grouping::PerDocuments`]
//! reproduces that, [`Grouping::Whole`] drops a single tail.

mod detok;

pub use detok::{lambada_detokenize, lm1b_detokenize, ptb_detokenize, wikitext_detokenize};

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::fsutil::read_file;
use crate::tokenizer::{Gpt2Tokenizer, GPT2_EOS};

/// A zero-shot evaluation set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZeroShotSet {
    Lambada,
    /// WikiText-2 raw test (its articles are also WikiText-103's test set).
    WikiText2,
    /// WikiText-103 test: the same articles as WikiText-2 test, read from the same file.
    WikiText103,
    Ptb,
    Lm1b,
}

impl ZeroShotSet {
    pub const ALL: [ZeroShotSet; 5] = [
        ZeroShotSet::Lambada,
        ZeroShotSet::WikiText2,
        ZeroShotSet::Ptb,
        ZeroShotSet::WikiText103,
        ZeroShotSet::Lm1b,
    ];
    /// Name as in the paper's Table 1 columns, lowercased.
    pub fn name(self) -> &'static str {
        match self {
            ZeroShotSet::Lambada => "lambada",
            ZeroShotSet::WikiText2 => "wikitext2",
            ZeroShotSet::WikiText103 => "wikitext103",
            ZeroShotSet::Ptb => "ptb",
            ZeroShotSet::Lm1b => "lm1b",
        }
    }
    /// The file read inside the zero-shot directory.
    pub fn file_name(self) -> &'static str {
        match self {
            ZeroShotSet::Lambada => "lambada_test.jsonl",
            ZeroShotSet::WikiText2 | ZeroShotSet::WikiText103 => "wikitext2.test.raw",
            ZeroShotSet::Ptb => "ptb.test.txt",
            ZeroShotSet::Lm1b => "lm1b.test.subset.txt",
        }
    }
    /// Apply this set's SEDD detokeniser to one document.
    pub fn detokenize(self, doc: &str) -> String {
        match self {
            ZeroShotSet::Lambada => lambada_detokenize(doc),
            ZeroShotSet::WikiText2 | ZeroShotSet::WikiText103 => wikitext_detokenize(doc),
            ZeroShotSet::Ptb => ptb_detokenize(doc),
            ZeroShotSet::Lm1b => lm1b_detokenize(doc),
        }
    }
    /// Split the raw file into documents as the Hugging Face loaders SEDD used do: LAMBADA one
    /// JSON object per line (`text`); WikiText one document per line with its newline, blank
    /// lines as empty documents; PTB one stripped sentence per line; 1BW one non-empty stripped
    /// sentence per line.
    pub fn parse_documents(self, raw: &str) -> Result<Vec<String>> {
        match self {
            ZeroShotSet::Lambada => raw
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| {
                    let err = |detail: String| DataError::Parse {
                        what: self.file_name().to_string(),
                        line: i + 1,
                        detail,
                    };
                    let v: serde_json::Value =
                        serde_json::from_str(l).map_err(|e| err(e.to_string()))?;
                    v.get("text")
                        .and_then(|t| t.as_str())
                        .map(str::to_string)
                        .ok_or_else(|| err("no string field \"text\"".into()))
                })
                .collect(),
            ZeroShotSet::WikiText2 | ZeroShotSet::WikiText103 => Ok(raw
                .split_inclusive('\n')
                .map(|l| {
                    if l.trim().is_empty() {
                        String::new()
                    } else {
                        l.to_string()
                    }
                })
                .collect()),
            ZeroShotSet::Ptb => Ok(raw.lines().map(|l| l.trim().to_string()).collect()),
            ZeroShotSet::Lm1b => Ok(raw
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()),
        }
    }
    /// Read and parse this set's raw documents from `dir` (not yet detokenised).
    pub fn read_documents(self, dir: &Path) -> Result<Vec<String>> {
        let path = dir.join(self.file_name());
        let bytes = read_file(&path)?;
        let raw = String::from_utf8(bytes).map_err(|e| DataError::Parse {
            what: path.display().to_string(),
            line: 0,
            detail: format!("not UTF-8: {e}"),
        })?;
        self.parse_documents(&raw)
    }
}

impl std::str::FromStr for ZeroShotSet {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase().replace(['-', '_'], "");
        ZeroShotSet::ALL
            .into_iter()
            .find(|z| z.name() == l || (l == "1bw" && *z == ZeroShotSet::Lm1b))
            .ok_or_else(|| DataError::InvalidArgument(format!("unknown zero-shot set {s:?}")))
    }
}

/// Where the tail shorter than a block is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grouping {
    /// One stream of all documents, one tail dropped.
    Whole,
    /// Groups of this many consecutive documents, a tail dropped per group (SEDD via HF: 1000).
    PerDocuments(usize),
}

/// GPT-2 blocks of a zero-shot set, row-major `[num_blocks, block_len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroShotBlocks {
    pub set: ZeroShotSet,
    pub ids: Vec<u32>,
    pub block_len: usize,
    pub num_blocks: usize,
    /// Tokens (documents + EOS) before the tails were dropped.
    pub total_tokens: usize,
}

impl ZeroShotBlocks {
    /// Block `i`.
    pub fn block(&self, i: usize) -> &[u32] {
        &self.ids[i * self.block_len..(i + 1) * self.block_len]
    }
}

/// Detokenise, GPT-2-encode (+EOS per document) and block already-read documents.
pub fn blocks_from_documents(
    set: ZeroShotSet,
    docs: &[String],
    tokenizer: &Gpt2Tokenizer,
    block_len: usize,
    grouping: Grouping,
) -> Result<ZeroShotBlocks> {
    if block_len == 0 {
        return Err(DataError::InvalidArgument(
            "block length must be >= 1".into(),
        ));
    }
    let group = match grouping {
        Grouping::Whole => docs.len().max(1),
        Grouping::PerDocuments(0) => {
            return Err(DataError::InvalidArgument("group size must be >= 1".into()))
        }
        Grouping::PerDocuments(g) => g,
    };
    let mut ids = Vec::new();
    let mut total = 0;
    for chunk in docs.chunks(group) {
        let mut stream = Vec::new();
        for d in chunk {
            stream.extend(tokenizer.encode_document(&set.detokenize(d)));
        }
        total += stream.len();
        let keep = stream.len() / block_len * block_len;
        ids.extend_from_slice(&stream[..keep]);
    }
    if ids.is_empty() {
        return Err(DataError::TooShort {
            len: total,
            window: block_len,
        });
    }
    debug_assert!(ids.iter().all(|&t| t <= GPT2_EOS));
    Ok(ZeroShotBlocks {
        set,
        num_blocks: ids.len() / block_len,
        ids,
        block_len,
        total_tokens: total,
    })
}

/// Read `set` from `dir` and return its GPT-2 blocks of `block_len` tokens.
pub fn load_zero_shot(
    dir: &Path,
    set: ZeroShotSet,
    block_len: usize,
    grouping: Grouping,
) -> Result<ZeroShotBlocks> {
    let docs = set.read_documents(dir)?;
    blocks_from_documents(set, &docs, &Gpt2Tokenizer::new()?, block_len, grouping)
}
