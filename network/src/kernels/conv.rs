//! The U-Net's image operations (spec §7.3) as fused CPU kernels with hand-written backward
//! passes: the 3×3 "same" convolution and GroupNorm, over NHWC activations kept 2-D as
//! `(b·h·w, channels)`, one row per pixel.
//!
//! **Convolution** (zero padding, stride 1; weight (9·cin, cout) in (ky, kx, cin, cout) order):
//! y = im2col(x)·W, where row p of im2col(x) concatenates the 3×3 neighbours of pixel p (zero
//! rows outside the image). Backward: dW += im2col(x)ᵀ·dY and dX += im2col(dY)·W̃ with W̃
//! (9·cout, cin), W̃[ky, kx, o, c] = W[2−ky, 2−kx, c, o]: the adjoint of a "same" 3×3
//! convolution is the same convolution of dY with the kernel flipped and its channel axes
//! swapped (col2im without a scatter, so parallel tasks never add to the same row). The
//! products run by Winograd's minimal filtering in [`super::conv_winograd`] where both channel
//! counts are ≥ 16 (F(2×2, 3×3) for y and dX, F(3×3, 2×2) for dW), else in
//! [`super::conv_direct`], tile by tile from x's rows in place (no panel). At
//! [`crate::precision::Precision::Bf16`] the products take bf16-rounded inputs with f32 sums:
//! on AMX tiles (`conv_amx`, an implicit GEMM on a zero-padded bf16 grid), elsewhere the same
//! f32 kernels on the rounded values.
//!
//! **GroupNorm** (Wu & He 2018, as Flax's `nn.GroupNorm` in the official `unet.py`: ε = 1e-6,
//! biased variance): per image and group of c/G channels, μ and σ² over its n pixels × c/G
//! channels, y = x̂·scale + bias with x̂ = (x − μ)·r, r = (σ² + ε)^(−1/2). One statistics pass
//! over the data shifted by one of its own values (Σd, Σd² of d = x − K, K the group's first
//! element in the image, so the variance Σd²/N − (Σd/N)² does not cancel catastrophically when
//! |μ| ≫ σ): per-channel sums in E over chunks of ≤ 256 rows, combined in f64. Backward, with
//! S1 = Σ dY and S2 = Σ dY ⊙ x̂ per (image, channel): dbias += Σ S1, dscale += Σ S2 and
//! dx = r·(dY·scale − mean_g(dY·scale) − x̂·mean_g(dY·scale·x̂)), the group means formed from
//! S1, S2. Parallel over (image, row chunk) throughout; partial sums are combined in a fixed
//! order, so results do not depend on the thread count, and the element-wise loops run
//! per-channel lanes without reassociation, so every [`super::isa`] level gives the same bits.

use super::chunk_rows;
#[cfg(target_arch = "x86_64")]
use super::conv_amx;
use super::conv_direct;
#[cfg(target_arch = "x86_64")]
use super::conv_direct::{f32s, f32s_mut};
use super::conv_winograd;
use super::elementwise::act_grad;
use super::isa::{self, multiversion, AmxHw, Level};
use super::storage::{input, par_written, par_zeroed};
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{Res, T1, T2};
use crate::precision::{self, Precision};
use crate::unet_layers::GROUP_NORM_EPS;
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Rows of one GroupNorm task: per-channel sums in E run over at most this many rows.
const GN_ROWS: usize = 256;

#[cfg(test)]
thread_local! {
    static GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the CPU's `conv3x3` and `group_norm` run the generic defaults instead (tests and
/// timings compare the two in one process).
#[cfg(test)]
pub(crate) fn generic_image_ops() -> bool {
    GENERIC.with(|g| g.get())
}

/// Runs `f` with this thread's CPU `conv3x3` and `group_norm` calls going to the generic
/// defaults (restored afterwards, also on panic).
#[cfg(test)]
pub(crate) fn with_generic_image_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC.with(|g| g.replace(true)));
    f()
}

/// The image geometry of a convolution: b images of h × w pixels.
#[derive(Clone, Copy, Debug)]
pub(super) struct Grid {
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) w: usize,
}

impl Grid {
    pub(super) fn pixels(self) -> usize {
        self.b * self.h * self.w
    }
}

/// y = conv3x3(x, w) [+ bias]: x (b·h·w, cin), w (9·cin, cout), bias (cout) → (b·h·w, cout);
/// see the module docs. The bias is added to each finished sum (the value of a separate add);
/// its gradient is the column sums of dY.
pub(crate) fn conv3x3<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    w: T2<E, Cpu>,
    bias: Option<T1<E, Cpu>>,
    b: usize,
    h: usize,
    wd: usize,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let w = w.try_contiguous()?;
    let bias = bias.map(|t| t.try_contiguous()).transpose()?;
    fused(x, |x, _| {
        let ((m, cin), (k9, cout)) = (*x.shape(), *w.shape());
        let g = Grid { b, h, w: wd };
        assert_eq!(m, g.pixels(), "conv3x3: rows are not b·h·w");
        assert_eq!(k9, 9 * cin, "conv3x3: weight rows are not 9·cin");
        let (xv, wv) = (input(&x), input(&w));
        if let Some(t) = &bias {
            assert_eq!(t.shape().0, cout, "conv3x3: bias width");
        }
        let bv = bias.as_ref().map(input);
        let (prec, lv) = (precision::precision(), isa::level());
        let mut y = par_zeroed(m * cout);
        let rounds = bf16_inputs::<E>(prec);
        let tiles = if rounds { lv.amx() } else { None };
        if let Some(hw) = tiles {
            amx_conv(
                hw,
                lv,
                &mut y,
                false,
                &xv,
                &wv,
                bv.as_deref(),
                g,
                (cin, cout),
            );
        } else {
            let bias = bv.as_deref();
            let (xs, ws) = (rounded(&xv, rounds), rounded(&wv, rounds));
            products(lv, &mut y, false, &xs, &ws, bias, g, (cin, cout));
        }
        let (xg, wg, bg) = (x.ghost(), w.ghost(), bias.as_ref().map(|t| t.ghost()));
        Ok(Forward {
            shape: (m, cout),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                if let Some(bg) = &bg {
                    let gb = grads.get_or_alloc_mut(bg)?;
                    for (a, s) in gb.iter_mut().zip(column_sums(&gy, cout)) {
                        *a += s;
                    }
                }
                let wf = flip(&wv, cin, cout);
                if let Some(hw) = tiles {
                    let gw = grads.get_or_alloc_mut(&wg)?;
                    amx_conv_dw(hw, lv, gw, &xv, &gy, g, (cin, cout));
                    let gx = grads.get_or_alloc_mut(&xg)?;
                    amx_conv(hw, lv, gx, true, &gy, &wf, None, g, (cout, cin));
                    return Ok(());
                }
                let (xs, gys, wfs) = (
                    rounded(&xv, rounds),
                    rounded(&gy, rounds),
                    rounded(&wf, rounds),
                );
                let gw = grads.get_or_alloc_mut(&wg)?;
                if conv_winograd::pays(cin, cout) {
                    conv_winograd::conv_dw(lv, gw, &xs, &gys, g, (cin, cout));
                } else {
                    conv_direct::conv_dw(lv, gw, &xs, &gys, g, (cin, cout));
                }
                let gx = grads.get_or_alloc_mut(&xg)?;
                products(lv, gx, true, &gys, &wfs, None, g, (cout, cin));
                Ok(())
            }),
        })
    })
}

