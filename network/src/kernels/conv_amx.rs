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
//! pixels). dW_t = Σ_q x_pad(q + off_t)ᵀ·dY_pad(q), computed transposed (dW_tᵀ = Σ_q
//! dY_pad(q)ᵀ·x_pad(q + off_t)): A is dY transposed (a row per output channel, positions along
//! it, tile rows on cache lines), B is x in pairs of consecutive positions (the VNNI layout),
//! one layout per parity of the tap offset so that every B tile row is a whole row; dY is zero
//! where there is no pixel; partial sums per fixed chunk of positions, the chunks in order.
//!
//! Numerics are those of the bf16 matrix products ([`super::bf16`], [`super::amx`]): inputs
//! rounded to bf16 (round to nearest even), exact products, f32 sums; results do not depend on
//! the thread count. Why: at `unet-small`'s shapes the im2col panels made the bf16 step slower
//! than the f32 one on the Xeon with AMX (the nine-fold copy, its conversion, and two parallel
//! regions per panel), while the tiles' products themselves took an eighth of the step.

use super::amx::{self, Step, Tiles};
use super::bf16::{cvt_interleave, cvt_pairs, pair, transpose16_to};
use super::conv::Grid;
use super::isa::{AmxHw, Bf16Hw};
use rayon::prelude::*;

/// Positions (and channels) of one 32 × 32 block of C.
const BLK: usize = 32;

/// Positions of one dW chunk (partial sums combined in chunk order).
const DW_CHUNK: usize = 1024;

/// Blocks of positions of one forward task.
const TASK_BLOCKS: usize = 4;

/// A zeroed u32 buffer whose element 0 sits on a cache line (tile rows never straddle two).
struct Buf {
    v: Vec<u32>,
    off: usize,
    len: usize,
}

