//! Real data for masked diffusion (MD4, Shi et al. 2024, §9 "Data pipelines"; spec §9, §11.24):
//!
//! - [`tokenizer`]: text8 characters (V = 27), raw bytes (V = 256), GPT-2 BPE (V = 50257) behind
//!   the [`Tokenizer`] trait; the mask id V is never a token.
//! - [`tokenfile`]: a compact, checksummed binary token format, memory-mapped for training.
//! - [`split`] and [`batch`]: offset splits (90/5/5), seeded resumable random training windows,
//!   consecutive evaluation chunks; [`pack`]: EOS document packing and OWT's grouped 2 % eval
//!   split (§9.2).
//! - [`images`]: MNIST/Fashion-MNIST IDX, CIFAR-10 binary and 8×8 digits as pixel tokens (§9.4).
//! - [`zeroshot`]: LAMBADA / WikiText / PTB / 1BW readers with SEDD's detokenisers (Table 1).
//! - [`corpus`]: the default English corpus built from files `scripts/fetch-data.sh` fetched;
//!   [`textcache`]: token files cached next to plain-text sources, keyed by their content.
//!
//! Every reader returns a [`DataError`] on bad input; nothing here panics on file contents.

mod checksum;
mod error;
mod fsutil;
mod permutation;

pub mod batch;
pub mod corpus;
pub mod images;
pub mod pack;
pub mod split;
pub mod textcache;
pub mod tokenfile;
pub mod tokenizer;
pub mod zeroshot;

pub use batch::{EvalChunks, TokenBatch, WindowSampler, WindowSamplerState};
pub use checksum::{fnv1a64, fnv1a64_update};
pub use corpus::{build_english_corpus, open_or_build_english_corpus};
pub use error::{DataError, Result};
pub use fsutil::write_atomic;
pub use images::{Image, ImageSet, ImageShape};
pub use split::{Split, SplitRatio};
pub use tokenfile::{Dtype, TokenFile, TokenFileHeader};
pub use tokenizer::{
    AnyTokenizer, ByteTokenizer, Gpt2Tokenizer, Text8Tokenizer, Tokenizer, TokenizerId,
};
pub use zeroshot::{Grouping, ZeroShotBlocks, ZeroShotSet};
