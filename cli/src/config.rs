//! The run configuration: one TOML file (every field optional, defaulted and documented; unknown
//! fields are an error) that command-line flags override. Defaults follow the paper's text8 setup
//! (App. J.1: linear schedule with ε = 1e−4, antithetic t, AdamW lr 3e−4, weight decay 0.03,
//! EMA 0.9999, cosine decay after warm-up) scaled to the chosen preset.

use crate::error::{CliError, Result};
use maskdiff_network::Precision;
pub use maskdiff_objective::BlockTime;
use maskdiff_sampler::{RemdmConfig, RemdmLoop, RemdmStrategy, SamplerKind};
use maskdiff_schedule::{AnySchedule, SamplingGrid, TimeSampling};
use maskdiff_train::LrKind;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The denoising network and the diffusion model type.
    pub model: ModelConfig,
    /// The masking schedule α_t and how training times are drawn.
    pub schedule: ScheduleConfig,
    /// The dataset, its tokenizer and the sequence length.
    pub data: DataConfig,
    /// AdamW, learning-rate schedule, clipping, EMA.
    pub optim: OptimConfig,
    /// Steps, batch, logging, evaluation and checkpoint cadence, output directory.
    pub train: TrainConfig,
    /// `maskdiff eval` settings.
    pub eval: EvalConfig,
    /// `maskdiff sample` settings.
    pub sample: SampleConfig,
}

/// MD4 (one schedule for all tokens), GenMD4 (a learned polynomial exponent per token value) or
/// block diffusion (BD3-LM: MD4 inside blocks of `model.block_size` tokens, each conditioned on
/// the clean blocks before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    #[default]
    Md4,
    Genmd4,
    Block,
}

/// The objective inside the blocks of a block-diffusion model: MD4 with `[schedule]`, or GenMD4
/// (per-token-value exponents, learned, shared by the blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BlockObjective {
    #[default]
    Md4,
    Genmd4,
}

impl BlockObjective {
    pub fn is_md4(&self) -> bool {
        *self == BlockObjective::Md4
    }
}

/// The compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// How the data are tokenised (spec §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// text8-style characters: a–z and space, V = 27.
    #[default]
    Text8,
    /// Raw bytes, V = 256.
    Bytes,
    /// GPT-2 BPE, V = 50257.
    Gpt2,
    /// Fashion-MNIST IDX files, 28×28 8-bit pixels, V = 256, 10 classes.
    FashionMnist,
    /// MNIST IDX files, as Fashion-MNIST.
    Mnist,
    /// The 8×8 digits CSV (17 grey levels, V = 17, 10 classes).
    Digits,
    /// CIFAR-10, binary version (`data_batch_{1..5}.bin`, `test_batch.bin`): 32×32×3 8-bit
    /// pixels, V = 256, 10 classes (the paper's Table 3; not on a package registry, so the user
    /// supplies the directory).
    Cifar10,
}

impl DatasetKind {
    pub const NAMES: &'static str = "text8, bytes, gpt2, fashion-mnist, mnist, digits, cifar10";
    /// Images are reported in bits per dimension, text in bits per character/token.
    pub fn is_image(self) -> bool {
        matches!(
            self,
            DatasetKind::FashionMnist
                | DatasetKind::Mnist
                | DatasetKind::Digits
                | DatasetKind::Cifar10
        )
    }
    /// The unit of the per-token loss in reports.
    pub fn unit(self) -> &'static str {
        match self {
            DatasetKind::Text8 | DatasetKind::Bytes => "bits/char",
            DatasetKind::Gpt2 => "bits/token",
            _ => "bits/dim",
        }
    }
}

