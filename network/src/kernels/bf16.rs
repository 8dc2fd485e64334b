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
//! Layout: A is converted once into bf16 pairs (one u32 per row and pair, the even element in
//! the low half), row by row when its inner dimension is contiguous (a straight conversion
//! pass, no transpose) or pair row by pair row when it is not (dW = Xᵀ dY: rows 2p and 2p + 1
//! of X interleaved); the microkernel reads either through strides. B is packed into NR-column
//! panels (one u32 per column and pair; a B whose inner dimension is contiguous, as Wᵀ or Kᵀ,
//! is converted column by column in vectorised chunks and stored down the panel). The buffers
//! are reused per calling thread (no zeroing or page faults per call), the conversions run in
//! parallel, then rayon runs tiles of up to
//! 8 × 8 microkernel tiles, each sweeping the inner dimension in KC-pair blocks (a B
//! micro-panel of KC·NR·4 = 16 KiB stays in L1 while the tile's rows run against it). Storing
//! the f32 tile between blocks and loading it again is exact, so the blocking does not change
//! the summation order.
//!
//! A third instance, at [`Level::amx`] ([`gemm_amx`], `kernels::amx`): 32 × 32 blocks of C on
//! AMX tiles, A in 16 × 16 pair blocks, B in the same panels with its pairs padded to 16, tasks
//! along C's longer side. The tiles sum a row step's products in an order of their own, so
//! that path is tested against the exact product within f32 accumulation error instead of the
//! scalar reference's bits. Every packing buffer starts on a cache line ([`Packed`]).

#[cfg(target_arch = "x86_64")]
use super::amx;
use super::isa::{Bf16Hw, Level};
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

/// `from_bf16(to_bf16(x))` — x rounded to bf16 and back — as selects without branches, so a
/// loop over it vectorises (the same bits; tested against the composition).
#[inline(always)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    let u = x.to_bits();
    let abs = u & 0x7fff_ffff;
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) & 0xffff_0000;
    let nan = (u & 0xffff_0000) | 0x0040_0000;
    let tiny = u & 0x8000_0000;
    let v = if abs > 0x7f80_0000 { nan } else { rounded };
    f32::from_bits(if abs < 0x0080_0000 { tiny } else { v })
}

/// bf16 bits → f32 (exact).
#[inline(always)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// One bf16 pair (k = 2p even element in the low half, 2p + 1 in the high half).
#[inline(always)]
pub(crate) fn pair(even: f32, odd: f32) -> u32 {
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

pub(super) use super::disjoint::Out;

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
    dims: (usize, usize, usize),
    c: *mut f32,
    c_st: (usize, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    // SAFETY: the caller's.
    unsafe { gemm_bf16_on(level, true, dims, c, c_st, accumulate, a, b) }
}

/// [`gemm_bf16`] on the calling thread only (no rayon tasks): for callers that already run one
/// task per small product (attention, per (sequence, head)). Same results, bit for bit: the
/// tiles and the k blocks are the same, only who runs them differs. The packed operands go to
/// the calling thread's scratch, as for [`gemm_bf16`], so a rayon worker reuses its own.
///
/// # Safety
/// As for [`gemm_bf16`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16_serial(
    level: Level,
    dims: (usize, usize, usize),
    c: *mut f32,
    c_st: (usize, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    // SAFETY: the caller's.
    unsafe { gemm_bf16_on(level, false, dims, c, c_st, accumulate, a, b) }
}

/// Runs `f(index, chunk)` over `size`-long chunks of `buf`: as rayon tasks when `par`, in order
/// on this thread otherwise.
fn chunks_each<T: Send>(
    par: bool,
    buf: &mut [T],
    size: usize,
    f: impl Fn(usize, &mut [T]) + Send + Sync,
) {
    if par {
        buf.par_chunks_mut(size)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        buf.chunks_mut(size).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// [`gemm_bf16`] with the parallelism chosen by `par`.
///
/// # Safety
/// As for [`gemm_bf16`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_bf16_on(
    level: Level,
    par: bool,
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
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: (i, j) inside C (caller).
                    unsafe { *c.add(i * c_rs + j * c_cs) = 0.0 };
                }
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(hw) = level.amx() {
        // SAFETY: the caller's.
        return unsafe { gemm_amx(hw, level, par, (m, n, k), c, (c_rs, c_cs), accumulate, a, b) };
    }
    let kp = k.div_ceil(2);
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (mut ap, mut bp, tmp) = SCRATCH.with(|s| s.take());
    // SAFETY (both packs): the caller guarantees A and B valid for their elements.
    let (a_rs, a_ps) = unsafe { convert_a(level, par, a, m, k, row_panels * MR, &mut ap) };
    let pb = Panels {
        ptr: b.ptr,
        ws: b.cs,
        ks: b.rs,
    };
    // SAFETY: as above.
    unsafe { pack::<NR>(level, par, pb, n, k, kp, &mut bp) };
    let (rows_per, cols_per, row_groups, col_groups) = task_grid(par, row_panels, col_panels);
    let hw = level.bf16().is_some();
    let out = Out(c);
    let tile_task = |t: usize| {
        let (rg, cg) = (t / col_groups, t % col_groups);
        let rows = rg * rows_per..((rg + 1) * rows_per).min(row_panels);
        let cols = cg * cols_per..((cg + 1) * cols_per).min(col_panels);
        for k0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - k0);
            let load = accumulate || k0 > 0;
            for cp in cols.clone() {
                let bpan = &bp[(cp * kp + k0) * NR..][..kc * NR];
                for rp in rows.clone() {
                    // pairs k0.. of rows rp·MR.. (the buffer holds every row of the last panel)
                    let apan = &ap[rp * MR * a_rs + k0 * a_ps..];
                    let (i0, j0) = (rp * MR, cp * NR);
                    let (mr, nr) = (MR.min(m - i0), NR.min(n - j0));
                    // SAFETY: (i0.., j0..) with mr × nr elements is this task's part of C
                    // (tiles are disjoint); the caller guarantees C valid.
                    let tile = unsafe { out.get().add(i0 * c_rs + j0 * c_cs) };
                    // SAFETY: `hw` only when `level.bf16()` proved AVX512-BF16; tile pointers
                    // as above.
                    unsafe {
                        run_tile(
                            hw,
                            (apan, a_rs, a_ps),
                            bpan,
                            kc,
                            tile,
                            (c_rs, c_cs),
                            (mr, nr),
                            load,
                        )
                    };
                }
            }
        }
    };
    if par {
        (0..row_groups * col_groups)
            .into_par_iter()
            .for_each(tile_task);
    } else {
        (0..row_groups * col_groups).for_each(tile_task);
    }
    SCRATCH.with(|s| s.set((ap, bp, tmp)));
}

/// Rows (and columns) of the AMX block: 2 × 2 tiles of 16 × 16.
#[cfg(target_arch = "x86_64")]
const AM: usize = 2 * amx::T;
/// Pairs per block of the inner dimension on AMX: C is loaded and stored once per block, and a
/// tile step moves 4 KiB for 4 products, so longer blocks than [`KC`] pay (train step ≈ 3 %
/// faster at 512 than at 128 in two alternations on the Xeon this was written on; 256, 384 and
/// 1024 no better than 512 within its noise).
#[cfg(target_arch = "x86_64")]
const KC_AMX: usize = 512;

