//! Exactness of the samplers on a tiny problem (N = 3 positions, V = 3 tokens) with the exact
//! conditional denoiser of a known joint: (a) with many steps the samples follow the joint;
//! (b) with T = 3 every exact sampler follows the T-step ancestral law, enumerated here
//! independently (state by state, from hand-written α and grid formulas); (c) conditioning and
//! blocks. Chi-square tests at level 1e−3 with fixed seeds; where the alternative matters, the
//! power against it is computed and asserted.

mod common;

use common::*;
use maskdiff_process::Denoiser;
use maskdiff_sampler::{sample, Constraint, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};
use std::collections::HashMap;

const V: usize = 3;
const N: usize = 3;

fn config(
    kind: SamplerKind,
    steps: usize,
    grid: SamplingGrid,
    n: usize,
    seed: u64,
) -> SamplerConfig {
    SamplerConfig {
        kind,
        steps,
        grid,
        num_samples: n,
        length: N,
        seed,
        batch_size: 2000,
        ..SamplerConfig::default()
    }
}

fn histogram(joint: &Joint, seqs: &[Vec<u32>]) -> Vec<u64> {
    let mut h = vec![0u64; joint.p.len()];
    for s in seqs {
        assert!(s.iter().all(|&x| (x as usize) < V));
        h[joint.index(s)] += 1;
    }
    h
}

/// Grid time i/T or sin(π/2 · i/T), written out independently of the crate.
fn grid_time(grid: SamplingGrid, i: usize, steps: usize) -> f64 {
    let u = i as f64 / steps as f64;
    match grid {
        SamplingGrid::Uniform => u,
        SamplingGrid::Cosine => (std::f64::consts::FRAC_PI_2 * u).sin(),
    }
}

/// How a masked position moves from t to s, given μ: list of (outcome, probability),
/// outcome V = stays masked.
type StepLaw<'a> = &'a dyn Fn(&[f64], f64, f64) -> Vec<(u32, f64)>;

/// The law of the output of `steps` ancestral steps followed by the argmax fill, by enumerating
/// every intermediate state (mask = V).
fn enumerate(joint: &Joint, grid: SamplingGrid, steps: usize, law: StepLaw) -> Vec<f64> {
    let mut dist: HashMap<Vec<u32>, f64> = HashMap::new();
    dist.insert(vec![V as u32; N], 1.0);
    for i in (1..=steps).rev() {
        let (t, s) = (grid_time(grid, i, steps), grid_time(grid, i - 1, steps));
        let mut next: HashMap<Vec<u32>, f64> = HashMap::new();
        for (x, px) in &dist {
            // Per-position outcome lists; carried-over tokens have one outcome.
            let options: Vec<Vec<(u32, f64)>> = (0..N)
                .map(|n| {
                    if x[n] as usize == V {
                        law(&joint.conditional(x, n), t, s)
                    } else {
                        vec![(x[n], 1.0)]
                    }
                })
                .collect();
            for a in &options[0] {
                for b in &options[1] {
                    for c in &options[2] {
                        let p = px * a.1 * b.1 * c.1;
                        if p > 0.0 {
                            *next.entry(vec![a.0, b.0, c.0]).or_default() += p;
                        }
                    }
                }
            }
        }
        dist = next;
    }
    let mut out = vec![0.0; joint.p.len()];
    for (x, p) in dist {
        let filled: Vec<u32> = (0..N)
            .map(|n| {
                if x[n] as usize == V {
                    let mu = joint.conditional(&x, n);
                    let mut sorted = mu.clone();
                    sorted.sort_by(|a, b| b.total_cmp(a));
                    assert!(sorted[0] - sorted[1] > 1e-4, "near-tie in the fixture");
                    (0..V).max_by(|&a, &b| mu[a].total_cmp(&mu[b])).unwrap() as u32
                } else {
                    x[n]
                }
            })
            .collect();
        out[joint.index(&filled)] += p;
    }
    out
}

