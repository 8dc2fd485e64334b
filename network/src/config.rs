//! Network configuration (spec §7.1–§7.2) and the named presets the CLI picks at run time.
//!
//! Every width is a run-time value: the model is written over run-time-shaped dfdx tensors, so one
//! binary serves every preset and vocabulary.

use crate::NetworkError;
use serde::{Deserialize, Serialize};

/// The gate non-linearity of the gated feed-forward `W2(act(W1 x) ⊙ W3 x)` (spec §7.2).
/// The same activation is applied to the conditioning vector before each adaLN projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MlpKind {
    /// act = sigmoid (the official `mlp_type = "glu"`, used by every config).
    #[default]
    Glu,
    /// act = swish.
    Swiglu,
    /// act = GeLU (tanh approximation).
    Geglu,
}

/// Which network the configuration builds. The transformer reads every field; the U-Net
/// (spec §7.3) reads `dim` (its channel count), `n_layers` (residual blocks per side),
/// `n_heads` (heads of its middle attention), `cond_dim`, `embed_dim` (per-channel token
/// embedding width), `dropout`, `time_conditioning`, `num_classes` and `vocab_size`, and ignores
/// the transformer-only fields (`mlp`, `ffn_hidden`, `rope_theta`, `depth_scaled_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", tag = "kind", deny_unknown_fields)]
pub enum Arch {
    /// The text transformer of spec §7.2 (over any token sequence).
    #[default]
    Transformer,
    /// The VDM-style U-Net of spec §7.3 over `height × width` pixels of `channels` tokens
    /// each (sequence order: row, column, channel); GroupNorm with `groups` groups.
    Unet {
        height: usize,
        width: usize,
        channels: usize,
        groups: usize,
    },
    /// The U-ViT of spec §7.4 (official `uvit.py` + `dit.py`) over `height × width` pixels of
    /// `channels` tokens: conditional-GroupNorm residual blocks (`groups` groups) around a DiT
    /// middle on `patch × patch` patches with `dit_layers` blocks of `dit_heads` heads and width
    /// `dit_dim`. Reads the same [`NetworkConfig`] fields as the U-Net (`dim` = residual-block
    /// channels, `n_layers` = residual blocks per side).
    Uvit {
        height: usize,
        width: usize,
        channels: usize,
        groups: usize,
        patch: usize,
        dit_layers: usize,
        dit_heads: usize,
        dit_dim: usize,
    },
}

impl Arch {
    pub fn is_transformer(&self) -> bool {
        matches!(self, Arch::Transformer)
    }
}

/// The MD4 denoising network's hyper-parameters (the transformer's, or the U-Net's: [`Arch`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// V: number of real tokens. Inputs use ids `0..=V` (V is the mask); outputs cover `0..V`.
    pub vocab_size: usize,
    /// Longest sequence the model accepts (RoPE has no learned table, this is a guard rail).
    pub max_len: usize,
    /// Model width (`feature_dim · num_heads` in the official code).
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// Width d_c of the sinusoidal time embedding and of the conditioning vector (spec §7.1).
    pub cond_dim: usize,
    pub mlp: MlpKind,
    /// FFN hidden width; `None` = 2/3·4·dim rounded up to a multiple of 32 (spec §7.2).
    pub ffn_hidden: Option<usize>,
    /// Condition on t (adaLN-zero). `false` gives the time-free parameterisation μ_θ(x_t)
    /// (spec §4.1), which lets samplers cache network outputs.
    pub time_conditioning: bool,
    /// Number of class labels (0 = unconditional). The label embedding is concatenated with
    /// the time embedding before the conditioning MLP (spec §6.4, §7.1).
    pub num_classes: usize,
    /// Channel-wise residual dropout rate (one keep-mask per sequence and channel).
    pub dropout: f64,
    /// `Some(e)`: embed ids into width e, then Dense(e → dim, with bias) (the official text8
    /// `outside_embed`, e = 64). `None`: embed straight into `dim` (OWT).
    pub embed_dim: Option<usize>,
    /// RoPE base θ.
    pub rope_theta: f64,
    /// FFN init variance scale 2/n_layers instead of 1 (the official `depth_scaled_init`).
    pub depth_scaled_init: bool,
    /// `Some(B)`: a block-diffusion network (BD3-LM, [`crate::BlockMask`]): its input is the
    /// noised sequence followed by the clean one (2N ids, N ≤ `max_len`), attention follows the
    /// block mask with blocks of B tokens, and it returns logits for the N noised positions.
    /// The parameters are those of the plain model. `None` (absent in older configs): MD4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
    /// The network type (absent in older manifests: the transformer).
    #[serde(default, skip_serializing_if = "Arch::is_transformer")]
    pub arch: Arch,
}

