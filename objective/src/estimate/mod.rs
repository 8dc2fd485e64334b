//! The Monte-Carlo negative ELBO through the backend-agnostic `Denoiser` (paper §3, spec §3.1–§3.4):
//! every sequence gets K independent (t, x_t) draws; its estimate is their mean. The reported
//! value is the mean over sequences with the standard error of that mean (sequences are
//! independent, so the error is valid whatever K is). Continuous time (eq. (4)) or the T-step
//! discrete-time ELBO (§3.2). Each sequence's randomness depends only on (seed, index), so the
//! result does not depend on the batch size. [`md4_clip_variance`] is the statistic of BD3-LM's
//! clipped-schedule search (Arriola et al. 2025, §5): the variance of the per-block clipped loss.

mod genmd4;

pub use genmd4::genmd4;
pub(crate) use genmd4::genmd4_on;

use crate::reference;
use crate::ObjectiveError;
use maskdiff_process::{forward_sample, DenoiseBatch, Denoiser, LogProbs, State, Token};
use maskdiff_schedule::{MaskRate, MaskingSchedule};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::Serialize;

type Result<T> = std::result::Result<T, ObjectiveError>;

/// Evaluation settings.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    pub mc_samples: usize,
    /// `Some(T)`: the discrete-time ELBO with T steps.
    pub discrete_steps: Option<usize>,
    /// Rows (sequence × sample) per network call.
    pub batch_rows: usize,
    pub seed: u64,
}

/// The negative ELBO over a set of sequences, in nats per sequence and bits per token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NelboEstimate {
    pub sequences: usize,
    pub seq_len: usize,
    pub mc_samples: usize,
    /// `None` = continuous time.
    pub discrete_steps: Option<usize>,
    /// Diffusion term, mean nats per sequence.
    pub diffusion_nats: f64,
    /// Reconstruction term N·(1 − α_0)·log V (nats per sequence; the official code adds it).
    pub recon_nats: f64,
    /// Prior KL N·α_1·log V (nats per sequence; the official code drops it, the paper keeps it).
    pub prior_nats: f64,
    /// Standard error of the per-sequence diffusion estimate's mean (nats per sequence).
    pub stderr_nats: f64,
    /// (diffusion + recon) in bits per token — the number papers report (BPC / BPD).
    pub bits_per_token: f64,
    pub stderr_bits: f64,
    /// With the prior KL added (the paper's bound with α_1 = ε).
    pub bits_per_token_with_prior: f64,
    /// 2^bits: the perplexity bound.
    pub perplexity: f64,
}

/// A stable per-sequence seed: splitmix64 of (seed, index) on the stream `salt` (MD4 and GenMD4
/// evaluation use different streams).
pub fn mix_seed(seed: u64, index: u64, salt: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(salt);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// MD4's per-sequence stream salt for [`mix_seed`] (block diffusion draws the same way).
const MD4_STREAM: u64 = 0x6A09_E667_F3BC_C909;

/// One call of the denoiser on pending rows, each given as (x_t ids, t, sequence index); the
/// labels (if any) are indexed by sequence.
pub(crate) fn predict_rows<'r, D: Denoiser + ?Sized>(
    denoiser: &mut D,
    rows: impl ExactSizeIterator<Item = (&'r [u32], f64, usize)> + Clone,
    len: usize,
    labels: Option<&[u32]>,
) -> Result<maskdiff_process::LogProbs> {
    let n = rows.len();
    let ids: Vec<u32> = rows
        .clone()
        .flat_map(|(xt, _, _)| xt.iter().copied())
        .collect();
    let ts: Vec<f64> = rows.clone().map(|(_, t, _)| t).collect();
    let labs: Option<Vec<u32>> = labels.map(|l| rows.map(|(_, _, seq)| l[seq]).collect());
    let batch = DenoiseBatch {
        ids: &ids,
        batch: n,
        len,
        t: &ts,
        labels: labs.as_deref(),
    };
    Ok(denoiser.log_probs(&batch)?)
}

/// log μ[k] of a network row (f32 log-probabilities), renormalised in f64.
pub(crate) fn log_prob(row: &[f32], k: usize) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    row[k] as f64 - lse
}