/// The f32/f64 convolution ([`conv_direct::conv`]'s contract): by F(2×2, 3×3)
/// ([`conv_winograd`]) where both channel counts are large enough for its transforms to pay,
/// else direct.
#[allow(clippy::too_many_arguments)]
fn products<E: Elem>(
    lv: Level,
    dst: &mut [E],
    accumulate: bool,
    src: &[E],
    wt: &[E],
    bias: Option<&[E]>,
    g: Grid,
    (cin, cout): (usize, usize),
) {
    if conv_winograd::pays(cin, cout) {
        conv_winograd::conv(lv, dst, accumulate, src, wt, bias, g, (cin, cout));
    } else {
        conv_direct::conv(lv, dst, accumulate, src, wt, bias, g, (cin, cout));
    }
}

/// [`conv_amx::conv`] for E = f32 (an [`AmxHw`] exists only on x86-64 CPUs with AMX).
#[allow(clippy::too_many_arguments)]
fn amx_conv<E: Elem>(
    hw: AmxHw,
    lv: Level,
    dst: &mut [E],
    accumulate: bool,
    src: &[E],
    wt: &[E],
    bias: Option<&[E]>,
    g: Grid,
    ch: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    {
        let (d, s, w) = (f32s_mut(dst), f32s(src), f32s(wt));
        conv_amx::conv(hw, lv.bf16(), d, accumulate, s, w, bias.map(f32s), g, ch);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (hw, lv, dst, accumulate, src, wt, bias, g, ch);
        unreachable!("AMX tiles exist on x86-64 only");
    }
}

/// [`conv_amx::conv_dw`] for E = f32.
fn amx_conv_dw<E: Elem>(
    hw: AmxHw,
    lv: Level,
    gw: &mut [E],
    src: &[E],
    gy: &[E],
    g: Grid,
    ch: (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    conv_amx::conv_dw(hw, lv.bf16(), f32s_mut(gw), f32s(src), f32s(gy), g, ch);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (hw, lv, gw, src, gy, g, ch);
        unreachable!("AMX tiles exist on x86-64 only");
    }
}

