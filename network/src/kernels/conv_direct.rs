//! The direct 3×3 "same" convolution (spec §7.3's U-Net): the products of [`super::conv`]
//! computed tile by tile from the input's rows in place, with no im2col panel.
//!
//! Forward (and dX, the same convolution of dY with the flipped kernel):
//! y[p] = Σ_t Σ_c x[nb_t(p), c]·W[t·cin + c, ·], t = 3·ky + kx and nb_t(p) the pixel at offset
//! (ky − 1, kx − 1) from p, a row of zeros where that lies outside the image. A tile of R output
//! pixels × N output channels is held in registers while the 9·cin terms stream through: each
//! term broadcasts one input element per pixel (read from x's own rows through per-tap row
//! pointers) against one row of W. Weight gradient: dW[t] = Σ_p x[nb_t(p)]ᵀ·dY[p], summed over
//! the runs of pixels whose tap t lies inside the image (one run per image row and tap, both
//! operands contiguous), tiles of R input channels × N output channels in registers, per chunk
//! of image rows; the chunks' partial sums are added in order.
//!
//! Why: im2col copies the input nine times into a panel and runs a parallel region per panel
//! (two, with the panel's construction); at `unet-small`'s shapes (64 channels, 28 × 28) that
//! cost as much as the products themselves. Here each call is one parallel region over output
//! rows (forward) or image-row chunks (dW).
//!
//! Every output element is one chain of fused multiply-adds in a fixed order (taps, then input
//! channels, from zero; for dW the pixels of each chunk in order, then the chunks in order),
//! added to the destination last. The AVX-512, AVX2 and portable instances differ only in how
//! many output columns run at once, so every [`super::isa`] level gives the same bits, and no
//! result depends on the thread count.

use super::conv::Grid;
use super::isa::{Isa, Level};
use crate::Elem;
use rayon::prelude::*;

/// Output rows (pixels; for dW, input channels) of one register tile.
pub(super) const R: usize = 6;

/// Output pixels of one forward task.
const TASK_ROWS: usize = 96;

/// Pixels of one dW chunk (whole image rows): at least this many, and at most 64 chunks.
const DW_PIXELS: usize = 1024;

