//! ReMDM (remasking) sampler: σ ≡ 0 is the ancestral sampler bit for bit; with remasking every
//! step keeps the forward marginal P(x_s = v) = α_s p_v (checked against that formula with an
//! exact denoiser of a product law, MD4 and GenMD4, with and without the loop schedule); on a
//! non-product toy joint the state law after every step matches an independent enumeration of
//! the ReMDM chain (cap and confidence strategies); σ = σ_max empties the "stay masked" branch.
//! Chi-square tests at level 1e−3 with fixed seeds.

mod common;

use common::*;
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_sampler::{
    sample, Constraint, RemdmConfig, RemdmLoop, RemdmStrategy, SampleOutput, Sampler,
    SamplerConfig, SamplerKind, StepEvent,
};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};
use std::collections::HashMap;

fn remdm(strategy: RemdmStrategy, eta: f64) -> RemdmConfig {
    RemdmConfig {
        strategy,
        eta,
        loop_: None,
    }
}

fn cfg(kind: SamplerKind, steps: usize, n: usize, len: usize, seed: u64) -> SamplerConfig {
    SamplerConfig {
        kind,
        steps,
        grid: SamplingGrid::Cosine,
        num_samples: n,
        length: len,
        seed,
        batch_size: 8,
        ..SamplerConfig::default()
    }
}

fn events_and_output<D: Denoiser>(
    den: &mut D,
    sched: maskdiff_sampler::ScheduleRef<'_>,
    c: &SamplerConfig,
    cons: &[Constraint],
) -> (Vec<StepEvent>, SampleOutput) {
    let mut s = Sampler::new(den, sched, c, cons, None).unwrap();
    let evs: Vec<StepEvent> = s.by_ref().map(Result::unwrap).collect();
    (evs, s.snapshot())
}

#[test]
fn sigma_zero_is_ancestral_bit_for_bit() {
    let shifted = Shifted::official(Linear);
    let genmd4 = PerTokenPolynomial::new(vec![1.0, 2.0, 0.5, 1.5, 3.0]).unwrap();
    for (gen, tc, block, prefix) in [
        (false, false, None, false),
        (false, true, Some(5), true),
        (true, false, None, true),
        (true, true, Some(4), false),
    ] {
        let sched = if gen {
            maskdiff_sampler::ScheduleRef::genmd4(&genmd4)
        } else {
            maskdiff_sampler::ScheduleRef::md4(&shifted)
        };
        let cons = if prefix {
            vec![Constraint::prefix(&[1, 3])]
        } else {
            vec![]
        };
        let mut base = cfg(SamplerKind::Ancestral, 40, 10, 12, 9);
        base.block_size = block;
        let (ev_a, out_a) = events_and_output(&mut HashDenoiser::new(5, tc), sched, &base, &cons);
        for strategy in [RemdmStrategy::Cap, RemdmStrategy::Rescale] {
            let c = SamplerConfig {
                kind: SamplerKind::Remdm,
                remdm: remdm(strategy, 0.0),
                ..base.clone()
            };
            let (ev_r, out_r) = events_and_output(&mut HashDenoiser::new(5, tc), sched, &c, &cons);
            assert_eq!(out_a, out_r, "genmd4 {gen}, tc {tc}, {strategy}");
            assert_eq!(ev_a, ev_r);
        }
        // With η > 0 the same run differs (remasking happened).
        let c = SamplerConfig {
            kind: SamplerKind::Remdm,
            remdm: remdm(RemdmStrategy::Cap, 0.3),
            ..base.clone()
        };
        let (ev_r, out_r) = events_and_output(&mut HashDenoiser::new(5, tc), sched, &c, &cons);
        assert!(ev_r.iter().any(|e| !e.remasked.is_empty()));
        assert_ne!(out_a.sequences, out_r.sequences);
        assert!(out_r.complete);
        assert!(out_r.sequences.iter().flatten().all(|&x| x < 5));
        if prefix {
            assert!(out_r.sequences.iter().all(|s| s[..2] == [1, 3]));
            // Constraint-fixed positions are never remasked.
            assert!(ev_r
                .iter()
                .flat_map(|e| &e.remasked)
                .all(|r| r.position >= 2));
        }
    }
}

