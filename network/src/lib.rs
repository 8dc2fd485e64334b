//! The MD4 denoising network on dfdx and its training machinery — MD4 (Shi et al., NeurIPS
//! 2024), spec §4 (mean parameterisation), §7.1–7.2 (network), §8 (training setup).
//!
//! * [`NetworkConfig`] (serde) with presets `tiny`, `cpu-small`, `md4-s`, `md4-m`
//!   ([`NetworkConfig::preset`]), built by [`NetworkConfig::init`] into an [`Md4Transformer`]
//!   over run-time-shaped tensors, generic over element type ([`Elem`]: f32, f64) and dfdx
//!   device (`Cpu`, or `Cuda` with the `cuda` feature).
//! * [`Kernels`]: the device extension the model runs on — fused CPU kernels (matmul through
//!   gemm 0.19, attention, softmax, LayerNorm, RMSNorm, adaLN modulation, RoPE, GLU, the
//!   U-Net's 3×3 convolution and GroupNorm; and the optimizer's AdamW, EMA and Σ g² passes) with dfdx-generic defaults for other devices. The
//!   CPU kernels read earlier kernels' outputs in place (soundly: through handles registered in
//!   a [`KernelScope`] frame that the forward pass opens; other inputs are copied once), take
//!   their output's gradient out of the gradient store (so those intermediate gradients are not
//!   readable after `backward`; parameters' are) and use a vectorisable f32 exp
//!   ([`fast_exp_f32`], ≤ 2.5e-7 relative error); measurements in `bench/NOTES.md`.
//! * [`tune_allocator`]: glibc allocator tuning for the training step's large buffers, opt-in
//!   (the `maskdiff` binary and the benchmarks call it at the start of `main`; the library
//!   never does).
//! * [`tune_threads`]: the calling (main) thread as worker 0 of rayon's global pool, so the
//!   kernels' parallel loops start inside the pool instead of waking it and sleeping; opt-in
//!   like [`tune_allocator`].
//! * [`CacheLineAlloc`]: a global allocator aligning big blocks to cache lines (AMX tile
//!   loads of unaligned rows are several times slower), opt-in per binary
//! * [`UNet`]: the VDM-style U-Net image denoiser of spec §7.3 (presets `unet-tiny`,
//!   `unet-small`, `unet-cifar10`), with 3×3 convolutions and GroupNorm as [`Kernels`] ops;
//!   [`Network`] holds either network (chosen by [`NetworkConfig::arch`]) for the trainer,
//!   checkpoints and the denoiser.
//! * [`Uvit`]: the U-ViT image denoiser of spec §7.4 (conditional-GroupNorm residual blocks
//!   around a DiT middle; presets `uvit-tiny`, `uvit-small`, `uvit-imagenet64`), also a
//!   [`Network`] variant.
//! * [`NetworkDenoiser`] puts a model behind `maskdiff_process::Denoiser`.
//! * [`tensor_io`]: named flat tensors to and from safetensors bytes.
//!
//! This crate knows nothing of objectives or training: `maskdiff-train` (in `network/train/`)
//! trains these models with any `maskdiff_objective::Objective`.
//!
//! # CUDA
//! `cargo build --release --features cuda` switches on dfdx's CUDA backend; the same code runs
//! with `dfdx::tensor::Cuda` as the device. Building needs `nvcc`, `nvidia-smi` (dfdx's build
//! script queries the compute capability; set `CUDA_COMPUTE_CAP` to override), `include/cuda.h`
//! under `CUDA_ROOT`, and the libraries `libcuda`, `libnvrtc`, `libcublas`, `libcublasLt` at link
//! time; a CUDA toolkit can be installed from PyPI (see `shared/docs/dfdx-notes.md`). Running
//! needs the NVIDIA driver. Without a toolkit, `cargo check -p maskdiff-network --features
//! cuda,dfdx/ci-check` type-checks the CUDA path.

mod alloc;
mod block;
mod block_cache;
mod config;
mod denoiser;
mod elem;
mod error;
mod init;
mod kernels;
mod layers;
mod model;
pub mod modules;
mod network;
mod param;
pub mod precision;
pub mod tensor_io;
mod threads;
pub mod unet;
mod unet_layers;
pub mod uvit;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[doc(hidden)]
pub use alloc::{huge_pages_to_advise, mappings};
pub use alloc::{tune_allocator, CacheLineAlloc};
pub use block::BlockMask;
pub use block_cache::{BlockDenoiser, CacheMode, KvCache};
pub use config::{default_ffn_hidden, Arch, MlpKind, NetworkConfig, PRESETS};
pub use denoiser::NetworkDenoiser;
pub use elem::{fast_exp_f32, Elem};
pub use error::NetworkError;
pub use init::Init;
pub use kernels::{isa, AdamWStep, KernelScope, Kernels, Moments};
pub use layers::{time_embedding, time_frequency, Rope};
pub use model::Md4Transformer;
pub use network::Network;
pub use param::Param;
pub use precision::{set_precision, with_precision, Precision};
pub use threads::tune_threads;
pub use unet::UNet;
pub use uvit::Uvit;

/// Re-exported so that downstream crates name the same dfdx types.
pub use dfdx;
