//! The sampling engine: a [`Sampler`] is an iterator of [`StepEvent`]s (streaming; drop it to
//! stop early, [`Sampler::snapshot`] shows the partial state) that runs every
//! [`SamplerKind`] over chunks of at most `batch_size` sequences and, optionally, left-to-right
//! blocks (semi-autoregressive generation).
//!
//! Per masked position and step (t → s) the draws are (paper Alg. 2 / Alg. 3, eq. (11)):
//! * MD4 ancestral: one uniform u; reveal iff u < p_unmask, and then the token is the inverse CDF
//!   of μ at u / p_unmask. This is exactly the inverse CDF of the (V+1)-way categorical
//!   (p·μ_0, …, p·μ_{V−1}, 1 − p) with the real tokens first, written so that the reveal decision
//!   needs no network output — which is what lets `Cached` skip calls with identical results.
//! * GenMD4 ancestral: the inverse CDF of `reverse_step_genmd4`'s (V+1) probabilities.
//! * Mean (Alg. 3): z = inverse CDF of μ at an independent uniform, revealed with probability
//!   p_unmask (GenMD4: 1 − (s/t)^{w_z}).
//! * First-hitting: each position's reveal step j is drawn once from the survival law
//!   P(masked after step j) = (1 − α_{s_j})/(1 − α_1) (the product of the per-step stay
//!   probabilities telescopes), by binary search; tokens are drawn from μ(x_{t_j}, t_j) at the
//!   step they are revealed. Steps where no position is revealed never call the network.
//! * Confidence: every masked position proposes z from the reshaped μ; the k proposals with the
//!   highest model probability μ_z are kept.
//! * ReMDM (Wang et al. 2025), from the state at t: a revealed position (not constraint-fixed,
//!   in the current block) is masked again iff its `Remask` uniform is < σ; a masked position
//!   takes the ancestral draw with p_unmask replaced by (α_s − (1 − σ) α_t)/(1 − α_t). So every
//!   position keeps the forward marginal P(x_s = v) = α_s x_v when μ is exact, and σ = 0 is
//!   Alg. 2 with the same random numbers. GenMD4: the same per token value v (α_{·,v}, σ_v).
//! * Threshold (Fast-dLLM): every masked position proposes z as in `Confidence`; all proposals
//!   with μ_z > τ are revealed, at least max(1, ⌈#masked / steps left⌉) of them (the most
//!   confident), so a block always finishes within its steps. The denoiser sees the time at
//!   which the schedule's expected mask fraction equals the sequence's current one.
//!
//! ReMDM and the threshold rule are per-block step rules: a block sampler runs them inside
//! each block (here: the semi-autoregressive blocks of `block_size`).
//!
//! Leftover masks after a block's last step (α̃(0) = 1 − ε < 1) are filled with the argmax of μ at
//! t = 0 (spec §6.1, the official `decode`). The denoiser sees constraint tokens from the start.

use crate::categorical::{argmax, inverse_cdf};
use crate::plan::{
    confidence_counts, invert_increasing, remdm_conf_weights, remdm_sigma, remdm_sigma_max,
    remdm_unmask_prob, step_times, unmask_prob, LoopMap,
};
use crate::rng::{CounterRng, Lane};
use crate::{
    Constraint, Remask, RemdmStrategy, Reveal, SampleOutput, SamplerConfig, SamplerError,
    SamplerKind, ScheduleRef, Shaping, StepEvent,
};
use maskdiff_process::{reverse_step_genmd4, DenoiseBatch, Denoiser, ProcessError, RowLogProbs};
use maskdiff_schedule::PerTokenPolynomial;
use std::sync::Arc;

/// A denoiser output kept for reuse: valid while the sequence is unchanged (and, for
/// time-conditioned denoisers, at the same t), at the positions it holds. It is sequence `seq`
/// of a batched answer, at the positions the step asked for: the ones it reveals (ancestral,
/// cached, first-hitting, ReMDM, mean) or the masked ones it ranks or reveals by their μ
/// (confidence, threshold, GenMD4, the final fill), never the decoded ones.
struct Cache {
    out: Arc<RowLogProbs>,
    seq: usize,
    t: f64,
    version: u64,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    start: usize,
    end: usize,
    first_step: usize,
    steps: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Init,
    Steps,
    Fill,
}

