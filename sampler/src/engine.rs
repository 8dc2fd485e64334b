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
//!
//! Leftover masks after a block's last step (α̃(0) = 1 − ε < 1) are filled with the argmax of μ at
//! t = 0 (spec §6.1, the official `decode`). The denoiser sees constraint tokens from the start.

use crate::categorical::{argmax, inverse_cdf};
use crate::plan::{confidence_counts, step_times, unmask_prob};
use crate::rng::{CounterRng, Lane};
use crate::{
    Constraint, Reveal, SampleOutput, SamplerConfig, SamplerError, SamplerKind, ScheduleRef,
    Shaping, StepEvent,
};
use maskdiff_process::{reverse_step_genmd4, DenoiseBatch, Denoiser, LogProbs, ProcessError};
use maskdiff_schedule::PerTokenPolynomial;
use std::sync::Arc;

/// A denoiser output kept for reuse: valid while the sequence is unchanged (and, for
/// time-conditioned denoisers, at the same t).
struct Cache {
    out: Arc<LogProbs>,
    row: usize,
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
        Ok(Self {
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
        (self.local < blk.steps && !self.active().is_empty()).then_some(self.local)
    }

    fn step(&mut self, j: usize) -> Result<StepEvent, SamplerError> {
        let blk = self.blocks[self.block];
        let g = blk.first_step + j;
        let (t, s) = step_times(self.cfg.grid, blk.steps, j);
        let before = self.calls;
        let reveals = match (self.sched, self.cfg.kind) {
            (ScheduleRef::Md4(sc), kind) => {
                let p = unmask_prob(sc, t, s)?;
                match kind {
                    SamplerKind::Ancestral => self.md4_ancestral(g, t, p, true)?,
                    SamplerKind::Cached => self.md4_ancestral(g, t, p, false)?,
                    SamplerKind::Mean => self.md4_mean(g, t, p)?,
                    SamplerKind::FirstHitting => self.first_hitting(j, g, t)?,
                    SamplerKind::Confidence => self.confidence(j, g, t)?,
                }
            }
            (ScheduleRef::GenMd4(w), kind) => self.genmd4(w, kind, g, t, s)?,
        };
        self.apply(&reveals, g as u32 + 1);
        Ok(self.event(g + 1, t, s, false, reveals, before))
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
        self.ensure(&callers, t, !call_all)?;
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
        self.ensure(&active, t, false)?;
        let mut out = Vec::new();
        for &i in &active {
            for pos in self.eligible(i) {
                // Alg. 3 draws z at every masked position; only revealed ones are observable,
                // so z is computed only for those (same random numbers, same law).
                if self.u(i, g, pos, Lane::Reveal) < p {
                    let mu = self.shaped(i, pos)?;
                    let z = inverse_cdf(&mu, self.u(i, g, pos, Lane::Token));
                    out.push(self.reveal(i, pos, z, mu[z]));
                }
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
        self.ensure(&active, t, kind == SamplerKind::Cached)?;
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
                    cat.push(step.mask);
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
        self.ensure(&callers, t, true)?;
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
        self.ensure(&callers, t, true)?;
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
        let reuse = !matches!(self.cfg.kind, SamplerKind::Ancestral | SamplerKind::Mean);
        self.ensure(&active, 0.0, reuse)?;
        let mut out = Vec::new();
        for &i in &active {
            for pos in self.eligible(i) {
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
            calls: self.calls - calls_before,
            calls_so_far: self.calls,
        }
    }

    fn cache_valid(&self, i: usize, t: f64) -> bool {
        self.cache[i]
            .as_ref()
            .is_some_and(|c| c.version == self.version[i] && (self.time_free || c.t == t))
    }

    /// Make sure every sequence in `callers` has a denoiser output for its current state at t:
    /// one batched call for those without a valid cached one (all of them when `reuse` is off).
    fn ensure(&mut self, callers: &[usize], t: f64, reuse: bool) -> Result<(), SamplerError> {
        let need: Vec<usize> = callers
            .iter()
            .copied()
            .filter(|&i| !reuse || !self.cache_valid(i, t))
            .collect();
        if need.is_empty() {
            return Ok(());
        }
        let len = self.cfg.length;
        let ids: Vec<u32> = need
            .iter()
            .flat_map(|&i| self.state[i].iter().copied())
            .collect();
        let ts = vec![t; need.len()];
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
        let out = self.den.log_probs(&batch)?;
        if out.batch != need.len()
            || out.len != len
            || out.vocab != self.vocab
            || out.data.len() != need.len() * len * self.vocab
        {
            return Err(ProcessError::Shape(format!(
                "denoiser returned [{}, {}, {}] ({} values) for a batch of [{}, {}, {}]",
                out.batch,
                out.len,
                out.vocab,
                out.data.len(),
                need.len(),
                len,
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
        for (row, &i) in need.iter().enumerate() {
            self.nfe[i] += 1;
            self.cache[i] = Some(Cache {
                out: Arc::clone(&out),
                row,
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
        let row = c.out.row(c.row, pos);
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
