//! A run directory: `config.toml` (the resolved config), `metrics.jsonl`, and `checkpoint/`
//! (written by the network crate: tensor files first, manifest last, each atomically, so a crash
//! mid-save leaves the previous checkpoint in force). The CLI's own resumable state — the data
//! sampler position, the data identity and the config — travels in the manifest's `extra`.

use crate::config::Config;
use crate::dataset::{Data, DataIdentity};
use crate::error::{CliError, Result};
use maskdiff_data::WindowSamplerState;
use maskdiff_network::{Kernels, NetworkConfig, NetworkDenoiser};
use maskdiff_objective::{Objective, ObjectiveSpec};
use maskdiff_schedule::ScheduleSpec;
use maskdiff_train::{
    load_model, AdamWConfig, ClipLoss, LrKind, LrSchedule, Manifest, TrainConfig as NetTrainConfig,
    Weights,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const CHECKPOINT_DIR: &str = "checkpoint";

/// What the CLI stores in a checkpoint besides the network's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CliExtra {
    /// The next training batch comes from here.
    pub sampler: WindowSamplerState,
    pub data: DataIdentity,
    /// The full config, TOML text (so a checkpoint alone can be evaluated and sampled).
    pub config: String,
    /// Training seconds before this checkpoint (summed over resumed sessions).
    pub train_seconds: f64,
    /// Training losses since the last metrics record, so a resumed run logs the same means.
    #[serde(default)]
    pub loss_window: LossWindow,
    /// The training mask rates the adaptive clip search chose last (`schedule.clip_search`):
    /// set again on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_rate: Option<maskdiff_schedule::MaskRate>,
}

/// Running sum of per-step training losses (bits/token) between two metrics records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossWindow {
    pub sum: f64,
    pub count: u64,
}

pub fn config_path(out: &Path) -> PathBuf {
    out.join(CONFIG_FILE)
}
pub fn metrics_path(out: &Path) -> PathBuf {
    out.join(METRICS_FILE)
}
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join(CHECKPOINT_DIR)
}

/// Whether `dir` holds a complete checkpoint (its manifest is written last).
pub fn has_checkpoint(out: &Path) -> bool {
    checkpoint_dir(out).join(maskdiff_train::MANIFEST).is_file()
}

/// The network configuration for `cfg` on `data` (preset, vocabulary, conditioning).
pub fn network_config(cfg: &Config, data: &Data) -> Result<NetworkConfig> {
    let vocab = data.vocab()?.size();
    let mut net = NetworkConfig::preset(&cfg.model.preset, vocab)
        .map_err(|e| CliError::config("model.preset", e.to_string()))?;
    net.time_conditioning = cfg.model.time_conditioning;
    if let Some(d) = cfg.model.dropout {
        net.dropout = d;
    }
    if let Some(e) = cfg.model.embed_dim {
        net.embed_dim = (e > 0).then_some(e);
    }
    if let Some(w) = cfg.model.width {
        net.dim = w;
    }
    if let Some(l) = cfg.model.layers {
        net.n_layers = l;
    }
    net.block_size = match cfg.model.kind {
        crate::config::ModelKind::Block => cfg.model.block_size,
        _ => None,
    };
    net.num_classes = if cfg.model.class_conditional {
        data.num_classes()
    } else {
        0
    };
    if net.arch.is_transformer() {
        // RoPE has no position table: the preset's length is a guard rail, raised to the data's.
        net.max_len = net.max_len.max(data.seq_len());
    } else {
        // an image network is built for the data's image shape
        let s = data.image_shape().ok_or_else(|| {
            CliError::config(
                "model.preset",
                format!(
                    "`{}` is an image network: it needs image data",
                    cfg.model.preset
                ),
            )
        })?;
        net.set_image(s.height, s.width, s.channels)
            .map_err(|e| CliError::config("model", e.to_string()))?;
    }
    net.validate()
        .map_err(|e| CliError::config("model", e.to_string()))?;
    Ok(net)
}

/// The network crate's training configuration for `cfg`.
pub fn train_config(cfg: &Config) -> Result<NetTrainConfig> {
    let o = &cfg.optim;
    let objective = match cfg.model.kind {
        crate::config::ModelKind::Md4 => ObjectiveSpec::Md4,
        // GenMD4 ignores [schedule].name: its per-token schedule is learned (spec §5).
        crate::config::ModelKind::Genmd4 => ObjectiveSpec::GenMd4 {
            one_sample: cfg.model.genmd4_network_samples == 1,
        },
        crate::config::ModelKind::Block => ObjectiveSpec::Block {
            block_size: cfg
                .model
                .block_size
                .ok_or_else(|| CliError::config("model.block_size", "missing"))?,
            inner: match cfg.model.block_objective {
                crate::config::BlockObjective::Md4 => maskdiff_objective::InnerSpec::Md4,
                crate::config::BlockObjective::Genmd4 => maskdiff_objective::InnerSpec::GenMd4 {
                    one_sample: cfg.model.genmd4_network_samples == 1,
                },
            },
            time: cfg.model.block_time(),
        },
    };
    let t = NetTrainConfig {
        objective,
        schedule: ScheduleSpec {
            base: cfg.schedule.parsed()?,
            eps: cfg.schedule.eps,
        },
        time_sampling: cfg.schedule.time_sampling,
        mask_rate: cfg.schedule.mask_rate,
        // A constant schedule has no horizon: its record must not depend on train.steps (so
        // that a run can be extended on resume).
        lr: match o.schedule {
            LrKind::Cosine => LrSchedule::cosine(
                o.lr,
                o.warmup_steps,
                o.decay_steps.unwrap_or(cfg.train.steps),
            ),
            LrKind::Constant => LrSchedule::constant(o.lr, o.warmup_steps),
        },
        adamw: AdamWConfig {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.adam_eps,
            weight_decay: o.weight_decay,
        },
        grad_clip: o.clip_norm,
        clip_loss: ClipLoss::BitsPerToken,
        micro_batches: o.grad_accum,
        ema_decay: o.ema_decay,
    };
    t.validate()
        .map_err(|e| CliError::config("optim", e.to_string()))?;
    Ok(t)
}

