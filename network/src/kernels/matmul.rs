//! `x @ w [+ bias]` for an activation x (m, k), a tape-free weight w (k, n) and bias (n),
//! multi-threaded through gemm 0.19 (the bias rows are the product's initial C, so the bias
//! costs no sweep of its own, and its gradient is dY's column sums); the backward pass
//! accumulates dX += dY Wᵀ and dW += Xᵀ dY straight into the gradient buffers (gemm with
//! `read_dst`), dW, whose reduction runs over the batch's tokens, as two half-sums side by side
//! ([`product`]). At [`Precision::Bf16`] (f32 models) all three
//! products take bf16-rounded inputs with f32 accumulation instead ([`super::bf16`]); the
//! precision and the instruction-set level are read once, in the forward pass, and the backward
//! pass uses the same.

use super::bf16::{gemm_bf16, Mat};
use super::conv::column_sums;
use super::disjoint::{In, Out};
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

/// Products whose reduction is at least this long and 4× the longer side of C are cut in two
/// along it ([`product`]).
const SPLIT_K_MIN: usize = 2048;

/// Whether [`product`] cuts this product's reduction in two: a weight gradient dW = Xᵀ dY
/// (C (in, out), k the batch's tokens). gemm's threads split only C, and on these shapes two
/// half-reductions side by side, each on half the threads, run faster than the whole on all:
/// C 256 × 768, k = 4096 on two cores, 176 → 188 GFLOP/s (AVX2 kernels) and 274 → 324
/// (AVX-512). The cut depends on the shape alone, never the thread count, so every sum — and
/// every bit of a run — is the same on any number of threads.
fn split_k((m, n, k): (usize, usize, usize)) -> bool {
    m > 0 && n > 0 && k >= SPLIT_K_MIN && k >= 4 * m.max(n)
}

/// Products with at least this many rows of C, and at least twice as many as their longer other
/// side, are cut in two along C's rows ([`product`]).
const SPLIT_M_MIN: usize = 2048;

/// Whether [`product`] cuts C's rows in two: a dense layer's forward product or its dX = dY Wᵀ
/// (C (tokens, features), the reduction over the features). gemm's threads share one product's
/// packed operands and meet at barriers; two half-products side by side, each on half the
/// threads, pack their own and never wait for each other: held to AVX2, `throughput --preset
/// cpu-small` (median of 6 alternations) train 7 520 → 7 746 tokens/s, forward 21 425 → 22 705
/// (AVX2 kernels; dX alone, C 4096 × 256 with k = 768: 191 → 210 GFLOP/s). Every element of C is
/// the same sum either way (gemm blocks the reduction by k alone), so no bit depends on the cut.
fn split_m((m, n, k): (usize, usize, usize)) -> bool {
    n > 0 && k > 0 && m >= SPLIT_M_MIN && m >= 2 * n.max(k)
}