#[test]
fn a_sample_does_not_depend_on_its_batch() {
    let sched = Shifted::official(Linear);
    for strategy in [RemdmStrategy::Cap, RemdmStrategy::Conf] {
        let mut c = cfg(SamplerKind::Remdm, 30, 9, 10, 4);
        c.remdm = remdm(strategy, 0.2);
        let all = sample(&mut HashDenoiser::new(4, true), &sched, &c, &[], None).unwrap();
        for i in [0usize, 5, 8] {
            let one = SamplerConfig {
                num_samples: 1,
                first_index: i as u64,
                batch_size: 1,
                ..c.clone()
            };
            let alone = sample(&mut HashDenoiser::new(4, true), &sched, &one, &[], None).unwrap();
            assert_eq!(alone.sequences[0], all.sequences[i]);
            assert_eq!(alone.reveal_step[0], all.reveal_step[i]);
        }
    }
}

/// Cell counts of the pooled (position) states after each step: tokens 0..V, then mask.
fn per_step_counts<D: Denoiser>(
    den: &mut D,
    sched: maskdiff_sampler::ScheduleRef<'_>,
    c: &SamplerConfig,
    v: usize,
) -> (Vec<(f64, Vec<u64>)>, usize) {
    let mut s = Sampler::new(den, sched, c, &[], None).unwrap();
    let mut out = Vec::new();
    let mut remasks = 0;
    while let Some(ev) = s.next() {
        let ev = ev.unwrap();
        if ev.final_fill {
            continue;
        }
        remasks += ev.remasked.len();
        let mut counts = vec![0u64; v + 1];
        for seq in &s.snapshot().sequences {
            for &x in seq {
                counts[(x as usize).min(v)] += 1;
            }
        }
        out.push((ev.s, counts));
    }
    (out, remasks)
}

fn grid_time(i: usize, steps: usize) -> f64 {
    i as f64 / steps as f64
}

#[test]
fn remasking_keeps_the_forward_marginal_at_every_step() {
    // A product law with marginal p at every position: the fixed denoiser μ = p is exact for
    // MD4, so P(x_s = v) = α_s p_v, P(mask) = 1 − α_s after every step (linear α = 1 − s).
    let p = vec![0.5, 0.3, 0.2];
    let (n, len, steps) = (4000, 10, 6);
    let lp = RemdmLoop {
        t_on: 0.7,
        t_off: 0.3,
        alpha_on: 0.5,
    };
    let cases = [
        ("cap 0.3", remdm(RemdmStrategy::Cap, 0.3), 41),
        ("rescale 0.8", remdm(RemdmStrategy::Rescale, 0.8), 42),
        (
            "loop cap 0.6",
            RemdmConfig {
                loop_: Some(lp),
                ..remdm(RemdmStrategy::Cap, 0.6)
            },
            43,
        ),
    ];
    for (name, rc, seed) in cases {
        let mut c = cfg(SamplerKind::Remdm, steps, n, len, seed);
        c.grid = SamplingGrid::Uniform;
        c.batch_size = n;
        c.remdm = rc;
        let mut den = FixedDenoiser {
            mu: p.clone(),
            time_conditioned: false,
        };
        let (per_step, remasks) =
            per_step_counts(&mut den, maskdiff_sampler::ScheduleRef::md4(&Linear), &c, 3);
        assert!(remasks > 1000, "{name}: only {remasks} remasks");
        assert_eq!(per_step.len(), steps);
        let mut powerful = 0;
        for (j, (s_ev, counts)) in per_step.iter().enumerate() {
            let s = grid_time(steps - j - 1, steps);
            let t = grid_time(steps - j, steps);
            // The loop schedule's α(s): linear τ map with τ_on = 1 − α_on = 0.5.
            let tau = |t: f64| {
                if rc.loop_.is_none() {
                    t
                } else if t > lp.t_on {
                    0.5 + (t - lp.t_on) / (1.0 - lp.t_on) * 0.5
                } else if t >= lp.t_off {
                    0.5
                } else {
                    0.5 * t / lp.t_off
                }
            };
            assert!((s_ev - s).abs() < 1e-12);
            let a_s = 1.0 - tau(s);
            let mut cells: Vec<f64> = p.iter().map(|q| a_s * q).collect();
            cells.push(1.0 - a_s);
            if a_s < 1.0 {
                assert_fits(&format!("{name} step {j}"), counts, &cells);
            } else {
                assert_eq!(counts[3], 0, "{name}: masks left at s = 0");
            }
            // Power against forgetting the σ-term of the masked branch: one extra σ α_t of
            // mass stays masked (from the correct marginal at t).
            let a_t = 1.0 - tau(t);
            let sigma_max = if a_t > 0.0 {
                ((1.0 - a_s) / a_t).min(1.0)
            } else {
                1.0
            };
            let on = rc.loop_.is_none() || (t <= lp.t_on && s >= lp.t_off);
            let sigma = match rc.strategy {
                RemdmStrategy::Cap => rc.eta.min(sigma_max),
                _ => rc.eta * sigma_max,
            } * f64::from(on as u8);
            let extra = sigma * a_t;
            let mut wrong: Vec<f64> = p.iter().map(|q| (a_s - extra) * q).collect();
            wrong.push(1.0 - a_s + extra);
            if a_s < 1.0 && chi2_power(3, Z_1E3, n * len, &cells, &wrong) > 0.99 {
                powerful += 1;
            }
        }
        assert!(
            powerful >= 2,
            "{name}: the test has power at {powerful} steps only"
        );
    }
}

