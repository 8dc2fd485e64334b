//! The sampler's settings as one serialisable struct that a CLI fills from flags or a config file.

use crate::{SamplerError, Shaping};
use maskdiff_schedule::SamplingGrid;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Which reverse-process algorithm to run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerKind {
    /// Paper Alg. 2 (spec §6.1): one network call per step, one exact (V+1)-way categorical per
    /// masked position, leftovers filled by the argmax at t = 0.
    #[default]
    Ancestral,
    /// Paper Alg. 3 (spec §6.2): z ~ μ then reveal with probability p_unmask. Same law as Alg. 2.
    Mean,
    /// Alg. 2 with the same random numbers, calling the network only when its answer can matter
    /// and is not already known: MD4 skips steps that reveal nothing (valid for every denoiser:
    /// the output is identical to `Ancestral` for the same seed); GenMD4 reuses the last output
    /// while the state is unchanged (needs a time-free denoiser).
    Cached,
    /// First-hitting (MD4 only): draw each position's reveal step directly from the
    /// telescoped survival (1 − α_s)/(1 − α_1) and jump from one reveal step to the next. Same law
    /// as Alg. 2, at most min(T, #masked) network calls (+1 for the final fill).
    FirstHitting,
    /// MaskGIT / LLaDA-style (MD4 only): per step reveal the k most confident masked positions,
    /// k set so the masked count follows #masked · (1 − α_s)/(1 − α_1) (floored). Not exact.
    Confidence,
    /// ReMDM (Wang et al. 2025): Alg. 2 in which revealed tokens may be re-masked with probability
    /// σ_t and masked positions are revealed with (α_s − (1 − σ_t) α_t)/(1 − α_t), so the marginal
    /// of every step stays the forward process's; σ set by [`RemdmConfig`]. σ ≡ 0 is `Ancestral`
    /// bit for bit.
    Remdm,
    /// Confidence-threshold parallel decoding (Fast-dLLM, Wu et al. 2025): per network call,
    /// reveal every masked position whose proposal has model probability > τ
    /// ([`SamplerConfig::threshold`]), at least one (more when needed to finish the block
    /// within its steps). The number of calls adapts to the model's certainty. Not exact.
    Threshold,
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ancestral => "ancestral",
            SamplerKind::Mean => "mean",
            SamplerKind::Cached => "cached",
            SamplerKind::FirstHitting => "first-hitting",
            SamplerKind::Confidence => "confidence",
            SamplerKind::Remdm => "remdm",
            SamplerKind::Threshold => "threshold",
        }
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SamplerKind {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "ancestral" => Ok(SamplerKind::Ancestral),
            "mean" => Ok(SamplerKind::Mean),
            "cached" => Ok(SamplerKind::Cached),
            "first-hitting" | "firsthitting" => Ok(SamplerKind::FirstHitting),
            "confidence" => Ok(SamplerKind::Confidence),
            "remdm" => Ok(SamplerKind::Remdm),
            "threshold" => Ok(SamplerKind::Threshold),
            _ => Err(SamplerError::UnknownKind(s.to_string())),
        }
    }
}

/// How ReMDM chooses the remasking probability σ_t of a step t → s. Every strategy respects
/// σ_t ≤ σ_max = min(1, (1 − α_s)/α_t), the bound that keeps the probability of staying masked,
/// (1 − α_s − σ_t α_t)/(1 − α_t), non-negative (for GenMD4, per token value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemdmStrategy {
    /// "max-capped": σ_t = min(η, σ_max).
    #[default]
    Cap,
    /// "rescaled": σ_t = η · σ_max (η ∈ [0, 1]).
    Rescale,
    /// "confidence": per revealed position ℓ, σ_t^ℓ = softmax_ℓ(−ψ) · σ_max over the block's
    /// revealed (not constraint-fixed) positions, ψ_ℓ the probability its token was drawn with;
    /// masked positions use σ = 0 (as the reference code). η is not used.
    Conf,
}

impl RemdmStrategy {
    pub fn name(self) -> &'static str {
        match self {
            RemdmStrategy::Cap => "cap",
            RemdmStrategy::Rescale => "rescale",
            RemdmStrategy::Conf => "conf",
        }
    }
}

impl fmt::Display for RemdmStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for RemdmStrategy {
    type Err = SamplerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cap" | "max-capped" => Ok(RemdmStrategy::Cap),
            "rescale" | "rescaled" => Ok(RemdmStrategy::Rescale),
            "conf" | "confidence" => Ok(RemdmStrategy::Conf),
            _ => Err(SamplerError::BadRemdm(format!(
                "unknown strategy {s:?}; expected cap, rescale or conf"
            ))),
        }
    }
}

