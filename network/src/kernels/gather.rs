//! Row gather `y[i] = x[rows[i]]`, x (m, d) → y (r, d), and its backward pass, the scatter-add
//! `gx[rows[i]] += gy[i]`; rows may repeat (embedding and table lookups, a per-sequence vector
//! carried to each of its rows). dfdx's gather runs forward and backward on one thread with
//! index arithmetic per element; here the forward copies rows in parallel and its output is
//! registered, so the next kernel reads it in place, and the backward groups the sources by
//! destination row and adds them in parallel over (destination row, column block) pieces, each
//! piece's sources in increasing i — the order of the serial loop, so the sums are the same bits.

use super::elementwise::add_slice;
use super::isa::level;
use super::storage::input;
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{Res, T2};
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;

/// Columns per backward piece: wide rows are split so that a destination row many sources add
/// into (the mask id's embedding row when most positions are masked) is still shared by the
/// threads.
const COLS: usize = 64;

/// `x`'s rows `rows` (each < x's row count) → (rows.len(), d).
pub(crate) fn gather_rows<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    rows: &[usize],
) -> Res<T2<E, Cpu, T>, Cpu> {
    let rows = rows.to_vec();
    fused(x, move |x, _| {
        let (m, d) = *x.shape();
        assert!(
            rows.iter().all(|&r| r < m),
            "gather: row out of range for {m} rows"
        );
        let xv = input(&x);
        let xs: &[E] = &xv;
        let r = rows.len();
        let mut y: Vec<E> = Vec::with_capacity(r * d);
        if d > 0 {
            let per = super::chunk_rows(d);
            y.spare_capacity_mut()[..r * d]
                .par_chunks_mut(per * d)
                .zip(rows.par_chunks(per))
                .for_each(|(ys, ids)| {
                    for (yr, &i) in ys.chunks_mut(d).zip(ids) {
                        for (o, &v) in yr.iter_mut().zip(&xs[i * d..(i + 1) * d]) {
                            o.write(v);
                        }
                    }
                });
        }
        // SAFETY: the chunks above tile the first r·d spare slots (r rows of d, each written in
        // full from a row of x), so all r·d elements are initialised.
        unsafe { y.set_len(r * d) };
        drop(xv);
        let xg = x.ghost();
        Ok(Forward {
            shape: (r, d),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                let gx = grads.get_or_alloc_mut(&xg)?;
                scatter_add(gx, &gy, &rows, d);
                Ok(())
            }),
        })
    })
}

/// `gx[rows[i]] += gy[i]` over rows of width d, each destination's sources added in increasing i.
fn scatter_add<E: Elem>(gx: &mut [E], gy: &[E], rows: &[usize], d: usize) {
    if d == 0 || rows.is_empty() {
        return;
    }
    let m = gx.len() / d;
    // the sources of each destination row, in increasing i (a counting sort of `rows`)
    let mut start = vec![0usize; m + 1];
    for &r in rows {
        start[r + 1] += 1;
    }
    for j in 0..m {
        start[j + 1] += start[j];
    }
    let mut next = start.clone();
    let mut src = vec![0usize; rows.len()];
    for (i, &r) in rows.iter().enumerate() {
        src[next[r]] = i;
        next[r] += 1;
    }
    let lv = level();
    let cols = d.min(COLS);
    gx.par_chunks_mut(d).enumerate().for_each(|(j, g)| {
        let from = &src[start[j]..start[j + 1]];
        if from.is_empty() {
            return;
        }
        g.par_chunks_mut(cols).enumerate().for_each(|(c, piece)| {
            let c0 = c * cols;
            for &i in from {
                add_slice(lv, piece, &gy[i * d + c0..i * d + c0 + piece.len()]);
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Kernels;
    use dfdx::prelude::*;
    use rand::Rng;

    /// The CPU gather against dfdx's (the trait's default): the same values and the same
    /// gradient bits, with repeated rows, rows never gathered, a destination most sources hit,
    /// and widths below and above a backward piece.
    #[test]
    fn gather_rows_matches_dfdx_bit_for_bit() {
        each_path(|dev, rng| {
            for (m, d, r) in [(7, 5, 30), (28, 150, 400), (3, 64, 1), (9, 130, 9)] {
                let x = rand2(dev, rng, (m, d));
                let rows: Vec<usize> = (0..r)
                    .map(|i| {
                        if i % 3 == 0 {
                            m - 1
                        } else {
                            rng.gen_range(0..m - 1)
                        }
                    })
                    .collect();
                let w = rand_vec(rng, r * d);
                let (fa, ga) = grads(
                    <Cpu as Kernels<f64>>::gather_rows(x.leaky_trace(), &rows).unwrap(),
                    &w,
                );
                let ids = dev.tensor_from_vec(rows.clone(), (r,));
                let (fb, gb) = grads(x.leaky_trace().gather(ids), &w);
                assert_eq!(fa, fb, "gathered rows");
                let (a, b) = (ga.get(&x).as_vec(), gb.get(&x).as_vec());
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "gradient, m {m} d {d} r {r}");
            }
        });
    }
}