/// One Monte-Carlo draw for a sequence: the time the network sees, the values the estimate
/// needs besides t (the T-step draw u, t itself in continuous time; one per block for per-block
/// times), and x_t as ids.
pub(crate) struct Draw {
    pub seq: usize,
    pub t: f64,
    /// One value per time of the draw (one per sequence, or one per block).
    pub u: Vec<f64>,
    pub xt: Vec<u32>,
}

/// What the network reads for a draw: x_t alone, or x_t followed by x_0 (a block-diffusion
/// network, BD3-LM: it returns log μ for the N noised positions only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetInput {
    Noised,
    NoisedThenClean,
}

/// The Monte-Carlo loop of every estimate here (MD4 and GenMD4): checks the inputs, draws K
/// (t, u, x_t) per sequence with `draw` from the sequence's own stream (seeded by (seed, index,
/// `salt`), so results do not depend on the batch size), runs the network on batches of
/// `opts.batch_rows` draws (each x_t followed by its x_0 for `NetInput::NoisedThenClean`),
/// scores each draw with `score(draw, x_0, log_probs, row)` (`draw.xt` holds what the network
/// read), and returns the sequence length and each sequence's mean score.
#[allow(clippy::too_many_arguments)]
pub(crate) fn mc_means<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    salt: u64,
    input: NetInput,
    progress: &mut dyn FnMut(usize),
    mut draw: impl FnMut(&[Token], &mut StdRng) -> Result<(f64, Vec<f64>, Vec<State>)>,
    mut score: impl FnMut(&Draw, &[u32], &LogProbs, usize) -> Result<f64>,
) -> Result<(usize, Vec<f64>)> {
    let vocab = denoiser.vocab();
    let n_seq = sequences.len();
    if n_seq == 0 {
        return Err(ObjectiveError::Input("no sequences to evaluate".into()));
    }
    let len = sequences[0].len();
    if opts.mc_samples == 0 || opts.batch_rows == 0 {
        return Err(ObjectiveError::Input(
            "mc_samples and the batch size must be at least 1".into(),
        ));
    }
    let mut sums = vec![0.0f64; n_seq];
    let mut pending: Vec<Draw> = Vec::new();
    let mut flush = |pending: &mut Vec<Draw>, sums: &mut Vec<f64>, den: &mut D| -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let rows = pending.iter().map(|r| (r.xt.as_slice(), r.t, r.seq));
        // the network input may be longer than x_0 (block diffusion: x_t then x_0)
        let lp = predict_rows(den, rows, pending[0].xt.len(), labels)?;
        for (b, r) in pending.iter().enumerate() {
            let est = score(r, &sequences[r.seq], &lp, b)?;
            if !est.is_finite() {
                return Err(ObjectiveError::Input(format!(
                    "evaluation produced a non-finite loss ({est}) for sequence {}",
                    r.seq
                )));
            }
            sums[r.seq] += est;
        }
        pending.clear();
        Ok(())
    };
    for (i, x0) in sequences.iter().enumerate() {
        if x0.len() != len {
            return Err(ObjectiveError::Input(format!(
                "sequence {i} has length {}, expected {len}",
                x0.len()
            )));
        }
        let toks = vocab.tokens(x0)?;
        let mut rng = StdRng::seed_from_u64(mix_seed(opts.seed, i as u64, salt));
        for _ in 0..opts.mc_samples {
            let (t, u, xt) = draw(&toks, &mut rng)?;
            let mut xt: Vec<u32> = xt
                .iter()
                .map(|s| match s {
                    State::Real(tok) => tok.id(),
                    State::Mask => vocab.mask_id(),
                })
                .collect();
            if input == NetInput::NoisedThenClean {
                xt.extend_from_slice(x0);
            }
            pending.push(Draw { seq: i, t, u, xt });
            if pending.len() >= opts.batch_rows {
                flush(&mut pending, &mut sums, denoiser)?;
                progress(i + 1);
            }
        }
    }
    flush(&mut pending, &mut sums, denoiser)?;
    progress(n_seq);
    let k = opts.mc_samples as f64;
    Ok((len, sums.iter().map(|s| s / k).collect()))
}

/// Mean of per-sequence estimates and the standard error of that mean.
pub(crate) fn mean_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        values.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    (mean, (var / n as f64).sqrt())
}

