//! Device-specific fused kernels behind one trait, [`Kernels`]. Each method has a default built
//! from dfdx's generic ops (used on CUDA); the CPU implements them as single-pass,
//! multi-threaded kernels with hand-written backward passes: matrix products ([`matmul`]: gemm
//! 0.19, whose AVX-512 kernels are ~2.8× faster than dfdx's gemm 0.15), attention per
//! (sequence, head) ([`attention`], also for ragged query rows: the row-restricted last block),
//! the gated FFN as one op ([`ffn`]), the row gather and its scatter-add ([`gather`]), LayerNorm
//! without affine, RMSNorm with a scale and LayerNorm-then-adaLN-modulation as one op
//! ([`norms`]), softmax over the last axis, adaLN
//! modulation, the residual add and the gated residual, the per-sequence shift, the column
//! concatenation, the GLU/SwiGLU gate and RoPE ([`elementwise`]), and the U-Net's
//! 3×3 convolution and GroupNorm ([`conv`]; the convolution's products in [`conv_direct`] and
//! [`conv_winograd`], and on AMX at bf16 in `conv_amx`). dfdx
//! composes the element-wise ones from 4–10 separate ops, each
//! allocating and sweeping memory; here each is one sweep forward and one backward. The
//! optimizer's passes (AdamW, EMA, Σ g²; tape-free) are in [`optimizer`], bit-identical to their
//! dfdx-op defaults.
//!
//! Plumbing: [`storage`] gives the kernels sound zero-copy read access to their inputs (the
//! outputs of earlier kernels, registered in a [`KernelScope`] frame, and the optimizer's
//! outputs, registered in a lasting tier; anything else is copied once) and allocates outputs; [`tape`] untapes the inputs, builds the output and registers
//! the backward pass, which takes its output's gradient out of the store and accumulates
//! straight into its inputs' gradients. Memory traffic and speed: `bench/NOTES.md`. Every CPU
//! kernel is checked against the generic default (values and gradients), next to its code: in
//! f64 to 1e-12, and in f32 (fast exp, different summation order) to 2e-5·(1 + |reference|).

#[cfg(target_arch = "x86_64")]
mod amx;
mod attention;
pub(crate) mod bf16;
mod conv;
#[cfg(target_arch = "x86_64")]
mod conv_amx;
mod conv_direct;
mod conv_winograd;
pub(crate) mod disjoint;
mod elementwise;
mod ffn;
mod gather;
pub mod isa;
#[cfg(test)]
mod isa_equality;
mod matmul;
mod norms;
mod optimizer;
mod reduce;
mod storage;
mod tape;
#[cfg(test)]
mod test_util;

pub use optimizer::AdamWStep;
pub use storage::KernelScope;

use crate::layers::{self, Res, Rope, T1, T2, T4};
use crate::{BlockMask, Elem, MlpKind};
use dfdx::prelude::*;

