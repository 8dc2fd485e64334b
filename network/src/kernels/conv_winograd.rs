//! The 3×3 "same" convolution (spec §7.3's U-Net) by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016): the forward
//! and dX products of [`super::conv`] in f32 and f64 when both channel counts are ≥ 16.
//!
//! Each 2×2 block of output pixels (a tile) is Aᵀ[Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)]A, d_c the tile's
//! 4×4 neighbourhood in input channel c (zeros outside the image), g_c the 3×3 kernel from c,
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],
//! Aᵀ = [1 1 1 0; 0 1 −1 −1]. Over all tiles and channels the 16 element-wise products are 16
//! matrix products V_ξ (tiles × cin) · U_ξ (cin × cout): 16 multiply-adds per tile and channel
//! pair where the direct convolution ([`super::conv_direct`]) spends 36, 2.25× fewer.
//!
//! A task owns whole rows of tiles (a contiguous range of output pixels); it transforms blocks of
//! ≤ [`BLOCK`] tiles into V (16 × tiles × cin), multiplies each slice by U (made once per call)
//! with the direct kernel's register tiles (one tap), and transforms M (16 × tiles × cout) back
//! into its output rows, so V and M of a block stay in the core's L2.
//!
//! The transforms are fixed sequences of additions (and exact scalings by ½ and ¼), the products
//! the direct kernel's fixed-order FMA chains, so every [`super::isa`] level gives the same bits
//! at any thread count. The rounding is not the direct convolution's (the transforms add inputs
//! before multiplying); the tests hold both to the f64 definition.

use super::conv::Grid;
use super::conv_direct::{
    conv_tile, dispatch::width, dw_tile, get, put, Aligned, Run, Scalar, Tile, Vector, R,
};
#[cfg(target_arch = "x86_64")]
use super::conv_direct::{f32s, f32s_mut, is_f32, x86};
#[cfg(target_arch = "x86_64")]
use super::isa::Isa;
use super::isa::Level;
use crate::Elem;
use rayon::prelude::*;

/// Tiles per block: V and M of 64 channels are 16 · 48 · 64 · 4 B = 196 KB each.
const BLOCK: usize = 48;

/// Whether the transforms pay for themselves: with fewer than 16 channels on either side they
/// cost more than the products they save.
pub(super) fn pays(cin: usize, cout: usize) -> bool {
    cin >= 16 && cout >= 16
}

/// The rows of Bᵀ (and of B's columns) as (i, j, plus): row = d_i + d_j or d_i − d_j.
const BT: [(usize, usize, bool); 4] = [(0, 2, false), (1, 2, true), (2, 1, false), (1, 3, false)];

/// Bᵀ of F(3 × 3, 2 × 2), the weight gradient's input transform: as [`BT`] but for its last
/// row, [0 −1 0 1].
const BT_DW: [(usize, usize, bool); 4] =
    [(0, 2, false), (1, 2, true), (2, 1, false), (3, 1, false)];

/// G's rows (3 taps each).
const G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// U: 16 slices ξ = 4r + k of cin rows × ldb, U_ξ[c][o] = Σ_{ky,kx} G[r][ky]·G[k][kx]·W[(3ky +
/// kx)·cin + c][o] (the coefficients are 0, ±¼, ±½, 1: exact products), taps in order; the
/// columns past cout are zero.
fn transformed_weight<E: Elem>(wt: &[E], (cin, cout): (usize, usize), ldb: usize) -> Aligned<E> {
    let mut u = Aligned::zeros(16 * cin * ldb);
    u.get_mut()
        .par_chunks_mut((cin * ldb).max(1))
        .enumerate()
        .for_each(|(xi, slice)| {
            let (r, k) = (xi / 4, xi % 4);
            for (c, row) in slice.chunks_exact_mut(ldb).enumerate() {
                let row = &mut row[..cout];
                for t in 0..9 {
                    let f = G[r][t / 3] * G[k][t % 3];
                    if f == 0.0 {
                        continue;
                    }
                    let (f, g) = (E::c(f), &wt[(t * cin + c) * cout..][..cout]);
                    for (u, &g) in row.iter_mut().zip(g) {
                        *u += f * g;
                    }
                }
            }
        });
    u
}

/// A task's working memory (one per worker, reused across its tasks).
struct Scratch<E> {
    /// V: 16 slices of BLOCK rows × cin.
    v: Vec<E>,
    /// M: 16 slices of BLOCK rows × ldb (cache-line aligned rows for the tile stores).
    m: Aligned<E>,
    /// Bᵀ d of one tile: 16 rows × cin.
    t: Vec<E>,
    /// Aᵀ M of one tile: 8 rows × cout.
    s: Vec<E>,
    /// One output pixel's row (cout).
    y: Vec<E>,
}

