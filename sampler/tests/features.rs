//! Confidence-based unmasking, semi-autoregressive blocks, class labels, temperature, streaming
//! with early stop, and the typed errors.

mod common;

use common::*;
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_sampler::{
    sample, Constraint, Sampler, SamplerConfig, SamplerError, SamplerKind, ScheduleRef,
};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};

/// Position n predicts token n % V with confidence conf[n] (rest spread evenly).
struct Peaked {
    conf: Vec<f64>,
    v: usize,
    seen: Vec<Vec<u32>>,
}

impl Denoiser for Peaked {
    fn vocab(&self) -> Vocab {
        Vocab::new(self.v).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        false
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        let mut rows = Vec::new();
        for i in 0..b.batch {
            self.seen.push(b.ids[i * b.len..(i + 1) * b.len].to_vec());
            for n in 0..b.len {
                let c = self.conf[n];
                let mut r = vec![(1.0 - c) / (self.v - 1) as f64; self.v];
                r[n % self.v] = c;
                rows.push(r);
            }
        }
        Ok(to_logprobs(rows, b.batch, b.len, self.v))
    }
}

fn base(kind: SamplerKind, steps: usize, len: usize) -> SamplerConfig {
    SamplerConfig {
        kind,
        steps,
        grid: SamplingGrid::Uniform,
        num_samples: 1,
        length: len,
        ..SamplerConfig::default()
    }
}

#[test]
fn confidence_reveals_the_most_confident_k_per_step() {
    let conf = vec![0.5, 0.9, 0.6, 0.95, 0.55, 0.8, 0.7, 0.65];
    // Greedy proposals; linear uniform, 8 positions, 4 steps: 2 per step, by confidence:
    // {3, 1}, {5, 6}, {7, 2}, {4, 0}.
    let mut c = base(SamplerKind::Confidence, 4, 8);
    c.temperature = 0.0;
    let mut den = Peaked {
        conf: conf.clone(),
        v: 3,
        seen: vec![],
    };
    let events: Vec<_> = Sampler::new(&mut den, &Linear, &c, &[], None)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let sets: Vec<Vec<usize>> = events
        .iter()
        .map(|e| e.revealed.iter().map(|r| r.position).collect())
        .collect();
    assert_eq!(sets, vec![vec![1, 3], vec![5, 6], vec![2, 7], vec![0, 4]]);
    for e in &events {
        for r in &e.revealed {
            assert_eq!(r.token as usize, r.position % 3);
            assert!((r.prob - conf[r.position]).abs() < 1e-6);
        }
    }
    // Cosine grid: counts 1, 2, 2, 3 (masked left ⌊8 sin(3π/8)⌋ = 7, ⌊8 sin(π/4)⌋ = 5, 3, 0).
    c.grid = SamplingGrid::Cosine;
    let mut den = Peaked {
        conf,
        v: 3,
        seen: vec![],
    };
    let counts: Vec<usize> = Sampler::new(&mut den, &Linear, &c, &[], None)
        .unwrap()
        .map(|e| e.unwrap().revealed.len())
        .collect();
    assert_eq!(counts, vec![1, 2, 2, 3]);
    // One call per step, each after a change of state.
    assert_eq!(den.seen.len(), 4);
}

#[test]
fn blocks_generate_left_to_right() {
    // 10 positions in blocks of 4 (4, 4, 2) with 9 steps (3 per block).
    let mut c = base(SamplerKind::Ancestral, 9, 10);
    c.block_size = Some(4);
    let mut den = HashDenoiser::new(3, true);
    let mut last_block_step = [0usize; 3];
    let mut first_block_step = [usize::MAX; 3];
    let sched = Shifted::official(Linear);
    let sampler = Sampler::new(&mut den, &sched, &c, &[], None).unwrap();
    for ev in sampler {
        let ev = ev.unwrap();
        assert_eq!(ev.num_blocks, 3);
        for r in &ev.revealed {
            let b = r.position / 4;
            assert_eq!(
                b, ev.block,
                "position {} revealed in block {}",
                r.position, ev.block
            );
            last_block_step[b] = last_block_step[b].max(ev.step);
            first_block_step[b] = first_block_step[b].min(ev.step);
        }
        assert!(ev.step <= 3 * (ev.block + 1) && ev.step > 3 * ev.block);
    }
    assert!(last_block_step[0] < first_block_step[1] && last_block_step[1] < first_block_step[2]);
    // While block b runs, every position after it is still masked in the denoiser's input,
    // and every position before it is a real token.
    for (ids, t) in &den.seen {
        let first_mask = ids.iter().position(|&x| x == 3).unwrap_or(10);
        let block = first_mask / 4;
        assert!(ids[..block * 4].iter().all(|&x| x < 3));
        assert!(
            ids[((block + 1) * 4).min(10)..].iter().all(|&x| x == 3),
            "{ids:?} at t={t}"
        );
    }
}