/// MD4 with α̃(t) = (1 − 2ε)(1 − t) + ε.
fn md4_law(eps: f64) -> impl Fn(&[f64], f64, f64) -> Vec<(u32, f64)> {
    move |mu: &[f64], t: f64, s: f64| {
        let a = |t: f64| (1.0 - 2.0 * eps) * (1.0 - t) + eps;
        let p = (a(s) - a(t)) / (1.0 - a(t));
        let mut o: Vec<(u32, f64)> = mu
            .iter()
            .enumerate()
            .map(|(v, m)| (v as u32, p * m))
            .collect();
        o.push((V as u32, 1.0 - p));
        o
    }
}

#[test]
fn many_steps_follow_the_joint() {
    // With T = 2^30 steps two positions are revealed at the same step with probability
    // ~ 3/T, so the sampler is the exact any-order autoregressive sampler of the joint.
    let joint = Joint::new(V, N);
    // Power against the law of revealing every position at once (product of marginals).
    let marg: Vec<Vec<f64>> = (0..N)
        .map(|n| joint.conditional(&[V as u32; N], n))
        .collect();
    let product: Vec<f64> = (0..joint.p.len())
        .map(|k| {
            let x = joint.decode(k);
            (0..N).map(|n| marg[n][x[n] as usize]).product()
        })
        .collect();
    assert!(chi2_power(26, Z_1E3, 40_000, &joint.p, &product) > 0.99);
    for (grid, tc, seed) in [
        (SamplingGrid::Cosine, false, 11),
        (SamplingGrid::Uniform, true, 12),
    ] {
        let mut den = ExactDenoiser::new(joint.clone());
        den.time_conditioned = tc;
        let n = 40_000;
        let cfg = config(SamplerKind::FirstHitting, 1 << 30, grid, n, seed);
        let out = sample(&mut den, &Linear, &cfg, &[], None).unwrap();
        // One call per revealed position at most (no final fill: unshifted α(0) = 1).
        assert!(out.nfe.iter().all(|&k| (1..=N as u32).contains(&k)));
        assert_fits(
            &format!("first-hitting T=2^30 {grid:?} vs joint"),
            &histogram(&joint, &out.sequences),
            &joint.p,
        );
    }
}

#[test]
fn three_step_samplers_follow_the_enumerated_law() {
    // A large shift ε = 0.05 so that the final argmax fill matters (each position survives the
    // three steps with probability ε/(1 − ε) = 0.0526).
    let joint = Joint::new(V, N);
    let eps = 0.05;
    let sched = Shifted::new(Linear, eps).unwrap();
    let law = md4_law(eps);
    let n = 40_000;
    for grid in [SamplingGrid::Uniform, SamplingGrid::Cosine] {
        let exact = enumerate(&joint, grid, 3, &law);
        assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Power: the 3-step law is far enough from the joint that this test separates them.
        let power = chi2_power(26, Z_1E3, n, &exact, &joint.p);
        assert!(power > 0.99, "power {power}");
        for (kind, seed) in [
            (SamplerKind::Ancestral, 1),
            (SamplerKind::Mean, 2),
            (SamplerKind::Cached, 3),
            (SamplerKind::FirstHitting, 4),
        ] {
            let mut den = ExactDenoiser::new(joint.clone());
            let out = sample(&mut den, &sched, &config(kind, 3, grid, n, seed), &[], None).unwrap();
            assert_fits(
                &format!("{kind} T=3 {grid:?}"),
                &histogram(&joint, &out.sequences),
                &exact,
            );
        }
    }
}

