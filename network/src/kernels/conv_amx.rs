//! The 3×3 convolution's products at bf16 precision on AMX tiles (x86-64), read in place from a
//! zero-padded bf16 copy of the input instead of an im2col panel: an implicit GEMM.
//!
//! The input is laid out on the padded grid — each image (h + 2) × (w + 2) positions, pixel
//! (y, x) at position (y + 1, x + 1), zeros around and a margin of zero positions before and
//! after — so tap t = 3·ky + kx of the position q is the position q + (ky − 1)(w + 2) + kx − 1
//! for every real pixel, with no edge cases. Forward (and dX, the same convolution of dY with
//! the flipped kernel): a 32 × 32 block of C (32 consecutive positions × 32 output channels)
//! takes, per tap and 32 input channels, one A tile pair read straight from the padded rows
//! (row stride: the padded channel count) and one B tile pair of the packed weight; positions
//! that are padding are computed and dropped (≈ 2/(w + 2) of them for the blocks that hold
//! pixels). dW_t = Σ_q x_pad(q + off_t)ᵀ·dY_pad(q): A is x transposed (a row per input
//! channel, positions along it; a tile's rows start at any position q + off_t), B is dY in pairs
//! of consecutive positions from q (the VNNI layout; q runs in whole blocks from an even margin,
//! so one layout serves every tap); zeros where there is no pixel; partial sums per fixed chunk
//! of positions, the chunks in order. Each operand is converted once per call, by a pass that
//! walks a precomputed position → pixel map (the transposition: VNNI pairs of 16 channels
//! through 16 × 16 register transposes, a task per strip of positions).
//!
//! Numerics are those of the bf16 matrix products ([`super::bf16`], [`super::amx`]): inputs
//! rounded to bf16 (round to nearest even), exact products, f32 sums; results do not depend on
//! the thread count. Why: at `unet-small`'s shapes the im2col panels made the bf16 step slower
//! than the f32 one on the Xeon with AMX (the nine-fold copy, its conversion, and two parallel
//! regions per panel), while the tiles' products themselves took an eighth of the step.

use super::amx::{self, Step, Tiles};
use super::bf16::{cvt_interleave, cvt_pairs, pair, transpose16_to, Out};
use super::conv::Grid;
use super::isa::{AmxHw, Bf16Hw};
use rayon::prelude::*;

/// Positions (and channels) of one 32 × 32 block of C.
const BLK: usize = 32;

/// [`Padded::map`]'s mark of a position that holds no pixel.
const NONE: usize = usize::MAX;

/// Positions of one dW chunk (partial sums combined in chunk order).
const DW_CHUNK: usize = 1024;

/// Blocks of positions of one forward task.
const TASK_BLOCKS: usize = 4;

/// A u32 buffer whose element 0 sits on a cache line (tile rows never straddle two).
struct Buf {
    v: Vec<u32>,
    off: usize,
    len: usize,
}

impl Buf {
    /// A buffer whose `len` elements `fill` writes, chunk by chunk in parallel (chunk k: the
    /// elements k·chunk..), without zeroing them first.
    ///
    /// # Safety
    /// `fill` must initialise every element of the chunk it is given.
    unsafe fn written(
        len: usize,
        chunk: usize,
        fill: impl Fn(usize, &mut [std::mem::MaybeUninit<u32>]) + Sync + Send,
    ) -> Buf {
        let mut v: Vec<u32> = Vec::with_capacity(len + 16);
        let off = v.as_ptr().align_offset(64).min(16);
        let (head, body) = v.spare_capacity_mut()[..off + len].split_at_mut(off);
        head.iter_mut().for_each(|x| _ = x.write(0));
        body.par_chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(k, c)| fill(k, c));
        // SAFETY: the first `off` elements were zeroed above; the next `len` are tiled by the
        // chunks, each written in full by `fill` (the caller's contract).
        unsafe { v.set_len(off + len) };
        Buf { v, off, len }
    }
    /// A buffer of `len` elements to be written through [`Buf::get_mut_ptr`] before
    /// [`Buf::assume_init`] (its margin before them zeroed).
    fn uninit(len: usize) -> Buf {
        let mut v: Vec<u32> = Vec::with_capacity(len + 16);
        let off = v.as_ptr().align_offset(64).min(16);
        v.spare_capacity_mut()[..off]
            .iter_mut()
            .for_each(|x| _ = x.write(0));
        // SAFETY: the first `off` elements were just written.
        unsafe { v.set_len(off) };
        Buf { v, off, len }
    }
    /// The start of an [`Buf::uninit`] buffer's `len` elements.
    fn get_mut_ptr(&mut self) -> *mut u32 {
        self.v.spare_capacity_mut().as_mut_ptr().cast()
    }
    /// Marks an [`Buf::uninit`] buffer's elements written.
    ///
    /// # Safety
    /// All `len` of them have been written through [`Buf::get_mut_ptr`].
    unsafe fn assume_init(&mut self) {
        // SAFETY: the caller's; capacity off + len + 16 ≥ off + len.
        unsafe { self.v.set_len(self.off + self.len) }
    }
    fn get(&self) -> &[u32] {
        &self.v[self.off..self.off + self.len]
    }
}

