//! Row normalisations over the last axis of (m, d): LayerNorm without affine parameters and
//! RMSNorm with a learnable scale, each one pass forward (keeping one statistic per row) and one
//! backward; and adaLN's LayerNorm-then-modulate as one op ([`norm_modulate`]).

use super::chunk_rows;
use super::elementwise::add_into;
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

/// adaLN's normalise-then-modulate (spec §7.2, the DiT blocks' `modulate(norm(h), shift,
/// scale)`): y = LN(x)·(1 + scale) + shift, x (b·n, d), shift and scale (b, d) per sequence, as
/// one op. It gives the bits of the composition [`layer_norm`] → [`super::elementwise::modulate`]
/// (the same row statistics, x̂ rounded before it is modulated, the same sums in the same
/// order), without x̂ in memory: the composition writes x̂ and reads it back, and its backward
/// pass zero-fills x̂'s gradient, writes it, and reads it and x̂ in three more sweeps; here x̂
/// and its gradient live in one row of scratch, and the backward pass recomputes x̂ from x and
/// the kept row mean and 1/σ.
pub(crate) fn norm_modulate<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    shift: T2<E, Cpu, T>,
    scale: T2<E, Cpu, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, Cpu, T>, Cpu> {
    fused((x, shift, scale), |(x, sh, sc), _| {
        let shape = *x.shape();
        let d = shape.1;
        assert_eq!(shape.0, b * n, "norm_modulate: rows are not batch × length");
        let (xv, shv, scv) = (input(&x), input(&sh), input(&sc));
        assert!(
            shv.len() == b * d && scv.len() == b * d,
            "norm_modulate: shift and scale are not (batch, width)"
        );
        let eps = E::c(layers::NORM_EPS);
        let lv = level();
        // whole sequences per task, about chunk_rows(d) rows (one row each when n = 1)
        let g = (chunk_rows(d) / n.max(1)).max(1);
        // per task: g·n rows of x, their 2·g·n statistics, g rows of shift and scale
        let (rows, pairs, vecs) = ((g * n * d).max(1), (2 * g * n).max(1), (g * d).max(1));
        // (mean, 1/σ) per row
        let mut stats = vec![E::zero(); 2 * shape.0];
        let tasks = xv
            .par_chunks(rows)
            .zip(stats.par_chunks_mut(pairs))
            .zip(shv.par_chunks(vecs).zip(scv.par_chunks(vecs)));
        // SAFETY: each chunk (g sequences' rows) comes with x's same rows, their statistics and
        // the sequences' shift and scale, and `norm_modulate_rows` writes every element of it.
        let y = unsafe {
            par_written(xv.len(), rows, tasks, |ys, ((xs, st), (s, c))| {
                norm_modulate_rows(lv, ys, xs, st, s, c, n, d, eps)
            })
        };
        let (xg, shg, scg) = (x.ghost(), sh.ghost(), sc.ghost());
        Ok(Forward {
            shape,
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                let (mut gsh, mut gsc) = (vec![E::zero(); b * d], vec![E::zero(); b * d]);
                let gx = grads.get_or_alloc_mut(&xg)?;
                gx.par_chunks_mut(rows)
                    .zip(gy.par_chunks(rows).zip(xv.par_chunks(rows)))
                    .zip(stats.par_chunks(pairs).zip(scv.par_chunks(vecs)))
                    .zip(gsh.par_chunks_mut(vecs).zip(gsc.par_chunks_mut(vecs)))
                    .for_each(|(((gx, (gy, xs)), (st, c)), (gs, gc))| {
                        norm_modulate_grad_rows(lv, gx, gy, xs, st, c, gs, gc, n, d)
                    });
                add_into(grads.get_or_alloc_mut(&shg)?, &gsh);
                add_into(grads.get_or_alloc_mut(&scg)?, &gsc);
                Ok(())
            }),
        })
    })
}

/// y = x̂·(1 + c) + s per row, x̂ = (x − mean)·r as [`layer_norm_rows_body`] makes it; rows in
/// sequences of n, each with its (d,) shift s and scale c; (mean, r) kept per row in `st`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn norm_modulate_rows_body<E: Elem>(
    ys: &mut [MaybeUninit<E>],
    xs: &[E],
    st: &mut [E],
    s: &[E],
    c: &[E],
    n: usize,
    d: usize,
    eps: E,
) {
    let inv_d = E::one() / E::c(d as f64);
    let rows = ys.chunks_mut(d).zip(xs.chunks(d)).zip(st.chunks_mut(2));
    for (i, ((y, x), st)) in rows.enumerate() {
        let q = i / n * d;
        let (s0, c0) = (&s[q..q + d], &c[q..q + d]);
        let mean = reduce::sum(x) * inv_d;
        let var = reduce::centred_squares(x, mean) * inv_d;
        let r = E::one() / (var + eps).sqrt();
        (st[0], st[1]) = (mean, r);
        for (((y, &v), &s), &c) in y.iter_mut().zip(x).zip(s0).zip(c0) {
            let xh = (v - mean) * r;
            y.write(xh * (E::one() + c) + s);
        }
    }
}
multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn norm_modulate_rows<E: Elem>(
        ys: &mut [MaybeUninit<E>],
        xs: &[E],
        st: &mut [E],
        s: &[E],
        c: &[E],
        n: usize,
        d: usize,
        eps: E,
    )
        => norm_modulate_rows_body
);

