//! Confidence-threshold parallel decoding (Fast-dLLM): τ = 1 reveals exactly one position per
//! network call, the most confident one; τ = 0 reveals everything in one call; in between the
//! number of calls follows the model's certainty; the step budget is never exceeded; the
//! denoiser sees the time whose expected mask fraction is the sequence's; a sample does not
//! depend on its batch; GenMD4 works the same way.

mod common;

use common::*;
use maskdiff_process::{DenoiseBatch, Denoiser};
use maskdiff_sampler::{sample, Constraint, Sampler, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};

fn cfg(tau: f64, steps: usize, n: usize, len: usize, seed: u64) -> SamplerConfig {
    SamplerConfig {
        kind: SamplerKind::Threshold,
        threshold: tau,
        steps,
        grid: SamplingGrid::Cosine,
        num_samples: n,
        length: len,
        seed,
        batch_size: 4,
        ..SamplerConfig::default()
    }
}

/// The model's probability of each token at each position for one sequence.
fn rows_of(den: &mut HashDenoiser, seq: &[u32], t: f64) -> Vec<Vec<f64>> {
    let out = den
        .log_probs(&DenoiseBatch {
            ids: seq,
            batch: 1,
            len: seq.len(),
            t: &[t],
            labels: None,
        })
        .unwrap();
    (0..seq.len())
        .map(|n| {
            let r: Vec<f64> = out.row(0, n).iter().map(|&x| (x as f64).exp()).collect();
            let z: f64 = r.iter().sum();
            r.into_iter().map(|x| x / z).collect()
        })
        .collect()
}

#[test]
fn tau_one_reveals_one_position_per_call_in_confidence_order() {
    let (v, len, n) = (6usize, 10usize, 6usize);
    let sched = Shifted::official(Linear);
    // Greedy proposals: the confidence of a position is its largest model probability.
    let mut c = cfg(1.0, 1000, n, len, 3);
    c.temperature = 0.0;
    let cons = [Constraint::prefix(&[2])];
    let mut den = HashDenoiser::new(v, false);
    let mut oracle = HashDenoiser::new(v, false);
    let mut s = Sampler::new(&mut den, &sched, &c, &cons, None).unwrap();
    let mut before = s.snapshot();
    let mut events = 0;
    while let Some(ev) = s.next() {
        let ev = ev.unwrap();
        events += 1;
        assert!(!ev.final_fill);
        assert_eq!(ev.calls, 1);
        let range = ev.chunk * 4..(ev.chunk * 4 + 4).min(n);
        // Exactly one reveal per sequence of the chunk that still had masks.
        let busy: Vec<usize> = range
            .filter(|&i| before.sequences[i].iter().any(|&x| x as usize == v))
            .collect();
        let seqs: Vec<usize> = ev.revealed.iter().map(|r| r.sequence).collect();
        assert_eq!(seqs, busy);
        for r in &ev.revealed {
            let rows = rows_of(&mut oracle, &before.sequences[r.sequence], 1.0);
            let conf = |p: usize| rows[p].iter().cloned().fold(0.0, f64::max);
            let masked: Vec<usize> = (0..len)
                .filter(|&p| before.sequences[r.sequence][p] as usize == v)
                .collect();
            let best = masked
                .iter()
                .copied()
                .max_by(|&a, &b| conf(a).total_cmp(&conf(b)).then(b.cmp(&a)))
                .unwrap();
            assert_eq!(r.position, best, "not the most confident position");
            let argmax = (0..v)
                .max_by(|&a, &b| rows[best][a].total_cmp(&rows[best][b]))
                .unwrap();
            assert_eq!(r.token as usize, argmax);
            assert!((r.prob - conf(best)).abs() < 1e-6);
        }
        before = s.snapshot();
    }
    let out = s.snapshot();
    assert!(out.complete);
    // 9 generated positions (one fixed by the prompt): 9 calls per sample, 9 events per chunk.
    assert!(out.nfe.iter().all(|&k| k == 9), "{:?}", out.nfe);
    assert_eq!(events, 9 * 2);
    assert!(out.sequences.iter().all(|q| q[0] == 2));
    // Reveal steps are 1, 2, …, 9 (a permutation over the generated positions).
    for r in &out.reveal_step {
        let mut st: Vec<u32> = r[1..].to_vec();
        st.sort_unstable();
        assert_eq!(st, (1..=9).collect::<Vec<u32>>());
    }
}

#[test]
fn tau_zero_reveals_everything_in_one_call() {
    let sched = Shifted::official(Linear);
    let out = sample(
        &mut HashDenoiser::new(7, true),
        &sched,
        &cfg(0.0, 100, 5, 20, 1),
        &[],
        None,
    )
    .unwrap();
    assert!(out.nfe.iter().all(|&k| k == 1));
    assert_eq!(out.calls, 2); // two chunks of ≤ 4
    assert!(out.reveal_step.iter().flatten().all(|&r| r == 1));
}

