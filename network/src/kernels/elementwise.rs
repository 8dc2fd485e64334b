//! The element-wise fused ops: the GLU/SwiGLU gate, softmax over the last axis, adaLN
//! modulation, the gated residual, the per-sequence shift, the column concatenation and RoPE, each one sweep forward and one backward (dfdx
//! composes each from 4–10 separate ops), plus the per-sequence broadcasting helpers they share.

use super::attention::softmax_rows;
use super::chunk_rows;
use super::disjoint::Out;
use super::isa::{level, multiversion};
use super::reduce;
use super::storage::{host, input, par_filled, par_written};
use super::tape::{backward, fused, Backward, Forward};
use crate::layers::{self, Res, Rope, T2, T4};
use crate::{Elem, MlpKind};
use dfdx::prelude::*;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `act(a) ⊙ u` with act = σ (GLU) or a·σ(a) (SwiGLU); GeGLU goes through dfdx's ops. σ is
/// recomputed in the backward pass rather than stored (one exp per element is cheaper than
/// holding another (m, hidden) buffer per block).
pub(crate) fn glu<E: Elem, T: Tape<E, Cpu>>(
    kind: MlpKind,
    a: T2<E, Cpu, T>,
    u: T2<E, Cpu, T>,
) -> Res<T2<E, Cpu, T>, Cpu>
where
    Cpu: Device<E>,
{
    match kind {
        MlpKind::Glu => sigmoid_gate(false, a, u),
        MlpKind::Swiglu => sigmoid_gate(true, a, u),
        MlpKind::Geglu => layers::act(kind, a)?.try_mul(u),
    }
}

/// [`glu`] for σ (`swish` false) and a·σ(a) (`swish` true).
fn sigmoid_gate<E: Elem, T: Tape<E, Cpu>>(
    swish: bool,
    a: T2<E, Cpu, T>,
    u: T2<E, Cpu, T>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    fused((a, u), |(a, u), _| {
        let (av, uv) = (input(&a), input(&u));
        let (lv, cr) = (level(), chunk_rows(1));
        // SAFETY: each chunk comes with a's and u's same-length slices, and `gate` writes every
        // element of it.
        let y = unsafe {
            par_written(
                av.len(),
                cr,
                av.par_chunks(cr).zip(uv.par_chunks(cr)),
                |y, (a, u)| gate(lv, swish, y, a, u),
            )
        };
        let (ag, ug) = (a.ghost(), u.ghost());
        Ok(Forward {
            shape: *a.shape(),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                let gu_ptr = grads.get_or_alloc_mut(&ug)?.as_mut_ptr();
                let ga = grads.get_or_alloc_mut(&ag)?;
                if ga.as_mut_ptr() != gu_ptr {
                    // SAFETY: gu_ptr is u's gradient buffer in the store, of u's (= a's) length,
                    // initialised; fetching a's entry inserted into the map but moves no
                    // buffer, and a's buffer is a different allocation (checked), so this
                    // slice and `ga` do not overlap; nothing else touches either until the
                    // sweep below ends.
                    let gu = unsafe { std::slice::from_raw_parts_mut(gu_ptr, ga.len()) };
                    // both gradients in one sweep, σ computed once per element
                    ga.par_chunks_mut(cr)
                        .zip(gu.par_chunks_mut(cr))
                        .zip(gy.par_chunks(cr))
                        .zip(av.par_chunks(cr).zip(uv.par_chunks(cr)))
                        .for_each(|(((ga, gu), gy), (av, uv))| {
                            gate_grads(lv, swish, ga, gu, gy, av, uv)
                        });
                    return Ok(());
                }
                // a and u are one tensor: its gradient takes the two terms one after the other
                let gu = grads.get_or_alloc_mut(&ug)?;
                gu.par_chunks_mut(cr)
                    .zip(gy.par_chunks(cr))
                    .zip(av.par_chunks(cr))
                    .for_each(|((gu, gy), av)| gate_grad_u(lv, swish, gu, gy, av));
                let ga = grads.get_or_alloc_mut(&ag)?;
                ga.par_chunks_mut(cr)
                    .zip(gy.par_chunks(cr))
                    .zip(av.par_chunks(cr))
                    .zip(uv.par_chunks(cr))
                    .for_each(|(((ga, gy), av), uv)| gate_grad_a(lv, swish, ga, gy, av, uv));
                Ok(())
            }),
        })
    })
}

/// σ(x) with the vectorisable exp.
#[inline(always)]
fn sigmoid<E: Elem>(x: E) -> E {
    E::one() / (E::one() + (-x).fast_exp())
}

/// act(x) and act'(x), σ computed once: (σ, σ(1 − σ)) for GLU, (x·σ, σ(1 + x(1 − σ))) for
/// SwiGLU. Every gate pass below takes its values from here, so they agree bit for bit.
#[inline(always)]
pub(super) fn act_grad<E: Elem>(swish: bool, x: E) -> (E, E) {
    let s = sigmoid(x);
    if swish {
        (x * s, s * (E::one() + x * (E::one() - s)))
    } else {
        (s, s * (E::one() - s))
    }
}

/// y = act(a)·u, element by element.
#[inline(always)]
fn gate_body<E: Elem>(swish: bool, y: &mut [MaybeUninit<E>], a: &[E], u: &[E]) {
    for ((y, &x), &u) in y.iter_mut().zip(a).zip(u) {
        y.write(act_grad(swish, x).0 * u);
    }
}
multiversion!(
    pub(super) fn gate<E: Elem>(swish: bool, y: &mut [MaybeUninit<E>], a: &[E], u: &[E])
        => gate_body
);

/// gu += gy·act(a).
#[inline(always)]
fn gate_grad_u_body<E: Elem>(swish: bool, gu: &mut [E], gy: &[E], a: &[E]) {
    for ((gu, &g), &x) in gu.iter_mut().zip(gy).zip(a) {
        *gu += g * act_grad(swish, x).0;
    }
}
multiversion!(
    fn gate_grad_u<E: Elem>(swish: bool, gu: &mut [E], gy: &[E], a: &[E]) => gate_grad_u_body
);

