//! The optimizer-side passes of a training step on the CPU, each one multi-threaded sweep over a
//! flat parameter instead of a chain of dfdx ops: AdamW (spec §8; 14 ops, each allocating and
//! sweeping memory, in the generic default [`generic_adamw`]), the EMA update (3 ops) and Σ g²
//! for the global gradient norm. AdamW and the EMA perform the same f32 operations in the same
//! order as the generic defaults in [`crate::Kernels`], so their results are bit-identical
//! (tested below). Tape-free: the outputs are plain tensors.

use super::isa::{level, multiversion, LANES};
use super::storage::{consume, input, output_lasting, par_filled};
use super::Moments;
use crate::layers::{Res, T1};
use crate::Elem;
use dfdx::prelude::*;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// One AdamW step's constants: the hyper-parameters, the bias corrections of this step and an
/// optional factor applied to the gradient first (global-norm clipping).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1 − β1^k and 1 − β2^k for the k-th update (k ≥ 1).
    pub bias_correction1: f64,
    pub bias_correction2: f64,
    pub grad_scale: Option<f64>,
}

/// Elements per parallel task: large enough to amortise rayon, small enough to split the
/// 0.5–2 M-element matrices of the small presets over both cores.
const CHUNK: usize = 1 << 15;

/// (θ', m', v') from θ, g, m, v: m' = β1 m + (1−β1) g, v' = β2 v + (1−β2) g²,
/// θ' = θ − lr·(m'/bc1 / (√(v'/bc2) + ε) + wd·θ).
fn adamw_host<E: Elem>(
    p: &[E],
    g: &[E],
    m: &[E],
    v: &[E],
    s: &AdamWStep,
) -> (Vec<E>, Vec<E>, Vec<E>) {
    let n = p.len();
    assert!(
        g.len() == n && m.len() == n && v.len() == n,
        "AdamW lengths"
    );
    let k = AdamWConsts::new(s);
    let (mut p2, mut m2, mut v2) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    // Written through the spare capacity: outputs are not zero-filled first.
    let (pu, mu, vu) = (
        &mut p2.spare_capacity_mut()[..n],
        &mut m2.spare_capacity_mut()[..n],
        &mut v2.spare_capacity_mut()[..n],
    );
    let lv = level();
    pu.par_chunks_mut(CHUNK)
        .zip(mu.par_chunks_mut(CHUNK))
        .zip(vu.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, ((p2, m2), v2))| {
            let r = i * CHUNK..i * CHUNK + p2.len();
            let src = (&p[r.clone()], &g[r.clone()], &m[r.clone()], &v[r]);
            adamw_chunk(lv, (p2, m2, v2), src, k);
        });
    // SAFETY: capacity ≥ n for all three; the chunks above cover 0..n of each spare capacity,
    // and every element of every chunk was written (`MaybeUninit::write`).
    unsafe {
        p2.set_len(n);
        m2.set_len(n);
        v2.set_len(n);
    }
    (p2, m2, v2)
}

/// The f32 (or f64) constants of one AdamW step, converted once.
#[derive(Clone, Copy)]
struct AdamWConsts<E> {
    b1: E,
    nb1: E,
    b2: E,
    nb2: E,
    ibc1: E,
    ibc2: E,
    eps: E,
    wd: E,
    lr: E,
    scale: Option<E>,
}

impl<E: Elem> AdamWConsts<E> {
    fn new(s: &AdamWStep) -> Self {
        let c = |x: f64| E::c(x);
        AdamWConsts {
            b1: c(s.beta1),
            nb1: c(1.0 - s.beta1),
            b2: c(s.beta2),
            nb2: c(1.0 - s.beta2),
            ibc1: c(1.0 / s.bias_correction1),
            ibc2: c(1.0 / s.bias_correction2),
            eps: c(s.eps),
            wd: c(s.weight_decay),
            lr: c(s.lr),
            scale: s.grad_scale.map(c),
        }
    }
}

/// Outputs (θ', m', v') of one chunk, written without being read.
type Out<'a, E> = (
    &'a mut [MaybeUninit<E>],
    &'a mut [MaybeUninit<E>],
    &'a mut [MaybeUninit<E>],
);

