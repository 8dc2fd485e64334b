//! The image networks' operations written with dfdx's generic ops (the defaults of
//! [`crate::Kernels::conv3x3`] and [`crate::Kernels::group_norm`], used on CUDA and as the
//! reference of the fused CPU kernels), and the conditioning MLP of spec §7.1 as a function.
//!
//! Activations are NHWC and 2-D: `(batch·height·width, channels)`, one row per pixel, so a 1×1
//! projection is one matmul and a 3×3 convolution is one matmul over the 3×3 neighbourhoods
//! (im2col). Convolution weights are stored `[3, 3, in, out]` (Flax's HWIO kernel layout), read
//! as a `(9·in, out)` matrix.

use crate::layers::{dense, swish, time_embedding, Res, T1, T2};
use crate::modules::Conditioning;
use crate::{Elem, Kernels};
use dfdx::prelude::*;
use maskdiff_process::DenoiseBatch;

/// GroupNorm's epsilon (Flax's `nn.GroupNorm` default, as in the official `unet.py`).
pub(crate) const GROUP_NORM_EPS: f64 = 1e-6;

/// The im2col source row of every (pixel, tap): row `p·9 + 3·ky + kx` holds the row of pixel
/// p's neighbour at offset (ky − 1, kx − 1), or `b·h·w` (a zero row) outside the image.
pub(crate) fn im2col_rows(b: usize, h: usize, w: usize) -> Vec<usize> {
    let zero = b * h * w;
    let mut rows = Vec::with_capacity(9 * zero);
    for n in 0..b {
        for y in 0..h {
            for x in 0..w {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let (sy, sx) = (y + ky, x + kx);
                        // sy − 1 in [0, h) and sx − 1 in [0, w)
                        rows.push(if sy >= 1 && sy <= h && sx >= 1 && sx <= w {
                            (n * h + sy - 1) * w + sx - 1
                        } else {
                            zero
                        });
                    }
                }
            }
        }
    }
    rows
}

/// 3×3 "same" convolution (zero padding, stride 1) of x (b·h·w, cin) with a weight
/// (9·cin, cout), generic ops: gather the neighbourhoods from x with a zero row appended, then
/// one matmul.
pub(crate) fn conv3x3<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    w: T2<E, D>,
    b: usize,
    h: usize,
    wd: usize,
) -> Res<T2<E, D, T>, D> {
    let cin = x.shape().1;
    let dev = x.device().clone();
    let zero: T2<E, D> = dev.try_zeros_like(&(1, cin))?;
    let padded = (x, zero).try_concat_along(Axis::<0>)?;
    let rows = im2col_rows(b, h, wd);
    let idx = dev.try_tensor_from_vec(rows, (9 * b * h * wd,))?;
    let cols: T2<E, D, T> = padded.try_gather(idx)?;
    let cols = cols.try_reshape_like(&(b * h * wd, 9 * cin))?;
    D::matmul(cols, w)
}

/// GroupNorm over x (b·n, c) with `groups` groups of c/groups channels (statistics over the n
/// pixels and the group's channels of one image, biased variance), then `· scale + bias`.
pub(crate) fn group_norm<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    scale: T1<E, D>,
    bias: T1<E, D>,
    b: usize,
    groups: usize,
) -> Res<T2<E, D, T>, D> {
    let (m, c) = *x.shape();
    let n = m / b;
    let cg = c / groups;
    let y = x
        .try_reshape_like(&(b, n, groups, cg))?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()?
        .try_reshape_like(&(b * groups, n * cg))?
        .try_normalize::<Axis<1>>(GROUP_NORM_EPS)?
        .try_reshape_like(&(b, groups, n, cg))?
        .try_permute::<_, Axes4<0, 2, 1, 3>>()?
        .try_reshape_like(&(m, c))?;
    let s = (m, c);
    y.try_mul(scale.try_broadcast_like::<_, Axis<0>>(&s)?)?
        .try_add(bias.try_broadcast_like::<_, Axis<0>>(&s)?)
}

/// y (m, c) + bias (c) on every row: the generic form of a convolution's bias.
pub(crate) fn add_bias<E: Elem, D: Device<E>, T: Tape<E, D>>(
    y: T2<E, D, T>,
    bias: T1<E, D>,
) -> Res<T2<E, D, T>, D> {
    let s = *y.shape();
    y.try_add(bias.try_broadcast_like::<_, Axis<0>>(&s)?)
}

