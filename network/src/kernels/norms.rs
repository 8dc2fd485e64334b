//! Row normalisations over the last axis of (m, d): LayerNorm without affine parameters and
//! RMSNorm with a learnable scale, each one pass forward (keeping one statistic per row) and one
//! backward.

use super::chunk_rows;
use super::isa::{level, multiversion};
use super::reduce;
use super::storage::{input, par_written};
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{self, Res, T1, T2};
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// y = (x − mean) · r per row, r = (var + ε)^(−1/2); the backward pass reads y and r.
pub(crate) fn layer_norm<E: Elem, T: Tape<E, Cpu>>(x: T2<E, Cpu, T>) -> Res<T2<E, Cpu, T>, Cpu> {
    fused(x, |x, _| {
        let shape = *x.shape();
        let d = shape.1;
        let xv = input(&x);
        let mut rstd = vec![E::zero(); shape.0];
        let eps = E::c(layers::NORM_EPS);
        let cr = chunk_rows(d);
        let lv = level();
        let rows = xv.par_chunks(d * cr).zip(rstd.par_chunks_mut(cr));
        // SAFETY: each chunk (cr rows of d) comes with x's same rows and their cr entries of
        // rstd, and `layer_norm_rows` writes every element of every row.
        let y = unsafe {
            par_written(xv.len(), d * cr, rows, |ys, (xs, rs)| {
                layer_norm_rows(lv, ys, xs, rs, eps)
            })
        };
        let xg = x.ghost();
        Ok(Forward {
            shape,
            data: y,
            keep_output: true,
            backward: backward(move |Backward { gy, y, grads }| {
                let yv = y.expect("layer_norm keeps its output");
                let gx = grads.get_or_alloc_mut(&xg)?;
                // dx = r (g − mean g − y · mean(g ⊙ y))
                gx.par_chunks_mut(d * cr)
                    .zip(yv.par_chunks(d * cr))
                    .zip(gy.par_chunks(d * cr))
                    .zip(rstd.par_chunks(cr))
                    .for_each(|(((gx, y), gy), rs)| layer_norm_grad_rows(lv, gx, y, gy, rs));
                Ok(())
            }),
        })
    })
}

/// y = x · r · s per row, r = (mean x² + ε)^(−1/2), s a tape-free (d,) scale; the backward pass
/// reads x, s and r.
pub(crate) fn rms_norm<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    scale: T1<E, Cpu>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let scale = scale.try_contiguous()?;
    fused(x, |x, _| {
        let shape = *x.shape();
        let d = shape.1;
        assert_eq!(scale.shape().0, d, "rms_norm scale width");
        let eps = E::c(layers::NORM_EPS);
        let cr = chunk_rows(d);
        let (xv, sv) = (input(&x), input(&scale));
        let svs: &[E] = &sv;
        let mut rinv = vec![E::zero(); shape.0];
        let lv = level();
        let rows = xv.par_chunks(d * cr).zip(rinv.par_chunks_mut(cr));
        // SAFETY: as in `layer_norm`; `rms_norm_rows` writes every element of every row.
        let y = unsafe {
            par_written(xv.len(), d * cr, rows, |ys, (xs, rs)| {
                rms_norm_rows(lv, ys, xs, rs, svs, eps)
            })
        };
        let (xg, sg) = (x.ghost(), scale.ghost());
        Ok(Forward {
            shape,
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                // x̂ = x·r; ds = Σ_rows g ⊙ x̂; dx = r (g⊙s − x̂ · mean(g⊙s⊙x̂))
                let partial: Vec<Vec<E>> = gy
                    .par_chunks(d * cr)
                    .zip(xv.par_chunks(d * cr))
                    .zip(rinv.par_chunks(cr))
                    .map(|((gy, xv), rs)| {
                        let mut acc = vec![E::zero(); d];
                        rms_scale_grad(lv, &mut acc, gy, xv, rs);
                        acc
                    })
                    .collect();
                let gs = grads.get_or_alloc_mut(&sg)?;
                for p in &partial {
                    for (a, &v) in gs.iter_mut().zip(p) {
                        *a += v;
                    }
                }
                let sv: &[E] = &sv;
                let gx = grads.get_or_alloc_mut(&xg)?;
                gx.par_chunks_mut(d * cr)
                    .zip(gy.par_chunks(d * cr))
                    .zip(xv.par_chunks(d * cr))
                    .zip(rinv.par_chunks(cr))
                    .for_each(|(((gx, gy), xv), rs)| rms_norm_grad_rows(lv, gx, gy, xv, rs, sv));
                Ok(())
            }),
        })
    })
}

/// LayerNorm of each row of width `rs`-count: y = (x − mean)·r, r = (var + ε)^(−1/2) kept.
#[inline(always)]
fn layer_norm_rows_body<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], rs: &mut [E], eps: E) {
    let d = xs.len() / rs.len().max(1);
    let inv_d = E::one() / E::c(d as f64);
    for ((y, x), r) in ys.chunks_mut(d).zip(xs.chunks(d)).zip(rs) {
        let mean = reduce::sum(x) * inv_d;
        let var = reduce::centred_squares(x, mean) * inv_d;
        *r = E::one() / (var + eps).sqrt();
        for (y, &v) in y.iter_mut().zip(x) {
            y.write((v - mean) * *r);
        }
    }
}
multiversion!(
    fn layer_norm_rows<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], rs: &mut [E], eps: E)
        => layer_norm_rows_body
);