/// A sampling run in progress; iterate it for step events, or call [`Sampler::run`].
pub struct Sampler<'a, D: Denoiser + ?Sized> {
    den: &'a mut D,
    sched: ScheduleRef<'a>,
    cfg: SamplerConfig,
    shaping: Shaping,
    vocab: usize,
    mask: u32,
    time_free: bool,
    rng: CounterRng,
    labels: Option<Vec<u32>>,
    state: Vec<Vec<u32>>,
    reveal_step: Vec<Vec<u32>>,
    nfe: Vec<u32>,
    version: Vec<u64>,
    cache: Vec<Option<Cache>>,
    calls: u64,
    blocks: Vec<Block>,
    num_chunks: usize,
    chunk: usize,
    block: usize,
    local: usize,
    phase: Phase,
    /// First-hitting plan of the current chunk and block: per sequence, (step, position) sorted.
    hits: Vec<Vec<(usize, usize)>>,
    hit_next: Vec<usize>,
    /// Confidence sampler: per sequence of the chunk, the reveal count of every step.
    counts: Vec<Vec<usize>>,
    /// Threshold sampler: per sequence of the chunk, the masked count at the block's start.
    start_masked: Vec<usize>,
    /// Per position, the probability its current token was drawn with (ReMDM's confidence ψ).
    conf: Vec<Vec<f64>>,
    /// ReMDM's loop schedule (MD4).
    loop_map: Option<LoopMap>,
    finished: bool,
    failed: bool,
}

impl<'a, D: Denoiser + ?Sized> Sampler<'a, D> {
    /// Validate everything and set up the initial states (constraint tokens in place, masks
    /// elsewhere). `constraints`: empty (unconditional), one shared by all samples, or one per
    /// sample. `labels`: one class label per sample, passed to the denoiser.
    pub fn new(
        denoiser: &'a mut D,
        schedule: impl Into<ScheduleRef<'a>>,
        config: &SamplerConfig,
        constraints: &[Constraint],
        labels: Option<&[u32]>,
    ) -> Result<Self, SamplerError> {
        let sched = schedule.into();
        config.validate()?;
        let shaping = config.shaping()?;
        let vocab = denoiser.vocab();
        let n = config.num_samples;
        let time_free = !denoiser.is_time_conditioned();
        if let ScheduleRef::GenMd4(w) = sched {
            if w.vocab() != vocab.size() {
                return Err(SamplerError::VocabMismatch {
                    denoiser: vocab.size(),
                    schedule: w.vocab(),
                });
            }
            match config.kind {
                SamplerKind::Remdm if config.remdm.loop_.is_some() => {
                    return Err(SamplerError::Unsupported {
                        kind: "remdm",
                        what: "the loop schedule with GenMD4 schedules",
                    })
                }
                SamplerKind::FirstHitting | SamplerKind::Confidence => {
                    return Err(SamplerError::Unsupported {
                        kind: config.kind.name(),
                        what: "GenMD4 schedules",
                    })
                }
                SamplerKind::Cached if !time_free => {
                    return Err(SamplerError::Unsupported {
                        kind: "cached",
                        what: "GenMD4 with a time-conditioned denoiser",
                    })
                }
                _ => {}
            }
        }
        if let Some(l) = labels {
            if l.len() != n {
                return Err(SamplerError::LabelCount {
                    got: l.len(),
                    samples: n,
                });
            }
            let classes = denoiser.num_classes();
            if classes == 0 {
                return Err(SamplerError::LabelsUnsupported);
            }
            if let Some(&label) = l.iter().find(|&&x| x as usize >= classes) {
                return Err(SamplerError::LabelOutOfRange { label, classes });
            }
        }
        let resolved: Vec<Vec<Option<u32>>> = match constraints.len() {
            0 => vec![vec![None; config.length]],
            1 => vec![constraints[0].resolve(config.length, vocab)?],
            k if k == n => constraints
                .iter()
                .map(|c| c.resolve(config.length, vocab))
                .collect::<Result<_, _>>()?,
            k => return Err(SamplerError::ConstraintCount { got: k, samples: n }),
        };
        let mask = vocab.mask_id();
        let fixed = |i: usize| &resolved[if resolved.len() == 1 { 0 } else { i }];
        let state: Vec<Vec<u32>> = (0..n)
            .map(|i| fixed(i).iter().map(|f| f.unwrap_or(mask)).collect())
            .collect();
        let reveal_step = (0..n)
            .map(|i| {
                fixed(i)
                    .iter()
                    .map(|f| if f.is_some() { 0 } else { u32::MAX })
                    .collect()
            })
            .collect();

        let nb = config.num_blocks();
        let bsize = config.block_size.unwrap_or(config.length);
        let (base, rem) = (config.steps / nb, config.steps % nb);
        let mut blocks = Vec::with_capacity(nb);
        let mut first_step = 0;
        for b in 0..nb {
            let steps = base + usize::from(b < rem);
            blocks.push(Block {
                start: b * bsize,
                end: ((b + 1) * bsize).min(config.length),
                first_step,
                steps,
            });
            first_step += steps;
        }
        let loop_map = match (sched, config.remdm.loop_) {
            (ScheduleRef::Md4(sc), Some(l)) if config.kind == SamplerKind::Remdm => {
                Some(LoopMap::new(sc, &l))
            }
            _ => None,
        };
        Ok(Self {
            conf: vec![vec![0.0; config.length]; n],
            start_masked: Vec::new(),
            loop_map,
            den: denoiser,
            sched,
            cfg: config.clone(),
            shaping,
            vocab: vocab.size(),
            mask,
            time_free,
            rng: CounterRng::new(config.seed),
            labels: labels.map(<[u32]>::to_vec),
            state,
            reveal_step,
            nfe: vec![0; n],
            version: vec![0; n],
            cache: (0..n).map(|_| None).collect(),
            calls: 0,
            blocks,
            num_chunks: n.div_ceil(config.batch_size),
            chunk: 0,
            block: 0,
            local: 0,
            phase: Phase::Init,
            hits: Vec::new(),
            hit_next: Vec::new(),
            counts: Vec::new(),
            finished: false,
            failed: false,
        })
    }