/// [`gemm_bf16_on`] on AMX tiles: A converted into 16-row groups of 16 × 16 pair blocks (one
/// tile load each, contiguous, so no cache-set aliasing from long rows), B packed as for the
/// `vdpbf16ps` kernel with its pairs padded to a multiple of 16, then 32 × 32 blocks of C over
/// [`KC_AMX`]-pair blocks, tasks cut along C's longer side (below).
///
/// # Safety
/// As for [`gemm_bf16`]; k > 0.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_amx(
    hw: super::isa::AmxHw,
    level: Level,
    par: bool,
    (m, n, k): (usize, usize, usize),
    c: *mut f32,
    (c_rs, c_cs): (usize, usize),
    accumulate: bool,
    a: Mat,
    b: Mat,
) {
    let kst = k.div_ceil(2).div_ceil(amx::T) * amx::T;
    let (row_panels, col_panels) = (m.div_ceil(AM), n.div_ceil(NR));
    let (mut ap, mut bp, mut tmp) = SCRATCH.with(|s| s.take());
    // Tasks split C's rows (below) and A is row-major: each task converts its own rows of A
    // into its thread's buffer, read back from L2 by its tiles, instead of one conversion pass
    // writing all of A to memory first (the same values).
    let split_rows = row_panels >= col_panels;
    let local_a = split_rows && a.cs == 1;
    if !local_a {
        // SAFETY: the caller guarantees A valid for its elements.
        unsafe { convert_a_amx(level, par, a, m, k, kst, row_panels * AM, &mut ap, &mut tmp) };
    }
    let pb = Panels {
        ptr: b.ptr,
        ws: b.cs,
        ks: b.rs,
    };
    // SAFETY: as above.
    unsafe { pack::<NR>(level, par, pb, n, k, kst, &mut bp) };
    // Tasks: the longer side of C (in blocks) cut into 2 parts per thread, the other side
    // whole, so each packed operand is streamed from memory about once per task (the
    // `vdpbf16ps` kernel's finer grid re-read the whole of B per row group, which the tiles'
    // speed turns into the bottleneck). Inside a task, rows go in runs of RB blocks: the run's
    // A (RB·KC_AMX·128 B = 512 KiB) stays in L2 while every B panel of the task passes it.
    const RB: usize = 8;
    let threads = if par {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let long = if split_rows { row_panels } else { col_panels };
    let per = long.div_ceil((2 * threads).min(long));
    let parts = long.div_ceil(per);
    let group = kst * amx::T; // one 16-row group of A
    let out = Out(c);
    let a = &a; // the closure captures the whole `Mat` (Sync), not its raw pointer field
    let hw16 = level.bf16();
    let tile_task = |t: usize| {
        let tiles = amx::Tiles::configure(hw);
        let part = t * per..((t + 1) * per).min(long);
        let (rows, cols) = if split_rows {
            (part, 0..col_panels)
        } else {
            (0..row_panels, part)
        };
        // this task's A: its own groups (local_a), else the shared conversion
        let mut mine = AmxA(AMX_A.with(|b| b.take()));
        let (ap, rp0): (&[u32], usize) = if local_a {
            let buf = mine.0.grow(rows.len() * AM * kst);
            for (i, dst) in buf.chunks_exact_mut(group).enumerate() {
                // SAFETY: A is row-major (a.cs = 1) with m rows of k elements (caller).
                unsafe { fill_rows_group(hw16, a, (m, k), 2 * rows.start + i, dst) };
            }
            (buf, rows.start)
        } else {
            (&ap, 0)
        };
        for k0 in (0..kst).step_by(KC_AMX) {
            let kc = KC_AMX.min(kst - k0);
            let load = accumulate || k0 > 0;
            for run in rows.clone().step_by(RB) {
                let run = run..(run + RB).min(rows.end);
                for cp in cols.clone() {
                    let bpan = &bp[(cp * kst + k0) * NR..][..kc * NR];
                    for rp in run.clone() {
                        let g0 = 2 * (rp - rp0);
                        let a0 = &ap[g0 * group + k0 * amx::T..][..kc * amx::T];
                        let a1 = &ap[(g0 + 1) * group + k0 * amx::T..][..kc * amx::T];
                        let (i0, j0) = (rp * AM, cp * NR);
                        let (mr, nr) = (AM.min(m - i0), NR.min(n - j0));
                        let kb = kc / amx::T;
                        // SAFETY: a0, a1 hold kb blocks of 256 u32, bpan kb·512 u32 (sliced
                        // above); the tiles are configured on this thread.
                        let micro = |cc: *mut f32, ldc: usize, load: bool| unsafe {
                            amx::micro(
                                &tiles,
                                kb,
                                a0.as_ptr(),
                                a1.as_ptr(),
                                bpan.as_ptr(),
                                cc,
                                ldc,
                                load,
                            )
                        };
                        // SAFETY: (i0.., j0..) with mr × nr elements is this task's part of C
                        // (tiles are disjoint); the caller guarantees C valid. In place when
                        // whole (fastest when C starts on a cache line: `CacheLineAlloc`), else
                        // through an aligned copy.
                        unsafe {
                            let tile = out.get().add(i0 * c_rs + j0 * c_cs);
                            on_tile(tile, (c_rs, c_cs), (mr, nr), load, AM, micro)
                        };
                    }
                }
            }
        }
    };
    if par {
        (0..parts).into_par_iter().for_each(tile_task);
    } else {
        (0..parts).for_each(tile_task);
    }
    SCRATCH.with(|s| s.set((ap, bp, tmp)));
}

/// The task grid over `row_panels` × `col_panels` microkernel tiles: enough tasks to keep every
/// thread busy, at most 8 × 8 tiles each. Returns (rows per task, columns per task, row
/// groups, column groups).
fn task_grid(par: bool, row_panels: usize, col_panels: usize) -> (usize, usize, usize, usize) {
    let threads = if par {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    let cols_per = col_panels.min(8);
    let col_groups = col_panels.div_ceil(cols_per);
    let want = (4 * threads).div_ceil(col_groups);
    let rows_per = row_panels.div_ceil(want).clamp(1, 8);
    let row_groups = row_panels.div_ceil(rows_per);
    (rows_per, cols_per, row_groups, col_groups)
}

/// A (m × k) converted for [`gemm_amx`] into `buf`: `rows / 16` groups of 16 rows (rows m..rows
/// zero), each `kst / 16` blocks of 16 rows × 16 pairs, row-major inside the block (pair p of
/// row i of group g at `(g·kst/16 + p/16)·256 + i·16 + p % 16`; pairs kp..kst zero). With k
/// contiguous in A each row is converted straight into its blocks; with A's rows contiguous
/// (dW = Xᵀ dY: X read row by row, in order) 32 rows of X at a time become 16 pair rows in
/// `tmp`, scattered as one transposed 16 × 16 block into every group; otherwise each group is
/// packed as a 16-wide panel into `tmp` and its blocks transposed.
///
/// # Safety
/// `a` valid for reads of its m × k elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn convert_a_amx(
    level: Level,
    par: bool,
    a: Mat,
    m: usize,
    k: usize,
    kst: usize,
    rows: usize,
    buf: &mut Packed,
    tmp: &mut Vec<u32>,
) {
    const G: usize = amx::T;
    let kp = k.div_ceil(2);
    let buf = buf.grow(rows * kst);
    let x = Panels {
        ptr: a.ptr,
        ws: a.rs,
        ks: a.cs,
    };
    let a = &a; // closures capture the whole `Mat` (Sync), not its raw pointer field
    let hw = level.bf16();
    if a.cs != 1 && a.rs == 1 {
        let (groups, kbs) = (rows / G, kst / G);
        let out = Out(buf.as_mut_ptr());
        let chunk = |kb: usize, t: &mut Vec<u32>| {
            if t.len() < G * rows {
                t.resize(G * rows, 0);
            }
            let t = &mut t[..G * rows];
            for (q, d) in t.chunks_exact_mut(rows).enumerate() {
                // SAFETY: Aᵀ's k rows hold m contiguous elements each (caller).
                unsafe { pair_row(hw, (a.ptr, a.cs), m, k, kb * G + q, d) };
            }
            for g in 0..groups {
                // SAFETY: block (g, kb) lies inside `buf` (rows·kst u32) and only the task of
                // chunk kb writes it.
                let blk = unsafe {
                    std::slice::from_raw_parts_mut(out.get().add((g * kbs + kb) * G * G), G * G)
                };
                transpose16(hw, &t[g * G..], rows, blk);
            }
        };
        if par {
            (0..kbs).into_par_iter().for_each_init(
                || TmpGuard(AMX_TMP.with(|t| t.take())),
                |t, kb| chunk(kb, &mut t.0),
            );
        } else {
            for kb in 0..kbs {
                chunk(kb, tmp);
            }
        }
        return;
    }
    let fill_group = |g: usize, dst: &mut [u32], tmp: &mut Vec<u32>| {
        let r0 = g * G;
        if r0 >= m {
            dst.fill(0);
            return;
        }
        let width = G.min(m - r0);
        if tmp.len() < kst * G {
            tmp.resize(kst * G, 0);
        }
        if a.cs == 1 {
            // SAFETY: A is row-major with m rows of k elements (caller).
            unsafe { fill_rows_group(hw, a, (m, k), g, dst) };
        } else {
            let pan = &mut tmp[..kst * G];
            // SAFETY: rows r0 .. r0 + width of A (caller).
            unsafe { pack_panel::<G>(level, x.at_row(r0), width, k, &mut pan[..kp * G]) };
            pan[kp * G..].fill(0);
            for (blk, src) in dst.chunks_exact_mut(G * G).zip(pan.chunks_exact(G * G)) {
                // src: pair q's 16 rows at q·16; blk: row w's 16 pairs at w·16
                for q in 0..G {
                    for w in 0..G {
                        blk[w * G + q] = src[q * G + w];
                    }
                }
            }
        }
    };
    if par {
        buf.par_chunks_mut(kst * G).enumerate().for_each_init(
            || TmpGuard(AMX_TMP.with(|t| t.take())),
            |t, (g, dst)| fill_group(g, dst, &mut t.0),
        );
    } else {
        for (g, dst) in buf.chunks_mut(kst * G).enumerate() {
            fill_group(g, dst, tmp);
        }
    }
}

/// Group g (rows 16g..16g + 16) of a row-major A (m × k, row stride a.rs) in [`gemm_amx`]'s
/// layout: `dst` (kst·16 u32) holds kst/16 blocks of 16 rows × 16 pairs; rows past m and pairs
/// past ⌈k/2⌉ zero.
///
/// # Safety
/// A's rows 0..m hold k contiguous elements each at `a.ptr + r·a.rs` (a.cs = 1).
#[cfg(target_arch = "x86_64")]
unsafe fn fill_rows_group(
    hw: Option<Bf16Hw>,
    a: &Mat,
    (m, k): (usize, usize),
    g: usize,
    dst: &mut [u32],
) {
    const G: usize = amx::T;
    let r0 = g * G;
    for w in 0..G {
        if r0 + w < m {
            // SAFETY: row r0 + w < m of A, k contiguous elements (caller).
            let row = unsafe { std::slice::from_raw_parts(a.ptr.add((r0 + w) * a.rs), k) };
            cvt_row_blocked(hw, row, dst, w);
        } else {
            for blk in dst.chunks_exact_mut(G * G) {
                blk[w * G..][..G].fill(0);
            }
        }
    }
}

/// A worker's [`AMX_A`], put back when its tile task is done.
#[cfg(target_arch = "x86_64")]
struct AmxA(Packed);
#[cfg(target_arch = "x86_64")]
impl Drop for AmxA {
    fn drop(&mut self) {
        let v = std::mem::replace(&mut self.0, Packed::new());
        AMX_A.with(|b| b.set(v));
    }
}

/// `dst[w·16 + q] = src[q·stride + w]` for q, w < 16: a 16 × 16 block of u32 transposed (with
/// AVX-512, 64 shuffles instead of 256 scalar moves; the same values).
#[cfg(target_arch = "x86_64")]
fn transpose16(hw: Option<Bf16Hw>, src: &[u32], stride: usize, dst: &mut [u32]) {
    assert!(dst.len() >= 256);
    // SAFETY: dst holds 16 rows of 16 at stride 16 (checked).
    unsafe { transpose16_to(hw, src, stride, dst.as_mut_ptr(), 16) }
}

/// `*dst.add(w·ds + q) = src[q·stride + w]` for q, w < 16: [`transpose16`] into rows `ds`
/// apart, written without being read (the destination may be uninitialised).
///
/// # Safety
/// `dst` valid for writes of 16 rows of 16 u32 at stride `ds`.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn transpose16_to(
    hw: Option<Bf16Hw>,
    src: &[u32],
    stride: usize,
    dst: *mut u32,
    ds: usize,
) {
    assert!(stride >= 16 && ds >= 16 && src.len() >= 15 * stride + 16);
    if let Some(hw) = hw {
        // SAFETY: AVX512-BF16 implies AVX-512 F; the 16 rows of 16 u32 lie inside `src`
        // (checked above), the 16 rows of `dst` are the caller's.
        return unsafe { avx512bf16::transpose16(hw, src.as_ptr(), stride, dst, ds) };
    }
    for w in 0..16 {
        for q in 0..16 {
            // SAFETY: w·ds + q < 15·ds + 16 (the caller's rows).
            unsafe { dst.add(w * ds + q).write(src[q * stride + w]) };
        }
    }
}

