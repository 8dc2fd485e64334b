//! The optimizer-side passes of a training step on the CPU, each one multi-threaded sweep over a
//! flat parameter instead of a chain of dfdx ops: AdamW (spec §8; 14 ops, each allocating and
//! sweeping memory, in the generic default), the EMA update (3 ops) and Σ g² for the global
//! gradient norm. AdamW and the EMA perform the same f32 operations in the same order as the
//! generic defaults in [`crate::Kernels`], so their results are bit-identical (tested there).

use crate::Elem;
use rayon::prelude::*;

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
pub(crate) fn adamw<E: Elem>(
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
    let c = |x: f64| E::c(x);
    let (b1, nb1, b2, nb2) = (c(s.beta1), c(1.0 - s.beta1), c(s.beta2), c(1.0 - s.beta2));
    let (ibc1, ibc2, eps, wd, lr) = (
        c(1.0 / s.bias_correction1),
        c(1.0 / s.bias_correction2),
        c(s.eps),
        c(s.weight_decay),
        c(s.lr),
    );
    let scale = s.grad_scale.map(c);
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
    pu.par_chunks_mut(CHUNK)
        .zip(mu.par_chunks_mut(CHUNK))
        .zip(vu.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(k, ((p2, m2), v2))| {
            let r = k * CHUNK..k * CHUNK + p2.len();
            let src = p[r.clone()].iter().zip(&g[r.clone()]);
            let src = src.zip(&m[r.clone()]).zip(&v[r]);
            let dst = p2.iter_mut().zip(m2.iter_mut()).zip(v2.iter_mut());
            for (((p2, m2), v2), (((&p, &g), &m), &v)) in dst.zip(src) {
                let g = scale.map_or(g, |s| g * s);
                let mn = m * b1 + g * nb1;
                let vn = v * b2 + (g * g) * nb2;
                let denom = (vn * ibc2).sqrt() + eps;
                let upd = (mn * ibc1) / denom + p * wd;
                p2.write(p - upd * lr);
                m2.write(mn);
                v2.write(vn);
            }
        });
    // SAFETY: the chunks above cover 0..n, and every element of each chunk was written.
    unsafe {
        p2.set_len(n);
        m2.set_len(n);
        v2.set_len(n);
    }
    (p2, m2, v2)
}

/// ema + rate·(θ − ema).
pub(crate) fn ema<E: Elem>(ema: &[E], p: &[E], rate: f64) -> Vec<E> {
    assert_eq!(ema.len(), p.len(), "EMA lengths");
    let r = E::c(rate);
    ema.par_iter()
        .zip(p)
        .with_min_len(CHUNK)
        .map(|(&e, &p)| e + (p - e) * r)
        .collect()
}

/// Σ x², accumulated in f64.
pub(crate) fn sum_squares<E: Elem>(x: &[E]) -> f64 {
    x.par_chunks(CHUNK)
        .map(|c| {
            c.iter()
                .map(|&v| {
                    let v = v.to_f64().unwrap_or(f64::NAN);
                    v * v
                })
                .sum::<f64>()
        })
        .sum()
}
