//! Block-by-block generation for block diffusion (BD3-LM: Arriola et al., ICLR 2025, Alg. 2):
//! the sequence grows by blocks of the network's block size B; each block is drawn by any of this
//! crate's samplers (ancestral, mean, cached, first-hitting, confidence, ReMDM, threshold) over a
//! `maskdiff_process::PrefixDenoiser` that conditions on the committed clean prefix, then
//! committed (a key/value-cache backend encodes it once). `config.steps` is the number of steps
//! per block. Generation stops at `config.length` tokens, or for a sample as soon as a block
//! holds the end-of-text id `eot` (the sample is cut right after it: variable length).
//!
//! Samples are drawn one after another, each with its own prefix; block j of sample i uses the
//! RNG stream (seed mixed with j, index `first_index + i`), so a sample is the same whatever the
//! number of samples drawn with it.

use crate::rng::mix64;
use crate::{sample, SamplerConfig, SamplerError, ScheduleRef};
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, PrefixDenoiser, ProcessError, Vocab};

/// Sequences drawn block by block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSampleOutput {
    /// Token ids per sample (shorter than the length when cut at end-of-text).
    pub sequences: Vec<Vec<u32>>,
    /// Network calls per sample for its noised blocks (commits not counted).
    pub nfe: Vec<u32>,
    /// Blocks drawn per sample (all but the last are committed to the prefix: on a cached
    /// backend, one more network call each).
    pub blocks: Vec<usize>,
    /// Whether the sample stopped at an end-of-text token.
    pub stopped_at_eot: Vec<bool>,
}

/// The prefix denoiser seen as a plain denoiser of the current block.
struct InBlock<'p, P: ?Sized>(&'p mut P);

impl<P: PrefixDenoiser + ?Sized> Denoiser for InBlock<'_, P> {
    fn vocab(&self) -> Vocab {
        self.0.vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        self.0.is_time_conditioned()
    }
    fn num_classes(&self) -> usize {
        self.0.num_classes()
    }
    fn log_probs(&mut self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        self.0.block_log_probs(batch)
    }
}

/// Draw `config.num_samples` sequences block by block (see the module docs). `labels`: one per
/// sample for class-conditional denoisers. `config.block_size` is ignored (the blocks are the
/// denoiser's).
pub fn sample_blocks<'a, P: PrefixDenoiser + ?Sized>(
    den: &mut P,
    schedule: impl Into<ScheduleRef<'a>>,
    config: &SamplerConfig,
    eot: Option<u32>,
    labels: Option<&[u32]>,
) -> Result<BlockSampleOutput, SamplerError> {
    let schedule = schedule.into();
    let mut inner = config.clone();
    inner.block_size = None;
    inner.validate()?;
    let bs = den.block_size();
    if bs == 0 {
        return Err(SamplerError::BadBlockSize);
    }
    if config.length > den.max_len() {
        return Err(SamplerError::Process(ProcessError::Shape(format!(
            "length {} exceeds the network's max_len {}",
            config.length,
            den.max_len()
        ))));
    }
    if let Some(l) = labels {
        if l.len() != config.num_samples {
            return Err(SamplerError::LabelCount {
                got: l.len(),
                samples: config.num_samples,
            });
        }
    }
    if let Some(e) = eot {
        if e >= den.vocab().size() as u32 {
            return Err(SamplerError::Process(ProcessError::Shape(format!(
                "end-of-text id {e} is not a token of the vocabulary"
            ))));
        }
    }
    let mut out = BlockSampleOutput {
        sequences: Vec::with_capacity(config.num_samples),
        nfe: Vec::with_capacity(config.num_samples),
        blocks: Vec::with_capacity(config.num_samples),
        stopped_at_eot: Vec::with_capacity(config.num_samples),
    };
    for i in 0..config.num_samples {
        let label = labels.map(|l| l[i]);
        den.reset(label);
        let (mut seq, mut nfe, mut blocks, mut stopped) = (Vec::new(), 0u32, 0usize, false);
        while seq.len() < config.length {
            let len = bs.min(config.length - seq.len());
            let cfg = SamplerConfig {
                length: len,
                num_samples: 1,
                batch_size: 1,
                first_index: config.first_index + i as u64,
                seed: mix64(config.seed ^ mix64(blocks as u64 + 1)),
                ..inner.clone()
            };
            let lab = label.map(|c| [c]);
            let drawn = sample(
                &mut InBlock(den),
                schedule,
                &cfg,
                &[],
                lab.as_ref().map(|a| &a[..]),
            )?;
            let block = &drawn.sequences[0];
            nfe += drawn.nfe[0];
            blocks += 1;
            if let Some(at) = eot.and_then(|e| block.iter().position(|&x| x == e)) {
                seq.extend_from_slice(&block[..=at]);
                stopped = true;
                break;
            }
            seq.extend_from_slice(block);
            if seq.len() < config.length {
                den.commit(block)?;
            }
        }
        out.sequences.push(seq);
        out.nfe.push(nfe);
        out.blocks.push(blocks);
        out.stopped_at_eot.push(stopped);
    }
    Ok(out)
}