impl<E: Elem> Scratch<E> {
    fn new(d: Dims) -> Self {
        Scratch {
            v: vec![E::zero(); 16 * BLOCK * d.cin],
            m: Aligned::zeros(16 * BLOCK * d.ldb),
            t: vec![E::zero(); 16 * d.cin],
            s: vec![E::zero(); 8 * d.cout],
            y: vec![E::zero(); d.cout],
        }
    }
}

/// The shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    g: Grid,
    cin: usize,
    cout: usize,
    /// U's and M's row stride: cout rounded up to the tile width.
    ldb: usize,
}

impl Dims {
    /// Tile rows and columns per image.
    fn tiles(self) -> (usize, usize) {
        (self.g.h.div_ceil(2), self.g.w.div_ceil(2))
    }
    /// The rows of tile (tr, tx)'s 4×4 input neighbourhood, position q = 4i + k being pixel
    /// (y0 − 1 + i, x0 − 1 + k) of `src` (rows of c = zero.len()) or `zero` outside the image.
    #[inline(always)]
    fn neighbourhood<'a, E>(
        self,
        src: &'a [E],
        zero: &'a [E],
        (tr, tx): (usize, usize),
    ) -> [&'a [E]; 16] {
        self.pixel_rows(src, zero, (tr, tx), 4, 1)
    }
    /// The `side` × `side` rows of `src` (rows of c = zero.len()) from pixel (y0 − back,
    /// x0 − back) of tile (tr, tx), row by row; `zero` outside the image (unused entries
    /// past side² are `zero` too).
    #[inline(always)]
    fn pixel_rows<'a, E>(
        self,
        src: &'a [E],
        zero: &'a [E],
        (tr, tx): (usize, usize),
        side: usize,
        back: usize,
    ) -> [&'a [E]; 16] {
        let (g, c) = (self.g, zero.len());
        let (th, _) = self.tiles();
        let (img, y0) = (tr / th, 2 * (tr % th));
        let mut rows = [zero; 16];
        for i in 0..side {
            let y = (y0 + i).wrapping_sub(back);
            if y >= g.h {
                continue;
            }
            let base = (img * g.h + y) * g.w;
            for k in 0..side {
                let x = (2 * tx + k).wrapping_sub(back);
                if x < g.w {
                    rows[i * side + k] = &src[(base + x) * c..(base + x + 1) * c];
                }
            }
        }
        rows
    }
    /// The first output pixel of global tile row `tr` and its image rows (2, or 1 at an odd
    /// image's last).
    fn tile_row(self, tr: usize) -> (usize, usize) {
        let (th, _) = self.tiles();
        let (img, ty) = (tr / th, tr % th);
        (
            (img * self.g.h + 2 * ty) * self.g.w,
            2.min(self.g.h - 2 * ty),
        )
    }
}