    /// Run all remaining steps and return the finished samples.
    pub fn run(mut self) -> Result<SampleOutput, SamplerError> {
        for ev in self.by_ref() {
            ev?;
        }
        Ok(self.snapshot())
    }

    /// The current state of every sample (masks shown as V until the run completes).
    pub fn snapshot(&self) -> SampleOutput {
        SampleOutput {
            sequences: self.state.clone(),
            reveal_step: self.reveal_step.clone(),
            nfe: self.nfe.clone(),
            calls: self.calls,
            total_steps: self.cfg.steps,
            complete: self.finished,
        }
    }

    /// Per-sample denoiser calls so far.
    pub fn nfe(&self) -> &[u32] {
        &self.nfe
    }
    pub fn total_steps(&self) -> usize {
        self.cfg.steps
    }
    pub fn num_chunks(&self) -> usize {
        self.num_chunks
    }
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    fn chunk_range(&self) -> std::ops::Range<usize> {
        let start = self.chunk * self.cfg.batch_size;
        start..(start + self.cfg.batch_size).min(self.cfg.num_samples)
    }

    /// Masked positions of sequence `i` inside the current block.
    fn eligible(&self, i: usize) -> Vec<usize> {
        let b = self.blocks[self.block];
        (b.start..b.end)
            .filter(|&n| self.state[i][n] == self.mask)
            .collect()
    }

    fn active(&self) -> Vec<usize> {
        self.chunk_range()
            .filter(|&i| !self.eligible(i).is_empty())
            .collect()
    }

    fn u(&self, i: usize, step: usize, pos: usize, lane: Lane) -> f64 {
        self.rng.uniform(
            self.cfg.first_index.wrapping_add(i as u64),
            step as u64,
            pos as u64,
            lane,
        )
    }

    fn advance(&mut self) -> Result<Option<StepEvent>, SamplerError> {
        loop {
            if self.chunk >= self.num_chunks {
                return Ok(None);
            }
            if self.block >= self.blocks.len() {
                for i in self.chunk_range() {
                    self.cache[i] = None;
                }
                self.chunk += 1;
                self.block = 0;
                self.phase = Phase::Init;
                continue;
            }
            match self.phase {
                Phase::Init => {
                    self.init_block()?;
                    self.local = 0;
                    self.phase = Phase::Steps;
                }
                Phase::Steps => {
                    if let Some(j) = self.next_step() {
                        self.local = j + 1;
                        return self.step(j).map(Some);
                    }
                    self.phase = Phase::Fill;
                }
                Phase::Fill => {
                    let ev = self.fill()?;
                    self.block += 1;
                    self.phase = Phase::Init;
                    if ev.is_some() {
                        return Ok(ev);
                    }
                }
            }
        }
    }

