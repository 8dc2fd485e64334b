//! The matrix-product precision of the CPU kernels (issue 13, bf16 mixed precision): `F32`
//! (the default) or `Bf16`, where every dense layer's product — forward, and both products of
//! its backward pass — and attention's per-head products (S = QKᵀ, O = PV and the four of
//! the backward pass) round their two inputs to bf16 and accumulate in f32
//! (`kernels::bf16`), the arithmetic of PyTorch's CPU autocast for linear layers and batched
//! products (whose outputs are then bf16; here they stay f32). Parameters, gradients, optimizer
//! state and every other op (norms, softmax and its log-sum-exp, the attention mask, the loss)
//! stay f32: the master weights are f32 and only the products' inputs are rounded.
//!
//! The setting is process-wide ([`set_precision`]; the `maskdiff` binary sets it from
//! `--precision` or the config) with a scoped per-thread override for tests and benchmarks
//! ([`with_precision`]). A kernel reads it once per call on the calling thread and keeps it for
//! that op's backward pass. It applies to f32 models on the CPU (f64 and CUDA ignore it). On a
//! CPU without AVX512-BF16 ([`bf16_hardware`]) the bf16 products run a portable loop with the
//! same results, several times slower than f32: the binary falls back to f32 there, with a
//! notice.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// The precision of the matrix products (dense layers and attention).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 inputs and accumulation.
    #[default]
    F32,
    /// Inputs rounded to bf16 (nearest even), f32 accumulation.
    Bf16,
}

impl Precision {
    /// Both values, in the order of their names.
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];

    /// The name `--precision` and the config take.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Parses `f32` or `bf16` (case-insensitive).
    pub fn parse(s: &str) -> Option<Precision> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the bf16 products run on hardware at the kernels' current level: AMX tiles
/// (`tdpbf16ps`, level `amx`) or AVX512-BF16 (`vdpbf16ps`); otherwise they run the portable
/// loop.
pub fn bf16_hardware() -> bool {
    crate::isa::level().bf16().is_some()
}

static PROCESS: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static OVERRIDE: Cell<Option<Precision>> = const { Cell::new(None) };
}

/// Sets the process-wide precision (threads inside [`with_precision`] keep theirs).
pub fn set_precision(p: Precision) {
    PROCESS.store(p as u8, Ordering::Relaxed);
}

/// The precision the kernels called from this thread use.
#[inline]
pub fn precision() -> Precision {
    OVERRIDE.with(Cell::get).unwrap_or_else(|| {
        if PROCESS.load(Ordering::Relaxed) == Precision::Bf16 as u8 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    })
}

/// Runs `f` with the kernels called from this thread at precision `p`; the previous setting is
/// restored afterwards, also when `f` panics.
pub fn with_precision<R>(p: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Precision>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|c| c.replace(Some(p))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_scopes_nest() {
        for p in Precision::ALL {
            assert_eq!(Precision::parse(p.name()), Some(p));
            assert_eq!(Precision::parse(&p.name().to_uppercase()), Some(p));
        }
        assert_eq!(Precision::parse("fp16"), None);
        assert_eq!(Precision::default(), Precision::F32);
        let outer = precision();
        with_precision(Precision::Bf16, || {
            assert_eq!(precision(), Precision::Bf16);
            with_precision(Precision::F32, || assert_eq!(precision(), Precision::F32));
            assert_eq!(precision(), Precision::Bf16);
            // another thread sees the process-wide value, not this thread's override
            let other = std::thread::spawn(precision).join().unwrap();
            assert_eq!(other, Precision::F32);
        });
        assert_eq!(precision(), outer);
    }
}