/// Row w of a 16-row group of the AMX A layout from one row of A (k contiguous): pair p goes to
/// `dst[(p/16)·256 + w·16 + p % 16]`, pairs from ⌈k/2⌉ to the end of the group zero.
#[cfg(target_arch = "x86_64")]
fn cvt_row_blocked(hw: Option<Bf16Hw>, row: &[f32], dst: &mut [u32], w: usize) {
    const G: usize = amx::T;
    assert!(w < G && dst.len().is_multiple_of(G * G) && dst.len() / G >= row.len().div_ceil(2));
    let mut done = 0; // pairs written
    if let Some(hw) = hw {
        // SAFETY: the proof says the CPU has AVX512-BF16; whole 16-pair chunks of `row` go to
        // their blocks' row w, inside `dst` (checked above).
        done = unsafe { avx512bf16::cvt_row_blocked(hw, row, dst, w) };
    }
    for (kb, blk) in dst.chunks_exact_mut(G * G).enumerate().skip(done / G) {
        for (q, d) in blk[w * G..][..G].iter_mut().enumerate() {
            let p = kb * G + q;
            *d = match (row.get(2 * p), row.get(2 * p + 1)) {
                (Some(&e), Some(&o)) => pair(e, o),
                (Some(&e), None) => pair(e, 0.0),
                _ => 0,
            };
        }
    }
}