#[test]
fn genmd4_three_steps_follow_the_enumerated_law() {
    // Eq. (11): reveal v with (1 − (s/t)^{w_v}) μ_v, stay masked with Σ_v (s/t)^{w_v} μ_v.
    let joint = Joint::new(V, N);
    let w = [1.0, 2.0, 0.5];
    let sched = PerTokenPolynomial::new(w.to_vec()).unwrap();
    let law = |mu: &[f64], t: f64, s: f64| {
        let mut o: Vec<(u32, f64)> = (0..V)
            .map(|v| (v as u32, (1.0 - (s / t).powf(w[v])) * mu[v]))
            .collect();
        o.push((V as u32, (0..V).map(|v| (s / t).powf(w[v]) * mu[v]).sum()));
        o
    };
    let n = 40_000;
    let exact = enumerate(&joint, SamplingGrid::Uniform, 3, &law);
    // Versus MD4 linear on the same grid: the per-token exponents change the law detectably.
    let md4 = enumerate(&joint, SamplingGrid::Uniform, 3, &md4_law(0.0));
    assert!(chi2_power(26, Z_1E3, n, &exact, &md4) > 0.99);
    for (kind, seed) in [
        (SamplerKind::Ancestral, 5),
        (SamplerKind::Mean, 6),
        (SamplerKind::Cached, 7),
    ] {
        let mut den = ExactDenoiser::new(joint.clone());
        let cfg = config(kind, 3, SamplingGrid::Uniform, n, seed);
        let out = sample(&mut den, &sched, &cfg, &[], None).unwrap();
        assert_fits(
            &format!("GenMD4 {kind} T=3"),
            &histogram(&joint, &out.sequences),
            &exact,
        );
    }
}

#[test]
fn conditioning_follows_the_conditional_joint() {
    let joint = Joint::new(V, N);
    let n = 30_000;
    let cases = [
        (
            "prefix",
            Constraint::prefix(&[2]),
            vec![Some(2), None, None],
        ),
        (
            "suffix",
            Constraint::suffix(&[0]),
            vec![None, None, Some(0)],
        ),
        (
            "infill",
            Constraint::from_template(&[Some(1), None, Some(2)]),
            vec![Some(1), None, Some(2)],
        ),
    ];
    for (k, (name, c, fixed)) in cases.into_iter().enumerate() {
        let mut den = ExactDenoiser::new(joint.clone());
        let cfg = config(
            SamplerKind::FirstHitting,
            1 << 30,
            SamplingGrid::Cosine,
            n,
            20 + k as u64,
        );
        let out = sample(&mut den, &Linear, &cfg, &[c], None).unwrap();
        let target = joint.conditioned(&fixed);
        // The fixed tokens hold and are reported as step 0.
        for (s, r) in out.sequences.iter().zip(&out.reveal_step) {
            for (pos, f) in fixed.iter().enumerate() {
                if let Some(tok) = f {
                    assert_eq!(s[pos], *tok);
                    assert_eq!(r[pos], 0);
                } else {
                    assert!(r[pos] >= 1);
                }
            }
        }
        assert_fits(name, &histogram(&joint, &out.sequences), &target);
    }
}

#[test]
fn semi_autoregressive_blocks_follow_the_joint() {
    // Blocks of one position with one step each: exact left-to-right autoregressive sampling
    // (unshifted linear: p_unmask = 1 at the single step). Blocks of two with first-hitting and
    // 2^20 steps per block: exact any-order sampling within each block.
    let joint = Joint::new(V, N);
    let n = 30_000;
    for (kind, block, steps, seed) in [
        (SamplerKind::Ancestral, 1, 3, 31),
        (SamplerKind::FirstHitting, 2, 1 << 21, 32),
    ] {
        let mut den = ExactDenoiser::new(joint.clone());
        let mut cfg = config(kind, steps, SamplingGrid::Cosine, n, seed);
        cfg.block_size = Some(block);
        let out = sample(&mut den, &Linear, &cfg, &[], None).unwrap();
        assert_fits(
            &format!("{kind} blocks of {block}"),
            &histogram(&joint, &out.sequences),
            &joint.p,
        );
        if block == 1 {
            // Position n is revealed at step n + 1.
            assert!(out.reveal_step.iter().all(|r| r == &vec![1, 2, 3]));
        }
        let _ = den.vocab();
    }
}
