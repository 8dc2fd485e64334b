//! GenMD4's training loss on tensors (paper §6, eq. (12), App. I.2; spec §5.3–§5.5).
//!
//! Each sequence is noised twice at the same t (two mask patterns, needed for the REINFORCE
//! leave-one-out gradient of the exponents). Run the network ONCE on the stacked `[2B, len]`
//! ids of [`GenMd4Batch::xt`] (rows `0..B` = first pattern, `B..2B` = second, times
//! [`GenMd4Batch::stacked_times`]) and pass its logits `[2B, len, V]` together with θ (`[V]`,
//! w = softplus(θ)) to [`genmd4_loss`]. Differentiate [`GenMd4Loss::surrogate`]:
//!
//! surrogate = mean_b [ 0.5(L1 + L2) + 0.5·sg(L1 − L2)·(log q1 − log q2) + recon_b(t1) ]
//!
//! whose gradient is the network's two-sample gradient plus the unbiased RLOO estimate of the
//! exponents' gradient (the pathwise −w/t part, the score-function part through log q, and the
//! recon term). Report [`GenMd4Loss::nelbo`] (= 0.5(L1 + L2) + recon, the official `loss_nelbo`;
//! add [`GenMd4Loss::prior`] for the paper's bound), never the surrogate.

use super::batch::{check_times, check_xt};
use super::{check_logits, check_x0, host};
use crate::ObjectiveError;
use dfdx::prelude::*;
use maskdiff_process::forward_sample_per_token;
use maskdiff_schedule::{PerTokenPolynomial, TimeSampling, GENMD4_T1};
use rand::Rng;

/// Settings of the GenMD4 loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GenMd4Options {
    /// Lower end of the time range: t ~ U[t1, 1), recon at t1 (official 1e−3).
    pub t1: f64,
    /// How the per-sequence times are drawn (official: antithetic).
    pub sampling: TimeSampling,
    /// Multiply the diffusion term (and its RLOO term) by (1 − t1) so that it estimates
    /// ∫_{t1}^1 exactly. The official code does not (spec §5.4: its estimate is 0.1 % larger,
    /// still an upper bound). Default false.
    pub scale_by_time_range: bool,
}

impl Default for GenMd4Options {
    fn default() -> Self {
        Self {
            t1: GENMD4_T1,
            sampling: TimeSampling::Antithetic,
            scale_by_time_range: false,
        }
    }
}

impl GenMd4Options {
    fn scale(&self) -> f64 {
        if self.scale_by_time_range {
            1.0 - self.t1
        } else {
            1.0
        }
    }
}

/// One GenMD4 batch: x_0 `[B, len]`, two noisings x_t stacked `[2B, len]` (rows b and B + b
/// share x_0 row b and time t_b), the times, and the schedule's ε.
#[derive(Debug, Clone, PartialEq)]
pub struct GenMd4Batch {
    pub(crate) x0: Vec<u32>,
    pub(crate) xt: Vec<u32>,
    pub(crate) batch: usize,
    pub(crate) len: usize,
    pub(crate) vocab: usize,
    pub(crate) t: Vec<f64>,
    pub(crate) eps: f64,
}

impl GenMd4Batch {
    pub fn x0(&self) -> &[u32] {
        &self.x0
    }
    /// The two noisings stacked `[2B, len]` (rows `0..B` first pattern, `B..2B` second).
    pub fn xt(&self) -> &[u32] {
        &self.xt
    }
    pub fn batch(&self) -> usize {
        self.batch
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.batch == 0 || self.len == 0
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// One time per sequence.
    pub fn t(&self) -> &[f64] {
        &self.t
    }
    /// The schedule's ε.
    pub fn eps(&self) -> f64 {
        self.eps
    }
    /// Draw t_b ∈ [t1, 1) with `options.sampling`, and two independent x_t ~ q_w(x_t | x_0)
    /// per sequence with the per-token-value schedule (the current exponents w, as f64).
    pub fn sample<R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        schedule: &PerTokenPolynomial,
        options: &GenMd4Options,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        check_x0(x0, batch, len, schedule.vocab())?;
        let t = options.sampling.sample(batch, options.t1, rng)?;
        Self::at_times(x0, batch, len, schedule, t, rng)
    }