/// The output rows of the tile rows `trs` (`out` starts at the first one's first pixel): V, the
/// 16 products, M's inverse transform, plus the bias, written or (`accumulate`) added.
///
/// SAFETY (caller): `u` holds 16·cin rows of d.ldb elements (d.ldb a multiple of NV·LANES);
/// src is (b·h·w, cin) and `zero` cin zeros; `out` covers exactly the pixels of `trs` (rows of
/// cout); the CPU runs `V`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_rows<V: Vector, const NV: usize>(
    out: &mut [V::E],
    trs: std::ops::Range<usize>,
    accumulate: bool,
    scr: &mut Scratch<V::E>,
    (src, zero): (&[V::E], &[V::E]),
    (u, bias): (&[V::E], Option<&[V::E]>),
    d: Dims,
) {
    let (g, cin, cout, ldb) = (d.g, d.cin, d.cout, d.ldb);
    let (_, tw) = d.tiles();
    let n = NV * V::LANES;
    let pix0 = d.tile_row(trs.start).0;
    // the task's tiles as (tile row, tile column), in blocks
    let tiles: Vec<(usize, usize)> = trs.flat_map(|tr| (0..tw).map(move |tx| (tr, tx))).collect();
    for block in tiles.chunks(BLOCK) {
        let nt = block.len();
        // V = Bᵀ d B per tile (V_ξ: BLOCK rows of cin, tile j's row at (ξ·BLOCK + j)·cin)
        for (j, &(tr, tx)) in block.iter().enumerate() {
            let rows = d.neighbourhood(src, zero, (tr, tx));
            input_transform(&BT, &mut scr.v[j * cin..], BLOCK * cin, &rows, &mut scr.t);
        }
        // M_ξ = V_ξ · U_ξ (M_ξ: BLOCK rows of ldb)
        for xi in 0..16 {
            for col in (0..cout).step_by(n) {
                for r0 in (0..nt).step_by(R) {
                    let nr = R.min(nt - r0);
                    let mut a = [[zero.as_ptr(); R]; 9];
                    for (i, ai) in a[0].iter_mut().enumerate() {
                        // rows past the block's end repeat its last (computed, not stored)
                        *ai = scr.v[(xi * BLOCK + r0 + i.min(nr - 1)) * cin..].as_ptr();
                    }
                    // SAFETY: each a[0][i] is a V row of cin elements; U_ξ's cin rows of ldb
                    // have the columns col..col + n readable (ldb is a multiple of n); M_ξ has
                    // the rows r0..r0 + nr ≤ BLOCK of ldb elements, columns col..col + n.
                    unsafe {
                        let b = u.as_ptr().add(xi * cin * ldb + col);
                        let acc: Tile<V, NV> =
                            conv_tile([[V::zero(); NV]; R], &a, 0..1, b, ldb, cin);
                        let m = scr.m.get_mut().as_mut_ptr();
                        let dst = m.add((xi * BLOCK + r0) * ldb + col);
                        put(&acc, dst, ldb, (nr, n), false);
                    }
                }
            }
        }
        // Y = Aᵀ M A per tile, into the output rows
        let m = scr.m.get();
        for (j, &(tr, tx)) in block.iter().enumerate() {
            let (p, rows) = d.tile_row(tr);
            let cols = 2.min(g.w - 2 * tx);
            let mut dst: [[Option<&mut [V::E]>; 2]; 2] = Default::default();
            let (mut rest, mut at) = (&mut out[..], pix0);
            // the tile's in-image pixels, in order (rows i, columns kk)
            for (i, dst_i) in dst.iter_mut().enumerate().take(rows) {
                for (kk, slot) in dst_i.iter_mut().enumerate().take(cols) {
                    let q = p + i * g.w + 2 * tx + kk;
                    let tail = std::mem::take(&mut rest);
                    let (_, from_q) = tail.split_at_mut((q - at) * cout);
                    let (row, after) = from_q.split_at_mut(cout);
                    *slot = Some(row);
                    (rest, at) = (after, q + 1);
                }
            }
            let sy = (&mut scr.s[..], &mut scr.y[..]);
            output_transform(&mut dst, &m[j * ldb..], BLOCK * ldb, sy, bias, accumulate);
        }
    }
}

/// out = a + b or a − b.
#[inline(always)]
fn comb<E: Elem>(out: &mut [E], a: &[E], b: &[E], plus: bool) {
    let it = out.iter_mut().zip(a).zip(b);
    if plus {
        it.for_each(|((o, &a), &b)| *o = a + b);
    } else {
        it.for_each(|((o, &a), &b)| *o = a - b);
    }
}

/// out = (a + b) + c or (a − b) − c.
#[inline(always)]
fn comb3<E: Elem>(out: &mut [E], a: &[E], b: &[E], c: &[E], plus: bool) {
    let it = out.iter_mut().zip(a).zip(b).zip(c);
    if plus {
        it.for_each(|(((o, &a), &b), &c)| *o = a + b + c);
    } else {
        it.for_each(|(((o, &a), &b), &c)| *o = a - b - c);
    }
}

/// V (16 rows of cin, `stride` apart) = Bᵀ d B (Bᵀ's rows `bt`) for the tile's 16 input rows d
/// (row q = 4i + k), through `t` (16 rows of cin): one pass over the channels per row of each
/// product.
#[inline(always)]
fn input_transform<E: Elem>(
    bt: &[(usize, usize, bool); 4],
    v: &mut [E],
    stride: usize,
    d: &[&[E]; 16],
    t: &mut [E],
) {
    let cin = t.len() / 16;
    // rows: t[4i + k] = d[4a + k] ± d[4b + k]
    for k in 0..4 {
        for (i, &(a, b, plus)) in bt.iter().enumerate() {
            comb(
                &mut t[(4 * i + k) * cin..][..cin],
                d[4 * a + k],
                d[4 * b + k],
                plus,
            );
        }
    }
    // columns: v[4i + k] = t[4i + a] ± t[4i + b]
    for i in 0..4 {
        for (k, &(a, b, plus)) in bt.iter().enumerate() {
            let (ta, tb) = (
                &t[(4 * i + a) * cin..][..cin],
                &t[(4 * i + b) * cin..][..cin],
            );
            comb(&mut v[(4 * i + k) * stride..][..cin], ta, tb, plus);
        }
    }
}

