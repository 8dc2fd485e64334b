//! How many tokens each step reveals, read from the streamed step events: the reveal-step
//! histogram of a sequence follows spec §6.3 on both grids (ImageNet-sized N = 12288, T = 256),
//! the per-step unmasking rates follow §11.13 (T = 4, ε-shifted), and one GenMD4 step follows
//! §11.18. Chi-square at level 1e−3 and binomial z-scores, fixed seeds.

mod common;

use common::*;
use maskdiff_sampler::{Sampler, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};

#[test]
fn reveal_step_histogram_matches_spec_6_3() {
    // Unshifted linear schedule: a position is still masked after the step ending at s with
    // probability 1 − α(s) = s, so step j (t → s) reveals N (t − s) in expectation:
    // 48 per step on the uniform grid; 0.23, 0.69, …, 75.4 on the cosine grid (spec §6.3).
    let (n, steps) = (12288, 256);
    for (grid, kind, seed) in [
        (SamplingGrid::Uniform, SamplerKind::Ancestral, 1),
        (SamplingGrid::Cosine, SamplerKind::Ancestral, 2),
        (SamplingGrid::Cosine, SamplerKind::FirstHitting, 3),
    ] {
        let time = |i: usize| {
            let u = i as f64 / steps as f64;
            match grid {
                SamplingGrid::Uniform => u,
                SamplingGrid::Cosine => (std::f64::consts::FRAC_PI_2 * u).sin(),
            }
        };
        let probs: Vec<f64> = (0..steps)
            .map(|j| time(steps - j) - time(steps - j - 1))
            .collect();
        if grid == SamplingGrid::Cosine {
            let e: Vec<f64> = probs.iter().map(|p| p * n as f64).collect();
            assert!((e[0] - 0.23).abs() < 0.005 && (e[1] - 0.69).abs() < 0.005);
            assert!((e[255] - 75.4).abs() < 0.05);
        }
        let cfg = SamplerConfig {
            kind,
            steps,
            grid,
            num_samples: 1,
            length: n,
            seed,
            ..SamplerConfig::default()
        };
        let mut den = FixedDenoiser {
            mu: vec![0.5, 0.5],
            time_conditioned: true,
        };
        let mut counts = vec![0u64; steps];
        let mut masked = n;
        for ev in Sampler::new(&mut den, &Linear, &cfg, &[], None).unwrap() {
            let ev = ev.unwrap();
            assert!(
                !ev.final_fill,
                "unshifted linear leaves no mask after s = 0"
            );
            counts[ev.step - 1] += ev.revealed.len() as u64;
            // The number of masks never increases and every reveal was a mask.
            masked -= ev.revealed.len();
        }
        assert_eq!(masked, 0);
        // Merge the first cells of the cosine grid (expected counts < 5) into one.
        let cut = probs.iter().position(|p| p * n as f64 >= 5.0).unwrap();
        let mut c = vec![counts[..=cut].iter().sum::<u64>()];
        c.extend_from_slice(&counts[cut + 1..]);
        let mut p = vec![probs[..=cut].iter().sum::<f64>()];
        p.extend_from_slice(&probs[cut + 1..]);
        assert_fits(&format!("reveal steps {grid:?} {kind}"), &c, &p);
    }
}

