//! Opening the configured data (spec §9) for training, evaluation and decoding: a text corpus as
//! a token file split 90/5/5 by offset (text8 convention) with random training windows and
//! consecutive evaluation chunks, or an image set (one token per pixel channel, §9.4).
//!
//! `data.path` for text may be (1) the fetch cache directory of `scripts/fetch-data.sh` (the
//! default English corpus is tokenised once into `english/corpus.<tokenizer>.tok` there), (2) a
//! token file (`MDTOKENS` header), or (3) any plain text file, tokenised once (normalised to
//! text8 style first for `text8`) into a token cache beside it, keyed by the text's content
//! (`maskdiff_data::textcache`), so later runs memory-map the tokens.
//!
//! Every opened data set has a content fingerprint ([`DataFingerprint`]: FNV-1a 64 of its tokens,
//! and their number), recorded in checkpoints so `eval` and `--resume` refuse other data.

use crate::config::{DataConfig, DatasetKind};
use crate::error::{CliError, Result};
use maskdiff_data::tokenizer::normalize_text8;
use maskdiff_data::{
    AnyTokenizer, ImageSet, Split, SplitRatio, TokenBatch, TokenFile, Tokenizer, TokenizerId,
    WindowSampler, WindowSamplerState,
};
use maskdiff_process::Vocab;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The content of a data set: FNV-1a 64 of its tokens (text: the token file's payload checksum;
/// images: every split's pixels and labels) and the number of tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub fnv1a64: String,
    pub tokens: u64,
}

impl std::fmt::Display for DataFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fnv1a64 {} over {} tokens", self.fnv1a64, self.tokens)
    }
}

/// What a checkpoint records about its data, to refuse evaluating/sampling with another vocabulary
/// and evaluating or resuming on other data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub dataset: DatasetKind,
    pub vocab: usize,
    pub seq_len: usize,
    pub num_classes: usize,
    /// Images: (height, width, channels); `None` for text.
    #[serde(default)]
    pub image: Option<[usize; 3]>,
    /// The data's content; absent in checkpoints written before fingerprints were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<DataFingerprint>,
}