/// Σ over the rows of v (rows of c): partial sums per chunk of [`GN_ROWS`] rows in parallel,
/// added in chunk order (each column its own chain, so no level or thread count changes a bit).
pub(super) fn column_sums<E: Elem>(v: &[E], c: usize) -> Vec<E> {
    if c == 0 {
        return Vec::new();
    }
    let parts: Vec<Vec<E>> = v
        .par_chunks(GN_ROWS * c)
        .map(|rows| {
            let mut acc = vec![E::zero(); c];
            for row in rows.chunks_exact(c) {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![E::zero(); c];
    for p in &parts {
        for (t, &x) in total.iter_mut().zip(p) {
            *t += x;
        }
    }
    total
}

/// Whether the convolution's products take bf16-rounded inputs: at [`Precision::Bf16`] for f32.
/// With AMX they run on its tiles ([`conv_amx`]); elsewhere the f32 kernels ([`products`]) take
/// the rounded values — the same arithmetic (f32 sums of the rounded inputs' products, up to
/// the order of the sums), and faster than bf16 products through im2col panels on
/// AVX512-BF16 (measured: 12.9k against 28.8k tokens/s per `unet-small` train step).
fn bf16_inputs<E: Elem>(prec: Precision) -> bool {
    prec == Precision::Bf16 && conv_direct::is_f32::<E>()
}

/// `v` rounded to bf16 (nearest even) and back where `round`, else `v` itself.
fn rounded<E: Elem>(v: &[E], round: bool) -> std::borrow::Cow<'_, [E]> {
    use super::bf16::{from_bf16, to_bf16};
    if !round {
        return std::borrow::Cow::Borrowed(v);
    }
    const CHUNK: usize = 1 << 14;
    let lv = isa::level();
    let chunks = v.par_chunks(CHUNK);
    let f32_rows = std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>();
    let fill = |o: &mut [MaybeUninit<E>], s: &[E]| {
        if f32_rows {
            // SAFETY: E is f32 (checked above): the same memory seen at its own type.
            let (o, s) = unsafe {
                (
                    std::slice::from_raw_parts_mut(o.as_mut_ptr().cast(), o.len()),
                    std::slice::from_raw_parts(s.as_ptr().cast(), s.len()),
                )
            };
            return round_rows::<E>(lv, o, s);
        }
        for (o, &x) in o.iter_mut().zip(s) {
            let x = x.to_f32().unwrap_or(f32::NAN);
            o.write(E::c(f64::from(from_bf16(to_bf16(x)))));
        }
    };
    // SAFETY: `fill` writes every element of its chunk (input and output chunks have the same
    // lengths, and both loops cover them).
    std::borrow::Cow::Owned(unsafe { par_written(v.len(), CHUNK, chunks, fill) })
}

/// o = bf16-rounded s, element by element ([`super::bf16::round_bf16`], which vectorises).
#[inline(always)]
fn round_rows_body(o: &mut [MaybeUninit<f32>], s: &[f32]) {
    for (o, &x) in o.iter_mut().zip(s) {
        o.write(super::bf16::round_bf16(x));
    }
}
multiversion!(
    /// [`round_rows_body`] (E is unused: the macro's instances are generic).
    fn round_rows<E: Elem>(o: &mut [MaybeUninit<f32>], s: &[f32]) => round_rows_body
);

/// W̃ (9·cout, cin) with W̃[ky, kx, o, c] = W[2 − ky, 2 − kx, c, o], W (9·cin, cout).
fn flip<E: Elem>(w: &[E], cin: usize, cout: usize) -> Vec<E> {
    let mut f = vec![E::zero(); 9 * cin * cout];
    for t in 0..9 {
        for o in 0..cout {
            let dst = &mut f[(t * cout + o) * cin..][..cin];
            for (c, d) in dst.iter_mut().enumerate() {
                *d = w[((8 - t) * cin + c) * cout + o];
            }
        }
    }
    f
}

/// GroupNorm of x (b·n, c) in `groups` groups with scale and bias (c); see the module docs.
/// With `swish`, the output is swish(GroupNorm(x)) = y·σ(y) from the same pass, times the
/// dropout mask `keep` (b·n·c) where given (backward: dZ becomes dY = dZ·keep·σ(y)(1 + y(1 −
/// σ(y))), y recomputed from x, then GroupNorm's backward).
pub(crate) fn group_norm<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    scale: T1<E, Cpu>,
    bias: T1<E, Cpu>,
    b: usize,
    groups: usize,
    swish: bool,
    keep: Option<Vec<E>>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let (scale, bias) = (scale.try_contiguous()?, bias.try_contiguous()?);
    assert!(
        swish || keep.is_none(),
        "group_norm: a dropout mask without swish"
    );
    fused(x, |x, _| {
        let (m, c) = *x.shape();
        assert!(
            keep.as_ref().is_none_or(|k| k.len() == m * c),
            "group_norm: mask size"
        );
        assert!(b > 0 && m % b == 0, "group_norm: {m} rows for {b} images");
        assert!(
            groups > 0 && c % groups == 0,
            "group_norm: {c} channels, {groups} groups"
        );
        assert!(
            scale.shape().0 == c && bias.shape().0 == c,
            "group_norm: affine width"
        );
        let (n, cg) = (m / b, c / groups);
        let (xv, s_buf, b_buf) = (input(&x), input(&scale), input(&bias));
        let lv = isa::level();
        let rows = GN_ROWS.min(chunk_rows(c));
        let count = (n * cg) as f64;
        let empty = n * c == 0;
        let stats = if empty {
            Stats::empty(b, c)
        } else {
            // the shift K of each (image, group), expanded per channel
            let shift: Vec<E> = (0..b * c)
                .map(|ic| xv[(ic / c) * n * c + (ic % c) / cg * cg])
                .collect();
            let sums = per_image(&xv, n, c, rows, |img, xs| {
                let (mut s1, mut s2) = (vec![E::zero(); c], vec![E::zero(); c]);
                shifted_sums(lv, &mut s1, &mut s2, xs, &shift[img * c..][..c]);
                (s1, s2)
            });
            Stats::from_sums(&sums, &shift, (c, cg), count)
        };
        let (sv, bv): (&[E], &[E]) = (&s_buf, &b_buf);
        // the mask's stand-in without dropout: ×1 is exact
        let ones = vec![E::one(); if keep.is_none() { rows * c } else { 0 }];
        // one chunk per image, rows split inside
        // SAFETY: the image's chunk (n·c) is tiled by its row chunks (whole rows of c), paired
        // with x's rows of the same length, and `gn_rows` writes every element of each.
        let y = unsafe {
            par_written(
                m * c,
                n * c,
                xv.par_chunks((n * c).max(1)).enumerate(),
                |yi, (img, xi)| {
                    let (mu, r) = stats.image(img);
                    yi.par_chunks_mut(rows * c)
                        .zip(xi.par_chunks(rows * c))
                        .enumerate()
                        .for_each(|(j, (ys, xs))| {
                            let at = img * n * c + j * rows * c;
                            let k = mask_rows(&keep, &ones, at, ys.len());
                            gn_rows(lv, ys, xs, mu, r, sv, bv, swish, k)
                        });
                },
            )
        };
        let (sv, bv) = (s_buf, b_buf);
        let (xg, sg, bg) = (x.ghost(), scale.ghost(), bias.ghost());
        Ok(Forward {
            shape: (m, c),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                if empty {
                    grads.get_or_alloc_mut(&xg)?;
                    grads.get_or_alloc_mut(&sg)?;
                    grads.get_or_alloc_mut(&bg)?;
                    return Ok(());
                }
                // swish: dY = dZ·swish'(y), y recomputed from x and the statistics
                // dY (through swish's derivative and the dropout mask where fused), and
                // S1 = Σ dY, S2 = Σ dY ⊙ x̂ per (image, channel) — one pass with the swish
                let (gy, sums) = if swish {
                    let (sv, bv): (&[E], &[E]) = (&sv, &bv);
                    let mut d: Vec<E> = Vec::with_capacity(m * c);
                    let per_image = gy.par_chunks(n * c).zip(xv.par_chunks(n * c));
                    let sums: Partials<E> = d.spare_capacity_mut()[..m * c]
                        .par_chunks_mut((n * c).max(1))
                        .zip(per_image)
                        .enumerate()
                        .map(|(img, (di, (gi, xi)))| {
                            let (mu, r) = stats.image(img);
                            di.par_chunks_mut(rows * c)
                                .zip(gi.par_chunks(rows * c).zip(xi.par_chunks(rows * c)))
                                .enumerate()
                                .map(|(j, (d, (g, xs)))| {
                                    let at = img * n * c + j * rows * c;
                                    let k = mask_rows(&keep, &ones, at, d.len());
                                    let (mut s1, mut s2) = (vec![E::zero(); c], vec![E::zero(); c]);
                                    let sums = (&mut s1[..], &mut s2[..]);
                                    gn_swish_grad(lv, d, sums, g, xs, mu, r, sv, bv, k);
                                    (s1, s2)
                                })
                                .collect()
                        })
                        .collect();
                    // SAFETY: the image chunks (n·c each) tile the m·c spare slots (m = b·n),
                    // each is tiled by its row chunks (whole rows of c), and `gn_swish_grad`
                    // wrote every element of each.
                    unsafe { d.set_len(m * c) };
                    (d, sums)
                } else {
                    let sums = per_image_pair(&gy, &xv, n, c, rows, |img, gs, xs| {
                        let (mu, r) = stats.image(img);
                        let (mut s1, mut s2) = (vec![E::zero(); c], vec![E::zero(); c]);
                        gn_grad_sums(lv, &mut s1, &mut s2, gs, xs, mu, r);
                        (s1, s2)
                    });
                    (gy, sums)
                };
                let (s1, s2) = combine(&sums, c);
                let total = |s: &[f64], ch: usize| (0..b).map(|i| s[i * c + ch]).sum::<f64>();
                let gb = grads.get_or_alloc_mut(&bg)?;
                for (ch, a) in gb.iter_mut().enumerate() {
                    *a += E::c(total(&s1, ch));
                }
                let gs = grads.get_or_alloc_mut(&sg)?;
                for (ch, a) in gs.iter_mut().enumerate() {
                    *a += E::c(total(&s2, ch));
                }
                // per (image, group), expanded per channel: mean_g(dY·s), mean_g(dY·s·x̂)
                let mut means = vec![E::zero(); 2 * b * c];
                for img in 0..b {
                    for gi in 0..groups {
                        let chs = gi * cg..(gi + 1) * cg;
                        let f = |s: &[f64]| {
                            let t = chs.clone().map(|ch| to64(sv[ch]) * s[img * c + ch]);
                            E::c(t.sum::<f64>() / count)
                        };
                        let at = 2 * img * c;
                        means[at + gi * cg..at + (gi + 1) * cg].fill(f(&s1));
                        means[at + c + gi * cg..at + c + (gi + 1) * cg].fill(f(&s2));
                    }
                }
                let sv: &[E] = &sv;
                let gx = grads.get_or_alloc_mut(&xg)?;
                gx.par_chunks_mut(n * c)
                    .zip(gy.par_chunks(n * c))
                    .zip(xv.par_chunks(n * c))
                    .enumerate()
                    .for_each(|(img, ((gxi, gi), xi))| {
                        let (mu, r) = stats.image(img);
                        let k = &means[2 * img * c..][..2 * c];
                        let (ma, mb) = (&k[..c], &k[c..]);
                        gxi.par_chunks_mut(rows * c)
                            .zip(gi.par_chunks(rows * c))
                            .zip(xi.par_chunks(rows * c))
                            .for_each(|((gx, g), xs)| {
                                gn_grad_rows(lv, gx, g, xs, mu, r, sv, ma, mb)
                            });
                    });
                Ok(())
            }),
        })
    })
}

fn to64<E: Elem>(v: E) -> f64 {
    v.to_f64().unwrap_or(f64::NAN)
}

/// Partial sums per (image, task) of a c-channel pass over each image's n rows in tasks of
/// `rows` rows, in order.
type Partials<E> = Vec<Vec<(Vec<E>, Vec<E>)>>;

/// Runs `f(image, rows)` over every task of every image in parallel; results in order.
fn per_image<E: Elem>(
    xv: &[E],
    n: usize,
    c: usize,
    rows: usize,
    f: impl Fn(usize, &[E]) -> (Vec<E>, Vec<E>) + Sync,
) -> Partials<E> {
    xv.par_chunks(n * c)
        .enumerate()
        .map(|(img, xi)| xi.par_chunks(rows * c).map(|xs| f(img, xs)).collect())
        .collect()
}

/// [`per_image`] over two aligned inputs.
fn per_image_pair<E: Elem>(
    av: &[E],
    bv: &[E],
    n: usize,
    c: usize,
    rows: usize,
    f: impl Fn(usize, &[E], &[E]) -> (Vec<E>, Vec<E>) + Sync,
) -> Partials<E> {
    av.par_chunks(n * c)
        .zip(bv.par_chunks(n * c))
        .enumerate()
        .map(|(img, (ai, bi))| {
            ai.par_chunks(rows * c)
                .zip(bi.par_chunks(rows * c))
                .map(|(a, b)| f(img, a, b))
                .collect()
        })
        .collect()
}

