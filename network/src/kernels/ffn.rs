//! The gated FFN `(act(x W1) ⊙ x W3) W2` (GLU, SwiGLU; spec §7.2) as one op. It runs the same
//! products and gate as the composition [`super::matmul`] → [`super::elementwise`]'s gate →
//! [`super::matmul`], and gives the same values and gradients; what it saves is the three
//! hidden-width gradient buffers (of a, u and the gate's output, (m, hidden) each) that the
//! composition takes from dfdx's gradient store, which zero-fills every new buffer serially on
//! the thread running the tape (the other cores wait) before the backward passes accumulate
//! into it. Here the gate's gradient dG = dY W2ᵀ is written fresh, and the gate's backward pass
//! turns it into dA in place and u into dU in place: no zeroing, no extra buffer.

use super::elementwise::{gate, gate_grads_in_place};
use super::isa;
use super::matmul::product;
use super::storage::{alloc_filled, input, par_written};
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{Res, T2};
use crate::precision;
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;

/// `(act(x W1) ⊙ x W3) W2` with act = σ (`swish` false, GLU) or a·σ(a) (`swish` true,
/// SwiGLU): x (m, k), W1 and W3 (k, hidden), W2 (hidden, n), tape-free weights.
pub(crate) fn ffn<E: Elem, T: Tape<E, Cpu>>(
    swish: bool,
    x: T2<E, Cpu, T>,
    w1: T2<E, Cpu>,
    w3: T2<E, Cpu>,
    w2: T2<E, Cpu>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let (w1, w3, w2) = (
        w1.try_contiguous()?,
        w3.try_contiguous()?,
        w2.try_contiguous()?,
    );
    fused(x, |x, _| {
        let (m, k) = *x.shape();
        let (hidden, n) = (w1.shape().1, w2.shape().1);
        assert!(
            *w1.shape() == (k, hidden) && *w3.shape() == (k, hidden) && w2.shape().0 == hidden,
            "ffn weight shapes"
        );
        let (xv, w1v, w3v, w2v) = (input(&x), input(&w1), input(&w3), input(&w2));
        let (prec, lv) = (precision::precision(), isa::level());
        // x W1, x W3 (m, hidden), then G = act(a) ⊙ u and Y = G W2 (m, n)
        // SAFETY (the three products): the operands hold exactly the (rows, cols) row-major
        // elements their strides describe — x (m, k), W1 and W3 (k, hidden), G (m, hidden), W2
        // (hidden, n) — each output buffer has room for its (rows, cols), gemm (accumulate
        // off) writes every output element without reading any, and no output aliases an input.
        let xw = |w: &[E]| unsafe {
            alloc_filled(m * hidden, |o| {
                product(
                    prec,
                    lv,
                    (m, hidden, k),
                    o,
                    (hidden, 1),
                    false,
                    xv.as_ptr(),
                    (k, 1),
                    w.as_ptr(),
                    (hidden, 1),
                )
            })
        };
        let (a, mut u) = (xw(&w1v), xw(&w3v));
        let cr = super::chunk_rows(1);
        // SAFETY: each chunk comes with a's and u's same-length slices, and `gate` writes every
        // element of it.
        let g = unsafe {
            par_written(
                m * hidden,
                cr,
                a.par_chunks(cr).zip(u.par_chunks(cr)),
                |g, (a, u)| gate(lv, swish, g, a, u),
            )
        };
        // SAFETY: as above.
        let y = unsafe {
            alloc_filled(m * n, |o| {
                product(
                    prec,
                    lv,
                    (m, n, hidden),
                    o,
                    (n, 1),
                    false,
                    g.as_ptr(),
                    (hidden, 1),
                    w2v.as_ptr(),
                    (n, 1),
                )
            })
        };
        let (xg, w1g, w3g, w2g) = (x.ghost(), w1.ghost(), w3.ghost(), w2.ghost());
        Ok(Forward {
            shape: (m, n),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                // dG = dY W2ᵀ, written fresh; dW2 += Gᵀ dY
                // SAFETY: gy (m, n), W2 (hidden, n) read as W2ᵀ through swapped strides, dG a
                // fresh (m, hidden) buffer gemm writes in full without reading.
                let mut dg = unsafe {
                    alloc_filled(m * hidden, |o| {
                        product(
                            prec,
                            lv,
                            (m, hidden, n),
                            o,
                            (hidden, 1),
                            false,
                            gy.as_ptr(),
                            (n, 1),
                            w2v.as_ptr(),
                            (1, n),
                        )
                    })
                };
                let gw2 = grads.get_or_alloc_mut(&w2g)?;
                // SAFETY: gw2 is W2's (hidden, n) gradient buffer (a separate allocation), G
                // (m, hidden) read as Gᵀ, gy (m, n).
                unsafe {
                    product(
                        prec,
                        lv,
                        (hidden, n, m),
                        gw2.as_mut_ptr(),
                        (n, 1),
                        true,
                        g.as_ptr(),
                        (1, hidden),
                        gy.as_ptr(),
                        (n, 1),
                    )
                };
                drop((g, gy));
                // the gate's backward pass: dG becomes dA, u becomes dU
                dg.par_chunks_mut(cr)
                    .zip(u.par_chunks_mut(cr))
                    .zip(a.par_chunks(cr))
                    .for_each(|((ga, gu), a)| gate_grads_in_place(lv, swish, ga, gu, a));
                let (da, du) = (dg, u);
                // dW3 += xᵀ dU, dW1 += xᵀ dA, then dX += dU W3ᵀ + dA W1ᵀ (the composition's
                // order: W3's product was recorded last, so its backward pass ran first)
                for (gw, d) in [(&w3g, &du), (&w1g, &da)] {
                    let gw = grads.get_or_alloc_mut(gw)?;
                    // SAFETY: gw is this weight's (k, hidden) gradient buffer (a separate
                    // allocation), x (m, k) read as xᵀ, d (m, hidden).
                    unsafe {
                        product(
                            prec,
                            lv,
                            (k, hidden, m),
                            gw.as_mut_ptr(),
                            (hidden, 1),
                            true,
                            xv.as_ptr(),
                            (1, k),
                            d.as_ptr(),
                            (hidden, 1),
                        )
                    };
                }
                let gx = grads.get_or_alloc_mut(&xg)?;
                for (w, d) in [(&w3v, &du), (&w1v, &da)] {
                    // SAFETY: gx is x's (m, k) gradient buffer (a separate allocation), d
                    // (m, hidden), W (k, hidden) read as Wᵀ through swapped strides.
                    unsafe {
                        product(
                            prec,
                            lv,
                            (m, k, hidden),
                            gx.as_mut_ptr(),
                            (k, 1),
                            true,
                            d.as_ptr(),
                            (hidden, 1),
                            w.as_ptr(),
                            (1, hidden),
                        )
                    };
                }
                Ok(())
            }),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{composed_ffn, Kernels};
    use crate::layers::T2;
    use crate::precision::{with_precision, Precision};
    use crate::MlpKind;
    use dfdx::prelude::*;

    /// The one-op FFN against its three-step composition: in f64 to 1e-12, and in f32 at both
    /// precisions equal value for value (the same products and gate, the gradients written
    /// fresh where the composition adds them to zeros) — output and the gradients of x and the
    /// three weights, GLU and SwiGLU, a hidden width off the vector lanes.
    #[test]
    fn ffn_is_its_composition() {
        each_path(|dev, rng| {
            let (m, k, hidden) = (37, 12, 29);
            for kind in [MlpKind::Glu, MlpKind::Swiglu] {
                let x = rand2(dev, rng, (m, k));
                let (w1, w3, w2) = (
                    rand2(dev, rng, (k, hidden)),
                    rand2(dev, rng, (k, hidden)),
                    rand2(dev, rng, (hidden, k)),
                );
                let r = rand_vec(rng, m * k);
                let w = || (w1.clone(), w3.clone(), w2.clone());
                let (fa, ga) = grads(
                    <Cpu as Kernels<f64>>::ffn(kind, x.leaky_trace(), w()).unwrap(),
                    &r,
                );
                let (fb, gb) = grads(composed_ffn(kind, x.leaky_trace(), w()).unwrap(), &r);
                close(&fa, &fb, "ffn");
                for (t, name) in [(&x, "dx"), (&w1, "dw1"), (&w3, "dw3"), (&w2, "dw2")] {
                    close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
                }
                let f32s = |t: &T2<f64, Cpu>| -> T2<f32, Cpu> {
                    let v = t.as_vec().iter().map(|&v| v as f32).collect();
                    dev.tensor_from_vec(v, *t.shape())
                };
                let (x, w1, w3, w2) = (f32s(&x), f32s(&w1), f32s(&w3), f32s(&w2));
                let r: Vec<f32> = r.iter().map(|&v| v as f32).collect();
                for p in Precision::ALL {
                    with_precision(p, || {
                        let w = || (w1.clone(), w3.clone(), w2.clone());
                        let (fa, ga) = grads(
                            <Cpu as Kernels<f32>>::ffn(kind, x.leaky_trace(), w()).unwrap(),
                            &r,
                        );
                        let (fb, gb) = grads(composed_ffn(kind, x.leaky_trace(), w()).unwrap(), &r);
                        assert_eq!(fa, fb, "f32 ffn {p:?}");
                        for (t, name) in [(&x, "dx"), (&w1, "dw1"), (&w3, "dw3"), (&w2, "dw2")] {
                            assert_eq!(ga.get(t).as_vec(), gb.get(t).as_vec(), "f32 {name} {p:?}");
                        }
                    });
                }
            }
        });
    }
}