/// Names accepted by [`NetworkConfig::preset`].
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

impl NetworkConfig {
    /// A named preset for a vocabulary of `vocab_size` real tokens:
    /// `tiny` (tests: 2 layers, 2 heads, width 32, length ≤ 64), `cpu-small` (benchmark: 4 layers,
    /// 4 heads, width 256, length 256), `md4-s` (12, 12, 768, length 1024) and `md4-m`
    /// (24, 16, 1024, length 1024). All use GLU, adaLN-zero time conditioning, d_c = 64
    /// (16 for tiny) and no dropout.
    ///
    /// The input embedding follows the official config each preset mirrors: `cpu-small` is the
    /// official text8 model (length 256) at 4 layers × width 256, so it embeds into 64
    /// dimensions and projects to the width with a dense layer with bias (`outside_embed`,
    /// `feature_dim` 64: 3,702,336 parameters at V = 27); `md4-s` and `md4-m` are the
    /// OpenWebText models (length 1024) and embed straight into the width; `tiny` (tests) does
    /// too. Set [`NetworkConfig::embed_dim`] to choose otherwise (the official text8 `md4-s` is
    /// `md4-s` with `embed_dim = Some(64)`).
    ///
    /// U-Net presets (spec §7.3; image shape 32 × 32 × 3 until [`NetworkConfig::set_image`]
    /// sets the data's): `unet-cifar10` is the official `md4/cifar10` network (128 channels,
    /// 32 residual blocks per side, per-channel embedding 128, d_c = 128, dropout 0.1, 32
    /// GroupNorm groups); `unet-small` (CPU: 64 channels, 4 blocks, embedding 32, d_c = 64,
    /// 16 groups, dropout 0.1) and `unet-tiny` (tests: 16 channels, 1 block, embedding 8,
    /// d_c = 16, 4 groups, no dropout).
    ///
    /// U-ViT presets (spec §7.4; image shape 64 × 64 × 3 until [`NetworkConfig::set_image`]):
    /// `uvit-imagenet64` is the official `md4/imagenet64` likelihood network (the config's
    /// sweep comment: 24 residual blocks per side and 12 DiT layers; 256 channels, per-channel
    /// embedding 256, d_c = 256, 32 groups, patch 2, DiT width 768 with 12 heads, dropout 0.1:
    /// 198,279,680 parameters, the paper's "198M"); `uvit-small` (CPU: 64 channels, 2 blocks,
    /// embedding 32, d_c = 64, 16 groups, patch 2, 4 DiT layers of width 128 with 4 heads,
    /// dropout 0.1) and `uvit-tiny` (tests: 16 channels, 1 block, embedding 8, d_c = 16,
    /// 4 groups, patch 2, 1 DiT layer of width 16 with 2 heads, no dropout).
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, NetworkError> {
        if let Some(size) = name.strip_prefix("uvit-") {
            #[rustfmt::skip]
            let (dim, n_layers, embed, cond_dim, groups, (dit_layers, dit_heads, dit_dim), dropout) =
                match size {
                    "tiny" => (16, 1, 8, 16, 4, (1, 2, 16), 0.0),
                    "small" => (64, 2, 32, 64, 16, (4, 4, 128), 0.1),
                    "imagenet64" => (256, 24, 256, 256, 32, (12, 12, 768), 0.1),
                    _ => return Err(NetworkError::UnknownPreset(name.to_string())),
                };
            let arch = Arch::Uvit {
                height: 64,
                width: 64,
                channels: 3,
                groups,
                patch: 2,
                dit_layers,
                dit_heads,
                dit_dim,
            };
            return Self::image_preset(vocab_size, (dim, n_layers, embed, cond_dim), dropout, arch);
        }
        if let Some(size) = name.strip_prefix("unet-") {
            let (dim, n_layers, embed, cond_dim, groups, dropout) = match size {
                "tiny" => (16, 1, 8, 16, 4, 0.0),
                "small" => (64, 4, 32, 64, 16, 0.1),
                "cifar10" => (128, 32, 128, 128, 32, 0.1),
                _ => return Err(NetworkError::UnknownPreset(name.to_string())),
            };
            let arch = Arch::Unet {
                height: 32,
                width: 32,
                channels: 3,
                groups,
            };
            return Self::image_preset(vocab_size, (dim, n_layers, embed, cond_dim), dropout, arch);
        }
        let (max_len, dim, n_layers, n_heads, cond_dim, embed_dim) = match name {
            "tiny" => (64, 32, 2, 2, 16, None),
            "cpu-small" => (256, 256, 4, 4, 64, Some(64)),
            "md4-s" => (1024, 768, 12, 12, 64, None),
            "md4-m" => (1024, 1024, 24, 16, 64, None),
            _ => return Err(NetworkError::UnknownPreset(name.to_string())),
        };
        let cfg = NetworkConfig {
            vocab_size,
            max_len,
            dim,
            n_layers,
            n_heads,
            cond_dim,
            mlp: MlpKind::Glu,
            ffn_hidden: None,
            time_conditioning: true,
            num_classes: 0,
            dropout: 0.0,
            embed_dim,
            rope_theta: 10_000.0,
            depth_scaled_init: true,
            block_size: None,
            arch: Arch::Transformer,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// An image network's configuration: `(channels, blocks per side, per-channel embedding,
    /// d_c)`, time-conditioned, unconditional on labels, built for `arch`'s image shape.
    fn image_preset(
        vocab_size: usize,
        (dim, n_layers, embed, cond_dim): (usize, usize, usize, usize),
        dropout: f64,
        arch: Arch,
    ) -> Result<Self, NetworkError> {
        let mut cfg = NetworkConfig {
            vocab_size,
            max_len: 0,
            dim,
            n_layers,
            n_heads: 1,
            cond_dim,
            mlp: MlpKind::Glu,
            ffn_hidden: None,
            time_conditioning: true,
            num_classes: 0,
            dropout,
            embed_dim: Some(embed),
            rope_theta: 10_000.0,
            depth_scaled_init: false,
            block_size: None,
            arch,
        };
        let (h, w, c) = cfg.image().expect("an image architecture");
        cfg.set_image(h, w, c)?;
        Ok(cfg)
    }

    /// Sets an image network's input shape (and `max_len` to its token count); an error for
    /// the transformer, which takes any sequence.
    pub fn set_image(
        &mut self,
        height: usize,
        width: usize,
        channels: usize,
    ) -> Result<(), NetworkError> {
        match &mut self.arch {
            Arch::Transformer => {
                return Err(NetworkError::Config(
                    "the transformer has no image shape".into(),
                ))
            }
            Arch::Unet {
                height: h,
                width: w,
                channels: c,
                ..
            }
            | Arch::Uvit {
                height: h,
                width: w,
                channels: c,
                ..
            } => (*h, *w, *c) = (height, width, channels),
        }
        self.max_len = height * width * channels;
        self.validate()
    }

    /// `(height, width, channels)` of an image network.
    pub fn image(&self) -> Option<(usize, usize, usize)> {
        match self.arch {
            Arch::Transformer => None,
            Arch::Unet {
                height,
                width,
                channels,
                ..
            }
            | Arch::Uvit {
                height,
                width,
                channels,
                ..
            } => Some((height, width, channels)),
        }
    }

    /// The FFN hidden width actually used.
    pub fn ffn_hidden_dim(&self) -> usize {
        self.ffn_hidden
            .unwrap_or_else(|| default_ffn_hidden(self.dim))
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }

    /// Whether blocks are adaLN-zero conditioned (on t and/or a label) or plain pre-RMSNorm.
    pub fn is_conditioned(&self) -> bool {
        self.time_conditioning || self.num_classes > 0
    }

    /// Checks every constraint the model relies on.
    pub fn validate(&self) -> Result<(), NetworkError> {
        let bad = |m: String| Err(NetworkError::Config(m));
        if self.vocab_size == 0 || self.vocab_size >= u32::MAX as usize {
            return bad(format!("vocab_size {} out of range", self.vocab_size));
        }
        if self.dim == 0 || self.n_layers == 0 || self.n_heads == 0 || self.max_len == 0 {
            return bad("dim, n_layers, n_heads and max_len must be positive".into());
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return bad(format!(
                "dim {} not divisible by n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "RoPE needs an even head dim, got {}",
                self.head_dim()
            ));
        }
        if self.cond_dim < 4 || !self.cond_dim.is_multiple_of(2) {
            return bad(format!(
                "cond_dim must be even and >= 4, got {}",
                self.cond_dim
            ));
        }
        if self.ffn_hidden == Some(0) || self.embed_dim == Some(0) || self.block_size == Some(0) {
            return bad("ffn_hidden, embed_dim and block_size must be positive when given".into());
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return bad(format!("dropout {} not in [0, 1)", self.dropout));
        }
        let image = match self.arch {
            Arch::Transformer => None,
            Arch::Unet {
                height,
                width,
                channels,
                groups,
            }
            | Arch::Uvit {
                height,
                width,
                channels,
                groups,
                ..
            } => Some((height, width, channels, groups)),
        };
        if let Some((height, width, channels, groups)) = image {
            if height == 0 || width == 0 || channels == 0 {
                return bad("the image shape must be positive".into());
            }
            if self.max_len != height * width * channels {
                return bad(format!(
                    "max_len {} is not height·width·channels = {}",
                    self.max_len,
                    height * width * channels
                ));
            }
            if groups == 0 || !self.dim.is_multiple_of(groups) {
                return bad(format!(
                    "U-Net channels {} not divisible by {groups} GroupNorm groups",
                    self.dim
                ));
            }
            if self.embed_dim.is_none() {
                return bad("the U-Net needs a per-channel embed_dim".into());
            }
            if self.block_size.is_some() {
                return bad("block diffusion needs the transformer, not an image network".into());
            }
        }
        if let Arch::Uvit {
            height,
            width,
            patch,
            dit_layers,
            dit_heads,
            dit_dim,
            ..
        } = self.arch
        {
            if patch == 0 || !height.is_multiple_of(patch) || !width.is_multiple_of(patch) {
                return bad(format!(
                    "the U-ViT's {height}×{width} image is not divisible into {patch}×{patch} patches"
                ));
            }
            if dit_layers == 0 || dit_heads == 0 || !dit_dim.is_multiple_of(dit_heads) {
                return bad(format!(
                    "U-ViT DiT: {dit_layers} layers, width {dit_dim} over {dit_heads} heads \
                     (layers and heads must be positive, the width divisible by the heads)"
                ));
            }
            // the 2-D sin-cos table gives each axis dit_dim/2 columns of sin/cos pairs
            if dit_dim == 0 || !dit_dim.is_multiple_of(4) {
                return bad(format!(
                    "U-ViT DiT width {dit_dim} must be a positive multiple of 4 (2-D sin-cos positions)"
                ));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} must be > 1", self.rope_theta));
        }
        Ok(())
    }
}

/// 2/3 · 4 · dim rounded up to a multiple of 32 (spec §7.2, §11.22: 768 → 2048, 1024 → 2752).
pub fn default_ffn_hidden(dim: usize) -> usize {
    let h = (8 * dim).div_ceil(3);
    h.div_ceil(32) * 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_hidden_matches_spec() {
        // spec §11.22
        assert_eq!(default_ffn_hidden(768), 2048);
        assert_eq!(default_ffn_hidden(1024), 2752);
        // 8·256/3 = 682.7 → 683 → 704
        assert_eq!(default_ffn_hidden(256), 704);
    }

    #[test]
    fn cpu_small_has_the_official_parameter_count() {
        use dfdx::prelude::Cpu;
        let dev = Cpu::default();
        let count = |c: &NetworkConfig| {
            crate::Md4Transformer::<f32, _>::new(c.clone(), &dev, 0)
                .unwrap()
                .num_params()
        };
        let mut c = NetworkConfig::preset("cpu-small", 27).unwrap();
        // The official text8 model at 4 layers × 4 heads × width 256: 3,702,336 parameters.
        assert_eq!(count(&c), 3_702_336);
        // Embedding straight into the width (the preset before it followed the official
        // config): Embed(28, 256) instead of Embed(28, 64) + Dense(64 → 256) with bias, i.e.
        // 28·64 + 64·256 + 256 − 28·256 = 11,264 fewer.
        c.embed_dim = None;
        assert_eq!(count(&c), 3_702_336 - 11_264);
        assert_eq!(count(&c), 3_691_072);
    }

    #[test]
    fn presets_and_errors() {
        let s = NetworkConfig::preset("md4-s", 50257).unwrap();
        assert_eq!(
            (s.n_layers, s.n_heads, s.dim, s.head_dim()),
            (12, 12, 768, 64)
        );
        let m = NetworkConfig::preset("md4-m", 50257).unwrap();
        assert_eq!((m.n_layers, m.n_heads, m.dim), (24, 16, 1024));
        let c = NetworkConfig::preset("cpu-small", 27).unwrap();
        assert_eq!((c.n_layers, c.n_heads, c.dim, c.max_len), (4, 4, 256, 256));
        // the official text8 embedding (outside_embed, feature_dim 64); OWT's for md4-s/m
        assert_eq!(c.embed_dim, Some(64));
        assert_eq!((s.embed_dim, m.embed_dim), (None, None));
        assert!(matches!(
            NetworkConfig::preset("huge", 27),
            Err(NetworkError::UnknownPreset(_))
        ));
        let mut bad = c.clone();
        bad.n_heads = 3;
        assert!(bad.validate().is_err());
        bad = c.clone();
        bad.dropout = 1.0;
        assert!(bad.validate().is_err());
        assert!(NetworkConfig::preset("tiny", 0).is_err());
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<NetworkConfig>(&json).unwrap(), c);
    }
}