/// The padded grid of [`Grid`] g (see the module docs).
#[derive(Clone, Copy)]
struct Padded {
    g: Grid,
    /// Positions per padded row (w + 2) and per image ((h + 2)(w + 2)).
    wp: usize,
    per: usize,
    /// Zero positions before the first image (even, ≥ a tap's reach w + 3).
    margin: usize,
    /// The images' positions rounded up to whole blocks.
    span: usize,
}

impl Padded {
    fn new(g: Grid) -> Padded {
        let wp = g.w + 2;
        Padded {
            g,
            wp,
            per: (g.h + 2) * wp,
            margin: (wp + 1).next_multiple_of(BLK),
            span: (g.b * (g.h + 2) * wp).next_multiple_of(BLK),
        }
    }

    /// Positions in all: margin, images, margin.
    fn rows(&self) -> usize {
        2 * self.margin + self.span
    }

    /// The pixel at each of the `rows()` positions, [`NONE`] where there is none: built by
    /// walking the images' rows (no division per position), [`Padded::pixel`]'s values.
    fn map(&self) -> Vec<usize> {
        let g = self.g;
        let mut map = vec![NONE; self.rows()];
        for img in 0..g.b {
            for y in 0..g.h {
                let q0 = self.margin + img * self.per + (y + 1) * self.wp + 1;
                let p0 = (img * g.h + y) * g.w;
                for (x, m) in map[q0..q0 + g.w].iter_mut().enumerate() {
                    *m = p0 + x;
                }
            }
        }
        map
    }

    /// The pixel at position q, if q is one (the definition [`Padded::map`] is tested against).
    #[cfg(test)]
    fn pixel(&self, q: usize) -> Option<usize> {
        let g = self.g;
        let r = q.checked_sub(self.margin)?;
        let (img, y, x) = (r / self.per, r % self.per / self.wp, r % self.wp);
        (img < g.b && (1..=g.h).contains(&y) && (1..=g.w).contains(&x))
            .then(|| (img * g.h + y - 1) * g.w + x - 1)
    }

    /// Tap t's offset from a position, in positions (≥ −(w + 3)).
    fn tap(&self, t: usize) -> isize {
        (t / 3) as isize * self.wp as isize + (t % 3) as isize - self.wp as isize - 1
    }
}

/// The rows of `src` (pixels × c) converted to bf16 on the padded grid: `rows()` rows of `kp`
/// pairs (c rounded up to a whole number of 32-channel blocks, zeros after).
fn padded_rows(hw: Option<Bf16Hw>, src: &[f32], map: &[usize], c: usize, kp: usize) -> Buf {
    const ROWS: usize = 64;
    let fill = |k: usize, chunk: &mut [std::mem::MaybeUninit<u32>]| {
        let mut row = vec![0u32; kp];
        for (out, &p) in chunk.chunks_mut(kp).zip(&map[k * ROWS..]) {
            row.fill(0);
            if p != NONE {
                let x = &src[p * c..(p + 1) * c];
                cvt_pairs(hw, x, &mut row[..c / 2]);
                if c % 2 == 1 {
                    row[c / 2] = pair(x[c - 1], 0.0);
                }
            }
            out.iter_mut().zip(&row).for_each(|(o, &v)| _ = o.write(v));
        }
    };
    // SAFETY: the chunks are whole rows of kp (one per position of `map`), each written in
    // full from `row` (kp elements).
    unsafe { Buf::written(map.len() * kp, ROWS * kp, fill) }
}