/// GenMD4's exact denoiser of a product law p: the posterior of a masked token at time t,
/// ∝ p_v (1 − α_{t,v}) (time-conditioned).
struct GenPosterior {
    p: Vec<f64>,
    w: PerTokenPolynomial,
}

impl Denoiser for GenPosterior {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.p.len()).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        true
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        b.validate(self.vocab())?;
        let mut rows = Vec::new();
        for i in 0..b.batch {
            let r: Vec<f64> = (0..self.p.len())
                .map(|v| self.p[v] * self.w.one_minus_alpha(b.t[i], v))
                .collect();
            let z: f64 = r.iter().sum();
            rows.extend(std::iter::repeat_n(
                r.iter().map(|x| x / z).collect::<Vec<_>>(),
                b.len,
            ));
        }
        Ok(to_logprobs(rows, b.batch, b.len, self.p.len()))
    }
}

#[test]
fn genmd4_remasking_keeps_the_per_token_marginal() {
    // P(x_s = v) = α_{s,v} p_v with α_{s,v} = 1 − (1 − ε) s^{w_v}.
    let p = vec![0.5, 0.3, 0.2];
    let w = PerTokenPolynomial::new(vec![1.0, 3.0, 0.5]).unwrap();
    let (n, len, steps) = (4000, 10, 5);
    let mut c = cfg(SamplerKind::Remdm, steps, n, len, 51);
    c.grid = SamplingGrid::Uniform;
    c.batch_size = n;
    c.remdm = remdm(RemdmStrategy::Cap, 0.4);
    let mut den = GenPosterior {
        p: p.clone(),
        w: w.clone(),
    };
    let (per_step, remasks) =
        per_step_counts(&mut den, maskdiff_sampler::ScheduleRef::genmd4(&w), &c, 3);
    assert!(remasks > 1000, "only {remasks} remasks");
    for (j, (_, counts)) in per_step.iter().enumerate() {
        let s = grid_time(steps - j - 1, steps);
        let alpha = |v: usize| 1.0 - (1.0 - w.eps()) * s.powf(w.exponents()[v]);
        let mut cells: Vec<f64> = (0..3).map(|v| alpha(v) * p[v]).collect();
        cells.push(1.0 - cells.iter().sum::<f64>());
        assert_fits(&format!("GenMD4 step {j}"), counts, &cells);
    }
}

