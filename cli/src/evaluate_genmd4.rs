//! GenMD4 test-set negative ELBO (paper eq. (12), App. I; spec §5.3–§5.4) through the
//! backend-agnostic `Denoiser`, in the official `loss_nelbo` convention: every sequence gets K
//! independent draws of t ~ U[t1, 1) (no (1 − t1) factor) and x_t ~ q_w(x_t | x_0) with the
//! learned per-token-value schedule α_{t,v} = 1 − (1 − ε)t^{w_v}; its estimate is the mean of
//! Σ_{masked n} (1/t)(Σ_v w_v μ_v − w_x − w_x log μ_x) plus the reconstruction term at t1 (which
//! depends on the sequence's tokens). Same seeding and reporting as [`crate::evaluate`]; also
//! [`evaluate_trainer`], which picks MD4's or GenMD4's estimate from a trainer's objective.

use crate::error::{CliError, Result};
use crate::evaluate::{evaluate, mc_means, mean_stderr, Draw, EvalOptions, EvalResult};
use maskdiff_network::train::Trainer;
use maskdiff_network::Kernels;
use maskdiff_objective::reference::{genmd4_integrand, genmd4_prior_kl, genmd4_recon};
use maskdiff_process::{forward_sample_per_token, Denoiser, LogProbs, Token};
use maskdiff_schedule::{PerTokenPolynomial, GENMD4_T1};
use rand::{rngs::StdRng, Rng};

/// GenMD4's per-sequence stream salt (another stream than MD4's).
const GENMD4_STREAM: u64 = 0x3C6E_F372_FE94_F82B;

