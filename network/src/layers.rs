//! Functional building blocks over run-time-shaped dfdx tensors, generic over the device and the
//! tape: dense layers, LayerNorm / RMSNorm, adaLN modulation, gated activations, RoPE (spec §7.2)
//! and the sinusoidal time embedding (spec §7.1). Activations are kept 2-D `(batch·len, width)`
//! so every projection is one large matmul instead of one per sequence.

use crate::{Elem, MlpKind};
use dfdx::prelude::*;

pub(crate) type T1<E, D, T = NoneTape> = Tensor<(usize,), E, D, T>;
pub(crate) type T2<E, D, T = NoneTape> = Tensor<(usize, usize), E, D, T>;
pub(crate) type T3<E, D, T = NoneTape> = Tensor<(usize, usize, usize), E, D, T>;
pub(crate) type T4<E, D, T = NoneTape> = Tensor<(usize, usize, usize, usize), E, D, T>;
pub(crate) type Res<X, D> = Result<X, <D as HasErr>::Err>;

pub(crate) const NORM_EPS: f64 = 1e-5;

/// `x @ w (+ b)`, x: (m, in), w: (in, out), b: (out,).
pub(crate) fn dense<E: Elem, D: crate::Kernels<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    w: T2<E, D>,
    b: Option<T1<E, D>>,
) -> Res<T2<E, D, T>, D> {
    match b {
        None => D::matmul(x, w),
        Some(b) => D::matmul_bias(x, w, b),
    }
}

/// x ⊙ σ(x).
pub(crate) fn swish<E: Elem, D: Device<E>, T: Tape<E, D>, S: Shape>(
    x: Tensor<S, E, D, T>,
) -> Res<Tensor<S, E, D, T>, D> {
    let s = x.retaped::<T>().try_sigmoid()?;
    x.try_mul(s)
}

/// The gate activation of the FFN (also applied to the conditioning vector, as in the code).
pub(crate) fn act<E: Elem, D: Device<E>, T: Tape<E, D>, S: Shape>(
    kind: MlpKind,
    x: Tensor<S, E, D, T>,
) -> Res<Tensor<S, E, D, T>, D> {
    match kind {
        MlpKind::Glu => x.try_sigmoid(),
        MlpKind::Swiglu => swish(x),
        MlpKind::Geglu => x.try_fast_gelu(),
    }
}

/// LayerNorm without affine parameters over the last axis of (m, d).
pub(crate) fn layer_norm<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
) -> Res<T2<E, D, T>, D> {
    x.try_normalize::<Axis<1>>(NORM_EPS)
}

/// RMSNorm with a learnable scale over the last axis of (m, d).
pub(crate) fn rms_norm<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    scale: T1<E, D>,
) -> Res<T2<E, D, T>, D> {
    let s = *x.shape();
    let inv = x
        .retaped::<T>()
        .try_square()?
        .try_mean::<(usize,), Axis<1>>()?
        .try_add(E::c(NORM_EPS))?
        .try_sqrt()?
        .try_recip()?
        .try_broadcast_like::<_, Axis<1>>(&s)?;
    x.try_mul(inv)?
        .try_mul(scale.try_broadcast_like::<_, Axis<0>>(&s)?)
}

/// adaLN modulation `x·(1 + scale) + shift` with per-sequence (b, d) shift/scale applied to
/// (b·n, d) activations.
pub(crate) fn modulate<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    shift: T2<E, D, T>,
    scale: T2<E, D, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, D, T>, D> {
    let d = x.shape().1;
    let s3 = (b, n, d);
    let x3 = x.try_reshape_like(&s3)?;
    let sc = scale
        .try_add(E::one())?
        .try_broadcast_like::<_, Axis<1>>(&s3)?;
    let sh = shift.try_broadcast_like::<_, Axis<1>>(&s3)?;
    x3.try_mul(sc)?.try_add(sh)?.try_reshape_like(&(b * n, d))
}

