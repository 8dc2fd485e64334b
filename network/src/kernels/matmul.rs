//! `x @ w [+ bias]` for an activation x (m, k), a tape-free weight w (k, n) and bias (n),
//! multi-threaded through gemm 0.19 (the bias rows are the product's initial C, so the bias
//! costs no sweep of its own, and its gradient is dY's column sums); the backward pass accumulates dX += dY Wᵀ and dW += Xᵀ dY straight into the
//! gradient buffers (gemm with `read_dst`). At [`Precision::Bf16`] (f32 models) all three
//! products take bf16-rounded inputs with f32 accumulation instead ([`super::bf16`]); the
//! precision and the instruction-set level are read once, in the forward pass, and the backward
//! pass uses the same.

use super::attention::mm_par;
use super::bf16::{gemm_bf16, Mat};
use super::conv::column_sums;
use super::isa::{self, Level};
use super::storage::{alloc_filled, input, par_written};
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{Res, T1, T2};
use crate::precision::{self, Precision};
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;

pub(crate) fn matmul<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    w: T2<E, Cpu>,
    bias: Option<T1<E, Cpu>>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let w = w.try_contiguous()?;
    let bias = bias.map(|t| t.try_contiguous()).transpose()?;
    fused(x, |x, _| {
        let ((m, k), n) = (*x.shape(), w.shape().1);
        assert_eq!(k, w.shape().0, "matmul inner dimensions");
        let (xv, wv) = (input(&x), input(&w));
        let bv = bias.as_ref().map(input);
        let (prec, level) = (precision::precision(), isa::level());
        let y = match bv.as_deref() {
            Some(b) => {
                assert_eq!(b.len(), n, "matmul: bias width");
                let cr = super::chunk_rows(n);
                // SAFETY: every chunk is whole rows of n (n ≥ 1 here: m·n > 0 or no chunk),
                // each written in full from the bias.
                let mut y = unsafe {
                    par_written(
                        m * n,
                        cr * n,
                        (0..m.div_ceil(cr)).into_par_iter(),
                        |ys, _| {
                            for row in ys.chunks_mut(n) {
                                row.iter_mut().zip(b).for_each(|(y, &b)| _ = y.write(b));
                            }
                        },
                    )
                };
                // SAFETY: as below, with C (m, n) initialised to the bias rows and added to
                // (read_dst = true).
                unsafe {
                    product(
                        prec,
                        level,
                        (m, n, k),
                        y.as_mut_ptr(),
                        (n, 1),
                        true,
                        xv.as_ptr(),
                        (k, 1),
                        wv.as_ptr(),
                        (n, 1),
                    )
                };
                y
            }
            // SAFETY: xv and wv hold exactly (m, k) and (k, n) row-major elements, the output
            // buffer has room for (m, n); gemm (read_dst = false) writes every output element
            // without reading any, and the output aliases neither input.
            None => unsafe {
                alloc_filled(m * n, |y| {
                    product(
                        prec,
                        level,
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
            },
        };
        let (xg, wg, bg) = (x.ghost(), w.ghost(), bias.as_ref().map(|t| t.ghost()));
        Ok(Forward {
            shape: (m, n),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                if let Some(bg) = &bg {
                    let gb = grads.get_or_alloc_mut(bg)?;
                    for (a, s) in gb.iter_mut().zip(column_sums(&gy, n)) {
                        *a += s;
                    }
                }
                let gx = grads.get_or_alloc_mut(&xg)?;
                // SAFETY: gx is x's (m, k) gradient buffer, gy (m, n), wv (k, n) read as Wᵀ
                // through swapped strides; the destination is a separate allocation.
                unsafe {
                    product(
                        prec,
                        level,
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
                    product(
                        prec,
                        level,
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

/// C = [C +] A·B (strided, as [`mm_par`]) at precision `prec`: f32 gemm, or bf16 inputs with
/// f32 accumulation when `prec` is bf16 and E is f32.
///
/// # Safety
/// As for [`mm_par`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn product<E: Elem>(
    prec: Precision,
    level: Level,
    dims: (usize, usize, usize),
    c: *mut E,
    c_st: (usize, usize),
    accumulate: bool,
    a: *const E,
    a_st: (usize, usize),
    b: *const E,
    b_st: (usize, usize),
) {
    if prec == Precision::Bf16 && std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() {
        let (a, b) = (
            Mat {
                ptr: a.cast::<f32>(),
                rs: a_st.0,
                cs: a_st.1,
            },
            Mat {
                ptr: b.cast::<f32>(),
                rs: b_st.0,
                cs: b_st.1,
            },
        );
        // SAFETY: E is f32 (checked above), so the pointers address f32 elements; validity,
        // disjointness and exclusivity are the caller's, as for `mm_par`.
        unsafe { gemm_bf16(level, dims, c.cast::<f32>(), c_st, accumulate, a, b) }
    } else {
        // SAFETY: the caller's.
        unsafe { mm_par(dims, c, c_st, accumulate, a, a_st, b, b_st) }
    }
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

    /// At bf16 the op's forward product and both backward products are those of the
    /// bf16-rounded operands (f64 products of the rounded values, up to f32 accumulation
    /// error), and differ from the f32 op's (so the bf16 path ran); f64 models ignore it.
    #[test]
    fn bf16_matmul_rounds_every_product_input() {
        use super::super::bf16::{from_bf16, to_bf16};
        use super::super::test_util::{grads, rand32};
        use crate::precision::{with_precision, Precision};
        use rand::{rngs::StdRng, SeedableRng};
        let dev = Cpu::default();
        let mut rng = StdRng::seed_from_u64(2);
        let (m, k, n) = (29, 40, 35);
        let (xs, ws, r) = (
            rand32(&mut rng, m * k, 1.0),
            rand32(&mut rng, k * n, 1.0),
            rand32(&mut rng, m * n, 1.0),
        );
        let x = dev.tensor_from_vec(xs.clone(), (m, k));
        let w = dev.tensor_from_vec(ws.clone(), (k, n));
        let run = |p| {
            with_precision(p, || {
                let y = <Cpu as Kernels<f32>>::matmul(x.leaky_trace(), w.clone()).unwrap();
                let (f, g) = grads(y, &r);
                (f, g.get(&x).as_vec(), g.get(&w).as_vec())
            })
        };
        let (f16, gx16, gw16) = run(Precision::Bf16);
        let (f32v, gx32, gw32) = run(Precision::F32);
        assert_ne!(f16, f32v);
        assert_ne!(gx16, gx32);
        assert_ne!(gw16, gw32);
        let q = |v: f32| f64::from(from_bf16(to_bf16(v)));
        // C (p×q) = A (p×s) B (s×q) of rounded operands given by element functions
        let check = |got: &[f32],
                     (p, qn, s): (usize, usize, usize),
                     a: &dyn Fn(usize, usize) -> f32,
                     b: &dyn Fn(usize, usize) -> f32,
                     what: &str| {
            for i in 0..p {
                for j in 0..qn {
                    let (mut e, mut abs) = (0.0f64, 0.0f64);
                    for l in 0..s {
                        let t = q(a(i, l)) * q(b(l, j));
                        e += t;
                        abs += t.abs();
                    }
                    let g = f64::from(got[i * qn + j]);
                    assert!(
                        (g - e).abs() <= abs * s as f64 * 6e-8 + 1e-30,
                        "{what}[{i},{j}]: {g} vs {e}"
                    );
                }
            }
        };
        check(
            &f16,
            (m, n, k),
            &|i, l| xs[i * k + l],
            &|l, j| ws[l * n + j],
            "y",
        );
        check(
            &gx16,
            (m, k, n),
            &|i, l| r[i * n + l],
            &|l, j| ws[j * n + l],
            "dx",
        );
        check(
            &gw16,
            (k, n, m),
            &|i, l| xs[l * k + i],
            &|l, j| r[l * n + j],
            "dw",
        );
        // f64 ignores the setting
        let x64 = dev.tensor_from_vec(xs.iter().map(|&v| f64::from(v)).collect(), (m, k));
        let w64 = dev.tensor_from_vec(ws.iter().map(|&v| f64::from(v)).collect(), (k, n));
        let y64 = |p| {
            with_precision(p, || {
                <Cpu as Kernels<f64>>::matmul(x64.clone(), w64.clone())
                    .unwrap()
                    .as_vec()
            })
        };
        assert_eq!(y64(Precision::Bf16), y64(Precision::F32));
    }
}