/// ga += gy·u·act'(a).
#[inline(always)]
fn gate_grad_a_body<E: Elem>(swish: bool, ga: &mut [E], gy: &[E], a: &[E], u: &[E]) {
    for (((ga, &g), &x), &u) in ga.iter_mut().zip(gy).zip(a).zip(u) {
        *ga += g * u * act_grad(swish, x).1;
    }
}
multiversion!(
    fn gate_grad_a<E: Elem>(swish: bool, ga: &mut [E], gy: &[E], a: &[E], u: &[E])
        => gate_grad_a_body
);

/// [`gate_grad_u_body`] and [`gate_grad_a_body`] in one sweep (the same operations per
/// element, so the same bits).
#[inline(always)]
fn gate_grads_body<E: Elem>(swish: bool, ga: &mut [E], gu: &mut [E], gy: &[E], a: &[E], u: &[E]) {
    for ((((ga, gu), &g), &x), &u) in ga.iter_mut().zip(gu).zip(gy).zip(a).zip(u) {
        let (act, d) = act_grad(swish, x);
        *gu += g * act;
        *ga += g * u * d;
    }
}
multiversion!(
    fn gate_grads<E: Elem>(swish: bool, ga: &mut [E], gu: &mut [E], gy: &[E], a: &[E], u: &[E])
        => gate_grads_body
);

/// The gate's backward pass in place, for [`super::ffn`]: `ga` holds dG on entry and
/// dA = dG·u·act'(a) on exit, `gu` holds u on entry and dU = dG·act(a) on exit — the operations
/// of [`gate_grads_body`] on zeroed gradients.
#[inline(always)]
fn gate_grads_in_place_body<E: Elem>(swish: bool, ga: &mut [E], gu: &mut [E], a: &[E]) {
    for ((ga, gu), &x) in ga.iter_mut().zip(gu).zip(a) {
        let (g, u) = (*ga, *gu);
        let (act, d) = act_grad(swish, x);
        *gu = g * act;
        *ga = g * u * d;
    }
}
multiversion!(
    pub(super) fn gate_grads_in_place<E: Elem>(swish: bool, ga: &mut [E], gu: &mut [E], a: &[E])
        => gate_grads_in_place_body
);

/// Softmax over the last axis (rows of length d); the backward pass reads the output.
pub(crate) fn softmax_last<E: Elem, T: Tape<E, Cpu>>(x: T4<E, Cpu, T>) -> Res<T4<E, Cpu, T>, Cpu> {
    fused(x, |x, _| {
        let shape = *x.shape();
        let d = shape.3;
        let cr = chunk_rows(d);
        let mut y = host(&x);
        let lv = level();
        y.par_chunks_mut(d * cr)
            .for_each(|rows| softmax_rows(lv, rows, d, None));
        let xg = x.ghost();
        Ok(Forward {
            shape,
            data: y,
            keep_output: true,
            backward: backward(move |Backward { gy, y, grads }| {
                let yv = y.expect("softmax keeps its output");
                let gx = grads.get_or_alloc_mut(&xg)?;
                gx.par_chunks_mut(d * cr)
                    .zip(yv.par_chunks(d * cr))
                    .zip(gy.par_chunks(d * cr))
                    .for_each(|((gx, y), gy)| softmax_grad(lv, gx, y, gy, d));
                Ok(())
            }),
        })
    })
}

/// gx += y ⊙ (gy − ⟨y, gy⟩) per d-long row.
#[inline(always)]
fn softmax_grad_body<E: Elem>(gx: &mut [E], y: &[E], gy: &[E], d: usize) {
    for ((gx, y), gy) in gx.chunks_mut(d).zip(y.chunks(d)).zip(gy.chunks(d)) {
        let dot = reduce::dot(y, gy);
        for ((gx, &y), &g) in gx.iter_mut().zip(y).zip(gy) {
            *gx += y * (g - dot);
        }
    }
}
multiversion!(
    fn softmax_grad<E: Elem>(gx: &mut [E], y: &[E], gy: &[E], d: usize) => softmax_grad_body
);

/// adaLN modulation `x·(1 + scale) + shift`, x (b·n, d), shift and scale (b, d) per sequence.
pub(crate) fn modulate<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    shift: T2<E, Cpu, T>,
    scale: T2<E, Cpu, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, Cpu, T>, Cpu> {
    fused((x, shift, scale), |(x, sh, sc), _| {
        let shape = *x.shape();
        let d = shape.1;
        assert_eq!(shape.0, b * n, "modulate: rows are not batch × length");
        let (xv, shv, scv) = (input(&x), input(&sh), input(&sc));
        let (shs, scs): (&[E], &[E]) = (&shv, &scv);
        let lv = level();
        // SAFETY: each chunk (one sequence's n·d) comes with x's same rows, and
        // `modulate_rows` writes every element of it.
        let y = unsafe {
            par_written(
                xv.len(),
                n * d,
                xv.par_chunks(n * d).enumerate(),
                |ys, (bi, xs)| {
                    let (s0, c0) = (&shs[bi * d..(bi + 1) * d], &scs[bi * d..(bi + 1) * d]);
                    modulate_rows(lv, ys, xs, s0, c0);
                },
            )
        };
        let (xg, shg, scg) = (x.ghost(), sh.ghost(), sc.ghost());
        Ok(Forward {
            shape,
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                // per-sequence sums for shift and scale, then the input gradient
                let gsh = seq_column_sums(&gy, None, (n, d));
                let gsc = seq_column_sums(&gy, Some(&xv), (n, d));
                add_into(grads.get_or_alloc_mut(&shg)?, &gsh);
                add_into(grads.get_or_alloc_mut(&scg)?, &gsc);
                let gx = grads.get_or_alloc_mut(&xg)?;
                seq_broadcast(gx, &gy, &scv, (n, d), true);
                Ok(())
            }),
        })
    })
}