    /// Like [`GenMd4Batch::sample`] with given times t_b ∈ (0, 1).
    pub fn at_times<R: Rng>(
        x0: &[u32],
        batch: usize,
        len: usize,
        schedule: &PerTokenPolynomial,
        t: Vec<f64>,
        rng: &mut R,
    ) -> Result<Self, ObjectiveError> {
        let vocab = schedule.vocab();
        let v = check_x0(x0, batch, len, vocab)?;
        check_times(&t, batch, |x| x > 0.0 && x < 1.0)?;
        let mut rows = vec![Vec::new(); 2 * batch];
        for copy in 0..2 {
            for (b, &tb) in t.iter().enumerate() {
                let toks = v.tokens(&x0[b * len..(b + 1) * len])?;
                let st = forward_sample_per_token(&toks, |x| schedule.alpha(tb, x.index()), rng)?;
                rows[copy * batch + b] = v.input_ids(&st);
            }
        }
        Ok(Self {
            x0: x0.to_vec(),
            xt: rows.concat(),
            batch,
            len,
            vocab,
            t,
            eps: schedule.eps(),
        })
    }

    /// A batch from its parts, validated.
    pub fn new(
        x0: Vec<u32>,
        xt: Vec<u32>,
        batch: usize,
        len: usize,
        vocab: usize,
        t: Vec<f64>,
        eps: f64,
    ) -> Result<Self, ObjectiveError> {
        check_x0(&x0, batch, len, vocab)?;
        if xt.len() != 2 * batch * len {
            return Err(ObjectiveError::Shape(format!(
                "stacked x_t has {} ids, expected 2 x {batch} x {len}",
                xt.len()
            )));
        }
        check_xt(&x0, &xt[..batch * len], vocab)?;
        check_xt(&x0, &xt[batch * len..], vocab)?;
        check_times(&t, batch, |x| x > 0.0 && x < 1.0)?;
        if !(eps.is_finite() && (0.0..0.5).contains(&eps)) {
            return Err(ObjectiveError::BadValue {
                name: "eps",
                value: eps,
            });
        }
        Ok(Self {
            x0,
            xt,
            batch,
            len,
            vocab,
            t,
            eps,
        })
    }

    /// The time of each of the 2B stacked rows (t repeated twice), for the network input.
    pub fn stacked_times(&self) -> Vec<f64> {
        self.t.iter().chain(&self.t).copied().collect()
    }

    fn masked(&self, row: usize, n: usize) -> bool {
        self.xt[row * self.len + n] as usize == self.vocab
    }
}

/// w = softplus(θ) = log(1 + e^θ) on a tensor (keeps θ's tape). Valid for θ < 80 (f32 range).
pub fn softplus_tensor<D: Device<f32>, T: Tape<f32, D>>(
    theta: Tensor<(usize,), f32, D, T>,
) -> Result<Tensor<(usize,), f32, D, T>, ObjectiveError> {
    theta
        .try_exp()
        .and_then(|e| e.try_add(1.0))
        .and_then(|e| e.try_ln())
        .map_err(ObjectiveError::backend)
}

/// The GenMD4 loss of a batch: the differentiable surrogate and the per-sequence terms (f64).
#[derive(Debug)]
pub struct GenMd4Loss<D: Storage<f32>, T> {
    /// Batch mean of 0.5(L1 + L2) + 0.5·sg(L1 − L2)(log q1 − log q2) + recon: call
    /// `backward` on this (gradients reach the logits and θ).
    pub surrogate: Tensor<(), f32, D, T>,
    /// Per sequence, the two one-sample diffusion losses L1, L2 (times (1 − t1) if scaled).
    pub l1: Vec<f64>,
    pub l2: Vec<f64>,
    /// Per sequence, log q(x_t^k | x_0) of the two mask patterns.
    pub log_q1: Vec<f64>,
    pub log_q2: Vec<f64>,
    /// Per sequence, the reconstruction term at t1.
    pub recon: Vec<f64>,
    /// The prior KL per sequence, N·ε·log V (dropped by the official code).
    pub prior: f64,
    /// The exponents w = softplus(θ) used (f32 values widened).
    pub exponents: Vec<f64>,
}

impl<D: Storage<f32>, T> GenMd4Loss<D, T> {
    /// Per sequence diffusion estimate 0.5(L1 + L2).
    pub fn diffusion(&self) -> Vec<f64> {
        self.l1
            .iter()
            .zip(&self.l2)
            .map(|(a, b)| 0.5 * (a + b))
            .collect()
    }
    /// Per sequence RLOO term 0.5(L1 − L2)(log q1 − log q2) (not part of the NELBO).
    pub fn rloo(&self) -> Vec<f64> {
        (0..self.l1.len())
            .map(|b| 0.5 * (self.l1[b] - self.l2[b]) * (self.log_q1[b] - self.log_q2[b]))
            .collect()
    }
    /// Per sequence NELBO estimate, official convention: 0.5(L1 + L2) + recon.
    pub fn nelbo(&self) -> Vec<f64> {
        self.diffusion()
            .iter()
            .zip(&self.recon)
            .map(|(d, r)| d + r)
            .collect()
    }
    /// Batch mean of [`GenMd4Loss::nelbo`].
    pub fn nelbo_mean(&self) -> f64 {
        let v = self.nelbo();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    }
}