/// ReMDM's "loop" schedule: decode from t = 1 down to `t_on` until α reaches `alpha_on`, hold α
/// at `alpha_on` from `t_on` to `t_off` while remasking and revealing at the strategy's σ, then
/// decode the rest from `t_off` to 0 without remasking. On a general schedule α_t the grid time t
/// is mapped to the schedule time τ(t) with α(τ_on) = `alpha_on`, linearly on each side of the
/// hold (for the linear schedule this is the reference code's piecewise-linear α); a
/// time-conditioned denoiser sees τ(t).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemdmLoop {
    pub t_on: f64,
    pub t_off: f64,
    pub alpha_on: f64,
}

/// The ReMDM settings (used when `kind` is [`SamplerKind::Remdm`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemdmConfig {
    pub strategy: RemdmStrategy,
    /// η: the cap (`cap`) or the scale (`rescale`, in [0, 1]). Default 0.02.
    pub eta: f64,
    /// The loop schedule; `None` = remask at every step.
    #[serde(rename = "loop")]
    pub loop_: Option<RemdmLoop>,
}

impl Default for RemdmConfig {
    fn default() -> Self {
        Self {
            strategy: RemdmStrategy::Cap,
            eta: 0.02,
            loop_: None,
        }
    }
}

impl RemdmConfig {
    /// Check η and the loop parameters.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let bad = |m: String| Err(SamplerError::BadRemdm(m));
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return bad(format!(
                "eta must be a finite number >= 0, got {}",
                self.eta
            ));
        }
        if self.strategy == RemdmStrategy::Rescale && self.eta > 1.0 {
            return bad(format!(
                "eta must be in [0, 1] for rescale, got {}",
                self.eta
            ));
        }
        if let Some(l) = self.loop_ {
            let ok = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
            if !(ok(l.t_on) && ok(l.t_off) && l.t_off < l.t_on) {
                return bad(format!(
                    "loop needs 0 <= t_off < t_on <= 1, got t_on = {}, t_off = {}",
                    l.t_on, l.t_off
                ));
            }
            if !(l.alpha_on.is_finite() && l.alpha_on > 0.0 && l.alpha_on < 1.0) {
                return bad(format!("loop needs alpha_on in (0, 1), got {}", l.alpha_on));
            }
            if self.strategy == RemdmStrategy::Conf {
                return bad("the loop schedule needs the cap or rescale strategy".into());
            }
        }
        Ok(())
    }
}

/// Everything a sampling run needs besides the model, the schedule, constraints and labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerConfig {
    /// The algorithm (default ancestral).
    pub kind: SamplerKind,
    /// T, the number of reverse steps in total (split over blocks when `block_size` is set).
    /// Default 1000 (the paper's text setting; 256 for images).
    pub steps: usize,
    /// Time grid (default cosine, as in every official config).
    pub grid: SamplingGrid,
    /// How many sequences to draw.
    pub num_samples: usize,
    /// Sequence length N.
    pub length: usize,
    /// μ^{1/τ}; 1 = off, 0 = greedy; a positive τ must be ≥ [`crate::MIN_TEMPERATURE`].
    pub temperature: f64,
    /// Nucleus mass p ∈ (0, 1]; 1 = off.
    pub top_p: f64,
    /// Seed of the counter-based RNG.
    pub seed: u64,
    /// RNG index of the first sample: sample i uses stream `first_index + i`, so a run can be
    /// split into pieces (or one sample redrawn alone) with identical results.
    pub first_index: u64,
    /// Semi-autoregressive generation in blocks of this many positions, left to right
    /// (LLaDA-style); `None` = the whole sequence at once. The steps are shared out evenly
    /// (earlier blocks get the remainder); each block runs its own grid from t = 1 to t = 0 with
    /// later blocks still masked, so a time-conditioned denoiser sees t restart per block.
    pub block_size: Option<usize>,
    /// At most this many sequences per denoiser call.
    pub batch_size: usize,
    /// ReMDM settings (kind `remdm`).
    pub remdm: RemdmConfig,
    /// τ ∈ [0, 1] of the confidence-threshold sampler (kind `threshold`): reveal every masked
    /// position whose proposal has model probability > τ. Default 0.9.
    pub threshold: f64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ancestral,
            steps: 1000,
            grid: SamplingGrid::Cosine,
            num_samples: 1,
            length: 256,
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            first_index: 0,
            block_size: None,
            batch_size: 16,
            remdm: RemdmConfig::default(),
            threshold: 0.9,
        }
    }
}