/// MD4's negative ELBO of `sequences` (each `len` real token ids) under `denoiser` and `schedule`.
pub fn md4<D: Denoiser + ?Sized, S: MaskingSchedule<f64>>(
    denoiser: &mut D,
    schedule: &S,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<NelboEstimate> {
    md4_on(
        denoiser,
        schedule,
        sequences,
        labels,
        opts,
        progress,
        NetInput::Noised,
        None,
    )
}

/// [`md4`] with the network reading `input` (block diffusion: x_t then x_0) and, for
/// `per_block = Some(B)`, one time per block of B tokens (BD3-LM): a draw takes one u ~ U[0, 1)
/// and gives block j of the ⌈N / B⌉ blocks u_j = (u + j/⌈N / B⌉) mod 1 (the antithetic grid of
/// [`crate::tensor::block_times`] for one row: each u_j is marginally uniform, so every block's
/// term is unbiased), masks block j with α(t_j) and weights its cross-entropy with its own
/// coefficient; the network is given t_0 and must be time-free. With one block this is the
/// per-sequence draw, random numbers included.
#[allow(clippy::too_many_arguments)]
pub(crate) fn md4_on<D: Denoiser + ?Sized, S: MaskingSchedule<f64>>(
    denoiser: &mut D,
    schedule: &S,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    progress: &mut dyn FnMut(usize),
    input: NetInput,
    per_block: Option<usize>,
) -> Result<NelboEstimate> {
    let vocab = denoiser.vocab();
    let v = vocab.size();
    if per_block == Some(0) {
        return Err(ObjectiveError::Input(
            "block size must be at least 1".into(),
        ));
    }
    if per_block.is_some() && denoiser.is_time_conditioned() {
        return Err(ObjectiveError::PerBlockTimeNeedsTimeFree);
    }
    // positions sharing one time (a whole sequence without per-block times)
    let segment = |len: usize| per_block.unwrap_or(len).clamp(1, len.max(1));
    let time_of = |u: f64| -> Result<f64> {
        match opts.discrete_steps {
            None => Ok(u),
            Some(steps) => Ok(reference::discrete_times(u, steps)?.0),
        }
    };
    let draw = |toks: &[Token], rng: &mut StdRng| {
        let seg = segment(toks.len());
        let u0: f64 = rng.gen();
        let us = crate::tensor::block_grid(u0, 1, toks.len().div_ceil(seg));
        let mut xt = Vec::with_capacity(toks.len());
        for (part, &u) in toks.chunks(seg).zip(&us) {
            xt.extend(forward_sample(part, schedule.alpha(time_of(u)?), rng)?);
        }
        Ok((time_of(u0)?, us, xt))
    };
    let score = |r: &Draw, x0: &[u32], lp: &LogProbs, b: usize| {
        // Per time: Σ_{masked n} −log μ_n[x_0^n], rows renormalised in f64; only masked rows
        // are read, so a GPT-2 vocabulary costs no [len × V] f64 copy. (Zipping with x_0 reads
        // the noised half of a block network's input.)
        let seg = segment(x0.len());
        let mut ce = vec![0.0f64; r.u.len()];
        for (n, (&xt, &x)) in r.xt.iter().zip(x0).enumerate() {
            if xt == vocab.mask_id() {
                ce[n / seg] -= log_prob(lp.row(b, n), x as usize);
            }
        }
        let mut est = 0.0;
        for (&c, &u) in ce.iter().zip(&r.u) {
            if c == 0.0 {
                // Nothing masked (or a perfect prediction): the weight may be infinite at t = 0.
                continue;
            }
            est += c * match opts.discrete_steps {
                // Continuous time, eq. (4): −α'_t/(1 − α_t) · CE.
                None => -schedule.weight(u),
                // T-step ELBO (§3.2): T · (α_s − α_t)/(1 − α_t) · CE for the step u selects.
                Some(steps) => {
                    let (t, s) = reference::discrete_times(u, steps)?;
                    steps as f64 * reference::discrete_coefficient(schedule, s, t)?
                }
            };
        }
        Ok(est)
    };
    let (len, means) = mc_means(
        denoiser, sequences, labels, opts, MD4_STREAM, input, progress, draw, score,
    )?;
    let n_seq = means.len();
    let (mean, stderr) = mean_stderr(&means);
    let recon = reference::recon_term(schedule, len, v);
    let prior = reference::prior_kl(schedule, len, v);
    let to_bits = |nats: f64| nats / (len as f64 * std::f64::consts::LN_2);
    let bits = to_bits(mean + recon);
    Ok(NelboEstimate {
        sequences: n_seq,
        seq_len: len,
        mc_samples: opts.mc_samples,
        discrete_steps: opts.discrete_steps,
        diffusion_nats: mean,
        recon_nats: recon,
        prior_nats: prior,
        stderr_nats: stderr,
        bits_per_token: bits,
        stderr_bits: to_bits(stderr),
        bits_per_token_with_prior: to_bits(mean + recon + prior),
        perplexity: bits.exp2(),
    })
}

/// The search statistic of one candidate interval ([`md4_clip_variance`]).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct ClipVariance {
    pub mask_rate: MaskRate,
    /// Mean of the per-block clipped loss, nats per token (`L_[lo,hi]` / N for equal blocks).
    pub mean_nats: f64,
    /// Sample variance of the per-block clipped loss (nats per token, squared).
    pub variance: f64,
    /// Number of per-block values (sequences × K × blocks).
    pub values: usize,
}