impl FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "text8" | "chars" | "text" => DatasetKind::Text8,
            "bytes" | "byte" => DatasetKind::Bytes,
            "gpt2" | "gpt-2" => DatasetKind::Gpt2,
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => DatasetKind::FashionMnist,
            "mnist" => DatasetKind::Mnist,
            "digits" => DatasetKind::Digits,
            "cifar10" | "cifar-10" | "cifar_10" => DatasetKind::Cifar10,
            _ => {
                return Err(format!(
                    "unknown dataset `{s}` (expected one of {})",
                    Self::NAMES
                ))
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Network preset: `tiny` (tests), `cpu-small` (4 layers, width 256), `md4-s` (12 × 768),
    /// `md4-m` (24 × 1024) — the transformer; `unet-tiny`, `unet-small`, `unet-cifar10` — the
    /// U-Net image denoiser of spec §7.3; `uvit-tiny`, `uvit-small`, `uvit-imagenet64` — the
    /// U-ViT of spec §7.4 (image networks take image data only and are built for its shape).
    pub preset: String,
    /// `md4`, `genmd4` or `block`.
    pub kind: ModelKind,
    /// Condition the network on t (the official default). A time-free network is a valid MD4
    /// parameterisation and allows the cached (first-hitting) sampler.
    pub time_conditioning: bool,
    /// Channel-wise dropout rate; unset = the preset's value.
    pub dropout: Option<f64>,
    /// Class-conditional model (image data with labels): a label embedding is added to the time
    /// embedding.
    pub class_conditional: bool,
    /// GenMD4: number of x_t samples per sequence that train the network (2 = the official code,
    /// which uses both RLOO samples; 1 = only the first, to measure the effect of md4 issue #4).
    pub genmd4_network_samples: usize,
    /// Input embedding width: unset = the preset's choice (`cpu-small`: 64, the official text8
    /// `outside_embed` with `feature_dim` 64; `md4-s`, `md4-m`, `tiny`: none); N > 0 = embed
    /// into N dimensions, then a dense layer with bias to the model width; 0 = embed straight
    /// into the width (the official OpenWebText choice).
    pub embed_dim: Option<usize>,
    /// Block diffusion (`kind = "block"`): tokens per block B (1 = autoregressive, the sequence
    /// length = MD4 with the block network). Required for `block`, refused for the others.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// Override the preset's width (transformer: model dimension, a multiple of its heads;
    /// U-Net, U-ViT: channels, a multiple of its GroupNorm groups); unset = the preset's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Override the preset's depth (transformer: blocks; U-Net, U-ViT: residual blocks per
    /// side).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<usize>,
    /// Block diffusion: the objective inside each block, `md4` (the default) or `genmd4`
    /// (`genmd4_network_samples` applies to it). Only for `kind = "block"`.
    #[serde(skip_serializing_if = "BlockObjective::is_md4")]
    pub block_objective: BlockObjective,
    /// Block diffusion: `"block"` draws one t per block (BD3-LM's estimator: lower variance;
    /// needs a time-free network, `time_conditioning = false`, and MD4 inside the blocks) or
    /// `"sequence"` one t per sequence shared by its blocks. Unset = `"block"` for a time-free
    /// network with MD4 inside (what BD3-LM does), else `"sequence"` (a network conditioned on
    /// one time per sequence cannot take per-block times). Only for `kind = "block"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_time: Option<BlockTime>,
}