/// A rayon worker's [`AMX_TMP`], put back when its part of the conversion is done.
#[cfg(target_arch = "x86_64")]
struct TmpGuard(Vec<u32>);
#[cfg(target_arch = "x86_64")]
impl Drop for TmpGuard {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        AMX_TMP.with(|t| t.set(v));
    }
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
    (a, a_rs, a_ps): (&[u32], usize, usize),
    b: &[u32],
    kc: usize,
    tile: *mut f32,
    (rs, cs): (usize, usize),
    (mr, nr): (usize, usize),
    load: bool,
) {
    debug_assert!(a.len() > (MR - 1) * a_rs + (kc - 1) * a_ps && b.len() >= kc * NR);
    let micro = |c: *mut f32, ldc: usize, load: bool| {
        #[cfg(target_arch = "x86_64")]
        if hw {
            // SAFETY: the CPU has AVX512-BF16 (caller); c is valid for MR rows of NR
            // contiguous f32 at stride ldc; a, b hold kc pairs of MR and NR.
            return unsafe {
                avx512bf16::micro(kc, (a.as_ptr(), a_rs, a_ps), b.as_ptr(), c, ldc, load)
            };
        }
        let _ = hw;
        // SAFETY: as above.
        unsafe { micro_portable(kc, (a, a_rs, a_ps), b, c, ldc, load) }
    };
    // SAFETY: the tile is the caller's.
    unsafe { on_tile(tile, (rs, cs), (mr, nr), load, MR, micro) }
}

/// Runs `micro(c, ldc, load)` on the mr × nr tile of C at `tile` (strides rs, cs): in place
/// when it is whole (`rows` rows of NR, `micro`'s block) with contiguous rows, else on a block
/// on the stack (row stride NR; zeroed only on this path), filled from the tile first with
/// `load` and written back after. The copies are exact, so both ways give the same bits.
///
/// # Safety
/// `tile` valid for the mr × nr strided elements (reads with `load`), which nothing else
/// accesses during the call; `micro` valid for a whole tile at the pointer it is given.
#[inline(always)]
unsafe fn on_tile(
    tile: *mut f32,
    (rs, cs): (usize, usize),
    (mr, nr): (usize, usize),
    load: bool,
    rows: usize,
    micro: impl Fn(*mut f32, usize, bool),
) {
    if mr == rows && nr == NR && cs == 1 {
        micro(tile, rs, load);
        return;
    }
    assert!(rows <= 32 && mr <= rows && nr <= NR);
    let mut block = Block([0.0; 32 * NR]);
    let buf = &mut block.0[..rows * NR];
    // SAFETY (every `at`): (i, j) with i < mr, j < nr lies inside the tile (caller).
    let at = |i: usize, j: usize| unsafe { tile.add(i * rs + j * cs) };
    for (i, row) in buf
        .chunks_exact_mut(NR)
        .take(mr)
        .enumerate()
        .filter(|_| load)
    {
        if cs == 1 {
            // SAFETY: row i's nr contiguous elements.
            row[..nr].copy_from_slice(unsafe { std::slice::from_raw_parts(at(i, 0), nr) });
        } else {
            for (j, d) in row[..nr].iter_mut().enumerate() {
                // SAFETY: see `at`.
                *d = unsafe { *at(i, j) };
            }
        }
    }
    micro(buf.as_mut_ptr(), NR, load);
    for (i, row) in buf.chunks_exact(NR).take(mr).enumerate() {
        if cs == 1 {
            // SAFETY: as above; nothing else accesses the tile.
            unsafe { std::slice::from_raw_parts_mut(at(i, 0), nr) }.copy_from_slice(&row[..nr]);
        } else {
            for (j, &v) in row[..nr].iter().enumerate() {
                // SAFETY: see `at`.
                unsafe { *at(i, j) = v };
            }
        }
    }
}

/// Up to 32 rows of NR f32 on a cache line: [`on_tile`]'s stand-in for a partial tile.
#[repr(C, align(64))]
struct Block([f32; 32 * NR]);

