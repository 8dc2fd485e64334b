//! Run-time CPU-feature dispatch of the fused CPU kernels' inner loops.
//!
//! The workspace is compiled for the baseline target (x86-64: SSE2 only), so a loop compiled
//! normally runs 4 f32 lanes wide even on a CPU with AVX-512. Each hot inner loop of the fused
//! kernels (one chunk of rows: softmax, norms, the GLU gate, adaLN, RoPE, the optimizer's
//! passes) is therefore written once as an `#[inline(always)]` function and instantiated by
//! `multiversion!` three times: for the baseline, for AVX2+FMA and for AVX-512 (F, BW, VL, DQ);
//! the instance is chosen per call from the [`Isa`] fixed once per process ([`isa`]). A fourth
//! level, [`Isa::Amx`], runs the AVX-512 instances and adds AMX tiles to the bf16 matrix
//! products (`kernels::amx`).
//!
//! Every instance performs the same IEEE operations in the same order: Rust does not contract
//! `a * b + c` into an FMA or reassociate sums unless told to, so the wider instances only
//! change how many lanes run at once, and their results are bit-identical to the portable
//! instance (tested in `kernels::tests`: every fused op's values and gradients at each
//! supported level against the portable instance, bit for bit; the kernel tests that compare
//! against dfdx's generic ops run at every level). Reductions that should vectorise are written with explicit interleaved
//! partial sums (`LANES`), whose order is fixed by the code, not by the ISA.
//!
//! `MASKDIFF_ISA=portable|avx2|avx512|amx` overrides the detected level for the process (for tests
//! and benchmarks; [`with_level`] does it for one thread's calls); a level the CPU lacks is
//! lowered to what it has, with a one-line notice. On other
//! architectures (aarch64: NEON is part of the baseline) the portable instance is the only one.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Interleaved partial sums of the vectorised reductions: one AVX-512 register of f32, two of
/// AVX2, four of SSE2 — the same summation order on every level.
pub(crate) const LANES: usize = 16;

/// An instruction-set level of the fused kernels, ordered by width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The compilation target's baseline (x86-64: SSE2; aarch64: NEON).
    Portable,
    /// x86-64 with AVX2 and FMA (256-bit vectors).
    Avx2,
    /// x86-64 with AVX-512 F, BW, VL and DQ (512-bit vectors).
    Avx512,
    /// [`Isa::Avx512`] plus AMX-TILE, AMX-BF16 and AVX512-BF16, with the OS's permission for
    /// the tile state (Linux): the fused kernels run their AVX-512 instances, the bf16 matrix
    /// products run on AMX tiles (`kernels::amx`). `MASKDIFF_ISA=avx512` switches the tiles off.
    Amx,
}

