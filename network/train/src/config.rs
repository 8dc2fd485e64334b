//! Training configuration (spec §8), serialised into every checkpoint manifest, and
//! [`ClipLoss`]: which loss's gradient the clipping threshold is measured on.

use crate::{AdamWConfig, LrSchedule, TrainError};
use maskdiff_objective::ObjectiveSpec;

use maskdiff_schedule::{AnySchedule, Linear, MaskRate, ScheduleSpec, TimeSampling};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub objective: ObjectiveSpec,
    /// Masking schedule (ε-shifted as in the official code).
    pub schedule: ScheduleSpec,
    /// Per-sequence training times: antithetic (official default) or i.i.d.
    pub time_sampling: TimeSampling,
    /// BD3-LM's clipped training mask rates (Arriola et al. 2025, §5; see [`MaskRate`]): the
    /// training loss becomes the clipped objective, validation stays the NELBO. Absent (and not
    /// written, so older manifests are unchanged) = the NELBO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_rate: Option<MaskRate>,
    pub lr: LrSchedule,
    pub adamw: AdamWConfig,
    /// Clip the global norm of the network's gradient to this value; 0 = off (the official
    /// default). The norm is that of the gradient of the loss named by `clip_loss`.
    pub grad_clip: f64,
    /// Which loss's gradient `grad_clip` (and [`StepStats::grad_norm`](crate::StepStats)) is
    /// measured on: the official bits per token, or (manifests written before this field
    /// existed) the batch mean of per-sequence nats.
    #[serde(default = "ClipLoss::legacy")]
    pub clip_loss: ClipLoss,
    /// Split each step's batch into this many micro-batches and accumulate gradients
    /// (the same update as the full batch up to float rounding and dropout draws).
    pub micro_batches: usize,
    /// EMA rate r (ema ← ema + (1 − r)(θ − ema)); official 0.9999.
    pub ema_decay: f64,
}

impl Default for TrainConfig {
    /// The official text8 setup (spec §8, paper App. J.1): MD4, linear schedule with ε = 1e−4,
    /// antithetic t, AdamW lr 3e−4 with 2000 warm-up steps and cosine decay over 1M steps,
    /// β = (0.9, 0.999), weight decay 0.03, no clipping, EMA 0.9999.
    fn default() -> Self {
        TrainConfig {
            objective: ObjectiveSpec::Md4,
            schedule: ScheduleSpec::official(AnySchedule::Linear(Linear)),
            time_sampling: TimeSampling::Antithetic,
            mask_rate: None,
            lr: LrSchedule::cosine(3e-4, 2000, 1_000_000),
            adamw: AdamWConfig::default(),
            grad_clip: 0.0,
            clip_loss: ClipLoss::BitsPerToken,
            micro_batches: 1,
            ema_decay: 0.9999,
        }
    }
}

/// The loss whose gradient norm the clipping threshold bounds. The trainer differentiates the
/// batch mean of per-sequence nats; the official code differentiates (and clips) the loss it
/// reports, bits per token, which is that divided by `len · ln 2` (≈ 177 at length 256).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipLoss {
    /// The official meaning of `clip`: the gradient of the bits-per-token loss.
    #[default]
    BitsPerToken,
    /// The gradient of the batch mean of per-sequence nats: what `grad_clip` meant before the
    /// field existed (so old manifests keep the meaning they were trained with).
    NatsPerSequence,
}

impl ClipLoss {
    /// The meaning of a manifest without the field.
    pub fn legacy() -> Self {
        ClipLoss::NatsPerSequence
    }

    /// The factor from the norm of the nats-per-sequence gradient to the norm of this loss's
    /// gradient, for sequences of `len` tokens: 1 / (len · ln 2) or 1.
    pub fn per_nats(self, len: usize) -> f64 {
        match self {
            ClipLoss::BitsPerToken => 1.0 / (len as f64 * std::f64::consts::LN_2),
            ClipLoss::NatsPerSequence => 1.0,
        }
    }
}

impl TrainConfig {
    /// Why a run saved with `self` cannot be continued as `requested` although its other
    /// settings agree: a clipping threshold whose meaning changed (`None` when clipping is off
    /// in both, since then the unit does not matter).
    pub fn clip_meaning_conflict(&self, requested: &TrainConfig) -> Option<String> {
        if self.clip_loss == requested.clip_loss
            || (self.grad_clip == 0.0 && requested.grad_clip == 0.0)
        {
            return None;
        }
        let name = |c: ClipLoss| match c {
            ClipLoss::BitsPerToken => "the bits-per-token loss (the official meaning)",
            ClipLoss::NatsPerSequence => {
                "the batch mean of per-sequence nats (the meaning before maskdiff recorded it)"
            }
        };
        Some(format!(
            "the checkpoint clips the gradient norm of {} at {}, the requested run that of {} at {}; \
             continuing would change the clipping mid-run, so start a new run (or finish this one \
             with the maskdiff version that wrote it)",
            name(self.clip_loss),
            self.grad_clip,
            name(requested.clip_loss),
            requested.grad_clip
        ))
    }

    pub fn validate(&self) -> Result<(), TrainError> {
        self.lr.validate()?;
        self.adamw.validate()?;
        self.schedule.build()?;
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(TrainError::Config(format!(
                "grad_clip {} must be >= 0",
                self.grad_clip
            )));
        }
        if self.micro_batches == 0 {
            return Err(TrainError::Config("micro_batches must be >= 1".into()));
        }
        if !(self.ema_decay.is_finite() && (0.0..=1.0).contains(&self.ema_decay)) {
            return Err(TrainError::Config(format!(
                "ema_decay {} not in [0, 1]",
                self.ema_decay
            )));
        }
        Ok(())
    }
}