/// GenMD4 negative ELBO of `sequences` under `denoiser` and the learned `schedule`
/// (continuous time only: `opts.discrete_steps` must be `None`).
pub fn evaluate_genmd4<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    schedule: &PerTokenPolynomial,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: impl FnMut(usize),
) -> Result<EvalResult> {
    if opts.discrete_steps.is_some() {
        return Err(CliError::Input(
            "GenMD4 has no discrete-time ELBO here (its training objective is continuous-time)"
                .into(),
        ));
    }
    let vocab = denoiser.vocab();
    let v = vocab.size();
    if schedule.vocab() != v {
        return Err(CliError::Input(format!(
            "{} GenMD4 exponents for a {v}-token network",
            schedule.vocab()
        )));
    }
    let w = schedule.exponents();
    let t1 = GENMD4_T1;
    let draw = |toks: &[Token], rng: &mut StdRng| {
        let t = t1 + (1.0 - t1) * rng.gen::<f64>();
        let xt = forward_sample_per_token(toks, |x| schedule.alpha(t, x.index()), rng)?;
        Ok((t, t, xt))
    };
    let mut row_lp = vec![0.0f64; v];
    let score = |r: &Draw, x0: &[u32], lp: &LogProbs, b: usize| {
        let mut est = 0.0f64;
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
        progress,
        draw,
        score,
    )?;
    let n_seq = means.len();
    let mut recon = Vec::with_capacity(n_seq);
    for x0 in sequences {
        recon.push(genmd4_recon(schedule, t1, x0).map_err(|e| CliError::Input(e.to_string()))?);
    }
    let totals: Vec<f64> = means.iter().zip(&recon).map(|(m, r)| m + r).collect();
    let (mean, stderr) = mean_stderr(&totals);
    let recon_mean = recon.iter().sum::<f64>() / n_seq as f64;
    let prior = genmd4_prior_kl(schedule, len);
    let to_bits = |nats: f64| nats / (len as f64 * std::f64::consts::LN_2);
    let bits = to_bits(mean);
    Ok(EvalResult {
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

/// MD4's or GenMD4's negative ELBO, by `trainer`'s objective; GenMD4 uses the EMA (`use_ema`)
/// or raw exponents — pass the matching `denoiser` (`trainer.ema_denoiser()` for the EMA).
pub fn evaluate_trainer<K: Kernels<f32>, D: Denoiser + ?Sized>(
    trainer: &Trainer<K>,
    use_ema: bool,
    denoiser: &mut D,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: impl FnMut(usize),
) -> Result<EvalResult> {
    if trainer.genmd4().is_some() {
        let schedule = trainer.genmd4_schedule(use_ema)?;
        evaluate_genmd4(denoiser, &schedule, sequences, labels, opts, progress)
    } else {
        evaluate(
            denoiser,
            trainer.schedule(),
            sequences,
            labels,
            opts,
            progress,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_process::{ProcessError, Vocab};
    use rand::SeedableRng;

    /// Uniform predictions over V tokens.
    struct Uniform(usize);
    impl Denoiser for Uniform {
        fn vocab(&self) -> Vocab {
            Vocab::new(self.0).unwrap()
        }
        fn is_time_conditioned(&self) -> bool {
            false
        }
        fn log_probs(
            &mut self,
            b: &maskdiff_process::DenoiseBatch<'_>,
        ) -> std::result::Result<LogProbs, ProcessError> {
            let v = self.0;
            Ok(LogProbs {
                data: vec![-(v as f32).ln(); b.batch * b.len * v],
                batch: b.batch,
                len: b.len,
                vocab: v,
            })
        }
    }

    /// Uniform μ, all w = 1: per token the estimate is (1 − ε)·ln V in expectation (each masked
    /// position contributes ln V / t, masked with probability (1 − ε)t, t ~ U[t1, 1)) plus the
    /// recon (1 − ε)·t1·ln V (spec §11.19); the mean of many sequences agrees within 4 SE.
    /// Uniform μ with unequal w: the integrand (w̄ − w_x + w_x ln V)/t with masking probability
    /// (1 − ε)t^{w_x} gives per token of value x the expectation
    /// (1 − ε)(w̄ − w_x + w_x ln V)(1 − t1^{w_x})/(w_x(1 − t1)) — checked the same way.
    #[test]
    fn uniform_predictor_matches_closed_form() {
        let v = 3usize;
        let (len, n) = (8usize, 3000usize);
        for w in [vec![1.0, 1.0, 1.0], vec![0.5, 1.0, 3.0]] {
            let sched = PerTokenPolynomial::new(w.clone()).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let seqs: Vec<Vec<u32>> = (0..n)
                .map(|_| (0..len).map(|_| rng.gen_range(0..v as u32)).collect())
                .collect();
            let opts = EvalOptions {
                mc_samples: 1,
                discrete_steps: None,
                batch_rows: 64,
                seed: 5,
            };
            let r = evaluate_genmd4(&mut Uniform(v), &sched, &seqs, None, opts, |_| {}).unwrap();
            let (eps, t1, ln_v) = (1e-4, GENMD4_T1, (v as f64).ln());
            let wbar = w.iter().sum::<f64>() / v as f64;
            // tokens are uniform over values: average the per-value expectation
            let per_token: f64 = (0..v)
                .map(|x| {
                    (1.0 - eps) * (wbar - w[x] + w[x] * ln_v) * (1.0 - t1.powf(w[x]))
                        / (w[x] * (1.0 - t1))
                })
                .sum::<f64>()
                / v as f64;
            let expect_diffusion = len as f64 * per_token;
            let got = r.diffusion_nats;
            assert!(
                (got - expect_diffusion).abs() < 4.0 * r.stderr_nats,
                "w {w:?}: {got} vs {expect_diffusion} ± {}",
                r.stderr_nats
            );
            assert!(r.stderr_nats < 0.03 * expect_diffusion, "too weak");
            if w.iter().all(|&x| x == 1.0) {
                let recon = len as f64 * (1.0 - eps) * t1 * ln_v;
                assert!((r.recon_nats - recon).abs() < 1e-9, "{}", r.recon_nats);
                assert!((r.prior_nats - len as f64 * eps * ln_v).abs() < 1e-12);
            }
        }
        let sched = PerTokenPolynomial::new(vec![1.0; v]).unwrap();
        let bad = EvalOptions {
            mc_samples: 1,
            discrete_steps: Some(10),
            batch_rows: 4,
            seed: 0,
        };
        let seqs = vec![vec![0u32; 4]];
        assert!(evaluate_genmd4(&mut Uniform(v), &sched, &seqs, None, bad, |_| {}).is_err());
        let four = PerTokenPolynomial::new(vec![1.0; 4]).unwrap();
        let ok = EvalOptions {
            discrete_steps: None,
            ..bad
        };
        assert!(evaluate_genmd4(&mut Uniform(v), &four, &seqs, None, ok, |_| {}).is_err());
    }
}
