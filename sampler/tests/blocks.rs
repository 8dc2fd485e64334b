//! Block-by-block sampling (BD3-LM) with step events and fixed tokens, over a toy
//! `PrefixDenoiser` whose law depends on the committed prefix, the block's revealed tokens, the
//! position and t: the events replayed on an all-mask state give the final samples and their
//! reveal steps (every sampler, ReMDM's remasks included, end-of-text cuts too; MD4 and GenMD4
//! schedules); a prompt is kept
//! verbatim, its whole blocks are committed without a network call, and prompting with a
//! sample's own first blocks reproduces that sample; a fixed token in a later block is kept.

use maskdiff_process::{DenoiseBatch, LogProbs, PrefixDenoiser, ProcessError, Vocab};
use maskdiff_sampler::{
    sample_blocks, sample_blocks_streamed, Constraint, RemdmConfig, SamplerConfig, SamplerError,
    SamplerKind, ScheduleRef, StepEvent,
};
use maskdiff_schedule::{Linear, PerTokenPolynomial, Shifted};

const V: usize = 5;
const B: usize = 4;

/// A toy block denoiser: the logits at block position n depend on the prefix (its sum and
/// length), the block's revealed tokens, n and t.
#[derive(Default)]
struct Toy {
    prefix: Vec<u32>,
    block_calls: usize,
    commits: Vec<Vec<u32>>,
}

