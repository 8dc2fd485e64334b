//! AMX-BF16 tiles for the bf16 matrix products (issue 13, "bf16 mixed precision" on CPUs with
//! AMX: Intel Sapphire Rapids and later): detection, the operating system's permission, the
//! tile configuration and the 32 × 32 microkernel that [`super::bf16`] runs in place of its
//! `vdpbf16ps` one.
//!
//! `tdpbf16ps tmm_c, tmm_a, tmm_b` adds to the 16 × 16 f32 tile C the product of A (16 rows ×
//! 16 bf16 pairs of the inner dimension, one row per 64 bytes) and B (16 pair rows × 16 columns,
//! each element a bf16 pair: the "VNNI" layout the bf16 kernel already packs B in). One
//! instruction is 16·16·32 = 8192 multiply-adds, 16× a `vdpbf16ps` on a 512-bit register; on
//! the Xeon this was written on, `vdpbf16ps` issues at half the rate of an f32 FMA, so without
//! tiles bf16 products are slower than f32 ones.
//!
//! Numerics: products of bf16 values are exact in f32, inputs and outputs below f32's normal
//! range are zero (as `vdpbf16ps`), and the 32 products of a row step are summed at least as
//! accurately as `vdpbf16ps` sums them, but not in an order the Intel SDM pins down: on the
//! Xeon this was written on, the result matched neither pairwise order bit for bit, nor the
//! exact sum rounded once. The tests therefore hold the AMX path to the exact (f64) product of
//! the rounded inputs within f32 accumulation error, and to run-to-run and
//! threading-independent bits; the `vdpbf16ps` and portable paths keep their bit-for-bit
//! reference.
//!
//! Linux grants the tile data state per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`, kernel 5.16+); [`usable`] asks once and reports AMX only when the CPU
//! has AMX-TILE and AMX-BF16, the OS enables their state in XCR0 and the request succeeds.
//! Elsewhere (other OSes) AMX is never used; the module exists on x86-64 only.

use std::arch::asm;

/// Rows and columns of one C tile (16 f32 = 64 bytes per row).
pub(crate) const T: usize = 16;

/// Whether the AMX bf16 path can run in this process (asked once; the first call requests the
/// OS permission).
pub(crate) fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(detect)
}

#[cfg(target_os = "linux")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE; CPUID.1:ECX bit 27 OSXSAVE
    let leaf7 = __cpuid_count(7, 0);
    let osxsave = __cpuid_count(1, 0).ecx & (1 << 27) != 0;
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 || !osxsave {
        return false;
    }
    let (lo, _hi): (u32, u32);
    // SAFETY: `xgetbv` with ECX = 0 reads XCR0; it exists because OSXSAVE is set (checked).
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi, options(nomem, nostack, preserves_flags))
    };
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves and restores the tile state
    if lo & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and touches no memory of
    // ours; it fails cleanly (non-zero) on a kernel that does not know it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    r == 0
}

#[cfg(not(target_os = "linux"))]
fn detect() -> bool {
    false
}