#[test]
fn per_step_unmask_rates_match_spec_11_13() {
    // ε-shifted linear, T = 4: p_unmask = 0.249975, 0.333289, 0.499900, 0.999600 (uniform grid)
    // and 0.076113, 0.234608, 0.458739, 0.999739 (cosine grid). The rate at step j is
    // revealed_j / masked-before-j, a binomial proportion: |z| < 4 at each step.
    let sched = Shifted::official(Linear);
    for (grid, rates, seed) in [
        (
            SamplingGrid::Uniform,
            [0.249975, 0.333289, 0.499900, 0.999600],
            7,
        ),
        (
            SamplingGrid::Cosine,
            [0.076113, 0.234608, 0.458739, 0.999739],
            8,
        ),
    ] {
        let cfg = SamplerConfig {
            steps: 4,
            grid,
            num_samples: 2000,
            length: 64,
            seed,
            batch_size: 500,
            ..SamplerConfig::default()
        };
        let mut den = FixedDenoiser {
            mu: vec![0.3, 0.7],
            time_conditioned: true,
        };
        let mut revealed = [0u64; 4];
        let mut filled = 0u64;
        for ev in Sampler::new(&mut den, &sched, &cfg, &[], None).unwrap() {
            let ev = ev.unwrap();
            if ev.final_fill {
                filled += ev.revealed.len() as u64;
            } else {
                revealed[ev.step - 1] += ev.revealed.len() as u64;
            }
        }
        let mut masked = 2000 * 64u64;
        for j in 0..4 {
            let (k, m, p) = (revealed[j] as f64, masked as f64, rates[j]);
            let z = (k - m * p) / (m * p * (1.0 - p)).sqrt();
            assert!(
                z.abs() < 4.0,
                "{grid:?} step {j}: rate {} vs {p} (z = {z:.2})",
                k / m
            );
            masked -= revealed[j];
        }
        // Leftovers are filled at t = 0 by the argmax: 1 − 0.9996 of the last step's masks.
        assert_eq!(filled, masked);
    }
}

#[test]
fn genmd4_step_matches_spec_11_18() {
    // w = (1, 2, 0.5), μ = (0.5, 0.3, 0.2). On the uniform grid with T = 4 the third step is
    // t = 0.5 → s = 0.25, where P(reveal 0, 1, 2, stay) = (0.25, 0.225, 0.0585786, 0.4664214).
    // Before it, the position stays masked through 1 → 0.75 and 0.75 → 0.5 with probability
    // Σ μ_v 0.75^{w_v} · Σ μ_v (2/3)^{w_v}.
    let w = [1.0, 2.0, 0.5];
    let mu = [0.5, 0.3, 0.2];
    let stay = |r: f64| (0..3).map(|v| mu[v] * r.powf(w[v])).sum::<f64>();
    let reach = stay(0.75) * stay(0.5 / 0.75);
    let fact = [0.25, 0.225, 0.0585786, 0.4664214];
    assert!((fact.iter().sum::<f64>() - 1.0).abs() < 1e-7);
    let sched = PerTokenPolynomial::new(w.to_vec()).unwrap();
    for (kind, seed) in [(SamplerKind::Ancestral, 41), (SamplerKind::Mean, 42)] {
        let n = 200_000;
        let cfg = SamplerConfig {
            kind,
            steps: 4,
            grid: SamplingGrid::Uniform,
            num_samples: n,
            length: 1,
            seed,
            batch_size: 20_000,
            ..SamplerConfig::default()
        };
        let mut den = FixedDenoiser {
            mu: mu.to_vec(),
            time_conditioned: true,
        };
        // Cells: revealed at step 3 as 0, 1, 2; or still masked after step 3; or revealed
        // before step 3.
        let mut cells = [0u64; 5];
        for ev in Sampler::new(&mut den, &sched, &cfg, &[], None).unwrap() {
            let ev = ev.unwrap();
            for r in &ev.revealed {
                if ev.step < 3 {
                    cells[4] += 1;
                } else if ev.step == 3 {
                    assert!(ev.t == 0.5 && ev.s == 0.25);
                    cells[r.token as usize] += 1;
                }
            }
        }
        cells[3] = n as u64 - cells[4] - cells[..3].iter().sum::<u64>();
        let probs = [
            reach * fact[0],
            reach * fact[1],
            reach * fact[2],
            reach * fact[3],
            1.0 - reach,
        ];
        assert_fits(&format!("GenMD4 {kind} step t=0.5 -> 0.25"), &cells, &probs);
    }
}