/// The backward pass of [`norm_modulate_rows_body`] over the same rows: with g = dY ⊙ (1 + c)
/// (x̂'s gradient, as the composition forms it on a zeroed buffer), Σ_rows dY and Σ_rows dY ⊙ x̂
/// are added to the sequence's `gs` and `gc` in row order, and dx += r (g − mean g − x̂ ·
/// mean(g ⊙ x̂)) as [`layer_norm_grad_rows_body`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn norm_modulate_grad_rows_body<E: Elem>(
    gx: &mut [E],
    gy: &[E],
    xs: &[E],
    st: &[E],
    c: &[E],
    gs: &mut [E],
    gc: &mut [E],
    n: usize,
    d: usize,
) {
    let inv_d = E::one() / E::c(d as f64);
    let (mut xh, mut g) = (vec![E::zero(); d], vec![E::zero(); d]);
    let rows = gx.chunks_mut(d).zip(gy.chunks(d)).zip(xs.chunks(d));
    for (i, ((gx, gy), x)) in rows.enumerate() {
        let q = i / n * d;
        let (c0, gs0, gc0) = (&c[q..q + d], &mut gs[q..q + d], &mut gc[q..q + d]);
        let (mean, r) = (st[2 * i], st[2 * i + 1]);
        let cols = xh.iter_mut().zip(g.iter_mut()).zip(x.iter().zip(gy));
        for ((((xh, g), (&v, &dy)), (s, t)), &c) in cols.zip(gs0.iter_mut().zip(gc0)).zip(c0) {
            *xh = (v - mean) * r;
            *g = E::zero() + dy * (E::one() + c);
            *s += dy;
            *t += dy * *xh;
        }
        let mg = reduce::sum(&g) * inv_d;
        let mgy = reduce::dot(&xh, &g) * inv_d;
        for ((gx, &y), &g) in gx.iter_mut().zip(&xh).zip(&g) {
            *gx += r * (g - mg - y * mgy);
        }
    }
}
multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn norm_modulate_grad_rows<E: Elem>(
        gx: &mut [E],
        gy: &[E],
        xs: &[E],
        st: &[E],
        c: &[E],
        gs: &mut [E],
        gc: &mut [E],
        n: usize,
        d: usize,
    )
        => norm_modulate_grad_rows_body
);

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

    /// The one-op normalise-then-modulate gives the composition's bits — output and the
    /// gradients of x, shift and scale — in f32 and f64, at every level, with sequences grouped
    /// into tasks whole and the last group short (d large enough that a task holds fewer rows
    /// than the batch), and one row per sequence (the row-restricted last block's form).
    #[test]
    fn norm_modulate_is_layer_norm_then_modulate_bit_for_bit() {
        fn check<E: crate::Elem>(
            dev: &Cpu,
            rng: &mut rand::rngs::StdRng,
            (b, n, d): (usize, usize, usize),
        ) where
            Cpu: Kernels<E>,
        {
            let cast = |v: Vec<f64>| v.into_iter().map(E::c).collect::<Vec<E>>();
            let x = tensor(dev, cast(rand_vec(rng, b * n * d)), (b * n, d));
            let sh = tensor(dev, cast(rand_vec(rng, b * d)), (b, d));
            let sc = tensor(dev, cast(rand_vec(rng, b * d)), (b, d));
            let r = cast(rand_vec(rng, b * n * d));
            let (fa, ga) = grads(
                <Cpu as Kernels<E>>::norm_modulate(
                    x.leaky_trace(),
                    sh.leaky_trace(),
                    sc.leaky_trace(),
                    b,
                    n,
                )
                .unwrap(),
                &r,
            );
            let (fb, gb) = grads(
                <Cpu as Kernels<E>>::modulate(
                    <Cpu as Kernels<E>>::layer_norm(x.leaky_trace()).unwrap(),
                    sh.leaky_trace(),
                    sc.leaky_trace(),
                    b,
                    n,
                )
                .unwrap(),
                &r,
            );
            assert!(fa == fb, "output ({b}, {n}, {d})");
            for (t, name) in [(&x, "x"), (&sh, "shift"), (&sc, "scale")] {
                assert!(
                    ga.get(t).as_vec() == gb.get(t).as_vec(),
                    "d{name} ({b}, {n}, {d})"
                );
            }
        }
        each_path(|dev, rng| {
            // chunk_rows(2048) = 8 rows: groups of 2 sequences of 3, the last one alone;
            // chunk_rows(4096) = 4: groups of 4 one-row sequences, the last of 3
            for shape in [(2, 5, 8), (3, 3, 2048), (7, 1, 4096)] {
                check::<f32>(dev, rng, shape);
                check::<f64>(dev, rng, shape);
            }
        });
    }

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
