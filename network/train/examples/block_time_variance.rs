//! Measurement (not a test): the variance of the block-diffusion training loss with one t per
//! sequence against one t per block (BD3-LM's estimator, `BlockTime::Block`), at the fixed
//! parameters of a trained time-free block checkpoint. For each of R batches of B consecutive
//! test chunks it draws the step's noise D times with each estimator (antithetic times as in
//! training; no dropout) and records the batch-mean NELBO — what one training step reports and
//! differentiates; the spread over the D draws is the estimator's own noise at that batch. It
//! prints, per estimator, the mean and the pooled within-batch standard deviation of the step
//! loss and of a single sequence's estimate, in bits per character, and the medians of the
//! per-batch and per-sequence standard deviations (the weight −α'/(1 − α) makes the losses
//! heavy-tailed near t = 0, so the pooled values are dominated by rare draws; the medians show
//! the typical spread).
//!
//! ```sh
//! cargo run --release -p maskdiff-train --example block_time_variance -- \
//!     --run RUN/checkpoint [--batches 32] [--batch 8] [--draws 16] [--cache data-cache]
//! ```

#[path = "common/args.rs"]
mod args;
use args::{variance_flags, VarianceFlags};

use maskdiff_data::{open_or_build_english_corpus, EvalChunks, SplitRatio, TokenizerId};
use maskdiff_network::dfdx::prelude::Cpu;
use maskdiff_objective::{Block, BlockTime, CleanBatch, Objective};
use maskdiff_train::{load_model, ModelNet, Weights};
use rand::{rngs::StdRng, SeedableRng};

fn median(x: &mut [f64]) -> f64 {
    x.sort_by(f64::total_cmp);
    let n = x.len();
    if n % 2 == 1 {
        x[n / 2]
    } else {
        0.5 * (x[n / 2 - 1] + x[n / 2])
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    args::only(&args::VARIANCE_FLAGS);
    let VarianceFlags {
        run,
        batches,
        batch,
        draws,
        cache,
    } = variance_flags()?;
    let dev = Cpu::default();
    let loaded = load_model::<Cpu, Block>(&run, Weights::Ema, &dev)?;
    let len = loaded.manifest.network.max_len.min(256);
    let file = open_or_build_english_corpus(&cache, TokenizerId::Text8)?;
    let vocab = file.vocab().size();
    let [_, _, test] = SplitRatio::default().ranges(file.len());
    let chunks = EvalChunks::new(test, len)?;
    let bits = 1.0 / (len as f64 * std::f64::consts::LN_2);
    println!(
        "checkpoint {}: B = {}, {batches} batches of {batch} test sequences of {len}, {draws} draws each",
        run.display(),
        loaded.objective.block_size()
    );
    for time in [BlockTime::Sequence, BlockTime::Block] {
        let o = loaded.objective.clone().with_time(time);
        let net = ModelNet(&loaded.model);
        let (mut step_var, mut seq_var, mut mean) = (0.0, 0.0, 0.0);
        let (mut step_sd, mut seq_sd) = (Vec::new(), Vec::new());
        for r in 0..batches {
            let first = r * chunks.count() / batches;
            let ids = chunks.batch(&file, first, batch)?.ids;
            let clean = CleanBatch::new(&ids, batch, len, vocab, None)?;
            let mut rng = StdRng::seed_from_u64(1000 + r as u64);
            let per: Vec<Vec<f64>> = (0..draws)
                .map(|_| Objective::<Cpu>::eval_nelbo(&o, &net, &clean, &mut rng))
                .collect::<Result<_, _>>()?;
            let steps: Vec<f64> = per
                .iter()
                .map(|p| p.iter().sum::<f64>() / batch as f64 * bits)
                .collect();
            let m = steps.iter().sum::<f64>() / draws as f64;
            let v = steps.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (draws - 1) as f64;
            step_var += v;
            step_sd.push(v.sqrt());
            mean += m;
            // one sequence's estimate: spread over draws, per sequence, pooled
            for s in 0..batch {
                let xs: Vec<f64> = per.iter().map(|p| p[s] * bits).collect();
                let ms = xs.iter().sum::<f64>() / draws as f64;
                let v = xs.iter().map(|x| (x - ms).powi(2)).sum::<f64>() / (draws - 1) as f64;
                seq_var += v;
                seq_sd.push(v.sqrt());
            }
        }
        println!(
            "{time:?} t: step loss {:.4} bits/char; std over draws: pooled {:.4} (step), {:.4} (one \
             sequence); median {:.4} (step), {:.4} (one sequence)",
            mean / batches as f64,
            (step_var / batches as f64).sqrt(),
            (seq_var / (batches * batch) as f64).sqrt(),
            median(&mut step_sd),
            median(&mut seq_sd)
        );
    }
    Ok(())
}
