//! [`Network`]: any of the MD4 denoising networks — the text transformer (spec §7.2) or the
//! U-Net image denoiser (spec §7.3) — behind one type, which the trainer, the checkpoints, the
//! EMA and [`crate::NetworkDenoiser`] hold. The configuration's [`crate::Arch`] picks the type.

use crate::layers::{T2, T3};
use crate::modules::Parameters;
use crate::param::{self, Param};
use crate::unet::UNet;
use crate::uvit::Uvit;
use crate::{Arch, Elem, Kernels, Md4Transformer, NetworkConfig, NetworkError};
use dfdx::prelude::*;
use maskdiff_process::{DenoiseBatch, LogProbs, RowLogProbs, Vocab};
use rand::RngCore;
use std::path::Path;

/// A denoising network of any architecture.
// A few networks live per process (model and EMA), never in collections: size is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Network<E: Elem, D: Kernels<E>> {
    Transformer(Md4Transformer<E, D>),
    UNet(UNet<E, D>),
    Uvit(Uvit<E, D>),
}

impl<E: Elem, D: Kernels<E>> From<Uvit<E, D>> for Network<E, D> {
    fn from(m: Uvit<E, D>) -> Self {
        Network::Uvit(m)
    }
}

impl<E: Elem, D: Kernels<E>> From<Md4Transformer<E, D>> for Network<E, D> {
    fn from(m: Md4Transformer<E, D>) -> Self {
        Network::Transformer(m)
    }
}

impl<E: Elem, D: Kernels<E>> From<UNet<E, D>> for Network<E, D> {
    fn from(m: UNet<E, D>) -> Self {
        Network::UNet(m)
    }
}

crate::modules::enum_parameters!([D: Kernels<E>] Network { Transformer, UNet, Uvit });

impl<E: Elem, D: Kernels<E>> Network<E, D> {
    /// A freshly initialised network of `cfg`'s architecture, parameters from `seed`.
    pub fn new(cfg: NetworkConfig, dev: &D, seed: u64) -> Result<Self, NetworkError> {
        match cfg.arch {
            Arch::Transformer => Ok(Md4Transformer::new(cfg, dev, seed)?.into()),
            Arch::Unet { .. } => Ok(UNet::new(cfg, dev, seed)?.into()),
            Arch::Uvit { .. } => Ok(Uvit::new(cfg, dev, seed)?.into()),
        }
    }

    /// The transformer inside, or an error naming the architecture (block diffusion and its
    /// key/value cache exist for the transformer only).
    pub fn into_transformer(self) -> Result<Md4Transformer<E, D>, NetworkError> {
        match self {
            Network::Transformer(m) => Ok(m),
            Network::UNet(_) => Err(NetworkError::Config(
                "this operation needs the transformer, not the U-Net".into(),
            )),
            Network::Uvit(_) => Err(NetworkError::Config(
                "this operation needs the transformer, not the U-ViT".into(),
            )),
        }
    }