impl ModelConfig {
    /// The times of a block-diffusion model: `block_time`, or its default (see the field).
    pub fn block_time(&self) -> BlockTime {
        self.block_time.unwrap_or(
            if !self.time_conditioning && self.block_objective.is_md4() {
                BlockTime::Block
            } else {
                BlockTime::Sequence
            },
        )
    }
    /// Whether the model's schedule is GenMD4's learned one (alone or inside blocks).
    pub fn is_genmd4(&self) -> bool {
        self.kind == ModelKind::Genmd4
            || (self.kind == ModelKind::Block && self.block_objective == BlockObjective::Genmd4)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            preset: "cpu-small".into(),
            kind: ModelKind::Md4,
            time_conditioning: true,
            dropout: None,
            class_conditional: false,
            genmd4_network_samples: 2,
            embed_dim: None,
            block_size: None,
            width: None,
            layers: None,
            block_objective: BlockObjective::Md4,
            block_time: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `linear`, `cosine`, `polyK` (e.g. `poly3`), `geometric` or `geometric:MIN:MAX`.
    pub name: String,
    /// The numerical shift α̃ = (1 − 2ε)α + ε of the official code.
    pub eps: f64,
    /// Training times: `antithetic` (one u per batch, t_i = (u + i/B) mod 1) or `iid`.
    pub time_sampling: TimeSampling,
    /// BD3-LM's clipped noise schedule (Arriola et al. 2025, §5): `[LO, HI]` with
    /// 0 <= LO < HI <= 1, training mask rates uniform on that part of the schedule's range
    /// (with the linear schedule, t in [LO, HI]); the training loss is the clipped objective,
    /// validation and `eval` stay the NELBO. Unset = the NELBO (MD4, alone or inside blocks;
    /// not GenMD4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mask_rate: Option<maskdiff_schedule::MaskRate>,
    /// BD3-LM's adaptive clip search: at every validation (`train.eval_every`), the interval of
    /// least variance of the per-block clipped loss among the full range and every
    /// `[s, s + w]` (w in `clip_widths`, s stepped by `clip_delta`) becomes the training
    /// interval (starting from `mask_rate`, or the full range); the current one is saved with
    /// the checkpoint.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub clip_search: bool,
    /// Interval widths of the clip search.
    #[serde(skip_serializing_if = "is_default_widths")]
    pub clip_widths: Vec<f64>,
    /// Step of the interval starts of the clip search (bd3lms' `clip_search_delta`).
    #[serde(skip_serializing_if = "is_default_delta")]
    pub clip_delta: f64,
}

/// The clip search's default widths and start step.
pub const CLIP_WIDTHS: [f64; 3] = [0.25, 0.5, 0.75];
pub const CLIP_DELTA: f64 = 0.05;

fn is_default_widths(w: &[f64]) -> bool {
    w == CLIP_WIDTHS
}
fn is_default_delta(d: &f64) -> bool {
    *d == CLIP_DELTA
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            name: "linear".into(),
            eps: maskdiff_schedule::DEFAULT_EPS,
            time_sampling: TimeSampling::Antithetic,
            mask_rate: None,
            clip_search: false,
            clip_widths: CLIP_WIDTHS.to_vec(),
            clip_delta: CLIP_DELTA,
        }
    }
}