impl Isa {
    /// Every level, narrowest first.
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx];

    /// The name `MASKDIFF_ISA` takes.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }

    /// Parses a `MASKDIFF_ISA` value.
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Option<Isa> {
        Isa::ALL.get(usize::from(c).checked_sub(1)?).copied()
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The widest level this CPU supports (detected at run time, once per process: the kernels ask
/// per call).
pub fn detected() -> Isa {
    static DETECTED: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *DETECTED.get_or_init(detect)
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            // AVX-512 CPUs all have AVX2 and FMA; checked anyway, the instance enables them.
            if has!("avx2") && has!("fma") {
                // AMX CPUs all have AVX512-BF16 (the packing rounds with it in mind); checked.
                if has!("avx512bf16") && super::amx::usable() {
                    return Isa::Amx;
                }
                return Isa::Avx512;
            }
        }
        if has!("avx2") && has!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Whether this CPU has AVX512-BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`) on top of the
/// [`Isa::Avx512`] level: the bf16 matrix products (`kernels::bf16`) use it through
/// [`Level::bf16`]. (Zen 4, Cooper Lake, Sapphire Rapids and later have it.)
pub fn detected_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if detected() >= Isa::Avx512 {
            return std::arch::is_x86_feature_detected!("avx512bf16");
        }
    }
    false
}

/// Proof that this CPU runs AVX512-BF16 (made only by [`Level::bf16`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bf16Hw(());

/// Proof that this CPU runs AMX-BF16 and the OS granted the tile state (made only by
/// [`Level::amx`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AmxHw(());

/// An [`Isa`] this CPU is known to run: made only here, from [`detected`], so holding one is
/// the proof the dispatched instances rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level(Isa);

impl Level {
    pub fn isa(self) -> Isa {
        self.0
    }

    /// The AVX512-BF16 proof, when this level is [`Isa::Avx512`] or above and the CPU has
    /// AVX512-BF16; a lowered level (`MASKDIFF_ISA=avx2`, [`with_level`]) switches it off, so
    /// the bf16 kernels' portable path is tested and benchmarked the same way as the others.
    pub fn bf16(self) -> Option<Bf16Hw> {
        (self.0 >= Isa::Avx512 && detected_bf16()).then_some(Bf16Hw(()))
    }

    /// The AMX proof, when this level is [`Isa::Amx`] (which [`detected`] returns only after
    /// checking the CPU, XCR0 and the OS permission).
    pub fn amx(self) -> Option<AmxHw> {
        (self.0 == Isa::Amx).then_some(AmxHw(()))
    }
}

/// For the `fma_peak` benchmark only: runs `trips` × 4 AMX `tdpbf16ps` (16 × 16 × 32
/// multiply-adds each, nothing loaded or stored) on this thread and returns the multiply-adds
/// done; `None` where [`detected`] is below [`Isa::Amx`].
#[doc(hidden)]
pub fn amx_spin(trips: u64) -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let hw = Level(detected()).amx()?;
        let tiles = super::amx::Tiles::configure(hw);
        Some(super::amx::spin(&tiles, trips))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = trips;
        None
    }
}

/// The levels this CPU can run, narrowest first (the ones a test compares).
pub fn supported() -> Vec<Level> {
    let top = detected();
    Isa::ALL
        .into_iter()
        .filter(|&i| i <= top)
        .map(Level)
        .collect()
}

static CHOSEN: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static OVERRIDE: Cell<Option<Level>> = const { Cell::new(None) };
}

/// The level the kernels use: inside [`with_level`] on this thread, that level; otherwise the
/// process's: [`detected`], or `MASKDIFF_ISA` lowered to what the CPU supports, fixed at the
/// first call. A kernel reads it once per call, on the calling thread, and hands it to its
/// worker tasks.
#[inline]
pub fn level() -> Level {
    if let Some(l) = OVERRIDE.with(Cell::get) {
        return l;
    }
    Level(match Isa::from_code(CHOSEN.load(Ordering::Relaxed)) {
        Some(i) => i,
        None => choose(),
    })
}

/// Runs `f` with the kernels called from this thread at `level` (tests and benchmarks compare
/// the levels in one process this way); the previous setting is restored afterwards, also when
/// `f` panics.
pub fn with_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Level>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|c| c.replace(Some(level))));
    f()
}

/// The [`Isa`] of [`level`].
pub fn isa() -> Isa {
    level().isa()
}

#[cold]
fn choose() -> Isa {
    let top = detected();
    let pick = match std::env::var("MASKDIFF_ISA") {
        Ok(v) => match Isa::parse(&v) {
            Some(want) if want <= top => want,
            Some(want) => {
                eprintln!(
                    "maskdiff: MASKDIFF_ISA={want} is not supported by this CPU; using {top}"
                );
                top
            }
            None => {
                eprintln!(
                    "maskdiff: MASKDIFF_ISA={v:?} is not one of portable, avx2, avx512, amx; using {top}"
                );
                top
            }
        },
        Err(_) => top,
    };
    // Every thread that races here computes the same value; the first store wins.
    match CHOSEN.compare_exchange(0, pick.code(), Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => pick,
        Err(c) => Isa::from_code(c).unwrap_or(pick),
    }
}

/// Defines `fn $name<E: Elem>(level: Level, args) -> R` running `$body(args)` compiled for
/// `level` (callers pass [`level`], read once per kernel call; tests pass each of
/// [`supported`]). `$body` must be `#[inline(always)]` so that each instance inlines its own
/// copy; only plain argument types are supported (no further generic parameters).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident<$E:ident: Elem>($($arg:ident: $ty:ty),* $(,)?)
        $(-> $ret:ty)? => $body:path) => {
        $(#[$m])*
        $vis fn $name<$E: $crate::Elem>(
            level: $crate::kernels::isa::Level,
            $($arg: $ty),*
        ) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                fn avx512<$E: $crate::Elem>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2<$E: $crate::Elem>($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                match level.isa() {
                    // SAFETY: a `Level` is made only in `isa.rs`, never above `detected()`, which
                    // returns `Avx512` (or `Amx`, above it) only after detecting AVX-512 F, BW,
                    // VL, DQ, AVX2 and FMA.
                    $crate::kernels::isa::Isa::Avx512 | $crate::kernels::isa::Isa::Amx => return unsafe { avx512::<$E>($($arg),*) },
                    // SAFETY: as above; `Avx2` only after detecting AVX2 and FMA.
                    $crate::kernels::isa::Isa::Avx2 => return unsafe { avx2::<$E>($($arg),*) },
                    $crate::kernels::isa::Isa::Portable => {}
                }
            }
            // Elsewhere (aarch64: NEON is baseline) the portable instance is the only one.
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_order_by_width() {
        for i in Isa::ALL {
            assert_eq!(Isa::parse(i.name()), Some(i));
            assert_eq!(Isa::parse(&i.name().to_uppercase()), Some(i));
            assert_eq!(Isa::from_code(i.code()), Some(i));
        }
        assert_eq!(Isa::parse("sse9"), None);
        assert_eq!(Isa::from_code(0), None);
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512 && Isa::Avx512 < Isa::Amx);
    }

    #[test]
    fn chosen_level_is_supported() {
        let s = supported();
        assert_eq!(s[0].isa(), Isa::Portable);
        assert_eq!(s.last().map(|l| l.isa()), Some(detected()));
        assert!(s.contains(&level()));
    }
}
