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
//!
//! Conditioning ([`sample_blocks_streamed`]): [`Constraint`]s fix tokens as for the other
//! samplers. A block whose positions are all fixed (a prompt's whole blocks) is committed as it
//! is, without a network call; in any other block the fixed positions are clamped inside that
//! block's sampler, so a prompt need not be block-aligned (its last partial block conditions the
//! rest of the block as an MD4 prompt does). Block diffusion is causal across blocks: a token
//! fixed in a later block is kept but does not inform the blocks before it.
//!
//! Streaming: every step of every block is reported as the [`StepEvent`] the plain sampler
//! reports, in sequence coordinates — `sequence` and `chunk` are the sample's index (samples are
//! drawn one at a time), positions are offset by the block's start, `block` is the block index of
//! `num_blocks` = ⌈length / B⌉, and block j's steps are numbered `j·T + 1 ..= (j + 1)·T` of
//! `total_steps` = num_blocks·T (T = `config.steps`). The events replayed on an all-mask state
//! give the final samples; a sample that stops at end-of-text has no events after its block.

use crate::rng::mix64;
use crate::{Constraint, Sampler, SamplerConfig, SamplerError, ScheduleRef, StepEvent};
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
    /// Per position, the global step (see the module docs) after which it stopped being a mask:
    /// 0 for constraint-fixed positions, the block's last step for its final fill.
    pub reveal_step: Vec<Vec<u32>>,
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
    sample_blocks_streamed(den, schedule, config, eot, labels, &[], &mut |_| {})
}

/// [`sample_blocks`] with fixed tokens and step events (see the module docs). `constraints`:
/// none, one shared by every sample, or one per sample, resolved over `config.length`;
/// `on_event` receives every step's event as it happens.
pub fn sample_blocks_streamed<'a, P: PrefixDenoiser + ?Sized>(
    den: &mut P,
    schedule: impl Into<ScheduleRef<'a>>,
    config: &SamplerConfig,
    eot: Option<u32>,
    labels: Option<&[u32]>,
    constraints: &[Constraint],
    on_event: &mut dyn FnMut(&StepEvent),
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
    let n = config.num_samples;
    if let Some(l) = labels {
        if l.len() != n {
            return Err(SamplerError::LabelCount {
                got: l.len(),
                samples: n,
            });
        }
    }
    let vocab = den.vocab();
    if let Some(e) = eot {
        if e >= vocab.size() as u32 {
            return Err(SamplerError::Process(ProcessError::Shape(format!(
                "end-of-text id {e} is not a token of the vocabulary"
            ))));
        }
    }
    let fixed: Vec<Vec<Option<u32>>> = match constraints.len() {
        0 => vec![vec![None; config.length]],
        1 => vec![constraints[0].resolve(config.length, vocab)?],
        k if k == n => constraints
            .iter()
            .map(|c| c.resolve(config.length, vocab))
            .collect::<Result<_, _>>()?,
        k => return Err(SamplerError::ConstraintCount { got: k, samples: n }),
    };
    let num_blocks = config.length.div_ceil(bs);
    let steps = config.steps;
    let mut out = BlockSampleOutput {
        sequences: Vec::with_capacity(n),
        nfe: Vec::with_capacity(n),
        blocks: Vec::with_capacity(n),
        stopped_at_eot: Vec::with_capacity(n),
        reveal_step: Vec::with_capacity(n),
    };
    let mut calls_so_far = 0u64;
    for i in 0..n {
        let fixed = &fixed[if fixed.len() == 1 { 0 } else { i }];
        let label = labels.map(|l| l[i]);
        den.reset(label);
        let (mut seq, mut reveal, mut nfe, mut blocks, mut stopped) =
            (Vec::new(), Vec::new(), 0u32, 0usize, false);
        while seq.len() < config.length {
            let start = seq.len();
            let len = bs.min(config.length - start);
            let here = &fixed[start..start + len];
            let first_step = blocks * steps;
            let (block, block_reveal): (Vec<u32>, Vec<u32>) = if here.iter().all(Option::is_some) {
                (here.iter().flatten().copied().collect(), vec![0; len])
            } else {
                let cfg = SamplerConfig {
                    length: len,
                    num_samples: 1,
                    batch_size: 1,
                    first_index: config.first_index + i as u64,
                    seed: mix64(config.seed ^ mix64(blocks as u64 + 1)),
                    ..inner.clone()
                };
                let lab = label.map(|c| [c]);
                let cons = if here.iter().any(Option::is_some) {
                    vec![Constraint::from_template(here)]
                } else {
                    Vec::new()
                };
                let mut in_block = InBlock(&mut *den);
                let mut sampler = Sampler::new(
                    &mut in_block,
                    schedule,
                    &cfg,
                    &cons,
                    lab.as_ref().map(|a| &a[..]),
                )?;
                for ev in sampler.by_ref() {
                    let mut ev = ev?;
                    calls_so_far += ev.calls;
                    ev.chunk = i;
                    ev.num_chunks = n;
                    ev.block = blocks;
                    ev.num_blocks = num_blocks;
                    ev.step += first_step;
                    ev.total_steps = num_blocks * steps;
                    ev.calls_so_far = calls_so_far;
                    for r in &mut ev.revealed {
                        r.sequence = i;
                        r.position += start;
                    }
                    for r in &mut ev.remasked {
                        r.sequence = i;
                        r.position += start;
                    }
                    on_event(&ev);
                }
                let drawn = sampler.snapshot();
                nfe += drawn.nfe[0];
                let shift = |s: u32| if s == 0 { 0 } else { s + first_step as u32 };
                let rs = drawn.reveal_step[0].iter().map(|&s| shift(s)).collect();
                (drawn.sequences[0].clone(), rs)
            };
            blocks += 1;
            // end-of-text among the generated positions (a prompt's own is kept)
            let cut = eot.and_then(|e| (0..len).find(|&k| block[k] == e && here[k].is_none()));
            if let Some(at) = cut {
                seq.extend_from_slice(&block[..=at]);
                reveal.extend_from_slice(&block_reveal[..=at]);
                stopped = true;
                break;
            }
            seq.extend_from_slice(&block);
            reveal.extend_from_slice(&block_reveal);
            if seq.len() < config.length {
                den.commit(&block)?;
            }
        }
        out.sequences.push(seq);
        out.nfe.push(nfe);
        out.blocks.push(blocks);
        out.stopped_at_eot.push(stopped);
        out.reveal_step.push(reveal);
    }
    Ok(out)
}
