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
}

impl SamplerKind {
    pub fn name(self) -> &'static str {
        match self {
            SamplerKind::Ancestral => "ancestral",
            SamplerKind::Mean => "mean",
            SamplerKind::Cached => "cached",
            SamplerKind::FirstHitting => "first-hitting",
            SamplerKind::Confidence => "confidence",
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
            _ => Err(SamplerError::UnknownKind(s.to_string())),
        }
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
        ] {
            assert_eq!(k.name().parse::<SamplerKind>().unwrap(), k);
        }
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
        assert!(SamplerConfig::default().validate().is_ok());
    }
}