/// y = x·(1 + c) + s per row, c and s one sequence's (d,) scale and shift.
#[inline(always)]
fn modulate_rows_body<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], s0: &[E], c0: &[E]) {
    let d = s0.len();
    for (y, x) in ys.chunks_mut(d).zip(xs.chunks(d)) {
        for (((y, &x), &s), &c) in y.iter_mut().zip(x).zip(s0).zip(c0) {
            y.write(x * (E::one() + c) + s);
        }
    }
}
multiversion!(
    fn modulate_rows<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], s0: &[E], c0: &[E])
        => modulate_rows_body
);

/// `h + gate ⊙ y`, h and y (b·n, d), gate (b, d) per sequence.
pub(crate) fn gated_residual<E: Elem, T: Tape<E, Cpu>>(
    h: T2<E, Cpu, T>,
    y: T2<E, Cpu, T>,
    gate: T2<E, Cpu, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, Cpu, T>, Cpu> {
    fused((h, y, gate), |(h, y, g), _| {
        let shape = *h.shape();
        let d = shape.1;
        assert_eq!(
            shape.0,
            b * n,
            "gated residual: rows are not batch × length"
        );
        let (hv, yv, gv) = (input(&h), input(&y), input(&g));
        assert!(
            yv.len() == hv.len() && gv.len() * n == hv.len(),
            "gated residual shapes"
        );
        let lv = level();
        let rows = hv
            .par_chunks((n * d).max(1))
            .zip(yv.par_chunks((n * d).max(1)));
        // SAFETY: each chunk (one sequence's n·d) comes with h's and y's same rows and the
        // sequence's gate, and `gated_rows` writes every element of it.
        let z = unsafe {
            par_written(
                hv.len(),
                n * d,
                rows.zip(gv.par_chunks(d.max(1))),
                |zs, ((hs, ys), g)| gated_rows(lv, zs, hs, ys, g),
            )
        };
        drop(hv);
        let (hg, yg, gg) = (h.ghost(), y.ghost(), g.ghost());
        Ok(Forward {
            shape,
            data: z,
            keep_output: false,
            backward: backward(move |Backward { gy: gz, grads, .. }| {
                // one sweep of dZ, y and the two gradients per sequence instead of three
                // passes (the gate's column sums, dh += dZ, dy += dZ ⊙ gate): per element the
                // same operations in the same order, so the same bits. Raw pointers because h
                // and y may be one tensor (then both updates go to one buffer, in that order);
                // `as_mut_ptr` makes no reference to the elements, so the first pointer stays
                // valid while the store inserts the second entry (that moves Vec headers inside
                // the map, never their heap buffers).
                let mut ggate = vec![E::zero(); gv.len()];
                let ph = Out(grads.get_or_alloc_mut(&hg)?.as_mut_ptr());
                let py = Out(grads.get_or_alloc_mut(&yg)?.as_mut_ptr());
                let same = ph.get() == py.get();
                let lv = level();
                assert!(gz.len() == yv.len() && ggate.len() * n == gz.len());
                let (nd, d1) = ((n * d).max(1), d.max(1)); // empty rows: no chunks
                ggate
                    .par_chunks_mut(d1)
                    .zip(gz.par_chunks(nd).zip(yv.par_chunks(nd)))
                    .zip(gv.par_chunks(d1))
                    .enumerate()
                    .for_each(|(s, ((gg, (gz, y)), g))| {
                        // SAFETY: h's and y's gradients have h's shape (b·n, d), initialised,
                        // allocated while this closure runs (the store is not touched
                        // meanwhile) and accessed by nothing else; each task takes sequence
                        // s's n·d elements of each, disjoint across tasks, and one slice only
                        // when the two buffers are one.
                        let (gh, gy) = unsafe {
                            let r = s * n * d;
                            let gh = std::slice::from_raw_parts_mut(ph.get().add(r), n * d);
                            let gy = (!same)
                                .then(|| std::slice::from_raw_parts_mut(py.get().add(r), n * d));
                            (gh, gy)
                        };
                        gated_residual_grad_rows(lv, gh, gy, gg, gz, y, g);
                    });
                add_into(grads.get_or_alloc_mut(&gg)?, &ggate);
                Ok(())
            }),
        })
    })
}

/// [`gated_residual`]'s backward pass on one sequence's rows: the gate's gradient
/// gg += Σ_rows dZ ⊙ y (in row order), dh += dZ and dy += dZ ⊙ gate (into `gh` itself when
/// `gy` is `None`: h and y one tensor), row by row.
#[inline(always)]
fn gated_residual_grad_rows_body<E: Elem>(
    gh: &mut [E],
    mut gy: Option<&mut [E]>,
    gg: &mut [E],
    gz: &[E],
    y: &[E],
    g: &[E],
) {
    let d = g.len();
    for (i, (zr, yr)) in gz.chunks(d).zip(y.chunks(d)).enumerate() {
        for ((o, &z), &w) in gg.iter_mut().zip(zr).zip(yr) {
            *o += z * w;
        }
        let hr = &mut gh[i * d..(i + 1) * d];
        hr.iter_mut().zip(zr).for_each(|(h, &z)| *h += z);
        let yr = match gy.as_deref_mut() {
            Some(gy) => &mut gy[i * d..(i + 1) * d],
            None => hr,
        };
        yr.iter_mut()
            .zip(zr)
            .zip(g)
            .for_each(|((o, &z), &c)| *o += z * c);
    }
}
multiversion!(
    fn gated_residual_grad_rows<E: Elem>(
        gh: &mut [E],
        gy: Option<&mut [E]>,
        gg: &mut [E],
        gz: &[E],
        y: &[E],
        g: &[E],
    ) => gated_residual_grad_rows_body
);

/// `x + s`, s (b, d) per sequence added to its n rows of x (b·n, d) (the U-Net's conditioning
/// on a block): dfdx's broadcast add, but one parallel sweep with its output registered (read in
/// place by the GroupNorm after it); the gradient of s is the per-sequence column sums.
pub(crate) fn shift<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    s: T2<E, Cpu, T>,
    b: usize,
    n: usize,
) -> Res<T2<E, Cpu, T>, Cpu> {
    fused((x, s), |(x, s), _| {
        let shape = *x.shape();
        let d = shape.1;
        assert!(
            shape.0 == b * n && *s.shape() == (b, d),
            "shift: x is not batch × length rows or s not one row per sequence"
        );
        let (xv, sv) = (input(&x), input(&s));
        let lv = level();
        // SAFETY: each chunk (one sequence's n·d) comes with x's same-length rows, and
        // `shift_rows` writes every element of it.
        let y = unsafe {
            par_written(
                xv.len(),
                n * d,
                xv.par_chunks((n * d).max(1)).zip(sv.par_chunks(d.max(1))),
                |ys, (xs, s0)| shift_rows(lv, ys, xs, s0),
            )
        };
        let (xg, sg) = (x.ghost(), s.ghost());
        Ok(Forward {
            shape,
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                let gs = seq_column_sums(&gy, None, (n, d));
                add_into(grads.get_or_alloc_mut(&sg)?, &gs);
                add_into(grads.get_or_alloc_mut(&xg)?, &gy);
                Ok(())
            }),
        })
    })
}

