//! Matrix products with bf16 inputs and f32 accumulation (issue 13, "bf16 mixed precision"):
//! C (m×n) = [C +] bf16(A) (m×k) · bf16(B) (k×n), the operation PyTorch's CPU autocast runs for
//! a linear layer, here with an f32 result.
//!
//! Rounding ([`to_bf16`]) is the x86 `convert_fp32_to_bfloat16` of `vcvtne2ps2bf16`: round to
//! nearest even, subnormals to ±0, NaN quieted. The product of two bf16 values (8-bit
//! significands) is exact in f32, so each multiply-add is an f32 add of an exact product;
//! the k-sum runs pairwise as `vdpbf16ps` does it: for each pair (2p, 2p+1) of the inner
//! dimension, `c += a[2p+1]·b[2p+1]` then `c += a[2p]·b[2p]`, each rounded to nearest even
//! (Intel SDM, VDPBF16PS), starting from C (with `accumulate`) or 0; an odd k is padded with
//! a zero pair element.
//!
//! Two instances of the inner loop, chosen per call from the [`Level`]: the AVX512-BF16
//! microkernel (12 × 32 tile, 24 `vdpbf16ps` accumulators, one broadcast A pair against two
//! packed B vectors), when [`Level::bf16`] proves the CPU has it, and a portable one. Both give
//! the same bits as the scalar reference in the tests whenever no product or partial sum is
//! nonzero and below f32's smallest normal (2⁻¹²⁶) in magnitude (the hardware flushes those to
//! zero; the portable loop keeps them subnormal) — far below anything a network computes.
//!
//! Layout: A is packed into MR-row panels of bf16 pairs (one u32 per row and pair, the even
//! element in the low half), B into NR-column panels (one u32 per column and pair); both packs
//! are made in parallel, then rayon runs tiles of MC rows × NC columns, each sweeping the inner
//! dimension in KC-pair blocks (a B micro-panel of KC·NR·4 = 16 KiB stays in L1 while the
//! tile's MR-row panels run against it). Storing the f32 tile between blocks and loading it
//! again is exact, so the blocking does not change the summation order.

use super::isa::Level;
use rayon::prelude::*;

/// Rows of the microkernel's tile.
const MR: usize = 12;
/// Columns of the microkernel's tile (two AVX-512 vectors of f32).
const NR: usize = 32;
/// Pairs of the inner dimension per block.
const KC: usize = 128;

/// f32 → bf16 bits: round to nearest even; zero and subnormals → ±0 (as the hardware, which
/// treats subnormal inputs as zero); ±∞ kept; NaN stays NaN (quieted).
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    let abs = u & 0x7fff_ffff;
    let rounded = (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16;
    if abs > 0x7f80_0000 {
        ((u >> 16) | 0x40) as u16
    } else if abs < 0x0080_0000 {
        ((u >> 16) & 0x8000) as u16
    } else {
        rounded
    }
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// One bf16 pair (k = 2p even element in the low half, 2p + 1 in the high half).
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    u32::from(to_bf16(even)) | (u32::from(to_bf16(odd)) << 16)
}

/// A strided f32 matrix (element (i, j) at `ptr + i·rs + j·cs`).
#[derive(Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}
// SAFETY: read-only view; the caller of `gemm_bf16` guarantees the memory stays valid and
// unwritten during the call, so sharing it with rayon's workers is a shared read.
unsafe impl Send for Mat {}
// SAFETY: as for `Send`.
unsafe impl Sync for Mat {}