/// Where a RUN argument points: a run directory or a checkpoint directory.
pub fn resolve_checkpoint(run: &Path) -> Result<PathBuf> {
    let manifest = maskdiff_train::MANIFEST;
    if run.join(manifest).is_file() {
        return Ok(run.to_path_buf());
    }
    if checkpoint_dir(run).join(manifest).is_file() {
        return Ok(checkpoint_dir(run));
    }
    if !run.exists() {
        return Err(CliError::Input(format!("{} does not exist", run.display())));
    }
    Err(CliError::Input(format!(
        "{} holds no checkpoint (expected {}/{manifest} or {manifest})",
        run.display(),
        CHECKPOINT_DIR
    )))
}

/// Read a checkpoint's manifest and the CLI state in it.
pub fn read_checkpoint_meta(dir: &Path) -> Result<(Manifest, CliExtra, Config)> {
    let man = Manifest::read(dir)?;
    let extra: CliExtra =
        serde_json::from_value(man.extra.clone()).map_err(|e| CliError::Format {
            what: "CLI state",
            path: dir.join(maskdiff_train::MANIFEST),
            message: e.to_string(),
        })?;
    let cfg = Config::parse(&extra.config, &dir.join(maskdiff_train::MANIFEST))?;
    Ok((man, extra, cfg))
}

/// A checkpoint opened for evaluation or sampling: the model (EMA or raw parameters) and its
/// objective, nothing of the optimizer.
pub struct Loaded<D: Kernels<f32>, O: Objective<D>> {
    pub denoiser: NetworkDenoiser<f32, D>,
    pub objective: O,
    pub extra: CliExtra,
    pub dir: PathBuf,
}

impl<D: Kernels<f32>, O: Objective<D>> Loaded<D, O> {
    pub fn open(dir: &Path, use_ema: bool, dev: &D) -> Result<Self> {
        let (_, extra, _) = read_checkpoint_meta(dir)?;
        let weights = if use_ema { Weights::Ema } else { Weights::Live };
        let m = load_model::<D, O>(dir, weights, dev)?;
        if m.model.config().vocab_size != extra.data.vocab {
            return Err(CliError::CheckpointMismatch {
                path: dir.to_path_buf(),
                reason: format!(
                    "the network predicts {} tokens but its data has {}",
                    m.model.config().vocab_size,
                    extra.data.vocab
                ),
            });
        }
        Ok(Loaded {
            denoiser: NetworkDenoiser::new(m.model),
            objective: m.objective,
            extra,
            dir: dir.to_path_buf(),
        })
    }
}

/// Calls `$f::<$D, O>($args)` with O the objective type `$spec` names: the CLI's one choice
/// among objectives.
macro_rules! with_objective {
    ($spec:expr, $f:ident::<$D:ty>($($args:expr),*)) => {
        match $spec {
            maskdiff_objective::ObjectiveSpec::Md4 => $f::<$D, maskdiff_objective::Md4>($($args),*),
            maskdiff_objective::ObjectiveSpec::GenMd4 { .. } => {
                $f::<$D, maskdiff_objective::GenMd4<$D>>($($args),*)
            }
            maskdiff_objective::ObjectiveSpec::Block {
                inner: maskdiff_objective::InnerSpec::GenMd4 { .. },
                ..
            } => $f::<$D, maskdiff_objective::Block<maskdiff_objective::GenMd4<$D>>>($($args),*),
            maskdiff_objective::ObjectiveSpec::Block { .. } => {
                $f::<$D, maskdiff_objective::Block>($($args),*)
            }
        }
    };
}
pub(crate) use with_objective;

/// CUDA device 0 (builds with `--features cuda`); dfdx's own RNG is seeded for completeness —
/// parameters are initialised on the host from the run's seed.
#[cfg(feature = "cuda")]
pub fn cuda_device(seed: u64) -> Result<maskdiff_network::dfdx::tensor::Cuda> {
    maskdiff_network::dfdx::tensor::Cuda::try_build(0, seed)
        .map_err(|e| CliError::Input(format!("cannot open CUDA device 0: {e:?}")))
}

/// Runs `$body` with `$dev` bound to the checkpoint's dfdx device. Evaluation and sampling fall
/// back to the CPU (with a notice) in a build without the `cuda` feature; training refuses instead.
macro_rules! with_device {
    ($cfg:expr, $doing:literal, |$dev:ident| $body:expr) => {
        match $cfg.train.device {
            $crate::config::Device::Cpu => {
                let $dev = maskdiff_network::dfdx::tensor::Cpu::default();
                $body
            }
            $crate::config::Device::Cuda => {
                #[cfg(feature = "cuda")]
                let $dev = $crate::run::cuda_device($cfg.train.seed)?;
                #[cfg(not(feature = "cuda"))]
                let $dev = {
                    eprintln!(concat!(
                        "maskdiff: built without CUDA, ",
                        $doing,
                        " on the CPU"
                    ));
                    maskdiff_network::dfdx::tensor::Cpu::default()
                };
                $body
            }
        }
    };
}
pub(crate) use with_device;