impl ScheduleConfig {
    pub fn parsed(&self) -> Result<AnySchedule> {
        AnySchedule::from_str(&self.name)
            .map_err(|e| CliError::config("schedule.name", e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `text8` (characters a–z and space), `bytes`, `gpt2`, `fashion-mnist`, `mnist`, `digits`.
    pub dataset: DatasetKind,
    /// The data: a text file (text datasets; split 90/5/5 by offset), an IDX directory, or the
    /// digits CSV. Relative paths are resolved against the current directory.
    pub path: PathBuf,
    /// Sequence length N for text (images use their pixel count).
    pub seq_len: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dataset: DatasetKind::Text8,
            path: PathBuf::from("data/english/corpus.txt"),
            seq_len: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate of AdamW.
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`.
    pub warmup_steps: u64,
    /// After the warm-up: `cosine` (decay to 0 at `decay_steps`, the official default) or
    /// `constant` (stay at `lr`; the official `schedule_type = "constant"`).
    pub schedule: LrKind,
    /// Step at which the cosine reaches 0, warm-up included; unset = `train.steps`. A horizon
    /// beyond `train.steps` stops the run part-way down the cosine.
    pub decay_steps: Option<u64>,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Adam's ε.
    pub adam_eps: f64,
    /// Clip the network's gradient to this global L2 norm, measured as the official `clip`: on
    /// the gradient of the reported loss in bits per token (the batch mean of per-sequence nats
    /// divided by `seq_len · ln 2`); 0 disables clipping. `metrics.jsonl` logs the same norm.
    pub clip_norm: f64,
    /// Micro-batches accumulated per optimiser step.
    pub grad_accum: usize,
    /// EMA decay of the parameters used for evaluation and sampling; 0 disables the EMA.
    pub ema_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 3e-4,
            warmup_steps: 100,
            schedule: LrKind::Cosine,
            decay_steps: None,
            weight_decay: 0.03,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            clip_norm: 1.0,
            grad_accum: 1,
            ema_decay: 0.999,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimiser steps (the cosine learning-rate decay ends here unless `optim.decay_steps`
    /// says otherwise).
    pub steps: u64,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Seed of every random choice (init, batches, t, masks, dropout).
    pub seed: u64,
    /// Where checkpoints, `metrics.jsonl` and the resolved `config.toml` go.
    pub out_dir: PathBuf,
    /// `cpu`, or `cuda` (needs a build with `--features cuda`).
    pub device: Device,
    /// Matrix products of the dense layers: `f32`, or `bf16` (inputs rounded to bf16, f32
    /// accumulation, f32 weights and optimizer state; CPU with AVX512-BF16, elsewhere f32 with a
    /// notice). Also used by the run's periodic validation; `eval` and `sample` take their own
    /// `--precision` (default f32).
    pub precision: Precision,
    /// Log a training record every this many steps.
    pub log_every: u64,
    /// Evaluate on the validation split every this many steps (0 = only at the end).
    pub eval_every: u64,
    /// Validation batches per periodic evaluation (0 = the whole split).
    pub eval_batches: usize,
    /// Write a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: u64,
    /// Stop (with a checkpoint) after this many seconds of training; 0 = no limit.
    pub time_limit_s: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            batch_size: 16,
            seed: 0,
            out_dir: PathBuf::from("runs/default"),
            device: Device::Cpu,
            precision: Precision::F32,
            log_every: 10,
            eval_every: 250,
            eval_batches: 8,
            checkpoint_every: 250,
            time_limit_s: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Independent (t, x_t) draws per sequence; the standard error is computed over sequences
    /// from their K-sample means.
    pub mc_samples: usize,
    /// Number of steps T of the discrete-time ELBO; unset = the continuous-time ELBO.
    pub discrete_steps: Option<usize>,
    /// Evaluate at most this many sequences of the split (0 = all).
    pub max_sequences: usize,
    /// Sequences per forward pass.
    pub batch_size: usize,
    /// Seed of the evaluation's t and mask draws.
    pub seed: u64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            mc_samples: 4,
            discrete_steps: None,
            max_sequences: 0,
            batch_size: 16,
            seed: 1234,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SampleConfig {
    /// Number of reverse steps T.
    pub steps: usize,
    /// Time grid: `cosine` (official default) or `uniform`.
    pub grid: SamplingGrid,
    /// `ancestral` (Alg. 2), `mean` (Alg. 3), `cached` (skips network calls that cannot
    /// matter; same output as ancestral), `first-hitting` (MD4: jumps between reveal steps,
    /// at most min(T, N) network calls), `confidence` (MaskGIT-style, not exact), `remdm`
    /// (remasking, ReMDM) or `threshold` (Fast-dLLM confidence threshold, not exact).
    pub sampler: SamplerKind,
    /// Nucleus sampling: keep the smallest set of tokens with mass ≥ p (1 = off).
    pub top_p: f64,
    /// Softmax temperature of μ (1 = the model's distribution, 0 = greedy argmax; a positive
    /// value must be at least 1e-6).
    pub temperature: f64,
    /// Semi-autoregressive generation in blocks of this many positions (0 = off).
    pub block_size: usize,
    /// ReMDM (`sampler = "remdm"`): how σ_t is chosen, `cap` (σ = min(η, σ_max)), `rescale`
    /// (σ = η σ_max) or `conf` (softmax of minus the tokens' confidences, times σ_max).
    pub remdm_strategy: RemdmStrategy,
    /// ReMDM's η (the cap, or the scale in [0, 1]).
    pub remdm_eta: f64,
    /// ReMDM's loop schedule `[t_on, t_off, alpha_on]` (MD4, cap or rescale); absent = off.
    pub remdm_loop: Option<[f64; 3]>,
    /// Confidence-threshold sampler (`sampler = "threshold"`): reveal every masked position
    /// whose proposal has model probability > τ (at least one per network call).
    pub threshold: f64,
    /// Number of samples.
    pub num_samples: usize,
    pub seed: u64,
}

impl SampleConfig {
    /// The ReMDM settings as the sampler takes them.
    pub fn remdm(&self) -> RemdmConfig {
        RemdmConfig {
            strategy: self.remdm_strategy,
            eta: self.remdm_eta,
            loop_: self.remdm_loop.map(|[t_on, t_off, alpha_on]| RemdmLoop {
                t_on,
                t_off,
                alpha_on,
            }),
        }
    }
}

impl Default for SampleConfig {
    fn default() -> Self {
        SampleConfig {
            steps: 256,
            grid: SamplingGrid::Cosine,
            sampler: SamplerKind::Ancestral,
            top_p: 1.0,
            temperature: 1.0,
            block_size: 0,
            remdm_strategy: RemdmStrategy::Cap,
            remdm_eta: 0.02,
            remdm_loop: None,
            threshold: 0.9,
            num_samples: 4,
            seed: 0,
        }
    }
}

/// The network presets the CLI accepts.
pub const PRESETS: [&str; 10] = [
    "tiny",
    "cpu-small",
    "md4-s",
    "md4-m",
    "unet-tiny",
    "unet-small",
    "unet-cifar10",
    "uvit-tiny",
    "uvit-small",
    "uvit-imagenet64",
];

fn positive(field: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(CliError::config(
            field,
            format!("must be a positive finite number, got {v}"),
        ))
    }
}

fn unit_interval(field: &str, v: f64, closed_right: bool) -> Result<()> {
    let ok = v.is_finite() && v >= 0.0 && if closed_right { v <= 1.0 } else { v < 1.0 };
    if ok {
        Ok(())
    } else {
        let r = if closed_right { "[0, 1]" } else { "[0, 1)" };
        Err(CliError::config(field, format!("must be in {r}, got {v}")))
    }
}

fn nonzero(field: &str, v: u64) -> Result<()> {
    if v == 0 {
        Err(CliError::config(field, "must be at least 1"))
    } else {
        Ok(())
    }
}

impl Config {
    /// Parse a TOML file. Unknown fields and wrong types are errors naming the field.
    pub fn load(path: &Path) -> Result<Config> {
        let text = crate::fsutil::read_string(path)?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, origin: &Path) -> Result<Config> {
        toml::from_str(text).map_err(|e| CliError::ConfigParse {
            path: origin.to_path_buf(),
            message: e.message().replace('\n', " ")
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises to TOML")
    }

    /// Check every value that has a restricted range; the error names the TOML field.
    pub fn validate(&self) -> Result<()> {
        let m = &self.model;
        if !PRESETS.contains(&m.preset.as_str()) {
            return Err(CliError::config(
                "model.preset",
                format!(
                    "unknown preset `{}` (expected one of {})",
                    m.preset,
                    PRESETS.join(", ")
                ),
            ));
        }
        if let Some(d) = m.dropout {
            unit_interval("model.dropout", d, false)?;
        }
        if !(1..=2).contains(&m.genmd4_network_samples) {
            return Err(CliError::config(
                "model.genmd4_network_samples",
                "must be 1 or 2",
            ));
        }
        match (m.kind, m.block_size) {
            (ModelKind::Block, None) => {
                return Err(CliError::config(
                    "model.block_size",
                    "a block-diffusion model needs a block size (--block-size B)",
                ))
            }
            (ModelKind::Block, Some(0)) => {
                return Err(CliError::config("model.block_size", "must be at least 1"))
            }
            (ModelKind::Block, Some(_)) | (_, None) => {}
            (_, Some(_)) => {
                return Err(CliError::config(
                    "model.block_size",
                    "only a block-diffusion model (kind = \"block\") has a block size",
                ))
            }
        }
        if m.kind != ModelKind::Block && !m.block_objective.is_md4() {
            return Err(CliError::config(
                "model.block_objective",
                "only a block-diffusion model (kind = \"block\") has an objective inside blocks",
            ));
        }
        match (m.kind, m.block_time) {
            (ModelKind::Block, Some(BlockTime::Block)) if m.time_conditioning => {
                return Err(CliError::config(
                    "model.block_time",
                    "per-block times need a time-free network (--time-free; the network is \
                     conditioned on one time per sequence), or use block_time = \"sequence\"",
                ))
            }
            (ModelKind::Block, Some(BlockTime::Block)) if !m.block_objective.is_md4() => {
                return Err(CliError::config(
                    "model.block_time",
                    "per-block times are implemented with MD4 inside the blocks; GenMD4's \
                     two-mask batch holds one time per sequence (use block_time = \"sequence\")",
                ))
            }
            (ModelKind::Block, _) | (_, None) => {}
            (_, Some(_)) => {
                return Err(CliError::config(
                    "model.block_time",
                    "only a block-diffusion model (kind = \"block\") has per-block times",
                ))
            }
        }
        if m.class_conditional && !self.data.dataset.is_image() {
            return Err(CliError::config(
                "model.class_conditional",
                "class labels exist only for image datasets",
            ));
        }
        self.schedule.parsed()?;
        if self.schedule.mask_rate.is_some() && m.is_genmd4() {
            return Err(CliError::config(
                "schedule.mask_rate",
                "clipped mask rates need one mask rate per time: GenMD4's learned per-token \
                 schedule has none (use MD4, alone or inside blocks)",
            ));
        }
        if self.schedule.clip_search {
            if m.is_genmd4() {
                return Err(CliError::config(
                    "schedule.clip_search",
                    "the clip search needs one mask rate per time: GenMD4's learned per-token \
                     schedule has none (use MD4, alone or inside blocks)",
                ));
            }
            if self.train.eval_every == 0 {
                return Err(CliError::config(
                    "schedule.clip_search",
                    "the clip search re-chooses the interval at every validation: set \
                     train.eval_every (--eval-every) > 0",
                ));
            }
        }
        maskdiff_schedule::MaskRate::candidates(
            &self.schedule.clip_widths,
            self.schedule.clip_delta,
        )
        .map_err(|e| CliError::config("schedule.clip_widths", e.to_string()))?;
        let e = self.schedule.eps;
        if !(e.is_finite() && (0.0..0.5).contains(&e)) {
            return Err(CliError::config(
                "schedule.eps",
                format!("must be in [0, 0.5), got {e}"),
            ));
        }
        if self.data.seq_len < 2 {
            return Err(CliError::config("data.seq_len", "must be at least 2"));
        }
        let o = &self.optim;
        positive("optim.lr", o.lr)?;
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return Err(CliError::config("optim.weight_decay", "must be ≥ 0"));
        }
        unit_interval("optim.beta1", o.beta1, false)?;
        unit_interval("optim.beta2", o.beta2, false)?;
        positive("optim.adam_eps", o.adam_eps)?;
        if !(o.clip_norm.is_finite() && o.clip_norm >= 0.0) {
            return Err(CliError::config(
                "optim.clip_norm",
                "must be ≥ 0 (0 disables clipping)",
            ));
        }
        nonzero("optim.grad_accum", o.grad_accum as u64)?;
        unit_interval("optim.ema_decay", o.ema_decay, false)?;
        let t = &self.train;
        nonzero("train.steps", t.steps)?;
        nonzero("train.batch_size", t.batch_size as u64)?;
        nonzero("train.log_every", t.log_every)?;
        nonzero("train.checkpoint_every", t.checkpoint_every)?;
        if !(t.time_limit_s.is_finite() && t.time_limit_s >= 0.0) {
            return Err(CliError::config(
                "train.time_limit_s",
                "must be ≥ 0 (0 = no limit)",
            ));
        }
        if o.warmup_steps > t.steps {
            return Err(CliError::config(
                "optim.warmup_steps",
                format!("{} exceeds train.steps = {}", o.warmup_steps, t.steps),
            ));
        }
        if let Some(h) = o.decay_steps {
            if o.schedule == LrKind::Cosine && h < o.warmup_steps.max(1) {
                return Err(CliError::config(
                    "optim.decay_steps",
                    format!(
                        "{h} must be at least 1 and at least optim.warmup_steps = {}",
                        o.warmup_steps
                    ),
                ));
            }
        }
        let v = &self.eval;
        nonzero("eval.mc_samples", v.mc_samples as u64)?;
        nonzero("eval.batch_size", v.batch_size as u64)?;
        if v.discrete_steps == Some(0) {
            return Err(CliError::config(
                "eval.discrete_steps",
                "must be at least 1",
            ));
        }
        let s = &self.sample;
        nonzero("sample.steps", s.steps as u64)?;
        nonzero("sample.num_samples", s.num_samples as u64)?;
        if !(s.top_p.is_finite() && s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(CliError::config(
                "sample.top_p",
                format!("must be in (0, 1], got {}", s.top_p),
            ));
        }
        // The sampler's own rule: 0 = greedy, else at least maskdiff_sampler::MIN_TEMPERATURE.
        maskdiff_sampler::Shaping::new(s.temperature, 1.0)
            .map_err(|e| CliError::config("sample.temperature", e.to_string()))?;
        unit_interval("sample.threshold", s.threshold, true)?;
        s.remdm().validate().map_err(|e| {
            let field = match &e {
                maskdiff_sampler::SamplerError::BadRemdm(m) if m.starts_with("eta") => {
                    "sample.remdm_eta"
                }
                _ => "sample.remdm_loop",
            };
            CliError::config(field, e.to_string())
        })?;
        if m.is_genmd4() && s.sampler == SamplerKind::Remdm && s.remdm_loop.is_some() {
            return Err(CliError::config(
                "sample.remdm_loop",
                "the loop schedule is not available for GenMD4",
            ));
        }
        if m.is_genmd4()
            && matches!(
                s.sampler,
                SamplerKind::FirstHitting | SamplerKind::Confidence
            )
        {
            return Err(CliError::config(
                "sample.sampler",
                format!(
                    "`{}` is not available for GenMD4 (use ancestral, mean or cached)",
                    s.sampler
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults_and_defaults_validate() {
        let c = Config::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        c.validate().unwrap();
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        let back = Config::parse(&c.to_toml(), Path::new("x.toml")).unwrap();
        assert_eq!(back, c);
        let mut c = Config::default();
        c.sample.sampler = SamplerKind::Remdm;
        c.sample.remdm_strategy = RemdmStrategy::Rescale;
        c.sample.remdm_eta = 0.5;
        c.sample.remdm_loop = Some([0.55, 0.05, 0.9]);
        c.sample.threshold = 0.7;
        c.validate().unwrap();
        let back = Config::parse(&c.to_toml(), Path::new("x.toml")).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let e = Config::parse("[train]\nstepz = 3\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stepz"), "{e}");
        let e = Config::parse("[trian]\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("trian"), "{e}");
    }

    #[test]
    fn schedule_horizon_and_embedding_fields_parse() {
        let c = Config::parse(
            "[model]\nembed_dim = 0\n[optim]\nschedule = \"constant\"\ndecay_steps = 5000\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.model.embed_dim, Some(0));
        assert_eq!(c.optim.schedule, LrKind::Constant);
        assert_eq!(c.optim.decay_steps, Some(5000));
        c.validate().unwrap();
        // unset: the preset's embedding, cosine decay ending at train.steps
        let d = Config::default();
        assert_eq!(
            (d.model.embed_dim, d.optim.schedule, d.optim.decay_steps),
            (None, LrKind::Cosine, None)
        );
        let e = Config::parse("[optim]\nschedule = \"step\"\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("step"), "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("[optim]\nlr = -1.0\n", "optim.lr"),
            ("[model]\npreset = \"huge\"\n", "model.preset"),
            ("[schedule]\nname = \"poly-2\"\n", "schedule.name"),
            ("[sample]\ntop_p = 1.5\n", "sample.top_p"),
            ("[sample]\nthreshold = 1.5\n", "sample.threshold"),
            ("[sample]\nremdm_eta = -0.5\n", "sample.remdm_eta"),
            (
                "[sample]\nremdm_loop = [0.1, 0.5, 0.9]\n",
                "sample.remdm_loop",
            ),
            (
                "[model]\nkind = \"genmd4\"\n[sample]\nsampler = \"remdm\"\nremdm_loop = [0.5, 0.1, 0.9]\n",
                "sample.remdm_loop",
            ),
            ("[train]\nbatch_size = 0\n", "train.batch_size"),
            ("[optim]\nwarmup_steps = 5000\n", "optim.warmup_steps"),
            (
                "[optim]\nwarmup_steps = 50\ndecay_steps = 10\n",
                "optim.decay_steps",
            ),
        ];
        for (text, field) in cases {
            let c = Config::parse(text, Path::new("x.toml")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{text:?} → {e}");
        }
    }
}