/// The fused operations the model uses, with generic defaults.
pub trait Kernels<E: Elem>: Device<E> {
    /// `x @ w`: x (m, k) an activation, w (k, n) a parameter (tape-free).
    fn matmul<T: Tape<E, Self>>(x: T2<E, Self, T>, w: T2<E, Self>) -> Res<T2<E, Self, T>, Self> {
        x.try_matmul(w)
    }
    /// `x @ w + bias` on every row, bias (n) tape-free (a dense layer).
    fn matmul_bias<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        w: T2<E, Self>,
        bias: T1<E, Self>,
    ) -> Res<T2<E, Self, T>, Self> {
        crate::unet_layers::add_bias(Self::matmul(x, w)?, bias)
    }
    /// The gated unit `act(a) ⊙ u` of the FFN, a and u (m, hidden).
    fn glu<T: Tape<E, Self>>(
        kind: MlpKind,
        a: T2<E, Self, T>,
        u: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        layers::act(kind, a)?.try_mul(u)
    }
    /// The rows `rows` of x (m, d) → (rows.len(), d); rows may repeat (every entry < m).
    fn gather_rows<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        rows: &[usize],
    ) -> Res<T2<E, Self, T>, Self> {
        let ids = x
            .device()
            .try_tensor_from_vec(rows.to_vec(), (rows.len(),))?;
        x.try_gather(ids)
    }
    /// The gated FFN `(act(x W1) ⊙ x W3) W2` of x (m, k) with tape-free weights W1, W3
    /// (k, hidden) and W2 (hidden, n).
    fn ffn<T: Tape<E, Self>>(
        kind: MlpKind,
        x: T2<E, Self, T>,
        (w1, w3, w2): (T2<E, Self>, T2<E, Self>, T2<E, Self>),
    ) -> Res<T2<E, Self, T>, Self> {
        composed_ffn(kind, x, (w1, w3, w2))
    }
    /// Softmax over the last axis.
    fn softmax_last<T: Tape<E, Self>>(x: T4<E, Self, T>) -> Res<T4<E, Self, T>, Self> {
        x.try_softmax::<Axis<3>>()
    }
    /// LayerNorm without affine parameters over the last axis of (m, d).
    fn layer_norm<T: Tape<E, Self>>(x: T2<E, Self, T>) -> Res<T2<E, Self, T>, Self> {
        layers::layer_norm(x)
    }
    /// RMSNorm with a learnable scale (tape-free parameter) over the last axis of (m, d).
    fn rms_norm<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        scale: T1<E, Self>,
    ) -> Res<T2<E, Self, T>, Self> {
        layers::rms_norm(x, scale)
    }
    /// `x·(1 + scale) + shift`, x (b·n, d), shift/scale (b, d).
    fn modulate<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        shift: T2<E, Self, T>,
        scale: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        layers::modulate(x, shift, scale, b, n)
    }
    /// `LN(x)·(1 + scale) + shift`: [`Kernels::layer_norm`] then [`Kernels::modulate`] (adaLN's
    /// normalise-then-modulate), as one op where a device has it.
    fn norm_modulate<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        shift: T2<E, Self, T>,
        scale: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        Self::modulate(Self::layer_norm(x)?, shift, scale, b, n)
    }
    /// `x + s`, x (b·n, d), s (b, d) per sequence (the U-Net's conditioning on a block).
    fn shift<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        s: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        layers::shift(x, s, b, n)
    }
    /// `[x | y]`: x (m, dx) and y (m, dy) side by side → (m, dx + dy) (the U-Net's skip
    /// concatenation).
    fn concat_cols<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        y: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        (x, y).try_concat_along(Axis::<1>)
    }
    /// `h + y`, h and y (m, d): the pre-norm residual.
    fn residual<T: Tape<E, Self>>(
        h: T2<E, Self, T>,
        y: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        h.try_add(y)
    }
    /// `h + gate ⊙ y`, h/y (b·n, d), gate (b, d).
    fn gated_residual<T: Tape<E, Self>>(
        h: T2<E, Self, T>,
        y: T2<E, Self, T>,
        gate: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        layers::gated_residual(h, y, gate, b, n)
    }
    /// Bidirectional softmax attention: q (scaled), k, v (b, n, h, hd) → (b·n, h·hd).
    fn attention<T: Tape<E, Self>>(
        q: T4<E, Self, T>,
        k: T4<E, Self, T>,
        v: T4<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        rows_attention(q, k, v)
    }
    /// Attention for ragged query rows, with the tape: q (scaled) (R, h·hd) holds sequence s's
    /// queries in rows `starts[s]..starts[s + 1]` (`starts`: b + 1 non-decreasing offsets from
    /// 0 to R), each against every key and value of its sequence, k, v (b, n, h, hd) →
    /// (R, h·hd) — row for row what [`Self::attention`] gives at those queries (the
    /// row-restricted forward's last block: the training loss's masked positions, a sampler's
    /// revealed ones).
    fn attention_ragged<T: Tape<E, Self>>(
        q: T2<E, Self, T>,
        k: T4<E, Self, T>,
        v: T4<E, Self, T>,
        starts: &[usize],
    ) -> Res<T2<E, Self, T>, Self> {
        padded_ragged_attention(q, k, v, starts)
    }

    /// [`Kernels::attention`] over the 2N positions of block diffusion, each query restricted to
    /// the keys [`BlockMask`] allows (n = 2N): −∞ added to the other scores before the softmax.
    fn block_attention<T: Tape<E, Self>>(
        q: T4<E, Self, T>,
        k: T4<E, Self, T>,
        v: T4<E, Self, T>,
        mask: BlockMask,
    ) -> Res<T2<E, Self, T>, Self> {
        let (b, n, h, hd) = *q.shape();
        let dev = q.device().clone();
        let bias: Vec<E> = (0..n * n)
            .map(|ij| {
                if mask.allowed(ij / n, ij % n) {
                    E::zero()
                } else {
                    E::neg_infinity()
                }
            })
            .collect();
        let bias = dev
            .try_tensor_from_vec(bias, (n, n))?
            .try_broadcast_like::<_, Axes2<0, 1>>(&(b, h, n, n))?;
        let q = q.try_permute::<_, Axes4<0, 2, 1, 3>>()?;
        let k = k.try_permute::<_, Axes4<0, 2, 3, 1>>()?;
        let v = v.try_permute::<_, Axes4<0, 2, 1, 3>>()?;
        let p = Self::softmax_last(q.try_matmul(k)?.try_add(bias)?)?;
        let o: T4<E, Self, T> = p.try_matmul(v)?;
        o.try_permute::<_, Axes4<0, 2, 1, 3>>()?
            .try_reshape_like(&(b * n, h * hd))
    }
    /// RoPE on x (b·n, h·hd) → (b, n, h, hd), times `scale`.
    fn rope<T: Tape<E, Self>>(
        rope: &Rope<E, Self>,
        x: T2<E, Self, T>,
        b: usize,
        n: usize,
        h: usize,
        scale: f64,
    ) -> Res<T4<E, Self, T>, Self> {
        rope.apply(x, b, n, h, scale)
    }
    /// 3×3 "same" convolution (zero padding, stride 1) of NHWC activations x (b·h·w, cin) with
    /// a tape-free weight (9·cin, cout) laid out (ky, kx, cin, cout) → (b·h·w, cout).
    fn conv3x3<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        w: T2<E, Self>,
        b: usize,
        h: usize,
        wd: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        crate::unet_layers::conv3x3(x, w, b, h, wd)
    }
    /// [`Kernels::conv3x3`] plus a tape-free bias (cout) on every pixel.
    fn conv3x3_bias<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        w: T2<E, Self>,
        bias: T1<E, Self>,
        b: usize,
        h: usize,
        wd: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        crate::unet_layers::add_bias(Self::conv3x3(x, w, b, h, wd)?, bias)
    }
    /// GroupNorm (eps 1e-6) of x (b·n, c) in `groups` groups with tape-free scale and bias (c).
    fn group_norm<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        scale: T1<E, Self>,
        bias: T1<E, Self>,
        b: usize,
        groups: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        crate::unet_layers::group_norm(x, scale, bias, b, groups)
    }
    /// swish(GroupNorm(x)) (the U-Net's norm → activation pairs), times the dropout mask
    /// `keep` (b·n·c values, 0 or 1/(1 − p)) where given; other arguments as
    /// [`Kernels::group_norm`].
    fn group_norm_swish<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        scale: T1<E, Self>,
        bias: T1<E, Self>,
        b: usize,
        groups: usize,
        keep: Option<Vec<E>>,
    ) -> Res<T2<E, Self, T>, Self> {
        crate::unet_layers::swish_masked(Self::group_norm(x, scale, bias, b, groups)?, keep)
    }
    /// One AdamW update of a flat parameter (spec §8): (θ', m', v') from θ, its gradient and
    /// the moments m, v (tape-free; the optimizer is `maskdiff_train::AdamW`).
    fn adamw(
        p: &T1<E, Self>,
        g: &T1<E, Self>,
        m: &T1<E, Self>,
        v: &T1<E, Self>,
        s: &AdamWStep,
    ) -> Res<Moments<E, Self>, Self> {
        optimizer::generic_adamw(p, g, m, v, s)
    }
    /// The EMA update `ema + rate·(θ − ema)`.
    fn ema(ema: &T1<E, Self>, p: &T1<E, Self>, rate: f64) -> Res<T1<E, Self>, Self> {
        ema.clone()
            .try_add(p.clone().try_sub(ema.clone())?.try_mul(E::c(rate))?)
    }
    /// Σ x² (for the global gradient norm), summed on the device and returned in f64.
    fn sum_squares(x: &T1<E, Self>) -> Res<f64, Self> {
        let s = x.clone().try_square()?.try_sum::<Rank0, _>()?.as_vec();
        Ok(s.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)).sum())
    }
    /// A flat long-lived tensor (a parameter) from host values. On the CPU it is registered in
    /// the kernels' lasting tier, so the kernels read it in place rather than copying it (which
    /// matters for small batches); the registration lapses when no kernel has read it during a
    /// few forward passes, or when an optimizer pass replaces it. Default: a plain tensor.
    fn lasting_tensor(dev: &Self, data: Vec<E>) -> Res<T1<E, Self>, Self> {
        let n = data.len();
        dev.try_tensor_from_vec(data, (n,))
    }
    /// Opens a frame of the CPU kernels' output registry on this thread ([`KernelScope`]):
    /// while it is open, the fused CPU kernels' outputs stay registered, so the kernels that
    /// consume them read them in place instead of copying them. A forward pass opens one and
    /// prunes it with [`Kernels::retain`] after every sub-layer. (Device-agnostic: on devices
    /// without the CPU kernels the frame stays empty.)
    fn scope() -> KernelScope {
        KernelScope::open()
    }
    /// Drops every entry of `scope`'s frame except `keep`'s (the residual stream), releasing
    /// the buffers that nothing else holds. A no-op on devices without the CPU kernels.
    fn retain<S: Shape, T>(scope: &KernelScope, keep: &Tensor<S, E, Self, T>) {
        let _ = (scope, keep);
    }
    /// [`Kernels::retain`] keeping every tensor of `keep` (the U-Net's stored activations,
    /// which its up blocks read again).
    fn retain_all<S: Shape, T>(scope: &KernelScope, keep: &[Tensor<S, E, Self, T>]) {
        let _ = (scope, keep);
    }
}