/// The GenMD4 loss. `logits`: `[2B, len, V]` for the stacked x_t of `batch`; `theta`: `[V]`
/// unconstrained exponent parameters (w = softplus(θ)); both may carry tapes. The batch should
/// have been sampled with the same w (as f64); `options` must match the sampling.
pub fn genmd4_loss<D: Device<f32>, T: Tape<f32, D>>(
    logits: Tensor<(usize, usize, usize), f32, D, T>,
    theta: Tensor<(usize,), f32, D, T>,
    batch: &GenMd4Batch,
    options: &GenMd4Options,
) -> Result<GenMd4Loss<D, T>, ObjectiveError> {
    let (bb, l, v) = *logits.shape();
    let b = batch.batch;
    check_logits((bb, l, v), 2 * b, batch.len, batch.vocab)?;
    // ids, x_t against x_0 and the times were checked when the batch was built
    if theta.shape().0 != v {
        return Err(ObjectiveError::Shape(format!(
            "theta has {} entries, vocabulary {v}",
            theta.shape().0
        )));
    }
    if let Some(&bad) = theta
        .as_vec()
        .iter()
        .find(|x| !(x.is_finite() && **x < 80.0))
    {
        return Err(ObjectiveError::BadValue {
            name: "theta",
            value: bad as f64,
        });
    }
    if !(options.t1.is_finite() && options.t1 > 0.0 && options.t1 < 1.0) {
        return Err(ObjectiveError::BadValue {
            name: "t1",
            value: options.t1,
        });
    }
    let be = |e: D::Err| ObjectiveError::backend(e);
    let dev = logits.device().clone();
    let eps = batch.eps;
    let scale = options.scale();
    let row_t = |r: usize| batch.t[r % b];
    let x_at = |r: usize, n: usize| batch.x0[(r % b) * l + n] as usize;

    let w = softplus_tensor(theta)?;
    let exponents: Vec<f64> = w.as_vec().iter().map(|&x| x as f64).collect();

    // Diffusion: per position (Σ_v w_v μ_v − w_x − w_x log μ_x), weighted by masked/t.
    let idx = host(
        &dev,
        (0..bb * l).map(|i| x_at(i / l, i % l)).collect(),
        (bb, l),
    )?;
    let logp = logits.try_log_softmax::<Axis<2>>().map_err(be)?;
    let mu = logp.with_empty_tape().try_exp().map_err(be)?;
    let w3 = w
        .with_empty_tape()
        .try_broadcast_like::<_, Axes2<0, 1>>(&(bb, l, v))
        .map_err(be)?;
    let mean_w = mu
        .try_mul(w3.with_empty_tape())
        .and_then(|x| x.try_sum::<(usize, usize), Axis<2>>())
        .map_err(be)?;
    let w_x = w3.try_select(idx.clone()).map_err(be)?;
    let logp_x = logp.try_select(idx).map_err(be)?;
    let integrand = logp_x
        .try_add(1.0)
        .and_then(|x| x.try_mul(w_x))
        .and_then(|x| mean_w.try_sub(x))
        .map_err(be)?;
    let coef: Vec<f32> = (0..bb * l)
        .map(|i| {
            let (r, n) = (i / l, i % l);
            if batch.masked(r, n) {
                (scale / row_t(r)) as f32
            } else {
                0.0
            }
        })
        .collect();
    let coef = host(&dev, coef, (bb, l))?;
    let losses = integrand
        .try_mul(coef)
        .and_then(|x| x.try_sum::<(usize,), Axis<1>>())
        .map_err(be)?;
    let lv: Vec<f64> = losses.as_vec().iter().map(|&x| x as f64).collect();

    // log q(x_t | x_0) per row from per-value counts of masked (M) and unmasked (U) positions:
    // Σ_v M_v (log(1 − ε) + w_v log t) + U_v log(1 − (1 − ε) t^{w_v}). Its value and its
    // w-derivative are computed on the host in f64 (the unmasked term needs expm1 near t = 1,
    // which f32 tensors lack) and enter the tape through the linearisation
    // Σ_v (w_v − w0_v)·∂log q/∂w_v, whose value is exactly 0 and whose gradient is exact.
    let (mut mc, mut uc) = (vec![0f64; bb * v], vec![0f64; bb * v]);
    for r in 0..bb {
        for n in 0..l {
            let cell = r * v + x_at(r, n);
            if batch.masked(r, n) {
                mc[cell] += 1.0;
            } else {
                uc[cell] += 1.0;
            }
        }
    }
    let log1m_eps = (-eps).ln_1p();
    let mut lq = vec![0f64; bb];
    let mut dlq = vec![0f32; bb * v];
    for r in 0..bb {
        let ln_t = row_t(r).ln();
        for (u, &w0) in exponents.iter().enumerate() {
            let (m, um) = (mc[r * v + u], uc[r * v + u]);
            let z = w0 * ln_t;
            // 1 − (1 − ε)e^z = −expm1(z) + ε e^z, accurate as t → 1.
            let keep = -z.exp_m1() + eps * z.exp();
            let g = if um > 0.0 { keep.ln() } else { 0.0 };
            let dg = if um > 0.0 {
                -(1.0 - eps) * z.exp() * ln_t / keep
            } else {
                0.0
            };
            lq[r] += m * (log1m_eps + z) + um * g;
            dlq[r * v + u] = (m * ln_t + um * dg) as f32;
        }
    }
    let w0: Vec<f32> = (0..bb * v).map(|i| exponents[i % v] as f32).collect();
    let (w0, dlq) = (host(&dev, w0, (bb, v))?, host(&dev, dlq, (bb, v))?);
    let log_q_lin = w
        .with_empty_tape()
        .try_broadcast_like::<_, Axis<0>>(&(bb, v))
        .and_then(|x| x.try_sub(w0))
        .and_then(|x| x.try_mul(dlq))
        .and_then(|x| x.try_sum::<(usize,), Axis<1>>())
        .map_err(be)?;
    // RLOO: row b gets +0.5 sg(L1 − L2), row B + b gets −0.5 sg(L1 − L2) (divided by B for
    // the batch mean); the forward value c·(log q1 − log q2) is added as a constant.
    let rloo_coef: Vec<f64> = (0..bb)
        .map(|r| {
            let c = 0.5 * (lv[r % b] - lv[r % b + b]) / b as f64;
            if r < b {
                c
            } else {
                -c
            }
        })
        .collect();
    let rloo_value: f64 = rloo_coef.iter().zip(&lq).map(|(c, q)| c * q).sum();
    let rloo_coef = host(&dev, rloo_coef.iter().map(|&c| c as f32).collect(), (bb,))?;
    let rloo = log_q_lin
        .try_mul(rloo_coef)
        .and_then(|x| x.try_sum::<(), Axis<0>>())
        .and_then(|x| x.try_add(rloo_value as f32))
        .map_err(be)?;

    // Recon at t1 per value v: (1 − ε) t1^{w_v}·(logsumexp_u(w_u log t1) − w_v log t1).
    let ln_t1 = options.t1.ln() as f32;
    let z1 = w.try_mul(ln_t1).map_err(be)?;
    let lse = z1
        .with_empty_tape()
        .try_logsumexp::<(), Axis<0>>()
        .and_then(|x| x.try_broadcast_like::<_, Axis<0>>(&(v,)))
        .map_err(be)?;
    let nll = lse.try_sub(z1.with_empty_tape()).map_err(be)?;
    let per_value = z1
        .try_exp()
        .and_then(|x| x.try_mul((1.0 - eps) as f32))
        .and_then(|x| x.try_mul(nll))
        .map_err(be)?;
    let rv: Vec<f64> = per_value.as_vec().iter().map(|&x| x as f64).collect();
    let mut counts = vec![0f64; b * v];
    for r in 0..b {
        for n in 0..l {
            counts[r * v + x_at(r, n)] += 1.0;
        }
    }
    let recon: Vec<f64> = (0..b)
        .map(|r| (0..v).map(|u| counts[r * v + u] * rv[u]).sum())
        .collect();
    let mean_counts: Vec<f32> = (0..v)
        .map(|u| ((0..b).map(|r| counts[r * v + u]).sum::<f64>() / b as f64) as f32)
        .collect();
    let mean_counts = host(&dev, mean_counts, (v,))?;
    let recon_mean = per_value
        .try_mul(mean_counts)
        .and_then(|x| x.try_sum::<(), Axis<0>>())
        .map_err(be)?;

    let diffusion_mean = losses
        .try_sum::<(), Axis<0>>()
        .and_then(|x| x.try_mul((0.5 / b as f64) as f32))
        .map_err(be)?;
    let surrogate = diffusion_mean
        .try_add(rloo)
        .and_then(|x| x.try_add(recon_mean))
        .map_err(be)?;

    Ok(GenMd4Loss {
        surrogate,
        l1: lv[..b].to_vec(),
        l2: lv[b..].to_vec(),
        log_q1: lq[..b].to_vec(),
        log_q2: lq[b..].to_vec(),
        recon,
        prior: l as f64 * eps * (v as f64).ln(),
        exponents,
    })
}