impl Mat {
    /// Element (i, j).
    ///
    /// # Safety
    /// (i, j) inside the matrix the caller of `gemm_bf16` vouched for.
    #[inline(always)]
    unsafe fn at(self, i: usize, j: usize) -> f32 {
        // SAFETY: caller.
        unsafe { *self.ptr.add(i * self.rs + j * self.cs) }
    }
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
// SAFETY: every task writes a disjoint set of C's elements (its own tile).
unsafe impl Send for OutPtr {}
// SAFETY: as for `Send`.
unsafe impl Sync for OutPtr {}

/// C (m×n, element (i, j) at `c + i·c_rs + j·c_cs`) = [C +] bf16(A) · bf16(B), multi-threaded
/// on rayon's pool.
///
/// # Safety
/// `a` must be valid for reads of its m×k strided elements, `b` of its k×n, `c` for reads (with
/// `accumulate`) and writes of its m×n; `c` must not overlap `a` or `b`, and no other thread may
/// access C during the call. Distinct (i, j) must address distinct C elements.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(
    level: Level,
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    (c_rs, c_cs): (usize, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    if m == 0 || n == 0 {
        return;
    }
    let kp = k.div_ceil(2);
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // SAFETY (both packs): the caller guarantees A and B valid for their elements.
    let ap = pack_a(a, m, k, row_panels);
    let bp = pack_b(b, n, k, col_panels);
    // tiles: enough of them to keep every thread busy, at most 8 × 8 panels each
    let threads = rayon::current_num_threads().max(1);
    let cols_per = col_panels.min(8);
    let col_groups = col_panels.div_ceil(cols_per);
    let want = (4 * threads).div_ceil(col_groups);
    let rows_per = row_panels.div_ceil(want).clamp(1, 8);
    let row_groups = row_panels.div_ceil(rows_per);
    let hw = level.bf16().is_some();
    let out = OutPtr(c);
    (0..row_groups * col_groups).into_par_iter().for_each(|t| {
        let (rg, cg) = (t / col_groups, t % col_groups);
        let rows = rg * rows_per..((rg + 1) * rows_per).min(row_panels);
        let cols = cg * cols_per..((cg + 1) * cols_per).min(col_panels);
        for k0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - k0);
            let load = accumulate || k0 > 0;
            for cp in cols.clone() {
                let bpan = &bp[(cp * kp + k0) * NR..][..kc * NR];
                for rp in rows.clone() {
                    let apan = &ap[(rp * kp + k0) * MR..][..kc * MR];
                    let (i0, j0) = (rp * MR, cp * NR);
                    let (mr, nr) = (MR.min(m - i0), NR.min(n - j0));
                    // SAFETY: (i0.., j0..) with mr × nr elements is this task's part of C
                    // (tiles are disjoint); the caller guarantees C valid.
                    let tile = unsafe { out.get().add(i0 * c_rs + j0 * c_cs) };
                    // SAFETY: `hw` only when `level.bf16()` proved AVX512-BF16; tile pointers
                    // as above.
                    unsafe { run_tile(hw, apan, bpan, kc, tile, (c_rs, c_cs), (mr, nr), load) };
                }
            }
        }
    });
}

/// One MR × NR tile of C over `kc` pairs: in place when it is whole and its rows contiguous,
/// through a stack copy otherwise.
///
/// # Safety
/// `tile` valid for the mr × nr strided elements (reads with `load`); with `hw`, the CPU has
/// AVX512-BF16.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn run_tile(
    hw: bool,
    a: &[u32],
    b: &[u32],
    kc: usize,
    tile: *mut f32,
    (rs, cs): (usize, usize),
    (mr, nr): (usize, usize),
    load: bool,
) {
    let micro = |c: *mut f32, ldc: usize, load: bool| {
        #[cfg(target_arch = "x86_64")]
        if hw {
            // SAFETY: the CPU has AVX512-BF16 (caller); c is valid for MR rows of NR
            // contiguous f32 at stride ldc; a, b hold kc pairs of MR and NR.
            return unsafe { avx512bf16::micro(kc, a.as_ptr(), b.as_ptr(), c, ldc, load) };
        }
        let _ = hw;
        // SAFETY: as above.
        unsafe { micro_portable(kc, a, b, c, ldc, load) }
    };
    if mr == MR && nr == NR && cs == 1 {
        micro(tile, rs, load);
        return;
    }
    let mut buf = [0.0f32; MR * NR];
    if load {
        for i in 0..mr {
            for j in 0..nr {
                // SAFETY: (i, j) inside the tile (caller).
                buf[i * NR + j] = unsafe { *tile.add(i * rs + j * cs) };
            }
        }
    }
    micro(buf.as_mut_ptr(), NR, true);
    for i in 0..mr {
        for j in 0..nr {
            // SAFETY: as above.
            unsafe { *tile.add(i * rs + j * cs) = buf[i * NR + j] };
        }
    }
}

/// The portable microkernel: the same pairwise order as `vdpbf16ps`, one lane per column.
///
/// # Safety
/// `c` valid for MR rows of NR contiguous f32 at row stride `ldc` (reads with `load`).
#[inline(always)]
unsafe fn micro_portable(kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, load: bool) {
    let mut acc = [[0.0f32; NR]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: row i of the tile (caller).
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(i * ldc), NR) });
        }
    }
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        let (be, bo): ([f32; NR], [f32; NR]) = (
            std::array::from_fn(|j| from_bf16(bp[j] as u16)),
            std::array::from_fn(|j| from_bf16((bp[j] >> 16) as u16)),
        );
        for (row, &x) in acc.iter_mut().zip(ap) {
            let (xe, xo) = (from_bf16(x as u16), from_bf16((x >> 16) as u16));
            for j in 0..NR {
                // exact products: each add is vdpbf16ps's single rounding
                row[j] += xo * bo[j];
                row[j] += xe * be[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: row i of the tile (caller).
        unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), NR) }.copy_from_slice(row);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512bf16 {
    use super::{MR, NR};
    use std::arch::x86_64::*;

    /// C tile (MR × NR, row stride `ldc`) = [C +] Σ_p A pairs · B pairs with `vdpbf16ps`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and AVX512-BF16; `a` holds kc·MR u32, `b` kc·NR u32, and `c` is
    /// valid for MR rows of NR contiguous f32 at stride `ldc` (reads with `load`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn micro(
        kc: usize,
        a: *const u32,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if load {
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: row i of the tile: NR = 32 contiguous f32 (caller).
                unsafe {
                    row[0] = _mm512_loadu_ps(c.add(i * ldc));
                    row[1] = _mm512_loadu_ps(c.add(i * ldc + 16));
                }
            }
        }
        for p in 0..kc {
            // SAFETY: pair p's NR u32 of B and MR u32 of A are inside the packs (caller).
            unsafe {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + i) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], b0, x);
                    row[1] = _mm512_dpbf16_ps(row[1], b1, x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: as for the loads.
            unsafe {
                _mm512_storeu_ps(c.add(i * ldc), row[0]);
                _mm512_storeu_ps(c.add(i * ldc + 16), row[1]);
            }
        }
    }
}

