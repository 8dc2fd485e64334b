//! GenMD4 test-set negative ELBO (paper eq. (12), App. I; spec §5.3–§5.4) through the
//! backend-agnostic `Denoiser`, in the official `loss_nelbo` convention: every sequence gets K
//! independent draws of t ~ U[t1, 1) (no (1 − t1) factor) and x_t ~ q_w(x_t | x_0) with the
//! learned per-token-value schedule α_{t,v} = 1 − (1 − ε)t^{w_v}; its estimate is the mean of
//! Σ_{masked n} (1/t)(Σ_v w_v μ_v − w_x − w_x log μ_x) plus the reconstruction term at t1 (which
//! depends on the sequence's tokens). Same seeding and reporting as [`super::md4`].

use super::{mc_means, mean_stderr, Draw, EvalOptions, NelboEstimate, NetInput, Result};
use crate::reference::{genmd4_integrand, genmd4_prior_kl, genmd4_recon};
use crate::ObjectiveError;
use maskdiff_process::{forward_sample_per_token, Denoiser, LogProbs, Token};
use maskdiff_schedule::{PerTokenPolynomial, GENMD4_T1};
use rand::{rngs::StdRng, Rng};

/// GenMD4's per-sequence stream salt (another stream than MD4's).
const GENMD4_STREAM: u64 = 0x3C6E_F372_FE94_F82B;

/// GenMD4 negative ELBO of `sequences` under `denoiser` and the learned `schedule`
/// (continuous time only: `opts.discrete_steps` must be `None`).
pub fn genmd4<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    schedule: &PerTokenPolynomial,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<NelboEstimate> {
    genmd4_on(
        denoiser,
        schedule,
        sequences,
        labels,
        opts,
        progress,
        NetInput::Noised,
    )
}

/// [`genmd4`] with the network reading `input` (block diffusion: x_t then x_0).
pub(crate) fn genmd4_on<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    schedule: &PerTokenPolynomial,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: &mut dyn FnMut(usize),
    input: NetInput,
) -> Result<NelboEstimate> {
    if opts.discrete_steps.is_some() {
        return Err(ObjectiveError::Unsupported(
            "GenMD4 has no discrete-time ELBO here (its training objective is continuous-time)",
        ));
    }
    let vocab = denoiser.vocab();
    let v = vocab.size();
    if schedule.vocab() != v {
        return Err(ObjectiveError::Shape(format!(
            "{} GenMD4 exponents for a {v}-token network",
            schedule.vocab()
        )));
    }
    let w = schedule.exponents();
    let t1 = GENMD4_T1;
    let draw = |toks: &[Token], rng: &mut StdRng| {
        let t = t1 + (1.0 - t1) * rng.gen::<f64>();
        let xt = forward_sample_per_token(toks, |x| schedule.alpha(t, x.index()), rng)?;
        Ok((t, vec![t], xt))
    };
    let mut row_lp = vec![0.0f64; v];
    let score = |r: &Draw, x0: &[u32], lp: &LogProbs, b: usize| {
        let mut est = 0.0f64;
        // (zipping with x_0 reads the noised half of a block network's input)
        for (n, (&xt, &x)) in r.xt.iter().zip(x0).enumerate() {
            if xt != vocab.mask_id() {
                continue;
            }
            // renormalise the f32 row in f64 (the integrand needs all of μ)
            let row = lp.row(b, n);
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            for (o, &x) in row_lp.iter_mut().zip(row) {
                *o = x as f64 - lse;
            }
            est += genmd4_integrand(w, r.t, x as usize, &row_lp);
        }
        Ok(est)
    };
    let (len, means) = mc_means(
        denoiser,
        sequences,
        labels,
        opts,
        GENMD4_STREAM,
        input,
        progress,
        draw,
        score,
    )?;
    let n_seq = means.len();
    let mut recon = Vec::with_capacity(n_seq);
    for x0 in sequences {
        recon.push(genmd4_recon(schedule, t1, x0)?);
    }
    let totals: Vec<f64> = means.iter().zip(&recon).map(|(m, r)| m + r).collect();
    let (mean, stderr) = mean_stderr(&totals);
    let recon_mean = recon.iter().sum::<f64>() / n_seq as f64;
    let prior = genmd4_prior_kl(schedule, len);
    let to_bits = |nats: f64| nats / (len as f64 * std::f64::consts::LN_2);
    let bits = to_bits(mean);
    Ok(NelboEstimate {
        sequences: n_seq,
        seq_len: len,
        mc_samples: opts.mc_samples,
        discrete_steps: None,
        diffusion_nats: mean - recon_mean,
        recon_nats: recon_mean,
        prior_nats: prior,
        stderr_nats: stderr,
        bits_per_token: bits,
        stderr_bits: to_bits(stderr),
        bits_per_token_with_prior: to_bits(mean + prior),
        perplexity: bits.exp2(),
    })
}