impl PrefixDenoiser for Toy {
    fn vocab(&self) -> Vocab {
        Vocab::new(V).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        true
    }
    fn block_size(&self) -> usize {
        B
    }
    fn max_len(&self) -> usize {
        64
    }
    fn prefix_len(&self) -> usize {
        self.prefix.len()
    }
    fn reset(&mut self, _label: Option<u32>) {
        self.prefix.clear();
    }
    fn block_log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        self.block_calls += 1;
        let ctx: u32 = self.prefix.iter().sum::<u32>() + 3 * self.prefix.len() as u32;
        let mut data = Vec::with_capacity(b.batch * b.len * V);
        for i in 0..b.batch {
            let row = &b.ids[i * b.len..(i + 1) * b.len];
            let seen: u32 = row.iter().filter(|&&x| (x as usize) < V).sum();
            for n in 0..b.len {
                let logits: Vec<f32> = (0..V as u32)
                    .map(|k| {
                        ((k * 7 + ctx + 2 * seen + 5 * n as u32) % 11) as f32 * 0.4
                            + b.t[i] as f32 * k as f32 * 0.2
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
                data.extend(logits.iter().map(|l| l - m - z.ln()));
            }
        }
        Ok(LogProbs {
            data,
            batch: b.batch,
            len: b.len,
            vocab: V,
        })
    }
    fn commit(&mut self, block: &[u32]) -> Result<(), ProcessError> {
        self.prefix.extend_from_slice(block);
        self.commits.push(block.to_vec());
        Ok(())
    }
}

fn config(kind: SamplerKind, n: usize, len: usize) -> SamplerConfig {
    SamplerConfig {
        kind,
        steps: 5,
        num_samples: n,
        length: len,
        seed: 11,
        remdm: RemdmConfig {
            eta: 0.3,
            ..RemdmConfig::default()
        },
        ..SamplerConfig::default()
    }
}

const KINDS: [SamplerKind; 5] = [
    SamplerKind::Ancestral,
    SamplerKind::Mean,
    SamplerKind::Confidence,
    SamplerKind::Remdm,
    SamplerKind::Threshold,
];

/// Replays the events of every sampler in `kinds` under schedule `s` (see the module docs);
/// returns the number of remasks and of end-of-text stops seen.
fn replay(s: ScheduleRef<'_>, kinds: &[SamplerKind]) -> (usize, usize) {
    let (n, len) = (3, 10); // blocks of 4, 4, 2
    let (mut remasks, mut stops) = (0, 0);
    for &kind in kinds {
        for eot in [None, Some(1u32)] {
            let cfg = config(kind, n, len);
            let mut events: Vec<StepEvent> = Vec::new();
            let out =
                sample_blocks_streamed(&mut Toy::default(), s, &cfg, eot, None, &[], &mut |e| {
                    events.push(e.clone())
                })
                .unwrap();
            // the same samples as without events
            let plain = sample_blocks(&mut Toy::default(), s, &cfg, eot, None).unwrap();
            assert_eq!(plain, out, "{kind:?}");
            let mask = V as u32;
            let mut state = vec![vec![mask; len]; n];
            let mut reveal = vec![vec![u32::MAX; len]; n];
            let mut last_step = vec![0usize; n];
            let mut calls = 0u64;
            for e in &events {
                assert_eq!((e.num_chunks, e.num_blocks, e.total_steps), (n, 3, 15));
                assert!(
                    e.block * 5 < e.step && e.step <= (e.block + 1) * 5,
                    "{kind:?}: step {} in block {}",
                    e.step,
                    e.block
                );
                assert!(e.step >= last_step[e.chunk], "steps go forward");
                last_step[e.chunk] = e.step;
                calls += e.calls;
                assert_eq!(e.calls_so_far, calls);
                for r in &e.remasked {
                    assert_eq!(r.sequence, e.chunk);
                    assert_eq!(state[r.sequence][r.position], r.token);
                    state[r.sequence][r.position] = mask;
                    reveal[r.sequence][r.position] = u32::MAX;
                    remasks += 1;
                }
                for r in &e.revealed {
                    assert_eq!(r.sequence, e.chunk);
                    let range = e.block * B..((e.block + 1) * B).min(len);
                    assert!(
                        range.contains(&r.position),
                        "{r:?} outside block {}",
                        e.block
                    );
                    assert_eq!(state[r.sequence][r.position], mask, "revealed twice");
                    state[r.sequence][r.position] = r.token;
                    reveal[r.sequence][r.position] = e.step as u32;
                }
            }
            assert_eq!(calls, out.nfe.iter().map(|&x| x as u64).sum::<u64>());
            for i in 0..n {
                let k = out.sequences[i].len();
                assert_eq!(state[i][..k], out.sequences[i][..], "{kind:?} sample {i}");
                assert_eq!(
                    reveal[i][..k],
                    out.reveal_step[i][..],
                    "{kind:?} sample {i}"
                );
                match eot {
                    // nothing was drawn after the block that holds the end-of-text
                    Some(_) if out.stopped_at_eot[i] => {
                        stops += 1;
                        assert!(state[i][(out.blocks[i] * B).min(len)..]
                            .iter()
                            .all(|&x| x == mask))
                    }
                    _ => assert!(k == len && state[i].iter().all(|&x| x < mask)),
                }
            }
        }
    }
    (remasks, stops)
}

#[test]
fn events_replay_to_the_final_samples() {
    let md4 = Shifted::official(Linear);
    let genmd4 = PerTokenPolynomial::new(vec![0.5, 1.0, 1.5, 2.0, 3.0]).unwrap();
    for (s, kinds) in [
        (ScheduleRef::md4(&md4), &KINDS[..]),
        (
            ScheduleRef::genmd4(&genmd4),
            &[
                SamplerKind::Ancestral,
                SamplerKind::Mean,
                SamplerKind::Remdm,
                SamplerKind::Threshold,
            ][..],
        ),
    ] {
        let (remasks, stops) = replay(s, kinds);
        assert!(
            remasks > 0,
            "ReMDM remasked nothing: the replay of remasks was not tested"
        );
        assert!(
            stops > 0,
            "no sample stopped at end-of-text: the cut was not tested"
        );
    }
}

#[test]
fn prompts_are_kept_and_whole_prompt_blocks_cost_no_call() {
    let s = Shifted::official(Linear);
    let (n, len) = (2, 11);
    for kind in KINDS {
        let cfg = config(kind, n, len);
        // a block-aligned prompt made of sample 0's own first block reproduces sample 0
        let free = sample_blocks(&mut Toy::default(), &s, &cfg, None, None).unwrap();
        let mut toy = Toy::default();
        let mut events = Vec::new();
        let one = SamplerConfig {
            num_samples: 1,
            ..cfg.clone()
        };
        let head = &free.sequences[0][..B];
        let out = sample_blocks_streamed(
            &mut toy,
            &s,
            &one,
            None,
            None,
            &[Constraint::prefix(head)],
            &mut |e| events.push(e.block),
        )
        .unwrap();
        assert_eq!(out.sequences[0], free.sequences[0], "{kind:?}");
        assert!(
            events.iter().all(|&b| b >= 1),
            "no step in the prompt's block"
        );
        assert_eq!(toy.commits[0], head);
        assert_eq!(out.reveal_step[0][..B], [0; B]);
        assert!(out.reveal_step[0][B..].iter().all(|&r| r > 0));
        let mut free_toy = Toy::default();
        sample_blocks(&mut free_toy, &s, &one, None, None).unwrap();
        assert!(
            toy.block_calls < free_toy.block_calls,
            "{kind:?}: the prompt's block costs no call ({} vs {})",
            toy.block_calls,
            free_toy.block_calls
        );
        // a prompt that ends inside a block (6 tokens, B = 4) and a fixed token in a later
        // block are kept verbatim, for every sample
        let prompt = [4u32, 0, 3, 3, 1, 2];
        let mut template: Vec<Option<u32>> = vec![None; len];
        for (k, &x) in prompt.iter().enumerate() {
            template[k] = Some(x);
        }
        template[9] = Some(0);
        let out = sample_blocks_streamed(
            &mut Toy::default(),
            &s,
            &cfg,
            None,
            None,
            &[Constraint::from_template(&template)],
            &mut |_| {},
        )
        .unwrap();
        for (i, q) in out.sequences.iter().enumerate() {
            assert_eq!(q.len(), len);
            assert_eq!(q[..6], prompt, "{kind:?} sample {i}");
            assert_eq!(q[9], 0, "{kind:?} sample {i}");
            assert!(q.iter().all(|&x| (x as usize) < V));
            assert!(out.reveal_step[i][..6].iter().all(|&r| r == 0));
        }
        assert_ne!(
            out.sequences[0], out.sequences[1],
            "{kind:?}: distinct streams"
        );
    }
    // one constraint per sample, or one for all; any other count is an error
    let cfg = config(SamplerKind::Ancestral, 3, 8);
    let c = Constraint::prefix(&[1]);
    let err = sample_blocks_streamed(
        &mut Toy::default(),
        &s,
        &cfg,
        None,
        None,
        &[c.clone(), c],
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(
        err,
        SamplerError::ConstraintCount { got: 2, samples: 3 }
    ));
}