/// A → row panels: panel r, pair p, row i at `(r·kp + p)·MR + i`; rows past m and the pad
/// element of an odd k are zero.
///
/// # Safety
/// `a` valid for reads of its m × k elements.
unsafe fn pack_a(a: Mat, m: usize, k: usize, panels: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; panels * kp * MR];
    out.par_chunks_mut(kp * MR)
        .enumerate()
        .for_each(|(r, dst)| {
            for i in 0..MR.min(m - r * MR) {
                // SAFETY: row r·MR + i < m, columns < k (caller).
                let at = |j: usize| unsafe { a.at(r * MR + i, j) };
                for p in 0..kp {
                    let odd = if 2 * p + 1 < k { at(2 * p + 1) } else { 0.0 };
                    dst[p * MR + i] = pair(at(2 * p), odd);
                }
            }
        });
    out
}

/// B → column panels: panel c, pair p, column j at `(c·kp + p)·NR + j`; columns past n and the
/// pad element of an odd k are zero.
///
/// # Safety
/// `b` valid for reads of its k × n elements.
unsafe fn pack_b(b: Mat, n: usize, k: usize, panels: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut out = vec![0u32; panels * kp * NR];
    out.par_chunks_mut(kp * NR)
        .enumerate()
        .for_each(|(c, dst)| {
            let cols = NR.min(n - c * NR);
            // SAFETY: rows < k, columns c·NR + j < n (caller).
            let at = |r: usize, j: usize| unsafe { b.at(r, c * NR + j) };
            for (p, d) in dst.chunks_exact_mut(NR).enumerate() {
                for (j, d) in d.iter_mut().enumerate().take(cols) {
                    let odd = if 2 * p + 1 < k { at(2 * p + 1, j) } else { 0.0 };
                    *d = pair(at(2 * p, j), odd);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::super::isa::{self, Isa};
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The scalar reference: inputs rounded to bf16, f32 fused multiply-adds (libm's `fmaf`,
    /// independent of the kernels' add-of-exact-product) in `vdpbf16ps`'s order per pair.
    fn reference(
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        c0: Option<&[f32]>,
    ) -> Vec<f32> {
        let r = |x: f32| from_bf16(to_bf16(x));
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = c0.map_or(0.0, |c0| c0[i * n + j]);
                for p in 0..k.div_ceil(2) {
                    let (ao, bo) = if 2 * p + 1 < k {
                        (r(a[i * k + 2 * p + 1]), r(b[(2 * p + 1) * n + j]))
                    } else {
                        (0.0, 0.0)
                    };
                    acc = ao.mul_add(bo, acc);
                    acc = r(a[i * k + 2 * p]).mul_add(r(b[2 * p * n + j]), acc);
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    fn rand(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-2.0f32..2.0)).collect()
    }

    /// Runs the kernel on row-major A, B (or transposed copies read through swapped strides)
    /// and a row-major C.
    fn run(
        level: Level,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        c0: Option<&[f32]>,
        transposed: bool,
    ) -> Vec<f32> {
        let t = |x: &[f32], r: usize, c: usize| -> Vec<f32> {
            (0..r * c).map(|e| x[(e % r) * c + e / r]).collect()
        };
        let (at, bt) = (t(a, m, k), t(b, k, n));
        let (am, bm) = if transposed {
            (
                Mat {
                    ptr: at.as_ptr(),
                    rs: 1,
                    cs: m,
                },
                Mat {
                    ptr: bt.as_ptr(),
                    rs: 1,
                    cs: k,
                },
            )
        } else {
            (
                Mat {
                    ptr: a.as_ptr(),
                    rs: k,
                    cs: 1,
                },
                Mat {
                    ptr: b.as_ptr(),
                    rs: n,
                    cs: 1,
                },
            )
        };
        let mut c = c0.map_or_else(|| vec![f32::NAN; m * n], <[f32]>::to_vec);
        // SAFETY: A, B, C hold m·k, k·n, m·n elements addressed by the strides above.
        unsafe {
            gemm_bf16(
                level,
                (m, n, k),
                c.as_mut_ptr(),
                (n, 1),
                c0.is_some(),
                am,
                bm,
            )
        };
        c
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every level (the AVX512-BF16 microkernel where the CPU has it, the portable one always)
    /// gives the reference's bits: ragged tiles, odd k, several KC blocks, strided inputs, and
    /// accumulation into C.
    #[test]
    fn bf16_gemm_matches_scalar_reference_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(3);
        let shapes = [
            (1, 1, 1),
            (13, 37, 19),
            (12, 32, 2),
            (50, 70, 301),
            (25, 96, 600),
        ];
        let mut hw_seen = false;
        for (m, n, k) in shapes {
            let (a, b, c0) = (
                rand(&mut rng, m * k),
                rand(&mut rng, k * n),
                rand(&mut rng, m * n),
            );
            for acc in [None, Some(&c0[..])] {
                let want = bits(&reference((m, n, k), &a, &b, acc));
                for level in isa::supported() {
                    hw_seen |= level.bf16().is_some();
                    for tr in [false, true] {
                        let got = bits(&run(level, (m, n, k), &a, &b, acc, tr));
                        assert!(
                            got == want,
                            "{m}x{n}x{k} acc {} transposed {tr} at {:?}",
                            acc.is_some(),
                            level.isa()
                        );
                    }
                }
            }
        }
        assert_eq!(hw_seen, isa::detected_bf16());
    }

    /// The result is the f64 product of the rounded inputs up to f32 accumulation error, and
    /// differs from the f32 product by bf16's input rounding (relative 2⁻⁹ per factor): a
    /// check on the reference itself, independent of the pairing order.
    #[test]
    fn bf16_gemm_is_the_product_of_rounded_inputs() {
        let mut rng = StdRng::seed_from_u64(5);
        let (m, n, k) = (9, 40, 257);
        let (a, b) = (rand(&mut rng, m * k), rand(&mut rng, k * n));
        let level = *isa::supported().last().unwrap();
        let got = run(level, (m, n, k), &a, &b, None, false);
        let r = |x: f32| f64::from(from_bf16(to_bf16(x)));
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut abs, mut f32ref) = (0.0f64, 0.0f64, 0.0f64);
                for p in 0..k {
                    exact += r(a[i * k + p]) * r(b[p * n + j]);
                    abs += (r(a[i * k + p]) * r(b[p * n + j])).abs();
                    f32ref += f64::from(a[i * k + p]) * f64::from(b[p * n + j]);
                }
                let g = f64::from(got[i * n + j]);
                assert!(
                    (g - exact).abs() <= abs * k as f64 * 6e-8,
                    "{i},{j}: {g} vs {exact}"
                );
                assert!((g - f32ref).abs() <= abs * 2.0 * 2f64.powi(-8), "{i},{j}");
            }
        }
    }

    /// Rounding: known values (ties to even, overflow to ∞, subnormals to ±0, NaN quieted), and
    /// where the CPU has it, the hardware's `vcvtne2ps2bf16` on random bit patterns.
    #[test]
    fn to_bf16_rounds_like_the_hardware() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie → even
        assert_eq!(to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie → even
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert_eq!(to_bf16(f32::MAX), 0x7f80);
        assert_eq!(to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(to_bf16(f32::from_bits(0x8000_0001)), 0x8000);
        assert_eq!(to_bf16(f32::from_bits(0x7f80_0001)), 0x7fc0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        #[cfg(target_arch = "x86_64")]
        if isa::detected_bf16() {
            let mut rng = StdRng::seed_from_u64(9);
            for _ in 0..2000 {
                let xs: [f32; 32] = std::array::from_fn(|_| f32::from_bits(rng.gen()));
                // SAFETY: the CPU has AVX512-BF16 (checked above).
                let hw = unsafe { hw_round(&xs) };
                for (x, h) in xs.iter().zip(hw) {
                    assert_eq!(to_bf16(*x), h, "{:#x}", x.to_bits());
                }
            }
        }
        assert!(Isa::ALL.contains(&isa::detected()));
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn hw_round(xs: &[f32; 32]) -> [u16; 32] {
        use std::arch::x86_64::*;
        // SAFETY: 32 f32 in, 32 u16 out; the CPU has the features (caller).
        unsafe {
            let v = _mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(xs.as_ptr().add(16)),
                _mm512_loadu_ps(xs.as_ptr()),
            );
            std::mem::transmute(v)
        }
    }
}