/// y = x + s per row, s one sequence's (d,) shift.
#[inline(always)]
fn shift_rows_body<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], s0: &[E]) {
    let d = s0.len();
    for (y, x) in ys.chunks_mut(d).zip(xs.chunks(d)) {
        for ((y, &x), &s) in y.iter_mut().zip(x).zip(s0) {
            y.write(x + s);
        }
    }
}
multiversion!(
    fn shift_rows<E: Elem>(ys: &mut [MaybeUninit<E>], xs: &[E], s0: &[E]) => shift_rows_body
);

/// `[x | y]`, x (m, dx) and y (m, dy) → (m, dx + dy): dfdx's concatenation, but parallel, its
/// output registered (read in place by the kernels after it), each gradient added straight from
/// its columns of the output's.
pub(crate) fn concat_cols<E: Elem, T: Tape<E, Cpu>>(
    x: T2<E, Cpu, T>,
    y: T2<E, Cpu, T>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    let ((m, dx), (my, dy)) = (*x.shape(), *y.shape());
    assert_eq!(m, my, "concat_cols: row counts differ");
    if dx == 0 || dy == 0 {
        // nothing to interleave (and no chunk size to split by)
        return (x, y).try_concat_along(Axis::<1>);
    }
    fused((x, y), |(x, y), _| {
        let d = dx + dy;
        let (xv, yv) = (input(&x), input(&y));
        let cr = chunk_rows(d);
        // SAFETY: each chunk of whole rows of d comes with the same rows of x (dx) and y (dy),
        // and every row is written in full: its first dx and last dy elements.
        let z = unsafe {
            par_written(
                m * d,
                cr * d,
                xv.par_chunks(cr * dx).zip(yv.par_chunks(cr * dy)),
                |zs, (xs, ys)| {
                    for ((z, x), y) in zs.chunks_mut(d).zip(xs.chunks(dx)).zip(ys.chunks(dy)) {
                        let (zx, zy) = z.split_at_mut(dx);
                        zx.iter_mut().zip(x).for_each(|(z, &v)| _ = z.write(v));
                        zy.iter_mut().zip(y).for_each(|(z, &v)| _ = z.write(v));
                    }
                },
            )
        };
        let (xg, yg) = (x.ghost(), y.ghost());
        Ok(Forward {
            shape: (m, d),
            data: z,
            keep_output: false,
            backward: backward(move |Backward { gy: gz, grads, .. }| {
                let lv = level();
                for (g, (lo, w)) in [(&xg, (0, dx)), (&yg, (dx, dy))] {
                    grads
                        .get_or_alloc_mut(g)?
                        .par_chunks_mut(cr * w)
                        .zip(gz.par_chunks(cr * d))
                        .for_each(|(gs, zs)| {
                            for (g, z) in gs.chunks_mut(w).zip(zs.chunks(d)) {
                                add_slice(lv, g, &z[lo..lo + w]);
                            }
                        });
                }
                Ok(())
            }),
        })
    })
}

/// `h + y`, h and y of one shape (the pre-norm residual): dfdx's add, but parallel, its output
/// registered (read in place by the next kernel), and each gradient one parallel sweep.
pub(crate) fn residual<E: Elem, T: Tape<E, Cpu>>(
    h: T2<E, Cpu, T>,
    y: T2<E, Cpu, T>,
) -> Res<T2<E, Cpu, T>, Cpu> {
    assert_eq!(h.shape(), y.shape(), "residual shapes");
    fused((h, y), |(h, y), _| {
        let (hv, yv) = (input(&h), input(&y));
        let (lv, cr) = (level(), chunk_rows(1));
        // SAFETY: each chunk comes with h's and y's same-length slices, and `sum_slice` writes
        // every element of it.
        let z = unsafe {
            par_written(
                hv.len(),
                cr,
                hv.par_chunks(cr).zip(yv.par_chunks(cr)),
                |z, (h, y)| sum_slice(lv, z, h, y),
            )
        };
        let (hg, yg) = (h.ghost(), y.ghost());
        Ok(Forward {
            shape: *h.shape(),
            data: z,
            keep_output: false,
            backward: backward(move |Backward { gy: gz, grads, .. }| {
                add_into(grads.get_or_alloc_mut(&hg)?, &gz);
                add_into(grads.get_or_alloc_mut(&yg)?, &gz);
                Ok(())
            }),
        })
    })
}

#[inline(always)]
fn sum_slice_body<E: Elem>(z: &mut [MaybeUninit<E>], h: &[E], y: &[E]) {
    for ((z, &h), &y) in z.iter_mut().zip(h).zip(y) {
        z.write(h + y);
    }
}
multiversion!(
    fn sum_slice<E: Elem>(z: &mut [MaybeUninit<E>], h: &[E], y: &[E]) => sum_slice_body
);