/// The tile configuration (palette 1): tiles 0–3 the 2 × 2 C tiles of the 32 × 32 block,
/// 4–5 the two A tiles (rows 0–15, 16–31), 6–7 the two B tiles (columns 0–15, 16–31); each
/// 16 rows of 64 bytes.
#[repr(C, align(64))]
struct Config {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: Config = Config {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tiles configured on this thread for [`micro`]; released (`tilerelease`, the tile state
/// back to its initial, cheap-to-switch state) when dropped. Made only from an
/// [`super::isa::AmxHw`] proof.
pub(crate) struct Tiles {
    // not Send: the configuration belongs to the thread that loaded it
    _thread: std::marker::PhantomData<*const ()>,
}

impl Tiles {
    /// Loads the tile configuration on the calling thread.
    pub(crate) fn configure(_proof: super::isa::AmxHw) -> Tiles {
        // SAFETY: the proof says the CPU has AMX and the OS granted this process the tile
        // state; CONFIG is a valid 64-byte palette-1 configuration (8 tiles of 16 × 64 B).
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags))
        };
        Tiles {
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure` proved AMX usable.
        unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
    }
}

/// The 32 × 32 f32 block at `c` (row stride `ldc` f32) = [C +] Σ over `kb` steps of 16 pairs:
/// A rows 0–15 from `a0`, rows 16–31 from `a1` (each step one 16 × 16 block of pair u32,
/// contiguous, the next step 256 u32 on), times B from `b` (step t: 16 pair rows of `NR` = 32
/// u32 from `b + 16·t·32`, the two column halves 16 u32 apart).
///
/// # Safety
/// `a0`, `a1` valid for `256·kb` u32 each, `b` for `512·kb` u32, `c` for reads (with `load`)
/// and writes of 32 rows of 32 f32 at stride `ldc`; the tiles configured on this thread.
#[inline]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn micro(
    _tiles: &Tiles,
    kb: usize,
    a0: *const u32,
    a1: *const u32,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    const NR: usize = 2 * T;
    let cs = ldc * 4;
    // SAFETY (every block): the tiles are configured (`_tiles`); every tile row read or written
    // lies inside the ranges the caller guarantees (A: 16 rows of 64 B at stride 64 per step;
    // B: 16 rows of 64 B at stride 128 per step; C: 16 rows of 64 B at stride 4·ldc per tile).
    unsafe {
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {s}*1]",
                "tileloadd tmm1, [{c1} + {s}*1]",
                "tileloadd tmm2, [{c2} + {s}*1]",
                "tileloadd tmm3, [{c3} + {s}*1]",
                c0 = in(reg) c,
                c1 = in(reg) c.add(T),
                c2 = in(reg) c.add(T * ldc),
                c3 = in(reg) c.add(T * ldc + T),
                s = in(reg) cs,
                options(nostack, readonly, preserves_flags),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem, preserves_flags),
            );
        }
        // Software-pipelined: step t + 1's tiles are loaded as soon as step t's last product
        // reading that tile register has issued (tiles are not renamed), so loads overlap the
        // products (in a loop of tile steps alone, on the Xeon this was written on, ≈ 8 % more
        // products per second than loading all four first; within noise in whole products,
        // which the conversions bound). Each C tile still takes the steps in the same order.
        let (s64, s128) = (64usize, NR * 4);
        if kb > 0 {
            asm!(
                "tileloadd tmm4, [{a0} + {s64}*1]",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tileloadd tmm6, [{b0} + {s128}*1]",
                "tileloadd tmm7, [{b1} + {s128}*1]",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b,
                b1 = in(reg) b.add(T),
                s64 = in(reg) s64,
                s128 = in(reg) s128,
                options(nostack, readonly, preserves_flags),
            );
        }
        for t in 1..kb {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b0} + {s128}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a0} + {s64}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm5, [{a1} + {s64}*1]",
                "tileloadd tmm7, [{b1} + {s128}*1]",
                a0 = in(reg) a0.add(t * T * T),
                a1 = in(reg) a1.add(t * T * T),
                b0 = in(reg) b.add(t * T * NR),
                b1 = in(reg) b.add(t * T * NR + T),
                s64 = in(reg) s64,
                s128 = in(reg) s128,
                options(nostack, readonly, preserves_flags),
            );
        }
        if kb > 0 {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem, preserves_flags),
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(T),
            c2 = in(reg) c.add(T * ldc),
            c3 = in(reg) c.add(T * ldc + T),
            s = in(reg) cs,
            options(nostack, preserves_flags),
        );
    }
}

/// One step of [`micro_steps`]: A rows 0–15 from `a` (row stride `lda` bytes), rows 16–31
/// from `a + 16·lda`; B pair rows 0–15 from `b` (row stride `ldb` bytes), columns 0–15 from
/// there and 16–31 from `b + 64`.
#[derive(Clone, Copy)]
pub(crate) struct Step {
    pub(crate) a: *const u8,
    pub(crate) b: *const u8,
}

/// The 32 × 32 f32 block at `c` (row stride `ldc` f32) = Σ over `steps` of A·B, each step's
/// operands read in place at the strides given (the direct convolution's A rows are rows of its
/// padded input, shifted per tap; see `kernels::conv_amx`). The same software pipelining as
/// [`micro`].
///
/// # Safety
/// For every step: A's 32 rows of 64 bytes (`a + r·lda`) and B's 16 rows of 128 bytes
/// (`b + r·ldb`) readable; `c` writable for 32 rows of 32 f32 at stride `ldc`; the tiles
/// configured on this thread.
#[inline]
pub(crate) unsafe fn micro_steps(
    _tiles: &Tiles,
    steps: &[Step],
    (lda, ldb): (usize, usize),
    c: *mut f32,
    ldc: usize,
) {
    let cs = ldc * 4;
    // SAFETY (every block): the tiles are configured (`_tiles`); every tile row read or written
    // lies inside the ranges the caller guarantees.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem, preserves_flags),
        );
        if let Some(first) = steps.first() {
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                a0 = in(reg) first.a,
                a1 = in(reg) first.a.add(T * lda),
                b0 = in(reg) first.b,
                b1 = in(reg) first.b.add(64),
                sa = in(reg) lda,
                sb = in(reg) ldb,
                options(nostack, readonly, preserves_flags),
            );
        }
        for st in steps.iter().skip(1) {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                a0 = in(reg) st.a,
                a1 = in(reg) st.a.add(T * lda),
                b0 = in(reg) st.b,
                b1 = in(reg) st.b.add(64),
                sa = in(reg) lda,
                sb = in(reg) ldb,
                options(nostack, readonly, preserves_flags),
            );
        }
        if !steps.is_empty() {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem, preserves_flags),
            );
        }
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(T),
            c2 = in(reg) c.add(T * ldc),
            c3 = in(reg) c.add(T * ldc + T),
            s = in(reg) cs,
            options(nostack, preserves_flags),
        );
    }
}

/// `trips` × 4 `tdpbf16ps` on the configured (zeroed) tiles, nothing loaded or stored: the
/// tiles' arithmetic peak, for the `fma_peak` benchmark. Returns the multiply-adds done.
pub(crate) fn spin(_tiles: &Tiles, trips: u64) -> u64 {
    for _ in 0..trips {
        // SAFETY: the tiles are configured on this thread (`_tiles`); register-only.
        unsafe {
            asm!(
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                options(nostack, nomem, preserves_flags),
            )
        };
    }
    trips * 4 * (T * T * 2 * T) as u64
}