/// The tasks' partial sums added per (image, channel) in f64, in task order: (Σ first, Σ second),
/// each (b·c).
fn combine<E: Elem>(parts: &Partials<E>, c: usize) -> (Vec<f64>, Vec<f64>) {
    let b = parts.len();
    let (mut s1, mut s2) = (vec![0.0; b * c], vec![0.0; b * c]);
    for (img, tasks) in parts.iter().enumerate() {
        for (p1, p2) in tasks {
            for ch in 0..c {
                s1[img * c + ch] += to64(p1[ch]);
                s2[img * c + ch] += to64(p2[ch]);
            }
        }
    }
    (s1, s2)
}

/// μ and r of every (image, group), expanded per channel: (b·c) each.
struct Stats<E> {
    mu: Vec<E>,
    r: Vec<E>,
    c: usize,
}

impl<E: Elem> Stats<E> {
    fn empty(b: usize, c: usize) -> Self {
        Stats {
            mu: vec![E::zero(); b * c],
            r: vec![E::zero(); b * c],
            c,
        }
    }

    /// From the shifted sums (Σd, Σd² per task and channel, d = x − K) and the shifts K.
    fn from_sums(sums: &Partials<E>, shift: &[E], (c, cg): (usize, usize), count: f64) -> Self {
        let (s1, s2) = combine(sums, c);
        let mut st = Stats::empty(sums.len(), c);
        for ic0 in (0..s1.len()).step_by(cg) {
            let gsum = |s: &[f64]| s[ic0..ic0 + cg].iter().sum::<f64>() / count;
            let (md, m2) = (gsum(&s1), gsum(&s2));
            let var = (m2 - md * md).max(0.0);
            let mu = E::c(to64(shift[ic0]) + md);
            let r = E::c(1.0 / (var + GROUP_NORM_EPS).sqrt());
            st.mu[ic0..ic0 + cg].fill(mu);
            st.r[ic0..ic0 + cg].fill(r);
        }
        st
    }

    /// Image `img`'s per-channel μ and r.
    fn image(&self, img: usize) -> (&[E], &[E]) {
        let at = img * self.c;
        (&self.mu[at..at + self.c], &self.r[at..at + self.c])
    }
}

/// s1 += Σ_rows (x − k), s2 += Σ_rows (x − k)², per channel.
#[inline(always)]
fn shifted_sums_body<E: Elem>(s1: &mut [E], s2: &mut [E], xs: &[E], k: &[E]) {
    let c = k.len();
    for row in xs.chunks_exact(c) {
        for (((a1, a2), &x), &k) in s1.iter_mut().zip(s2.iter_mut()).zip(row).zip(k) {
            let d = x - k;
            *a1 += d;
            *a2 += d * d;
        }
    }
}
multiversion!(
    fn shifted_sums<E: Elem>(s1: &mut [E], s2: &mut [E], xs: &[E], k: &[E])
        => shifted_sums_body
);

/// The elements at..at + len of the dropout mask, or of `ones` without one.
fn mask_rows<'a, E: Elem>(
    keep: &'a Option<Vec<E>>,
    ones: &'a [E],
    at: usize,
    len: usize,
) -> &'a [E] {
    match keep {
        Some(k) => &k[at..at + len],
        None => &ones[..len],
    }
}

/// y = (x − μ)·r·s + bias per row, or with `swish` swish(y)·keep (the same rows of the dropout
/// mask, or ones: ×1 is exact).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gn_rows_body<E: Elem>(
    ys: &mut [MaybeUninit<E>],
    xs: &[E],
    mu: &[E],
    r: &[E],
    s: &[E],
    bias: &[E],
    swish: bool,
    keep: &[E],
) {
    let c = mu.len();
    let rows = ys.chunks_exact_mut(c).zip(xs.chunks_exact(c));
    if swish {
        for ((y, x), k) in rows.zip(keep.chunks_exact(c)) {
            let lanes = y.iter_mut().zip(x).zip(mu).zip(r).zip(s).zip(bias).zip(k);
            for ((((((y, &x), &mu), &r), &s), &bias), &k) in lanes {
                y.write(act_grad(true, (x - mu) * r * s + bias).0 * k);
            }
        }
    } else {
        for (y, x) in rows {
            let lanes = y.iter_mut().zip(x).zip(mu).zip(r).zip(s).zip(bias);
            for (((((y, &x), &mu), &r), &s), &bias) in lanes {
                y.write((x - mu) * r * s + bias);
            }
        }
    }
}
multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn gn_rows<E: Elem>(
        ys: &mut [MaybeUninit<E>],
        xs: &[E],
        mu: &[E],
        r: &[E],
        s: &[E],
        bias: &[E],
        swish: bool,
        keep: &[E],
    ) => gn_rows_body
);

/// d = g·keep·swish'(y) per row (keep: the dropout mask's rows, or ones), y = (x − μ)·r·s +
/// bias: the gradient reaching GroupNorm's output from swish's (and the dropout's); and, in the
/// same pass, its sums S1 += d, S2 += d·x̂ ([`gn_grad_sums`]'s, element for element).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gn_swish_grad_body<E: Elem>(
    ds: &mut [MaybeUninit<E>],
    (s1, s2): (&mut [E], &mut [E]),
    gs: &[E],
    xs: &[E],
    mu: &[E],
    r: &[E],
    s: &[E],
    bias: &[E],
    keep: &[E],
) {
    let c = mu.len();
    let rows = ds.chunks_exact_mut(c).zip(gs.chunks_exact(c));
    for (((d, g), x), k) in rows.zip(xs.chunks_exact(c)).zip(keep.chunks_exact(c)) {
        let lanes = d
            .iter_mut()
            .zip(s1.iter_mut().zip(s2.iter_mut()))
            .zip(g)
            .zip(x)
            .zip(mu)
            .zip(r)
            .zip(s)
            .zip(bias)
            .zip(k);
        for ((((((((d, (a1, a2)), &g), &x), &mu), &r), &s), &bias), &k) in lanes {
            let dv = g * k * act_grad(true, (x - mu) * r * s + bias).1;
            d.write(dv);
            *a1 += dv;
            *a2 += dv * ((x - mu) * r);
        }
    }
}
multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn gn_swish_grad<E: Elem>(
        ds: &mut [MaybeUninit<E>],
        sums: (&mut [E], &mut [E]),
        gs: &[E],
        xs: &[E],
        mu: &[E],
        r: &[E],
        s: &[E],
        bias: &[E],
        keep: &[E],
    ) => gn_swish_grad_body
);

/// s1 += Σ_rows g, s2 += Σ_rows g·x̂, x̂ = (x − μ)·r, per channel.
#[inline(always)]
fn gn_grad_sums_body<E: Elem>(s1: &mut [E], s2: &mut [E], gs: &[E], xs: &[E], mu: &[E], r: &[E]) {
    let c = mu.len();
    for (g, x) in gs.chunks_exact(c).zip(xs.chunks_exact(c)) {
        let lanes = s1
            .iter_mut()
            .zip(s2.iter_mut())
            .zip(g)
            .zip(x)
            .zip(mu)
            .zip(r);
        for (((((a1, a2), &g), &x), &mu), &r) in lanes {
            *a1 += g;
            *a2 += g * ((x - mu) * r);
        }
    }
}
multiversion!(
    fn gn_grad_sums<E: Elem>(s1: &mut [E], s2: &mut [E], gs: &[E], xs: &[E], mu: &[E], r: &[E])
        => gn_grad_sums_body
);