/// The tile's output rows (`dst[i][kk]`: pixel (y0 + i, x0 + kk), absent outside the image)
/// from its 16 M rows (row ξ at ξ·stride) through `s` (8 rows of cout) and `y` (cout):
/// Y = Aᵀ M A [+ bias], written or added (dst + (Y + bias), the direct kernel's order).
#[inline(always)]
fn output_transform<E: Elem>(
    dst: &mut [[Option<&mut [E]>; 2]; 2],
    m: &[E],
    stride: usize,
    (s, y): (&mut [E], &mut [E]),
    bias: Option<&[E]>,
    accumulate: bool,
) {
    let cout = y.len();
    let row = |xi: usize| &m[xi * stride..][..cout];
    // rows: s[0][k] = (m[0][k] + m[1][k]) + m[2][k], s[1][k] = (m[1][k] − m[2][k]) − m[3][k]
    for k in 0..4 {
        let (top, bottom) = s.split_at_mut(4 * cout);
        comb3(
            &mut top[k * cout..][..cout],
            row(k),
            row(4 + k),
            row(8 + k),
            true,
        );
        comb3(
            &mut bottom[k * cout..][..cout],
            row(4 + k),
            row(8 + k),
            row(12 + k),
            false,
        );
    }
    for (i, dst_i) in dst.iter_mut().enumerate() {
        let srow = |k: usize| &s[(4 * i + k) * cout..][..cout];
        for (kk, slot) in dst_i.iter_mut().enumerate() {
            let Some(out) = slot else { continue };
            comb3(y, srow(kk), srow(kk + 1), srow(kk + 2), kk == 0);
            match (bias, accumulate) {
                (Some(b), false) => comb(out, y, b, true),
                (Some(b), true) => {
                    let it = out.iter_mut().zip(&*y).zip(b);
                    it.for_each(|((o, &y), &b)| *o += y + b);
                }
                (None, false) => out.copy_from_slice(y),
                (None, true) => out.iter_mut().zip(&*y).for_each(|(o, &y)| *o += y),
            }
        }
    }
}