/// dx += r (g − mean g − y · mean(g ⊙ y)) per row.
#[inline(always)]
fn layer_norm_grad_rows_body<E: Elem>(gx: &mut [E], y: &[E], gy: &[E], rs: &[E]) {
    let d = y.len() / rs.len().max(1);
    let inv_d = E::one() / E::c(d as f64);
    let rows = gx.chunks_mut(d).zip(y.chunks(d)).zip(gy.chunks(d)).zip(rs);
    for (((gx, y), gy), &r) in rows {
        let mg = reduce::sum(gy) * inv_d;
        let mgy = reduce::dot(y, gy) * inv_d;
        for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(gy) {
            *gx += r * (g - mg - y * mgy);
        }
    }
}
multiversion!(
    fn layer_norm_grad_rows<E: Elem>(gx: &mut [E], y: &[E], gy: &[E], rs: &[E])
        => layer_norm_grad_rows_body
);

/// RMSNorm of each row: y = x·r·s, r = (mean x² + ε)^(−1/2) kept.
#[inline(always)]
fn rms_norm_rows_body<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], rs: &mut [E], s: &[E], eps: E) {
    let d = s.len();
    let inv_d = E::one() / E::c(d as f64);
    for ((y, x), r) in ys.chunks_mut(d).zip(xs.chunks(d)).zip(rs) {
        let ms = reduce::dot(x, x) * inv_d;
        *r = E::one() / (ms + eps).sqrt();
        for ((y, &v), &s) in y.iter_mut().zip(x).zip(s) {
            y.write(v * *r * s);
        }
    }
}
multiversion!(
    fn rms_norm_rows<E: Elem>(
        ys: &mut [MaybeUninit<E>],
        xs: &[E],
        rs: &mut [E],
        s: &[E],
        eps: E,
    )
        => rms_norm_rows_body
);

/// acc += Σ_rows g ⊙ x·r (the scale's gradient over a chunk of rows).
#[inline(always)]
fn rms_scale_grad_body<E: Elem>(acc: &mut [E], gy: &[E], xv: &[E], rs: &[E]) {
    let d = acc.len();
    for ((g, x), &r) in gy.chunks(d).zip(xv.chunks(d)).zip(rs) {
        for ((a, &g), &x) in acc.iter_mut().zip(g).zip(x) {
            *a += g * x * r;
        }
    }
}
multiversion!(
    fn rms_scale_grad<E: Elem>(acc: &mut [E], gy: &[E], xv: &[E], rs: &[E])
        => rms_scale_grad_body
);

/// dx += r (g⊙s − x̂ · mean(g⊙s⊙x̂)), x̂ = x·r, per row.
#[inline(always)]
fn rms_norm_grad_rows_body<E: Elem>(gx: &mut [E], gy: &[E], xv: &[E], rs: &[E], s: &[E]) {
    let d = s.len();
    let inv_d = E::one() / E::c(d as f64);
    let rows = gx.chunks_mut(d).zip(gy.chunks(d)).zip(xv.chunks(d)).zip(rs);
    for (((gx, g), x), &r) in rows {
        let m = reduce::dot3(g, s, x) * r * inv_d;
        for (((gx, &g), &x), &s) in gx.iter_mut().zip(g).zip(x).zip(s) {
            *gx += r * (g * s - x * r * m);
        }
    }
}
multiversion!(
    fn rms_norm_grad_rows<E: Elem>(gx: &mut [E], gy: &[E], xv: &[E], rs: &[E], s: &[E])
        => rms_norm_grad_rows_body
);

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Kernels;
    use crate::layers;
    use dfdx::prelude::*;

    #[test]
    fn norms_match_dfdx() {
        each_path(|dev, rng| {
            let (m, d) = (10, 8);
            let x = rand2(dev, rng, (m, d));
            let r = rand_vec(rng, m * d);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::layer_norm(x.leaky_trace()).unwrap(),
                &r,
            );
            let (fb, gb) = grads(layers::layer_norm(x.leaky_trace()).unwrap(), &r);
            close(&fa, &fb, "layer_norm");
            close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "layer_norm dx");

            let sv = rand2(dev, rng, (1, d)).reshape_like(&(d,));
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::rms_norm(x.leaky_trace(), sv.clone()).unwrap(),
                &r,
            );
            let (fb, gb) = grads(layers::rms_norm(x.leaky_trace(), sv.clone()).unwrap(), &r);
            close(&fa, &fb, "rms_norm");
            close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "rms_norm dx");
            close(
                &ga.get(&sv).as_vec(),
                &gb.get(&sv).as_vec(),
                "rms_norm dscale",
            );
        });
    }
}