/// One chunk of [`adamw_host`]: every output element written.
#[inline(always)]
fn adamw_chunk_body<E: Elem>(
    (p2, m2, v2): Out<'_, E>,
    (p, g, m, v): (&[E], &[E], &[E], &[E]),
    k: AdamWConsts<E>,
) {
    let src = p.iter().zip(g).zip(m).zip(v);
    let dst = p2.iter_mut().zip(m2.iter_mut()).zip(v2.iter_mut());
    for (((p2, m2), v2), (((&p, &g), &m), &v)) in dst.zip(src) {
        let g = k.scale.map_or(g, |s| g * s);
        let mn = m * k.b1 + g * k.nb1;
        let vn = v * k.b2 + (g * g) * k.nb2;
        let denom = (vn * k.ibc2).sqrt() + k.eps;
        let upd = (mn * k.ibc1) / denom + p * k.wd;
        p2.write(p - upd * k.lr);
        m2.write(mn);
        v2.write(vn);
    }
}
multiversion!(
    fn adamw_chunk<E: Elem>(
        out: Out<'_, E>,
        src: (&[E], &[E], &[E], &[E]),
        k: AdamWConsts<E>,
    ) => adamw_chunk_body
);

/// ema + rate·(θ − ema).
fn ema_host<E: Elem>(ema: &[E], p: &[E], rate: f64) -> Vec<E> {
    assert_eq!(ema.len(), p.len(), "EMA lengths");
    let r = E::c(rate);
    let lv = level();
    let chunks = ema.par_chunks(CHUNK).zip(p.par_chunks(CHUNK));
    par_filled(ema.len(), CHUNK, chunks, |o, (e, p)| {
        ema_chunk(lv, o, e, p, r)
    })
}

#[inline(always)]
fn ema_chunk_body<E: Elem>(o: &mut [E], ema: &[E], p: &[E], r: E) {
    for ((o, &e), &p) in o.iter_mut().zip(ema).zip(p) {
        *o = e + (p - e) * r;
    }
}
multiversion!(fn ema_chunk<E: Elem>(o: &mut [E], ema: &[E], p: &[E], r: E) => ema_chunk_body);

/// Σ x², accumulated in f64.
fn sum_squares_host<E: Elem>(x: &[E]) -> f64 {
    let lv = level();
    x.par_chunks(CHUNK).map(|c| sum_squares_chunk(lv, c)).sum()
}

/// Σ x² of one chunk in f64, with [`LANES`] interleaved partial sums (vectorisable).
#[inline(always)]
fn sum_squares_chunk_body<E: Elem>(x: &[E]) -> f64 {
    let f = |v: E| v.to_f64().unwrap_or(f64::NAN);
    let mut acc = [0.0f64; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v) * f(v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v) * f(v)).sum();
    acc.iter().sum::<f64>() + tail
}
multiversion!(fn sum_squares_chunk<E: Elem>(x: &[E]) -> f64 => sum_squares_chunk_body);

/// [`crate::Kernels::adamw`] on the CPU: one sweep over θ, g, m, v.
pub(crate) fn adamw<E: Elem>(
    p: &T1<E, Cpu>,
    g: &T1<E, Cpu>,
    m: &T1<E, Cpu>,
    v: &T1<E, Cpu>,
    s: &AdamWStep,
) -> Res<Moments<E, Cpu>, Cpu> {
    let (p2, m2, v2) = adamw_host(&input(p), &input(g), &input(m), &input(v), s);
    // θ, m, v are being replaced by θ', m', v' (zero-copy inputs of the next forward pass and
    // optimizer step)
    for t in [p, m, v] {
        consume(t);
    }
    let (dev, shape) = (p.device(), *p.shape());
    Ok((
        output_lasting(dev, p2, shape)?,
        output_lasting(dev, m2, shape)?,
        output_lasting(dev, v2, shape)?,
    ))
}

/// [`crate::Kernels::ema`] on the CPU.
pub(crate) fn ema<E: Elem>(ema: &T1<E, Cpu>, p: &T1<E, Cpu>, rate: f64) -> Res<T1<E, Cpu>, Cpu> {
    let y = ema_host(&input(ema), &input(p), rate);
    consume(ema);
    output_lasting(ema.device(), y, *ema.shape())
}

/// [`crate::Kernels::sum_squares`] on the CPU.
pub(crate) fn sum_squares<E: Elem>(x: &T1<E, Cpu>) -> f64 {
    sum_squares_host(&input(x))
}

/// [`crate::Kernels::adamw`] from dfdx's ops: 14 element-wise passes.
pub(super) fn generic_adamw<E: Elem, D: Device<E>>(
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

#[cfg(test)]
mod tests {
    use super::super::Kernels;
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

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