/// Label l → token l with probability 0.97 at every position.
struct Labelled;

impl Denoiser for Labelled {
    fn vocab(&self) -> Vocab {
        Vocab::new(4).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        true
    }
    fn num_classes(&self) -> usize {
        4
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        let labels = b.labels.expect("labels are passed through");
        let mut rows = Vec::new();
        for &l in labels {
            for _ in 0..b.len {
                let mut r = vec![0.01; 4];
                r[l as usize] = 0.97;
                rows.push(r);
            }
        }
        Ok(to_logprobs(rows, b.batch, b.len, 4))
    }
}

#[test]
fn labels_reach_the_denoiser() {
    let mut c = base(SamplerKind::FirstHitting, 100, 6);
    c.num_samples = 4;
    c.temperature = 0.0; // greedy: the label's token everywhere
    let labels = [2, 0, 3, 1];
    let out = sample(&mut Labelled, &Linear, &c, &[], Some(&labels)).unwrap();
    for (s, &l) in out.sequences.iter().zip(&labels) {
        assert!(s.iter().all(|&x| x == l), "{s:?} for label {l}");
    }
    assert_eq!(
        sample(&mut Labelled, &Linear, &c, &[], Some(&[0, 1])).unwrap_err(),
        SamplerError::LabelCount { got: 2, samples: 4 }
    );
    assert_eq!(
        sample(&mut Labelled, &Linear, &c, &[], Some(&[0, 1, 4, 0])).unwrap_err(),
        SamplerError::LabelOutOfRange {
            label: 4,
            classes: 4
        }
    );
    assert_eq!(
        sample(
            &mut HashDenoiser::new(4, true),
            &Linear,
            &c,
            &[],
            Some(&[0, 1, 2, 0])
        )
        .unwrap_err(),
        SamplerError::LabelsUnsupported
    );
}

#[test]
fn temperature_reshapes_the_token_law() {
    // μ = (0.2, 0.8) at τ = 0.5 → (0.04, 0.64)/0.68; top-p 0.5 on top of it keeps token 1 only.
    let mut c = base(SamplerKind::FirstHitting, 64, 50);
    c.num_samples = 400;
    c.temperature = 0.5;
    c.seed = 3;
    let mut den = FixedDenoiser {
        mu: vec![0.2, 0.8],
        time_conditioned: false,
    };
    let out = sample(&mut den, &Linear, &c, &[], None).unwrap();
    let ones: u64 = out.sequences.iter().flatten().map(|&x| x as u64).sum();
    let total = 400 * 50;
    assert_fits(
        "temperature 0.5",
        &[total - ones, ones],
        &[0.04 / 0.68, 0.64 / 0.68],
    );
    c.top_p = 0.5;
    let out = sample(&mut den, &Linear, &c, &[], None).unwrap();
    assert!(out.sequences.iter().flatten().all(|&x| x == 1));
}

#[test]
fn streaming_can_stop_early() {
    let c = SamplerConfig {
        num_samples: 3,
        ..base(SamplerKind::Ancestral, 50, 12)
    };
    let mut den = HashDenoiser::new(5, true);
    let mut s = Sampler::new(&mut den, &Linear, &c, &[Constraint::prefix(&[4, 4])], None).unwrap();
    let mut prev_calls = 0;
    for _ in 0..10 {
        let ev = s.next().unwrap().unwrap();
        assert_eq!(ev.total_steps, 50);
        assert!(ev.calls_so_far >= prev_calls && ev.calls == 1);
        prev_calls = ev.calls_so_far;
    }
    let snap = s.snapshot();
    assert!(!snap.complete);
    // After 10 of 50 uniform steps some masks (id 5) remain, with step u32::MAX.
    let masks = snap.sequences.iter().flatten().filter(|&&x| x == 5).count();
    assert!(masks > 0);
    for (seq, steps) in snap.sequences.iter().zip(&snap.reveal_step) {
        assert_eq!(&seq[..2], &[4, 4]);
        for (x, r) in seq.iter().zip(steps) {
            assert_eq!(*x == 5, *r == u32::MAX);
            assert!(*r == u32::MAX || *r <= 10);
        }
    }
    assert_eq!(snap.calls, 10);
    let rest = s.run().unwrap();
    assert!(rest.complete);
    assert!(rest.sequences.iter().flatten().all(|&x| x < 5));
}

