//! Document packing of the OpenWebText pipeline (MD4 §9.2): each document is tokenised and followed
//! by EOS, documents are concatenated into one stream, and the stream is cut into fixed blocks that
//! cross document boundaries (no BOS, no padding; the tail shorter than a block is dropped).

use crate::error::{DataError, Result};

/// Concatenate tokenised documents, appending `eos` after each one.
pub fn pack_documents<I, D>(docs: I, eos: u32) -> Vec<u32>
where
    I: IntoIterator<Item = D>,
    D: AsRef<[u32]>,
{
    let mut out = Vec::new();
    for d in docs {
        out.extend_from_slice(d.as_ref());
        out.push(eos);
    }
    out
}

/// Cut a packed stream into consecutive blocks of `block_len` (tail dropped).
pub fn blocks(stream: &[u32], block_len: usize) -> Result<Vec<&[u32]>> {
    if block_len == 0 {
        return Err(DataError::InvalidArgument(
            "block length must be >= 1".into(),
        ));
    }
    Ok(stream.chunks_exact(block_len).collect())
}