/// The portable microkernel: the same pairwise order as `vdpbf16ps`, one lane per column.
///
/// # Safety
/// `c` valid for MR rows of NR contiguous f32 at row stride `ldc` (reads with `load`).
#[inline(always)]
unsafe fn micro_portable(
    kc: usize,
    (a, a_rs, a_ps): (&[u32], usize, usize),
    b: &[u32],
    c: *mut f32,
    ldc: usize,
    load: bool,
) {
    let mut acc = [[0.0f32; NR]; MR];
    if load {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: row i of the tile (caller).
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(i * ldc), NR) });
        }
    }
    for (p, bp) in b.chunks_exact(NR).take(kc).enumerate() {
        let (be, bo): ([f32; NR], [f32; NR]) = (
            std::array::from_fn(|j| from_bf16(bp[j] as u16)),
            std::array::from_fn(|j| from_bf16((bp[j] >> 16) as u16)),
        );
        for (i, row) in acc.iter_mut().enumerate() {
            let x = a[i * a_rs + p * a_ps];
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
    use super::{pair, Bf16Hw, MR, NR};
    use std::arch::x86_64::*;

    /// [`super::cvt_pairs`] on AVX512-BF16.
    ///
    /// # Safety
    /// `src.len() ≥ 2·dst.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn cvt_pairs(_hw: Bf16Hw, src: &[f32], dst: &mut [u32]) {
        let n = dst.len();
        let mut p = 0;
        while p + 16 <= n {
            // SAFETY: floats 2p .. 2p + 32 < src.len() and pairs p .. p + 16 ≤ n (caller).
            unsafe {
                let lo = _mm512_loadu_ps(src.as_ptr().add(2 * p));
                let hi = _mm512_loadu_ps(src.as_ptr().add(2 * p + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(p).cast(), v);
            }
            p += 16;
        }
        for q in p..n {
            dst[q] = pair(src[2 * q], src[2 * q + 1]);
        }
    }

    /// [`super::cvt_row_blocked`]'s whole 16-pair chunks; returns the pairs written.
    ///
    /// # Safety
    /// `dst` holds a block of 256 u32 for every whole 32-float chunk of `row`; w < 16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn cvt_row_blocked(
        _hw: Bf16Hw,
        row: &[f32],
        dst: &mut [u32],
        w: usize,
    ) -> usize {
        let chunks = row.len() / 32;
        for kb in 0..chunks {
            // SAFETY: floats 32kb .. 32kb + 32 of row; block kb's row w (caller).
            unsafe {
                let lo = _mm512_loadu_ps(row.as_ptr().add(32 * kb));
                let hi = _mm512_loadu_ps(row.as_ptr().add(32 * kb + 16));
                let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.as_mut_ptr().add(kb * 256 + w * 16).cast(), v);
            }
        }
        16 * chunks
    }

    /// [`super::transpose16`] on AVX-512: 32-bit, then 64-bit unpacks within 128-bit lanes,
    /// then two rounds of 128-bit lane shuffles.
    ///
    /// # Safety
    /// `src` valid for 16 rows of 16 u32 at `stride`, `dst` for 16 rows of 16 at `ds`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose16(
        _hw: Bf16Hw,
        src: *const u32,
        stride: usize,
        dst: *mut u32,
        ds: usize,
    ) {
        // SAFETY: the caller's ranges.
        unsafe {
            let r: [__m512i; 16] =
                std::array::from_fn(|q| _mm512_loadu_si512(src.add(q * stride).cast()));
            // t: pairs of rows interleaved by 32 bits; u_j lane L: column 4L + j of rows 4i..4i+4
            let mut u = [_mm512_setzero_si512(); 16];
            for i in 0..4 {
                let (a, b, c, d) = (r[4 * i], r[4 * i + 1], r[4 * i + 2], r[4 * i + 3]);
                let (t0, t1) = (_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
                let (t2, t3) = (_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
                u[4 * i] = _mm512_unpacklo_epi64(t0, t2);
                u[4 * i + 1] = _mm512_unpackhi_epi64(t0, t2);
                u[4 * i + 2] = _mm512_unpacklo_epi64(t1, t3);
                u[4 * i + 3] = _mm512_unpackhi_epi64(t1, t3);
            }
            // v: rows 0–7 (h = 0) or 8–15 (h = 1); v[8h + j] = columns j, j + 8 (j < 4) or
            // j, j + 8 for j = 4..8 from the odd lanes
            let mut v = [_mm512_setzero_si512(); 16];
            for h in 0..2 {
                for j in 0..4 {
                    let (a, b) = (u[8 * h + j], u[8 * h + 4 + j]);
                    v[8 * h + j] = _mm512_shuffle_i32x4::<0x88>(a, b);
                    v[8 * h + 4 + j] = _mm512_shuffle_i32x4::<0xdd>(a, b);
                }
            }
            for j in 0..8 {
                let (a, b) = (v[j], v[8 + j]);
                _mm512_storeu_si512(dst.add(ds * j).cast(), _mm512_shuffle_i32x4::<0x88>(a, b));
                _mm512_storeu_si512(
                    dst.add(ds * (j + 8)).cast(),
                    _mm512_shuffle_i32x4::<0xdd>(a, b),
                );
            }
        }
    }

    /// u16 lane 2j of the result takes lane j (the even row), lane 2j + 1 takes lane 16 + j.
    static INTERLEAVE: [u16; 32] = {
        let mut t = [0u16; 32];
        let mut j = 0;
        while j < 16 {
            t[2 * j] = j as u16;
            t[2 * j + 1] = 16 + j as u16;
            j += 1;
        }
        t
    };

    /// [`super::cvt_interleave`] on AVX512-BF16.
    ///
    /// # Safety
    /// `even` and `odd` at least `dst.len()` long.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn cvt_interleave(_hw: Bf16Hw, even: &[f32], odd: &[f32], dst: &mut [u32]) {
        let n = dst.len();
        // SAFETY: 32 u16 = 64 bytes.
        let idx = unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) };
        let mut j = 0;
        while j + 16 <= n {
            // SAFETY: elements j .. j + 16 ≤ n of each (caller).
            unsafe {
                let e = _mm512_loadu_ps(even.as_ptr().add(j));
                let o = _mm512_loadu_ps(odd.as_ptr().add(j));
                let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(o, e));
                let v = _mm512_permutexvar_epi16(idx, both);
                _mm512_storeu_si512(dst.as_mut_ptr().add(j).cast(), v);
            }
            j += 16;
        }
        for q in j..n {
            dst[q] = pair(even[q], odd[q]);
        }
    }

    /// C tile (MR × NR, row stride `ldc`) = [C +] Σ_p A pairs · B pairs with `vdpbf16ps`.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and AVX512-BF16; `a` holds the pair (i, p) at `i·a_rs + p·a_ps`
    /// for i < MR, p < kc, `b` holds kc·NR u32, and `c` is
    /// valid for MR rows of NR contiguous f32 at stride `ldc` (reads with `load`).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn micro(
        kc: usize,
        (a, a_rs, a_ps): (*const u32, usize, usize),
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
                        std::mem::transmute(_mm512_set1_epi32(*a.add(p * a_ps + i * a_rs) as i32));
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

/// `dst[p]` = the bf16 pair (`src[2p]`, `src[2p + 1]`) for every p < `dst.len()`: with
/// AVX512-BF16, 16 pairs per `vcvtne2ps2bf16` (the same rounding as [`to_bf16`], tested).
#[inline(always)]
pub(crate) fn cvt_pairs(hw: Option<Bf16Hw>, src: &[f32], dst: &mut [u32]) {
    assert!(src.len() >= 2 * dst.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(hw) = hw {
        // SAFETY: the proof says the CPU has AVX512-BF16; lengths checked above.
        return unsafe { avx512bf16::cvt_pairs(hw, src, dst) };
    }
    let _ = hw;
    for (d, e) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = pair(e[0], e[1]);
    }
}

/// `dst[j]` = the bf16 pair (`even[j]`, `odd[j]`) for every j < `dst.len()`: with
/// AVX512-BF16, 16 pairs per `vcvtne2ps2bf16` and one `vpermw`.
#[inline(always)]
pub(crate) fn cvt_interleave(hw: Option<Bf16Hw>, even: &[f32], odd: &[f32], dst: &mut [u32]) {
    assert!(even.len() >= dst.len() && odd.len() >= dst.len());
    #[cfg(target_arch = "x86_64")]
    if let Some(hw) = hw {
        // SAFETY: the proof says the CPU has AVX512-BF16; lengths checked above.
        return unsafe { avx512bf16::cvt_interleave(hw, even, odd, dst) };
    }
    let _ = hw;
    for ((d, &e), &o) in dst.iter_mut().zip(even).zip(odd) {
        *d = pair(e, o);
    }
}

/// Pair row p of an operand whose inner-dimension rows (k of them) start `ks` apart and hold
/// `width` contiguous elements: `d[j]` = the pair (row 2p, row 2p + 1) at j (row 2p + 1 is
/// zero past an odd k), `d[width..]` zero; p ≥ ⌈k/2⌉ (padding) gives a zero row.
///
/// # Safety
/// Rows 0..k valid for `width` elements each at `ptr + r·ks`.
#[inline(always)]
unsafe fn pair_row(
    hw: Option<Bf16Hw>,
    (ptr, ks): (*const f32, usize),
    width: usize,
    k: usize,
    p: usize,
    d: &mut [u32],
) {
    if 2 * p >= k {
        d.fill(0);
        return;
    }
    // SAFETY: row 2p < k (checked), `width` elements (caller).
    let even = unsafe { std::slice::from_raw_parts(ptr.add(2 * p * ks), width) };
    if 2 * p + 1 < k {
        // SAFETY: as above, row 2p + 1.
        let odd = unsafe { std::slice::from_raw_parts(ptr.add((2 * p + 1) * ks), width) };
        cvt_interleave(hw, even, odd, &mut d[..width]);
    } else {
        for (d, &e) in d.iter_mut().zip(even) {
            *d = pair(e, 0.0);
        }
    }
    d[width..].fill(0);
}

