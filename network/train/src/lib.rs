//! Training of masked diffusion models (spec §8; paper Alg. 1, App. J): a [`Trainer`] generic
//! over the objective (`maskdiff_objective::Objective`: [`Md4`](maskdiff_objective::Md4),
//! [`GenMd4`](maskdiff_objective::GenMd4), or one of your own) that drives the
//! `maskdiff_network` transformer — [`AdamW`] with decoupled weight decay and checkpointable
//! moments, [`LrSchedule`] (linear warm-up, then cosine decay or constant), global-norm clipping
//! on the official bits-per-token scale ([`ClipLoss`]), gradient accumulation over
//! micro-batches, data-parallel training over a [`Collective`] (MPI behind the `mpi` feature,
//! NCCL behind `nccl`; launcher discovery in [`launch`]),
//! [`ema_update`], NaN/Inf detection — and atomic checkpoints
//! ([`Manifest`]) with [`load_model`] for evaluation and sampling.
//!
//! A run, step by step:
//! `Trainer::<_, Md4>::new(net_cfg, train_cfg, seed, &dev)` → `trainer.step(&TrainBatch { .. })`
//! → `trainer.eval_loss(..)` / `trainer.ema_denoiser()` → `trainer.save(dir)`;
//! `Trainer::resume(dir, &net_cfg, &train_cfg, &dev)` continues bit for bit.
//!
//! The model crate knows nothing of objectives or training; this crate is the one place where
//! model and objective meet.

mod adamw;
mod checkpoint;
pub mod collective;
mod config;
mod ema;
mod error;
pub mod launch;
mod lr;
#[cfg(feature = "nccl")]
pub mod nccl;
mod objectives;
mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use checkpoint::{
    load_model, FileEntry, LoadedModel, Manifest, RngState, Weights, FORMAT, FORMAT_VERSION,
    MANIFEST, MIN_FORMAT_VERSION,
};
#[cfg(feature = "mpi")]
pub use collective::Mpi;
pub use collective::{launched_by_mpi, Collective, CommStats, SingleProcess};
pub use config::{ClipLoss, TrainConfig};
pub use ema::{ema_tensors, ema_update};
pub use error::TrainError;
pub use launch::{Launch, Launcher};
pub use lr::{LrKind, LrSchedule};
#[cfg(feature = "nccl")]
pub use nccl::Nccl;
pub use objectives::GenMd4Gradients;
pub use trainer::{global_norm, ModelNet, StepGradients, StepStats, TrainBatch, Trainer};

/// Re-exported so that users name the same crates as the trainer.
pub use maskdiff_network as network;
pub use maskdiff_objective as objective;
