//! Device-specific fused kernels behind one trait, [`Kernels`]. Each method has a default built
//! from dfdx's generic ops (used on CUDA); the CPU implements them as single-pass,
//! multi-threaded kernels with hand-written backward passes registered on the tape
//! (`Tape::add_backward_op`): matrix products (gemm 0.19, whose AVX-512 kernels are ~2.8× faster
//! here than dfdx's gemm 0.15), attention per (sequence, head), softmax over the last axis,
//! LayerNorm without affine, RMSNorm with a scale, adaLN modulation, gated residual, the
//! GLU/SwiGLU gate and RoPE. dfdx composes the element-wise ones from 4–10 separate ops, each
//! allocating and sweeping memory; here each is one sweep forward and one backward. The
//! optimizer's passes (AdamW, EMA, Σ g²; tape-free) live here too, implemented in
//! [`crate::update_cpu`] and bit-identical to their dfdx-op defaults.
//!
//! Memory traffic (issue 8, `bench/NOTES.md`): inputs are read in place ([`view`]), the backward
//! op takes its output's gradient out of the store ([`take_grad!`]) and accumulates straight
//! into its inputs' gradients, gemm outputs are not zero-filled, and the f32 softmax/sigmoid use
//! the vectorisable [`Elem::fast_exp`]. Every CPU kernel is checked against the generic default
//! (values and gradients) in this module's tests: in f64 to 1e-12, and in f32 (fast exp,
//! different summation order) to 2e-5·(1 + |reference|).

use crate::attention_cpu;
use crate::layers::{self, Res, Rope, T1, T2, T4};
use crate::update_cpu::{self, AdamWStep};
use crate::{Elem, MlpKind};
use dfdx::prelude::*;
use rayon::prelude::*;