/// One register of output columns: what the tile kernels need of it. Each instance does the
/// same IEEE operation per lane.
pub(super) trait Vector: Copy {
    type E: Elem;
    const LANES: usize;
    /// SAFETY (all methods): the caller's CPU supports the instance's instructions; pointers
    /// are valid for `LANES` elements.
    unsafe fn zero() -> Self;
    unsafe fn load(p: *const Self::E) -> Self;
    /// self + a·b, rounded once.
    unsafe fn fma(self, a: Self::E, b: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn store(self, p: *mut Self::E);
}

/// The portable instance: one element.
#[derive(Clone, Copy)]
pub(super) struct Scalar<E>(E);

impl<E: Elem> Vector for Scalar<E> {
    type E = E;
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar(E::zero())
    }
    #[inline(always)]
    unsafe fn load(p: *const E) -> Self {
        Scalar(unsafe { *p })
    }
    #[inline(always)]
    unsafe fn fma(self, a: E, b: Self) -> Self {
        Scalar(a.mul_add(b.0, self.0))
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Scalar(self.0 + b.0)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut E) {
        unsafe { *p = self.0 }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    /// 16 f32 lanes (AVX-512 F).
    #[derive(Clone, Copy)]
    pub(in crate::kernels) struct Zmm(__m512);

    /// 8 f32 lanes (AVX2 + FMA).
    #[derive(Clone, Copy)]
    pub(in crate::kernels) struct Ymm(__m256);

    // The intrinsics below are inlined into the `#[target_feature]` instances in
    // `super::dispatch`, whose callers hold the `Level` that proves the CPU runs them.
    impl Vector for Zmm {
        type E = f32;
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Zmm(unsafe { _mm512_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Zmm(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn fma(self, a: f32, b: Self) -> Self {
            Zmm(unsafe { _mm512_fmadd_ps(_mm512_set1_ps(a), b.0, self.0) })
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Zmm(unsafe { _mm512_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
    }

    impl Vector for Ymm {
        type E = f32;
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Ymm(unsafe { _mm256_setzero_ps() })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Ymm(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn fma(self, a: f32, b: Self) -> Self {
            Ymm(unsafe { _mm256_fmadd_ps(_mm256_set1_ps(a), b.0, self.0) })
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Ymm(unsafe { _mm256_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
    }
}

/// A tile of R rows × NV registers of accumulators.
pub(super) type Tile<V, const NV: usize> = [[V; NV]; R];

/// The forward tile: acc + Σ_{t ∈ taps} Σ_c a[t][i][c] · b[(t·cin + c)·ldb + j] for the R rows
/// i and the NV·LANES columns j, taps and channels in order.
///
/// SAFETY (caller): every `a[t][i]` (t in `taps`) is readable for `cin` elements; `b` for the
/// NV·LANES elements at the start of each of its 9·cin rows, `ldb` apart; the CPU runs `V`.
#[inline(always)]
pub(super) unsafe fn conv_tile<V: Vector, const NV: usize>(
    mut acc: Tile<V, NV>,
    a: &[[*const V::E; R]; 9],
    taps: std::ops::Range<usize>,
    b: *const V::E,
    ldb: usize,
    cin: usize,
) -> Tile<V, NV> {
    unsafe {
        for t in taps {
            let (at, bt) = (&a[t], b.add(t * cin * ldb));
            for c in 0..cin {
                let brow = bt.add(c * ldb);
                let bv: [V; NV] = std::array::from_fn(|j| V::load(brow.add(j * V::LANES)));
                for (acc_i, &a_i) in acc.iter_mut().zip(at) {
                    let ai = *a_i.add(c);
                    for (s, &bj) in acc_i.iter_mut().zip(&bv) {
                        *s = s.fma(ai, bj);
                    }
                }
            }
        }
        acc
    }
}

/// A run of `len` pixels p.. whose tap reads the pixels q.. (both consecutive).
#[derive(Clone, Copy)]
pub(super) struct Run {
    pub(super) q: usize,
    pub(super) p: usize,
    pub(super) len: usize,
}

/// The dW tile: acc + Σ_k x[(q + k)·cin + cs[i]] · gy[(p + k)·ldy + j] for the R input
/// channels cs[i] and the NV·LANES output columns j, pixels in order.
///
/// SAFETY (caller): x is readable at every (q + k)·cin + cs[i], gy for NV·LANES elements at
/// every (p + k)·ldy (k < run.len); the CPU runs `V`.
#[inline(always)]
pub(super) unsafe fn dw_tile<V: Vector, const NV: usize>(
    mut acc: Tile<V, NV>,
    x: *const V::E,
    cin: usize,
    cs: &[usize; R],
    gy: *const V::E,
    ldy: usize,
    run: Run,
) -> Tile<V, NV> {
    unsafe {
        for k in 0..run.len {
            let arow = x.add((run.q + k) * cin);
            let brow = gy.add((run.p + k) * ldy);
            let bv: [V; NV] = std::array::from_fn(|j| V::load(brow.add(j * V::LANES)));
            for (acc_i, &c) in acc.iter_mut().zip(cs) {
                let ai = *arow.add(c);
                for (s, &bj) in acc_i.iter_mut().zip(&bv) {
                    *s = s.fma(ai, bj);
                }
            }
        }
        acc
    }
}

/// Reads the first `rows` × `cols` entries of a tile from src (row stride ld; zeros beyond).
///
/// SAFETY (caller): src is readable for `rows` rows of `cols` elements, `ld` apart;
/// `cols` ≤ NV·LANES ≤ 64; the CPU runs `V`.
#[inline(always)]
pub(super) unsafe fn get<V: Vector, const NV: usize>(
    src: *const V::E,
    ld: usize,
    (rows, cols): (usize, usize),
) -> Tile<V, NV> {
    unsafe {
        let mut acc = [[V::zero(); NV]; R];
        for (i, acc_i) in acc.iter_mut().enumerate().take(rows) {
            let s = src.add(i * ld);
            if cols == NV * V::LANES {
                for (j, a) in acc_i.iter_mut().enumerate() {
                    *a = V::load(s.add(j * V::LANES));
                }
            } else {
                let mut tmp = [<V::E as num_traits::Zero>::zero(); 64];
                tmp[..cols].copy_from_slice(std::slice::from_raw_parts(s, cols));
                for (j, a) in acc_i.iter_mut().enumerate() {
                    *a = V::load(tmp.as_ptr().add(j * V::LANES));
                }
            }
        }
        acc
    }
}

/// Writes the first `rows` × `cols` entries of `acc` to dst (row stride ld), or adds them to
/// what is there (dst + acc) with `accumulate`.
///
/// SAFETY (caller): dst is valid for `rows` rows of `cols` elements, `ld` apart, and nothing
/// else accesses them; `cols` ≤ NV·LANES ≤ 64; the CPU runs `V`.
#[inline(always)]
pub(super) unsafe fn put<V: Vector, const NV: usize>(
    acc: &Tile<V, NV>,
    dst: *mut V::E,
    ld: usize,
    (rows, cols): (usize, usize),
    accumulate: bool,
) {
    unsafe {
        let full = cols == NV * V::LANES;
        for (i, acc_i) in acc.iter().enumerate().take(rows) {
            let d = dst.add(i * ld);
            if full {
                for (j, &v) in acc_i.iter().enumerate() {
                    let dj = d.add(j * V::LANES);
                    let v = if accumulate { V::load(dj).add(v) } else { v };
                    v.store(dj);
                }
            } else {
                let mut tmp = [<V::E as num_traits::Zero>::zero(); 64];
                for (j, &v) in acc_i.iter().enumerate() {
                    v.store(tmp.as_mut_ptr().add(j * V::LANES));
                }
                for (j, &t) in tmp.iter().enumerate().take(cols) {
                    let dj = d.add(j);
                    *dj = if accumulate { *dj + t } else { t };
                }
            }
        }
    }
}

/// The shapes of one call: the grid, the channels, and B's row stride (columns padded to a
/// whole number of tiles where needed).
#[derive(Clone, Copy)]
struct Shape {
    g: Grid,
    cin: usize,
    cout: usize,
    ldb: usize,
}

/// Output rows p0.. (`out`: whole rows of cout) of the convolution of `src` with the weight
/// `wp` (9·cin rows of `ldb` ≥ cout, readable to a whole number of NV·LANES columns), plus the
/// bias (`ldb` elements) where given.
///
/// SAFETY (caller): `zero` holds cin zeros; src is the (b·h·w, cin) input; wp as stated; the
/// CPU runs `V`; NV·LANES ≤ 64.
#[inline(always)]
unsafe fn conv_rows<V: Vector, const NV: usize>(
    out: &mut [V::E],
    p0: usize,
    accumulate: bool,
    src: &[V::E],
    zero: &[V::E],
    (wp, bias): (&[V::E], Option<&[V::E]>),
    s: Shape,
) {
    let (g, n) = (s.g, NV * V::LANES);
    let rows = out.len() / s.cout;
    for col in (0..s.cout).step_by(n) {
        let cols = n.min(s.cout - col);
        for r in (0..rows).step_by(R) {
            let nr = R.min(rows - r);
            // each tap's row of each of the tile's pixels (rows past the end repeat the last
            // one: computed, not stored)
            let mut a = [[zero.as_ptr(); R]; 9];
            for i in 0..R {
                let p = p0 + r + i.min(nr - 1);
                let (x, y) = (p % g.w, p / g.w % g.h);
                for (t, at) in a.iter_mut().enumerate() {
                    let (dy, dx) = (t / 3, t % 3);
                    if (1..=g.h).contains(&(y + dy)) && (1..=g.w).contains(&(x + dx)) {
                        // the pixel (y + dy − 1, x + dx − 1) of p's image
                        at[i] = src[(p + dy * g.w + dx - g.w - 1) * s.cin..].as_ptr();
                    }
                }
            }
            // SAFETY: each a[t][i] is src's row of an in-image pixel (cin elements follow) or
            // `zero` (cin elements); wp has 9·cin rows of ldb elements with the columns
            // col..col + n readable (the caller's padding); out has the rows r..r + nr of cout
            // elements, columns col..col + cols.
            unsafe {
                let zero_tile = [[V::zero(); NV]; R];
                let mut acc =
                    conv_tile::<V, NV>(zero_tile, &a, 0..9, wp.as_ptr().add(col), s.ldb, s.cin);
                if let Some(bias) = bias {
                    // the bias (padded to ldb, like wp's rows) added to each finished sum
                    let bv: [V; NV] =
                        std::array::from_fn(|j| V::load(bias[col + j * V::LANES..].as_ptr()));
                    for acc_i in acc.iter_mut() {
                        for (v, &b) in acc_i.iter_mut().zip(&bv) {
                            *v = v.add(b);
                        }
                    }
                }
                let dst = out.as_mut_ptr().add(r * s.cout + col);
                put(&acc, dst, s.cout, (nr, cols), accumulate);
            }
        }
    }
}

/// Adds to `part` (dW, 9·cin × cout, rows of cout) the terms of the image rows `rows` (global
/// rows img·h + y), one image row at a time: its pixels' rows of gy and the three image rows
/// of src its taps read stay in L1 while every (tap, channel, column) tile takes them.
///
/// SAFETY (caller): src is (b·h·w, cin); gy (b·h·w) rows of `s.ldb` ≥ cout, readable to a
/// whole number of NV·LANES columns; `part` holds 9·cin·cout; the CPU runs `V`; NV·LANES ≤ 64.
#[inline(always)]
unsafe fn dw_rows<V: Vector, const NV: usize>(
    part: &mut [V::E],
    rows: std::ops::Range<usize>,
    src: &[V::E],
    gy: &[V::E],
    s: Shape,
) {
    let (g, n, cin) = (s.g, NV * V::LANES, s.cin);
    // image columns whose tap column dx (0, 1, 2: offset −1, 0, +1) is inside the image
    let (x_lo, x_hi) = (|dx| usize::from(dx == 0), |dx| g.w - usize::from(dx == 2));
    for gr in rows {
        let y = gr % g.h;
        for t in 0..9 {
            let (dy, dx) = (t / 3, t % 3);
            if !(1..=g.h).contains(&(y + dy)) || x_lo(dx) >= x_hi(dx) {
                continue;
            }
            let p = gr * g.w + x_lo(dx);
            let run = Run {
                q: p + dy * g.w + dx - g.w - 1,
                p,
                len: x_hi(dx) - x_lo(dx),
            };
            for col in (0..s.cout).step_by(n) {
                let cols = n.min(s.cout - col);
                for c0 in (0..cin).step_by(R) {
                    let nr = R.min(cin - c0);
                    // channels past the end repeat the last one (computed, not stored)
                    let cs: [usize; R] = std::array::from_fn(|i| c0 + i.min(nr - 1));
                    // SAFETY: the run's pixels q.. and p.. are in-image pixels (< b·h·w), each
                    // cs[i] < cin; gy's rows have the columns col..col + n readable (the
                    // caller's padding); part has the rows t·cin + c0 + i < 9·cin of cout
                    // elements, columns col..col + cols, whose first nr × cols entries are
                    // read into the tile and written back.
                    unsafe {
                        let dst = part.as_mut_ptr().add((t * cin + c0) * s.cout + col);
                        let init = get::<V, NV>(dst, s.cout, (nr, cols));
                        let acc = dw_tile::<V, NV>(
                            init,
                            src.as_ptr(),
                            cin,
                            &cs,
                            gy.as_ptr().add(col),
                            s.ldb,
                            run,
                        );
                        put(&acc, dst, s.cout, (nr, cols), false);
                    }
                }
            }
        }
    }
}

/// Whether E is f32 (the SIMD instances and the AMX path are f32 only).
pub(super) fn is_f32<E: Elem>() -> bool {
    std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()
}

/// `v` seen as f32 (E is f32: checked).
#[cfg(target_arch = "x86_64")]
pub(super) fn f32s<E: Elem>(v: &[E]) -> &[f32] {
    assert!(is_f32::<E>());
    // SAFETY: E is f32 (checked), so the slice's memory is `len` f32s.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) }
}

/// `v` seen as f32 (E is f32: checked), from the unique borrow.
#[cfg(target_arch = "x86_64")]
pub(super) fn f32s_mut<E: Elem>(v: &mut [E]) -> &mut [f32] {
    assert!(is_f32::<E>());
    // SAFETY: as in `f32s`, from the unique borrow.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len()) }
}

/// The instances, one per [`Isa`] level: (columns of one tile, forward rows, dW rows).
pub(super) mod dispatch {
    use super::*;

    /// Columns of one tile at `lv` for element type E.
    pub(in crate::kernels) fn width<E: Elem>(lv: Level) -> usize {
        match (is_f32::<E>(), lv.isa()) {
            (true, Isa::Avx512 | Isa::Amx) => 64,
            (true, Isa::Avx2) => 16,
            _ => 16,
        }
    }

    /// [`conv_rows`] at `lv`; `s.ldb` and wp's padding follow [`width`]`::<E>(lv)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rows<E: Elem>(
        lv: Level,
        out: &mut [E],
        p0: usize,
        accumulate: bool,
        src: &[E],
        zero: &[E],
        (wp, bias): (&[E], Option<&[E]>),
        s: Shape,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            type W<'a> = (&'a [f32], Option<&'a [f32]>);
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512(
                o: &mut [f32],
                p0: usize,
                acc: bool,
                x: &[f32],
                z: &[f32],
                w: W<'_>,
                s: Shape,
            ) {
                unsafe { conv_rows::<x86::Zmm, 4>(o, p0, acc, x, z, w, s) }
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(
                o: &mut [f32],
                p0: usize,
                acc: bool,
                x: &[f32],
                z: &[f32],
                w: W<'_>,
                s: Shape,
            ) {
                unsafe { conv_rows::<x86::Ymm, 2>(o, p0, acc, x, z, w, s) }
            }
            if is_f32::<E>() {
                let (o, x, z) = (f32s_mut(out), f32s(src), f32s(zero));
                let w = (f32s(wp), bias.map(f32s));
                match lv.isa() {
                    // SAFETY: a `Level` at Avx512 or above exists only where the CPU runs
                    // AVX-512 F, AVX2 and FMA (`isa::detected`); the rest as `conv_rows` asks,
                    // from the caller (wp padded to 64 columns, `width`).
                    Isa::Avx512 | Isa::Amx => {
                        return unsafe { avx512(o, p0, accumulate, x, z, w, s) }
                    }
                    // SAFETY: as above for AVX2 and FMA (16 columns).
                    Isa::Avx2 => return unsafe { avx2(o, p0, accumulate, x, z, w, s) },
                    Isa::Portable => {}
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = lv;
        // SAFETY: the portable instance needs no CPU feature; the rest as `conv_rows` asks,
        // from the caller (wp padded to 16 columns, `width`).
        unsafe { conv_rows::<Scalar<E>, 16>(out, p0, accumulate, src, zero, (wp, bias), s) }
    }

    /// [`dw_rows`] at `lv`; gy's row stride `s.ldb` and padding follow [`width`]`::<E>(lv)`.
    pub(super) fn dw<E: Elem>(
        lv: Level,
        part: &mut [E],
        rows: std::ops::Range<usize>,
        src: &[E],
        gy: &[E],
        s: Shape,
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn avx512(
                p: &mut [f32],
                r: std::ops::Range<usize>,
                x: &[f32],
                gy: &[f32],
                s: Shape,
            ) {
                unsafe { dw_rows::<x86::Zmm, 4>(p, r, x, gy, s) }
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(
                p: &mut [f32],
                r: std::ops::Range<usize>,
                x: &[f32],
                gy: &[f32],
                s: Shape,
            ) {
                unsafe { dw_rows::<x86::Ymm, 2>(p, r, x, gy, s) }
            }
            if is_f32::<E>() {
                let (p, x, g) = (f32s_mut(part), f32s(src), f32s(gy));
                match lv.isa() {
                    // SAFETY: as in `rows`.
                    Isa::Avx512 | Isa::Amx => return unsafe { avx512(p, rows, x, g, s) },
                    // SAFETY: as in `rows`.
                    Isa::Avx2 => return unsafe { avx2(p, rows, x, g, s) },
                    Isa::Portable => {}
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = lv;
        // SAFETY: as in `rows`.
        unsafe { dw_rows::<Scalar<E>, 16>(part, rows, src, gy, s) }
    }
}

/// A buffer of `len` elements (zeros) whose element 0 sits on a cache line: the tiles'
/// 64-byte loads of its rows then never straddle two lines (malloc aligns to 16 bytes).
pub(super) struct Aligned<E> {
    buf: Vec<E>,
    off: usize,
    len: usize,
}

impl<E: Elem> Aligned<E> {
    pub(super) fn zeros(len: usize) -> Self {
        let buf = vec![E::zero(); len + 64 / std::mem::size_of::<E>()];
        let off = buf.as_ptr().align_offset(64).min(buf.len() - len);
        Aligned { buf, off, len }
    }
    pub(super) fn get(&self) -> &[E] {
        &self.buf[self.off..self.off + self.len]
    }
    pub(super) fn get_mut(&mut self) -> &mut [E] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// `m` rows of `cols` elements copied into rows of `ld` ≥ cols (zeros after), starting on a
/// cache line.
pub(super) fn padded<E: Elem>(v: &[E], cols: usize, ld: usize) -> Aligned<E> {
    let m = v.len() / cols.max(1);
    let mut out = Aligned::zeros(m * ld);
    out.get_mut()
        .par_chunks_mut(ld * 256)
        .zip(v.par_chunks(cols * 256))
        .for_each(|(o, s)| {
            for (or, sr) in o.chunks_exact_mut(ld).zip(s.chunks_exact(cols)) {
                or[..cols].copy_from_slice(sr);
            }
        });
    out
}

/// dst (b·h·w, cout) = [dst +] (conv3x3(src, wt) [+ bias]) for src (b·h·w, cin), wt (9·cin,
/// cout), bias (cout).
#[allow(clippy::too_many_arguments)]
pub(super) fn conv<E: Elem>(
    lv: Level,
    dst: &mut [E],
    accumulate: bool,
    src: &[E],
    wt: &[E],
    bias: Option<&[E]>,
    g: Grid,
    (cin, cout): (usize, usize),
) {
    let m = g.pixels();
    assert!(dst.len() == m * cout && src.len() == m * cin && wt.len() == 9 * cin * cout);
    assert!(bias.is_none_or(|b| b.len() == cout));
    if m == 0 || cout == 0 {
        return;
    }
    let n = dispatch::width::<E>(lv);
    let ldb = cout.next_multiple_of(n);
    let (wp, bp) = (padded(wt, cout, ldb), bias.map(|b| padded(b, cout, ldb)));
    let (wp, bp) = (wp.get(), bp.as_ref().map(|b| b.get()));
    let zero = vec![E::zero(); cin];
    let s = Shape { g, cin, cout, ldb };
    dst.par_chunks_mut(TASK_ROWS * cout)
        .enumerate()
        .for_each(|(t, out)| {
            dispatch::rows(lv, out, t * TASK_ROWS, accumulate, src, &zero, (wp, bp), s)
        });
}

/// gw (9·cin, cout) += dW = Σ_p im2col(src)[p]ᵀ·gy[p] for src (b·h·w, cin), gy (b·h·w, cout).
pub(super) fn conv_dw<E: Elem>(
    lv: Level,
    gw: &mut [E],
    src: &[E],
    gy: &[E],
    g: Grid,
    (cin, cout): (usize, usize),
) {
    let m = g.pixels();
    assert!(gw.len() == 9 * cin * cout && src.len() == m * cin && gy.len() == m * cout);
    let size = 9 * cin * cout;
    if m == 0 || size == 0 {
        return;
    }
    let n = dispatch::width::<E>(lv);
    let ldb = cout.next_multiple_of(n);
    let gyp = padded(gy, cout, ldb);
    let gyp = gyp.get();
    let s = Shape { g, cin, cout, ldb };
    // whole image rows per chunk, fixed by the shape alone (never the thread count)
    let image_rows = g.b * g.h;
    let per = DW_PIXELS.max(m.div_ceil(64)).div_ceil(g.w).min(image_rows);
    let chunks = image_rows.div_ceil(per);
    let mut parts = vec![E::zero(); chunks * size];
    parts
        .par_chunks_mut(size)
        .enumerate()
        .for_each(|(k, part)| {
            let rows = k * per..((k + 1) * per).min(image_rows);
            dispatch::dw(lv, part, rows, src, gyp, s)
        });
    // gw += (((P0 + P1) + P2) + …), element by element
    gw.par_chunks_mut(4096).enumerate().for_each(|(k, d)| {
        for (i, di) in d.iter_mut().enumerate() {
            let e = k * 4096 + i;
            let mut sum = parts[e];
            for c in 1..chunks {
                sum += parts[c * size + e];
            }
            *di += sum;
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::kernels::isa::{self, Level};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// (b, h, w, cin, cout): channel counts off the tile sizes (6 rows; 16 and 64 columns) and
    /// past 64 output columns, one pixel, single-column and single-row images, and a grid
    /// spanning many forward tasks and several dW chunks.
    const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
        (2, 9, 11, 7, 70),
        (1, 1, 1, 3, 5),
        (3, 5, 1, 13, 17),
        (1, 1, 6, 6, 64),
        (2, 40, 30, 5, 3),
        (1, 3, 4, 0, 2),
    ];

    /// The in-image taps (t, q) of pixel p.
    fn taps(p: usize, g: Grid) -> Vec<(usize, usize)> {
        let (img, y, x) = (p / (g.h * g.w), p / g.w % g.h, p % g.w);
        (0..9)
            .filter_map(|t| {
                let (yy, xx) = ((y + t / 3).checked_sub(1)?, (x + t % 3).checked_sub(1)?);
                (yy < g.h && xx < g.w)
                    .then_some(t)
                    .map(|t| (t, (img * g.h + yy) * g.w + xx))
            })
            .collect()
    }

    /// The convolution and dW by their definitions in f64, each with the sum of its terms'
    /// magnitudes (the scale of an f32 sum's rounding error).
    #[allow(clippy::type_complexity)]
    pub(crate) fn definition(
        (x, w, gy): (&[f64], &[f64], &[f64]),
        g: Grid,
        (cin, cout): (usize, usize),
    ) -> ((Vec<f64>, Vec<f64>), (Vec<f64>, Vec<f64>)) {
        let m = g.pixels();
        let (mut y, mut ya) = (vec![0.0; m * cout], vec![0.0; m * cout]);
        let (mut dw, mut dwa) = (vec![0.0; 9 * cin * cout], vec![0.0; 9 * cin * cout]);
        for p in 0..m {
            for (t, q) in taps(p, g) {
                for c in 0..cin {
                    for o in 0..cout {
                        let xv = x[q * cin + c];
                        let term = xv * w[(t * cin + c) * cout + o];
                        y[p * cout + o] += term;
                        ya[p * cout + o] += term.abs();
                        let term = xv * gy[p * cout + o];
                        dw[(t * cin + c) * cout + o] += term;
                        dwa[(t * cin + c) * cout + o] += term.abs();
                    }
                }
            }
        }
        ((y, ya), (dw, dwa))
    }

    fn rand(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.5f32..1.5)).collect()
    }

    pub(crate) fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    /// A convolution's forward and dW functions (f32), as [`conv`] and [`conv_dw`].
    pub(crate) type Kernel = (
        fn(Level, &mut [f32], bool, &[f32], &[f32], Option<&[f32]>, Grid, (usize, usize)),
        fn(Level, &mut [f32], &[f32], &[f32], Grid, (usize, usize)),
    );

    /// At every level and thread count, on each shape (b, h, w, cin, cout) with inputs uniform in
    /// ±1.5 from `seed`: conv(x, w) + bias, dst + conv(x, w) and gw + dW within
    /// `tol`·(Σ|terms| + |addend| + 1)·(terms per sum) of the f64 definition, and the same bits
    /// as the first level on one thread.
    pub(crate) fn check_kernel(
        (conv, conv_dw): Kernel,
        shapes: &[(usize, usize, usize, usize, usize)],
        tol: f64,
        seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        for &(b, h, w, cin, cout) in shapes {
            let g = Grid { b, h, w };
            let m = g.pixels();
            let (x, wt, gy) = (
                rand(&mut rng, m * cin),
                rand(&mut rng, 9 * cin * cout),
                rand(&mut rng, m * cout),
            );
            let (d0, g0) = (rand(&mut rng, m * cout), rand(&mut rng, 9 * cin * cout));
            let bias = rand(&mut rng, cout);
            let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
            let ((y, ya), (dw, dwa)) =
                definition((&f64s(&x), &f64s(&wt), &f64s(&gy)), g, (cin, cout));
            let within = |got: &[f32],
                          add: &[f32],
                          (want, abs): (&[f64], &[f64]),
                          terms: usize,
                          what: &str| {
                for (i, ((&v, &v0), (&e, &a))) in
                    got.iter().zip(add).zip(want.iter().zip(abs)).enumerate()
                {
                    let v0 = f64::from(v0);
                    let bound = tol * (a + v0.abs() + 1.0) * terms as f64;
                    let want = v0 + e;
                    assert!(
                        (f64::from(v) - want).abs() <= bound,
                        "{what}[{i}] {v} vs {want}"
                    );
                }
            };
            let biases: Vec<f32> = (0..m * cout).map(|i| bias[i % cout]).collect();
            let mut first: Option<(Vec<f32>, Vec<f32>, Vec<f32>)> = None;
            for lv in isa::supported() {
                for threads in [1, 3] {
                    let run = || {
                        let mut fresh = vec![f32::NAN; m * cout];
                        conv(lv, &mut fresh, false, &x, &wt, Some(&bias), g, (cin, cout));
                        let mut acc = d0.clone();
                        conv(lv, &mut acc, true, &x, &wt, None, g, (cin, cout));
                        let mut gw = g0.clone();
                        conv_dw(lv, &mut gw, &x, &gy, g, (cin, cout));
                        (fresh, acc, gw)
                    };
                    let got = in_pool(threads, run);
                    let what = format!("{lv:?}, {threads} threads, {:?}", (b, h, w, cin, cout));
                    within(&got.0, &biases, (&y, &ya), 9 * cin, &format!("y, {what}"));
                    within(&got.1, &d0, (&y, &ya), 9 * cin, &format!("acc, {what}"));
                    within(&got.2, &g0, (&dw, &dwa), m, &format!("dw, {what}"));
                    match &first {
                        None => first = Some(got),
                        Some(f) => {
                            let bits =
                                |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                            assert_eq!(bits(&got.0), bits(&f.0), "y bits, {what}");
                            assert_eq!(bits(&got.1), bits(&f.1), "acc bits, {what}");
                            assert_eq!(bits(&got.2), bits(&f.2), "dw bits, {what}");
                        }
                    }
                }
            }
        }
    }

    /// [`check_kernel`] for the direct kernels: f32 rounding of the f64 definition (each output
    /// one FMA chain), the same bits at every level and thread count.
    #[test]
    fn direct_matches_the_definition_at_every_level_and_thread_count() {
        check_kernel((conv::<f32>, conv_dw::<f32>), &SHAPES, 1e-6, 11);
    }

    /// GFLOP/s of the forward and dW kernels at `unet-small`'s layer shape (batch 16 × 28 × 28,
    /// 64 → 64 channels): `cargo test --release -p maskdiff-network --lib -- direct_timing
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn direct_timing() {
        let g = Grid {
            b: 16,
            h: 28,
            w: 28,
        };
        let m = g.pixels();
        for (cin, cout) in [(64, 64), (128, 64), (64, 256)] {
            let x: Vec<f32> = (0..m * cin).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..9 * cin * cout).map(|i| (i % 5) as f32 * 0.01).collect();
            let gy: Vec<f32> = (0..m * cout).map(|i| (i % 3) as f32 * 0.1).collect();
            let mut y = vec![0f32; m * cout];
            let mut gw = vec![0f32; 9 * cin * cout];
            let lv = isa::level();
            let flop = 2.0 * (m * 9 * cin * cout) as f64;
            let best = |f: &mut dyn FnMut()| super::super::test_util::best_of(5, f);
            let tf = best(&mut || conv(lv, &mut y, false, &x, &w, None, g, (cin, cout)));
            let tw = best(&mut || conv_dw(lv, &mut gw, &x, &gy, g, (cin, cout)));
            eprintln!(
                "{lv:?} {cin}→{cout}: forward {:.2} ms {:.0} GFLOP/s, dW {:.2} ms {:.0} GFLOP/s",
                tf * 1e3,
                flop / tf / 1e9,
                tw * 1e3,
                flop / tw / 1e9
            );
        }
    }
}
