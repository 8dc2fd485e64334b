//! Training machinery for the MD4 network (spec §8; paper Alg. 1, App. J): [`AdamW`] with
//! decoupled weight decay and checkpointable moments, [`LrSchedule`] (linear warm-up, cosine
//! decay), global-norm clipping, gradient accumulation, [`ema_update`], the pluggable
//! [`Objective`] (MD4, or GenMD4 with learnable per-token exponents: [`GenMd4State`]),
//! NaN/Inf detection, and atomic checkpoints ([`Manifest`]).
//!
//! The CLI drives a run step by step:
//! `Trainer::new(net_cfg, train_cfg, seed, &dev)` → `trainer.step(&TrainBatch { .. })` →
//! `trainer.eval_loss(..)` / `trainer.ema_denoiser()` → `trainer.save(dir)`;
//! `Trainer::resume(dir, &net_cfg, &train_cfg, &dev)` continues bit for bit.

mod adamw;
mod checkpoint;
mod config;
mod ema;
mod genmd4;
mod lr;
mod objective;
mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use checkpoint::{FileEntry, Manifest, RngState, FORMAT, FORMAT_VERSION, MANIFEST};
pub use config::TrainConfig;
pub use ema::ema_update;
pub use genmd4::{GenMd4Gradients, GenMd4State, GenMd4StepInfo, THETA_NAME};
pub use lr::LrSchedule;
pub use objective::Objective;
pub use trainer::{global_norm, StepStats, TrainBatch, Trainer};