/// The fused operations the model uses, with generic defaults.
pub trait Kernels<E: Elem>: Device<E> {
    /// `x @ w`: x (m, k) an activation, w (k, n) a parameter (tape-free).
    fn matmul<T: Tape<E, Self>>(x: T2<E, Self, T>, w: T2<E, Self>) -> Res<T2<E, Self, T>, Self> {
        x.try_matmul(w)
    }
    /// The gated unit `act(a) ⊙ u` of the FFN, a and u (m, hidden).
    fn glu<T: Tape<E, Self>>(
        kind: MlpKind,
        a: T2<E, Self, T>,
        u: T2<E, Self, T>,
    ) -> Res<T2<E, Self, T>, Self> {
        layers::act(kind, a)?.try_mul(u)
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
        let (b, n, h, hd) = *q.shape();
        let q = q.try_permute::<_, Axes4<0, 2, 1, 3>>()?;
        let k = k.try_permute::<_, Axes4<0, 2, 3, 1>>()?;
        let v = v.try_permute::<_, Axes4<0, 2, 1, 3>>()?;
        let p = Self::softmax_last(q.try_matmul(k)?)?;
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
    /// One AdamW update of a flat parameter (spec §8): (θ', m', v') from θ, its gradient and
    /// the moments m, v (tape-free; see [`crate::train::AdamW`]).
    fn adamw(
        p: &T1<E, Self>,
        g: &T1<E, Self>,
        m: &T1<E, Self>,
        v: &T1<E, Self>,
        s: &AdamWStep,
    ) -> Res<Moments<E, Self>, Self> {
        generic_adamw(p, g, m, v, s)
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
}

/// [`Kernels::adamw`] from dfdx's ops: 14 element-wise passes.
fn generic_adamw<E: Elem, D: Device<E>>(
    p: &T1<E, D>,
    g: &T1<E, D>,
    m: &T1<E, D>,
    v: &T1<E, D>,
    s: &AdamWStep,
) -> Res<Moments<E, D>, D> {
    let c = E::c;
    let g = match s.grad_scale {
        Some(k) => g.clone().try_mul(c(k))?,
        None => g.clone(),
    };
    let m2 = (m.clone().try_mul(c(s.beta1))?).try_add(g.clone().try_mul(c(1.0 - s.beta1))?)?;
    let v2 =
        (v.clone().try_mul(c(s.beta2))?).try_add(g.try_square()?.try_mul(c(1.0 - s.beta2))?)?;
    let denom = v2
        .clone()
        .try_mul(c(1.0 / s.bias_correction2))?
        .try_sqrt()?
        .try_add(c(s.eps))?;
    let upd = (m2
        .clone()
        .try_mul(c(1.0 / s.bias_correction1))?
        .try_div(denom)?)
    .try_add(p.clone().try_mul(c(s.weight_decay))?)?;
    Ok((p.clone().try_sub(upd.try_mul(c(s.lr))?)?, m2, v2))
}

/// θ', m', v' of an AdamW step.
pub type Moments<E, D> = (T1<E, D>, T1<E, D>, T1<E, D>);

#[cfg(feature = "cuda")]
impl<E: Elem> Kernels<E> for dfdx::tensor::Cuda where dfdx::tensor::Cuda: Device<E> {}

/// Physical data of a tensor made contiguous (one memcpy): the starting point of kernels that
/// build their output in place from a copy of an input.
fn host<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) -> Vec<E> {
    let mut v = vec![E::zero(); t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// Zero-copy read access to a row-major contiguous CPU tensor (callers pass the result of
/// `try_contiguous`, which keeps contiguous data as it is). dfdx 0.13 keeps tensor storage
/// private and offers only copies (`copy_into`, `as_vec`); copying every kernel input cost
/// ~7 % of a training step in memcpy plus the page faults of the fresh buffers, and doubled
/// the activations held for the backward pass. The public element indexing is the only way to
/// the storage: element 0's address plus the element count spans the buffer, which for a
/// contiguous tensor holds exactly `num_elements` values. The strides are checked (one index
/// per axis) so a broadcast or permuted view can never be misread.
fn view<S: Shape, E: Elem, T>(t: &Tensor<S, E, Cpu, T>) -> &[E] {
    let shape = *t.shape();
    let n = shape.num_elements();
    if n == 0 {
        return &[];
    }
    let zero = S::Concrete::default();
    let first: *const E = &t[zero];
    let dims = shape.concrete();
    let mut stride = 1;
    for axis in (0..S::NUM_DIMS).rev() {
        if dims[axis] > 1 {
            let mut ix = zero;
            ix[axis] = 1;
            let at: *const E = &t[ix];
            assert!(
                at == first.wrapping_add(stride),
                "view of a non-contiguous tensor"
            );
        }
        stride *= dims[axis];
    }
    // SAFETY: the tensor's buffer is a live, initialised Vec<E> holding `n` contiguous elements
    // from element 0 (row-major strides checked above); the slice borrows `t`, which keeps the
    // buffer alive and unmodified (dfdx never mutates a buffer shared through its Arc).
    unsafe { std::slice::from_raw_parts(first, n) }
}

/// Moves `y`'s accumulated gradient out of the gradient store (no copy) for `y`'s backward op.
/// Only the op that produced `y` reads its gradient, and it runs after every consumer of `y`
/// has added to it, so nothing reads the (now empty) entry afterwards; the memory is freed
/// as soon as the op is done instead of at the end of the backward pass. Consequently the
/// gradients of the fused kernels' outputs are not available to callers after `backward`
/// (parameters and other inputs keep theirs). A macro because dfdx does not export the
/// ghost-tensor type. Evaluates to `Vec<E>`; `?` propagates the allocation error.
macro_rules! take_grad {
    ($grads:expr, $y:expr) => {
        std::mem::take(&mut **$grads.get_or_alloc_mut(&$y)?)
    };
}

/// A `len`-element output buffer written completely by `fill` before it is read (gemm with
/// `read_dst = false` never reads its destination), so no zeroing pass is needed.
fn alloc_filled<E: Elem>(len: usize, fill: impl FnOnce(*mut E)) -> Vec<E> {
    let mut v = Vec::with_capacity(len);
    fill(v.as_mut_ptr());
    // SAFETY: `fill` initialised all `len` elements through the pointer.
    unsafe { v.set_len(len) };
    v
}

/// Rows per parallel task: enough work per task to amortise rayon's overhead.
fn chunk_rows(d: usize) -> usize {
    (16_384 / d.max(1)).max(1)
}

/// The CPU kernels, instantiated per element type (a generic impl would hide that Cpu's
/// gradient buffers deref to slices).
macro_rules! cpu_kernels {
    ($m:ident, $t:ty) => {
        mod $m {
            use super::*;
            use num_traits::{One, Zero};
            type E = $t;

            /// Three untaped tensors and their merged tape.
            type Untaped3<S1, S2, S3, T> = (
                Tensor<S1, E, Cpu>,
                Tensor<S2, E, Cpu>,
                Tensor<S3, E, Cpu>,
                T,
            );

            /// The prologue of the three-input kernels: each input made contiguous (a no-op
            /// when it is) and untaped, and the three tapes merged into one.
            fn untape3<S1: Shape, S2: Shape, S3: Shape, T: Tape<E, Cpu>>(
                a: Tensor<S1, E, Cpu, T>,
                b: Tensor<S2, E, Cpu, T>,
                c: Tensor<S3, E, Cpu, T>,
            ) -> Res<Untaped3<S1, S2, S3, T>, Cpu> {
                let (a, b, c) = (
                    a.try_contiguous()?,
                    b.try_contiguous()?,
                    c.try_contiguous()?,
                );
                let (a, ta) = a.split_tape();
                let (b, tb) = b.split_tape();
                let (c, tc) = c.split_tape();
                Ok((a, b, c, ta.merge(tb).merge(tc)))
            }

            impl Kernels<E> for Cpu {
                fn matmul<T: Tape<E, Self>>(
                    x: T2<E, Self, T>,
                    w: T2<E, Self>,
                ) -> Res<T2<E, Self, T>, Self> {
                    crate::alloc::tune_allocator();
                    let (x, w) = (x.try_contiguous()?, w.try_contiguous()?);
                    let ((m, k), n) = (*x.shape(), w.shape().1);
                    assert_eq!(k, w.shape().0, "matmul inner dimensions");
                    let (x, mut tape) = x.split_tape();
                    let (xv, wv) = (view(&x), view(&w));
                    // SAFETY: row-major buffers of exactly (m, k), (k, n), (m, n); gemm
                    // overwrites all of y without reading it.
                    let y = alloc_filled(m * n, |y| unsafe {
                        attention_cpu::mm_par(
                            (m, n, k),
                            y,
                            (n, 1),
                            false,
                            xv.as_ptr(),
                            (k, 1),
                            wv.as_ptr(),
                            (n, 1),
                        );
                    });
                    let y = x.device().try_tensor_from_vec(y, (m, n))?;
                    if T::OWNS_TAPE {
                        let (xg, wg, yg) = (x.ghost(), w.ghost(), y.ghost());
                        tape.add_backward_op(move |grads| {
                            let gy = take_grad!(grads, yg);
                            let (xv, wv) = (view(&x), view(&w));
                            // dX += dY Wᵀ, dW += Xᵀ dY, accumulated in place
                            let gx = grads.get_or_alloc_mut(&xg)?;
                            // SAFETY: gradient buffers have the shapes of x and w.
                            unsafe {
                                attention_cpu::mm_par(
                                    (m, k, n),
                                    gx.as_mut_ptr(),
                                    (k, 1),
                                    true,
                                    gy.as_ptr(),
                                    (n, 1),
                                    wv.as_ptr(),
                                    (1, n),
                                );
                            }
                            let gw = grads.get_or_alloc_mut(&wg)?;
                            unsafe {
                                attention_cpu::mm_par(
                                    (k, n, m),
                                    gw.as_mut_ptr(),
                                    (n, 1),
                                    true,
                                    xv.as_ptr(),
                                    (1, k),
                                    gy.as_ptr(),
                                    (n, 1),
                                );
                            }
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn glu<T: Tape<E, Self>>(
                    kind: MlpKind,
                    a: T2<E, Self, T>,
                    u: T2<E, Self, T>,
                ) -> Res<T2<E, Self, T>, Self> {
                    let swish = match kind {
                        MlpKind::Glu => false,
                        MlpKind::Swiglu => true,
                        MlpKind::Geglu => return layers::act(kind, a)?.try_mul(u),
                    };
                    let (a, u) = (a.try_contiguous()?, u.try_contiguous()?);
                    let shape = *a.shape();
                    let (a, ta) = a.split_tape();
                    let (u, tu) = u.split_tape();
                    let mut tape = ta.merge(tu);
                    // act(a) = σ(a) (GLU) or a·σ(a) (SwiGLU); y = act(a)·u. σ is recomputed in
                    // the backward pass rather than stored (one exp per element is cheaper
                    // than holding another (m, hidden) buffer per block).
                    let y: Vec<E> = view(&a)
                        .par_iter()
                        .zip(view(&u))
                        .map(|(&x, &u)| {
                            let s = E::one() / (E::one() + (-x).fast_exp());
                            if swish {
                                x * s * u
                            } else {
                                s * u
                            }
                        })
                        .collect();
                    let y = a.device().try_tensor_from_vec(y, shape)?;
                    if T::OWNS_TAPE {
                        let (ag, ug, yg) = (a.ghost(), u.ghost(), y.ghost());
                        tape.add_backward_op(move |grads| {
                            let gy = take_grad!(grads, yg);
                            let (av, uv) = (view(&a), view(&u));
                            let cr = chunk_rows(1);
                            // ∂y/∂u = act(a); ∂y/∂a = u·σ'(a) or u·σ(a)(1 + a(1 − σ(a)))
                            let gu = grads.get_or_alloc_mut(&ug)?;
                            gu.par_chunks_mut(cr)
                                .zip(gy.par_chunks(cr))
                                .zip(av.par_chunks(cr))
                                .for_each(|((gu, gy), av)| {
                                    for ((gu, &g), &x) in gu.iter_mut().zip(gy).zip(av) {
                                        let s = E::one() / (E::one() + (-x).fast_exp());
                                        *gu += if swish { g * x * s } else { g * s };
                                    }
                                });
                            let ga = grads.get_or_alloc_mut(&ag)?;
                            ga.par_chunks_mut(cr)
                                .zip(gy.par_chunks(cr))
                                .zip(av.par_chunks(cr))
                                .zip(uv.par_chunks(cr))
                                .for_each(|(((ga, gy), av), uv)| {
                                    let it = ga.iter_mut().zip(gy).zip(av).zip(uv);
                                    for (((ga, &g), &x), &u) in it {
                                        let s = E::one() / (E::one() + (-x).fast_exp());
                                        let d = if swish {
                                            s * (E::one() + x * (E::one() - s))
                                        } else {
                                            s * (E::one() - s)
                                        };
                                        *ga += g * u * d;
                                    }
                                });
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn softmax_last<T: Tape<E, Self>>(x: T4<E, Self, T>) -> Res<T4<E, Self, T>, Self> {
                    let x = x.try_contiguous()?;
                    let shape = *x.shape();
                    let d = shape.3;
                    let (x, mut tape) = x.split_tape();
                    let mut y = host(&x);
                    let cr = chunk_rows(d);
                    y.par_chunks_mut(d * cr)
                        .for_each(|rows| attention_cpu::softmax_rows(rows, d, None));
                    let y = x.device().try_tensor_from_vec(y, shape)?;
                    if T::OWNS_TAPE {
                        let (xg, yk) = (x.ghost(), y.clone());
                        let yg = y.ghost();
                        tape.add_backward_op(move |grads| {
                            let gy = take_grad!(grads, yg);
                            let yv = view(&yk);
                            let gx = grads.get_or_alloc_mut(&xg)?;
                            gx.par_chunks_mut(d * cr)
                                .zip(yv.par_chunks(d * cr))
                                .zip(gy.par_chunks(d * cr))
                                .for_each(|((gx, y), gy)| {
                                    for ((gx, y), gy) in
                                        gx.chunks_mut(d).zip(y.chunks(d)).zip(gy.chunks(d))
                                    {
                                        let dot = y
                                            .iter()
                                            .zip(gy)
                                            .fold(E::zero(), |a, (&y, &g)| a + y * g);
                                        for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(gy) {
                                            *gx += y * (g - dot);
                                        }
                                    }
                                });
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn layer_norm<T: Tape<E, Self>>(x: T2<E, Self, T>) -> Res<T2<E, Self, T>, Self> {
                    let x = x.try_contiguous()?;
                    let shape = *x.shape();
                    let d = shape.1;
                    let (x, mut tape) = x.split_tape();
                    let mut y = host(&x);
                    let mut rstd = vec![E::zero(); shape.0];
                    let eps = E::c(layers::NORM_EPS);
                    let inv_d = E::one() / E::c(d as f64);
                    let cr = chunk_rows(d);
                    y.par_chunks_mut(d * cr)
                        .zip(rstd.par_chunks_mut(cr))
                        .for_each(|(rows, rs)| {
                            for (row, r) in rows.chunks_mut(d).zip(rs) {
                                let mean = row.iter().fold(E::zero(), |a, &v| a + v) * inv_d;
                                let var = row
                                    .iter()
                                    .fold(E::zero(), |a, &v| a + (v - mean) * (v - mean))
                                    * inv_d;
                                *r = E::one() / (var + eps).sqrt();
                                row.iter_mut().for_each(|v| *v = (*v - mean) * *r);
                            }
                        });
                    let y = x.device().try_tensor_from_vec(y, shape)?;
                    if T::OWNS_TAPE {
                        let (xg, yk, yg) = (x.ghost(), y.clone(), y.ghost());
                        tape.add_backward_op(move |grads| {
                            let gy = take_grad!(grads, yg);
                            let yv = view(&yk);
                            let gx = grads.get_or_alloc_mut(&xg)?;
                            gx.par_chunks_mut(d * cr)
                                .zip(yv.par_chunks(d * cr))
                                .zip(gy.par_chunks(d * cr))
                                .zip(rstd.par_chunks(cr))
                                .for_each(|(((gx, y), gy), rs)| {
                                    let rows =
                                        gx.chunks_mut(d).zip(y.chunks(d)).zip(gy.chunks(d)).zip(rs);
                                    for (((gx, y), gy), &r) in rows {
                                        let mg = gy.iter().fold(E::zero(), |a, &g| a + g) * inv_d;
                                        let mgy = y
                                            .iter()
                                            .zip(gy)
                                            .fold(E::zero(), |a, (&y, &g)| a + y * g)
                                            * inv_d;
                                        for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(gy) {
                                            *gx += r * (g - mg - y * mgy);
                                        }
                                    }
                                });
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn rms_norm<T: Tape<E, Self>>(
                    x: T2<E, Self, T>,
                    scale: T1<E, Self>,
                ) -> Res<T2<E, Self, T>, Self> {
                    let (x, scale) = (x.try_contiguous()?, scale.try_contiguous()?);
                    let shape = *x.shape();
                    let d = shape.1;
                    assert_eq!(scale.shape().0, d, "rms_norm scale width");
                    let (x, mut tape) = x.split_tape();
                    let eps = E::c(layers::NORM_EPS);
                    let inv_d = E::one() / E::c(d as f64);
                    let cr = chunk_rows(d);
                    let sv = view(&scale);
                    // y = x · r · s with r = (mean x² + ε)^(−1/2) per row; r kept for backward
                    let mut y = host(&x);
                    let mut rinv = vec![E::zero(); shape.0];
                    y.par_chunks_mut(d * cr)
                        .zip(rinv.par_chunks_mut(cr))
                        .for_each(|(rows, rs)| {
                            for (row, r) in rows.chunks_mut(d).zip(rs) {
                                let ms = row.iter().fold(E::zero(), |a, &v| a + v * v) * inv_d;
                                *r = E::one() / (ms + eps).sqrt();
                                for (v, &s) in row.iter_mut().zip(sv) {
                                    *v = *v * *r * s;
                                }
                            }
                        });
                    let y = x.device().try_tensor_from_vec(y, shape)?;
                    if T::OWNS_TAPE {
                        let (sg, yg) = (scale.ghost(), y.ghost());
                        tape.add_backward_op(move |grads| {
                            let gy = take_grad!(grads, yg);
                            let (xv, sv) = (view(&x), view(&scale));
                            // x̂ = x·r; ds = Σ_rows g ⊙ x̂; dx = r (g⊙s − x̂ · mean(g⊙s⊙x̂))
                            let partial: Vec<Vec<E>> = gy
                                .par_chunks(d * cr)
                                .zip(xv.par_chunks(d * cr))
                                .zip(rinv.par_chunks(cr))
                                .map(|((gy, xv), rs)| {
                                    let mut acc = vec![E::zero(); d];
                                    for ((g, x), &r) in gy.chunks(d).zip(xv.chunks(d)).zip(rs) {
                                        for ((a, &g), &x) in acc.iter_mut().zip(g).zip(x) {
                                            *a += g * x * r;
                                        }
                                    }
                                    acc
                                })
                                .collect();
                            let gs = grads.get_or_alloc_mut(&sg)?;
                            for p in &partial {
                                for (a, &v) in gs.iter_mut().zip(p) {
                                    *a += v;
                                }
                            }
                            let gx = grads.get_or_alloc_mut(&x)?;
                            gx.par_chunks_mut(d * cr)
                                .zip(gy.par_chunks(d * cr))
                                .zip(xv.par_chunks(d * cr))
                                .zip(rinv.par_chunks(cr))
                                .for_each(|(((gx, gy), xv), rs)| {
                                    let rows = gx
                                        .chunks_mut(d)
                                        .zip(gy.chunks(d))
                                        .zip(xv.chunks(d))
                                        .zip(rs);
                                    for (((gx, g), x), &r) in rows {
                                        let m = g
                                            .iter()
                                            .zip(x)
                                            .zip(sv)
                                            .fold(E::zero(), |a, ((&g, &x), &s)| a + g * s * x)
                                            * r
                                            * inv_d;
                                        for (((gx, &g), &x), &s) in
                                            gx.iter_mut().zip(g).zip(x).zip(sv)
                                        {
                                            *gx += r * (g * s - x * r * m);
                                        }
                                    }
                                });
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn modulate<T: Tape<E, Self>>(
                    x: T2<E, Self, T>,
                    shift: T2<E, Self, T>,
                    scale: T2<E, Self, T>,
                    b: usize,
                    n: usize,
                ) -> Res<T2<E, Self, T>, Self> {
                    let (x, sh, sc, mut tape) = untape3(x, shift, scale)?;
                    let shape = *x.shape();
                    let d = shape.1;
                    assert_eq!(shape.0, b * n, "modulate: rows are not batch × length");
                    let (shv, scv) = (view(&sh), view(&sc));
                    let mut y = host(&x);
                    y.par_chunks_mut(n * d).enumerate().for_each(|(bi, seq)| {
                        let (s0, c0) = (&shv[bi * d..(bi + 1) * d], &scv[bi * d..(bi + 1) * d]);
                        for row in seq.chunks_mut(d) {
                            for ((v, &s), &c) in row.iter_mut().zip(s0).zip(c0) {
                                *v = *v * (E::one() + c) + s;
                            }
                        }
                    });
                    let y = x.device().try_tensor_from_vec(y, shape)?;
                    if T::OWNS_TAPE {
                        let (shg, scg, yg) = (sh.ghost(), sc.ghost(), y.ghost());
                        tape.add_backward_op(move |grads| {
                            let gy = take_grad!(grads, yg);
                            let (xv, scv) = (view(&x), view(&sc));
                            // per-sequence sums for shift and scale, then the input gradient
                            let gsh = seq_column_sums(&gy, None, (n, d));
                            let gsc = seq_column_sums(&gy, Some(xv), (n, d));
                            add_into(grads.get_or_alloc_mut(&shg)?, &gsh);
                            add_into(grads.get_or_alloc_mut(&scg)?, &gsc);
                            let gx = grads.get_or_alloc_mut(&x)?;
                            seq_broadcast(gx, &gy, scv, (n, d), |gx, g, c| {
                                *gx += g * (E::one() + c)
                            });
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn gated_residual<T: Tape<E, Self>>(
                    h: T2<E, Self, T>,
                    y: T2<E, Self, T>,
                    gate: T2<E, Self, T>,
                    b: usize,
                    n: usize,
                ) -> Res<T2<E, Self, T>, Self> {
                    let (h, y, g, mut tape) = untape3(h, y, gate)?;
                    let shape = *h.shape();
                    let d = shape.1;
                    assert_eq!(
                        shape.0,
                        b * n,
                        "gated residual: rows are not batch × length"
                    );
                    let (yv, gv) = (view(&y), view(&g));
                    let mut z = host(&h);
                    seq_broadcast(&mut z, yv, gv, (n, d), |z, y, g| *z += g * y);
                    let z = h.device().try_tensor_from_vec(z, shape)?;
                    if T::OWNS_TAPE {
                        let (hg, gg, zg) = (h.ghost(), g.ghost(), z.ghost());
                        tape.add_backward_op(move |grads| {
                            let gz = take_grad!(grads, zg);
                            let (yv, gv) = (view(&y), view(&g));
                            let ggate = seq_column_sums(&gz, Some(yv), (n, d));
                            add_into(grads.get_or_alloc_mut(&gg)?, &ggate);
                            add_into(grads.get_or_alloc_mut(&hg)?, &gz);
                            let gy = grads.get_or_alloc_mut(&y)?;
                            seq_broadcast(gy, &gz, gv, (n, d), |gy, gz, g| *gy += gz * g);
                            Ok(())
                        });
                    }
                    Ok(z.put_tape(tape))
                }

                fn attention<T: Tape<E, Self>>(
                    q: T4<E, Self, T>,
                    k: T4<E, Self, T>,
                    v: T4<E, Self, T>,
                ) -> Res<T2<E, Self, T>, Self> {
                    let (q, k, v, mut tape) = untape3(q, k, v)?;
                    let (b, n, h, hd) = *q.shape();
                    let dims = attention_cpu::Dims { b, n, h, hd };
                    let (o, lse) =
                        attention_cpu::forward(view(&q), view(&k), view(&v), dims, T::OWNS_TAPE);
                    let o = q.device().try_tensor_from_vec(o, (b * n, h * hd))?;
                    if T::OWNS_TAPE {
                        let og = o.ghost();
                        tape.add_backward_op(move |grads| {
                            let go = take_grad!(grads, og);
                            // accumulated straight into the three gradient buffers; raw
                            // pointers because q, k, v may be one tensor (then each task
                            // still updates its own blocks one after another)
                            let gq = grads.get_or_alloc_mut(&q)?.as_mut_ptr();
                            let gk = grads.get_or_alloc_mut(&k)?.as_mut_ptr();
                            let gv = grads.get_or_alloc_mut(&v)?.as_mut_ptr();
                            // SAFETY: each gradient buffer has b·n·h·hd elements and outlives
                            // the call (the store is not touched meanwhile).
                            unsafe {
                                attention_cpu::backward(
                                    view(&q),
                                    view(&k),
                                    view(&v),
                                    &lse,
                                    &go,
                                    dims,
                                    (gq, gk, gv),
                                );
                            }
                            Ok(())
                        });
                    }
                    Ok(o.put_tape(tape))
                }

                fn rope<T: Tape<E, Self>>(
                    rope: &Rope<E, Self>,
                    x: T2<E, Self, T>,
                    b: usize,
                    n: usize,
                    h: usize,
                    scale: f64,
                ) -> Res<T4<E, Self, T>, Self> {
                    let x = x.try_contiguous()?;
                    let d = x.shape().1;
                    let hd = d / h;
                    let half = hd / 2;
                    let (x, mut tape) = x.split_tape();
                    let (cos, sin) = (rope.cos_host.clone(), rope.sin_host.clone());
                    let s = E::c(scale);
                    // one row = one position of one sequence: h heads of hd/2 rotated pairs;
                    // src → dst (both (rows, d)), accumulating into dst when `acc`
                    let rotate = move |dst: &mut [E],
                                       src: &[E],
                                       first_row: usize,
                                       inverse: bool,
                                       acc: bool| {
                        for (r, (drow, srow)) in dst.chunks_mut(d).zip(src.chunks(d)).enumerate() {
                            let pos = (first_row + r) % n;
                            let (c0, s0) = (
                                &cos[pos * half..(pos + 1) * half],
                                &sin[pos * half..(pos + 1) * half],
                            );
                            for (dh, sh) in drow.chunks_mut(hd).zip(srow.chunks(hd)) {
                                for (i, (dp, sp)) in dh.chunks_mut(2).zip(sh.chunks(2)).enumerate()
                                {
                                    let (a, bb) = (sp[0], sp[1]);
                                    let (c, sn) = (c0[i], if inverse { -s0[i] } else { s0[i] });
                                    let (y0, y1) = (s * (a * c - bb * sn), s * (bb * c + a * sn));
                                    if acc {
                                        dp[0] += y0;
                                        dp[1] += y1;
                                    } else {
                                        dp[0] = y0;
                                        dp[1] = y1;
                                    }
                                }
                            }
                        }
                    };
                    let cr = chunk_rows(d);
                    let xv = view(&x);
                    let mut y = vec![E::zero(); xv.len()];
                    y.par_chunks_mut(d * cr)
                        .zip(xv.par_chunks(d * cr))
                        .enumerate()
                        .for_each(|(k, (dst, src))| rotate(dst, src, k * cr, false, false));
                    let y = x.device().try_tensor_from_vec(y, (b, n, h, hd))?;
                    if T::OWNS_TAPE {
                        let (xg, yg) = (x.ghost(), y.ghost());
                        tape.add_backward_op(move |grads| {
                            // the rotation is orthogonal: the gradient is the inverse rotation,
                            // scaled, added straight into x's gradient
                            let g = take_grad!(grads, yg);
                            let gx = grads.get_or_alloc_mut(&xg)?;
                            gx.par_chunks_mut(d * cr)
                                .zip(g.par_chunks(d * cr))
                                .enumerate()
                                .for_each(|(k, (dst, src))| rotate(dst, src, k * cr, true, true));
                            Ok(())
                        });
                    }
                    Ok(y.put_tape(tape))
                }

                fn adamw(
                    p: &T1<E, Self>,
                    g: &T1<E, Self>,
                    m: &T1<E, Self>,
                    v: &T1<E, Self>,
                    s: &AdamWStep,
                ) -> Res<Moments<E, Self>, Self> {
                    // flat parameters are contiguous by construction (`view` checks)
                    let (p2, m2, v2) = update_cpu::adamw(view(p), view(g), view(m), view(v), s);
                    let (dev, shape) = (p.device(), *p.shape());
                    Ok((
                        dev.try_tensor_from_vec(p2, shape)?,
                        dev.try_tensor_from_vec(m2, shape)?,
                        dev.try_tensor_from_vec(v2, shape)?,
                    ))
                }

                fn ema(ema: &T1<E, Self>, p: &T1<E, Self>, rate: f64) -> Res<T1<E, Self>, Self> {
                    let y = update_cpu::ema(view(ema), view(p), rate);
                    ema.device().try_tensor_from_vec(y, *ema.shape())
                }

                fn sum_squares(x: &T1<E, Self>) -> Res<f64, Self> {
                    Ok(update_cpu::sum_squares(view(x)))
                }
            }
        }
    };
}
cpu_kernels!(cpu_f32, f32);
cpu_kernels!(cpu_f64, f64);

fn add_into<E: Elem>(dst: &mut [E], src: &[E]) {
    dst.par_chunks_mut(16_384)
        .zip(src.par_chunks(16_384))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
}

/// `f(dst, src, vec)` elementwise over (b·n, d) rows, `vec` being the row's sequence's entry of
/// the per-sequence (b, d) `vecs` (adaLN-style broadcasting); parallel over sequences.
fn seq_broadcast<E: Elem>(
    dst: &mut [E],
    src: &[E],
    vecs: &[E],
    (n, d): (usize, usize),
    f: impl Fn(&mut E, E, E) + Sync,
) {
    assert!(
        dst.len() == src.len() && vecs.len() * n == dst.len(),
        "per-sequence broadcast shapes"
    );
    dst.par_chunks_mut(n * d)
        .zip(src.par_chunks(n * d))
        .zip(vecs.par_chunks(d))
        .for_each(|((dst, src), v)| {
            for (dr, sr) in dst.chunks_mut(d).zip(src.chunks(d)) {
                for ((o, &x), &c) in dr.iter_mut().zip(sr).zip(v) {
                    f(o, x, c);
                }
            }
        });
}

/// Per-sequence column sums of `a ⊙ w` (or of `a`) over each sequence's n rows of width d:
/// the gradient of a (b, d) vector broadcast over (b·n, d); rows summed in order.
fn seq_column_sums<E: Elem>(a: &[E], w: Option<&[E]>, (n, d): (usize, usize)) -> Vec<E> {
    assert!(w.is_none_or(|w| w.len() == a.len()), "column-sum shapes");
    let mut out = vec![E::zero(); a.len() / n.max(1)];
    out.par_chunks_mut(d).enumerate().for_each(|(bi, o)| {
        let r = bi * n * d..(bi + 1) * n * d;
        for (k, g) in a[r.clone()].chunks(d).enumerate() {
            match w {
                Some(w) => {
                    let wr = &w[r.start + k * d..r.start + (k + 1) * d];
                    for j in 0..d {
                        o[j] += g[j] * wr[j];
                    }
                }
                None => {
                    for j in 0..d {
                        o[j] += g[j];
                    }
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    //! The fused CPU kernels against dfdx's generic compositions (the CUDA path): values and
    //! gradients of Σ R ⊙ output w.r.t. every input, in f64.
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    type G = Gradients<f64, Cpu>;

    fn rand2(dev: &Cpu, rng: &mut StdRng, s: (usize, usize)) -> T2<f64, Cpu> {
        dev.tensor_from_vec(
            (0..s.0 * s.1).map(|_| rng.gen_range(-1.5..1.5)).collect(),
            s,
        )
    }

    fn close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    /// Σ R ⊙ y → gradients.
    fn grads<S: Shape>(y: Tensor<S, f64, Cpu, OwnedTape<f64, Cpu>>, r: &[f64]) -> (Vec<f64>, G) {
        let out = y.retaped::<NoneTape>().as_vec();
        let rt = y.device().tensor_from_vec(r.to_vec(), *y.shape());
        (out, (y * rt).sum::<Rank0, _>().backward())
    }

    /// The trait's default attention, spelled out with dfdx's ops.
    fn generic_attention(
        q: T4<f64, Cpu, OwnedTape<f64, Cpu>>,
        k: T4<f64, Cpu, OwnedTape<f64, Cpu>>,
        v: T4<f64, Cpu, OwnedTape<f64, Cpu>>,
    ) -> T2<f64, Cpu, OwnedTape<f64, Cpu>> {
        let (b, n, h, hd) = *q.shape();
        let q = q.permute::<_, Axes4<0, 2, 1, 3>>();
        let k = k.permute::<_, Axes4<0, 2, 3, 1>>();
        let v = v.permute::<_, Axes4<0, 2, 1, 3>>();
        let o: T4<f64, Cpu, _> = q.matmul(k).softmax::<Axis<3>>().matmul(v);
        o.permute::<_, Axes4<0, 2, 1, 3>>()
            .reshape_like(&(b * n, h * hd))
    }

    #[test]
    fn fused_kernels_match_generic_ops() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(0);
        let (b, n, h, hd) = (2, 5, 2, 4);
        let d = h * hd;
        let r: Vec<f64> = (0..b * n * d * n)
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();

        let x = rand2(&dev, &mut rng, (b * n, d));
        let sh = rand2(&dev, &mut rng, (b, d));
        let sc = rand2(&dev, &mut rng, (b, d));
        let y = rand2(&dev, &mut rng, (b * n, d));
        let r2 = &r[..b * n * d];

        // layer norm + modulate
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::modulate(
                <Cpu as Kernels<f64>>::layer_norm(x.leaky_trace()).unwrap(),
                sh.leaky_trace(),
                sc.leaky_trace(),
                b,
                n,
            )
            .unwrap(),
            r2,
        );
        let (fb, gb) = grads(
            layers::modulate(
                layers::layer_norm(x.leaky_trace()).unwrap(),
                sh.leaky_trace(),
                sc.leaky_trace(),
                b,
                n,
            )
            .unwrap(),
            r2,
        );
        close(&fa, &fb, "modulate(ln)");
        for (t, name) in [(&x, "x"), (&sh, "shift"), (&sc, "scale")] {
            close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
        }

        // RMSNorm with a scale parameter
        let sv = rand2(&dev, &mut rng, (1, d)).reshape_like(&(d,));
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::rms_norm(x.leaky_trace(), sv.clone()).unwrap(),
            r2,
        );
        let (fb, gb) = grads(layers::rms_norm(x.leaky_trace(), sv.clone()).unwrap(), r2);
        close(&fa, &fb, "rms_norm");
        close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "rms_norm dx");
        close(
            &ga.get(&sv).as_vec(),
            &gb.get(&sv).as_vec(),
            "rms_norm dscale",
        );

        // gated residual
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::gated_residual(
                x.leaky_trace(),
                y.leaky_trace(),
                sc.leaky_trace(),
                b,
                n,
            )
            .unwrap(),
            r2,
        );
        let (fb, gb) = grads(
            layers::gated_residual(x.leaky_trace(), y.leaky_trace(), sc.leaky_trace(), b, n)
                .unwrap(),
            r2,
        );
        close(&fa, &fb, "gated");
        for (t, name) in [(&x, "h"), (&y, "y"), (&sc, "gate")] {
            close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
        }

        // matmul against a tape-free weight
        let w = rand2(&dev, &mut rng, (d, 3));
        let r3 = &r[..b * n * 3];
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::matmul(x.leaky_trace(), w.clone()).unwrap(),
            r3,
        );
        let (fb, gb) = grads(x.leaky_trace().matmul(w.clone()), r3);
        close(&fa, &fb, "matmul");
        close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "matmul dx");
        close(&ga.get(&w).as_vec(), &gb.get(&w).as_vec(), "matmul dw");

        // RoPE with a scale
        let rope = Rope::<f64, Cpu>::new(&dev, n, hd, 10_000.0).unwrap();
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::rope(&rope, x.leaky_trace(), b, n, h, 0.5).unwrap(),
            r2,
        );
        let (fb, gb) = grads(rope.apply(x.leaky_trace(), b, n, h, 0.5).unwrap(), r2);
        close(&fa, &fb, "rope");
        close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "rope grad");

        // attention (q, k, v as (b, n, h, hd))
        let mk4 = |rng: &mut StdRng| -> T4<f64, Cpu> {
            dev.tensor_from_vec(
                (0..b * n * d).map(|_| rng.gen_range(-1.0..1.0)).collect(),
                (b, n, h, hd),
            )
        };
        let (q4, k4, v4) = (mk4(&mut rng), mk4(&mut rng), mk4(&mut rng));
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::attention(q4.leaky_trace(), k4.leaky_trace(), v4.leaky_trace())
                .unwrap(),
            r2,
        );
        let (fb, gb) = grads(
            generic_attention(q4.leaky_trace(), k4.leaky_trace(), v4.leaky_trace()),
            r2,
        );
        close(&fa, &fb, "attention");
        // the tape-free (inference) path uses per-task scratch instead of keeping P
        let plain = <Cpu as Kernels<f64>>::attention(q4.clone(), k4.clone(), v4.clone()).unwrap();
        close(&plain.as_vec(), &fb, "attention without tape");
        for (t, name) in [(&q4, "dq"), (&k4, "dk"), (&v4, "dv")] {
            close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
        }

        // gated units
        let u = rand2(&dev, &mut rng, (b * n, d));
        for kind in [MlpKind::Glu, MlpKind::Swiglu, MlpKind::Geglu] {
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::glu(kind, x.leaky_trace(), u.leaky_trace()).unwrap(),
                r2,
            );
            let (fb, gb) = grads(
                layers::act(kind, x.leaky_trace()).unwrap() * u.leaky_trace(),
                r2,
            );
            close(&fa, &fb, "glu");
            close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "glu da");
            close(&ga.get(&u).as_vec(), &gb.get(&u).as_vec(), "glu du");
        }

        // softmax over the last axis
        let s4: T4<f64, Cpu> = dev.tensor_from_vec(
            (0..b * h * n * n)
                .map(|_| rng.gen_range(-3.0..3.0))
                .collect(),
            (b, h, n, n),
        );
        let r4 = &r[..b * h * n * n];
        let (fa, ga) = grads(
            <Cpu as Kernels<f64>>::softmax_last(s4.leaky_trace()).unwrap(),
            r4,
        );
        let (fb, gb) = grads(s4.leaky_trace().softmax::<Axis<3>>(), r4);
        close(&fa, &fb, "softmax");
        close(&ga.get(&s4).as_vec(), &gb.get(&s4).as_vec(), "softmax grad");
    }

    /// The f32 kernels (fast exp, lane sums, uninitialised outputs, gradients moved out of the
    /// store) against dfdx's f32 generic ops: values and gradients within 2e-5·(1 + |ref|).
    #[test]
    fn f32_kernels_match_generic_ops_within_tolerance() {
        type T32 = OwnedTape<f32, Cpu>;
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(3);
        let (b, n, h, hd) = (2, 33, 2, 8);
        let d = h * hd;
        let close32 = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(
                    (x - y).abs() <= 2e-5 * (1.0 + y.abs()),
                    "{what}[{i}]: {x} vs {y}"
                );
            }
        };
        let mk = |rng: &mut StdRng, len: usize, s: f32| -> Vec<f32> {
            (0..len).map(|_| rng.gen_range(-s..s)).collect()
        };
        let grads32 = |y: T4<f32, Cpu, T32>, r: &[f32]| {
            let out = y.retaped::<NoneTape>().as_vec();
            let rt = y.device().tensor_from_vec(r.to_vec(), *y.shape());
            (out, (y * rt).sum::<Rank0, _>().backward())
        };
        let r = mk(&mut rng, b * n * d, 1.0);
        let s4 = (b, n, h, hd);
        // scores of a few units so the softmax is far from uniform
        let q: T4<f32, Cpu> = dev.tensor_from_vec(mk(&mut rng, b * n * d, 2.0), s4);
        let k: T4<f32, Cpu> = dev.tensor_from_vec(mk(&mut rng, b * n * d, 2.0), s4);
        let v: T4<f32, Cpu> = dev.tensor_from_vec(mk(&mut rng, b * n * d, 1.0), s4);
        let fused =
            <Cpu as Kernels<f32>>::attention(q.leaky_trace(), k.leaky_trace(), v.leaky_trace())
                .unwrap()
                .reshape_like(&s4);
        let (fa, ga) = grads32(fused, &r);
        let generic = {
            let qq = q.leaky_trace().permute::<_, Axes4<0, 2, 1, 3>>();
            let kk = k.leaky_trace().permute::<_, Axes4<0, 2, 3, 1>>();
            let vv = v.leaky_trace().permute::<_, Axes4<0, 2, 1, 3>>();
            let o: T4<f32, Cpu, T32> = qq.matmul(kk).softmax::<Axis<3>>().matmul(vv);
            o.permute::<_, Axes4<0, 2, 1, 3>>().reshape_like(&s4)
        };
        let (fb, gb) = grads32(generic, &r);
        close32(&fa, &fb, "attention f32");
        for (t, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            close32(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
        }
        // gated units, with pre-activations spanning the sigmoid's tails
        let s2 = (b * n, d);
        let a: T2<f32, Cpu> = dev.tensor_from_vec(mk(&mut rng, b * n * d, 12.0), s2);
        let u: T2<f32, Cpu> = dev.tensor_from_vec(mk(&mut rng, b * n * d, 1.0), s2);
        for kind in [MlpKind::Glu, MlpKind::Swiglu] {
            let y = <Cpu as Kernels<f32>>::glu(kind, a.leaky_trace(), u.leaky_trace()).unwrap();
            let (fa, ga) = grads32(y.reshape_like(&s4), &r);
            let y = layers::act(kind, a.leaky_trace()).unwrap() * u.leaky_trace();
            let (fb, gb) = grads32(y.reshape_like(&s4), &r);
            close32(&fa, &fb, "glu f32");
            close32(&ga.get(&a).as_vec(), &gb.get(&a).as_vec(), "glu da f32");
            close32(&ga.get(&u).as_vec(), &gb.get(&u).as_vec(), "glu du f32");
        }
        // softmax over the last axis
        let x: T4<f32, Cpu> = dev.tensor_from_vec(mk(&mut rng, b * n * d, 8.0), s4);
        let (fa, ga) = grads32(
            <Cpu as Kernels<f32>>::softmax_last(x.leaky_trace()).unwrap(),
            &r,
        );
        let (fb, gb) = grads32(x.leaky_trace().softmax::<Axis<3>>(), &r);
        close32(&fa, &fb, "softmax f32");
        close32(
            &ga.get(&x).as_vec(),
            &gb.get(&x).as_vec(),
            "softmax grad f32",
        );
    }

    /// The fused optimizer passes give the same f32 bits as the dfdx-op chains they replace
    /// (same operations in the same order), over several parallel chunks and a ragged tail, with
    /// and without a clipping factor and late in training (small bias corrections); Σ x² is
    /// the f64 sum to summation-order rounding.
    #[test]
    fn optimizer_passes_match_dfdx_ops_bitwise() {
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(21);
        let n = 3 * 32_768 + 123;
        let mut mk = |lo: f32, hi: f32| -> T1<f32, Cpu> {
            dev.tensor_from_vec((0..n).map(|_| rng.gen_range(lo..hi)).collect(), (n,))
        };
        let (p, g, m, v) = (mk(-2.0, 2.0), mk(-1.0, 1.0), mk(-0.1, 0.1), mk(0.0, 0.01));
        for (k, grad_scale) in [(1, None), (3, Some(0.37)), (5000, Some(1.0e-3))] {
            let s = AdamWStep {
                lr: 3e-4,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.03,
                bias_correction1: 1.0 - 0.9f64.powi(k),
                bias_correction2: 1.0 - 0.999f64.powi(k),
                grad_scale,
            };
            let fused = <Cpu as Kernels<f32>>::adamw(&p, &g, &m, &v, &s).unwrap();
            let reference = generic_adamw(&p, &g, &m, &v, &s).unwrap();
            for (what, a, b) in [
                ("θ", &fused.0, &reference.0),
                ("m", &fused.1, &reference.1),
                ("v", &fused.2, &reference.2),
            ] {
                let (a, b) = (a.as_vec(), b.as_vec());
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "AdamW {what} differs at step {k}");
            }
            // and the step moved θ (not a no-op)
            assert!(fused
                .0
                .as_vec()
                .iter()
                .zip(p.as_vec())
                .any(|(a, b)| a != &b));
        }
        let rate = 1.0 - 0.9999;
        let fused = <Cpu as Kernels<f32>>::ema(&p, &g, rate).unwrap().as_vec();
        let reference = (p.clone() + (g.clone() - p.clone()) * rate as f32).as_vec();
        assert!(fused
            .iter()
            .zip(&reference)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        let exact: f64 = g.as_vec().iter().map(|&x| (x as f64) * (x as f64)).sum();
        let fused = <Cpu as Kernels<f32>>::sum_squares(&g).unwrap();
        assert!((fused - exact).abs() <= 1e-12 * exact, "{fused} vs {exact}");
    }
}
