//! Measurement (not a test): the noise of the block-diffusion training loss with BD3-LM's
//! clipped mask rates (Arriola et al. 2025, §5) against the full range, at the fixed parameters
//! of a trained time-free block checkpoint. For each of R batches of B consecutive test chunks it
//! draws the step's noise D times per interval with the objective's own training draws
//! (`Objective::noise`: per-block times, antithetic, mask rates uniform on the interval; no
//! dropout) and records the batch mean of the weighted loss — what one training step reports
//! and differentiates (the NELBO for the full range, the clipped objective otherwise) — and
//! prints, per interval, its mean and the pooled within-batch standard deviation over the D
//! draws, in bits per character (the estimator's own noise at a batch, without the data's).
//!
//! ```sh
//! cargo run --release -p maskdiff-train --example clip_step_variance -- \
//!     --run RUN/checkpoint [--batches 32] [--batch 8] [--draws 16] [--cache data-cache] \
//!     [--mask-rates 0,1:0.3,0.8:0.75,1]
//! ```

#[path = "common/args.rs"]
mod args;
use args::{arg, variance_flags, VarianceFlags};

use maskdiff_data::{open_or_build_english_corpus, EvalChunks, SplitRatio, TokenizerId};
use maskdiff_network::dfdx::prelude::{Cpu, NoneTape};
use maskdiff_objective::{md4_diffusion_loss, Block, BlockNet, CleanBatch, LogitsNet, Objective};
use maskdiff_process::DenoiseBatch;
use maskdiff_schedule::MaskRate;
use maskdiff_train::{load_model, ModelNet, Weights};
use rand::{rngs::StdRng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    args::only(&[args::VARIANCE_FLAGS.as_slice(), &["--mask-rates"]].concat());
    let VarianceFlags {
        run,
        batches,
        batch,
        draws,
        cache,
    } = variance_flags()?;
    let rates: String = arg("--mask-rates", "0,1:0.3,0.8:0.75,1".to_string());
    let rates: Vec<MaskRate> = rates.split(':').map(str::parse).collect::<Result<_, _>>()?;
    let dev = Cpu::default();
    let loaded = load_model::<Cpu, Block>(&run, Weights::Ema, &dev)?;
    let len = loaded.manifest.network.max_len.min(256);
    let file = open_or_build_english_corpus(&cache, TokenizerId::Text8)?;
    let vocab = file.vocab().size();
    let [_, _, test] = SplitRatio::default().ranges(file.len());
    let chunks = EvalChunks::new(test, len)?;
    let bits = 1.0 / (len as f64 * std::f64::consts::LN_2);
    println!(
        "checkpoint {}: B = {}, {:?} t, trained on mask rates {}; {batches} batches of {batch} \
         test sequences of {len}, {draws} draws each",
        run.display(),
        loaded.objective.block_size(),
        loaded.objective.time(),
        Objective::<Cpu>::mask_rate(&loaded.objective).unwrap_or(MaskRate::FULL),
    );
    let net = ModelNet(&loaded.model);
    for rate in rates {
        let mut o = loaded.objective.clone();
        Objective::<Cpu>::set_mask_rate(&mut o, Some(rate))?;
        let (mut var, mut mean) = (0.0, 0.0);
        for r in 0..batches {
            let first = r * chunks.count() / batches;
            let ids = chunks.batch(&file, first, batch)?.ids;
            let clean = CleanBatch::new(&ids, batch, len, vocab, None)?;
            let mut rng = StdRng::seed_from_u64(1000 + r as u64);
            let mut steps = Vec::with_capacity(draws);
            for _ in 0..draws {
                let mb = Objective::<Cpu>::noise(&o, &clean, &mut rng)?;
                let t = mb.row_times();
                let input = DenoiseBatch {
                    ids: mb.xt(),
                    batch,
                    len,
                    t: &t,
                    labels: None,
                };
                let logits = BlockNet::new(&net, mb.x0()).logits(&input, NoneTape, None)?;
                let per = md4_diffusion_loss(logits, &mb)?.as_vec();
                steps.push(per.iter().map(|&x| x as f64).sum::<f64>() / batch as f64 * bits);
            }
            let m = steps.iter().sum::<f64>() / draws as f64;
            var += steps.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (draws - 1) as f64;
            mean += m;
        }
        println!(
            "mask rates {rate}: step loss (diffusion part) {:.4} bits/char; std over draws, pooled {:.4}",
            mean / batches as f64,
            (var / batches as f64).sqrt()
        );
    }
    Ok(())
}