/// The law of the ReMDM chain on the N = 3, V = 3 toy joint with the exact conditional
/// denoiser, enumerated state by state: a state is (tokens with mask = V, ψ of each revealed
/// position). Returns, after each step, the law of the tokens.
fn enumerate_remdm(
    joint: &Joint,
    steps: usize,
    strategy: RemdmStrategy,
    eta: f64,
) -> Vec<HashMap<Vec<u32>, f64>> {
    const V: usize = 3;
    type State = (Vec<u32>, Vec<u64>);
    let n = joint.n;
    let mut dist: HashMap<State, f64> = HashMap::new();
    dist.insert((vec![V as u32; n], vec![0; n]), 1.0);
    let mut laws = Vec::new();
    for i in (1..=steps).rev() {
        let (t, s) = (grid_time(i, steps), grid_time(i - 1, steps));
        let (a_t, a_s) = (1.0 - t, 1.0 - s);
        let smax = if a_t > 0.0 {
            ((1.0 - a_s) / a_t).min(1.0)
        } else {
            1.0
        };
        let mut next: HashMap<State, f64> = HashMap::new();
        for ((x, psi), px) in &dist {
            let revealed: Vec<usize> = (0..n).filter(|&k| x[k] as usize != V).collect();
            let sig_rev: Vec<f64> = match strategy {
                RemdmStrategy::Conf => {
                    let e: Vec<f64> = revealed
                        .iter()
                        .map(|&k| (-f64::from_bits(psi[k])).exp())
                        .collect();
                    let z: f64 = e.iter().sum();
                    e.iter().map(|q| q / z * smax).collect()
                }
                _ => vec![eta.min(smax); revealed.len()],
            };
            let sig_masked = if strategy == RemdmStrategy::Conf {
                0.0
            } else {
                eta.min(smax)
            };
            // Per position: list of (token, ψ bits, probability).
            let options: Vec<Vec<(u32, u64, f64)>> = (0..n)
                .map(|k| {
                    if let Some(r) = revealed.iter().position(|&q| q == k) {
                        vec![(x[k], psi[k], 1.0 - sig_rev[r]), (V as u32, 0, sig_rev[r])]
                    } else {
                        let mu = joint.conditional(x, k);
                        let pu = (a_s - (1.0 - sig_masked) * a_t) / (1.0 - a_t);
                        let mut o: Vec<(u32, u64, f64)> = (0..V)
                            .map(|v| (v as u32, mu[v].to_bits(), pu * mu[v]))
                            .collect();
                        o.push((V as u32, 0, 1.0 - pu));
                        o
                    }
                })
                .collect();
            for a in &options[0] {
                for b in &options[1] {
                    for c in &options[2] {
                        let p = px * a.2 * b.2 * c.2;
                        if p > 0.0 {
                            *next
                                .entry((vec![a.0, b.0, c.0], vec![a.1, b.1, c.1]))
                                .or_default() += p;
                        }
                    }
                }
            }
        }
        dist = next;
        let mut law: HashMap<Vec<u32>, f64> = HashMap::new();
        for ((x, _), p) in &dist {
            *law.entry(x.clone()).or_default() += p;
        }
        let total: f64 = law.values().sum();
        assert!((total - 1.0).abs() < 1e-12, "law sums to {total}");
        assert!(law.values().all(|&p| p >= 0.0));
        laws.push(law);
    }
    laws
}