/// z = h + g ⊙ y per row, g one sequence's (d,) gate.
#[inline(always)]
fn gated_rows_body<E: Elem>(zs: &mut [MaybeUninit<E>], hs: &[E], ys: &[E], g: &[E]) {
    let d = g.len();
    for ((z, h), y) in zs.chunks_mut(d).zip(hs.chunks(d)).zip(ys.chunks(d)) {
        for (((z, &h), &y), &g) in z.iter_mut().zip(h).zip(y).zip(g) {
            z.write(h + g * y);
        }
    }
}
multiversion!(
    fn gated_rows<E: Elem>(zs: &mut [MaybeUninit<E>], hs: &[E], ys: &[E], g: &[E])
        => gated_rows_body
);

/// RoPE on x (b·n, h·hd) → (b, n, h, hd), times `scale`; the backward pass is the inverse
/// rotation (the rotation is orthogonal), scaled, added straight into x's gradient.
pub(crate) fn rope<E: Elem, T: Tape<E, Cpu>>(
    rope: &Rope<E, Cpu>,
    x: T2<E, Cpu, T>,
    b: usize,
    n: usize,
    h: usize,
    scale: f64,
) -> Res<T4<E, Cpu, T>, Cpu>
where
    Cpu: Device<E>,
{
    let tables = (rope.cos_host.clone(), rope.sin_host.clone());
    rotate_pairs(tables, x, (b, n, h), scale)
}

/// [`rope`] with the (position, pair) cos and sin tables.
fn rotate_pairs<E: Elem, T: Tape<E, Cpu>>(
    (cos, sin): (Vec<E>, Vec<E>),
    x: T2<E, Cpu, T>,
    (b, n, h): (usize, usize, usize),
    scale: f64,
) -> Res<T4<E, Cpu, T>, Cpu> {
    fused(x, |x, _| {
        let d = x.shape().1;
        let hd = d / h;
        let half = hd / 2;
        let s = E::c(scale);
        let lv = level();
        let rotate = move |dst: &mut [E], src: &[E], first_row: usize, inverse: bool, acc: bool| {
            let rows = Rows {
                d,
                n,
                hd,
                half,
                first_row,
            };
            rotate_rows(lv, dst, src, &cos, &sin, rows, s, inverse, acc)
        };
        let cr = chunk_rows(d);
        let xv = input(&x);
        let y = par_filled(
            xv.len(),
            d * cr,
            xv.par_chunks(d * cr).enumerate(),
            |dst, (k, src)| rotate(dst, src, k * cr, false, false),
        );
        let xg = x.ghost();
        Ok(Forward {
            shape: (b, n, h, hd),
            data: y,
            keep_output: false,
            backward: backward(move |Backward { gy, grads, .. }| {
                let gx = grads.get_or_alloc_mut(&xg)?;
                gx.par_chunks_mut(d * cr)
                    .zip(gy.par_chunks(d * cr))
                    .enumerate()
                    .for_each(|(k, (dst, src))| rotate(dst, src, k * cr, true, true));
                Ok(())
            }),
        })
    })
}

/// Where a chunk of RoPE rows lies: row width d, sequence length n, head width hd (hd/2 =
/// `half` pairs), and the chunk's first row (its position is `row % n`).
#[derive(Clone, Copy)]
struct Rows {
    d: usize,
    n: usize,
    hd: usize,
    half: usize,
    first_row: usize,
}

/// One chunk of RoPE rows: each row one position of one sequence, h heads of hd/2 rotated
/// pairs, src → dst (both (rows, d)), times s, inverse rotation when `inverse`, accumulating
/// into dst when `acc`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rotate_rows_body<E: Elem>(
    dst: &mut [E],
    src: &[E],
    cos: &[E],
    sin: &[E],
    rows: Rows,
    s: E,
    inverse: bool,
    acc: bool,
) {
    // one loop per (inverse, acc), pairs as exact 2-chunks: each vectorises (interleaved loads)
    #[inline(always)]
    fn each<E: Elem>(
        (dst, src, cos, sin): (&mut [E], &[E], &[E], &[E]),
        Rows {
            d,
            n,
            hd,
            half,
            first_row,
        }: Rows,
        pair: impl Fn(&mut [E], E, E, E, E),
    ) {
        for (r, (drow, srow)) in dst.chunks_mut(d).zip(src.chunks(d)).enumerate() {
            let pos = (first_row + r) % n;
            let (c0, s0) = (
                &cos[pos * half..(pos + 1) * half],
                &sin[pos * half..(pos + 1) * half],
            );
            for (dh, sh) in drow.chunks_exact_mut(hd).zip(srow.chunks_exact(hd)) {
                let pairs = dh.chunks_exact_mut(2).zip(sh.chunks_exact(2));
                for ((dp, sp), (&c, &sn)) in pairs.zip(c0.iter().zip(s0)) {
                    pair(dp, sp[0], sp[1], c, sn);
                }
            }
        }
    }
    let io = (dst, src, cos, sin);
    match (inverse, acc) {
        (false, false) => each(io, rows, |dp: &mut [E], a: E, bb: E, c: E, sn: E| {
            dp[0] = s * (a * c - bb * sn);
            dp[1] = s * (bb * c + a * sn);
        }),
        (true, false) => each(io, rows, |dp: &mut [E], a: E, bb: E, c: E, sn: E| {
            dp[0] = s * (a * c - bb * -sn);
            dp[1] = s * (bb * c + a * -sn);
        }),
        (false, true) => each(io, rows, |dp: &mut [E], a: E, bb: E, c: E, sn: E| {
            dp[0] += s * (a * c - bb * sn);
            dp[1] += s * (bb * c + a * sn);
        }),
        (true, true) => each(io, rows, |dp: &mut [E], a: E, bb: E, c: E, sn: E| {
            dp[0] += s * (a * c - bb * -sn);
            dp[1] += s * (bb * c + a * -sn);
        }),
    }
}
multiversion!(
    #[allow(clippy::too_many_arguments)]
    fn rotate_rows<E: Elem>(
        dst: &mut [E],
        src: &[E],
        cos: &[E],
        sin: &[E],
        rows: Rows,
        s: E,
        inverse: bool,
        acc: bool,
    ) => rotate_rows_body
);