/// [`Kernels::ffn`] as its three steps: [`Kernels::matmul`] twice, [`Kernels::glu`],
/// [`Kernels::matmul`].
fn composed_ffn<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    kind: MlpKind,
    x: T2<E, D, T>,
    (w1, w3, w2): (T2<E, D>, T2<E, D>, T2<E, D>),
) -> Res<T2<E, D, T>, D> {
    let a = D::matmul(x.retaped::<T>(), w1)?;
    let u = D::matmul(x, w3)?;
    D::matmul(D::glu(kind, a, u)?, w2)
}

/// The generic attention products: q (scaled) (b, r, h, hd) against k, v (b, n, h, hd) →
/// (b·r, h·hd) with dfdx's permutes and batched matrix products (r = n: every query).
fn rows_attention<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    q: T4<E, D, T>,
    k: T4<E, D, T>,
    v: T4<E, D, T>,
) -> Res<T2<E, D, T>, D> {
    let (b, r, h, hd) = *q.shape();
    let q = q.try_permute::<_, Axes4<0, 2, 1, 3>>()?;
    let k = k.try_permute::<_, Axes4<0, 2, 3, 1>>()?;
    let v = v.try_permute::<_, Axes4<0, 2, 1, 3>>()?;
    let p = D::softmax_last(q.try_matmul(k)?)?;
    let o: T4<E, D, T> = p.try_matmul(v)?;
    o.try_permute::<_, Axes4<0, 2, 1, 3>>()?
        .try_reshape_like(&(b * r, h * hd))
}

