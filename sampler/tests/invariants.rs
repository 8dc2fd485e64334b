//! Property tests over random small problems, kinds, grids, blocks, constraints and batch sizes:
//! replaying the step events, every reveal hits a mask that no constraint fixes (so carried-over
//! tokens never change and the mask count never increases), tokens are real (< V), the replayed
//! state equals the output, no mask remains, constraints hold, reveal steps are consistent, and
//! the cached / first-hitting MD4 samplers make at most one call per generated position. ReMDM
//! remasks only revealed, unconstrained positions of the current block; the threshold sampler
//! makes at most one call per generated position.

mod common;

use common::*;
use maskdiff_sampler::{
    Constraint, RemdmConfig, RemdmLoop, RemdmStrategy, Sampler, SamplerConfig, SamplerKind,
    ScheduleRef,
};
use maskdiff_schedule::{Cosine, Linear, PerTokenPolynomial, SamplingGrid, Shifted};
use proptest::prelude::*;

const KINDS: [SamplerKind; 7] = [
    SamplerKind::Ancestral,
    SamplerKind::Mean,
    SamplerKind::Cached,
    SamplerKind::FirstHitting,
    SamplerKind::Confidence,
    SamplerKind::Remdm,
    SamplerKind::Threshold,
];

#[derive(Debug, Clone)]
struct Case {
    v: usize,
    template: Vec<Option<u32>>,
    kind: SamplerKind,
    sched: usize,
    steps: usize,
    cosine: bool,
    block: Option<usize>,
    samples: usize,
    batch: usize,
    time_conditioned: bool,
    temperature: f64,
    top_p: f64,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..5, 1usize..10)
        .prop_flat_map(|(v, n)| {
            (
                Just(v),
                prop::collection::vec(prop::option::weighted(0.3, 0..v as u32), n),
                0usize..7,
                0usize..4,
                1usize..25,
                any::<bool>(),
                prop::option::of(1..=n),
                (1usize..4, 1usize..3),
                any::<bool>(),
                prop::sample::select(vec![0.0, 0.7, 1.0, 1.5]),
                prop::sample::select(vec![1.0, 0.8, 0.3]),
                any::<u64>(),
            )
        })
        .prop_map(
            |(
                v,
                template,
                k,
                sched,
                steps,
                cosine,
                block,
                (samples, batch),
                tc,
                temperature,
                top_p,
                seed,
            )| Case {
                v,
                template,
                kind: KINDS[k],
                sched,
                steps,
                cosine,
                block,
                samples,
                batch,
                time_conditioned: tc,
                temperature,
                top_p,
                seed,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn sampling_invariants(c in case()) {
        let n = c.template.len();
        let genmd4 = c.sched == 3;
        prop_assume!(!(genmd4 && matches!(c.kind, SamplerKind::FirstHitting | SamplerKind::Confidence)));
        prop_assume!(!(genmd4 && c.kind == SamplerKind::Cached && c.time_conditioned));
        let cfg = SamplerConfig {
            kind: c.kind,
            steps: c.steps,
            grid: if c.cosine { SamplingGrid::Cosine } else { SamplingGrid::Uniform },
            num_samples: c.samples,
            length: n,
            temperature: c.temperature,
            top_p: c.top_p,
            seed: c.seed,
            first_index: 0,
            block_size: c.block,
            batch_size: c.batch,
            remdm: RemdmConfig {
                strategy: [RemdmStrategy::Cap, RemdmStrategy::Rescale, RemdmStrategy::Conf]
                    [(c.seed % 3) as usize],
                eta: 0.4,
                loop_: (c.seed % 4 == 1 && c.seed % 3 != 2 && !genmd4).then_some(RemdmLoop {
                    t_on: 0.6,
                    t_off: 0.2,
                    alpha_on: 0.7,
                }),
            },
            threshold: [0.0, 0.5, 0.9, 1.0][(c.seed % 4) as usize],
        };
        prop_assume!(cfg.steps >= cfg.num_blocks());
        let (shifted, cosine) = (Shifted::official(Linear), Cosine);
        let w = PerTokenPolynomial::new((0..c.v).map(|k| 0.5 + k as f64).collect()).unwrap();
        let sched: ScheduleRef = match c.sched {
            0 => ScheduleRef::md4(&shifted),
            1 => ScheduleRef::md4(&Linear),
            2 => ScheduleRef::md4(&cosine),
            _ => ScheduleRef::genmd4(&w),
        };
        let mask = c.v as u32;
        let mut den = HashDenoiser::new(c.v, c.time_conditioned);
        let cons = [Constraint::from_template(&c.template)];
        let mut s = Sampler::new(&mut den, sched, &cfg, &cons, None).unwrap();
        let init: Vec<u32> = c.template.iter().map(|t| t.unwrap_or(mask)).collect();
        let mut state = vec![init; c.samples];
        let mut masks: Vec<usize> = state.iter().map(|x| x.iter().filter(|&&y| y == mask).count()).collect();
        for ev in s.by_ref() {
            let ev = ev.unwrap();
            for r in &ev.remasked {
                prop_assert_eq!(c.kind, SamplerKind::Remdm);
                prop_assert_eq!(state[r.sequence][r.position], r.token);
                prop_assert!(r.token < mask);
                prop_assert!(c.template[r.position].is_none());
                if let Some(b) = c.block {
                    prop_assert_eq!(r.position / b, ev.block);
                }
                state[r.sequence][r.position] = mask;
                masks[r.sequence] += 1;
            }
            for r in &ev.revealed {
                prop_assert_eq!(state[r.sequence][r.position], mask);
                prop_assert!(c.template[r.position].is_none());
                prop_assert!(r.token < mask);
                prop_assert!(r.prob > 0.0 && r.prob <= 1.0 + 1e-12);
                if let Some(b) = c.block {
                    prop_assert_eq!(r.position / b, ev.block);
                }
                state[r.sequence][r.position] = r.token;
                masks[r.sequence] -= 1;
            }
            prop_assert!(ev.step >= 1 && ev.step <= c.steps);
        }
        let out = s.snapshot();
        prop_assert!(out.complete);
        prop_assert_eq!(&out.sequences, &state);
        prop_assert!(masks.iter().all(|&m| m == 0));
        let free = c.template.iter().filter(|t| t.is_none()).count() as u32;
        for i in 0..c.samples {
            for (pos, t) in c.template.iter().enumerate() {
                prop_assert!(out.sequences[i][pos] < mask);
                match t {
                    Some(tok) => {
                        prop_assert_eq!(out.sequences[i][pos], *tok);
                        prop_assert_eq!(out.reveal_step[i][pos], 0);
                    }
                    None => prop_assert!((1..=c.steps as u32).contains(&out.reveal_step[i][pos])),
                }
            }
            if c.kind == SamplerKind::Threshold
                || (!genmd4 && matches!(c.kind, SamplerKind::Cached | SamplerKind::FirstHitting))
            {
                prop_assert!(out.nfe[i] <= free);
            }
            if free == 0 {
                prop_assert_eq!(out.nfe[i], 0);
            }
        }
    }
}