/// The weight (9·cin, cout) packed as B tiles: per 32-column block, per step s = t·(cinp/32) +
/// kc, 16 pair rows (channels kc·32 + 2r, + 1) of 32 columns; zeros beyond cin and cout. A
/// task per column block; each pair row is two weight rows interleaved ([`cvt_interleave`]).
fn packed_weight(
    bf: Option<Bf16Hw>,
    wt: &[f32],
    (cin, cout): (usize, usize),
    (cinp, coutp): (usize, usize),
) -> Buf {
    let steps = 9 * cinp / BLK;
    let zero = [0.0f32; BLK];
    let fill = |nb: usize, block: &mut [std::mem::MaybeUninit<u32>]| {
        let cols = BLK.min(cout - nb * BLK);
        let row = |t: usize, c: usize| match c < cin {
            true => &wt[(t * cin + c) * cout + nb * BLK..][..cols],
            false => &zero[..cols],
        };
        let mut pairs = [0u32; BLK];
        for (i, out) in block.chunks_exact_mut(BLK).enumerate() {
            let (s, r) = (i / 16, i % 16);
            let (t, c) = (s / (cinp / BLK), s % (cinp / BLK) * BLK + 2 * r);
            cvt_interleave(bf, row(t, c), row(t, c + 1), &mut pairs[..cols]);
            out.iter_mut()
                .zip(&pairs)
                .for_each(|(o, &v)| _ = o.write(v));
        }
    };
    // SAFETY: the chunks are the column blocks (steps·16 rows of 32), every row written in
    // full from `pairs` (32 u32, zeros past the block's columns).
    unsafe { Buf::written(coutp / BLK * steps * 16 * BLK, steps * 16 * BLK, fill) }
}