/// C = [C +] A·B (strided, as [`mm_par`]) at precision `prec`: f32 gemm, or bf16 inputs with
/// f32 accumulation when `prec` is bf16 and E is f32. A weight-gradient-shaped gemm product
/// ([`split_k`]) runs as two half-reductions side by side, the first into C, the second into a
/// fresh buffer then added to C (the bf16 gemm's tasks already tile such shapes well: cut in
/// two, its cpu-small bf16 train step measured no faster); a tall product ([`split_m`]) as two
/// halves of C's rows side by side.
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
    if bf16::<E>(prec) {
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
        return unsafe { gemm_bf16(level, dims, c.cast::<f32>(), c_st, accumulate, a, b) };
    }
    let threads = rayon::current_num_threads();
    if split_m(dims) {
        let ((m, n, k), h, half) = (dims, dims.0 / 2, (threads / 2).max(1));
        let (c1, a1, b) = (Out(c), In(a), In(b));
        // SAFETY: row h < m of C and of A lies inside the matrices the caller vouches for.
        let (c2, a2) = unsafe { (Out(c.add(h * c_st.0)), In(a.add(h * a_st.0))) };
        rayon::join(
            // SAFETY: the caller's C and A restricted to their first h rows, and B; the other
            // task writes only C's other rows (distinct (i, j) address distinct elements, the
            // caller's) and reads A and B (shared reads).
            || unsafe {
                let (c, a, b) = (c1.get(), a1.get(), b.get());
                mm_par((h, n, k), c, c_st, accumulate, a, a_st, b, b_st, half)
            },
            // SAFETY: as the first task, for rows h..m of C and A.
            || unsafe {
                let (c, a, b) = (c2.get(), a2.get(), b.get());
                mm_par((m - h, n, k), c, c_st, accumulate, a, a_st, b, b_st, half)
            },
        );
        return;
    }
    if !split_k(dims) {
        // SAFETY: the caller's.
        return unsafe { mm_par(dims, c, c_st, accumulate, a, a_st, b, b_st, threads) };
    }
    let ((m, n, k), h, half) = (dims, dims.2 / 2, (threads / 2).max(1));
    let (c, a1, b1) = (Out(c), In(a), In(b));
    // SAFETY: the second half starts h < k along the reduction: A's column h and B's row h,
    // inside the matrices the caller vouches for.
    let (a2, b2) = unsafe { (In(a.add(h * a_st.1)), In(b.add(h * b_st.0))) };
    let ((), rest) = rayon::join(
        // SAFETY: the caller's C, A's first h columns and B's first h rows; the other task
        // reads A and B too (shared reads) and writes only its own buffer.
        || unsafe {
            let (c, a, b) = (c.get(), a1.get(), b1.get());
            mm_par((m, n, h), c, c_st, accumulate, a, a_st, b, b_st, half)
        },
        // SAFETY: a fresh row-major (m, n) buffer that the product (no accumulation) writes in
        // full without reading; the operands' remaining k - h columns / rows.
        || unsafe {
            let (a, b) = (a2.get(), b2.get());
            alloc_filled(m * n, |t| {
                mm_par((m, n, k - h), t, (n, 1), false, a, a_st, b, b_st, half)
            })
        },
    );
    let rows = super::chunk_rows(n);
    rest.par_chunks(rows * n)
        .enumerate()
        .for_each(|(i, block)| {
            for (r, row) in block.chunks(n).enumerate() {
                for (j, &x) in row.iter().enumerate() {
                    // SAFETY: (i·rows + r, j) is inside C (m, n), distinct (i, j) address distinct
                    // elements (the caller's), and each task adds to its own rows only.
                    unsafe { *c.get().add((i * rows + r) * c_st.0 + j * c_st.1) += x };
                }
            }
        });
}

/// Whether products at `prec` run the bf16 gemm: bf16 asked for an f32 model.
fn bf16<E: Elem>(prec: Precision) -> bool {
    prec == Precision::Bf16 && std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>()
}