impl SamplerConfig {
    /// Number of blocks the sequence is generated in.
    pub fn num_blocks(&self) -> usize {
        match self.block_size {
            Some(b) if b > 0 => self.length.div_ceil(b),
            _ => 1,
        }
    }
    /// The temperature / top-p reshaping.
    pub fn shaping(&self) -> Result<Shaping, SamplerError> {
        Shaping::new(self.temperature, self.top_p)
    }
    /// Check every field.
    pub fn validate(&self) -> Result<(), SamplerError> {
        if self.steps == 0 {
            return Err(SamplerError::BadSteps(0));
        }
        if self.length == 0 {
            return Err(SamplerError::EmptySequence);
        }
        if self.batch_size == 0 {
            return Err(SamplerError::BadBatchSize);
        }
        if self.block_size == Some(0) {
            return Err(SamplerError::BadBlockSize);
        }
        if self.steps < self.num_blocks() {
            return Err(SamplerError::TooFewSteps {
                steps: self.steps,
                blocks: self.num_blocks(),
            });
        }
        if !(self.threshold.is_finite() && (0.0..=1.0).contains(&self.threshold)) {
            return Err(SamplerError::BadThreshold(self.threshold));
        }
        self.remdm.validate()?;
        self.shaping().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for k in [
            SamplerKind::Ancestral,
            SamplerKind::Mean,
            SamplerKind::Cached,
            SamplerKind::FirstHitting,
            SamplerKind::Confidence,
            SamplerKind::Remdm,
            SamplerKind::Threshold,
        ] {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
        }
        for s in [
            RemdmStrategy::Cap,
            RemdmStrategy::Rescale,
            RemdmStrategy::Conf,
        ] {
            assert_eq!(s.name().parse::<RemdmStrategy>().unwrap(), s);
        }
        assert!(matches!(
            "sometimes".parse::<RemdmStrategy>(),
            Err(SamplerError::BadRemdm(_))
        ));
        assert!(matches!(
            "gibbs".parse::<SamplerKind>(),
            Err(SamplerError::UnknownKind(_))
        ));
    }

    #[test]
    fn config_serde_and_validation() {
        let c: SamplerConfig =
            serde_json::from_str(r#"{"kind":"first-hitting","steps":8,"grid":"uniform"}"#).unwrap();
        assert_eq!(c.kind, SamplerKind::FirstHitting);
        assert_eq!(c.steps, 8);
        assert_eq!(c.grid, SamplingGrid::Uniform);
        assert_eq!(c.top_p, 1.0);
        assert!(serde_json::from_str::<SamplerConfig>(r#"{"stepz":3}"#).is_err());
        let back: SamplerConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        let bad = |f: fn(&mut SamplerConfig)| {
            let mut c = SamplerConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert_eq!(bad(|c| c.steps = 0), SamplerError::BadSteps(0));
        assert_eq!(bad(|c| c.length = 0), SamplerError::EmptySequence);
        assert_eq!(bad(|c| c.batch_size = 0), SamplerError::BadBatchSize);
        assert_eq!(bad(|c| c.block_size = Some(0)), SamplerError::BadBlockSize);
        assert_eq!(bad(|c| c.top_p = 0.0), SamplerError::BadTopP(0.0));
        assert_eq!(
            bad(|c| c.temperature = 1e-310),
            SamplerError::BadTemperature(1e-310)
        );
        assert_eq!(
            bad(|c| {
                c.block_size = Some(1);
                c.steps = 10
            }),
            SamplerError::TooFewSteps {
                steps: 10,
                blocks: 256
            }
        );
        assert_eq!(bad(|c| c.threshold = 1.5), SamplerError::BadThreshold(1.5));
        assert!(matches!(
            bad(|c| c.remdm.eta = -0.1),
            SamplerError::BadRemdm(_)
        ));
        assert!(matches!(
            bad(|c| {
                c.remdm.strategy = RemdmStrategy::Rescale;
                c.remdm.eta = 1.5
            }),
            SamplerError::BadRemdm(_)
        ));
        fn lp(t_on: f64, t_off: f64, alpha_on: f64) -> Option<RemdmLoop> {
            Some(RemdmLoop {
                t_on,
                t_off,
                alpha_on,
            })
        }
        assert!(matches!(
            bad(|c| c.remdm.loop_ = lp(0.2, 0.5, 0.9)),
            SamplerError::BadRemdm(_)
        ));
        assert!(matches!(
            bad(|c| c.remdm.loop_ = lp(0.5, 0.2, 1.0)),
            SamplerError::BadRemdm(_)
        ));
        assert!(matches!(
            bad(|c| {
                c.remdm.loop_ = lp(0.5, 0.2, 0.9);
                c.remdm.strategy = RemdmStrategy::Conf
            }),
            SamplerError::BadRemdm(_)
        ));
        let c: SamplerConfig = serde_json::from_str(
            r#"{"kind":"remdm","remdm":{"strategy":"rescale","eta":0.5,"loop":{"t_on":0.55,"t_off":0.05,"alpha_on":0.9}}}"#,
        )
        .unwrap();
        assert_eq!(c.remdm.strategy, RemdmStrategy::Rescale);
        assert_eq!(c.remdm.loop_, lp(0.55, 0.05, 0.9));
        assert!(c.validate().is_ok());
        assert!(SamplerConfig::default().validate().is_ok());
    }
}