/// dst (b·h·w, cout) = [dst +] (conv3x3(src, wt) [+ bias]) with bf16-rounded src and wt and
/// f32 sums, on AMX tiles.
#[allow(clippy::too_many_arguments)]
pub(super) fn conv(
    hw: AmxHw,
    bf: Option<Bf16Hw>,
    dst: &mut [f32],
    accumulate: bool,
    src: &[f32],
    wt: &[f32],
    bias: Option<&[f32]>,
    g: Grid,
    (cin, cout): (usize, usize),
) {
    let m = g.pixels();
    assert!(dst.len() == m * cout && src.len() == m * cin && wt.len() == 9 * cin * cout);
    if m == 0 || cout == 0 {
        return;
    }
    let pg = Padded::new(g);
    let map = pg.map();
    let (cinp, coutp) = (cin.max(1).next_multiple_of(BLK), cout.next_multiple_of(BLK));
    let kp = cinp / 2;
    let xp = padded_rows(bf, src, &map, cin, kp);
    let wb = packed_weight(bf, wt, (cin, cout), (cinp, coutp));
    let (xp, wb) = (xp.get(), wb.get());
    let steps = 9 * cinp / BLK;
    // the blocks of positions holding pixels, each with its pixels' (contiguous) index range
    let blocks: Vec<(usize, std::ops::Range<usize>)> = (0..pg.span / BLK)
        .filter_map(|k| {
            let q0 = pg.margin + k * BLK;
            let block = &map[q0..q0 + BLK];
            let first = *block.iter().find(|&&p| p != NONE)?;
            let last = *block.iter().rev().find(|&&p| p != NONE)?;
            Some((q0, first..last + 1))
        })
        .collect();
    // each task's rows of dst, split off in order
    let mut tasks = Vec::new();
    let mut rest = dst;
    let mut at = 0;
    for chunk in blocks.chunks(TASK_BLOCKS) {
        let end = chunk.last().map_or(at, |b| b.1.end);
        let (mine, tail) = rest.split_at_mut((end - at) * cout);
        tasks.push((mine, at, chunk));
        (rest, at) = (tail, end);
    }
    tasks.into_par_iter().for_each(|(out, p0, chunk)| {
        let tiles = Tiles::configure(hw);
        let mut cblk = CBlock([0.0; BLK * BLK]);
        let mut st = Vec::with_capacity(steps);
        for (q0, px) in chunk {
            let pixels = &map[*q0..q0 + BLK];
            for nb in 0..coutp / BLK {
                st.clear();
                for s in 0..steps {
                    let (t, kc) = (s / (cinp / BLK), s % (cinp / BLK));
                    let q = (*q0 as isize + pg.tap(t)) as usize;
                    st.push(Step {
                        a: xp[q * kp + kc * 16..].as_ptr().cast(),
                        b: wb[(nb * steps + s) * 16 * BLK..].as_ptr().cast(),
                    });
                }
                // SAFETY: the tiles are configured on this thread. A: rows q..q + 32 of xp
                // (kp pairs = 4·kp bytes apart), 64 bytes from pair kc·16 < kp: q + 32 ≤
                // margin + span + w + 3 ≤ rows() (the margin covers a tap's reach past the
                // last block). B: 16 rows of 32 pairs (128 bytes) of the packed weight, step s
                // of block nb. C: the 32 × 32 block buffer.
                unsafe {
                    amx::micro_steps(&tiles, &st, (4 * kp, 4 * BLK), cblk.0.as_mut_ptr(), BLK)
                };
                let cols = BLK.min(cout - nb * BLK);
                for (crow, &p) in cblk.0.chunks_exact(BLK).zip(pixels) {
                    if p == NONE {
                        continue;
                    }
                    debug_assert!(px.contains(&p));
                    let d = &mut out[(p - p0) * cout + nb * BLK..][..cols];
                    let crow = &crow[..cols];
                    // a loop per case: each vectorises
                    match (bias.map(|b| &b[nb * BLK..][..cols]), accumulate) {
                        (None, false) => d.copy_from_slice(crow),
                        (None, true) => d.iter_mut().zip(crow).for_each(|(d, &v)| *d += v),
                        (Some(b), false) => {
                            for ((d, &v), &b) in d.iter_mut().zip(crow).zip(b) {
                                *d = v + b;
                            }
                        }
                        (Some(b), true) => {
                            for ((d, &v), &b) in d.iter_mut().zip(crow).zip(b) {
                                *d += v + b;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// A 32 × 32 f32 block of C on a cache line.
#[repr(C, align(64))]
struct CBlock([f32; BLK * BLK]);

/// `src` (pixels × c) transposed onto the padded grid in bf16: `cp` rows (zeros past c) of
/// `rows()` positions, zeros where no pixel. A task per [`T_PAIRS`] pairs of positions; per 16
/// of them and 16 channels, the pairs (q, q + 1) (the VNNI conversion of [`position_pairs`])
/// into a 16 × 16 block, transposed into the 16 channel rows (each u32 two consecutive
/// positions). A task reads its pixels' rows whole and writes a column strip of every row.
fn transposed(bf: Option<Bf16Hw>, src: &[f32], map: &[usize], c: usize, cp: usize) -> Buf {
    const CB: usize = 16;
    let half = map.len() / 2; // u32 per channel row; a multiple of 16 (rows() of 32)
    let zero = [0.0f32; CB];
    let mut buf = Buf::uninit(cp * half);
    let out = Out(buf.get_mut_ptr());
    (0..half.div_ceil(T_PAIRS)).into_par_iter().for_each(|k| {
        let mut t = [0u32; CB * CB];
        for j0 in (k * T_PAIRS..half.min((k + 1) * T_PAIRS)).step_by(CB) {
            for ch0 in (0..cp).step_by(CB) {
                let n = CB.min(c.saturating_sub(ch0));
                let row = |q: usize| match map[q] {
                    NONE => &zero[..n],
                    p => &src[p * c + ch0..][..n],
                };
                for (i, pairs) in t.chunks_exact_mut(CB).enumerate() {
                    let q = 2 * (j0 + i);
                    if n > 0 {
                        cvt_interleave(bf, row(q), row(q + 1), &mut pairs[..n]);
                    }
                    pairs[n..].fill(0);
                }
                // SAFETY: rows ch0..ch0 + 16 ≤ cp of the buffer (cp·half u32) at stride half,
                // columns j0..j0 + 16 ≤ half: this task's strip (k·T_PAIRS..), no other's.
                unsafe { transpose16_to(bf, &t, CB, out.get().add(ch0 * half + j0), half) };
            }
        }
    });
    // SAFETY: the tasks' strips tile the columns 0..half (in steps of 16: half is a multiple of
    // 16), and each writes all cp rows of its strip.
    unsafe { buf.assume_init() };
    buf
}

/// Pairs of positions per task of [`transposed`] (a multiple of 16).
const T_PAIRS: usize = 256;

/// `src` (pixels × c) on the padded grid in pairs of consecutive positions (the VNNI layout of
/// a B tile): row j holds, per channel, (q = 2j, 2j + 1); zeros where no pixel, `cp` pairs per
/// row (zeros after c).
fn position_pairs(bf: Option<Bf16Hw>, src: &[f32], map: &[usize], (c, cp): (usize, usize)) -> Buf {
    const ROWS: usize = 64;
    let zero = vec![0.0f32; c];
    let fill = |k: usize, chunk: &mut [std::mem::MaybeUninit<u32>]| {
        let mut pairs = vec![0u32; cp];
        for (i, out) in chunk.chunks_mut(cp).enumerate() {
            let q = 2 * (k * ROWS + i);
            let row = |q: usize| match map[q] {
                NONE => &zero[..],
                p => &src[p * c..][..c],
            };
            cvt_interleave(bf, row(q), row(q + 1), &mut pairs[..c]);
            out.iter_mut()
                .zip(&pairs)
                .for_each(|(o, &v)| _ = o.write(v));
        }
    };
    // SAFETY: the chunks are whole rows of cp, each written in full from `pairs` (cp elements,
    // zeros past c).
    unsafe { Buf::written(map.len() / 2 * cp, ROWS * cp, fill) }
}

/// gw (9·cin, cout) += dW with bf16-rounded src and gy and f32 sums, on AMX tiles: dW[t]
/// (cin × cout) = Σ_q x_pad[q + off_t]ᵀ·dY_pad[q] with A = x transposed (a row per input
/// channel; a tile's rows start at any position q + off_t) and B = dY in pairs of positions
/// from q (even: q runs in whole blocks of 32 from an even margin).
pub(super) fn conv_dw(
    hw: AmxHw,
    bf: Option<Bf16Hw>,
    gw: &mut [f32],
    src: &[f32],
    gy: &[f32],
    g: Grid,
    (cin, cout): (usize, usize),
) {
    let m = g.pixels();
    assert!(gw.len() == 9 * cin * cout && src.len() == m * cin && gy.len() == m * cout);
    if m == 0 || cin == 0 || cout == 0 {
        return;
    }
    let pg = Padded::new(g);
    let (cinp, coutp) = (cin.next_multiple_of(BLK), cout.next_multiple_of(BLK));
    let rows = pg.rows();
    let map = pg.map();
    let xt = transposed(bf, src, &map, cin, cinp);
    let yv = position_pairs(bf, gy, &map, (cout, coutp));
    let (xt, yv) = (xt.get(), yv.get());
    let size = 9 * cinp * coutp;
    let chunks = pg.span.div_ceil(DW_CHUNK);
    let mut parts: Vec<f32> = Vec::with_capacity(chunks * size);
    parts.spare_capacity_mut()[..chunks * size]
        .par_chunks_mut(size)
        .enumerate()
        .for_each(|(k, part)| {
            let tiles = Tiles::configure(hw);
            let q_lo = pg.margin + k * DW_CHUNK;
            let q_hi = (q_lo + DW_CHUNK).min(pg.margin + pg.span);
            let mut st = Vec::with_capacity(DW_CHUNK / BLK);
            // SAFETY: u32 rows viewed as their 2·len u16 halves (same memory, alignment 2 ≤ 4).
            let xt: &[u16] =
                unsafe { std::slice::from_raw_parts(xt.as_ptr().cast(), 2 * xt.len()) };
            for t in 0..9 {
                for cb in 0..cinp / BLK {
                    for ob in 0..coutp / BLK {
                        st.clear();
                        for q0 in (q_lo..q_hi).step_by(BLK) {
                            let s = (q0 as isize + pg.tap(t)) as usize;
                            st.push(Step {
                                a: xt[cb * BLK * rows + s..].as_ptr().cast(),
                                b: yv[q0 / 2 * coutp + ob * BLK..].as_ptr().cast(),
                            });
                        }
                        let c = &mut part[(t * cinp + cb * BLK) * coutp + ob * BLK..];
                        let c: *mut f32 = c.as_mut_ptr().cast();
                        // SAFETY: tiles configured on this thread. A: 32 input-channel rows of
                        // xt (2·rows bytes apart), 64 bytes (32 positions) from s (s ≥ 0 and
                        // s + 32 ≤ rows: the margin covers a tap's reach). B: 16 pair rows of
                        // yv (4·coutp bytes apart) from row q0/2 (q0 + 32 ≤ rows), 128 bytes
                        // from channel ob·32. C: rows t·cinp + cb·32.. (32 of them) of the
                        // partial, coutp apart, columns ob·32..+32 (written, not read).
                        unsafe { amx::micro_steps(&tiles, &st, (2 * rows, 4 * coutp), c, coutp) };
                    }
                }
            }
        });
    // SAFETY: each chunk's partial (size = 9·cinp·coutp) is tiled by its 32 × 32 C blocks
    // (t < 9, cb < cinp/32, ob < coutp/32), every one stored by `micro_steps`.
    unsafe { parts.set_len(chunks * size) };
    // gw += ((P0 + P1) + P2) + …, element by element
    gw.par_chunks_mut(cout).enumerate().for_each(|(r, d)| {
        let (t, c) = (r / cin, r % cin);
        let e = (t * cinp + c) * coutp;
        let mut sum = parts[e..e + cout].to_vec();
        for k in 1..chunks {
            let p = &parts[k * size + e..][..cout];
            sum.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
        }
        d.iter_mut().zip(&sum).for_each(|(dv, &s)| *dv += s);
    });
}

#[cfg(test)]
mod tests {
    use super::super::bf16::{from_bf16, to_bf16};
    use super::super::conv_direct::tests::{definition, in_pool};
    use super::*;
    use crate::kernels::isa;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// (b, h, w, cin, cout): channel counts off and past the 32-wide blocks, one pixel,
    /// single-column images, several dW chunks, two 32-channel input blocks.
    const SHAPES: [(usize, usize, usize, usize, usize); 5] = [
        (2, 9, 11, 7, 70),
        (1, 1, 1, 3, 5),
        (3, 5, 1, 13, 17),
        (2, 40, 30, 5, 33),
        (1, 3, 4, 40, 2),
    ];

    /// The position → pixel map walked row by row is the definition's at every position, and
    /// the margins cover a tap's reach from every block.
    #[test]
    fn the_pixel_map_is_the_definition() {
        for (b, h, w, _, _) in SHAPES {
            let pg = Padded::new(Grid { b, h, w });
            let map = pg.map();
            assert_eq!(map.len(), pg.rows());
            for (q, &p) in map.iter().enumerate() {
                assert_eq!(
                    pg.pixel(q),
                    (p != NONE).then_some(p),
                    "{:?} q {q}",
                    (b, h, w)
                );
            }
            let reach = (pg.tap(8) as usize, -pg.tap(0) as usize);
            // the last block (from margin + span − 32) read 32 positions on from its last tap
            assert!(pg.margin >= reach.1 && pg.margin + pg.span + reach.0 <= pg.rows());
        }
    }

    fn q(v: &[f32]) -> Vec<f64> {
        v.iter()
            .map(|&x| f64::from(from_bf16(to_bf16(x))))
            .collect()
    }

    /// On a CPU with AMX: conv(x, w) + bias, dst + conv(x, w) and gw + dW of the bf16-rounded
    /// inputs within f32 accumulation error of the f64 definition (|error| ≤ terms · 2⁻²³ ·
    /// Σ|terms|, plus the f32 rounding of the final adds), and the same bits on 1 and 3
    /// threads. Elsewhere there is nothing to run (the test checks only that).
    #[test]
    fn amx_conv_is_the_exact_convolution_of_bf16_inputs_up_to_f32_sums() {
        let lv = isa::level();
        let Some(hw) = lv.amx() else {
            assert!(isa::detected() < isa::Isa::Amx || lv.isa() < isa::Isa::Amx);
            return;
        };
        let bf = lv.bf16();
        let mut rng = StdRng::seed_from_u64(12);
        let mut rand = |n: usize| {
            (0..n)
                .map(|_| rng.gen_range(-1.5f32..1.5))
                .collect::<Vec<_>>()
        };
        for (b, h, w, cin, cout) in SHAPES {
            let g = Grid { b, h, w };
            let m = g.pixels();
            let (x, wt, gy) = (rand(m * cin), rand(9 * cin * cout), rand(m * cout));
            let (d0, g0, bias) = (rand(m * cout), rand(9 * cin * cout), rand(cout));
            let ((y, ya), (dw, dwa)) = definition((&q(&x), &q(&wt), &q(&gy)), g, (cin, cout));
            let run = || {
                let mut fresh = vec![f32::NAN; m * cout];
                conv(
                    hw,
                    bf,
                    &mut fresh,
                    false,
                    &x,
                    &wt,
                    Some(&bias),
                    g,
                    (cin, cout),
                );
                let mut acc = d0.clone();
                conv(hw, bf, &mut acc, true, &x, &wt, None, g, (cin, cout));
                let mut gw = g0.clone();
                conv_dw(hw, bf, &mut gw, &x, &gy, g, (cin, cout));
                (fresh, acc, gw)
            };
            let one = in_pool(1, run);
            let what = format!("{:?}", (b, h, w, cin, cout));
            let close = |got: f32, want: f64, mag: f64, terms: usize, name: &str, i: usize| {
                let tol = mag * terms as f64 * 1.2e-7 + (want.abs() + 1e-30) * 1.2e-7;
                assert!(
                    (f64::from(got) - want).abs() <= tol,
                    "{name}[{i}] {got} vs {want}, {what}"
                );
            };
            for i in 0..m * cout {
                let bi = f64::from(bias[i % cout]);
                close(one.0[i], y[i] + bi, ya[i] + bi.abs(), 9 * cin + 1, "y", i);
                let a0 = f64::from(d0[i]);
                close(one.1[i], y[i] + a0, ya[i] + a0.abs(), 9 * cin + 1, "acc", i);
            }
            for i in 0..9 * cin * cout {
                let a0 = f64::from(g0[i]);
                close(one.2[i], dw[i] + a0, dwa[i] + a0.abs(), m + 1, "dw", i);
            }
            let three = in_pool(3, run);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&one.0), bits(&three.0), "y bits, {what}");
            assert_eq!(bits(&one.1), bits(&three.1), "acc bits, {what}");
            assert_eq!(bits(&one.2), bits(&three.2), "dw bits, {what}");
        }
    }

    /// The AMX kernels' times at `unet-small`'s layer shapes (batch 16 × 28 × 28), and those of
    /// their bf16 conversions alone: `cargo test --release -p maskdiff-network --lib --
    /// amx_timing --ignored --nocapture` (on a CPU with AMX; 2·9·cin·cout flops per pixel).
    #[test]
    #[ignore]
    fn amx_timing() {
        crate::alloc::tune_allocator(); // as the binaries do: buffers reused, not page-faulted
        let lv = isa::level();
        let Some(hw) = lv.amx() else { return };
        let bf = lv.bf16();
        let g = Grid {
            b: 16,
            h: 28,
            w: 28,
        };
        let (m, pg) = (g.pixels(), Padded::new(g));
        let best = |f: &mut dyn FnMut()| super::super::test_util::best_of(7, f) * 1e3;
        for (cin, cout) in [(64, 64), (128, 64), (64, 256), (32, 64), (64, 64)] {
            let x: Vec<f32> = (0..m * cin).map(|i| (i % 7) as f32 * 0.1).collect();
            let w: Vec<f32> = (0..9 * cin * cout).map(|i| (i % 5) as f32 * 0.01).collect();
            let gy: Vec<f32> = (0..m * cout).map(|i| (i % 3) as f32 * 0.1).collect();
            let (mut y, mut gw) = (vec![0f32; m * cout], vec![0f32; 9 * cin * cout]);
            let flop = 2.0 * (m * 9 * cin * cout) as f64 / 1e6;
            let (cinp, coutp) = (cin.next_multiple_of(BLK), cout.next_multiple_of(BLK));
            let tf = best(&mut || conv(hw, bf, &mut y, false, &x, &w, None, g, (cin, cout)));
            let map = pg.map();
            let tp = best(&mut || drop(padded_rows(bf, &x, &map, cin, cinp / 2)));
            let tw = best(&mut || drop(packed_weight(bf, &w, (cin, cout), (cinp, coutp))));
            let td = best(&mut || conv_dw(hw, bf, &mut gw, &x, &gy, g, (cin, cout)));
            let tt = best(&mut || drop(transposed(bf, &x, &map, cin, cinp)));
            let tq = best(&mut || drop(position_pairs(bf, &gy, &map, (cout, coutp))));
            eprintln!(
                "{cin}→{cout}: forward {tf:.2} ms ({:.0} GFLOP/s; padded rows {tp:.2}, weight \
                 {tw:.2}), dW {td:.2} ms ({:.0} GFLOP/s; x transposed {tt:.2}, dY pairs {tq:.2})",
                flop / tf,
                flop / td
            );
        }
    }
}