/// C (m×n) = [C +] A (m×k) · B (k×n) with (row, column) element strides, on `threads` of
/// rayon's threads.
///
/// # Safety
/// Every pointer valid for its whole strided matrix (`c` for writes, and with `accumulate` for
/// reads of initialised elements), distinct (i, j) of `c` addressing distinct elements, `c` not
/// overlapping the inputs nor accessed by anything else during the call (gemm splits `c` among
/// its own threads).
#[allow(clippy::too_many_arguments)]
unsafe fn mm_par<E: Elem>(
    (m, n, k): (usize, usize, usize),
    c: *mut E,
    (c_rs, c_cs): (usize, usize),
    accumulate: bool,
    a: *const E,
    (a_rs, a_cs): (usize, usize),
    b: *const E,
    (b_rs, b_cs): (usize, usize),
    threads: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_cs as isize,
        c_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        if accumulate { E::one() } else { E::zero() },
        E::one(),
        false,
        false,
        false,
        gemm::Parallelism::Rayon(threads),
    )
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

    /// Random A (m·k), B (k·n) and initial C (m·n) elements for the split tests.
    fn operands(seed: u64, (m, n, k): (usize, usize, usize)) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        use super::super::test_util::rand32;
        use rand::{rngs::StdRng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(seed);
        (
            rand32(&mut rng, m * k, 1.0),
            rand32(&mut rng, k * n, 1.0),
            rand32(&mut rng, m * n, 1.0),
        )
    }

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// A weight-gradient-shaped product is cut in two along its reduction: the result is the
    /// f64 sum to f32 rounding (accumulating into a column-major C, so the second half's
    /// addition follows C's strides), the same bits on one thread and on three, and the
    /// product just short of the cut (k one less than [`super::SPLIT_K_MIN`]) is not cut.
    #[test]
    fn split_reductions_sum_both_halves_on_any_thread_count() {
        use super::super::isa;
        use super::{product, split_k, SPLIT_K_MIN};
        use crate::precision::Precision;
        let (m, n, k) = (7, 12, SPLIT_K_MIN + 3);
        assert!(split_k((m, n, k)) && !split_k((m, n, k - 4)));
        assert!(!split_k((m, 0, k)) && !split_k((m, k / 3, k)));
        // A (m, k) stored as Aᵀ (a column of A per row, as X for dW), B (k, n) row-major
        let (a, b, c0) = operands(5, (m, n, k));
        let run = |threads: usize| {
            let mut c = c0.clone();
            // SAFETY: A is (m, k) at strides (1, m) in m·k elements, B (k, n) at (n, 1), C
            // (m, n) at (1, m), a separate buffer of m·n initialised elements.
            pool(threads).install(|| unsafe {
                product(
                    Precision::F32,
                    isa::level(),
                    (m, n, k),
                    c.as_mut_ptr(),
                    (1, m),
                    true,
                    a.as_ptr(),
                    (1, m),
                    b.as_ptr(),
                    (n, 1),
                )
            });
            c
        };
        let one = run(1);
        assert_eq!(one, run(3), "thread count changed bits");
        for i in 0..m {
            for j in 0..n {
                let (mut e, mut abs) = (f64::from(c0[j * m + i]), f64::from(c0[j * m + i].abs()));
                for l in 0..k {
                    let t = f64::from(a[l * m + i]) * f64::from(b[l * n + j]);
                    e += t;
                    abs += t.abs();
                }
                let g = f64::from(one[j * m + i]);
                assert!(
                    (g - e).abs() <= abs * k as f64 * 6e-8,
                    "c[{i},{j}]: {g} vs {e}"
                );
            }
        }
    }

    /// A tall product (a dense layer's forward or dX) is cut in two along C's rows: the same
    /// bits as gemm's uncut product, on one thread and on three, into a row-major and a
    /// column-major C, accumulating and not, with a reduction long enough for gemm to block it
    /// (k > 1024); m one short of the cut, or C too wide, is not cut.
    #[test]
    fn split_rows_change_no_bit() {
        use super::super::isa;
        use super::{mm_par, product, split_m, SPLIT_M_MIN};
        use crate::precision::Precision;
        let (m, n, k) = (SPLIT_M_MIN + 67, 13, 1030);
        assert!(split_m((m, n, k)) && !split_m((SPLIT_M_MIN - 1, n, k)));
        assert!(!split_m((m, m / 2 + 1, k)) && !split_m((m, n, m / 2 + 1)));
        assert!(!split_m((m, 0, k)) && !split_m((m, n, 0)));
        // A (m, k) row-major as X, B (k, n) read as Wᵀ of a row-major (n, k) W, as dX's
        let (a, b, c0) = operands(6, (m, n, k));
        for (c_st, accumulate) in [((n, 1), true), ((1, m), true), ((n, 1), false)] {
            let run = |threads: usize, cut: bool| {
                let mut c = c0.clone();
                // SAFETY: A is (m, k) at strides (k, 1) in m·k elements, B (k, n) at (1, k) in
                // k·n, C (m, n) at c_st in a separate buffer of m·n initialised elements.
                pool(threads).install(|| unsafe {
                    let (cp, ap, bp) = (c.as_mut_ptr(), a.as_ptr(), b.as_ptr());
                    if cut {
                        let dims = (m, n, k);
                        let lvl = isa::level();
                        let pr = Precision::F32;
                        product(pr, lvl, dims, cp, c_st, accumulate, ap, (k, 1), bp, (1, k))
                    } else {
                        mm_par(
                            (m, n, k),
                            cp,
                            c_st,
                            accumulate,
                            ap,
                            (k, 1),
                            bp,
                            (1, k),
                            threads,
                        )
                    }
                });
                c
            };
            let whole = run(1, false);
            assert_eq!(whole, run(1, true), "cut on one thread, C strides {c_st:?}");
            assert_eq!(
                whole,
                run(3, true),
                "cut on three threads, C strides {c_st:?}"
            );
            // and it is the product: elements of both halves against f64
            for (i, j) in [(0, 0), (m / 2 - 1, n - 1), (m / 2, 3), (m - 1, n - 2)] {
                let at = i * c_st.0 + j * c_st.1;
                let (mut e, mut abs) = if accumulate {
                    (f64::from(c0[at]), f64::from(c0[at].abs()))
                } else {
                    (0.0, 0.0)
                };
                for l in 0..k {
                    let t = f64::from(a[i * k + l]) * f64::from(b[j * k + l]);
                    e += t;
                    abs += t.abs();
                }
                let g = f64::from(whole[at]);
                assert!(
                    (g - e).abs() <= abs * k as f64 * 6e-8,
                    "c[{i},{j}]: {g} vs {e}"
                );
            }
        }
    }
}