/// `x + s`, s per sequence (b, d) added to every row of its sequence in x (b·n, d): the U-Net's
/// conditioning after a block's first convolution.
pub(crate) fn shift<E: Elem, D: Device<E>, T: Tape<E, D>>(
    x: T2<E, D, T>,
    s: T2<E, D, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, D, T>, D> {
    let d = x.shape().1;
    let s3 = (b, n, d);
    x.try_reshape_like(&s3)?
        .try_add(s.try_broadcast_like::<_, Axis<1>>(&s3)?)?
        .try_reshape_like(&(b * n, d))
}

/// `h + gate ⊙ y`, gate per sequence (b, d), h and y (b·n, d).
pub(crate) fn gated_residual<E: Elem, D: Device<E>, T: Tape<E, D>>(
    h: T2<E, D, T>,
    y: T2<E, D, T>,
    gate: T2<E, D, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, D, T>, D> {
    let d = h.shape().1;
    let s3 = (b, n, d);
    let g = gate.try_broadcast_like::<_, Axis<1>>(&s3)?;
    let y = y
        .try_reshape_like(&s3)?
        .try_mul(g)?
        .try_reshape_like(&(b * n, d))?;
    h.try_add(y)
}

/// Channel-wise dropout: one keep-mask (already scaled by 1/(1−p)) per (sequence, channel),
/// shared by every position.
pub(crate) fn channel_dropout<E: Elem, D: Device<E>, T: Tape<E, D>>(
    y: T2<E, D, T>,
    mask: Option<T2<E, D>>,
    b: usize,
    n: usize,
) -> Res<T2<E, D, T>, D> {
    match mask {
        None => Ok(y),
        Some(m) => {
            let d = y.shape().1;
            let s3 = (b, n, d);
            y.try_reshape_like(&s3)?
                .try_mul(m.try_broadcast_like::<_, Axis<1>>(&s3)?)?
                .try_reshape_like(&(b * n, d))
        }
    }
}

/// Precomputed RoPE tables for one sequence length: cos/sin (n, head_dim) with each angle
/// repeated over its pair, and the pair-swap matrix P with `(x P)[2i] = −x[2i+1]`,
/// `(x P)[2i+1] = x[2i]` (adjacent pairs are rotated, as in the official code).
pub struct Rope<E: Elem, D: Device<E>> {
    pub cos: T2<E, D>,
    pub sin: T2<E, D>,
    pub swap: T2<E, D>,
    /// Host copies of cos/sin, (n, hd/2): one angle per pair, for fused CPU kernels.
    pub cos_host: Vec<E>,
    pub sin_host: Vec<E>,
}

impl<E: Elem, D: Device<E>> Rope<E, D> {
    /// Tables for `n` positions and head dimension `hd` (even), base `theta`.
    pub fn new(dev: &D, n: usize, hd: usize, theta: f64) -> Res<Self, D> {
        Self::at_positions(dev, 0..n, hd, theta)
    }

    /// Tables whose row i rotates by the i-th of `positions` (block diffusion gives the clean
    /// copy the positions of the noised one; a sampler's cache gives a block its offset).
    pub fn at_positions(
        dev: &D,
        positions: impl ExactSizeIterator<Item = usize>,
        hd: usize,
        theta: f64,
    ) -> Res<Self, D> {
        assert!(
            hd.is_multiple_of(2),
            "RoPE needs an even head dim, got {hd}"
        );
        let n = positions.len();
        // one frequency per pair of dimensions, one angle per (position, pair); the (n, hd)
        // tables repeat each pair's value for its two dimensions
        let freq: Vec<f64> = (0..hd / 2)
            .map(|i| theta.powf(-2.0 * i as f64 / hd as f64))
            .collect();
        let (mut cos_host, mut sin_host) = (
            Vec::with_capacity(n * hd / 2),
            Vec::with_capacity(n * hd / 2),
        );
        for pos in positions {
            for &f in &freq {
                let ang = pos as f64 * f;
                cos_host.push(E::c(ang.cos()));
                sin_host.push(E::c(ang.sin()));
            }
        }
        let mut swap = vec![E::zero(); hd * hd];
        for i in 0..hd / 2 {
            // row = input index, column = output index
            swap[(2 * i + 1) * hd + 2 * i] = -E::one();
            swap[(2 * i) * hd + 2 * i + 1] = E::one();
        }
        let swap = dev.try_tensor_from_vec(swap, (hd, hd))?;
        Self::from_host(dev, n, cos_host, sin_host, swap)
    }

    /// The tables of the rows `rows` of this one (row i rotates by the position of row
    /// `rows[i]` here): the same values as [`Self::at_positions`] at those positions, copied
    /// rather than recomputed (a sampler's row-restricted queries).
    pub fn select(&self, dev: &D, rows: &[usize]) -> Res<Self, D> {
        let half = self.swap.shape().0 / 2;
        let pick = |v: &[E]| -> Vec<E> {
            (rows.iter())
                .flat_map(|&r| v[r * half..(r + 1) * half].iter().copied())
                .collect()
        };
        let (cos_host, sin_host) = (pick(&self.cos_host), pick(&self.sin_host));
        Self::from_host(dev, rows.len(), cos_host, sin_host, self.swap.clone())
    }

    /// The (n, hd) tables from the per-pair host tables (n, hd/2): each pair's value repeated
    /// for its two dimensions.
    fn from_host(
        dev: &D,
        n: usize,
        cos_host: Vec<E>,
        sin_host: Vec<E>,
        swap: T2<E, D>,
    ) -> Res<Self, D> {
        let hd = swap.shape().0;
        let pairs = |v: &[E]| -> Vec<E> { v.iter().flat_map(|&x| [x, x]).collect() };
        let (cos, sin) = (pairs(&cos_host), pairs(&sin_host));
        Ok(Rope {
            cos: dev.try_tensor_from_vec(cos, (n, hd))?,
            sin: dev.try_tensor_from_vec(sin, (n, hd))?,
            swap,
            cos_host,
            sin_host,
        })
    }

    /// Rotate x: (b·n, h·hd) → (b, n, h, hd), times `scale`.
    pub fn apply<T: Tape<E, D>>(
        &self,
        x: T2<E, D, T>,
        b: usize,
        n: usize,
        h: usize,
        scale: f64,
    ) -> Res<T4<E, D, T>, D> {
        let hd = self.swap.shape().0;
        let s4 = (b, n, h, hd);
        let sw = x
            .retaped::<T>()
            .try_reshape_like(&(b * n * h, hd))?
            .try_matmul(self.swap.clone())?
            .try_reshape_like(&s4)?;
        let x4 = x.try_reshape_like(&s4)?;
        let c = self.cos.clone().try_broadcast_like::<_, Axes2<0, 2>>(&s4)?;
        let s = self.sin.clone().try_broadcast_like::<_, Axes2<0, 2>>(&s4)?;
        let y = x4.try_mul(c)?.try_add(sw.try_mul(s)?)?;
        if scale == 1.0 {
            Ok(y)
        } else {
            y.try_mul(E::c(scale))
        }
    }
}

/// Sinusoidal embedding of 1000·t (spec §7.1): width d_c, frequencies
/// exp(−k·ln(10⁴)/(half − 1)), output [sin, cos]. Computed in f64.
pub fn time_embedding(t: &[f64], dc: usize) -> Vec<f64> {
    let half = dc / 2;
    let mut out = Vec::with_capacity(t.len() * dc);
    for &ti in t {
        let x = 1000.0 * ti;
        let start = out.len();
        out.resize(start + dc, 0.0);
        for k in 0..half {
            let f = time_frequency(k, half);
            out[start + k] = (x * f).sin();
            out[start + half + k] = (x * f).cos();
        }
    }
    out
}

/// k-th frequency of the time embedding with `half` frequencies.
pub fn time_frequency(k: usize, half: usize) -> f64 {
    if half <= 1 {
        return 1.0;
    }
    (-(k as f64) * 10_000f64.ln() / (half as f64 - 1.0)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row i of the tables rotates dimensions (2p, 2p + 1) by positions[i]·θ^(−2p/hd): each
    /// entry against the formula, and the host tables hold one angle per pair.
    #[test]
    fn rope_tables_match_the_formula() {
        let dev = dfdx::prelude::Cpu::default();
        let (hd, theta, pos) = (6, 10_000.0, [3usize, 0, 7]);
        let r = Rope::<f64, _>::at_positions(&dev, pos.into_iter(), hd, theta).unwrap();
        let (cos, sin) = (r.cos.as_vec(), r.sin.as_vec());
        for (i, &p) in pos.iter().enumerate() {
            for j in 0..hd {
                let ang = p as f64 * theta.powf(-2.0 * (j / 2) as f64 / hd as f64);
                assert_eq!(cos[i * hd + j], ang.cos(), "cos[{i}, {j}]");
                assert_eq!(sin[i * hd + j], ang.sin(), "sin[{i}, {j}]");
                if j % 2 == 0 {
                    assert_eq!(r.cos_host[i * hd / 2 + j / 2], ang.cos());
                    assert_eq!(r.sin_host[i * hd / 2 + j / 2], ang.sin());
                }
            }
        }
        assert_eq!(sin[hd + 2], 0.0, "position 0 does not rotate");
    }

    /// Selecting rows of a table gives the tables computed at those rows' positions, bit for
    /// bit (repeated and out-of-order rows included).
    #[test]
    fn selected_rope_rows_equal_the_tables_at_their_positions() {
        let dev = dfdx::prelude::Cpu::default();
        let (hd, theta) = (8, 10_000.0);
        let full = Rope::<f32, _>::new(&dev, 12, hd, theta).unwrap();
        let rows = [11usize, 0, 5, 5, 3];
        let sel = full.select(&dev, &rows).unwrap();
        let direct = Rope::<f32, _>::at_positions(&dev, rows.into_iter(), hd, theta).unwrap();
        assert_eq!(sel.cos_host, direct.cos_host);
        assert_eq!(sel.sin_host, direct.sin_host);
        assert_eq!(sel.cos.as_vec(), direct.cos.as_vec());
        assert_eq!(sel.sin.as_vec(), direct.sin.as_vec());
        assert_eq!(sel.swap.as_vec(), direct.swap.as_vec());
        assert_eq!(*sel.cos.shape(), (rows.len(), hd));
    }

    #[test]
    fn time_frequencies_match_spec() {
        // spec §11.22, d_c = 64 → half = 32
        assert!((time_frequency(0, 32) - 1.0).abs() < 1e-15);
        assert!((time_frequency(1, 32) - 0.742_964_0).abs() < 1e-7);
        assert!((time_frequency(31, 32) - 1e-4).abs() < 1e-15);
        let e = time_embedding(&[0.0], 64);
        assert!(e[..32].iter().all(|&x| x == 0.0) && e[32..].iter().all(|&x| x == 1.0));
    }

    #[test]
    fn rope_rotates_adjacent_pairs() {
        let dev = Cpu::default();
        let (n, hd) = (3, 4);
        let rope = Rope::<f64, Cpu>::new(&dev, n, hd, 10_000.0).unwrap();
        let xs: Vec<f64> = (0..n * hd).map(|i| i as f64 + 1.0).collect();
        let x = dev.tensor_from_vec(xs.clone(), (n, hd));
        let y = rope.apply(x, 1, n, 1, 1.0).unwrap().as_vec();
        for pos in 0..n {
            for i in 0..hd / 2 {
                let ang = pos as f64 * 10_000f64.powf(-2.0 * i as f64 / hd as f64);
                let (a, b) = (xs[pos * hd + 2 * i], xs[pos * hd + 2 * i + 1]);
                let (ea, eb) = (a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin());
                assert!((y[pos * hd + 2 * i] - ea).abs() < 1e-12);
                assert!((y[pos * hd + 2 * i + 1] - eb).abs() < 1e-12);
            }
        }
    }
}