impl Buf {
    fn zeroed(len: usize) -> Buf {
        let v = vec![0u32; len + 16];
        let off = v.as_ptr().align_offset(64).min(16);
        Buf { v, off, len }
    }
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
    fn get(&self) -> &[u32] {
        &self.v[self.off..self.off + self.len]
    }
    fn get_mut(&mut self) -> &mut [u32] {
        &mut self.v[self.off..self.off + self.len]
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

    /// The pixel at position q, if q is one.
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
fn padded_rows(hw: Option<Bf16Hw>, src: &[f32], pg: Padded, c: usize, kp: usize) -> Buf {
    const ROWS: usize = 64;
    let fill = |k: usize, chunk: &mut [std::mem::MaybeUninit<u32>]| {
        let mut row = vec![0u32; kp];
        for (i, out) in chunk.chunks_mut(kp).enumerate() {
            row.fill(0);
            if let Some(p) = pg.pixel(k * ROWS + i) {
                let x = &src[p * c..(p + 1) * c];
                cvt_pairs(hw, x, &mut row[..c / 2]);
                if c % 2 == 1 {
                    row[c / 2] = pair(x[c - 1], 0.0);
                }
            }
            out.iter_mut().zip(&row).for_each(|(o, &v)| _ = o.write(v));
        }
    };
    // SAFETY: the chunks are whole rows of kp, each written in full from `row` (kp elements).
    unsafe { Buf::written(pg.rows() * kp, ROWS * kp, fill) }
}

/// The weight (9·cin, cout) packed as B tiles: per 32-column block, per step s = t·(cinp/32) +
/// kc, 16 pair rows (channels kc·32 + 2r, + 1) of 32 columns; zeros beyond cin and cout.
fn packed_weight(wt: &[f32], (cin, cout): (usize, usize), (cinp, coutp): (usize, usize)) -> Buf {
    let steps = 9 * cinp / BLK;
    let mut buf = Buf::zeroed(coutp / BLK * steps * 16 * BLK);
    let w = |t: usize, c: usize, o: usize| {
        if c < cin && o < cout {
            wt[(t * cin + c) * cout + o]
        } else {
            0.0
        }
    };
    for (i, v) in buf.get_mut().iter_mut().enumerate() {
        let (j, r, s, nb) = (
            i % BLK,
            i / BLK % 16,
            i / (BLK * 16) % steps,
            i / (BLK * 16 * steps),
        );
        let (t, kc) = (s / (cinp / BLK), s % (cinp / BLK));
        let (c, o) = (kc * BLK + 2 * r, nb * BLK + j);
        *v = pair(w(t, c, o), w(t, c + 1, o));
    }
    buf
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
    let (cinp, coutp) = (cin.max(1).next_multiple_of(BLK), cout.next_multiple_of(BLK));
    let kp = cinp / 2;
    let xp = padded_rows(bf, src, pg, cin, kp);
    let wb = packed_weight(wt, (cin, cout), (cinp, coutp));
    let (xp, wb) = (xp.get(), wb.get());
    let steps = 9 * cinp / BLK;
    // the blocks of positions holding pixels, each with its pixels' (contiguous) index range
    let blocks: Vec<(usize, std::ops::Range<usize>)> = (0..pg.span / BLK)
        .filter_map(|k| {
            let q0 = pg.margin + k * BLK;
            let first = (q0..q0 + BLK).find_map(|q| pg.pixel(q))?;
            let last = (q0..q0 + BLK).rev().find_map(|q| pg.pixel(q))?;
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
            let pixels: [Option<usize>; BLK] = std::array::from_fn(|i| pg.pixel(q0 + i));
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
                for (crow, &p) in cblk.0.chunks_exact(BLK).zip(&pixels) {
                    let Some(p) = p else { continue };
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
/// `rows()` positions, zeros where no pixel. A task per 16 channels: per 16 pairs of positions,
/// the pairs (q, q + 1) of its channels (the VNNI conversion of [`position_pairs`]) into a
/// 16 × 16 block, transposed into the 16 channel rows (each u32 two consecutive positions).
fn transposed(bf: Option<Bf16Hw>, src: &[f32], pg: Padded, c: usize, cp: usize) -> Buf {
    const CB: usize = 16;
    let half = pg.rows() / 2; // u32 per channel row; a multiple of 16 (rows() of 32)
    let zero = [0.0f32; CB];
    let fill = |k: usize, block: &mut [std::mem::MaybeUninit<u32>]| {
        let ch0 = k * CB;
        let n = CB.min(c.saturating_sub(ch0));
        if n == 0 {
            block.iter_mut().for_each(|v| _ = v.write(0));
            return;
        }
        let row = |q: usize| pg.pixel(q).map_or(&zero[..n], |p| &src[p * c + ch0..][..n]);
        let mut t = [0u32; CB * CB];
        for j0 in (0..half).step_by(CB) {
            for (i, pairs) in t.chunks_exact_mut(CB).enumerate() {
                let q = 2 * (j0 + i);
                cvt_interleave(bf, row(q), row(q + 1), &mut pairs[..n]);
            }
            // SAFETY: rows ch0..ch0 + 16 of the block (16 · half u32) at stride half, columns
            // j0..j0 + 16 ≤ half.
            unsafe { transpose16_to(bf, &t, CB, block[j0..].as_mut_ptr().cast(), half) };
        }
    };
    // SAFETY: the chunks are 16 whole channel rows; each is zeroed (channels past c) or written
    // in full by the transposes (columns 0..half in steps of 16, all 16 rows).
    unsafe { Buf::written(cp * half, CB * half, fill) }
}

/// `src` (pixels × c) on the padded grid in pairs of consecutive positions (the VNNI layout of
/// a B tile): row j holds, per channel, (q = 2j + parity, 2j + 1 + parity); zeros where no
/// pixel, `cp` pairs per row (zeros after c).
fn position_pairs(
    bf: Option<Bf16Hw>,
    src: &[f32],
    pg: Padded,
    (c, cp): (usize, usize),
    parity: usize,
) -> Buf {
    const ROWS: usize = 64;
    let zero = vec![0.0f32; c];
    let fill = |k: usize, chunk: &mut [std::mem::MaybeUninit<u32>]| {
        let mut pairs = vec![0u32; cp];
        for (i, out) in chunk.chunks_mut(cp).enumerate() {
            let q = 2 * (k * ROWS + i) + parity;
            let row = |q: usize| pg.pixel(q).map_or(&zero[..], |p| &src[p * c..][..c]);
            cvt_interleave(bf, row(q), row(q + 1), &mut pairs[..c]);
            out.iter_mut()
                .zip(&pairs)
                .for_each(|(o, &v)| _ = o.write(v));
        }
    };
    // SAFETY: the chunks are whole rows of cp, each written in full from `pairs` (cp elements,
    // zeros past c).
    unsafe { Buf::written(pg.rows() / 2 * cp, ROWS * cp, fill) }
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
    let xt = transposed(bf, src, pg, cin, cinp);
    let yv = position_pairs(bf, gy, pg, (cout, coutp), 0);
    let (xt, yv) = (xt.get(), yv.get());
    let size = 9 * cinp * coutp;
    let chunks = pg.span.div_ceil(DW_CHUNK);
    let mut parts = vec![0.0f32; chunks * size];
    parts
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
                        // SAFETY: tiles configured on this thread. A: 32 input-channel rows of
                        // xt (2·rows bytes apart), 64 bytes (32 positions) from s (s ≥ 0 and
                        // s + 32 ≤ rows: the margin covers a tap's reach). B: 16 pair rows of
                        // yv (4·coutp bytes apart) from row q0/2 (q0 + 32 ≤ rows), 128 bytes
                        // from channel ob·32. C: rows t·cinp + cb·32.. (32 of them) of the
                        // partial, coutp apart, columns ob·32..+32.
                        unsafe {
                            amx::micro_steps(
                                &tiles,
                                &st,
                                (2 * rows, 4 * coutp),
                                c.as_mut_ptr(),
                                coutp,
                            )
                        };
                    }
                }
            }
        });
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
}
