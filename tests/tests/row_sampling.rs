//! The row-restricted network forward (the last block only at the rows a step reads: its
//! reveals, or every masked position for the samplers that rank by μ) does not change what the
//! samplers draw: ancestral, cached, first-hitting, mean, confidence, threshold and ReMDM
//! samples from a random `tiny` transformer are bit-identical with the network answering row
//! requests itself and with a wrapper that refuses them (the default: full forward, then
//! select), time-free and time-conditioned, f32 and with bf16 products.

use dfdx::prelude::*;
use maskdiff_network::{with_precision, NetworkConfig, NetworkDenoiser, Precision};
use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_sampler::{sample, SampleOutput, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, Shifted};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Forwards everything but `log_probs_rows` (so the trait's default answers it from the full
/// forward).
struct FullOnly<'a>(&'a mut NetworkDenoiser<f32, Cpu>);

impl Denoiser for FullOnly<'_> {
    fn vocab(&self) -> Vocab {
        self.0.vocab()
    }
    fn is_time_conditioned(&self) -> bool {
        self.0.is_time_conditioned()
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        self.0.log_probs(b)
    }
}

#[test]
fn samples_are_identical_with_and_without_the_row_forward() {
    let dev = Cpu::default();
    let sched = Shifted::official(Linear);
    for tc in [false, true] {
        let mut cfg = NetworkConfig::preset("tiny", 6).unwrap();
        cfg.time_conditioning = tc;
        let mut den = NetworkDenoiser::new(cfg.init::<f32, Cpu>(&dev, 2).unwrap());
        // random weights everywhere (the output layer starts at zero: uniform predictions)
        let mut rng = StdRng::seed_from_u64(9);
        for p in den.model.params_mut() {
            let vals: Vec<f32> = (0..p.numel())
                .map(|_| (rng.gen::<f32>() * 2.0 - 1.0) * 0.8)
                .collect();
            p.value = dev.tensor_from_vec(vals, (p.numel(),));
        }
        for precision in [Precision::F32, Precision::Bf16] {
            for kind in [
                SamplerKind::Ancestral,
                SamplerKind::Cached,
                SamplerKind::FirstHitting,
                SamplerKind::Mean,
                SamplerKind::Confidence,
                SamplerKind::Threshold,
                SamplerKind::Remdm,
            ] {
                let c = SamplerConfig {
                    kind,
                    steps: 24,
                    num_samples: 5,
                    length: 16,
                    batch_size: 5,
                    seed: 3,
                    ..SamplerConfig::default()
                };
                let run = |d: &mut dyn Denoiser| -> SampleOutput {
                    with_precision(precision, || sample(d, &sched, &c, &[], None).unwrap())
                };
                let rows = run(&mut den);
                let full = run(&mut FullOnly(&mut den));
                let what = format!("{kind:?}, time-conditioned {tc}, {precision}");
                assert_eq!(rows.sequences, full.sequences, "{what}");
                assert_eq!(rows.reveal_step, full.reveal_step, "{what}");
                assert_eq!(rows.nfe, full.nfe, "{what}");
                // the samples are not degenerate: several distinct tokens (the samplers that
                // keep their most confident proposals settle on fewer)
                let mut seen: Vec<u32> = rows.sequences.concat();
                seen.sort_unstable();
                seen.dedup();
                let least = match kind {
                    SamplerKind::Confidence | SamplerKind::Threshold => 2,
                    _ => 3,
                };
                assert!(seen.len() >= least, "{what}: {seen:?}");
            }
        }
    }
}