/// Returns NaNs or a wrongly shaped output.
struct Broken {
    nan: bool,
}

impl Denoiser for Broken {
    fn vocab(&self) -> Vocab {
        Vocab::new(2).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        true
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        let len = if self.nan { b.len } else { b.len + 1 };
        let mut data = vec![-0.693f32; b.batch * len * 2];
        if self.nan {
            // one NaN per row: samplers read (and check) only the rows they reveal
            data.iter_mut().step_by(2).for_each(|x| *x = f32::NAN);
        }
        Ok(LogProbs {
            data,
            batch: b.batch,
            len,
            vocab: 2,
        })
    }
}

#[test]
fn errors_are_typed() {
    let c = base(SamplerKind::Ancestral, 10, 4);
    let mut den = HashDenoiser::new(3, true);
    let err = |den: &mut HashDenoiser, c: &SamplerConfig, cons: &[Constraint]| {
        sample(den, &Linear, c, cons, None).unwrap_err()
    };
    assert_eq!(
        err(&mut den, &c, &[Constraint::prefix(&[0, 1, 2, 0, 1])]),
        SamplerError::ConstraintOutOfRange {
            position: 4,
            length: 4
        }
    );
    assert_eq!(
        err(&mut den, &c, &[Constraint::prefix(&[3])]),
        SamplerError::ConstraintToken {
            position: 0,
            token: 3,
            vocab: 3
        }
    );
    assert_eq!(
        err(&mut den, &c, &[Constraint::none(), Constraint::none()]),
        SamplerError::ConstraintCount { got: 2, samples: 1 }
    );
    assert_eq!(
        err(
            &mut den,
            &SamplerConfig {
                top_p: 1.5,
                ..c.clone()
            },
            &[]
        ),
        SamplerError::BadTopP(1.5)
    );
    assert_eq!(
        err(
            &mut den,
            &SamplerConfig {
                steps: 0,
                ..c.clone()
            },
            &[]
        ),
        SamplerError::BadSteps(0)
    );
    // GenMD4: unsupported kinds, vocabulary mismatch, caching a time-conditioned denoiser.
    let w = PerTokenPolynomial::new(vec![1.0, 2.0, 3.0]).unwrap();
    for kind in [SamplerKind::FirstHitting, SamplerKind::Confidence] {
        let e = sample(
            &mut den,
            &w,
            &SamplerConfig { kind, ..c.clone() },
            &[],
            None,
        );
        assert!(matches!(e, Err(SamplerError::Unsupported { .. })), "{kind}");
    }
    let e = sample(
        &mut den,
        &w,
        &SamplerConfig {
            kind: SamplerKind::Cached,
            ..c.clone()
        },
        &[],
        None,
    );
    assert!(matches!(
        e,
        Err(SamplerError::Unsupported { kind: "cached", .. })
    ));
    let w2 = PerTokenPolynomial::new(vec![1.0, 2.0]).unwrap();
    assert_eq!(
        sample(&mut den, ScheduleRef::genmd4(&w2), &c, &[], None).unwrap_err(),
        SamplerError::VocabMismatch {
            denoiser: 3,
            schedule: 2
        }
    );
    // Bad denoiser outputs.
    assert!(matches!(
        sample(&mut Broken { nan: true }, &Linear, &c, &[], None),
        Err(SamplerError::BadPrediction(_))
    ));
    assert!(matches!(
        sample(&mut Broken { nan: false }, &Linear, &c, &[], None),
        Err(SamplerError::Process(ProcessError::Shape(_)))
    ));
    // After an error the iterator ends.
    let mut broken = Broken { nan: true };
    let mut s = Sampler::new(&mut broken, &Linear, &c, &[], None).unwrap();
    assert!(s.next().unwrap().is_err());
    assert!(s.next().is_none());
}
