//! Binary token files: a corpus is tokenised once (MD4 §9.1/§9.2 keep the whole token stream) and
//! memory-mapped for training.
//!
//! Layout (little-endian), a 64-byte header then `len` tokens of `dtype` bytes each:
//! ```text
//! 0  magic  b"MDTOKENS"     8 bytes
//! 8  version u32 = 1
//! 12 dtype   u32 ∈ {1, 2, 4} (bytes per token; the smallest that holds vocab − 1)
//! 16 vocab   u32 (V ≥ 1; every token < V)
//! 20 tokenizer u32 (TokenizerId::code)
//! 24 len     u64 (number of tokens)
//! 32 checksum u64 (FNV-1a 64 of the payload bytes)
//! 40 reserved, 24 zero bytes
//! ```
//! Opening checks magic, version, header fields, exact file size, checksum and every token's
//! range, so a training run never sees a corrupt or foreign file.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use maskdiff_process::{Token, Vocab};
use memmap2::Mmap;

use crate::checksum::fnv1a64;
use crate::error::{DataError, Result};
use crate::fsutil::write_atomic;
use crate::tokenizer::TokenizerId;

/// File magic.
pub const TOKEN_FILE_MAGIC: &[u8; 8] = b"MDTOKENS";
/// Format version written and read by this build.
pub const TOKEN_FILE_VERSION: u32 = 1;
/// Header length in bytes.
pub const TOKEN_FILE_HEADER_LEN: usize = 64;

/// Bytes per stored token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    U8,
    U16,
    U32,
}

impl Dtype {
    /// The smallest dtype that stores ids `0..vocab`.
    pub fn for_vocab(vocab: usize) -> Dtype {
        if vocab <= 1 << 8 {
            Dtype::U8
        } else if vocab <= 1 << 16 {
            Dtype::U16
        } else {
            Dtype::U32
        }
    }
    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U16 => 2,
            Dtype::U32 => 4,
        }
    }
    fn from_width(w: u32) -> Option<Dtype> {
        match w {
            1 => Some(Dtype::U8),
            2 => Some(Dtype::U16),
            4 => Some(Dtype::U32),
            _ => None,
        }
    }
}

/// The parsed header of a token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFileHeader {
    pub dtype: Dtype,
    pub vocab: Vocab,
    pub tokenizer: TokenizerId,
    pub len: u64,
    pub checksum: u64,
}

enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A validated token stream, memory-mapped from disk or held in memory.
pub struct TokenFile {
    header: TokenFileHeader,
    storage: Storage,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for TokenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenFile")
            .field("header", &self.header)
            .field("path", &self.path)
            .finish()
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Serialise `tokens` (each `< vocab`) into the token-file format.
pub fn encode_token_file(tokens: &[u32], vocab: Vocab, tokenizer: TokenizerId) -> Result<Vec<u8>> {
    let v = vocab.size();
    if let Some(tv) = tokenizer.vocab_size().filter(|&tv| tv != v) {
        return Err(DataError::InvalidArgument(format!(
            "a {tokenizer} token file has vocabulary {tv}, not {v}"
        )));
    }
    crate::tokenizer::check_ids(tokens, v)?;
    let dtype = Dtype::for_vocab(v);
    let mut payload = Vec::with_capacity(tokens.len() * dtype.width());
    match dtype {
        Dtype::U8 => payload.extend(tokens.iter().map(|&t| t as u8)),
        Dtype::U16 => tokens
            .iter()
            .for_each(|&t| payload.extend_from_slice(&(t as u16).to_le_bytes())),
        Dtype::U32 => tokens
            .iter()
            .for_each(|&t| payload.extend_from_slice(&t.to_le_bytes())),
    }
    let mut out = Vec::with_capacity(TOKEN_FILE_HEADER_LEN + payload.len());
    out.extend_from_slice(TOKEN_FILE_MAGIC);
    out.extend_from_slice(&TOKEN_FILE_VERSION.to_le_bytes());
    out.extend_from_slice(&(dtype.width() as u32).to_le_bytes());
    out.extend_from_slice(&(v as u32).to_le_bytes());
    out.extend_from_slice(&tokenizer.code().to_le_bytes());
    out.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    out.extend_from_slice(&fnv1a64(&payload).to_le_bytes());
    out.resize(TOKEN_FILE_HEADER_LEN, 0);
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Parse and fully validate a token file's bytes; returns the header.
pub fn validate_token_bytes(bytes: &[u8], what: &str) -> Result<TokenFileHeader> {
    let bad = |detail: String| DataError::BadHeader {
        what: what.to_string(),
        detail,
    };
    if bytes.len() < TOKEN_FILE_HEADER_LEN {
        if bytes.len() < 8 || &bytes[..8] != TOKEN_FILE_MAGIC {
            return Err(DataError::BadMagic {
                what: what.to_string(),
                found: bytes[..bytes.len().min(8)].to_vec(),
            });
        }
        return Err(DataError::WrongSize {
            what: what.to_string(),
            expected: TOKEN_FILE_HEADER_LEN as u64,
            found: bytes.len() as u64,
        });
    }
    if &bytes[..8] != TOKEN_FILE_MAGIC {
        return Err(DataError::BadMagic {
            what: what.to_string(),
            found: bytes[..8].to_vec(),
        });
    }
    let version = u32_at(bytes, 8);
    if version != TOKEN_FILE_VERSION {
        return Err(DataError::BadVersion {
            what: what.to_string(),
            found: version,
            expected: TOKEN_FILE_VERSION,
        });
    }
    let width = u32_at(bytes, 12);
    let dtype = Dtype::from_width(width).ok_or_else(|| bad(format!("dtype width {width}")))?;
    let v = u32_at(bytes, 16) as usize;
    let vocab = Vocab::new(v).map_err(|e| bad(e.to_string()))?;
    if v > 1usize << (8 * dtype.width()).min(32) {
        return Err(bad(format!(
            "vocabulary {v} does not fit in {width}-byte tokens"
        )));
    }
    let code = u32_at(bytes, 20);
    let tokenizer =
        TokenizerId::from_code(code).ok_or_else(|| bad(format!("unknown tokenizer id {code}")))?;
    // A text tokenizer's tag fixes the vocabulary: a text8 file of V = 100 would train, then
    // fail to decode its own samples.
    if let Some(tv) = tokenizer.vocab_size().filter(|&tv| tv != v) {
        return Err(bad(format!(
            "tagged {tokenizer} (vocabulary {tv}) but declares vocabulary {v}"
        )));
    }
    let len = u64_at(bytes, 24);
    let checksum = u64_at(bytes, 32);
    if bytes[40..TOKEN_FILE_HEADER_LEN].iter().any(|&b| b != 0) {
        return Err(bad("reserved bytes are not zero".into()));
    }
    let expected = len
        .checked_mul(dtype.width() as u64)
        .and_then(|p| p.checked_add(TOKEN_FILE_HEADER_LEN as u64))
        .ok_or_else(|| bad(format!("length {len} overflows")))?;
    if expected != bytes.len() as u64 {
        return Err(DataError::WrongSize {
            what: what.to_string(),
            expected,
            found: bytes.len() as u64,
        });
    }
    let payload = &bytes[TOKEN_FILE_HEADER_LEN..];
    let found = fnv1a64(payload);
    if found != checksum {
        return Err(DataError::BadChecksum {
            what: what.to_string(),
            expected: checksum,
            found,
        });
    }
    let header = TokenFileHeader {
        dtype,
        vocab,
        tokenizer,
        len,
        checksum,
    };
    // Range check of every token (a u8 file with V = 256 cannot fail; others can).
    if v < 1usize << (8 * dtype.width()).min(32) {
        for (pos, id) in (0..len as usize).map(|i| (i, read_id(payload, dtype, i))) {
            if id as usize >= v {
                return Err(DataError::TokenOutOfVocab {
                    id: id as u64,
                    pos,
                    vocab: v,
                });
            }
        }
    }
    Ok(header)
}

fn read_id(payload: &[u8], dtype: Dtype, i: usize) -> u32 {
    match dtype {
        Dtype::U8 => payload[i] as u32,
        Dtype::U16 => u16::from_le_bytes([payload[2 * i], payload[2 * i + 1]]) as u32,
        Dtype::U32 => u32_at(payload, 4 * i),
    }
}

impl TokenFile {
    /// Memory-map and validate a token file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        // SAFETY: the file is opened read-only and this crate only replaces token files by
        // atomic rename (never in place), so the mapped bytes are not modified while mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(path, e))?;
        let header = validate_token_bytes(&map, &path.display().to_string())?;
        Ok(Self {
            header,
            storage: Storage::Mapped(map),
            path: Some(path.to_path_buf()),
        })
    }

    /// Validate token-file bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let header = validate_token_bytes(&bytes, "token bytes")?;
        Ok(Self {
            header,
            storage: Storage::Owned(bytes),
            path: None,
        })
    }

    /// An in-memory token file of `tokens` (validated like a file on disk).
    pub fn from_tokens(tokens: &[u32], vocab: Vocab, tokenizer: TokenizerId) -> Result<Self> {
        Self::from_bytes(encode_token_file(tokens, vocab, tokenizer)?)
    }

    /// Write `tokens` atomically to `path` (temp file + rename) and open the result.
    pub fn write(
        path: &Path,
        tokens: &[u32],
        vocab: Vocab,
        tokenizer: TokenizerId,
    ) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        write_atomic(path, &encode_token_file(tokens, vocab, tokenizer)?)?;
        Self::open(path)
    }

    pub fn header(&self) -> &TokenFileHeader {
        &self.header
    }
    /// The file this was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.header.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.header.len == 0
    }
    pub fn vocab(&self) -> Vocab {
        self.header.vocab
    }
    pub fn tokenizer(&self) -> TokenizerId {
        self.header.tokenizer
    }
    fn payload(&self) -> &[u8] {
        &self.storage.bytes()[TOKEN_FILE_HEADER_LEN..]
    }
    /// Token `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<u32> {
        (i < self.len()).then(|| read_id(self.payload(), self.header.dtype, i))
    }
    fn check_range(&self, r: &Range<usize>) -> Result<()> {
        if r.start > r.end || r.end > self.len() {
            return Err(DataError::InvalidArgument(format!(
                "token range {}..{} outside 0..{}",
                r.start,
                r.end,
                self.len()
            )));
        }
        Ok(())
    }
    /// Append the ids of `range` to `out`.
    pub fn read_into(&self, range: Range<usize>, out: &mut Vec<u32>) -> Result<()> {
        self.check_range(&range)?;
        let (p, d) = (self.payload(), self.header.dtype);
        out.extend(range.map(|i| read_id(p, d, i)));
        Ok(())
    }
    /// The ids of `range`.
    pub fn ids(&self, range: Range<usize>) -> Result<Vec<u32>> {
        let mut v = Vec::with_capacity(range.len());
        self.read_into(range, &mut v)?;
        Ok(v)
    }
    /// The checked [`Token`]s of `range`.
    pub fn tokens(&self, range: Range<usize>) -> Result<Vec<Token>> {
        Ok(self.vocab().tokens(&self.ids(range)?)?)
    }
}
