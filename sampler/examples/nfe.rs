//! Network calls and wall time of each sampler kind on a toy time-free denoiser whose cost is
//! proportional to the batch (a context-mixing model over V = 27 tokens): the cached and
//! first-hitting samplers reach the same output law as Alg. 2 with far fewer calls.
//!
//! `cargo run -p maskdiff-sampler --release --example nfe -- [length] [steps] [samples]`

use maskdiff_process::{DenoiseBatch, Denoiser, LogProbs, ProcessError, Vocab};
use maskdiff_sampler::{sample, SamplerConfig, SamplerKind};
use maskdiff_schedule::{Linear, SamplingGrid, Shifted};
use std::time::Instant;

const V: usize = 27;

/// μ at position n: a softmax over tokens of a score mixing the nearest revealed neighbours.
struct Toy;

impl Denoiser for Toy {
    fn vocab(&self) -> Vocab {
        Vocab::new(V).unwrap()
    }
    fn is_time_conditioned(&self) -> bool {
        false
    }
    fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
        let mut data = Vec::with_capacity(b.batch * b.len * V);
        for i in 0..b.batch {
            let ids = &b.ids[i * b.len..(i + 1) * b.len];
            for n in 0..b.len {
                let left = ids[..n].iter().rev().find(|&&x| x < V as u32).copied();
                let right = ids[n + 1..].iter().find(|&&x| x < V as u32).copied();
                let logits: Vec<f32> = (0..V as u32)
                    .map(|v| {
                        let a = left.map_or(0.0, |l| ((l * 7 + v * 3) % 11) as f32 * 0.3);
                        let c = right.map_or(0.0, |r| ((r * 5 + v) % 13) as f32 * 0.2);
                        a + c
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
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let length = args.first().copied().unwrap_or(256);
    let steps = args.get(1).copied().unwrap_or(256);
    let samples = args.get(2).copied().unwrap_or(16);
    let sched = Shifted::official(Linear);
    println!("length {length}, steps {steps}, {samples} samples, cosine grid, V = {V}");
    println!(
        "{:<14} {:>8} {:>12} {:>10}",
        "kind", "calls", "NFE/sample", "wall ms"
    );
    for kind in [
        SamplerKind::Ancestral,
        SamplerKind::Mean,
        SamplerKind::Cached,
        SamplerKind::FirstHitting,
        SamplerKind::Confidence,
    ] {
        let cfg = SamplerConfig {
            kind,
            steps,
            grid: SamplingGrid::Cosine,
            num_samples: samples,
            length,
            batch_size: samples,
            ..SamplerConfig::default()
        };
        let start = Instant::now();
        let out = sample(&mut Toy, &sched, &cfg, &[], None).expect("sampling");
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let nfe = out.nfe.iter().map(|&k| k as f64).sum::<f64>() / samples as f64;
        println!(
            "{:<14} {:>8} {:>12.1} {:>10.1}",
            kind.name(),
            out.calls,
            nfe,
            ms
        );
    }
}
