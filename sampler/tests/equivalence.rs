//! Same seed, same answer: the cached sampler reproduces plain ancestral sampling bit for bit
//! with far fewer network calls; top-p = 1 is the identity; a sample does not depend on the
//! batch it is drawn in; first-hitting's call count is bounded by min(T, #masked).

mod common;

use common::*;
use maskdiff_sampler::{
    sample, top_p, Constraint, SampleOutput, SamplerConfig, SamplerKind, Shaping,
};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};
use proptest::prelude::*;

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

#[test]
fn cached_reproduces_ancestral_with_fewer_calls() {
    let sched = Shifted::official(Linear);
    for tc in [false, true] {
        let c = cfg(SamplerKind::Ancestral, 200, 10, 12, 3);
        let plain = sample(&mut HashDenoiser::new(5, tc), &sched, &c, &[], None).unwrap();
        let c = SamplerConfig {
            kind: SamplerKind::Cached,
            ..c
        };
        let cached = sample(&mut HashDenoiser::new(5, tc), &sched, &c, &[], None).unwrap();
        assert_eq!(plain.sequences, cached.sequences, "time-conditioned: {tc}");
        assert_eq!(plain.reveal_step, cached.reveal_step);
        for (a, b) in plain.nfe.iter().zip(&cached.nfe) {
            // Ancestral calls at every step until its sequence is complete; cached only at
            // steps that reveal something (≤ 12 positions, + 1 possible final fill).
            assert!(*b <= 13 && *a >= 50, "ancestral {a}, cached {b}");
        }
    }
    // GenMD4 with a time-free denoiser: outputs are reused while the state is unchanged.
    let w = PerTokenPolynomial::new(vec![1.0, 2.0, 0.5, 1.5, 3.0]).unwrap();
    let c = cfg(SamplerKind::Ancestral, 200, 10, 12, 4);
    let plain = sample(&mut HashDenoiser::new(5, false), &w, &c, &[], None).unwrap();
    let c = SamplerConfig {
        kind: SamplerKind::Cached,
        ..c
    };
    let cached = sample(&mut HashDenoiser::new(5, false), &w, &c, &[], None).unwrap();
    assert_eq!(plain.sequences, cached.sequences);
    assert_eq!(plain.reveal_step, cached.reveal_step);
    assert!(cached.nfe.iter().all(|&k| k <= 13));
    assert!(plain.nfe.iter().all(|&k| k >= 50));
}

#[test]
fn first_hitting_calls_are_bounded() {
    // Unshifted linear: nothing survives the last step, so no final fill; every call reveals
    // at least one position, so NFE ≤ min(T, #masked) and NFE = #distinct reveal steps.
    let c = cfg(SamplerKind::FirstHitting, 1000, 20, 8, 9);
    let out = sample(&mut HashDenoiser::new(4, true), &Linear, &c, &[], None).unwrap();
    let c = SamplerConfig {
        kind: SamplerKind::Ancestral,
        ..c
    };
    let plain = sample(&mut HashDenoiser::new(4, true), &Linear, &c, &[], None).unwrap();
    for i in 0..20 {
        let mut steps = out.reveal_step[i].clone();
        steps.sort_unstable();
        steps.dedup();
        assert_eq!(out.nfe[i] as usize, steps.len());
        assert!(out.nfe[i] <= 8);
        assert!(plain.nfe[i] >= 100, "ancestral nfe {}", plain.nfe[i]);
    }
    // With a constraint only the free positions count.
    let c = cfg(SamplerKind::FirstHitting, 1000, 5, 8, 9);
    let out = sample(
        &mut HashDenoiser::new(4, true),
        &Linear,
        &c,
        &[Constraint::prefix(&[1, 2, 3, 0, 1])],
        None,
    )
    .unwrap();
    assert!(out.nfe.iter().all(|&k| (1..=3).contains(&k)));
}

fn all_configs() -> Vec<(SamplerConfig, bool)> {
    let mut v = Vec::new();
    for kind in [
        SamplerKind::Ancestral,
        SamplerKind::Mean,
        SamplerKind::Cached,
        SamplerKind::FirstHitting,
        SamplerKind::Confidence,
    ] {
        for genmd4 in [false, true] {
            if genmd4 && matches!(kind, SamplerKind::FirstHitting | SamplerKind::Confidence) {
                continue;
            }
            let mut c = cfg(kind, 30, 11, 10, 77);
            c.top_p = 0.9;
            c.temperature = 0.8;
            c.block_size = Some(4);
            v.push((c, genmd4));
        }
    }
    v
}