impl DataIdentity {
    /// Check that this (the data now, read from `data_path`) is the data `stored` (a checkpoint's
    /// record, in `ckpt`) was trained on: same shape and vocabulary, same content. A checkpoint
    /// without a fingerprint is accepted with a warning (once per process).
    pub fn check_against(
        &self,
        stored: &DataIdentity,
        ckpt: &Path,
        data_path: &Path,
    ) -> Result<()> {
        let shape = |d: &DataIdentity| DataIdentity {
            fingerprint: None,
            ..d.clone()
        };
        if shape(self) != shape(stored) {
            return Err(CliError::CheckpointMismatch {
                path: ckpt.to_path_buf(),
                reason: format!(
                    "it was trained on {:?}, but {} gives {:?}",
                    shape(stored),
                    data_path.display(),
                    shape(self)
                ),
            });
        }
        match (&stored.fingerprint, &self.fingerprint) {
            (Some(a), Some(b)) if a != b => Err(CliError::CheckpointMismatch {
                path: ckpt.to_path_buf(),
                reason: format!(
                    "{} is not the data it was trained on (trained on {a}, found {b}); \
                     pass the original data with --data",
                    data_path.display()
                ),
            }),
            (None, _) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    eprintln!(
                        "maskdiff: warning: {} records no data fingerprint (written by an older \
                         version); cannot check that {} holds the data it was trained on",
                        ckpt.display(),
                        data_path.display()
                    )
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `path` made absolute against the current directory (so a run's stored data path means the
/// same file from any directory).
pub fn absolute_data_path(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| CliError::io("cannot resolve", path, e))
}

/// How token ids become output: a text tokenizer or an image shape. Rebuilt from a checkpoint's
/// [`DataIdentity`], so sampling needs no data files.
#[derive(Debug, Clone)]
pub enum Codec {
    Text(AnyTokenizer),
    Image(maskdiff_data::ImageShape),
}

impl Codec {
    pub fn from_identity(id: &DataIdentity) -> Result<Codec> {
        let text = |t| Ok(Codec::Text(AnyTokenizer::new(t)?));
        match (id.dataset, id.image) {
            (DatasetKind::Text8, _) => text(TokenizerId::Text8),
            (DatasetKind::Bytes, _) => text(TokenizerId::Bytes),
            (DatasetKind::Gpt2, _) => text(TokenizerId::Gpt2),
            (_, Some([height, width, channels])) => Ok(Codec::Image(maskdiff_data::ImageShape {
                height,
                width,
                channels,
                levels: id.vocab as u32,
            })),
            (_, None) => Err(CliError::Input(
                "the checkpoint does not record its image shape".into(),
            )),
        }
    }
}

/// Evaluation sequences and, for labelled images, their class labels.
pub type EvalSet = (Vec<Vec<u32>>, Option<Vec<u32>>);

/// Opened data.
pub enum Data {
    Text {
        file: TokenFile,
        tokenizer: AnyTokenizer,
        splits: [Range<usize>; 3],
        seq_len: usize,
    },
    Images {
        splits: [ImageSet; 3],
    },
}

fn split_index(s: Split) -> usize {
    match s {
        Split::Train => 0,
        Split::Valid => 1,
        Split::Test => 2,
    }
}

fn missing(path: &Path, what: &str) -> CliError {
    CliError::Input(format!(
        "{what} not found at {} (fetch it with `bash scripts/fetch-data.sh`, or set data.path / --data)",
        path.display()
    ))
}

/// The English corpus of the fetch cache `dir`. A cached token file that does not open is rebuilt
/// from the fetched sources when they are there; when they are not, the error says the cache is
/// corrupt and how to refetch (rather than that a source file is missing).
fn open_english_cache(dir: &Path, id: TokenizerId) -> Result<TokenFile> {
    let cached = maskdiff_data::corpus::english_corpus_path(dir, id);
    if cached.exists() {
        if let Err(e) = TokenFile::open(&cached) {
            if maskdiff_data::corpus::english_corpus_files(dir).is_err() {
                return Err(CliError::Input(format!(
                    "the cached corpus {} is corrupt ({e}) and the sources to rebuild it are \
                     missing: refetch them with `bash scripts/fetch-data.sh {} english` and \
                     maskdiff rebuilds the corpus on its next run",
                    cached.display(),
                    dir.display()
                )));
            }
            eprintln!(
                "maskdiff: the cached corpus {} is corrupt ({e}); rebuilding it from the sources",
                cached.display()
            );
        }
    }
    Ok(maskdiff_data::open_or_build_english_corpus(dir, id)?)
}

/// Whether `path` starts with the token-file magic.
fn is_token_file(path: &Path) -> Result<bool> {
    use std::io::Read;
    let magic = maskdiff_data::tokenfile::TOKEN_FILE_MAGIC;
    let mut head = [0u8; 8];
    let mut f = std::fs::File::open(path).map_err(|e| CliError::io("cannot open", path, e))?;
    let n = f
        .read(&mut head)
        .map_err(|e| CliError::io("cannot read", path, e))?;
    Ok(n == magic.len() && &head == magic)
}

/// Images 90/5/5 by index when the set has no official test split (the 8×8 digits).
fn split_images(all: ImageSet) -> [ImageSet; 3] {
    let n = all.len();
    let [a, b, c] = SplitRatio::default().ranges(n);
    let per = all.shape.tokens_per_image();
    let take = |r: Range<usize>| ImageSet {
        shape: all.shape,
        tokens: all.tokens[r.start * per..r.end * per].to_vec(),
        labels: all.labels.as_ref().map(|l| l[r.clone()].to_vec()),
        num_classes: all.num_classes,
    };
    [take(a), take(b), take(c)]
}

/// A data set shipped as training and test images: the last 5 % of the training images serve
/// as the validation split (neither MNIST-style IDX files nor CIFAR-10 have one).
fn train_test_images(train: ImageSet, test: ImageSet) -> [ImageSet; 3] {
    let n = train.len();
    let cut = n - n / 20;
    let per = train.shape.tokens_per_image();
    let part = |r: Range<usize>| ImageSet {
        shape: train.shape,
        tokens: train.tokens[r.start * per..r.end * per].to_vec(),
        labels: train.labels.as_ref().map(|l| l[r.clone()].to_vec()),
        num_classes: train.num_classes,
    };
    [part(0..cut), part(cut..n), test]
}

impl Data {
    pub fn open(cfg: &DataConfig) -> Result<Data> {
        let path = cfg.path.as_path();
        let tok_id = match cfg.dataset {
            DatasetKind::Text8 => Some(TokenizerId::Text8),
            DatasetKind::Bytes => Some(TokenizerId::Bytes),
            DatasetKind::Gpt2 => Some(TokenizerId::Gpt2),
            _ => None,
        };
        if let Some(id) = tok_id {
            if !path.exists() {
                return Err(missing(path, "text data"));
            }
            let tokenizer = AnyTokenizer::new(id)?;
            let file = if path.is_dir() {
                if !path.join("english").is_dir() {
                    return Err(missing(&path.join("english"), "the English corpus"));
                }
                open_english_cache(path, id)?
            } else {
                if is_token_file(path)? {
                    // Memory-mapped, and errors name the file.
                    let f = TokenFile::open(path)?;
                    if f.tokenizer() != id {
                        return Err(CliError::Input(format!(
                            "{} was tokenised with {}, but data.dataset is {}",
                            path.display(),
                            f.tokenizer(),
                            id
                        )));
                    }
                    f
                } else {
                    let (f, status) = maskdiff_data::textcache::open_or_build_text_cache(path, id)?;
                    if let maskdiff_data::textcache::CacheStatus::Uncached(why) = status {
                        eprintln!(
                            "maskdiff: note: tokens of {} kept in memory, not cached ({why})",
                            path.display()
                        );
                    }
                    f
                }
            };
            let splits = SplitRatio::default().ranges(file.len());
            for (name, r) in ["train", "validation", "test"].iter().zip(&splits) {
                if r.len() < cfg.seq_len {
                    return Err(CliError::Input(format!(
                        "the {name} split of {} has {} tokens, fewer than one sequence of data.seq_len = {}",
                        path.display(),
                        r.len(),
                        cfg.seq_len
                    )));
                }
            }
            return Ok(Data::Text {
                file,
                tokenizer,
                splits,
                seq_len: cfg.seq_len,
            });
        }
        if !path.exists() {
            return Err(missing(path, "image data"));
        }
        let splits = match cfg.dataset {
            DatasetKind::FashionMnist | DatasetKind::Mnist => train_test_images(
                maskdiff_data::images::load_fashion_mnist(path, Split::Train)?,
                maskdiff_data::images::load_fashion_mnist(path, Split::Test)?,
            ),
            DatasetKind::Cifar10 => train_test_images(
                maskdiff_data::images::load_cifar10(path, Split::Train)?,
                maskdiff_data::images::load_cifar10(path, Split::Test)?,
            ),
            DatasetKind::Digits => split_images(maskdiff_data::images::load_digits(path)?),
            _ => unreachable!("text datasets handled above"),
        };
        if splits.iter().any(|s| s.is_empty()) {
            return Err(CliError::Input(format!(
                "{} holds too few images to split",
                path.display()
            )));
        }
        Ok(Data::Images { splits })
    }

    pub fn vocab(&self) -> Result<Vocab> {
        Ok(match self {
            Data::Text { file, .. } => file.vocab(),
            Data::Images { splits } => splits[0].shape.vocab()?,
        })
    }

    pub fn seq_len(&self) -> usize {
        match self {
            Data::Text { seq_len, .. } => *seq_len,
            Data::Images { splits } => splits[0].shape.tokens_per_image(),
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            Data::Text { .. } => 0,
            Data::Images { splits } => splits[0].num_classes,
        }
    }

    pub fn identity(&self, dataset: DatasetKind) -> Result<DataIdentity> {
        Ok(DataIdentity {
            dataset,
            vocab: self.vocab()?.size(),
            seq_len: self.seq_len(),
            num_classes: self.num_classes(),
            image: self.image_shape().map(|s| [s.height, s.width, s.channels]),
            fingerprint: Some(self.fingerprint()),
        })
    }

    /// The content fingerprint (see [`DataFingerprint`]).
    pub fn fingerprint(&self) -> DataFingerprint {
        let (h, tokens) = match self {
            Data::Text { file, .. } => (file.header().checksum, file.len() as u64),
            Data::Images { splits } => {
                let mut h = maskdiff_data::fnv1a64(b"");
                let mut n = 0u64;
                for s in splits {
                    h = maskdiff_data::fnv1a64_update(h, &s.tokens);
                    h = maskdiff_data::fnv1a64_update(h, s.labels.as_deref().unwrap_or(&[]));
                    n += s.tokens.len() as u64;
                }
                (h, n)
            }
        };
        DataFingerprint {
            fnv1a64: format!("{h:016x}"),
            tokens,
        }
    }

    /// A fresh training-batch sampler (seeded, resumable through its state).
    pub fn train_sampler(&self, seed: u64) -> Result<WindowSampler> {
        Ok(match self {
            Data::Text {
                splits, seq_len, ..
            } => WindowSampler::new(splits[0].clone(), *seq_len, seed)?,
            Data::Images { splits } => splits[0].sampler(seed)?,
        })
    }

    /// Resume a sampler, checking it belongs to this data.
    pub fn resume_sampler(&self, state: WindowSamplerState) -> Result<WindowSampler> {
        let fresh = self.train_sampler(state.seed)?;
        let f = fresh.state();
        if (f.range_start, f.range_end, f.window)
            != (state.range_start, state.range_end, state.window)
        {
            return Err(CliError::Input(
                "the checkpoint's data position does not fit this data (was the data file changed?)".into(),
            ));
        }
        Ok(WindowSampler::from_state(state)?)
    }

    /// The next training batch.
    pub fn next_batch(&self, sampler: &mut WindowSampler, batch: usize) -> Result<TokenBatch> {
        Ok(match self {
            Data::Text { file, .. } => sampler.next_batch(file, batch)?,
            Data::Images { splits } => splits[0].next_batch(sampler, batch)?,
        })
    }

    /// Number of evaluation sequences of `split` (non-overlapping chunks or images).
    pub fn eval_count(&self, split: Split) -> Result<usize> {
        Ok(match self {
            Data::Text {
                splits, seq_len, ..
            } => maskdiff_data::EvalChunks::new(splits[split_index(split)].clone(), *seq_len)?
                .count(),
            Data::Images { splits } => splits[split_index(split)].len(),
        })
    }

    /// Evaluation sequences of `split` — consecutive non-overlapping chunks for text, images in
    /// order — and their labels. With `max > 0` and more sequences than that, `max` of them
    /// evenly spaced over the split (a deterministic, representative subset).
    pub fn eval_sequences(&self, split: Split, max: usize) -> Result<EvalSet> {
        let count = self.eval_count(split)?;
        let idx: Vec<usize> = if max == 0 || max >= count {
            (0..count).collect()
        } else {
            (0..max).map(|i| i * count / max).collect()
        };
        match self {
            Data::Text {
                file,
                splits,
                seq_len,
                ..
            } => {
                let chunks =
                    maskdiff_data::EvalChunks::new(splits[split_index(split)].clone(), *seq_len)?;
                let mut out = Vec::with_capacity(idx.len());
                for i in idx {
                    out.push(file.ids(chunks.chunk(i)?)?);
                }
                Ok((out, None))
            }
            Data::Images { splits } => {
                let b = splits[split_index(split)].batch(&idx)?;
                let rows = (0..b.batch)
                    .map(|i| Ok(b.row(i)?.to_vec()))
                    .collect::<Result<Vec<_>>>()?;
                Ok((rows, b.labels))
            }
        }
    }

    pub fn tokenizer(&self) -> Option<&AnyTokenizer> {
        match self {
            Data::Text { tokenizer, .. } => Some(tokenizer),
            Data::Images { .. } => None,
        }
    }

    pub fn image_shape(&self) -> Option<maskdiff_data::ImageShape> {
        match self {
            Data::Text { .. } => None,
            Data::Images { splits } => Some(splits[0].shape),
        }
    }
}

/// Text tokenisation for prompts, with text8 normalisation.
pub fn encode_prompt(tok: &AnyTokenizer, text: &str) -> Result<Vec<u32>> {
    Ok(match tok.id() {
        TokenizerId::Text8 => tok.encode(&normalize_text8(text))?,
        _ => tok.encode(text)?,
    })
}

/// One display string per token (for `--show-steps`).
pub fn token_pieces(tok: &AnyTokenizer, ids: &[u32]) -> Result<Vec<String>> {
    ids.iter().map(|&i| Ok(tok.decode(&[i])?)).collect()
}