pub(super) fn add_into<E: Elem>(dst: &mut [E], src: &[E]) {
    let lv = level();
    dst.par_chunks_mut(16_384)
        .zip(src.par_chunks(16_384))
        .for_each(|(d, s)| add_slice(lv, d, s));
}

#[inline(always)]
fn add_slice_body<E: Elem>(dst: &mut [E], src: &[E]) {
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
}
multiversion!(pub(super) fn add_slice<E: Elem>(dst: &mut [E], src: &[E]) => add_slice_body);

/// `dst += src ⊙ (1 + vec)` (`one_plus`, the adaLN scale's input gradient) or `dst += src ⊙
/// vec` elementwise over (b·n, d) rows, `vec` being the row's sequence's entry of the
/// per-sequence (b, d) `vecs` (adaLN-style broadcasting); parallel over sequences.
fn seq_broadcast<E: Elem>(
    dst: &mut [E],
    src: &[E],
    vecs: &[E],
    (n, d): (usize, usize),
    one_plus: bool,
) {
    assert!(
        dst.len() == src.len() && vecs.len() * n == dst.len(),
        "per-sequence broadcast shapes"
    );
    let lv = level();
    dst.par_chunks_mut(n * d)
        .zip(src.par_chunks(n * d))
        .zip(vecs.par_chunks(d))
        .for_each(|((dst, src), v)| broadcast_rows(lv, dst, src, v, one_plus));
}

#[inline(always)]
fn broadcast_rows_body<E: Elem>(dst: &mut [E], src: &[E], v: &[E], one_plus: bool) {
    let d = v.len();
    for (dr, sr) in dst.chunks_mut(d).zip(src.chunks(d)) {
        for ((o, &x), &c) in dr.iter_mut().zip(sr).zip(v) {
            *o += if one_plus { x * (E::one() + c) } else { x * c };
        }
    }
}
multiversion!(
    fn broadcast_rows<E: Elem>(dst: &mut [E], src: &[E], v: &[E], one_plus: bool)
        => broadcast_rows_body
);

/// Per-sequence column sums of `a ⊙ w` (or of `a`) over each sequence's n rows of width d:
/// the gradient of a (b, d) vector broadcast over (b·n, d); rows summed in order.
fn seq_column_sums<E: Elem>(a: &[E], w: Option<&[E]>, (n, d): (usize, usize)) -> Vec<E> {
    assert!(w.is_none_or(|w| w.len() == a.len()), "column-sum shapes");
    let mut out = vec![E::zero(); a.len() / n.max(1)];
    let lv = level();
    out.par_chunks_mut(d).enumerate().for_each(|(bi, o)| {
        let r = bi * n * d..(bi + 1) * n * d;
        column_sums(lv, o, &a[r.clone()], w.map(|w| &w[r]));
    });
    out
}