/// dx += (g·s − ma − x̂·mb)·r, x̂ = (x − μ)·r, per row (the differences before the product
/// with r, which is large for groups of nearly constant values).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gn_grad_rows_body<E: Elem>(
    gx: &mut [E],
    gs: &[E],
    xs: &[E],
    mu: &[E],
    r: &[E],
    s: &[E],
    ma: &[E],
    mb: &[E],
) {
    let c = mu.len();
    for ((d, g), x) in gx
        .chunks_exact_mut(c)
        .zip(gs.chunks_exact(c))
        .zip(xs.chunks_exact(c))
    {
        let lanes = d
            .iter_mut()
            .zip(g)
            .zip(x)
            .zip(mu)
            .zip(r)
            .zip(s)
            .zip(ma)
            .zip(mb);
        for (((((((d, &g), &x), &mu), &r), &s), &ma), &mb) in lanes {
            *d += (g * s - ma - (x - mu) * r * mb) * r;
        }
    }
}
multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn gn_grad_rows<E: Elem>(
        gx: &mut [E],
        gs: &[E],
        xs: &[E],
        mu: &[E],
        r: &[E],
        s: &[E],
        ma: &[E],
        mb: &[E],
    ) => gn_grad_rows_body
);

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Shapes (b, h, w, cin, cout): h ≠ w, a single row or column, single pixels, channel
    /// counts that are not multiples of 8.
    const CONV_SHAPES: [(usize, usize, usize, usize, usize); 5] = [
        (2, 3, 5, 3, 7),
        (1, 1, 6, 5, 2),
        (3, 4, 1, 9, 10),
        (1, 1, 1, 2, 3),
        (2, 7, 4, 17, 11),
    ];

    /// Shapes (b, n, c, groups): one group, one channel per group, ragged widths, an image
    /// spanning several row tasks (n > GN_ROWS), a single pixel.
    const GN_SHAPES: [(usize, usize, usize, usize); 6] = [
        (2, 15, 12, 3),
        (1, 7, 5, 1),
        (3, 4, 6, 6),
        (2, 300, 4, 2),
        (1, 1, 3, 3),
        (2, 9, 20, 5),
    ];

    /// Pixel (image, i + dy, j + dx) of pixel p, if inside the image.
    fn neighbour(p: usize, dy: isize, dx: isize, (h, w): (usize, usize)) -> Option<usize> {
        let (img, i, j) = (p / (h * w), (p / w % h) as isize, (p % w) as isize);
        let (si, sj) = (i + dy, j + dx);
        (si >= 0 && sj >= 0 && si < h as isize && sj < w as isize)
            .then(|| (img * h + si as usize) * w + sj as usize)
    }

    /// The taps (t = 3·ky + kx, neighbour of p) that lie inside the image.
    fn taps(p: usize, hw: (usize, usize)) -> impl Iterator<Item = (usize, usize)> {
        (0..9).filter_map(move |t| {
            neighbour(p, t as isize / 3 - 1, t as isize % 3 - 1, hw).map(|q| (t, q))
        })
    }

    /// y[p, o] = Σ_{taps (t, q) of p} Σ_c x[q, c]·w[t, c, o], the definition.
    fn naive_conv(x: &[f64], w: &[f64], (b, h, wd, cin, cout): Dims) -> Vec<f64> {
        let mut y = vec![0.0; b * h * wd * cout];
        for p in 0..b * h * wd {
            for o in 0..cout {
                let mut s = 0.0;
                for (t, q) in taps(p, (h, wd)) {
                    for c in 0..cin {
                        s += x[q * cin + c] * w[(t * cin + c) * cout + o];
                    }
                }
                y[p * cout + o] = s;
            }
        }
        y
    }

    /// The gradients of Σ R ⊙ conv(x, w) by the definition: dx[q, c] = Σ over the (p, t) whose
    /// tap t reads q of Σ_o R[p, o]·w[t, c, o]; dw[t, c, o] = Σ_p x[tap t of p, c]·R[p, o].
    fn naive_conv_grads(
        x: &[f64],
        w: &[f64],
        r: &[f64],
        (b, h, wd, cin, cout): Dims,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
        for p in 0..b * h * wd {
            for (t, q) in taps(p, (h, wd)) {
                for c in 0..cin {
                    for o in 0..cout {
                        dx[q * cin + c] += r[p * cout + o] * w[(t * cin + c) * cout + o];
                        dw[(t * cin + c) * cout + o] += x[q * cin + c] * r[p * cout + o];
                    }
                }
            }
        }
        (dx, dw)
    }

    type Dims = (usize, usize, usize, usize, usize);

    /// The elements of each (image, group) of x (b·n, c): their indices into x.
    fn group_members(b: usize, n: usize, c: usize, groups: usize) -> Vec<Vec<usize>> {
        let cg = c / groups;
        let mut out = Vec::new();
        for img in 0..b {
            for g in 0..groups {
                let mut idx = Vec::new();
                for p in 0..n {
                    for ch in g * cg..(g + 1) * cg {
                        idx.push((img * n + p) * c + ch);
                    }
                }
                out.push(idx);
            }
        }
        out
    }

    /// GroupNorm by its definition (two-pass mean and biased variance per group) and the
    /// gradients of Σ R ⊙ y through the Jacobian entries ∂x̂_i/∂x_j = r·(δ_ij − 1/N − x̂_i x̂_j/N)
    /// summed element by element (N² terms per group).
    fn naive_gn(
        x: &[f64],
        s: &[f64],
        bias: &[f64],
        r: &[f64],
        (b, n, c, groups): (usize, usize, usize, usize),
    ) -> [Vec<f64>; 4] {
        let (mut y, mut dx) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        let (mut ds, mut db) = (vec![0.0; c], vec![0.0; c]);
        for idx in group_members(b, n, c, groups) {
            let nn = idx.len() as f64;
            let mu = idx.iter().map(|&i| x[i]).sum::<f64>() / nn;
            // one refinement step: the mean to within rounding of its own value
            let mu = mu + idx.iter().map(|&i| x[i] - mu).sum::<f64>() / nn;
            let var = idx.iter().map(|&i| (x[i] - mu).powi(2)).sum::<f64>() / nn;
            let rs = 1.0 / (var + 1e-6).sqrt();
            let xh: Vec<f64> = idx.iter().map(|&i| (x[i] - mu) * rs).collect();
            for (a, &i) in idx.iter().enumerate() {
                let ch = i % c;
                y[i] = xh[a] * s[ch] + bias[ch];
                ds[ch] += r[i] * xh[a];
                db[ch] += r[i];
                for (bj, &j) in idx.iter().enumerate() {
                    let delta = if a == bj { 1.0 } else { 0.0 };
                    let jac = rs * (delta - 1.0 / nn - xh[a] * xh[bj] / nn);
                    dx[j] += r[i] * s[ch] * jac;
                }
            }
        }
        [y, dx, ds, db]
    }

    fn rand_t1(dev: &Cpu, rng: &mut StdRng, n: usize) -> T1<f64, Cpu> {
        let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-1.5..1.5)).collect();
        tensor(dev, v, (n,))
    }

    #[test]
    fn conv_matches_the_definition() {
        each_path(|dev, rng| {
            for dims @ (b, h, wd, cin, cout) in CONV_SHAPES {
                let m = b * h * wd;
                let x = rand2(dev, rng, (m, cin));
                let w = rand2(dev, rng, (9 * cin, cout));
                let r = rand_vec(rng, m * cout);
                let y = conv3x3(x.leaky_trace(), w.clone(), None, b, h, wd).unwrap();
                let (f, g) = grads(y, &r);
                let (xs, ws) = (x.as_vec(), w.as_vec());
                close(&f, &naive_conv(&xs, &ws, dims), "conv");
                let (dx, dw) = naive_conv_grads(&xs, &ws, &r, dims);
                close(&g.get(&x).as_vec(), &dx, "conv dx");
                close(&g.get(&w).as_vec(), &dw, "conv dw");
            }
        });
    }

    #[test]
    fn group_norm_matches_the_definition() {
        each_path(|dev, rng| {
            for dims @ (b, n, c, groups) in GN_SHAPES {
                // an offset far above the spread: the shifted statistics must not cancel (the
                // plain Σx²/N − μ² would lose ~1e-10 of the variance here)
                for offset in [0.0, 1e2] {
                    let xv: Vec<f64> = rand_vec(rng, b * n * c)
                        .iter()
                        .map(|v| v + offset)
                        .collect();
                    let x = tensor(dev, xv.clone(), (b * n, c));
                    let (s, bias) = (rand_t1(dev, rng, c), rand_t1(dev, rng, c));
                    let r = rand_vec(rng, b * n * c);
                    let y = group_norm(
                        x.leaky_trace(),
                        s.clone(),
                        bias.clone(),
                        b,
                        groups,
                        false,
                        None,
                    );
                    let (f, g) = grads(y.unwrap(), &r);
                    let [ye, dx, ds, db] = naive_gn(&xv, &s.as_vec(), &bias.as_vec(), &r, dims);
                    close(&f, &ye, "group_norm");
                    close(&g.get(&x).as_vec(), &dx, "group_norm dx");
                    close(&g.get(&s).as_vec(), &ds, "group_norm dscale");
                    close(&g.get(&bias).as_vec(), &db, "group_norm dbias");
                }
            }
        });
    }

    /// Central differences of L = Σ R ⊙ y against the gradients of every input element.
    fn check_fd(
        inputs: &[Vec<f64>],
        grads: &[Vec<f64>],
        loss: impl Fn(&[Vec<f64>]) -> f64,
        step: f64,
        tol: f64,
        what: &str,
    ) {
        for (a, g) in grads.iter().enumerate() {
            for i in 0..inputs[a].len() {
                let mut p = inputs.to_vec();
                p[a][i] += step;
                let up = loss(&p);
                p[a][i] -= 2.0 * step;
                let fd = (up - loss(&p)) / (2.0 * step);
                assert!(
                    (fd - g[i]).abs() <= tol * (1.0 + g[i].abs()),
                    "{what} input {a}[{i}]: finite difference {fd} vs gradient {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let (dev, mut rng) = (Cpu::default(), StdRng::seed_from_u64(3));
        let t2 = |v: &[f64], s| dev.tensor_from_vec(v.to_vec(), s);
        for (b, h, wd, cin, cout) in [(2, 3, 4, 3, 5), (1, 1, 5, 2, 3), (1, 4, 1, 3, 2)] {
            let m = b * h * wd;
            let x = rand_vec(&mut rng, m * cin);
            let w = rand_vec(&mut rng, 9 * cin * cout);
            let r = rand_vec(&mut rng, m * cout);
            let (xt, wt) = (t2(&x, (m, cin)), t2(&w, (9 * cin, cout)));
            let (_, g) = grads(
                conv3x3(xt.leaky_trace(), wt.clone(), None, b, h, wd).unwrap(),
                &r,
            );
            let loss = |p: &[Vec<f64>]| {
                let y = conv3x3(
                    t2(&p[0], (m, cin)),
                    t2(&p[1], (9 * cin, cout)),
                    None,
                    b,
                    h,
                    wd,
                );
                y.unwrap().as_vec().iter().zip(&r).map(|(y, r)| y * r).sum()
            };
            let gs = [g.get(&xt).as_vec(), g.get(&wt).as_vec()];
            check_fd(&[x, w], &gs, loss, 1e-4, 1e-8, "conv");
        }
        for (b, n, c, groups) in [(2, 5, 6, 3), (1, 4, 3, 1), (2, 3, 4, 4)] {
            let x = rand_vec(&mut rng, b * n * c);
            let (s, bias) = (rand_vec(&mut rng, c), rand_vec(&mut rng, c));
            let r = rand_vec(&mut rng, b * n * c);
            let t1 = |v: &[f64]| dev.tensor_from_vec(v.to_vec(), (c,));
            let (xt, st, bt) = (t2(&x, (b * n, c)), t1(&s), t1(&bias));
            for swish in [false, true] {
                let y = group_norm(
                    xt.leaky_trace(),
                    st.clone(),
                    bt.clone(),
                    b,
                    groups,
                    swish,
                    None,
                );
                let (_, g) = grads(y.unwrap(), &r);
                let loss = |p: &[Vec<f64>]| {
                    let (x, sc, bc) = (t2(&p[0], (b * n, c)), t1(&p[1]), t1(&p[2]));
                    let y = group_norm(x, sc, bc, b, groups, swish, None);
                    y.unwrap().as_vec().iter().zip(&r).map(|(y, r)| y * r).sum()
                };
                let gs = [
                    g.get(&xt).as_vec(),
                    g.get(&st).as_vec(),
                    g.get(&bt).as_vec(),
                ];
                let what = if swish {
                    "group_norm_swish"
                } else {
                    "group_norm"
                };
                check_fd(
                    &[x.clone(), s.clone(), bias.clone()],
                    &gs,
                    loss,
                    1e-5,
                    1e-7,
                    what,
                );
            }
        }
    }

    /// The f32 kernels (f32 products and sums) against the f64 definitions, to
    /// 2e-5·(1 + |reference|).
    #[test]
    fn f32_matches_the_f64_definition() {
        let (dev, mut rng) = (Cpu::default(), StdRng::seed_from_u64(4));
        let to64 = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<f64>>();
        let to32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let close_to = |got: Vec<f32>, want: &[f64], what: &str| close32(&got, &to32(want), what);
        for dims @ (b, h, wd, cin, cout) in CONV_SHAPES {
            let m = b * h * wd;
            let (x, w) = (
                rand32(&mut rng, m * cin, 1.5),
                rand32(&mut rng, 9 * cin * cout, 1.5),
            );
            let r = rand32(&mut rng, m * cout, 1.0);
            let xt = dev.tensor_from_vec(x.clone(), (m, cin));
            let wt = dev.tensor_from_vec(w.clone(), (9 * cin, cout));
            let (f, g) = grads(
                conv3x3(xt.leaky_trace(), wt.clone(), None, b, h, wd).unwrap(),
                &r,
            );
            let (x, w, r) = (to64(&x), to64(&w), to64(&r));
            close_to(f, &naive_conv(&x, &w, dims), "conv f32");
            let (dx, dw) = naive_conv_grads(&x, &w, &r, dims);
            close_to(g.get(&xt).as_vec(), &dx, "conv f32 dx");
            close_to(g.get(&wt).as_vec(), &dw, "conv f32 dw");
        }
        for dims @ (b, n, c, groups) in GN_SHAPES {
            let x = rand32(&mut rng, b * n * c, 1.5);
            let (s, bias) = (rand32(&mut rng, c, 1.5), rand32(&mut rng, c, 1.5));
            let r = rand32(&mut rng, b * n * c, 1.0);
            let xt = dev.tensor_from_vec(x.clone(), (b * n, c));
            let (st, bt) = (
                dev.tensor_from_vec(s.clone(), (c,)),
                dev.tensor_from_vec(bias.clone(), (c,)),
            );
            let y = group_norm(
                xt.leaky_trace(),
                st.clone(),
                bt.clone(),
                b,
                groups,
                false,
                None,
            )
            .unwrap();
            let (f, g) = grads(y, &r);
            let [ye, dx, ds, db] = naive_gn(&to64(&x), &to64(&s), &to64(&bias), &to64(&r), dims);
            close_to(f, &ye, "group_norm f32");
            close_to(g.get(&xt).as_vec(), &dx, "group_norm f32 dx");
            close_to(g.get(&st).as_vec(), &ds, "group_norm f32 dscale");
            close_to(g.get(&bt).as_vec(), &db, "group_norm f32 dbias");
        }
    }

    /// At bf16 the convolution's three products take bf16-rounded operands: the forward pass
    /// and both gradients are the definitions' values for the rounded x, w and dY (up to f32
    /// accumulation error), and differ from the f32 kernel's.
    /// At [`Precision::Bf16`] the products take bf16-rounded inputs with f32 sums (on AMX tiles
    /// where the CPU has them, else the f32 kernels on the rounded values), at every
    /// instruction-set level: a small shape, and one over several Winograd blocks and dW
    /// chunks.
    #[test]
    fn bf16_conv_rounds_every_product_input() {
        for lv in isa::supported() {
            for dims in [(2, 5, 6, 7, 9), (2, 32, 32, 64, 65)] {
                isa::with_level(lv, || bf16_conv_case(dims));
            }
        }
    }

    fn bf16_conv_case(dims: Dims) {
        use super::super::bf16::{from_bf16, to_bf16};
        use crate::precision::with_precision;
        let (dev, mut rng) = (Cpu::default(), StdRng::seed_from_u64(5));
        let (b, h, wd, cin, cout) = dims;
        let m = b * h * wd;
        let (x, w) = (
            rand32(&mut rng, m * cin, 1.0),
            rand32(&mut rng, 9 * cin * cout, 1.0),
        );
        let r = rand32(&mut rng, m * cout, 1.0);
        let xt = dev.tensor_from_vec(x.clone(), (m, cin));
        let wt = dev.tensor_from_vec(w.clone(), (9 * cin, cout));
        let run = |p| {
            with_precision(p, || {
                let y = conv3x3(xt.leaky_trace(), wt.clone(), None, b, h, wd).unwrap();
                let (f, g) = grads(y, &r);
                (f, g.get(&xt).as_vec(), g.get(&wt).as_vec())
            })
        };
        let (f16, gx16, gw16) = run(Precision::Bf16);
        let (f32v, gx32, gw32) = run(Precision::F32);
        assert!(f16 != f32v && gx16 != gx32 && gw16 != gw32);
        let q = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .map(|&v| f64::from(from_bf16(to_bf16(v))))
                .collect()
        };
        let abs = |v: &[f64]| -> Vec<f64> { v.iter().map(|v| v.abs()).collect() };
        let (xq, wq, rq) = (q(&x), q(&w), q(&r));
        // |error| ≤ (terms · 2⁻²³) · Σ|terms| (f32 accumulation of exact products)
        let check = |got: &[f32], want: &[f64], bound: &[f64], terms: usize, what: &str| {
            for (i, ((&g, &e), &a)) in got.iter().zip(want).zip(bound).enumerate() {
                let tol = a * terms as f64 * 1.2e-7 + 1e-30;
                assert!((f64::from(g) - e).abs() <= tol, "{what}[{i}]: {g} vs {e}");
            }
        };
        check(
            &f16,
            &naive_conv(&xq, &wq, dims),
            &naive_conv(&abs(&xq), &abs(&wq), dims),
            9 * cin,
            "y",
        );
        let (dx, dw) = naive_conv_grads(&xq, &wq, &rq, dims);
        let (bx, bw) = naive_conv_grads(&abs(&xq), &abs(&wq), &abs(&rq), dims);
        check(&gx16, &dx, &bx, 9 * cout, "dx");
        check(&gw16, &dw, &bw, m, "dw");
    }

    fn generic_conv<T: Tape<f32, Cpu>>(
        x: T2<f32, Cpu, T>,
        w: T2<f32, Cpu>,
        (b, h, wd): (usize, usize, usize),
    ) -> T2<f32, Cpu, T> {
        crate::unet_layers::conv3x3(x, w, b, h, wd).unwrap()
    }

    fn generic_gn<T: Tape<f32, Cpu>>(
        x: T2<f32, Cpu, T>,
        s: T1<f32, Cpu>,
        bias: T1<f32, Cpu>,
        b: usize,
        groups: usize,
    ) -> T2<f32, Cpu, T> {
        crate::unet_layers::group_norm(x, s, bias, b, groups).unwrap()
    }

    /// The CPU kernels against the generic defaults (`unet_layers`: gather + matmul;
    /// reshape/permute/normalize), values and gradients in f64.
    #[test]
    fn image_ops_match_the_generic_defaults() {
        use super::super::Kernels;
        each_path(|dev, rng| {
            for (b, h, wd, cin, cout) in CONV_SHAPES {
                let m = b * h * wd;
                let x = rand2(dev, rng, (m, cin));
                let w = rand2(dev, rng, (9 * cin, cout));
                let r = rand_vec(rng, m * cout);
                let fused = <Cpu as Kernels<f64>>::conv3x3(x.leaky_trace(), w.clone(), b, h, wd);
                let (fa, ga) = grads(fused.unwrap(), &r);
                let generic = crate::unet_layers::conv3x3(x.leaky_trace(), w.clone(), b, h, wd);
                let (fb, gb) = grads(generic.unwrap(), &r);
                close(&fa, &fb, "conv3x3");
                close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "conv3x3 dx");
                close(&ga.get(&w).as_vec(), &gb.get(&w).as_vec(), "conv3x3 dw");
                // with the bias: the generic conv plus dfdx's broadcast add
                let bias = rand_t1(dev, rng, cout);
                let fused = <Cpu as Kernels<f64>>::conv3x3_bias(
                    x.leaky_trace(),
                    w.clone(),
                    bias.clone(),
                    b,
                    h,
                    wd,
                );
                let (fa, ga) = grads(fused.unwrap(), &r);
                let generic = crate::unet_layers::conv3x3(x.leaky_trace(), w.clone(), b, h, wd);
                let generic = generic.unwrap();
                let s = *generic.shape();
                let generic = generic + bias.clone().broadcast_like::<_, Axis<0>>(&s);
                let (fb, gb) = grads(generic, &r);
                close(&fa, &fb, "conv3x3_bias");
                close(
                    &ga.get(&x).as_vec(),
                    &gb.get(&x).as_vec(),
                    "conv3x3_bias dx",
                );
                close(
                    &ga.get(&w).as_vec(),
                    &gb.get(&w).as_vec(),
                    "conv3x3_bias dw",
                );
                let (da, db) = (ga.get(&bias).as_vec(), gb.get(&bias).as_vec());
                close(&da, &db, "conv3x3_bias dbias");
            }
            for (b, n, c, groups) in GN_SHAPES {
                let x = rand2(dev, rng, (b * n, c));
                let (s, bias) = (rand_t1(dev, rng, c), rand_t1(dev, rng, c));
                let r = rand_vec(rng, b * n * c);
                // a dropout mask (p = 1/4): 0 or 4/3
                let keep: Vec<f64> = (0..b * n * c)
                    .map(|_| {
                        if rng.gen::<f64>() < 0.25 {
                            0.0
                        } else {
                            4.0 / 3.0
                        }
                    })
                    .collect();
                for (swish, keep) in [(false, None), (true, None), (true, Some(keep))] {
                    let (sc, bc) = (s.clone(), bias.clone());
                    let masked = keep.is_some();
                    let fused = if swish {
                        let k = keep.clone();
                        <Cpu as Kernels<f64>>::group_norm_swish(
                            x.leaky_trace(),
                            sc,
                            bc,
                            b,
                            groups,
                            k,
                        )
                    } else {
                        <Cpu as Kernels<f64>>::group_norm(x.leaky_trace(), sc, bc, b, groups)
                    };
                    let (fa, ga) = grads(fused.unwrap(), &r);
                    let (sc, bc) = (s.clone(), bias.clone());
                    let generic =
                        crate::unet_layers::group_norm(x.leaky_trace(), sc, bc, b, groups);
                    let generic = if swish {
                        crate::layers::swish(generic.unwrap())
                    } else {
                        generic
                    };
                    let generic = match keep {
                        Some(k) => generic.unwrap() * dev.tensor_from_vec(k, (b * n, c)),
                        None => generic.unwrap(),
                    };
                    let (fb, gb) = grads(generic, &r);
                    let what = match (swish, masked) {
                        (false, _) => "group_norm",
                        (true, false) => "group_norm_swish",
                        (true, true) => "group_norm_swish with dropout",
                    };
                    close(&fa, &fb, what);
                    close(
                        &ga.get(&x).as_vec(),
                        &gb.get(&x).as_vec(),
                        &format!("{what} dx"),
                    );
                    let (da, db) = (ga.get(&s).as_vec(), gb.get(&s).as_vec());
                    close(&da, &db, &format!("{what} dscale"));
                    let (da, db) = (ga.get(&bias).as_vec(), gb.get(&bias).as_vec());
                    close(&da, &db, &format!("{what} dbias"));
                }
            }
        });
    }

    /// Forward + backward times of the fused kernels and the dfdx-op formulations at the
    /// U-Net `unet-small` layer shapes (batch 8, 28 × 28, 64 channels, 16 groups).
    /// `cargo test --release -p maskdiff-network --lib conv_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv_timing() {
        use std::time::Instant;
        let (dev, mut rng) = (Cpu::default(), StdRng::seed_from_u64(6));
        let (b, h, wd, cin, cout, groups) = (8, 28, 28, 64, 64, 16);
        let m = b * h * wd;
        let x = dev.tensor_from_vec(rand32(&mut rng, m * cin, 1.0), (m, cin));
        let w = dev.tensor_from_vec(rand32(&mut rng, 9 * cin * cout, 0.1), (9 * cin, cout));
        let s = dev.tensor_from_vec(rand32(&mut rng, cin, 1.0), (cin,));
        let r = rand32(&mut rng, m * cout, 1.0);
        let time = |f: &dyn Fn() -> Vec<f32>| {
            let _ = f();
            let reps = 10;
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(f());
            }
            t.elapsed().as_secs_f64() * 1e3 / reps as f64
        };
        let loss = |y: T2<f32, Cpu, T32>| grads(y, &r).1.get(&x).as_vec();
        let fc = time(&|| loss(conv3x3(x.leaky_trace(), w.clone(), None, b, h, wd).unwrap()));
        let gc = time(&|| loss(generic_conv(x.leaky_trace(), w.clone(), (b, h, wd))));
        let fg = time(&|| {
            loss(
                group_norm(
                    x.leaky_trace(),
                    s.clone(),
                    s.clone(),
                    b,
                    groups,
                    false,
                    None,
                )
                .unwrap(),
            )
        });
        let gg = time(&|| loss(generic_gn(x.leaky_trace(), s.clone(), s.clone(), b, groups)));
        let fwd = |f: &dyn Fn() -> T2<f32, Cpu>| time(&|| f().as_vec());
        let fcf = fwd(&|| conv3x3(x.clone(), w.clone(), None, b, h, wd).unwrap());
        let gcf = fwd(&|| generic_conv(x.clone(), w.clone(), (b, h, wd)));
        // the product alone, on a ready (m, 9·cin) panel: what im2col adds
        let panel = dev.tensor_from_vec(rand32(&mut rng, m * 9 * cin, 1.0), (m, 9 * cin));
        let mm =
            fwd(&|| <Cpu as super::super::Kernels<f32>>::matmul(panel.clone(), w.clone()).unwrap());
        eprintln!(
            "{} threads, ({m}, {cin}) → {cout}: conv3x3 fwd+bwd fused {fc:.2} ms, generic {gc:.2} ms; \
             fwd only fused {fcf:.2} ms, generic {gcf:.2} ms, its matmul alone {mm:.2} ms; group_norm fwd+bwd fused {fg:.2} ms, generic {gg:.2} ms",
            rayon::current_num_threads()
        );
    }

    /// The `unet-small` training step's network part — forward with tape (dropout on) and
    /// backward of Σ R ⊙ logits — on 8 Fashion-MNIST-shaped images (28 × 28 × 1, 256 levels),
    /// with the fused image kernels and with the generic defaults, alternating in one process
    /// (the optimizer step, the same for both, is left out).
    /// `cargo test --release -p maskdiff-network --lib unet_step_timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn unet_step_timing() {
        use crate::{Network, NetworkConfig};
        use maskdiff_process::DenoiseBatch;
        use std::time::Instant;
        crate::tune_allocator();
        let (v, b, (h, wd)) = (256, 8, (28, 28));
        let mut cfg = NetworkConfig::preset("unet-small", v).unwrap();
        cfg.set_image(h, wd, 1).unwrap();
        let dev = Cpu::default();
        let model = Network::<f32, Cpu>::new(cfg, &dev, 0).unwrap();
        let n = h * wd;
        let mut rng = StdRng::seed_from_u64(0);
        let ids: Vec<u32> = (0..b * n).map(|_| rng.gen_range(0..=v as u32)).collect();
        let t: Vec<f64> = (0..b).map(|_| rng.gen_range(0.0..1.0)).collect();
        let r = rand32(&mut rng, b * n * v, 1.0);
        let batch = DenoiseBatch {
            ids: &ids,
            batch: b,
            len: n,
            t: &t,
            labels: None,
        };
        let step = |rng: &mut StdRng| {
            let t0 = Instant::now();
            let logits = model.forward(&batch, model.tape(), Some(rng)).unwrap();
            let t1 = t0.elapsed().as_secs_f64();
            let (_, g) = grads(logits, &r);
            std::hint::black_box(g);
            (t1, t0.elapsed().as_secs_f64())
        };
        let (mut fused, mut generic) = (Vec::new(), Vec::new());
        for it in 0..4 {
            let a = step(&mut rng);
            let g = with_generic_image_ops(|| step(&mut rng));
            if it > 0 {
                fused.push(a);
                generic.push(g);
            }
        }
        let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
            v.iter().map(f).sum::<f64>() / v.len() as f64 * 1e3
        };
        eprintln!(
            "unet-small, batch {b} × {h}×{wd}×1, V = {v}, {} threads, mean of {} steps: \
             fused forward {:.0} ms, step {:.0} ms; generic forward {:.0} ms, step {:.0} ms",
            rayon::current_num_threads(),
            fused.len(),
            mean(&fused, |x| x.0),
            mean(&fused, |x| x.1),
            mean(&generic, |x| x.0),
            mean(&generic, |x| x.1),
        );
    }
}