/// [`Kernels::attention_ragged`] from the generic products: the queries padded to the longest
/// sequence's count by repeating one of its rows, [`rows_attention`], and the requested rows
/// picked out again.
fn padded_ragged_attention<E: Elem, D: Kernels<E>, T: Tape<E, D>>(
    q: T2<E, D, T>,
    k: T4<E, D, T>,
    v: T4<E, D, T>,
    starts: &[usize],
) -> Res<T2<E, D, T>, D> {
    let (b, _, h, hd) = *k.shape();
    if q.shape().0 == 0 {
        return Ok(q);
    }
    let per = starts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let (mut pad, mut keep) = (Vec::with_capacity(b * per), Vec::new());
    for (s, w) in starts.windows(2).take(b).enumerate() {
        let (first, count) = (w[0], w[1] - w[0]);
        for j in 0..per {
            if j < count {
                keep.push(s * per + j);
            }
            // a sequence without queries pads with row 0 (its outputs are dropped)
            pad.push(if count > 0 {
                first + j.min(count - 1)
            } else {
                0
            });
        }
    }
    let q = D::gather_rows(q, &pad)?.try_reshape_like(&(b, per, h, hd))?;
    D::gather_rows(rows_attention(q, k, v)?, &keep)
}

/// Rows per parallel task: enough work per task to amortise rayon's overhead.
fn chunk_rows(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

/// θ', m', v' of an AdamW step.
pub type Moments<E, D> = (T1<E, D>, T1<E, D>, T1<E, D>);

#[cfg(feature = "cuda")]
impl<E: Elem> Kernels<E> for dfdx::tensor::Cuda where dfdx::tensor::Cuda: Device<E> {}

/// The CPU kernels: each method hands over to its op's module (written once, generic over the
/// element type).
impl<E: Elem> Kernels<E> for Cpu
where
    Cpu: Device<E>,
{
    fn matmul<T: Tape<E, Self>>(x: T2<E, Self, T>, w: T2<E, Self>) -> Res<T2<E, Self, T>, Self> {
        matmul::matmul(x, w, None)
    }
    fn matmul_bias<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        w: T2<E, Self>,
        bias: T1<E, Self>,
    ) -> Res<T2<E, Self, T>, Self> {
        matmul::matmul(x, w, Some(bias))
    }
    fn glu<T: Tape<E, Self>>(
        kind: MlpKind,
        a: T2<E, Self, T>,
        u: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        elementwise::glu(kind, a, u)
    }
    fn gather_rows<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        rows: &[usize],
    ) -> Res<T2<E, Self, T>, Self> {
        gather::gather_rows(x, rows)
    }
    fn ffn<T: Tape<E, Self>>(
        kind: MlpKind,
        x: T2<E, Self, T>,
        (w1, w3, w2): (T2<E, Self>, T2<E, Self>, T2<E, Self>),
    ) -> Res<T2<E, Self, T>, Self> {
        match kind {
            MlpKind::Glu => ffn::ffn(false, x, w1, w3, w2),
            MlpKind::Swiglu => ffn::ffn(true, x, w1, w3, w2),
            MlpKind::Geglu => composed_ffn(kind, x, (w1, w3, w2)),
        }
    }
    fn softmax_last<T: Tape<E, Self>>(x: T4<E, Self, T>) -> Res<T4<E, Self, T>, Self> {
        elementwise::softmax_last(x)
    }
    fn layer_norm<T: Tape<E, Self>>(x: T2<E, Self, T>) -> Res<T2<E, Self, T>, Self> {
        norms::layer_norm(x)
    }
    fn rms_norm<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        scale: T1<E, Self>,
    ) -> Res<T2<E, Self, T>, Self> {
        norms::rms_norm(x, scale)
    }
    fn modulate<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        shift: T2<E, Self, T>,
        scale: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        elementwise::modulate(x, shift, scale, b, n)
    }
    fn norm_modulate<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        shift: T2<E, Self, T>,
        scale: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        norms::norm_modulate(x, shift, scale, b, n)
    }
    fn residual<T: Tape<E, Self>>(
        h: T2<E, Self, T>,
        y: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        elementwise::residual(h, y)
    }
    fn shift<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        s: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        elementwise::shift(x, s, b, n)
    }
    fn concat_cols<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        y: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        elementwise::concat_cols(x, y)
    }
    fn gated_residual<T: Tape<E, Self>>(
        h: T2<E, Self, T>,
        y: T2<E, Self, T>,
        gate: T2<E, Self, T>,
        b: usize,
        n: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        elementwise::gated_residual(h, y, gate, b, n)
    }
    fn attention<T: Tape<E, Self>>(
        q: T4<E, Self, T>,
        k: T4<E, Self, T>,
        v: T4<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        attention::attention(q, k, v, None)
    }
    fn attention_ragged<T: Tape<E, Self>>(
        q: T2<E, Self, T>,
        k: T4<E, Self, T>,
        v: T4<E, Self, T>,
        starts: &[usize],
    ) -> Res<T2<E, Self, T>, Self> {
        attention::attention_ragged(q, k, v, starts)
    }
    fn block_attention<T: Tape<E, Self>>(
        q: T4<E, Self, T>,
        k: T4<E, Self, T>,
        v: T4<E, Self, T>,
        mask: BlockMask,
    ) -> Res<T2<E, Self, T>, Self> {
        attention::attention(q, k, v, Some(mask))
    }
    fn rope<T: Tape<E, Self>>(
        rope: &Rope<E, Self>,
        x: T2<E, Self, T>,
        b: usize,
        n: usize,
        h: usize,
        scale: f64,
    ) -> Res<T4<E, Self, T>, Self> {
        elementwise::rope(rope, x, b, n, h, scale)
    }
    fn conv3x3<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        w: T2<E, Self>,
        b: usize,
        h: usize,
        wd: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        #[cfg(test)]
        if conv::generic_image_ops() {
            return crate::unet_layers::conv3x3(x, w, b, h, wd);
        }
        conv::conv3x3(x, w, None, b, h, wd)
    }
    fn conv3x3_bias<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        w: T2<E, Self>,
        bias: T1<E, Self>,
        b: usize,
        h: usize,
        wd: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        #[cfg(test)]
        if conv::generic_image_ops() {
            let y = crate::unet_layers::conv3x3(x, w, b, h, wd)?;
            return crate::unet_layers::add_bias(y, bias);
        }
        conv::conv3x3(x, w, Some(bias), b, h, wd)
    }
    fn group_norm<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        scale: T1<E, Self>,
        bias: T1<E, Self>,
        b: usize,
        groups: usize,
    ) -> Res<T2<E, Self, T>, Self> {
        #[cfg(test)]
        if conv::generic_image_ops() {
            return crate::unet_layers::group_norm(x, scale, bias, b, groups);
        }
        conv::group_norm(x, scale, bias, b, groups, false, None)
    }
    fn group_norm_swish<T: Tape<E, Self>>(
        x: T2<E, Self, T>,
        scale: T1<E, Self>,
        bias: T1<E, Self>,
        b: usize,
        groups: usize,
        keep: Option<Vec<E>>,
    ) -> Res<T2<E, Self, T>, Self> {
        #[cfg(test)]
        if conv::generic_image_ops() {
            let y = crate::unet_layers::group_norm(x, scale, bias, b, groups)?;
            return crate::unet_layers::swish_masked(y, keep);
        }
        conv::group_norm(x, scale, bias, b, groups, true, keep)
    }
    fn adamw(
        p: &T1<E, Self>,
        g: &T1<E, Self>,
        m: &T1<E, Self>,
        v: &T1<E, Self>,
        s: &AdamWStep,
    ) -> Res<Moments<E, Self>, Self> {
        optimizer::adamw(p, g, m, v, s)
    }
    fn ema(ema: &T1<E, Self>, p: &T1<E, Self>, rate: f64) -> Res<T1<E, Self>, Self> {
        optimizer::ema(ema, p, rate)
    }
    fn sum_squares(x: &T1<E, Self>) -> Res<f64, Self> {
        Ok(optimizer::sum_squares(x))
    }
    fn lasting_tensor(dev: &Self, data: Vec<E>) -> Res<T1<E, Self>, Self> {
        let n = data.len();
        storage::output_lasting(dev, data, (n,))
    }
    fn retain<S: Shape, T>(scope: &KernelScope, keep: &Tensor<S, E, Self, T>) {
        storage::retain(scope, keep)
    }
    fn retain_all<S: Shape, T>(scope: &KernelScope, keep: &[Tensor<S, E, Self, T>]) {
        storage::retain_all(scope, keep)
    }
}
