//! `x @ w` for an activation x (m, k) and a tape-free weight w (k, n), multi-threaded through
//! gemm 0.19; the backward pass accumulates dX += dY Wᵀ and dW += Xᵀ dY straight into the
//! gradient buffers (gemm with `read_dst`).

use super::attention::mm_par;
use super::storage::{alloc_filled, input};
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{Res, T2};
use crate::Elem;
use dfdx::prelude::*;

pub(crate) fn matmul<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    w: T2<E, Cpu>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let w = w.try_contiguous()?;
    fused(x, |x, _| {
        let ((m, k), n) = (*x.shape(), w.shape().1);
        assert_eq!(k, w.shape().0, "matmul inner dimensions");
        let (xv, wv) = (input(&x), input(&w));
        // SAFETY: xv and wv hold exactly (m, k) and (k, n) row-major elements, the output
        // buffer has room for (m, n); gemm (read_dst = false) writes every output element
        // without reading any, and the output aliases neither input.
        let y = unsafe {
            alloc_filled(m * n, |y| {
                mm_par(
                    (m, n, k),
                    y,
                    (n, 1),
                    false,
                    xv.as_ptr(),
                    (k, 1),
                    wv.as_ptr(),
                    (n, 1),
                )
            })
        };
        let (xg, wg) = (x.ghost(), w.ghost());
        Ok(Forward {
            shape: (m, n),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                let gx = grads.get_or_alloc_mut(&xg)?;
                // SAFETY: gx is x's (m, k) gradient buffer, gy (m, n), wv (k, n) read as Wᵀ
                // through swapped strides; the destination is a separate allocation.
                unsafe {
                    mm_par(
                        (m, k, n),
                        gx.as_mut_ptr(),
                        (k, 1),
                        true,
                        gy.as_ptr(),
                        (n, 1),
                        wv.as_ptr(),
                        (1, n),
                    )
                };
                let gw = grads.get_or_alloc_mut(&wg)?;
                // SAFETY: gw is w's (k, n) gradient buffer, xv (m, k) read as Xᵀ, gy (m, n).
                unsafe {
                    mm_par(
                        (k, n, m),
                        gw.as_mut_ptr(),
                        (n, 1),
                        true,
                        xv.as_ptr(),
                        (1, k),
                        gy.as_ptr(),
                        (n, 1),
                    )
                };
                Ok(())
            }),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Kernels;
    use dfdx::prelude::*;

    #[test]
    fn matmul_matches_dfdx() {
        each_path(|dev, rng| {
            let (m, d) = (10, 8);
            let x = rand2(dev, rng, (m, d));
            let w = rand2(dev, rng, (d, 3));
            let r = rand_vec(rng, m * 3);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::matmul(x.leaky_trace(), w.clone()).unwrap(),
                &r,
            );
            let (fb, gb) = grads(x.leaky_trace().matmul(w.clone()), &r);
            close(&fa, &fb, "matmul");
            close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "matmul dx");
            close(&ga.get(&w).as_vec(), &gb.get(&w).as_vec(), "matmul dw");
        });
    }
}