/// One operand seen as panels: element (w, kk) — w along the panel (A's rows, B's columns),
/// kk along the inner dimension — at `ptr + w·ws + kk·ks`.
#[derive(Clone, Copy)]
struct Panels {
    ptr: *const f32,
    ws: usize,
    ks: usize,
}
impl Panels {
    /// The same view starting at panel row `w`.
    ///
    /// # Safety
    /// Row `w` inside the operand.
    unsafe fn at_row(self, w: usize) -> Panels {
        Panels {
            // SAFETY: the caller's.
            ptr: unsafe { self.ptr.add(w * self.ws) },
            ..self
        }
    }
}
// SAFETY: a read-only view of memory the caller of `gemm_bf16` keeps valid and unwritten
// during the call.
unsafe impl Send for Panels {}
// SAFETY: as for `Send`.
unsafe impl Sync for Panels {}

/// Packs the `width` (≤ W) panel rows starting at `x.ptr` over the inner dimension k into
/// `dst` (`kp·W` u32; W = 0: `dst.len() / kp`): pair p of row w at `p·W + w`; rows past `width` and an odd k's pad
/// element are zero. Two fast layouts (the panel dimension contiguous: two source rows make one
/// output row; or the inner dimension contiguous: each row converted in 64-pair chunks and
/// stored down its column) and a generic one.
///
/// # Safety
/// `x` valid for reads of its width × k elements.
#[inline(always)]
unsafe fn pack_panel_body<const W: usize>(
    hw: Option<Bf16Hw>,
    x: Panels,
    width: usize,
    k: usize,
    dst: &mut [u32],
) {
    let kp = k.div_ceil(2);
    // W = 0: the output rows are as wide as dst says
    let wo = if W == 0 { dst.len() / kp } else { W };
    debug_assert!(width <= wo && dst.len() == kp * wo);
    // SAFETY (all reads below): w < width and kk < k (caller).
    if x.ws == 1 {
        for (p, d) in dst.chunks_exact_mut(wo).enumerate() {
            unsafe { pair_row(hw, (x.ptr, x.ks), width, k, p, d) };
        }
    } else if x.ks == 1 && wo == 1 {
        // one row: a straight element-wise conversion into the pairs' halves
        let row = unsafe { std::slice::from_raw_parts(x.ptr, k) };
        let (even, odd) = (&row[..k - k % 2], k % 2 == 1);
        cvt_pairs(hw, even, &mut dst[..even.len() / 2]);
        if odd {
            dst[kp - 1] = pair(row[k - 1], 0.0);
        }
    } else if x.ks == 1 {
        // each row converted contiguously in chunks of CH pairs (the loop of the one-row case,
        // which vectorises), then the chunk's pairs stored down the panel's column w
        const CH: usize = 64;
        let mut t = [0u32; CH];
        for w in 0..width {
            let row = unsafe { std::slice::from_raw_parts(x.ptr.add(w * x.ws), k) };
            let even = &row[..k - k % 2];
            for (c, src) in even.chunks(2 * CH).enumerate() {
                let len = src.len() / 2;
                cvt_pairs(hw, src, &mut t[..len]);
                for (col, &v) in dst[c * CH * wo + w..].iter_mut().step_by(wo).zip(&t[..len]) {
                    *col = v;
                }
            }
            if k % 2 == 1 {
                dst[(kp - 1) * wo + w] = pair(row[k - 1], 0.0);
            }
        }
        for d in dst.chunks_exact_mut(wo) {
            d[width..].fill(0);
        }
    } else {
        let at = |w: usize, kk: usize| unsafe { *x.ptr.add(w * x.ws + kk * x.ks) };
        for (p, d) in dst.chunks_exact_mut(wo).enumerate() {
            for (w, d) in d.iter_mut().enumerate() {
                *d = if w >= width {
                    0
                } else {
                    let odd = if 2 * p + 1 < k { at(w, 2 * p + 1) } else { 0.0 };
                    pair(at(w, 2 * p), odd)
                };
            }
        }
    }
}