    pub fn config(&self) -> &NetworkConfig {
        match self {
            Network::Transformer(m) => m.config(),
            Network::UNet(m) => m.config(),
            Network::Uvit(m) => m.config(),
        }
    }
    pub fn vocab(&self) -> Vocab {
        Vocab::new(self.config().vocab_size).expect("validated config")
    }
    pub fn device(&self) -> &D {
        match self {
            Network::Transformer(m) => m.device(),
            Network::UNet(m) => m.device(),
            Network::Uvit(m) => m.device(),
        }
    }
    /// All parameters in their fixed order (their names are the checkpoint keys).
    pub fn params(&self) -> Vec<&Param<E, D>> {
        let mut out = Vec::new();
        self.visit(&mut |p| out.push(p));
        out
    }
    /// Mutable access for optimizers and EMA: replace `value`, keep the length and shape.
    pub fn params_mut(&mut self) -> Vec<&mut Param<E, D>> {
        let mut out = Vec::new();
        self.visit_mut(&mut |p| out.push(p));
        out
    }
    pub fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.numel()).sum()
    }
    /// A fresh gradient tape for a training forward pass.
    pub fn tape(&self) -> OwnedTape<E, D> {
        OwnedTape::default()
    }

    /// The same network on another device (parameters copied through the host).
    pub fn to_device<D2: Kernels<E>>(&self, dev: &D2) -> Result<Network<E, D2>, NetworkError> {
        match self {
            Network::Transformer(m) => Ok(m.to_device(dev)?.into()),
            Network::UNet(m) => {
                let mut all = Vec::new();
                m.visit(&mut |p| all.push(p));
                let mut src = all.into_iter();
                let mut take = |name: &str, _: &[usize], _: crate::Init| match src.next() {
                    Some(p) if p.name == name => Ok(p.value.as_vec()),
                    _ => Err(NetworkError::Config(format!(
                        "to_device: no source tensor {name}"
                    ))),
                };
                Ok(UNet::build(m.config().clone(), dev, &mut take)?.into())
            }
            Network::Uvit(m) => {
                let mut src = m.params().into_iter();
                let mut take = |name: &str, _: &[usize], _: crate::Init| match src.next() {
                    Some(p) if p.name == name => Ok(p.value.as_vec()),
                    _ => Err(NetworkError::Config(format!(
                        "to_device: no source tensor {name}"
                    ))),
                };
                Ok(Uvit::build(m.config().clone(), dev, &mut take)?.into())
            }
        }
    }

    /// Logits (batch, len, V) over the real tokens; `tape` is `NoneTape` for inference or an
    /// `OwnedTape` to record gradients; `dropout_rng` switches dropout on (training).
    pub fn forward<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
    ) -> Result<T3<E, D, T>, NetworkError> {
        match self {
            Network::Transformer(m) => m.forward(batch, tape, dropout_rng),
            Network::UNet(m) => {
                check_image_input(m.config(), batch)?;
                m.forward_impl(batch, tape, dropout_rng)
                    .map_err(NetworkError::device)
            }
            Network::Uvit(m) => {
                check_image_input(m.config(), batch)?;
                m.forward_impl(batch, tape, dropout_rng)
                    .map_err(NetworkError::device)
            }
        }
    }

    /// Logits (rows.len(), V) at only the flat output rows `rows` (`b·len + pos`, strictly
    /// increasing), with the tape (see [`Md4Transformer::forward_at`]; the image networks run
    /// the full forward and select).
    pub fn forward_at<T: Tape<E, D>>(
        &self,
        batch: &DenoiseBatch<'_>,
        tape: T,
        dropout_rng: Option<&mut dyn RngCore>,
        rows: &[usize],
    ) -> Result<T2<E, D, T>, NetworkError> {
        if let Network::Transformer(m) = self {
            return m.forward_at(batch, tape, dropout_rng, rows);
        }
        crate::model::check_rows(rows, batch.batch * batch.len)?;
        crate::model::select_rows(self.forward(batch, tape, dropout_rng)?, rows)
    }

    /// Normalised log μ_θ (batch, len, V) without a tape, as host data.
    pub fn log_probs(&self, batch: &DenoiseBatch<'_>) -> Result<LogProbs, NetworkError> {
        if let Network::Transformer(m) = self {
            return m.log_probs(batch);
        }
        let logits = self.forward(batch, NoneTape, None)?;
        let lp = logits
            .try_log_softmax::<Axis<2>>()
            .map_err(NetworkError::device)?;
        Ok(LogProbs {
            data: lp
                .as_vec()
                .into_iter()
                .map(|x| x.to_f32().unwrap_or(f32::NAN))
                .collect(),
            batch: batch.batch,
            len: batch.len,
            vocab: self.config().vocab_size,
        })
    }

    /// Normalised log μ_θ at only the positions `rows[b]` of each sequence b (see
    /// [`Md4Transformer::log_probs_rows`]; the image networks run the full forward and select).
    pub fn log_probs_rows(
        &self,
        batch: &DenoiseBatch<'_>,
        rows: &[Vec<usize>],
    ) -> Result<RowLogProbs, NetworkError> {
        match self {
            Network::Transformer(m) => m.log_probs_rows(batch, rows),
            _ => Ok(RowLogProbs::select(&self.log_probs(batch)?, rows)?),
        }
    }

    /// Write the parameters to a safetensors file (atomically).
    pub fn save_safetensors(&self, path: &Path) -> Result<(), NetworkError> {
        param::save_file(self.params(), path)
    }

    /// Load parameters saved by [`Self::save_safetensors`] from a network of the same
    /// configuration; any missing, extra or mis-shaped tensor is an error.
    pub fn load_safetensors(&mut self, path: &Path) -> Result<(), NetworkError> {
        param::load_file(self.params_mut(), path)
    }
}

/// An image network's input: one whole image (h·w·C tokens) per sequence, t in [0, 1], labels
/// exactly when the network is class-conditional.
fn check_image_input(cfg: &NetworkConfig, batch: &DenoiseBatch<'_>) -> Result<(), NetworkError> {
    let vocab = Vocab::new(cfg.vocab_size).expect("validated config");
    batch.validate(vocab)?;
    if batch.batch == 0 {
        return Err(NetworkError::Input("empty batch".into()));
    }
    if batch.len != cfg.max_len {
        return Err(NetworkError::Input(format!(
            "sequence length {} is not the image's {} tokens",
            batch.len, cfg.max_len
        )));
    }
    if cfg.time_conditioning {
        if let Some(t) = batch
            .t
            .iter()
            .find(|t| !(t.is_finite() && (0.0..=1.0).contains(*t)))
        {
            return Err(NetworkError::Input(format!("time {t} not in [0, 1]")));
        }
    }
    match (cfg.num_classes, batch.labels) {
        (0, None) => Ok(()),
        (0, Some(_)) => Err(NetworkError::Input(
            "labels given to an unconditional model".into(),
        )),
        (k, None) => Err(NetworkError::Input(format!(
            "model needs one of {k} labels per sequence"
        ))),
        (k, Some(l)) => match l.iter().find(|&&c| c as usize >= k) {
            Some(c) => Err(NetworkError::Input(format!("label {c} >= num_classes {k}"))),
            None => Ok(()),
        },
    }
}