/// swish(y), times the dropout mask `keep` (one value per element) where given: the generic
/// form of what follows a U-Net GroupNorm.
pub(crate) fn swish_masked<E: Elem, D: Device<E>, T: Tape<E, D>>(
    y: T2<E, D, T>,
    keep: Option<Vec<E>>,
) -> Res<T2<E, D, T>, D> {
    let y = swish(y)?;
    match keep {
        Some(k) => {
            let s = *y.shape();
            let mask = y.device().try_tensor_from_vec(k, s)?;
            y.try_mul(mask)
        }
        None => Ok(y),
    }
}

/// The conditioning vector c (batch, d_c) = Dense(swish(Dense([emb(t), emb(label)]))) of
/// spec §7.1 (the same computation as the transformer's).
pub(crate) fn conditioning<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    dev: &D,
    cond: &Conditioning<E, D>,
    batch: &DenoiseBatch<'_>,
    dc: usize,
) -> Res<T2<E, D, T>, D> {
    let b = batch.batch;
    let mut h: Option<T2<E, D, T>> = None;
    if let Some(w1_t) = &cond.time_in {
        let emb: Vec<E> = time_embedding(batch.t, dc).into_iter().map(E::c).collect();
        let x = dev
            .try_tensor_from_vec(emb, (b, dc))?
            .put_tape(T::default());
        h = Some(D::matmul(x, w1_t.tensor()?)?);
    }
    if let (Some(label), Some(labels)) = (&cond.label, batch.labels) {
        let idx = dev.try_tensor_from_vec(labels.iter().map(|&l| l as usize).collect(), (b,))?;
        let e: T2<E, D, T> = label
            .table
            .tensor()?
            .put_tape(T::default())
            .try_gather(idx)?;
        let y = D::matmul(e, label.proj.tensor()?)?;
        h = Some(match h {
            Some(h) => h.try_add(y)?,
            None => y,
        });
    }
    let h = h.expect("a conditioned model has time or label input");
    let s = *h.shape();
    let h = h.try_add(
        cond.hidden_bias
            .tensor()
            .try_broadcast_like::<_, Axis<0>>(&s)?,
    )?;
    dense(
        swish(h)?,
        cond.out.weight.tensor()?,
        Some(cond.out.bias.tensor()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3×3 convolution in f64 (the definition), x (b, h, w, cin), w (3, 3, cin, cout).
    pub(crate) fn naive_conv(
        x: &[f64],
        w: &[f64],
        (b, h, wd, cin, cout): (usize, usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut y = vec![0.0; b * h * wd * cout];
        for n in 0..b {
            for i in 0..h {
                for j in 0..wd {
                    for o in 0..cout {
                        let mut s = 0.0;
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (si, sj) =
                                    (i as isize + ky as isize - 1, j as isize + kx as isize - 1);
                                if si < 0 || sj < 0 || si >= h as isize || sj >= wd as isize {
                                    continue;
                                }
                                for c in 0..cin {
                                    s += x[((n * h + si as usize) * wd + sj as usize) * cin + c]
                                        * w[((ky * 3 + kx) * cin + c) * cout + o];
                                }
                            }
                        }
                        y[((n * h + i) * wd + j) * cout + o] = s;
                    }
                }
            }
        }
        y
    }

    #[test]
    fn generic_conv_matches_the_definition() {
        let dev = Cpu::default();
        let (b, h, wd, cin, cout) = (2, 3, 4, 3, 5);
        let x: Vec<f64> = (0..b * h * wd * cin)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) / 7.0)
            .collect();
        let w: Vec<f64> = (0..9 * cin * cout)
            .map(|i| ((i * 17 % 13) as f64 - 6.0) / 5.0)
            .collect();
        let xt = dev.tensor_from_vec(x.clone(), (b * h * wd, cin));
        let wt = dev.tensor_from_vec(w.clone(), (9 * cin, cout));
        let y = conv3x3(xt, wt, b, h, wd).unwrap().as_vec();
        let r = naive_conv(&x, &w, (b, h, wd, cin, cout));
        for (a, e) in y.iter().zip(&r) {
            assert!((a - e).abs() <= 1e-12 * (1.0 + e.abs()), "{a} vs {e}");
        }
    }
}