/// o += Σ_rows a (⊙ w) over the rows of width `o.len()`, in row order.
#[inline(always)]
fn column_sums_body<E: Elem>(o: &mut [E], a: &[E], w: Option<&[E]>) {
    let d = o.len();
    match w {
        Some(w) => {
            for (g, wr) in a.chunks(d).zip(w.chunks(d)) {
                for ((o, &g), &w) in o.iter_mut().zip(g).zip(wr) {
                    *o += g * w;
                }
            }
        }
        None => {
            for g in a.chunks(d) {
                for (o, &g) in o.iter_mut().zip(g) {
                    *o += g;
                }
            }
        }
    }
}
multiversion!(
    fn column_sums<E: Elem>(o: &mut [E], a: &[E], w: Option<&[E]>) => column_sums_body
);

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::Kernels;
    use crate::layers::{self, Rope, T2, T4};
    use crate::MlpKind;
    use dfdx::prelude::*;
    use rand::Rng;

    const B: usize = 2;
    const N: usize = 5;
    const H: usize = 2;
    const HD: usize = 4;
    const D: usize = H * HD;

    #[test]
    fn modulate_of_layer_norm_matches_dfdx() {
        each_path(|dev, rng| {
            let x = rand2(dev, rng, (B * N, D));
            let sh = rand2(dev, rng, (B, D));
            let sc = rand2(dev, rng, (B, D));
            let r = rand_vec(rng, B * N * D);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::modulate(
                    <Cpu as Kernels<f64>>::layer_norm(x.leaky_trace()).unwrap(),
                    sh.leaky_trace(),
                    sc.leaky_trace(),
                    B,
                    N,
                )
                .unwrap(),
                &r,
            );
            let (fb, gb) = grads(
                layers::modulate(
                    layers::layer_norm(x.leaky_trace()).unwrap(),
                    sh.leaky_trace(),
                    sc.leaky_trace(),
                    B,
                    N,
                )
                .unwrap(),
                &r,
            );
            close(&fa, &fb, "modulate(ln)");
            for (t, name) in [(&x, "x"), (&sh, "shift"), (&sc, "scale")] {
                close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
            }
        });
    }

    #[test]
    fn gated_residual_matches_dfdx() {
        each_path(|dev, rng| {
            let x = rand2(dev, rng, (B * N, D));
            let y = rand2(dev, rng, (B * N, D));
            let g = rand2(dev, rng, (B, D));
            let r = rand_vec(rng, B * N * D);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::gated_residual(
                    x.leaky_trace(),
                    y.leaky_trace(),
                    g.leaky_trace(),
                    B,
                    N,
                )
                .unwrap(),
                &r,
            );
            let (fb, gb) = grads(
                layers::gated_residual(x.leaky_trace(), y.leaky_trace(), g.leaky_trace(), B, N)
                    .unwrap(),
                &r,
            );
            close(&fa, &fb, "gated");
            for (t, name) in [(&x, "h"), (&y, "y"), (&g, "gate")] {
                close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
            }
        });
    }

    /// The one-sweep backward pass gives the three passes' bits (the gate's column sums, dh +=
    /// dZ, dy += dZ ⊙ gate on zeroed buffers), in f32 at every level with a ragged width and with
    /// one-row sequences, also when h and y are one tensor (dx = (0 + dZ) + dZ ⊙ gate per
    /// element).
    #[test]
    fn gated_residual_backward_is_the_three_passes_bit_for_bit() {
        use super::{add_into, seq_broadcast, seq_column_sums};
        use rand::rngs::StdRng;
        each_path(|dev, rng| {
            for (b, n, d) in [(3, 5, 37), (4, 1, 8)] {
                let t2 = |rng: &mut StdRng, rows| -> T2<f32, Cpu> {
                    tensor(dev, rand32(rng, rows * d, 1.0), (rows, d))
                };
                let (x, y, g) = (t2(rng, b * n), t2(rng, b * n), t2(rng, b));
                let r = rand32(rng, b * n * d, 1.0);
                let (yv, gv) = (y.as_vec(), g.as_vec());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let (_, ga) = grads(
                    <Cpu as Kernels<f32>>::gated_residual(
                        x.leaky_trace(),
                        y.leaky_trace(),
                        g.leaky_trace(),
                        b,
                        n,
                    )
                    .unwrap(),
                    &r,
                );
                let mut gh = vec![0.0f32; r.len()];
                add_into(&mut gh, &r);
                let mut gy = vec![0.0f32; r.len()];
                seq_broadcast(&mut gy, &r, &gv, (n, d), false);
                let mut gg = vec![0.0f32; gv.len()];
                add_into(&mut gg, &seq_column_sums(&r, Some(&yv), (n, d)));
                assert_eq!(bits(&ga.get(&x).as_vec()), bits(&gh), "dh");
                assert_eq!(bits(&ga.get(&y).as_vec()), bits(&gy), "dy");
                assert_eq!(bits(&ga.get(&g).as_vec()), bits(&gg), "dgate");
                // h and y one tensor
                let (_, gs) = grads(
                    <Cpu as Kernels<f32>>::gated_residual(
                        x.leaky_trace(),
                        x.leaky_trace(),
                        g.leaky_trace(),
                        b,
                        n,
                    )
                    .unwrap(),
                    &r,
                );
                let mut gx = vec![0.0f32; r.len()];
                add_into(&mut gx, &r);
                seq_broadcast(&mut gx, &r, &gv, (n, d), false);
                let mut gg = vec![0.0f32; gv.len()];
                add_into(&mut gg, &seq_column_sums(&r, Some(&x.as_vec()), (n, d)));
                assert_eq!(bits(&gs.get(&x).as_vec()), bits(&gx), "d(h = y)");
                assert_eq!(bits(&gs.get(&g).as_vec()), bits(&gg), "dgate (h = y)");
            }
        });
    }

    /// The per-sequence shift and the column concatenation against their dfdx compositions:
    /// values bit for bit (one add, a copy), gradients within the summation order's rounding.
    #[test]
    fn shift_and_concat_cols_match_dfdx() {
        each_path(|dev, rng| {
            let x = rand2(dev, rng, (B * N, D));
            let s = rand2(dev, rng, (B, D));
            let y = rand2(dev, rng, (B * N, 3));
            let r = rand_vec(rng, B * N * D);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::shift(x.leaky_trace(), s.leaky_trace(), B, N).unwrap(),
                &r,
            );
            let (fb, gb) = grads(
                layers::shift(x.leaky_trace(), s.leaky_trace(), B, N).unwrap(),
                &r,
            );
            assert_eq!(fa, fb, "shift");
            for (t, name) in [(&x, "x"), (&s, "s")] {
                close(&ga.get(t).as_vec(), &gb.get(t).as_vec(), name);
            }
            // (x | y), and x beside itself: both halves' gradients meet in one entry
            let r = rand_vec(rng, B * N * (D + 3));
            let cat = <Cpu as Kernels<f64>>::concat_cols(x.leaky_trace(), y.leaky_trace());
            let (fa, ga) = grads(cat.unwrap(), &r);
            let (fb, gb) = grads(
                (x.leaky_trace(), y.leaky_trace()).concat_along(Axis::<1>),
                &r,
            );
            assert_eq!(fa, fb, "concat");
            for t in [&x, &y] {
                assert_eq!(ga.get(t).as_vec(), gb.get(t).as_vec(), "concat gradient");
            }
            let r = rand_vec(rng, B * N * 2 * D);
            let cat = <Cpu as Kernels<f64>>::concat_cols(x.leaky_trace(), x.leaky_trace());
            let (_, ga) = grads(cat.unwrap(), &r);
            let expect: Vec<f64> = r
                .chunks(2 * D)
                .flat_map(|z| (0..D).map(|j| z[j] + z[D + j]).collect::<Vec<_>>())
                .collect();
            assert_eq!(ga.get(&x).as_vec(), expect, "x beside itself");
        });
    }

    /// `Kernels::residual(x, y)` against dfdx's `x + y`: values and both gradients bit for bit.
    fn residual_equals_add<E: crate::Elem>(x: &T2<E, Cpu>, y: &T2<E, Cpu>, r: &[E])
    where
        Cpu: Kernels<E>,
    {
        let (fa, ga) = grads(Cpu::residual(x.leaky_trace(), y.leaky_trace()).unwrap(), r);
        let (fb, gb) = grads(x.leaky_trace() + y.leaky_trace(), r);
        assert_eq!(fa, fb);
        for t in [x, y] {
            assert_eq!(ga.get(t).as_vec(), gb.get(t).as_vec());
        }
    }

    /// The residual add is dfdx's add, bit for bit, in f64 and f32; and a tensor added to
    /// itself (both gradients land in one entry: 2r).
    #[test]
    fn residual_is_dfdx_add() {
        each_path(|dev, rng| {
            let x = rand2(dev, rng, (B * N, D));
            let y = rand2(dev, rng, (B * N, D));
            let r = rand_vec(rng, B * N * D);
            residual_equals_add(&x, &y, &r);
            let (f2, g2) = grads(
                <Cpu as Kernels<f64>>::residual(x.leaky_trace(), x.leaky_trace()).unwrap(),
                &r,
            );
            let xv = x.as_vec();
            assert_eq!(f2, xv.iter().map(|v| v + v).collect::<Vec<_>>());
            assert_eq!(
                g2.get(&x).as_vec(),
                r.iter().map(|v| v + v).collect::<Vec<_>>()
            );
            let r32: Vec<f32> = r.iter().map(|&v| v as f32).collect();
            residual_equals_add(&x.to_dtype::<f32>(), &y.to_dtype::<f32>(), &r32);
        });
    }

    #[test]
    fn rope_matches_dfdx() {
        each_path(|dev, rng| {
            let x = rand2(dev, rng, (B * N, D));
            let r = rand_vec(rng, B * N * D);
            let rope = Rope::<f64, Cpu>::new(dev, N, HD, 10_000.0).unwrap();
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::rope(&rope, x.leaky_trace(), B, N, H, 0.5).unwrap(),
                &r,
            );
            let (fb, gb) = grads(rope.apply(x.leaky_trace(), B, N, H, 0.5).unwrap(), &r);
            close(&fa, &fb, "rope");
            close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "rope grad");
        });
    }

    #[test]
    fn gated_units_match_dfdx() {
        each_path(|dev, rng| {
            let x = rand2(dev, rng, (B * N, D));
            let u = rand2(dev, rng, (B * N, D));
            let r = rand_vec(rng, B * N * D);
            for kind in [MlpKind::Glu, MlpKind::Swiglu, MlpKind::Geglu] {
                let (fa, ga) = grads(
                    <Cpu as Kernels<f64>>::glu(kind, x.leaky_trace(), u.leaky_trace()).unwrap(),
                    &r,
                );
                let (fb, gb) = grads(
                    layers::act(kind, x.leaky_trace()).unwrap() * u.leaky_trace(),
                    &r,
                );
                close(&fa, &fb, "glu");
                close(&ga.get(&x).as_vec(), &gb.get(&x).as_vec(), "glu da");
                close(&ga.get(&u).as_vec(), &gb.get(&u).as_vec(), "glu du");
                // one tensor as a and u (one gradient buffer): the sum of both roles'
                let (fa, ga) = grads(
                    <Cpu as Kernels<f64>>::glu(kind, x.leaky_trace(), x.leaky_trace()).unwrap(),
                    &r,
                );
                let x2 = dev.tensor_from_vec(x.as_vec(), (B * N, D));
                let (fb, gb) = grads(
                    layers::act(kind, x.leaky_trace()).unwrap() * x2.leaky_trace(),
                    &r,
                );
                close(&fa, &fb, "glu(x, x)");
                let sum: Vec<f64> = (gb.get(&x).as_vec().iter())
                    .zip(gb.get(&x2).as_vec())
                    .map(|(a, b)| a + b)
                    .collect();
                close(&ga.get(&x).as_vec(), &sum, "glu(x, x) dx");
            }
        });
    }

    #[test]
    fn softmax_matches_dfdx() {
        each_path(|dev, rng| {
            let s4: T4<f64, Cpu> = tensor(
                dev,
                (0..B * H * N * N)
                    .map(|_| rng.gen_range(-3.0..3.0))
                    .collect(),
                (B, H, N, N),
            );
            let r = rand_vec(rng, B * H * N * N);
            let (fa, ga) = grads(
                <Cpu as Kernels<f64>>::softmax_last(s4.leaky_trace()).unwrap(),
                &r,
            );
            let (fb, gb) = grads(s4.leaky_trace().softmax::<Axis<3>>(), &r);
            close(&fa, &fb, "softmax");
            close(&ga.get(&s4).as_vec(), &gb.get(&s4).as_vec(), "softmax grad");
        });
    }

    /// The f32 gated units (fast exp) against dfdx's f32 ops, with pre-activations spanning
    /// the sigmoid's tails, and the f32 softmax.
    #[test]
    fn f32_glu_and_softmax_within_tolerance() {
        each_path(|dev, rng| {
            let (b, n, h, hd) = (2, 33, 2, 8);
            let d = h * hd;
            let s4 = (b, n, h, hd);
            let r = rand32(rng, b * n * d, 1.0);
            let s2 = (b * n, d);
            let a: T2f32 = tensor(dev, rand32(rng, b * n * d, 12.0), s2);
            let u: T2f32 = tensor(dev, rand32(rng, b * n * d, 1.0), s2);
            for kind in [MlpKind::Glu, MlpKind::Swiglu] {
                let y = <Cpu as Kernels<f32>>::glu(kind, a.leaky_trace(), u.leaky_trace()).unwrap();
                let (fa, ga) = grads(y.reshape_like(&s4), &r);
                let y = layers::act(kind, a.leaky_trace()).unwrap() * u.leaky_trace();
                let (fb, gb) = grads(y.reshape_like(&s4), &r);
                close32(&fa, &fb, "glu f32");
                close32(&ga.get(&a).as_vec(), &gb.get(&a).as_vec(), "glu da f32");
                close32(&ga.get(&u).as_vec(), &gb.get(&u).as_vec(), "glu du f32");
            }
            let x: T4<f32, Cpu> = tensor(dev, rand32(rng, b * n * d, 8.0), s4);
            let (fa, ga) = grads(
                <Cpu as Kernels<f32>>::softmax_last(x.leaky_trace()).unwrap(),
                &r,
            );
            let (fb, gb) = grads(x.leaky_trace().softmax::<Axis<3>>(), &r);
            close32(&fa, &fb, "softmax f32");
            close32(
                &ga.get(&x).as_vec(),
                &gb.get(&x).as_vec(),
                "softmax grad f32",
            );
        });
    }

    type T2f32 = crate::layers::T2<f32, Cpu>;
}