#[test]
fn per_step_law_matches_the_enumerated_chain() {
    let joint = Joint::new(3, 3);
    let (n, steps) = (30_000, 4);
    for (strategy, eta, seed) in [
        (RemdmStrategy::Cap, 0.5, 61),
        (RemdmStrategy::Conf, 0.0, 62),
    ] {
        let laws = enumerate_remdm(&joint, steps, strategy, eta);
        let mut c = cfg(SamplerKind::Remdm, steps, n, 3, seed);
        c.grid = SamplingGrid::Uniform;
        c.batch_size = n;
        c.remdm = remdm(strategy, eta);
        let mut den = ExactDenoiser::new(joint.clone());
        let mut s = Sampler::new(&mut den, &Linear, &c, &[], None).unwrap();
        let mut j = 0;
        let mut remasks = 0;
        while let Some(ev) = s.next() {
            let ev = ev.unwrap();
            assert!(
                !ev.final_fill,
                "unshifted linear: nothing is left for the fill"
            );
            remasks += ev.remasked.len();
            let law = &laws[j];
            // Cells: every state of positive probability; states with expected count < 5 are
            // pooled into one cell.
            let mut keys: Vec<&Vec<u32>> = law.keys().collect();
            keys.sort();
            let (mut probs, mut counts) = (Vec::new(), Vec::new());
            let (mut small_p, mut small_c) = (0.0, 0u64);
            let mut index: HashMap<&Vec<u32>, usize> = HashMap::new();
            for k in &keys {
                if law[*k] * n as f64 >= 5.0 {
                    index.insert(k, probs.len());
                    probs.push(law[*k]);
                    counts.push(0u64);
                } else {
                    small_p += law[*k];
                }
            }
            for seq in &s.snapshot().sequences {
                match index.get(seq) {
                    Some(&c) => counts[c] += 1,
                    None => {
                        assert!(law.contains_key(seq), "impossible state {seq:?}");
                        small_c += 1;
                    }
                }
            }
            if small_p > 0.0 {
                probs.push(small_p);
                counts.push(small_c);
            }
            assert_fits(&format!("{strategy} step {j}"), &counts, &probs);
            j += 1;
        }
        assert_eq!(j, steps);
        assert!(remasks > 1000, "{strategy}: only {remasks} remasks");
        // The final law differs from plain ancestral's (power of the last-step test).
        let anc = enumerate_remdm(&joint, steps, RemdmStrategy::Cap, 0.0);
        let keys: Vec<Vec<u32>> = laws[steps - 1].keys().cloned().collect();
        let a: Vec<f64> = keys.iter().map(|k| laws[steps - 1][k]).collect();
        let b: Vec<f64> = keys
            .iter()
            .map(|k| anc[steps - 1].get(k).copied().unwrap_or(0.0))
            .collect();
        let df = keys.len() - 1;
        let power = chi2_power(df, Z_1E3, n, &b, &a);
        assert!(
            power > 0.99,
            "{strategy}: power {power} against ancestral's law"
        );
    }
}

#[test]
fn sigma_max_bound_empties_the_stay_masked_branch() {
    // Linear α, uniform T = 4: at step 3 (t = 1/2 → s = 1/4) σ_max = (1 − α_s)/α_t = 1/2 and
    // with σ = σ_max a masked position is revealed with probability (α_s − (1 − σ)α_t)/(1 − α_t)
    // = 1. So after that step exactly the positions remasked by it are masked. Rescale η = 1
    // and cap η = 5 (capped at σ_max) are the same run.
    let (n, len) = (200, 16);
    let mut c = cfg(SamplerKind::Remdm, 4, n, len, 71);
    c.grid = SamplingGrid::Uniform;
    c.batch_size = 64;
    let mut outs = Vec::new();
    for rc in [
        remdm(RemdmStrategy::Rescale, 1.0),
        remdm(RemdmStrategy::Cap, 5.0),
    ] {
        c.remdm = rc;
        let mut den = FixedDenoiser {
            mu: vec![0.6, 0.4],
            time_conditioned: false,
        };
        let mut s = Sampler::new(&mut den, &Linear, &c, &[], None).unwrap();
        let mut remasked = 0usize;
        while let Some(ev) = s.next() {
            let ev = ev.unwrap();
            if ev.step == 3 {
                let snap = s.snapshot();
                let range = ev.chunk * 64..(ev.chunk * 64 + 64).min(n);
                let masked: Vec<(usize, usize)> = range
                    .flat_map(|i| {
                        let seq = snap.sequences[i].clone();
                        (0..len).filter(move |&p| seq[p] == 2).map(move |p| (i, p))
                    })
                    .collect();
                let re: Vec<(usize, usize)> = ev
                    .remasked
                    .iter()
                    .map(|r| (r.sequence, r.position))
                    .collect();
                assert_eq!(masked, re);
                remasked += re.len();
            }
        }
        // Each position revealed before step 3 (prob α_{1/2} = 1/2) is remasked with
        // probability 1/2: about n·len/4 = 800 remasks; 5 sd bounds (sd ≈ 24.5).
        assert!(
            (remasked as f64 - 800.0).abs() < 125.0,
            "{remasked} remasks"
        );
        outs.push(s.snapshot());
    }
    assert_eq!(outs[0], outs[1]);
}