fn run(c: &SamplerConfig, genmd4: bool, constraints: &[Constraint]) -> SampleOutput {
    let w = PerTokenPolynomial::new(vec![1.0, 2.0, 0.5, 1.5]).unwrap();
    let sched = Shifted::official(Linear);
    let mut den = HashDenoiser::new(4, !genmd4);
    if genmd4 {
        sample(&mut den, &w, c, constraints, None).unwrap()
    } else {
        sample(&mut den, &sched, c, constraints, None).unwrap()
    }
}

#[test]
fn a_sample_does_not_depend_on_its_batch() {
    let cons: Vec<Constraint> = (0..11)
        .map(|i| Constraint::none().with_token(i % 10, (i % 4) as u32))
        .collect();
    for (c, genmd4) in all_configs() {
        let full = run(&c, genmd4, &cons);
        let big = run(
            &SamplerConfig {
                batch_size: 64,
                ..c.clone()
            },
            genmd4,
            &cons,
        );
        assert_eq!(full.sequences, big.sequences, "{} genmd4={genmd4}", c.kind);
        assert_eq!(full.nfe, big.nfe);
        for i in 0..11 {
            let alone = SamplerConfig {
                num_samples: 1,
                first_index: i as u64,
                ..c.clone()
            };
            let one = run(&alone, genmd4, &cons[i..=i]);
            assert_eq!(one.sequences[0], full.sequences[i], "{} sample {i}", c.kind);
            assert_eq!(one.reveal_step[0], full.reveal_step[i]);
            assert_eq!(one.nfe[0], full.nfe[i]);
        }
    }
}

#[test]
fn top_p_one_is_plain_sampling_for_the_same_seed() {
    // The nucleus code path with p = 1 against the default: identical samples.
    let mut c = cfg(SamplerKind::Ancestral, 40, 6, 10, 5);
    let plain = sample(&mut HashDenoiser::new(6, true), &Linear, &c, &[], None).unwrap();
    c.top_p = 1.0;
    c.temperature = 1.0;
    let same = sample(&mut HashDenoiser::new(6, true), &Linear, &c, &[], None).unwrap();
    assert_eq!(plain, same);
    // A smaller p changes them (the test above can fail).
    c.top_p = 0.3;
    let cut = sample(&mut HashDenoiser::new(6, true), &Linear, &c, &[], None).unwrap();
    assert_ne!(plain.sequences, cut.sequences);
}

proptest! {
    #[test]
    fn top_p_one_is_the_identity(raw in prop::collection::vec(0.0f64..1.0, 1..40)) {
        let z: f64 = raw.iter().sum();
        prop_assume!(z > 0.0);
        let mu: Vec<f64> = raw.iter().map(|x| x / z).collect();
        prop_assert_eq!(top_p(mu.clone(), 1.0), mu.clone());
        prop_assert_eq!(Shaping::new(1.0, 1.0).unwrap().apply(mu.clone()), mu);
    }

    #[test]
    fn top_p_keeps_a_minimal_tie_closed_set(
        raw in prop::collection::vec(0usize..6, 2..20),
        p in 0.05f64..1.0,
    ) {
        // Small integer weights make ties common.
        let z: usize = raw.iter().sum();
        prop_assume!(z > 0);
        let mu: Vec<f64> = raw.iter().map(|&x| x as f64 / z as f64).collect();
        let out = top_p(mu.clone(), p);
        let kept: Vec<usize> = (0..mu.len()).filter(|&k| out[k] > 0.0).collect();
        let mass: f64 = kept.iter().map(|&k| mu[k]).sum();
        prop_assert!(mass >= p - 1e-12);
        // Kept set = all tokens above a threshold (tie-closed), and dropping the whole lowest
        // kept level would fall below p (minimal up to ties).
        let low = kept.iter().map(|&k| mu[k]).fold(f64::INFINITY, f64::min);
        for k in 0..mu.len() {
            prop_assert_eq!(out[k] > 0.0, mu[k] >= low && mu[k] > 0.0);
        }
        let above: f64 = kept.iter().filter(|&&k| mu[k] > low).map(|&k| mu[k]).sum();
        prop_assert!(above < p + 1e-12);
        // Renormalised.
        prop_assert!((out.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        for &k in &kept {
            prop_assert!((out[k] - mu[k] / mass).abs() < 1e-12);
        }
    }
}
