//! Command-line syntax (clap). Every flag is documented here; `maskdiff <cmd> --help` prints it.
//! Training flags override the values of the TOML config (see `config.rs` for defaults).

use crate::config::{BlockObjective, Config, DatasetKind, Device, ModelKind};
use clap::{Args, Parser, Subcommand};
use maskdiff_network::Precision;
use maskdiff_sampler::{RemdmStrategy, SamplerKind};
use maskdiff_schedule::{SamplingGrid, TimeSampling};
use std::path::PathBuf;

/// Masked (absorbing-state) diffusion for discrete data: MD4 and GenMD4 (Shi et al., NeurIPS
/// 2024). Train a denoiser, evaluate its negative ELBO, sample from it, plot metrics.
#[derive(Debug, Parser)]
#[command(name = "maskdiff", version, about, long_about = None, arg_required_else_help = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a TOML config and/or flags; resumable, Ctrl-C safe.
    Train(TrainArgs),
    /// Negative ELBO of a checkpoint on the test split (bits/char, bits/dim, perplexity), or the
    /// zero-shot perplexity suite for GPT-2-tokenised models.
    Eval(EvalArgs),
    /// Draw samples from a checkpoint: unconditional, prompted, infilled or class-conditional.
    Sample(SampleArgs),
    /// Draw PNG plots of training metrics, of masking schedules, or of GenMD4 exponents.
    Plot(PlotArgs),
}

/// `maskdiff train`. A flag given twice takes its last value.
#[derive(Debug, Args)]
#[command(args_override_self = true)]
pub struct TrainArgs {
    /// TOML config file (unknown fields are an error; missing ones take their defaults).
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in the output directory from its latest checkpoint: same next batch,
    /// same random state. The saved config is used; flags may only change the logging,
    /// evaluation and checkpoint cadence, and set a new time limit (a saved one is not reused).
    #[arg(long)]
    pub resume: bool,
    /// Validate the config, print the parameter count and a memory estimate, and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the effective config (after flags) as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Do not draw a progress bar (log lines instead).
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub overrides: TrainOverrides,
}

