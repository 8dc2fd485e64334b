//! The samplers ask the denoiser only for the rows they read (`Denoiser::log_probs_rows`):
//! under Alg. 2 which masked positions a step reveals is decided before the network is called,
//! so ancestral, cached and first-hitting sampling (and the final fill) request exactly the
//! positions they reveal — each reveal once; the samplers that rank or reveal by μ (confidence,
//! threshold, GenMD4) request every masked position and no decoded one, and mean (Alg. 3) its
//! reveals. A row they did not request is never read (the answer holds nothing else, and
//! reading a missing row is an error).

mod common;

use common::*;
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, RowLogProbs, Vocab};
use maskdiff_sampler::{sample, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, PerTokenPolynomial, SamplingGrid, Shifted};

/// Answers row requests from the full output and records, per call, how many positions were
/// masked in the input and how many of the requested rows were.
struct Masked {
    inner: HashDenoiser,
    /// (masked positions in the input, rows requested, requested rows that are masked)
    calls: Vec<(usize, usize, usize)>,
}

impl Denoiser for Masked {
    fn vocab(&self) -> Vocab {
        self.inner.vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        self.inner.is_time_conditioned()
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        self.inner.log_probs(b)
    }
    fn log_probs_rows(
        &mut self,
        b: &DenoiseBatch<'_>,
        rows: &[Vec<usize>],
    ) -> Result<RowLogProbs, ProcessError> {
        let mask = self.inner.v as u32;
        let masked = b.ids.iter().filter(|&&x| x == mask).count();
        let asked = rows.iter().map(Vec::len).sum();
        let asked_masked = (rows.iter().enumerate())
            .flat_map(|(i, r)| r.iter().map(move |&p| i * b.len + p))
            .filter(|&k| b.ids[k] == mask)
            .count();
        self.calls.push((masked, asked, asked_masked));
        RowLogProbs::select(&self.inner.log_probs(b)?, rows)
    }
}

#[test]
fn samplers_request_exactly_the_revealed_rows() {
    let sched = Shifted::official(Linear);
    for kind in [
        SamplerKind::Ancestral,
        SamplerKind::Cached,
        SamplerKind::FirstHitting,
    ] {
        for tc in [false, true] {
            let c = SamplerConfig {
                kind,
                steps: 40,
                grid: SamplingGrid::Cosine,
                num_samples: 6,
                length: 10,
                seed: 11,
                batch_size: 4,
                ..SamplerConfig::default()
            };
            let mut d = Masked {
                inner: HashDenoiser::new(5, tc),
                calls: Vec::new(),
            };
            let out = sample(&mut d, &sched, &c, &[], None).unwrap();
            // every position starts masked and is revealed once (some by the final fill)
            let asked: usize = d.calls.iter().map(|c| c.1).sum();
            assert_eq!(asked, 6 * 10, "{kind:?}, time-conditioned {tc}");
            assert_eq!(d.calls.len() as u64, out.calls, "{kind:?}");
            assert!(d.calls.iter().all(|c| c.2 == c.1), "only masked rows");
            assert!(out.sequences.iter().flatten().all(|&x| x < 5));
            // the same samples as with a denoiser that answers from its full output
            let full = sample(&mut HashDenoiser::new(5, tc), &sched, &c, &[], None).unwrap();
            assert_eq!(out.sequences, full.sequences, "{kind:?}");
            assert_eq!(out.nfe, full.nfe);
        }
    }
}

#[test]
fn samplers_reading_mu_at_every_mask_request_the_masked_rows_only() {
    let md4 = Shifted::official(Linear);
    let genmd4 = PerTokenPolynomial::new(vec![0.5, 1.0, 1.5, 2.0, 3.0]).unwrap();
    let cases = [
        (SamplerKind::Confidence, false),
        (SamplerKind::Threshold, false),
        (SamplerKind::Mean, false),
        (SamplerKind::Remdm, false),
        (SamplerKind::Ancestral, true),
        (SamplerKind::Cached, true),
        (SamplerKind::Mean, true),
    ];
    for (kind, gen) in cases {
        let c = SamplerConfig {
            kind,
            steps: 12,
            num_samples: 5,
            length: 10,
            seed: 4,
            batch_size: 5,
            ..SamplerConfig::default()
        };
        let mut d = Masked {
            inner: HashDenoiser::new(5, false),
            calls: Vec::new(),
        };
        let run = |d: &mut dyn Denoiser| {
            if gen {
                sample(d, &genmd4, &c, &[], None).unwrap()
            } else {
                sample(d, &md4, &c, &[], None).unwrap()
            }
        };
        let out = run(&mut d);
        let what = format!("{kind:?}, GenMD4 {gen}");
        // every call a row request
        assert_eq!(d.calls.len() as u64, out.calls, "{what}");
        for &(masked, asked, asked_masked) in &d.calls {
            // never a decoded position
            assert_eq!(asked_masked, asked, "{what}");
            // every masked position where the step reads μ at all of them
            let all = matches!(kind, SamplerKind::Confidence | SamplerKind::Threshold) || gen;
            if all {
                assert_eq!(asked, masked, "{what}");
            }
        }
        if kind == SamplerKind::Mean && !gen {
            // Alg. 3: every reveal asked for once (the final fill's too)
            let asked: usize = d.calls.iter().map(|c| c.1).sum();
            assert_eq!(asked, 5 * 10, "{what}");
        }
        // the same samples as with a denoiser that answers from its full output
        let full = run(&mut HashDenoiser::new(5, false));
        assert_eq!(out.sequences, full.sequences, "{what}");
        assert_eq!(out.nfe, full.nfe, "{what}");
    }
}

/// Reading a row the denoiser did not return is an error, not a silent wrong value.
#[test]
fn a_denoiser_missing_rows_is_an_error() {
    struct Short(HashDenoiser);
    impl Denoiser for Short {
        fn vocab(&self) -> Vocab {
            self.0.vocab()
        }
        fn is_time_conditioned(&self) -> bool {
            false
        }
        fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
            self.0.log_probs(b)
        }
        fn log_probs_rows(
            &mut self,
            b: &DenoiseBatch<'_>,
            rows: &[Vec<usize>],
        ) -> Result<RowLogProbs, ProcessError> {
            // drops every sequence's last requested row
            let fewer: Vec<Vec<usize>> = rows
                .iter()
                .map(|r| r[..r.len().saturating_sub(1)].to_vec())
                .collect();
            RowLogProbs::select(&self.0.log_probs(b)?, &fewer)
        }
    }
    let c = SamplerConfig {
        kind: SamplerKind::Cached,
        steps: 20,
        num_samples: 2,
        length: 6,
        ..SamplerConfig::default()
    };
    let r = sample(
        &mut Short(HashDenoiser::new(4, false)),
        &Shifted::official(Linear),
        &c,
        &[],
        None,
    );
    assert!(r.is_err());
}