/// The statistic of BD3-LM's clipped-schedule search (Arriola et al. 2025, §5; bd3lms
/// `validation_step` / `_clipped_schedule_search`): every sequence gets K draws whose mask rates
/// are uniform on `clip` ([`MaskRate::time_and_weight`]), one per sequence or, for
/// `blocks = Some((B, true))`, one per block of B tokens on the antithetic grid of one row; each
/// block's value is its clipped-loss term w·Σ_{masked n ∈ block} −log μ_n[x_0^n] divided by the
/// block's length (bd3lms' per-block mean of the token losses). Returns their mean and sample
/// variance over sequences × draws × blocks. The interval of least variance gives the
/// lowest-variance training gradient in bd3lms' heuristic. `blocks = None`: one block, the
/// whole sequence (MD4).
#[allow(clippy::too_many_arguments)]
pub fn md4_clip_variance<D: Denoiser + ?Sized, S: MaskingSchedule<f64>>(
    denoiser: &mut D,
    schedule: &S,
    sequences: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    input: NetInput,
    blocks: Option<(usize, bool)>,
    clip: MaskRate,
) -> Result<ClipVariance> {
    let vocab = denoiser.vocab();
    let per_block = blocks.is_some_and(|(_, p)| p);
    if blocks.is_some_and(|(b, _)| b == 0) {
        return Err(ObjectiveError::Input(
            "block size must be at least 1".into(),
        ));
    }
    if per_block && denoiser.is_time_conditioned() {
        return Err(ObjectiveError::PerBlockTimeNeedsTimeFree);
    }
    let segment = |len: usize| blocks.map_or(len, |(b, _)| b).clamp(1, len.max(1));
    let draw = |toks: &[Token], rng: &mut StdRng| {
        let seg = segment(toks.len());
        let k = toks.len().div_ceil(seg);
        let u0: f64 = rng.gen();
        let us = if per_block {
            crate::tensor::block_grid(u0, 1, k)
        } else {
            vec![u0; k]
        };
        let mut xt = Vec::with_capacity(toks.len());
        for (part, &u) in toks.chunks(seg).zip(&us) {
            let (t, _) = clip.time_and_weight(schedule, u)?;
            xt.extend(forward_sample(part, schedule.alpha(t), rng)?);
        }
        Ok((clip.time_and_weight(schedule, u0)?.0, us, xt))
    };
    let mut values: Vec<f64> = Vec::new();
    let score = |r: &Draw, x0: &[u32], lp: &LogProbs, b: usize| {
        let seg = segment(x0.len());
        let mut ce = vec![0.0f64; r.u.len()];
        for (n, (&xt, &x)) in r.xt.iter().zip(x0).enumerate() {
            if xt == vocab.mask_id() {
                ce[n / seg] -= log_prob(lp.row(b, n), x as usize);
            }
        }
        let mut total = 0.0;
        for (j, (&c, &u)) in ce.iter().zip(&r.u).enumerate() {
            let (_, w) = clip.time_and_weight(schedule, u)?;
            let v = if c == 0.0 { 0.0 } else { w * c };
            let size = seg.min(x0.len() - j * seg);
            values.push(v / size as f64);
            total += v;
        }
        Ok(total)
    };
    mc_means(
        denoiser,
        sequences,
        labels,
        opts,
        MD4_STREAM,
        input,
        &mut |_| {},
        draw,
        score,
    )?;
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    let variance = if n > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Ok(ClipVariance {
        mask_rate: clip,
        mean_nats: mean,
        variance,
        values: n,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_process::{LogProbs, ProcessError, Vocab};
    use maskdiff_schedule::{AnySchedule, Shifted};

    /// Predicts `probs` at every position regardless of input.
    struct Fixed {
        vocab: Vocab,
        log_p: Vec<f32>,
    }
    impl Denoiser for Fixed {
        fn vocab(&self) -> Vocab {
            self.vocab
        }
        fn is_time_conditioned(&self) -> bool {
            false
        }
        fn log_probs(
            &mut self,
            b: &DenoiseBatch<'_>,
        ) -> std::result::Result<LogProbs, ProcessError> {
            let data = (0..b.batch * b.len)
                .flat_map(|_| self.log_p.iter().copied())
                .collect();
            Ok(LogProbs {
                data,
                batch: b.batch,
                len: b.len,
                vocab: self.vocab.size(),
            })
        }
    }

    fn shifted(name: &str) -> Shifted<AnySchedule> {
        Shifted::new(name.parse().unwrap(), 1e-4).unwrap()
    }

    #[test]
    fn uniform_predictor_gives_log2_v_bits_within_a_few_standard_errors() {
        // Spec §11.7: uniform μ ⇒ E[diffusion] = (α̃_0 − α̃_1)·N·ln V = (1 − 2ε)·N·ln V, and with
        // the reconstruction ε·N·ln V the total is (1 − ε)·log2 V bits per token.
        let v = 27usize;
        let mut d = Fixed {
            vocab: Vocab::new(v).unwrap(),
            log_p: vec![-(v as f32).ln(); v],
        };
        let seqs: Vec<Vec<u32>> = (0..400)
            .map(|i| (0..32).map(|j| ((i * 7 + j * 3) % v) as u32).collect())
            .collect();
        // The T-step ELBO telescopes to the same value: Σ_i (α_{s_i} − α_{t_i})·N·ln V.
        for (name, discrete_steps) in [("linear", None), ("cosine", None), ("linear", Some(10))] {
            let opts = EvalOptions {
                mc_samples: 4,
                discrete_steps,
                batch_rows: 64,
                seed: 7,
            };
            let r = md4(&mut d, &shifted(name), &seqs, None, opts, &mut |_| {}).unwrap();
            let want = (1.0 - 1e-4) * (v as f64).log2();
            assert!(r.stderr_bits > 0.0);
            assert!(
                (r.bits_per_token - want).abs() < 4.0 * r.stderr_bits,
                "{name}: {r:?} vs {want}"
            );
            assert!((r.perplexity - r.bits_per_token.exp2()).abs() < 1e-9);
        }
    }

    #[test]
    fn perfect_predictor_has_zero_diffusion_loss_and_batching_does_not_matter() {
        // A denoiser that puts all mass on token 0, on data that is all zeros: CE = 0 exactly.
        let v = 5usize;
        let mut lp = vec![-1e9f32; v];
        lp[0] = 0.0;
        let mut d = Fixed {
            vocab: Vocab::new(v).unwrap(),
            log_p: lp,
        };
        let seqs = vec![vec![0u32; 16]; 10];
        let o = |rows| EvalOptions {
            mc_samples: 3,
            discrete_steps: Some(10),
            batch_rows: rows,
            seed: 1,
        };
        let a = md4(&mut d, &shifted("linear"), &seqs, None, o(1), &mut |_| {}).unwrap();
        let b = md4(&mut d, &shifted("linear"), &seqs, None, o(7), &mut |_| {}).unwrap();
        assert_eq!(a.diffusion_nats, 0.0);
        assert_eq!(a, b);
        // Only the reconstruction term remains: N·ε·ln V (spec §11.8's formula).
        assert!((a.recon_nats - 16.0 * 1e-4 * (5f64).ln()).abs() < 1e-12);
    }
}