/// Flags that override config values. Each names its TOML field.
#[derive(Debug, Args, Default, Clone)]
pub struct TrainOverrides {
    /// [model.preset] tiny | cpu-small | md4-s | md4-m (transformer); unet-tiny | unet-small |
    /// unet-cifar10 (U-Net, image data); uvit-tiny | uvit-small | uvit-imagenet64 (U-ViT,
    /// image data).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// [model.width] override the preset's width (transformer dimension / U-Net, U-ViT
    /// channels).
    #[arg(long, value_name = "N")]
    pub width: Option<usize>,
    /// [model.layers] override the preset's depth (transformer blocks / U-Net, U-ViT residual
    /// blocks per side).
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    /// [model.kind] md4 | genmd4 | block.
    #[arg(long, value_enum, value_name = "KIND")]
    pub model: Option<ModelKindArg>,
    /// [model.block_size] tokens per block of a block-diffusion model (`--model block`).
    #[arg(long, value_name = "B")]
    pub block_size: Option<usize>,
    /// [model.block_objective] md4 | genmd4: the objective inside the blocks (`--model block`).
    #[arg(long, value_enum, value_name = "KIND")]
    pub block_objective: Option<BlockObjectiveArg>,
    /// [model.block_time] sequence | block: one t per sequence shared by its blocks, or one per
    /// block (BD3-LM; needs --time-free). Default: block for a time-free MD4-inside block model,
    /// else sequence.
    #[arg(long, value_enum, value_name = "WHICH")]
    pub block_time: Option<BlockTimeArg>,
    /// [model.time_conditioning = false] train a time-free denoiser (enables `--sampler cached`).
    #[arg(long)]
    pub time_free: bool,
    /// [model.dropout] channel-wise dropout rate.
    #[arg(long, value_name = "P")]
    pub dropout: Option<f64>,
    /// [model.class_conditional] condition on image class labels.
    #[arg(long)]
    pub class_conditional: bool,
    /// [model.genmd4_network_samples] 1 or 2 x_t samples per sequence train the network (GenMD4).
    #[arg(long, value_name = "N")]
    pub genmd4_network_samples: Option<usize>,
    /// [schedule.name] linear | cosine | polyK (e.g. poly3) | geometric | geometric:MIN:MAX.
    #[arg(long, value_name = "NAME")]
    pub schedule: Option<String>,
    /// [schedule.eps] numerical shift ε of α̃ = (1 − 2ε)α + ε.
    #[arg(long, value_name = "EPS")]
    pub schedule_eps: Option<f64>,
    /// [schedule.time_sampling] antithetic | iid.
    #[arg(long, value_name = "HOW", value_parser = parse_time_sampling)]
    pub time_sampling: Option<TimeSampling>,
    /// [schedule.mask_rate] LO,HI: BD3-LM's clipped schedule, training mask rates uniform on
    /// [LO, HI] of the schedule's range (e.g. 0.3,0.8); validation and eval stay the NELBO.
    #[arg(long, value_name = "LO,HI", value_parser = parse_mask_rate)]
    pub mask_rate: Option<maskdiff_schedule::MaskRate>,
    /// [schedule.clip_search = true] BD3-LM's adaptive clip search: at every validation, train
    /// on the candidate interval of least per-block loss variance (widths and step:
    /// schedule.clip_widths, schedule.clip_delta).
    #[arg(long)]
    pub clip_search: bool,
    /// [data.dataset] text8 | bytes | gpt2 | fashion-mnist | mnist | digits | cifar10.
    #[arg(long, value_name = "KIND", value_parser = parse_dataset)]
    pub dataset: Option<DatasetKind>,
    /// [data.path] the data file or directory.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// [data.seq_len] sequence length for text.
    #[arg(long, value_name = "N")]
    pub seq_len: Option<usize>,
    /// [optim.lr] peak learning rate.
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// [optim.warmup_steps] linear warm-up steps.
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<u64>,
    /// [optim.weight_decay] decoupled weight decay.
    #[arg(long, value_name = "WD")]
    pub weight_decay: Option<f64>,
    /// [optim.clip_norm] global gradient-norm clip (0 = off).
    #[arg(long, value_name = "NORM")]
    pub clip_norm: Option<f64>,
    /// [optim.grad_accum] micro-batches per optimiser step.
    #[arg(long, value_name = "N")]
    pub grad_accum: Option<usize>,
    /// [optim.ema_decay] EMA decay (0 = off).
    #[arg(long, value_name = "D")]
    pub ema_decay: Option<f64>,
    /// [train.steps] optimiser steps.
    #[arg(long, value_name = "N")]
    pub steps: Option<u64>,
    /// [train.batch_size] sequences per micro-batch.
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,
    /// [train.seed] seed of every random choice.
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// [train.out_dir] output directory (checkpoints, metrics.jsonl, config.toml).
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// [train.device] cpu | cuda.
    #[arg(long, value_enum, value_name = "DEV")]
    pub device: Option<DeviceArg>,
    /// [train.precision] f32 | bf16: the dense layers' and attention's matrix products (bf16
    /// inputs, f32 accumulation and weights; needs AVX512-BF16, else f32 with a notice).
    #[arg(long, value_name = "P", value_parser = parse_precision)]
    pub precision: Option<Precision>,
    /// [train.log_every] steps between training log records.
    #[arg(long, value_name = "N")]
    pub log_every: Option<u64>,
    /// [train.eval_every] steps between validation evaluations (0 = at the end only).
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// [train.eval_batches] validation batches per evaluation (0 = whole split).
    #[arg(long, value_name = "N")]
    pub eval_batches: Option<usize>,
    /// [train.checkpoint_every] steps between checkpoints.
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// [train.time_limit_s] stop with a checkpoint after this many seconds (0 = no limit).
    #[arg(long, value_name = "SECS")]
    pub time_limit: Option<f64>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ModelKindArg {
    Md4,
    Genmd4,
    Block,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BlockObjectiveArg {
    Md4,
    Genmd4,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BlockTimeArg {
    Sequence,
    Block,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SamplerArg {
    Ancestral,
    Mean,
    Cached,
    FirstHitting,
    Confidence,
    Remdm,
    Threshold,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RemdmStrategyArg {
    Cap,
    Rescale,
    Conf,
}

impl From<RemdmStrategyArg> for RemdmStrategy {
    fn from(s: RemdmStrategyArg) -> Self {
        match s {
            RemdmStrategyArg::Cap => RemdmStrategy::Cap,
            RemdmStrategyArg::Rescale => RemdmStrategy::Rescale,
            RemdmStrategyArg::Conf => RemdmStrategy::Conf,
        }
    }
}

/// `T_ON,T_OFF,ALPHA_ON` of ReMDM's loop schedule.
fn parse_remdm_loop(s: &str) -> Result<[f64; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let nums: Vec<f64> = parts
        .iter()
        .map(|p| p.parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("expected three numbers T_ON,T_OFF,ALPHA_ON, got `{s}`"))?;
    match nums[..] {
        [a, b, c] => Ok([a, b, c]),
        _ => Err(format!(
            "expected three numbers T_ON,T_OFF,ALPHA_ON, got {} in `{s}`",
            nums.len()
        )),
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Val,
    Test,
}

fn parse_dataset(s: &str) -> Result<DatasetKind, String> {
    s.parse()
}

fn parse_time_sampling(s: &str) -> Result<TimeSampling, String> {
    match s.to_ascii_lowercase().as_str() {
        "antithetic" => Ok(TimeSampling::Antithetic),
        "iid" => Ok(TimeSampling::Iid),
        _ => Err(format!(
            "unknown time sampling `{s}` (expected antithetic or iid)"
        )),
    }
}

fn parse_mask_rate(s: &str) -> Result<maskdiff_schedule::MaskRate, String> {
    s.parse()
        .map_err(|e: maskdiff_schedule::ScheduleError| e.to_string())
}

fn parse_precision(s: &str) -> Result<Precision, String> {
    Precision::parse(s).ok_or_else(|| format!("{s:?} is not a precision (f32, bf16)"))
}

fn parse_grid(s: &str) -> Result<SamplingGrid, String> {
    s.parse()
        .map_err(|e: maskdiff_schedule::ScheduleError| e.to_string())
}

impl From<SamplerArg> for SamplerKind {
    fn from(s: SamplerArg) -> Self {
        match s {
            SamplerArg::Ancestral => SamplerKind::Ancestral,
            SamplerArg::Mean => SamplerKind::Mean,
            SamplerArg::Cached => SamplerKind::Cached,
            SamplerArg::FirstHitting => SamplerKind::FirstHitting,
            SamplerArg::Confidence => SamplerKind::Confidence,
            SamplerArg::Remdm => SamplerKind::Remdm,
            SamplerArg::Threshold => SamplerKind::Threshold,
        }
    }
}

impl TrainOverrides {
    /// Write every given flag into `cfg`.
    pub fn apply(&self, cfg: &mut Config) {
        macro_rules! set {
            ($flag:ident => $($field:ident).+) => {
                if let Some(v) = self.$flag.clone() {
                    cfg.$($field).+ = v;
                }
            };
        }
        set!(preset => model.preset);
        if let Some(k) = self.model {
            cfg.model.kind = match k {
                ModelKindArg::Md4 => ModelKind::Md4,
                ModelKindArg::Genmd4 => ModelKind::Genmd4,
                ModelKindArg::Block => ModelKind::Block,
            };
        }
        if self.block_size.is_some() {
            cfg.model.block_size = self.block_size;
        }
        if self.width.is_some() {
            cfg.model.width = self.width;
        }
        if self.layers.is_some() {
            cfg.model.layers = self.layers;
        }
        if let Some(k) = self.block_objective {
            cfg.model.block_objective = match k {
                BlockObjectiveArg::Md4 => BlockObjective::Md4,
                BlockObjectiveArg::Genmd4 => BlockObjective::Genmd4,
            };
        }
        if let Some(k) = self.block_time {
            cfg.model.block_time = Some(match k {
                BlockTimeArg::Sequence => maskdiff_objective::BlockTime::Sequence,
                BlockTimeArg::Block => maskdiff_objective::BlockTime::Block,
            });
        }
        if self.time_free {
            cfg.model.time_conditioning = false;
        }
        if self.dropout.is_some() {
            cfg.model.dropout = self.dropout;
        }
        if self.class_conditional {
            cfg.model.class_conditional = true;
        }
        set!(genmd4_network_samples => model.genmd4_network_samples);
        set!(schedule => schedule.name);
        set!(schedule_eps => schedule.eps);
        set!(time_sampling => schedule.time_sampling);
        if self.mask_rate.is_some() {
            cfg.schedule.mask_rate = self.mask_rate;
        }
        if self.clip_search {
            cfg.schedule.clip_search = true;
        }
        set!(dataset => data.dataset);
        set!(data => data.path);
        set!(seq_len => data.seq_len);
        set!(lr => optim.lr);
        set!(warmup_steps => optim.warmup_steps);
        set!(weight_decay => optim.weight_decay);
        set!(clip_norm => optim.clip_norm);
        set!(grad_accum => optim.grad_accum);
        set!(ema_decay => optim.ema_decay);
        set!(steps => train.steps);
        set!(batch_size => train.batch_size);
        set!(seed => train.seed);
        set!(out => train.out_dir);
        if let Some(d) = self.device {
            cfg.train.device = match d {
                DeviceArg::Cpu => Device::Cpu,
                DeviceArg::Cuda => Device::Cuda,
            };
        }
        set!(precision => train.precision);
        set!(log_every => train.log_every);
        set!(eval_every => train.eval_every);
        set!(eval_batches => train.eval_batches);
        set!(checkpoint_every => train.checkpoint_every);
        set!(time_limit => train.time_limit_s);
    }

    /// Flags that would change the model, data or optimiser of a run being resumed.
    pub fn changes_run_identity(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        macro_rules! check {
            ($($flag:ident),*) => { $( if self.$flag.is_some() { v.push(concat!("--", stringify!($flag))); } )* };
        }
        check!(
            preset,
            width,
            layers,
            model,
            block_time,
            dropout,
            genmd4_network_samples,
            schedule,
            schedule_eps,
            time_sampling,
            mask_rate,
            dataset,
            data,
            seq_len,
            lr,
            warmup_steps,
            weight_decay,
            clip_norm,
            grad_accum,
            ema_decay,
            batch_size,
            seed,
            device,
            precision
        );
        if self.time_free {
            v.push("--time-free");
        }
        if self.clip_search {
            v.push("--clip-search");
        }
        if self.class_conditional {
            v.push("--class-conditional");
        }
        v
    }
}

/// `maskdiff eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A run directory (its latest checkpoint) or a checkpoint directory.
    #[arg(value_name = "RUN")]
    pub run: PathBuf,
    /// Data to evaluate on (default: the data the run was trained on).
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// Split to evaluate.
    #[arg(long, value_enum, default_value = "test")]
    pub split: SplitArg,
    /// [eval.mc_samples] independent (t, x_t) draws per sequence.
    #[arg(short = 'k', long, value_name = "K")]
    pub mc_samples: Option<usize>,
    /// [eval.discrete_steps] evaluate the T-step discrete-time ELBO instead of the continuous one.
    #[arg(long, value_name = "T")]
    pub discrete_steps: Option<usize>,
    /// Block-diffusion models with MD4 inside: draw the evaluation times per sequence or per
    /// block (per block needs a time-free network) instead of as the run was trained. Both are
    /// unbiased estimates of the same NELBO; they differ in variance.
    #[arg(long, value_enum, value_name = "WHICH")]
    pub block_time: Option<BlockTimeArg>,
    /// [eval.max_sequences] evaluate at most this many sequences (0 = all).
    #[arg(long, value_name = "N")]
    pub max_sequences: Option<usize>,
    /// [eval.batch_size] sequences per forward pass.
    #[arg(long, value_name = "B")]
    pub batch_size: Option<usize>,
    /// [eval.seed] seed of the t and mask draws.
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// f32 | bf16: the dense layers' and attention's matrix products (bf16 inputs with f32
    /// accumulation; needs AVX512-BF16, else f32 with a notice). Default f32, whatever the run
    /// trained with.
    #[arg(long, value_name = "P", value_parser = parse_precision)]
    pub precision: Option<Precision>,
    /// Use the raw parameters instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Run the zero-shot perplexity suite (GPT-2-tokenised models) on the sets in DIR. Without
    /// DIR (`maskdiff eval RUN --zero-shot`): the first of ./shared/data/zeroshot,
    /// ../shared/data/zeroshot and the shared/data/zeroshot beside the source tree maskdiff was
    /// built from (WORKSPACE/../shared/data/zeroshot) that exists.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub zero_shot: Option<Option<PathBuf>>,
    /// Score the text samples in FILE (one per line, as `maskdiff sample -o` writes them) under
    /// this model as the judge: generative perplexity (the tokens of all samples concatenated
    /// and cut into sequences of the model's length) and the samples' unigram entropy.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["zero_shot", "data", "split"])]
    pub samples: Option<PathBuf>,
    /// BD3-LM's clipped-schedule search (Arriola et al. 2025, §5) on the validation split: for
    /// the full range and every interval of `--clip-widths` stepped by `--clip-delta`, the
    /// variance of the per-block clipped loss over sequences × K draws × blocks, and the
    /// interval of least variance (for `train --mask-rate`). MD4 and MD4-inside block models.
    #[arg(long, conflicts_with_all = ["zero_shot", "samples", "split", "block_time", "discrete_steps"])]
    pub clip_search: bool,
    /// Interval widths for `--clip-search`, comma-separated.
    #[arg(
        long,
        value_name = "W,W,..",
        value_delimiter = ',',
        default_value = "0.25,0.5,0.75"
    )]
    pub clip_widths: Vec<f64>,
    /// Step of the interval starts for `--clip-search` (bd3lms' `clip_search_delta`).
    #[arg(long, value_name = "D", default_value_t = 0.05)]
    pub clip_delta: f64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// `maskdiff sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// A run directory (its latest checkpoint) or a checkpoint directory.
    #[arg(value_name = "RUN")]
    pub run: PathBuf,
    /// [sample.num_samples] number of samples, drawn and printed 16 at a time (memory does not
    /// grow with N; image grids hold at most 4096).
    #[arg(short = 'n', long, value_name = "N")]
    pub num_samples: Option<usize>,
    /// [sample.steps] reverse steps T.
    #[arg(long, value_name = "T")]
    pub steps: Option<usize>,
    /// [sample.grid] time grid: cosine | uniform.
    #[arg(long, value_name = "GRID", value_parser = parse_grid)]
    pub grid: Option<SamplingGrid>,
    /// [sample.sampler] ancestral | mean | cached | first-hitting | confidence | remdm |
    /// threshold.
    #[arg(long, value_enum, value_name = "KIND")]
    pub sampler: Option<SamplerArg>,
    /// [sample.remdm_strategy] ReMDM's remasking probability σ: cap = min(η, σ_max),
    /// rescale = η·σ_max, conf = softmax(−confidence)·σ_max.
    #[arg(long, value_enum, value_name = "STRATEGY")]
    pub remdm_strategy: Option<RemdmStrategyArg>,
    /// [sample.remdm_eta] ReMDM's η (the cap, or the scale in [0, 1]).
    #[arg(long, value_name = "ETA")]
    pub eta: Option<f64>,
    /// [sample.remdm_loop] ReMDM's loop schedule: decode to alpha_on by t_on, remask with α held
    /// until t_off, then finish (MD4).
    #[arg(long, alias = "loop", value_name = "T_ON,T_OFF,ALPHA_ON", value_parser = parse_remdm_loop)]
    pub remdm_loop: Option<[f64; 3]>,
    /// [sample.threshold] threshold sampler: reveal every masked position whose proposal has
    /// model probability > τ (at least one per network call).
    #[arg(long, alias = "tau", value_name = "TAU")]
    pub threshold: Option<f64>,
    /// [sample.top_p] nucleus sampling mass (1 = off).
    #[arg(long, value_name = "P")]
    pub top_p: Option<f64>,
    /// [sample.temperature] softmax temperature: 1 = the model's distribution, 0 = greedy
    /// (the most probable token at each reveal); positive values below 1e-6 are refused (the
    /// smallest overflow to NaN probabilities; for greedy use 0).
    #[arg(long, value_name = "TAU")]
    pub temperature: Option<f64>,
    /// [sample.block_size] semi-autoregressive blocks of this many positions (0 = off).
    #[arg(long, value_name = "N")]
    pub block_size: Option<usize>,
    /// [sample.seed] sampling seed.
    #[arg(long, value_name = "SEED")]
    pub seed: Option<u64>,
    /// f32 | bf16: the dense layers' and attention's matrix products (bf16 inputs with f32
    /// accumulation; needs AVX512-BF16, else f32 with a notice). Default f32, whatever the run
    /// trained with.
    #[arg(long, value_name = "P", value_parser = parse_precision)]
    pub precision: Option<Precision>,
    /// Fix the first tokens to this text and generate the rest.
    #[arg(long, value_name = "TEXT", conflicts_with = "infill")]
    pub prompt: Option<String>,
    /// Fill the gaps of a template: `{N}` marks N tokens to generate, all other text is fixed;
    /// positions after the template are generated too. E.g. "the {12} of the {20} city".
    #[arg(long, value_name = "TEMPLATE")]
    pub infill: Option<String>,
    /// Class label for class-conditional image models.
    #[arg(long, value_name = "LABEL")]
    pub class: Option<u32>,
    /// Show the unmasking process: each token coloured by the step that revealed it.
    #[arg(long)]
    pub show_steps: bool,
    /// Write samples here: a PNG grid for images, text (one sample per line) otherwise.
    #[arg(short, long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Use the raw parameters instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Block-diffusion models: tokens to generate (default: the training length; at most the
    /// network's max_len). GPT-2 samples stop earlier at end-of-text.
    #[arg(long, value_name = "N")]
    pub length: Option<usize>,
    /// Block-diffusion models: re-encode the clean prefix at every network call instead of
    /// keeping its keys and values (same samples, bit for bit; for timing the cache).
    #[arg(long)]
    pub no_cache: bool,
}

/// `maskdiff plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    #[command(subcommand)]
    pub what: PlotWhat,
}

#[derive(Debug, Subcommand)]
pub enum PlotWhat {
    /// Training and validation loss (bits/token) against step, from a metrics.jsonl file or a
    /// run directory.
    Metrics {
        /// metrics.jsonl, or a run directory containing it.
        #[arg(value_name = "METRICS")]
        metrics: PathBuf,
        /// Output PNG.
        #[arg(short, long, value_name = "PNG", default_value = "metrics.png")]
        out: PathBuf,
    },
    /// α_t and the ELBO weight −α'_t/(1 − α_t) against t for schedules (paper Figure 1).
    Schedule {
        /// Schedules to draw (linear, cosine, polyK, geometric, geometric:MIN:MAX).
        #[arg(value_name = "NAME", default_values_t = ["linear".to_string(), "cosine".to_string(), "poly2".to_string(), "poly0.5".to_string(), "geometric".to_string()])]
        names: Vec<String>,
        /// Numerical shift ε (0 = the paper's unshifted curves).
        #[arg(long, default_value_t = 0.0)]
        eps: f64,
        /// Output PNG.
        #[arg(short, long, value_name = "PNG", default_value = "schedule.png")]
        out: PathBuf,
    },
    /// GenMD4: the learned exponent w_v of every token value against step.
    Exponents {
        /// metrics.jsonl, or a run directory containing it.
        #[arg(value_name = "METRICS")]
        metrics: PathBuf,
        /// Output PNG.
        #[arg(short, long, value_name = "PNG", default_value = "exponents.png")]
        out: PathBuf,
    },
    /// The sampler frontier: network calls per sample against the generative perplexity of the
    /// samples under a judge, one line per sampler, from the JSON lines `bench/frontier.sh`
    /// writes (fields `sampler`, `nfe`, `gen_perplexity`).
    Frontier {
        /// A JSON-lines file of frontier points.
        #[arg(value_name = "JSONL")]
        points: PathBuf,
        /// Output PNG.
        #[arg(short, long, value_name = "PNG", default_value = "frontier.png")]
        out: PathBuf,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn train_args(args: &[&str]) -> TrainArgs {
        let mut v = vec!["maskdiff", "train"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v).unwrap().command {
            Command::Train(t) => t,
            _ => unreachable!(),
        }
    }

    #[test]
    fn flags_land_in_their_config_fields_and_the_last_one_wins() {
        let a = train_args(&[
            "--preset",
            "tiny",
            "--model",
            "genmd4",
            "--time-free",
            "--schedule",
            "poly3",
            "--schedule-eps",
            "0.001",
            "--time-sampling",
            "iid",
            "--dataset",
            "bytes",
            "--data",
            "x.txt",
            "--seq-len",
            "64",
            "--lr",
            "0.1",
            "--lr",
            "0.2",
            "--warmup-steps",
            "3",
            "--weight-decay",
            "0",
            "--clip-norm",
            "2",
            "--grad-accum",
            "2",
            "--ema-decay",
            "0",
            "--steps",
            "7",
            "--batch-size",
            "5",
            "--seed",
            "9",
            "--out",
            "o",
            "--eval-every",
            "4",
            "--checkpoint-every",
            "6",
            "--time-limit",
            "60",
        ]);
        let mut c = Config::default();
        a.overrides.apply(&mut c);
        assert_eq!(c.model.preset, "tiny");
        assert_eq!(c.model.kind, ModelKind::Genmd4);
        assert!(!c.model.time_conditioning);
        assert_eq!((c.schedule.name.as_str(), c.schedule.eps), ("poly3", 0.001));
        assert_eq!(c.schedule.time_sampling, TimeSampling::Iid);
        assert_eq!(c.data.dataset, DatasetKind::Bytes);
        assert_eq!(c.data.path, PathBuf::from("x.txt"));
        assert_eq!(c.data.seq_len, 64);
        assert_eq!(c.optim.lr, 0.2);
        assert_eq!(
            (
                c.optim.warmup_steps,
                c.optim.weight_decay,
                c.optim.clip_norm
            ),
            (3, 0.0, 2.0)
        );
        assert_eq!((c.optim.grad_accum, c.optim.ema_decay), (2, 0.0));
        assert_eq!((c.train.steps, c.train.batch_size, c.train.seed), (7, 5, 9));
        assert_eq!(c.train.out_dir, PathBuf::from("o"));
        assert_eq!((c.train.eval_every, c.train.checkpoint_every), (4, 6));
        assert_eq!(c.train.time_limit_s, 60.0);
        // Untouched fields keep their defaults.
        assert_eq!(c.train.log_every, Config::default().train.log_every);
    }

    #[test]
    fn zero_shot_takes_an_optional_directory() {
        let zs = |args: &[&str]| {
            let mut v = vec!["maskdiff", "eval"];
            v.extend_from_slice(args);
            match Cli::try_parse_from(v).unwrap().command {
                Command::Eval(e) => (e.run, e.zero_shot),
                _ => unreachable!(),
            }
        };
        assert_eq!(zs(&["r"]), (PathBuf::from("r"), None));
        // The README's form: the flag last, without a directory.
        assert_eq!(zs(&["r", "--zero-shot"]), (PathBuf::from("r"), Some(None)));
        assert_eq!(
            zs(&["r", "--zero-shot", "d"]),
            (PathBuf::from("r"), Some(Some(PathBuf::from("d"))))
        );
        assert_eq!(
            zs(&["--zero-shot=d", "r"]),
            (PathBuf::from("r"), Some(Some(PathBuf::from("d"))))
        );
    }

    #[test]
    fn resume_refuses_identity_flags_but_not_cadence_flags() {
        let a = train_args(&["--resume", "--eval-every", "5", "--time-limit", "9"]);
        assert!(a.overrides.changes_run_identity().is_empty());
        let a = train_args(&["--resume", "--lr", "1", "--time-free"]);
        assert_eq!(
            a.overrides.changes_run_identity(),
            vec!["--lr", "--time-free"]
        );
    }
}