/// [`tile_rows`] at `lv` (U's row stride follows [`width`]`::<E>(lv)`).
#[allow(clippy::too_many_arguments)]
fn tile_rows_at<E: Elem>(
    lv: Level,
    out: &mut [E],
    trs: std::ops::Range<usize>,
    accumulate: bool,
    scr: &mut Scratch<E>,
    (src, zero): (&[E], &[E]),
    (u, bias): (&[E], Option<&[E]>),
    d: Dims,
) {
    #[cfg(target_arch = "x86_64")]
    {
        type In<'a> = (&'a [f32], &'a [f32]);
        type W<'a> = (&'a [f32], Option<&'a [f32]>);
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(
            o: &mut [f32],
            t: std::ops::Range<usize>,
            a: bool,
            s: &mut Scratch<f32>,
            x: In<'_>,
            w: W<'_>,
            d: Dims,
        ) {
            unsafe { tile_rows::<x86::Zmm, 4>(o, t, a, s, x, w, d) }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            o: &mut [f32],
            t: std::ops::Range<usize>,
            a: bool,
            s: &mut Scratch<f32>,
            x: In<'_>,
            w: W<'_>,
            d: Dims,
        ) {
            unsafe { tile_rows::<x86::Ymm, 2>(o, t, a, s, x, w, d) }
        }
        if is_f32::<E>() {
            // SAFETY: E is f32 (checked), so the scratch is a Scratch<f32>.
            let s32 = unsafe { &mut *(scr as *mut Scratch<E>).cast::<Scratch<f32>>() };
            let (o, x, w) = (
                f32s_mut(out),
                (f32s(src), f32s(zero)),
                (f32s(u), bias.map(f32s)),
            );
            match lv.isa() {
                // SAFETY: a `Level` at Avx512 or above exists only where the CPU runs AVX-512
                // F, AVX2 and FMA (`isa::detected`); U is padded to 64 columns (`width`).
                Isa::Avx512 | Isa::Amx => {
                    return unsafe { avx512(o, trs, accumulate, s32, x, w, d) }
                }
                // SAFETY: as above for AVX2 and FMA (16 columns).
                Isa::Avx2 => return unsafe { avx2(o, trs, accumulate, s32, x, w, d) },
                Isa::Portable => {}
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = lv;
    // SAFETY: the portable instance needs no CPU feature; U padded to 16 columns (`width`).
    unsafe { tile_rows::<Scalar<E>, 16>(out, trs, accumulate, scr, (src, zero), (u, bias), d) }
}

/// dst (b·h·w, cout) = [dst +] (conv3x3(src, wt) [+ bias]) for src (b·h·w, cin), wt (9·cin,
/// cout), bias (cout): [`super::conv_direct::conv`]'s contract, by F(2×2, 3×3).
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
    let ldb = cout.next_multiple_of(width::<E>(lv));
    let d = Dims { g, cin, cout, ldb };
    let u = transformed_weight(wt, (cin, cout), ldb);
    let zero = vec![E::zero(); cin];
    // tasks of whole tile rows, about one block each; each owns its pixels' output rows
    let (th, tw) = d.tiles();
    let per = (BLOCK / tw).max(1);
    let mut tasks = Vec::new();
    let mut rest = dst;
    for tr0 in (0..g.b * th).step_by(per) {
        let tr1 = (tr0 + per).min(g.b * th);
        let (last, rows) = d.tile_row(tr1 - 1);
        let len = (last + rows * g.w - d.tile_row(tr0).0) * cout;
        let (head, tail) = rest.split_at_mut(len);
        tasks.push((tr0..tr1, head));
        rest = tail;
    }
    debug_assert!(rest.is_empty());
    tasks.into_par_iter().for_each_init(
        || Scratch::new(d),
        |scr, (trs, out)| {
            tile_rows_at(
                lv,
                out,
                trs,
                accumulate,
                scr,
                (src, &zero),
                (u.get(), bias),
                d,
            )
        },
    );
}

/// Tiles per weight-gradient chunk (whole tile rows; at most [`DW_CHUNKS`] chunks): the products'
/// sums run over a chunk's tiles, so long chunks keep the register tiles busy.
const DW_TILES: usize = 256;

/// At most this many weight-gradient chunks (each holds a 16·cin·ldb partial sum).
const DW_CHUNKS: usize = 64;

/// out = (a + b)·½ or (a − b)·½ (exact halving).
#[inline(always)]
fn half<E: Elem>(out: &mut [E], a: &[E], b: &[E], plus: bool) {
    let h = E::c(0.5);
    let it = out.iter_mut().zip(a).zip(b);
    if plus {
        it.for_each(|((o, &a), &b)| *o = (a + b) * h);
    } else {
        it.for_each(|((o, &a), &b)| *o = (a - b) * h);
    }
}

/// U (16 rows of cout, `stride` apart) = G e Gᵀ for the tile's 2×2 output-gradient rows e (row
/// 2i + j), G = [1 0; ½ ½; ½ −½; 0 1], through `q` (8 rows of cout).
#[inline(always)]
fn grad_transform<E: Elem>(u: &mut [E], stride: usize, e: &[&[E]; 16], q: &mut [E]) {
    let cout = q.len() / 8;
    // rows: q[2r + j] = (G e)[r][j]
    for j in 0..2 {
        let (e0, e1) = (e[j], e[2 + j]);
        q[j * cout..][..cout].copy_from_slice(e0);
        half(&mut q[(2 + j) * cout..][..cout], e0, e1, true);
        half(&mut q[(4 + j) * cout..][..cout], e0, e1, false);
        q[(6 + j) * cout..][..cout].copy_from_slice(e1);
    }
    // columns: u[4r + k] = (q[r] Gᵀ)[k]
    for r in 0..4 {
        let (q0, q1) = (&q[2 * r * cout..][..cout], &q[(2 * r + 1) * cout..][..cout]);
        u[4 * r * stride..][..cout].copy_from_slice(q0);
        half(&mut u[(4 * r + 1) * stride..][..cout], q0, q1, true);
        half(&mut u[(4 * r + 2) * stride..][..cout], q0, q1, false);
        u[(4 * r + 3) * stride..][..cout].copy_from_slice(q1);
    }
}

/// A weight-gradient task's inputs: x, dY and a row of max(cin, cout) zeros.
type DwInputs<'a, E> = (&'a [E], &'a [E], &'a [E]);

/// A weight-gradient task's working memory.
struct DwScratch<E> {
    /// V: 16 slices of BLOCK rows × cin (F(3×3, 2×2)'s input transform).
    v: Vec<E>,
    /// U: 16 slices of BLOCK rows × ldb (G dY Gᵀ; columns past cout stay zero).
    u: Aligned<E>,
    /// Bᵀ d of one tile: 16 rows × cin.
    t: Vec<E>,
    /// G e of one tile: 8 rows × cout.
    q: Vec<E>,
}

/// Adds to `part` (16 slices of cin rows × ldb) Σ over the tiles of the tile rows `trs` of
/// V_ξ[tile]ᵀ · U_ξ[tile], tiles in order.
///
/// SAFETY (caller): src (b·h·w, cin), gy (b·h·w, cout), `zeros` max(cin, cout) zeros; d.ldb a
/// multiple of NV·LANES; the CPU runs `V`.
#[inline(always)]
unsafe fn dw_tile_rows<V: Vector, const NV: usize>(
    part: &mut [V::E],
    trs: std::ops::Range<usize>,
    scr: &mut DwScratch<V::E>,
    (src, gy, zeros): DwInputs<'_, V::E>,
    d: Dims,
) {
    let (cin, cout, ldb) = (d.cin, d.cout, d.ldb);
    let (_, tw) = d.tiles();
    let n = NV * V::LANES;
    let tiles: Vec<(usize, usize)> = trs.flat_map(|tr| (0..tw).map(move |tx| (tr, tx))).collect();
    for block in tiles.chunks(BLOCK) {
        let nt = block.len();
        for (j, &tile) in block.iter().enumerate() {
            let x = d.neighbourhood(src, &zeros[..cin], tile);
            input_transform(&BT_DW, &mut scr.v[j * cin..], BLOCK * cin, &x, &mut scr.t);
            let e = d.pixel_rows(gy, &zeros[..cout], tile, 2, 0);
            grad_transform(&mut scr.u.get_mut()[j * ldb..], BLOCK * ldb, &e, &mut scr.q);
        }
        for xi in 0..16 {
            for col in (0..cout).step_by(n) {
                for c0 in (0..cin).step_by(R) {
                    let nr = R.min(cin - c0);
                    // channels past the end repeat the last one (computed, not stored)
                    let cs: [usize; R] = std::array::from_fn(|i| c0 + i.min(nr - 1));
                    let run = Run {
                        q: 0,
                        p: 0,
                        len: nt,
                    };
                    // SAFETY: V_ξ has nt rows of cin (each cs[i] < cin), U_ξ nt rows of ldb
                    // with the columns col..col + n readable (ldb a multiple of n); `part`'s
                    // slice ξ has the rows c0..c0 + nr of ldb elements, columns col..col + n.
                    unsafe {
                        let dst = part.as_mut_ptr().add((xi * cin + c0) * ldb + col);
                        let init = get::<V, NV>(dst, ldb, (nr, n));
                        let x = scr.v.as_ptr().add(xi * BLOCK * cin);
                        let u = scr.u.get().as_ptr().add(xi * BLOCK * ldb + col);
                        let acc = dw_tile::<V, NV>(init, x, cin, &cs, u, ldb, run);
                        put(&acc, dst, ldb, (nr, n), false);
                    }
                }
            }
        }
    }
}

/// [`dw_tile_rows`] at `lv` (ldb follows [`width`]`::<E>(lv)`).
fn dw_tile_rows_at<E: Elem>(
    lv: Level,
    part: &mut [E],
    trs: std::ops::Range<usize>,
    scr: &mut DwScratch<E>,
    ins: DwInputs<'_, E>,
    d: Dims,
) {
    #[cfg(target_arch = "x86_64")]
    {
        type In<'a> = DwInputs<'a, f32>;
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn avx512(
            p: &mut [f32],
            t: std::ops::Range<usize>,
            s: &mut DwScratch<f32>,
            x: In<'_>,
            d: Dims,
        ) {
            unsafe { dw_tile_rows::<x86::Zmm, 4>(p, t, s, x, d) }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(
            p: &mut [f32],
            t: std::ops::Range<usize>,
            s: &mut DwScratch<f32>,
            x: In<'_>,
            d: Dims,
        ) {
            unsafe { dw_tile_rows::<x86::Ymm, 2>(p, t, s, x, d) }
        }
        if is_f32::<E>() {
            // SAFETY: E is f32 (checked), so the scratch is a DwScratch<f32>.
            let s32 = unsafe { &mut *(scr as *mut DwScratch<E>).cast::<DwScratch<f32>>() };
            let (p, x) = (f32s_mut(part), (f32s(ins.0), f32s(ins.1), f32s(ins.2)));
            match lv.isa() {
                // SAFETY: as in `tile_rows_at`.
                Isa::Avx512 | Isa::Amx => return unsafe { avx512(p, trs, s32, x, d) },
                // SAFETY: as in `tile_rows_at`.
                Isa::Avx2 => return unsafe { avx2(p, trs, s32, x, d) },
                Isa::Portable => {}
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = lv;
    // SAFETY: as in `tile_rows_at`.
    unsafe { dw_tile_rows::<Scalar<E>, 16>(part, trs, scr, ins, d) }
}

/// gw (9·cin, cout) += dW = Σ_p im2col(src)[p]ᵀ·gy[p] for src (b·h·w, cin), gy (b·h·w, cout)
/// ([`super::conv_direct::conv_dw`]'s contract) by F(3×3, 2×2): per chunk of tile rows (fixed by
/// the shape) the 16 sums M_ξ = Σ_tiles (Bᵀ x B)_ξᵀ (G dY Gᵀ)_ξ, the chunks added in order, then
/// dW = Aᵀ M A with Aᵀ = [1 1 1 0; 0 1 −1 0; 0 1 1 1].
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
    if m == 0 || cin * cout == 0 {
        return;
    }
    let ldb = cout.next_multiple_of(width::<E>(lv));
    let d = Dims { g, cin, cout, ldb };
    let (th, tw) = d.tiles();
    let trows = g.b * th;
    let per = (DW_TILES / tw).max(1).max(trows.div_ceil(DW_CHUNKS));
    let chunks = trows.div_ceil(per);
    let size = 16 * cin * ldb;
    let zeros = vec![E::zero(); cin.max(cout)];
    let mut parts = vec![E::zero(); chunks * size];
    let scratch = || DwScratch {
        v: vec![E::zero(); 16 * BLOCK * cin],
        u: Aligned::zeros(16 * BLOCK * ldb),
        t: vec![E::zero(); 16 * cin],
        q: vec![E::zero(); 8 * cout],
    };
    parts
        .par_chunks_mut(size)
        .enumerate()
        .for_each_init(scratch, |scr, (k, part)| {
            let trs = k * per..((k + 1) * per).min(trows);
            dw_tile_rows_at(lv, part, trs, scr, (src, gy, &zeros), d)
        });
    // per input channel: M = ((P0 + P1) + P2) + …, then Aᵀ M A into its 9 rows of dW
    let mut dw = vec![E::zero(); cin * 9 * cout];
    dw.par_chunks_mut(9 * cout)
        .enumerate()
        .for_each(|(c, out)| {
            let mut mm = vec![E::zero(); 16 * cout];
            for (xi, row) in mm.chunks_exact_mut(cout).enumerate() {
                for k in 0..chunks {
                    let p = &parts[k * size + (xi * cin + c) * ldb..][..cout];
                    row.iter_mut().zip(p).for_each(|(r, &p)| *r += p);
                }
            }
            let mrow = |xi: usize| &mm[xi * cout..][..cout];
            // rows: s[0] = m0 + m1 + m2, s[1] = m1 − m2, s[2] = m1 + m2 + m3 (per column k)
            let mut s = vec![E::zero(); 12 * cout];
            for k in 0..4 {
                let (m0, m1, m2, m3) = (mrow(k), mrow(4 + k), mrow(8 + k), mrow(12 + k));
                let it = s.chunks_exact_mut(cout).skip(k).step_by(4).enumerate();
                for (r, sr) in it {
                    match r {
                        0 => comb3(sr, m0, m1, m2, true),
                        1 => comb(sr, m1, m2, false),
                        _ => {
                            let it = sr.iter_mut().zip(m1).zip(m2).zip(m3);
                            it.for_each(|(((o, &a), &b), &c)| *o = a + b + c);
                        }
                    }
                }
            }
            // columns: dW[r][0] = s0 + s1 + s2, dW[r][1] = s1 − s2, dW[r][2] = s1 + s2 + s3
            for r in 0..3 {
                let srow = |k: usize| &s[(4 * r + k) * cout..][..cout];
                let (s0, s1, s2, s3) = (srow(0), srow(1), srow(2), srow(3));
                let mut rows = out[3 * r * cout..(3 * r + 3) * cout].chunks_exact_mut(cout);
                let mut next = || rows.next().expect("three taps per kernel row");
                comb3(next(), s0, s1, s2, true);
                comb(next(), s1, s2, false);
                let it = next().iter_mut().zip(s1).zip(s2).zip(s3);
                it.for_each(|(((o, &a), &b), &c)| *o = a + b + c);
            }
        });
    // gw row t·cin + c += dW[c][t]
    gw.par_chunks_mut(cout).enumerate().for_each(|(row, gr)| {
        let (t, c) = (row / cin, row % cin);
        let src = &dw[(c * 9 + t) * cout..][..cout];
        gr.iter_mut().zip(src).for_each(|(g, &v)| *g += v);
    });
}

#[cfg(test)]
mod tests {
    use super::super::conv_direct::tests::{check_kernel, definition};
    use super::*;
    use crate::kernels::isa;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// (b, h, w, cin, cout): odd heights and widths, one-pixel images, tile rows wider than a
    /// block, channels off the tile widths and past 64, several dW chunks.
    const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
        (2, 7, 9, 16, 70),
        (1, 1, 1, 17, 16),
        (3, 5, 1, 20, 33),
        (1, 2, 101, 16, 16),
        (2, 28, 28, 64, 64),
        (3, 40, 60, 16, 17),
    ];

    /// At every level and thread count: conv(x, w) + bias, dst + conv(x, w) and gw + dW within
    /// f32 rounding of the f64 definition (the transforms scale terms by at most 4 on the way in
    /// and out: 4× the direct kernels' bound) and the same bits everywhere; and in f64 within
    /// 1e-12.
    #[test]
    fn winograd_matches_the_definition_at_every_level_and_thread_count() {
        check_kernel((conv::<f32>, conv_dw::<f32>), &SHAPES, 4e-6, 5);
        let mut rng = StdRng::seed_from_u64(6);
        for (b, h, w, cin, cout) in SHAPES {
            let g = Grid { b, h, w };
            let m = g.pixels();
            let mut rand =
                |n: usize| -> Vec<f64> { (0..n).map(|_| rng.gen_range(-1.5..1.5)).collect() };
            let (x, wt, gy) = (rand(m * cin), rand(9 * cin * cout), rand(m * cout));
            let ((y, ya), (dw, dwa)) = definition((&x, &wt, &gy), g, (cin, cout));
            let mut y64 = vec![f64::NAN; m * cout];
            conv(isa::level(), &mut y64, false, &x, &wt, None, g, (cin, cout));
            for (i, (&v, (&e, &a))) in y64.iter().zip(y.iter().zip(&ya)).enumerate() {
                assert!((v - e).abs() <= 1e-12 * (a + 1.0), "f64 y[{i}] {v} vs {e}");
            }
            let mut dw64 = vec![0.0; 9 * cin * cout];
            conv_dw(isa::level(), &mut dw64, &x, &gy, g, (cin, cout));
            for (i, (&v, (&e, &a))) in dw64.iter().zip(dw.iter().zip(&dwa)).enumerate() {
                assert!((v - e).abs() <= 1e-12 * (a + 1.0), "f64 dw[{i}] {v} vs {e}");
            }
        }
    }

    /// The forward and dW kernels' times against the direct kernels' at `unet-small`'s layer shapes
    /// (batch 16 × 28 × 28): `cargo test --release -p maskdiff-network --lib -- winograd_timing
    /// --ignored --nocapture`. GFLOP/s counts the direct convolution's 2·9·cin·cout per pixel.
    #[test]
    #[ignore]
    fn winograd_timing() {
        let g = Grid {
            b: 16,
            h: 28,
            w: 28,
        };
        let m = g.pixels();
        let lv = isa::level();
        for (cin, cout) in [(64, 64), (128, 64), (64, 256), (32, 64)] {
            let x: Vec<f32> = (0..m * cin).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..9 * cin * cout).map(|i| (i % 5) as f32 * 0.01).collect();
            let mut y = vec![0f32; m * cout];
            let flop = 2.0 * (m * 9 * cin * cout) as f64;
            let best = |f: &mut dyn FnMut()| super::super::test_util::best_of(7, f);
            let tw = best(&mut || conv(lv, &mut y, false, &x, &w, None, g, (cin, cout)));
            let td = best(&mut || {
                super::super::conv_direct::conv(lv, &mut y, false, &x, &w, None, g, (cin, cout))
            });
            let gy: Vec<f32> = (0..m * cout).map(|i| (i % 3) as f32 * 0.1).collect();
            let mut gw = vec![0f32; 9 * cin * cout];
            let twd = best(&mut || conv_dw(lv, &mut gw, &x, &gy, g, (cin, cout)));
            let tdd = best(&mut || {
                super::super::conv_direct::conv_dw(lv, &mut gw, &x, &gy, g, (cin, cout))
            });
            eprintln!(
                "{lv:?} {cin}→{cout} dW: winograd {:.2} ms ({:.0} GFLOP/s equivalent), direct {:.2} ms ({:.0})",
                twd * 1e3,
                flop / twd / 1e9,
                tdd * 1e3,
                flop / tdd / 1e9
            );
            eprintln!(
                "{lv:?} {cin}→{cout}: winograd {:.2} ms ({:.0} GFLOP/s equivalent), direct {:.2} ms ({:.0})",
                tw * 1e3,
                flop / tw / 1e9,
                td * 1e3,
                flop / td / 1e9
            );
        }
    }
}