#[test]
fn calls_adapt_to_the_models_certainty() {
    let sched = Linear;
    let len = 16;
    let run = |mu: Vec<f64>, tau: f64| {
        let mut den = FixedDenoiser {
            mu,
            time_conditioned: false,
        };
        sample(&mut den, &sched, &cfg(tau, 1000, 4, len, 5), &[], None).unwrap()
    };
    // Every proposal's probability (0.96 or 0.04) is above τ = 0.03: one call.
    let sure = run(vec![0.96, 0.04], 0.03);
    assert!(sure.nfe.iter().all(|&k| k == 1));
    // No proposal (0.6 or 0.4) is above τ = 0.9: one position per call.
    let unsure = run(vec![0.6, 0.4], 0.9);
    assert!(unsure.nfe.iter().all(|&k| k == len as u32));
    // A model whose certainty varies: the call count moves monotonically with τ.
    let calls = |tau: f64| {
        let out = sample(
            &mut HashDenoiser::new(3, false),
            &Linear,
            &cfg(tau, 1000, 8, 24, 9),
            &[],
            None,
        )
        .unwrap();
        out.nfe.iter().map(|&k| k as u64).sum::<u64>()
    };
    let (c_hi, c_mid, c_lo) = (calls(0.95), calls(0.6), calls(0.3));
    assert!(c_hi >= c_mid && c_mid >= c_lo, "{c_hi} {c_mid} {c_lo}");
    assert!(c_hi > c_lo && c_lo >= 8, "{c_hi} {c_mid} {c_lo}");
    assert!(c_hi <= 8 * 24);
}

#[test]
fn the_step_budget_is_respected() {
    // τ = 1 wants one reveal per call, but 10 positions in 3 steps need ⌈10/3⌉ = 4, then
    // ⌈6/2⌉ = 3, then 3.
    let mut den = HashDenoiser::new(4, false);
    let c = cfg(1.0, 3, 2, 10, 2);
    let mut s = Sampler::new(&mut den, &Linear, &c, &[], None).unwrap();
    let per_step: Vec<usize> = s.by_ref().map(|e| e.unwrap().revealed.len() / 2).collect();
    assert_eq!(per_step, vec![4, 3, 3]);
    assert!(s.snapshot().complete);
    // With blocks: each block has its own budget and is finished before the next starts.
    let mut c = cfg(1.0, 4, 1, 10, 2);
    c.block_size = Some(5);
    let out = sample(&mut HashDenoiser::new(4, false), &Linear, &c, &[], None).unwrap();
    assert_eq!(out.nfe, vec![4]);
    let r = &out.reveal_step[0];
    assert!(r[..5].iter().all(|&x| x <= 2) && r[5..].iter().all(|&x| (3..=4).contains(&x)));
}

#[test]
fn the_denoiser_sees_the_time_of_its_mask_fraction() {
    // Linear α (unshifted): (1 − α_t)/(1 − α_1) = t, so t = #masked / #masked at the start.
    let mut den = HashDenoiser::new(3, true);
    let out = sample(&mut den, &Linear, &cfg(0.5, 1000, 3, 12, 4), &[], None).unwrap();
    assert!(out.complete);
    assert!(!den.seen.is_empty());
    for (ids, t) in &den.seen {
        let m = ids.iter().filter(|&&x| x == 3).count() as f64;
        assert!((t - m / 12.0).abs() < 1e-12, "t = {t}, masked {m}");
    }
}

#[test]
fn a_sample_does_not_depend_on_its_batch_and_genmd4_works() {
    let w = PerTokenPolynomial::new(vec![1.0, 2.0, 0.5, 3.0]).unwrap();
    let c = cfg(0.4, 50, 7, 9, 8);
    let all = sample(&mut HashDenoiser::new(4, true), &w, &c, &[], None).unwrap();
    assert!(all.complete && all.sequences.iter().flatten().all(|&x| x < 4));
    for i in [0usize, 4, 6] {
        let one = SamplerConfig {
            num_samples: 1,
            first_index: i as u64,
            ..c.clone()
        };
        let alone = sample(&mut HashDenoiser::new(4, true), &w, &one, &[], None).unwrap();
        assert_eq!(alone.sequences[0], all.sequences[i]);
        assert_eq!(alone.nfe[0], all.nfe[i]);
    }
    // τ = 1 with GenMD4: one position per call.
    let out = sample(
        &mut HashDenoiser::new(4, false),
        &w,
        &cfg(1.0, 50, 2, 9, 8),
        &[],
        None,
    )
    .unwrap();
    assert_eq!(out.nfe, vec![9, 9]);
}