    fn init_block(&mut self) -> Result<(), SamplerError> {
        let blk = self.blocks[self.block];
        let range = self.chunk_range();
        self.hits.clear();
        self.hit_next.clear();
        self.counts.clear();
        self.start_masked.clear();
        if self.cfg.kind == SamplerKind::Threshold {
            for i in range.clone() {
                let m = self.eligible(i).len();
                self.start_masked.push(m);
            }
        }
        let ScheduleRef::Md4(sched) = self.sched else {
            return Ok(());
        };
        match self.cfg.kind {
            SamplerKind::FirstHitting => {
                let top = sched.one_minus_alpha(1.0);
                let grid = self.cfg.grid;
                let surv = |j: usize| {
                    let (_, s) = step_times(grid, blk.steps, j);
                    sched.one_minus_alpha(s) / top
                };
                for i in range {
                    let mut plan = Vec::new();
                    for pos in self.eligible(i) {
                        let u = self.u(i, blk.first_step, pos, Lane::Hit);
                        // Masked after step j iff u < S_j; S is non-increasing, so the reveal
                        // step is the first j with S_j <= u.
                        if surv(blk.steps - 1) > u {
                            continue; // survives every step: final fill
                        }
                        let (mut lo, mut hi) = (0, blk.steps - 1);
                        while lo < hi {
                            let mid = (lo + hi) / 2;
                            if surv(mid) <= u {
                                hi = mid;
                            } else {
                                lo = mid + 1;
                            }
                        }
                        plan.push((lo, pos));
                    }
                    plan.sort_unstable();
                    self.hits.push(plan);
                    self.hit_next.push(0);
                }
            }
            SamplerKind::Confidence => {
                for i in range {
                    let m0 = self.eligible(i).len();
                    self.counts
                        .push(confidence_counts(sched, self.cfg.grid, blk.steps, m0)?);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The next local step with possible work, if any.
    fn next_step(&self) -> Option<usize> {
        let blk = self.blocks[self.block];
        if self.cfg.kind == SamplerKind::FirstHitting && !self.sched.is_genmd4() {
            return self
                .hits
                .iter()
                .zip(&self.hit_next)
                .filter_map(|(h, &k)| h.get(k).map(|x| x.0))
                .min();
        }
        if self.local >= blk.steps {
            return None;
        }
        let remasking = self.cfg.kind == SamplerKind::Remdm
            && (self.cfg.remdm.eta > 0.0 || self.cfg.remdm.strategy == RemdmStrategy::Conf);
        let busy = !self.active().is_empty()
            || (remasking && self.chunk_range().any(|i| !self.remaskable(i).is_empty()));
        busy.then_some(self.local)
    }

    /// Revealed, not constraint-fixed positions of sequence `i` inside the current block: the
    /// ones ReMDM may mask again.
    fn remaskable(&self, i: usize) -> Vec<usize> {
        let b = self.blocks[self.block];
        (b.start..b.end)
            .filter(|&n| self.state[i][n] != self.mask && self.reveal_step[i][n] != 0)
            .collect()
    }

    fn step(&mut self, j: usize) -> Result<StepEvent, SamplerError> {
        let blk = self.blocks[self.block];
        let g = blk.first_step + j;
        let (t, s) = step_times(self.cfg.grid, blk.steps, j);
        let before = self.calls;
        let mut remasks = Vec::new();
        let mut times = (t, s);
        let reveals = match (self.sched, self.cfg.kind) {
            (ScheduleRef::Md4(sc), SamplerKind::Remdm) => {
                let (tt, ts, on) = match self.loop_map {
                    Some(m) => (m.tau(t), m.tau(s), m.holds(t, s)),
                    None => (t, s, true),
                };
                let p = unmask_prob(sc, tt, ts)?;
                let (a_t, om_t) = (sc.alpha(tt), sc.one_minus_alpha(tt));
                let smax = if on {
                    remdm_sigma_max(sc.one_minus_alpha(ts), a_t)
                } else {
                    0.0
                };
                remasks = self.remask_draws(g, |_| smax);
                let sigma = match self.cfg.remdm.strategy {
                    RemdmStrategy::Conf => 0.0,
                    st => remdm_sigma(st, self.cfg.remdm.eta, smax),
                };
                let pp = remdm_unmask_prob(p, sigma, a_t, om_t);
                self.md4_ancestral(g, tt, pp, true)?
            }
            (ScheduleRef::GenMd4(w), SamplerKind::Remdm) => {
                let smax = |v: usize| remdm_sigma_max(w.one_minus_alpha(s, v), w.alpha(t, v));
                remasks = self.remask_draws(g, smax);
                self.genmd4(w, SamplerKind::Remdm, g, t, s)?
            }
            (_, SamplerKind::Threshold) => {
                let (r, tt, ts) = self.threshold(j, g)?;
                times = (tt, ts);
                r
            }
            (ScheduleRef::Md4(sc), kind) => {
                let p = unmask_prob(sc, t, s)?;
                match kind {
                    SamplerKind::Ancestral => self.md4_ancestral(g, t, p, true)?,
                    SamplerKind::Cached => self.md4_ancestral(g, t, p, false)?,
                    SamplerKind::Mean => self.md4_mean(g, t, p)?,
                    SamplerKind::FirstHitting => self.first_hitting(j, g, t)?,
                    SamplerKind::Confidence => self.confidence(j, g, t)?,
                    SamplerKind::Remdm | SamplerKind::Threshold => unreachable!("matched above"),
                }
            }
            (ScheduleRef::GenMd4(w), kind) => self.genmd4(w, kind, g, t, s)?,
        };
        self.apply_remasks(&remasks);
        self.apply(&reveals, g as u32 + 1);
        let mut ev = self.event(g + 1, times.0, times.1, false, reveals, before);
        ev.remasked = remasks;
        Ok(ev)
    }

    /// ReMDM's remasking coins for the chunk's remaskable positions at global step `g`, given
    /// σ_max as a function of the token held (constant for MD4).
    fn remask_draws(&self, g: usize, sigma_max: impl Fn(usize) -> f64) -> Vec<Remask> {
        let rc = self.cfg.remdm;
        let mut out = Vec::new();
        for i in self.chunk_range() {
            let pos = self.remaskable(i);
            let weights = (rc.strategy == RemdmStrategy::Conf).then(|| {
                let psi: Vec<f64> = pos.iter().map(|&n| self.conf[i][n]).collect();
                remdm_conf_weights(&psi)
            });
            for (k, &n) in pos.iter().enumerate() {
                let token = self.state[i][n];
                let smax = sigma_max(token as usize);
                let sigma = match &weights {
                    Some(w) => w[k] * smax,
                    None => remdm_sigma(rc.strategy, rc.eta, smax),
                };
                if sigma > 0.0 && self.u(i, g, n, Lane::Remask) < sigma {
                    out.push(Remask {
                        sequence: i,
                        position: n,
                        token,
                    });
                }
            }
        }
        out
    }

    fn apply_remasks(&mut self, remasks: &[Remask]) {
        for r in remasks {
            self.state[r.sequence][r.position] = self.mask;
            self.reveal_step[r.sequence][r.position] = u32::MAX;
            self.version[r.sequence] += 1;
        }
    }

    /// The time at which the schedule's expected masked fraction (1 − α_t)/(1 − α_1) equals
    /// `ratio` (GenMD4: averaged over token values).
    fn time_of_mask_ratio(&self, ratio: f64) -> f64 {
        match self.sched {
            ScheduleRef::Md4(sc) => {
                let top = sc.one_minus_alpha(1.0);
                invert_increasing(|t| sc.one_minus_alpha(t) / top, ratio)
            }
            ScheduleRef::GenMd4(w) => {
                let v = w.vocab();
                invert_increasing(
                    |t| {
                        (0..v)
                            .map(|k| w.one_minus_alpha(t, k) / w.one_minus_alpha(1.0, k))
                            .sum::<f64>()
                            / v as f64
                    },
                    ratio,
                )
            }
        }
    }

    /// One step of the confidence-threshold sampler; returns the reveals and the largest time
    /// of the chunk's sequences before and after the step.
    fn threshold(&mut self, j: usize, g: usize) -> Result<(Vec<Reveal>, f64, f64), SamplerError> {
        let blk = self.blocks[self.block];
        let range = self.chunk_range();
        let steps_left = blk.steps - j;
        let mut callers = Vec::new();
        for i in range.clone() {
            let m = self.eligible(i).len();
            if m > 0 {
                let m0 = self.start_masked[i - range.start].max(1);
                callers.push((i, self.time_of_mask_ratio(m as f64 / m0 as f64)));
            }
        }
        self.ensure_masked(&callers, true)?;
        let tau = self.cfg.threshold;
        let mut out = Vec::new();
        let (mut t_max, mut s_max) = (0.0f64, 0.0f64);
        for &(i, t) in &callers {
            let elig = self.eligible(i);
            let mut scored = Vec::with_capacity(elig.len());
            for &pos in &elig {
                let raw = self.probs(i, pos)?;
                let mu = self.shaping.apply(raw.clone());
                let z = inverse_cdf(&mu, self.u(i, g, pos, Lane::Token));
                scored.push((raw[z], pos, z));
            }
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let k_min = elig.len().div_ceil(steps_left).max(1);
            let k = scored.iter().filter(|x| x.0 > tau).count().max(k_min);
            scored.truncate(k);
            scored.sort_by_key(|x| x.1);
            let left = elig.len() - scored.len();
            let m0 = self.start_masked[i - range.start].max(1);
            t_max = t_max.max(t);
            s_max = s_max.max(if left == 0 {
                0.0
            } else {
                self.time_of_mask_ratio(left as f64 / m0 as f64)
            });
            out.extend(
                scored
                    .into_iter()
                    .map(|(p, pos, z)| self.reveal(i, pos, z, p)),
            );
        }
        Ok((out, t_max, s_max))
    }

    fn md4_ancestral(
        &mut self,
        g: usize,
        t: f64,
        p: f64,
        call_all: bool,
    ) -> Result<Vec<Reveal>, SamplerError> {
        let active = self.active();
        let mut cands = Vec::new();
        for &i in &active {
            for pos in self.eligible(i) {
                let u = self.u(i, g, pos, Lane::Reveal);
                if u < p {
                    cands.push((i, pos, u));
                }
            }
        }
        let callers = if call_all {
            active
        } else {
            let mut c: Vec<usize> = cands.iter().map(|c| c.0).collect();
            c.dedup();
            c
        };
        // only the revealed positions' μ is read (the reveal coins need no network output)
        let rows = rows_of(&callers, cands.iter().map(|c| (c.0, c.1)));
        self.ensure_rows(&callers, &rows, t, !call_all)?;
        cands
            .into_iter()
            .map(|(i, pos, u)| {
                let mu = self.shaped(i, pos)?;
                let k = inverse_cdf(&mu, u / p);
                Ok(self.reveal(i, pos, k, mu[k]))
            })
            .collect()
    }

    fn md4_mean(&mut self, g: usize, t: f64, p: f64) -> Result<Vec<Reveal>, SamplerError> {
        let active = self.active();
        // Alg. 3 draws z at every masked position; only revealed ones are observable, so z is
        // computed (and μ asked for) only there: same random numbers, same law. Every active
        // sequence is still called, as Alg. 3 evaluates the network at every step.
        let rows: Vec<Vec<usize>> = active
            .iter()
            .map(|&i| {
                (self.eligible(i).into_iter())
                    .filter(|&pos| self.u(i, g, pos, Lane::Reveal) < p)
                    .collect()
            })
            .collect();
        self.ensure_rows(&active, &rows, t, false)?;
        let mut out = Vec::new();
        for (&i, rows) in active.iter().zip(&rows) {
            for &pos in rows {
                let mu = self.shaped(i, pos)?;
                let z = inverse_cdf(&mu, self.u(i, g, pos, Lane::Token));
                out.push(self.reveal(i, pos, z, mu[z]));
            }
        }
        Ok(out)
    }

    /// One GenMD4 step (eq. (11)) with the per-token schedule `w` the caller matched on.
    fn genmd4(
        &mut self,
        w: &PerTokenPolynomial,
        kind: SamplerKind,
        g: usize,
        t: f64,
        s: f64,
    ) -> Result<Vec<Reveal>, SamplerError> {
        let active = self.active();
        let at: Vec<(usize, f64)> = active.iter().map(|&i| (i, t)).collect();
        self.ensure_masked(&at, kind == SamplerKind::Cached)?;
        let rc = self.cfg.remdm;
        let remdm = kind == SamplerKind::Remdm && rc.strategy != RemdmStrategy::Conf;
        let mut out = Vec::new();
        for &i in &active {
            for pos in self.eligible(i) {
                let mu = self.shaped(i, pos)?;
                let u = self.u(i, g, pos, Lane::Reveal);
                if kind == SamplerKind::Mean {
                    let z = inverse_cdf(&mu, self.u(i, g, pos, Lane::Token));
                    if u < w.reveal_prob(s, t, z) {
                        out.push(self.reveal(i, pos, z, mu[z]));
                    }
                } else {
                    let step = reverse_step_genmd4(&mu, w, s, t)?;
                    let mut cat = step.real;
                    let mut stay = step.mask;
                    if remdm {
                        // ReMDM per token value: + σ_v α_{t,v}/(1 − α_{t,v}) μ_v moves from
                        // "stay masked" to v; σ_v ≤ σ_max,v keeps "stay masked" ≥ 0.
                        for (v, c) in cat.iter_mut().enumerate() {
                            let a_t = w.alpha(t, v);
                            let smax = remdm_sigma_max(w.one_minus_alpha(s, v), a_t);
                            let sigma = remdm_sigma(rc.strategy, rc.eta, smax);
                            if sigma > 0.0 {
                                let extra = sigma * a_t / w.one_minus_alpha(t, v) * mu[v];
                                *c += extra;
                                stay -= extra;
                            }
                        }
                        stay = stay.max(0.0);
                    }
                    cat.push(stay);
                    let k = inverse_cdf(&cat, u);
                    if k < self.vocab {
                        out.push(self.reveal(i, pos, k, mu[k]));
                    }
                }
            }
        }
        Ok(out)
    }

    fn first_hitting(&mut self, j: usize, g: usize, t: f64) -> Result<Vec<Reveal>, SamplerError> {
        let start = self.chunk_range().start;
        let mut cands = Vec::new();
        for (c, plan) in self.hits.iter().enumerate() {
            let k = &mut self.hit_next[c];
            while *k < plan.len() && plan[*k].0 == j {
                cands.push((start + c, plan[*k].1));
                *k += 1;
            }
        }
        let mut callers: Vec<usize> = cands.iter().map(|c| c.0).collect();
        callers.dedup();
        let rows = rows_of(&callers, cands.iter().copied());
        self.ensure_rows(&callers, &rows, t, true)?;
        cands
            .into_iter()
            .map(|(i, pos)| {
                let mu = self.shaped(i, pos)?;
                let k = inverse_cdf(&mu, self.u(i, g, pos, Lane::Token));
                Ok(self.reveal(i, pos, k, mu[k]))
            })
            .collect()
    }

    fn confidence(&mut self, j: usize, g: usize, t: f64) -> Result<Vec<Reveal>, SamplerError> {
        let range = self.chunk_range();
        let callers: Vec<usize> = range
            .clone()
            .filter(|&i| self.counts[i - range.start][j] > 0)
            .collect();
        let at: Vec<(usize, f64)> = callers.iter().map(|&i| (i, t)).collect();
        self.ensure_masked(&at, true)?;
        let mut out = Vec::new();
        for &i in &callers {
            let k = self.counts[i - range.start][j];
            let mut scored = Vec::new();
            for pos in self.eligible(i) {
                // Propose from the reshaped law, rank by the model's own probability (as
                // LLaDA does), so that greedy proposals still have informative confidences.
                let raw = self.probs(i, pos)?;
                let mu = self.shaping.apply(raw.clone());
                let z = inverse_cdf(&mu, self.u(i, g, pos, Lane::Token));
                scored.push((raw[z], pos, z));
            }
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            scored.truncate(k);
            scored.sort_by_key(|x| x.1);
            out.extend(
                scored
                    .into_iter()
                    .map(|(p, pos, z)| self.reveal(i, pos, z, p)),
            );
        }
        Ok(out)
    }

    /// Fill the current block's leftover masks with the argmax of μ at t = 0.
    fn fill(&mut self) -> Result<Option<StepEvent>, SamplerError> {
        let active = self.active();
        if active.is_empty() {
            return Ok(None);
        }
        let blk = self.blocks[self.block];
        let before = self.calls;
        let reuse = !matches!(
            self.cfg.kind,
            SamplerKind::Ancestral | SamplerKind::Mean | SamplerKind::Remdm
        );
        let rows: Vec<Vec<usize>> = active.iter().map(|&i| self.eligible(i)).collect();
        self.ensure_rows(&active, &rows, 0.0, reuse)?;
        let mut out = Vec::new();
        for (&i, rows) in active.iter().zip(rows) {
            for pos in rows {
                let mu = self.probs(i, pos)?;
                let k = argmax(&mu);
                out.push(self.reveal(i, pos, k, mu[k]));
            }
        }
        let step = blk.first_step + blk.steps;
        self.apply(&out, step as u32);
        Ok(Some(self.event(step, 0.0, 0.0, true, out, before)))
    }

    fn reveal(&self, i: usize, pos: usize, token: usize, prob: f64) -> Reveal {
        Reveal {
            sequence: i,
            position: pos,
            token: token as u32,
            prob,
        }
    }

    fn apply(&mut self, reveals: &[Reveal], step: u32) {
        for r in reveals {
            self.conf[r.sequence][r.position] = r.prob;
            self.state[r.sequence][r.position] = r.token;
            self.reveal_step[r.sequence][r.position] = step;
            self.version[r.sequence] += 1;
        }
    }

    fn event(
        &self,
        step: usize,
        t: f64,
        s: f64,
        final_fill: bool,
        revealed: Vec<Reveal>,
        calls_before: u64,
    ) -> StepEvent {
        StepEvent {
            chunk: self.chunk,
            num_chunks: self.num_chunks,
            block: self.block,
            num_blocks: self.blocks.len(),
            step,
            total_steps: self.cfg.steps,
            t,
            s,
            final_fill,
            revealed,
            remasked: Vec::new(),
            calls: self.calls - calls_before,
            calls_so_far: self.calls,
        }
    }

    /// Whether sequence `i` has an output for its current state at t, at every position of
    /// `want`.
    fn cache_valid(&self, i: usize, t: f64, want: &[usize]) -> bool {
        self.cache[i].as_ref().is_some_and(|c| {
            c.version == self.version[i]
                && (self.time_free || c.t == t)
                && c.out.has_all(c.seq, want)
        })
    }

    /// Makes sure every sequence in `callers` has a denoiser output for its current state at t
    /// at the positions `rows[k]` of `callers[k]` (the only ones the step reads): one batched
    /// call ([`Denoiser::log_probs_rows`]) for those without a valid cached one (all of them
    /// when `reuse` is off).
    fn ensure_rows(
        &mut self,
        callers: &[usize],
        rows: &[Vec<usize>],
        t: f64,
        reuse: bool,
    ) -> Result<(), SamplerError> {
        let at: Vec<(usize, f64)> = callers.iter().map(|&i| (i, t)).collect();
        self.call(&at, rows, reuse)
    }

    /// [`Self::ensure_rows`] at every masked position of the current block (the steps that rank
    /// or reveal by μ there), with a time per sequence.
    fn ensure_masked(&mut self, callers: &[(usize, f64)], reuse: bool) -> Result<(), SamplerError> {
        let rows: Vec<Vec<usize>> = callers.iter().map(|&(i, _)| self.eligible(i)).collect();
        self.call(callers, &rows, reuse)
    }

    /// One batched call at the positions `rows[k]` of `callers[k]` for the callers without a
    /// valid cached output (all of them when `reuse` is off); checks the answer holds exactly
    /// the rows asked for, then caches it.
    fn call(
        &mut self,
        callers: &[(usize, f64)],
        rows: &[Vec<usize>],
        reuse: bool,
    ) -> Result<(), SamplerError> {
        let mut need = Vec::new();
        let mut ts = Vec::new();
        let mut need_rows = Vec::new();
        for (&(i, t), want) in callers.iter().zip(rows) {
            if !reuse || !self.cache_valid(i, t, want) {
                need.push(i);
                ts.push(t);
                need_rows.push(want.clone());
            }
        }
        if need.is_empty() {
            return Ok(());
        }
        let len = self.cfg.length;
        let ids: Vec<u32> = need
            .iter()
            .flat_map(|&i| self.state[i].iter().copied())
            .collect();
        let labels: Option<Vec<u32>> = self
            .labels
            .as_ref()
            .map(|l| need.iter().map(|&i| l[i]).collect());
        let batch = DenoiseBatch {
            ids: &ids,
            batch: need.len(),
            len,
            t: &ts,
            labels: labels.as_deref(),
        };
        self.store_rows(&need, &ts, &batch, need_rows)
    }

    /// The denoiser call of [`Self::call`] and the checks of its answer.
    fn store_rows(
        &mut self,
        need: &[usize],
        ts: &[f64],
        batch: &DenoiseBatch<'_>,
        rows: Vec<Vec<usize>>,
    ) -> Result<(), SamplerError> {
        let out = self.den.log_probs_rows(batch, &rows)?;
        let (offsets, positions) = RowLogProbs::layout(&rows, need.len(), self.cfg.length)?;
        if out.offsets != offsets
            || out.positions != positions
            || out.vocab != self.vocab
            || out.data.len() != positions.len() * self.vocab
        {
            return Err(ProcessError::Shape(format!(
                "denoiser returned {} rows of {} ({} values) for {} rows of {}",
                out.positions.len(),
                out.vocab,
                out.data.len(),
                positions.len(),
                self.vocab
            ))
            .into());
        }
        if out.data.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
            return Err(SamplerError::BadPrediction(
                "log-probabilities contain NaN or +inf".into(),
            ));
        }
        self.calls += 1;
        let out = Arc::new(out);
        for (seq, (&i, &t)) in need.iter().zip(ts).enumerate() {
            self.nfe[i] += 1;
            self.cache[i] = Some(Cache {
                out: Arc::clone(&out),
                seq,
                t,
                version: self.version[i],
            });
        }
        Ok(())
    }

    /// μ at (i, pos) in f64 from the cached output, renormalised; rejects NaN / +∞ / all −∞.
    fn probs(&self, i: usize, pos: usize) -> Result<Vec<f64>, SamplerError> {
        let c = self.cache[i]
            .as_ref()
            .ok_or_else(|| SamplerError::BadPrediction("no denoiser output".into()))?;
        // NaN and +inf were rejected when the output arrived.
        let row = c.out.find(c.seq, pos).ok_or_else(|| {
            SamplerError::BadPrediction(format!(
                "no denoiser output at sequence {i}, position {pos}"
            ))
        })?;
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
        if m == f64::NEG_INFINITY {
            return Err(SamplerError::BadPrediction(format!(
                "all log-probabilities at sequence {i}, position {pos} are -inf"
            )));
        }
        let mut p: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        Ok(p)
    }

    fn shaped(&self, i: usize, pos: usize) -> Result<Vec<f64>, SamplerError> {
        Ok(self.shaping.apply(self.probs(i, pos)?))
    }
}

impl<D: Denoiser + ?Sized> Iterator for Sampler<'_, D> {
    type Item = Result<StepEvent, SamplerError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished || self.failed {
            return None;
        }
        match self.advance() {
            Ok(Some(ev)) => Some(Ok(ev)),
            Ok(None) => {
                self.finished = true;
                None
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Per caller (in `callers`' order), its positions among `cands` ((sequence, position) pairs,
/// positions increasing within a sequence).
fn rows_of(callers: &[usize], cands: impl Iterator<Item = (usize, usize)>) -> Vec<Vec<usize>> {
    let mut rows = vec![Vec::new(); callers.len()];
    for (i, pos) in cands {
        if let Ok(k) = callers.binary_search(&i) {
            rows[k].push(pos);
        }
    }
    rows
}