/// [`pack_panel_body`] compiled for the widest level the CPU runs (the packing is pure
/// rounding and moving, identical at every level).
///
/// # Safety
/// As for [`pack_panel_body`].
unsafe fn pack_panel<const W: usize>(
    level: Level,
    x: Panels,
    width: usize,
    k: usize,
    dst: &mut [u32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
        unsafe fn avx512<const W: usize>(
            hw: Option<Bf16Hw>,
            x: Panels,
            width: usize,
            k: usize,
            dst: &mut [u32],
        ) {
            // SAFETY: the caller's.
            unsafe { pack_panel_body::<W>(hw, x, width, k, dst) }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<const W: usize>(x: Panels, width: usize, k: usize, dst: &mut [u32]) {
            // SAFETY: the caller's.
            unsafe { pack_panel_body::<W>(None, x, width, k, dst) }
        }
        match level.isa() {
            // SAFETY: a `Level` is never above what the CPU runs (`isa.rs`); the rest is the
            // caller's.
            super::isa::Isa::Avx512 | super::isa::Isa::Amx => {
                return unsafe { avx512::<W>(level.bf16(), x, width, k, dst) }
            }
            // SAFETY: as above.
            super::isa::Isa::Avx2 => return unsafe { avx2::<W>(x, width, k, dst) },
            super::isa::Isa::Portable => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    // SAFETY: the caller's.
    unsafe { pack_panel_body::<W>(None, x, width, k, dst) }
}

/// [`pack_panel`] with output rows as wide as `dst` says.
///
/// # Safety
/// As for [`pack_panel_body`].
unsafe fn pack_panel_dyn(level: Level, x: Panels, width: usize, k: usize, dst: &mut [u32]) {
    // SAFETY: the caller's.
    unsafe { pack_panel::<0>(level, x, width, k, dst) }
}

/// Packs the `len` rows (A) or columns (B) of `x` into W-wide panels of `kst` ≥ kp pairs in
/// `out` (resized to `panels·kst·W`, every element written: pairs kp.. zero), in parallel when
/// `par`.
///
/// # Safety
/// `x` valid for reads of its len × k elements.
unsafe fn pack<const W: usize>(
    level: Level,
    par: bool,
    x: Panels,
    len: usize,
    k: usize,
    kst: usize,
    out: &mut Packed,
) {
    let kp = k.div_ceil(2);
    debug_assert!(kst >= kp);
    let panels = len.div_ceil(W);
    let need = panels * kst * W;
    let out = out.grow(need);
    if x.ws == 1 && panels > 1 {
        // The panel dimension contiguous (B = dY of dW = Xᵀ dY, a long inner dimension): pair
        // rows are streamed — source rows 2p and 2p + 1 read whole, in order, converted in one
        // call — and each converted pair row scattered into the panels, instead of every panel
        // reading its W-wide strip of every row (strided reads, a short conversion per strip).
        // Same values as the panel-by-panel path.
        const PR: usize = 16; // pair rows per task
        let hw = level.bf16();
        let dst = Out(out.as_mut_ptr());
        let x = &x; // closures capture the whole (Sync) view, not its raw pointer
        let body = |c: usize, row: &mut Vec<u32>| {
            if row.len() < panels * W {
                row.resize(panels * W, 0); // past `len`: never written, stays zero
            }
            for p in c * PR..((c + 1) * PR).min(kst) {
                // SAFETY: the operand's k rows hold `len` contiguous elements each (caller).
                unsafe { pair_row(hw, (x.ptr, x.ks), len, k, p, &mut row[..panels * W]) };
                for (cp, src) in row.chunks_exact(W).take(panels).enumerate() {
                    // SAFETY: pair row p of panel cp, W u32 inside `out` (need elements);
                    // only the task of p's chunk writes it.
                    let d = unsafe {
                        std::slice::from_raw_parts_mut(dst.get().add((cp * kst + p) * W), W)
                    };
                    d.copy_from_slice(src);
                }
            }
        };
        let chunks = kst.div_ceil(PR);
        if par {
            (0..chunks)
                .into_par_iter()
                .for_each_init(Vec::new, |row, c| body(c, row));
        } else {
            let mut row = Vec::new();
            (0..chunks).for_each(|c| body(c, &mut row));
        }
        return;
    }
    chunks_each(par, out, kst * W, |r, dst| {
        let width = W.min(len - r * W);
        // SAFETY: panel r's first row is row r·W < len of x (caller).
        let sub = unsafe { x.at_row(r * W) };
        let (body, pad) = dst.split_at_mut(kp * W);
        // SAFETY: rows r·W .. r·W + width of x (caller).
        unsafe { pack_panel::<W>(level, sub, width, k, body) };
        pad.fill(0);
    });
}

/// A (m × k) converted to bf16 pairs in `buf` (every element written), in one of two layouts
/// whose pair (i, p) lies at `i·rs + p·ps`, returned as (rs, ps): with k contiguous in A, row
/// by row (`(kp, 1)`: a straight conversion pass); otherwise pair row by pair row (`(1, rows)`:
/// rows 2p and 2p + 1 interleaved). Rows m..rows (the last tile's padding) are zero.
///
/// # Safety
/// `a` valid for reads of its m × k elements.
unsafe fn convert_a(
    level: Level,
    par: bool,
    a: Mat,
    m: usize,
    k: usize,
    rows: usize,
    buf: &mut Packed,
) -> (usize, usize) {
    let kp = k.div_ceil(2);
    let buf = buf.grow(rows * kp);
    if a.cs == 1 {
        // each row a 1-wide panel with k contiguous
        let row = Panels {
            ptr: a.ptr,
            ws: a.rs,
            ks: 1,
        };
        chunks_each(par, buf, kp * 64, |t, dst| {
            for (r, d) in dst.chunks_exact_mut(kp).enumerate() {
                let i = t * 64 + r;
                if i < m {
                    // SAFETY: row i < m of A (caller).
                    unsafe { pack_panel::<1>(level, row.at_row(i), 1, k, d) };
                } else {
                    d.fill(0);
                }
            }
        });
        (kp, 1)
    } else {
        // each pair row p: the m-wide panel of rows 2p, 2p + 1 of Aᵀ
        let t = Panels {
            ptr: a.ptr,
            ws: a.rs,
            ks: a.cs,
        };
        chunks_each(par, buf, rows * 8, |c, dst| {
            for (q, d) in dst.chunks_exact_mut(rows).enumerate() {
                let p = c * 8 + q;
                // SAFETY: columns 2p, 2p + 1 (< k, or the pad) of A's m rows (caller).
                unsafe { pack_pair_row(level, t, m, k, p, d) };
            }
        });
        (1, rows)
    }
}

/// Pair row p of A (rows 2p and 2p + 1 of Aᵀ, each m long) into `dst` (≥ m; the rest zero).
///
/// # Safety
/// `a` valid for reads of its m × k elements (seen as panels along its rows).
#[inline(always)]
unsafe fn pack_pair_row(level: Level, a: Panels, m: usize, k: usize, p: usize, dst: &mut [u32]) {
    // the m × 2 slab of columns 2p, 2p + 1 is a panel of width m over an inner dimension of
    // 1 or 2, whose single pair row is this output row
    let slab = Panels {
        // SAFETY: column 2p < k of A (caller).
        ptr: unsafe { a.ptr.add(2 * p * a.ks) },
        ..a
    };
    let kk = (k - 2 * p).min(2);
    if dst.len() == m {
        // SAFETY: the slab's m × kk elements are inside A (caller).
        unsafe { pack_panel_dyn(level, slab, m, kk, dst) };
    } else {
        // SAFETY: as above.
        unsafe { pack_panel_dyn(level, slab, m, kk, &mut dst[..m]) };
        dst[m..].fill(0);
    }
}

/// One 64-byte cache line of packed pairs.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u32; 16]);

/// A packing buffer that starts on a cache line (64 bytes). An AMX tile row is 64 bytes; a
/// tile load whose rows straddle two lines took 14.5 ns against 2.2 ns aligned on the Xeon
/// this was written on (a `Vec<u32>` from malloc is only 16-byte aligned), which made the tiles'
/// products bound by their loads. The `vdpbf16ps` path uses the same buffers.
#[derive(Default)]
pub(crate) struct Packed(Vec<Line>);

impl Packed {
    const fn new() -> Packed {
        Packed(Vec::new())
    }

    /// The first `len` elements (grown, zero-filled, when the buffer is shorter).
    fn grow(&mut self, len: usize) -> &mut [u32] {
        let lines = len.div_ceil(16);
        if self.0.len() < lines {
            self.0.resize(lines, Line([0; 16]));
        }
        // SAFETY: `Line` is `repr(C)` around [u32; 16] (64 bytes, no padding), so the Vec's
        // lines are 16·lines ≥ len initialised, contiguous u32, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u32>(), len) }
    }
}

impl std::ops::Deref for Packed {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        // SAFETY: as in `grow`, for all 16·len lines.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u32>(), 16 * self.0.len()) }
    }
}

thread_local! {
    /// The packed operands of this thread's calls, reused (a call takes them out and puts them
    /// back, so the buffers are neither zeroed nor page-faulted afresh each call), and the AMX
    /// conversion's one-group buffer of a serial call.
    static SCRATCH: std::cell::Cell<(Packed, Packed, Vec<u32>)> =
        const { std::cell::Cell::new((Packed::new(), Packed::new(), Vec::new())) };
    /// The AMX conversion's one-group buffer of a rayon worker in a parallel call.
    #[cfg(target_arch = "x86_64")]
    static AMX_TMP: std::cell::Cell<Vec<u32>> = const { std::cell::Cell::new(Vec::new()) };
    /// A tile task's own converted rows of A ([`gemm_amx`] with row-major A).
    #[cfg(target_arch = "x86_64")]
    static AMX_A: std::cell::Cell<Packed> = const { std::cell::Cell::new(Packed::new()) };
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

    /// How the test lays out A and B.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        RowMajor,
        /// transposed copies read through swapped strides
        Transposed,
        /// every element followed by a gap (neither stride is 1)
        Spread,
    }

    /// Runs the kernel on A, B laid out as `layout` and a row-major C.
    fn run(
        level: Level,
        dims: (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        c0: Option<&[f32]>,
        layout: Layout,
    ) -> Vec<f32> {
        run_on(level, true, dims, a, b, c0, layout)
    }

    /// [`run`], multi-threaded (`par`) or on this thread only ([`gemm_bf16_serial`]).
    fn run_on(
        level: Level,
        par: bool,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        c0: Option<&[f32]>,
        layout: Layout,
    ) -> Vec<f32> {
        let t = |x: &[f32], r: usize, c: usize| -> Vec<f32> {
            (0..r * c).map(|e| x[(e % r) * c + e / r]).collect()
        };
        let spread = |x: &[f32]| -> Vec<f32> { x.iter().flat_map(|&v| [v, f32::NAN]).collect() };
        let (ab, bb, am, bm);
        match layout {
            Layout::RowMajor => {
                (ab, bb) = (a.to_vec(), b.to_vec());
                (am, bm) = ((k, 1), (n, 1));
            }
            Layout::Transposed => {
                (ab, bb) = (t(a, m, k), t(b, k, n));
                (am, bm) = ((1, m), (1, k));
            }
            Layout::Spread => {
                (ab, bb) = (spread(a), spread(b));
                (am, bm) = ((2 * k, 2), (2 * n, 2));
            }
        }
        let am = Mat {
            ptr: ab.as_ptr(),
            rs: am.0,
            cs: am.1,
        };
        let bm = Mat {
            ptr: bb.as_ptr(),
            rs: bm.0,
            cs: bm.1,
        };
        let mut c = c0.map_or_else(|| vec![f32::NAN; m * n], <[f32]>::to_vec);
        // SAFETY: A, B, C hold the m·k, k·n, m·n elements addressed by the strides above.
        unsafe {
            if par {
                gemm_bf16(
                    level,
                    (m, n, k),
                    c.as_mut_ptr(),
                    (n, 1),
                    c0.is_some(),
                    am,
                    bm,
                )
            } else {
                gemm_bf16_serial(
                    level,
                    (m, n, k),
                    c.as_mut_ptr(),
                    (n, 1),
                    c0.is_some(),
                    am,
                    bm,
                )
            }
        };
        c
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every level (the AVX512-BF16 microkernel where the CPU has it, the portable one always)
    /// gives the reference's bits, multi-threaded and on one thread: ragged tiles, odd k, several
    /// KC blocks, each packing layout, and accumulation into C.
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
                    if level.amx().is_some() {
                        continue; // its own test: amx_gemm_is_the_exact_product_up_to_f32_sums
                    }
                    for lay in [Layout::RowMajor, Layout::Transposed, Layout::Spread] {
                        for par in [true, false] {
                            let got = bits(&run_on(level, par, (m, n, k), &a, &b, acc, lay));
                            assert!(
                                got == want,
                                "{m}x{n}x{k} acc {} {lay:?} par {par} at {:?}",
                                acc.is_some(),
                                level.isa()
                            );
                        }
                    }
                }
            }
        }
        assert_eq!(hw_seen, isa::detected_bf16());
    }

    /// The AMX path (where the CPU and OS allow it): every layout, threaded or serial, gives the
    /// same bits (they pack the same values and tile C the same way), run after run; each
    /// element is the exact (f64) product of the bf16-rounded inputs plus C up to f32
    /// accumulation error (≤ k·2⁻²⁴·Σ|terms|, the bound a pairwise f32 sum meets); ragged
    /// tiles, odd k, k not a multiple of 32, several KC blocks, accumulation into C.
    #[test]
    fn amx_gemm_is_the_exact_product_up_to_f32_sums() {
        let Some(level) = isa::supported().into_iter().find(|l| l.amx().is_some()) else {
            assert!(isa::detected() < Isa::Amx);
            return;
        };
        let mut rng = StdRng::seed_from_u64(4);
        let r = |x: f32| f64::from(from_bf16(to_bf16(x)));
        for (m, n, k) in [
            (1, 1, 1),
            (13, 37, 19),
            (32, 32, 32),
            (50, 70, 301),
            (70, 96, 600),
        ] {
            let (a, b, c0) = (
                rand(&mut rng, m * k),
                rand(&mut rng, k * n),
                rand(&mut rng, m * n),
            );
            for acc in [None, Some(&c0[..])] {
                let first = bits(&run_on(
                    level,
                    true,
                    (m, n, k),
                    &a,
                    &b,
                    acc,
                    Layout::RowMajor,
                ));
                for lay in [Layout::RowMajor, Layout::Transposed, Layout::Spread] {
                    for par in [true, false] {
                        let got = bits(&run_on(level, par, (m, n, k), &a, &b, acc, lay));
                        assert!(got == first, "{m}x{n}x{k} {lay:?} par {par}");
                    }
                }
                for i in 0..m {
                    for j in 0..n {
                        let c = acc.map_or(0.0, |c0| f64::from(c0[i * n + j]));
                        let (mut exact, mut abs) = (c, c.abs());
                        for p in 0..k {
                            let t = r(a[i * k + p]) * r(b[p * n + j]);
                            exact += t;
                            abs += t.abs();
                        }
                        let g = f64::from(f32::from_bits(first[i * n + j]));
                        assert!(
                            (g - exact).abs() <= abs * (k + 1) as f64 * 6e-8,
                            "{m}x{n}x{k} ({i},{j}): {g} vs {exact}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX-512 16 × 16 transpose against the scalar one (and the definition).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn transpose16_matches_the_scalar_loop() {
        let mut rng = StdRng::seed_from_u64(6);
        let stride = 37;
        let src: Vec<u32> = (0..15 * stride + 16).map(|_| rng.gen()).collect();
        let (mut hw, mut sw) = ([0u32; 256], [0u32; 256]);
        transpose16(None, &src, stride, &mut sw);
        for w in 0..16 {
            for q in 0..16 {
                assert_eq!(sw[w * 16 + q], src[q * stride + w]);
            }
        }
        if let Some(b) = isa::level().bf16() {
            transpose16(Some(b), &src, stride, &mut hw);
            assert_eq!(hw, sw);
        }
        // into rows 21 apart, around which nothing is written
        for b in [None, isa::level().bf16()] {
            let mut wide = vec![7u32; 16 * 21 + 5];
            // SAFETY: 16 rows of 16 at stride 21 from element 2 lie inside `wide`.
            unsafe { transpose16_to(b, &src, stride, wide[2..].as_mut_ptr(), 21) };
            for (i, &v) in wide.iter().enumerate() {
                let (w, q) = (
                    (i as isize - 2).div_euclid(21),
                    (i as isize - 2).rem_euclid(21),
                );
                let want = if (0..16).contains(&w) && q < 16 {
                    sw[w as usize * 16 + q as usize]
                } else {
                    7
                };
                assert_eq!(v, want, "element {i}, {b:?}");
            }
        }
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
        let got = run(level, (m, n, k), &a, &b, None, Layout::RowMajor);
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
    fn round_bf16_is_the_round_trip() {
        let mut rng = StdRng::seed_from_u64(10);
        let specials = [
            0u32,
            0x8000_0000,
            0x0000_0001,
            0x807f_ffff,
            0x0080_0000,
            0x3f80_8000,
            0x3f81_8000,
            0x7f7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7f80_0001,
            0xffc0_0000,
            0x7fff_ffff,
        ];
        let bits = specials
            .into_iter()
            .chain((0..100_000).map(|_| rng.gen::<u32>()));
        for u in bits {
            let x = f32::from_bits(u);
            let want = from_bf16(to_bf16(x)).to_bits();
            assert_eq!(round_bf16(x).to_bits(), want, "{u:#010x}");
        }
    }

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
