//! `maskdiff sample`: load a checkpoint (EMA parameters by default), build the sampler from the
//! saved `[sample]` config and the flags, and print or write the samples (paper §6).

use crate::args::SampleArgs;
use crate::config::Config;
use crate::dataset::Codec;
use crate::error::{CliError, Result};
use crate::generate::{generate, generate_blocks, Request};
use crate::run::{self, Loaded};
use maskdiff_network::Kernels as DfdxDevice;
use maskdiff_network::{BlockDenoiser, CacheMode};
use maskdiff_objective::{Objective, ReverseModel};
use std::path::Path;

pub fn run(a: SampleArgs) -> Result<()> {
    if let Some(p) = &a.out {
        crate::fsutil::ensure_output_file(p)?;
    }
    let dir = run::resolve_checkpoint(&a.run)?;
    let (_, _, mut cfg) = run::read_checkpoint_meta(&dir)?;
    super::use_precision(a.precision.unwrap_or_default());
    let s = &mut cfg.sample;
    if let Some(v) = a.num_samples {
        s.num_samples = v;
    }
    if let Some(v) = a.steps {
        s.steps = v;
    }
    if let Some(v) = a.grid {
        s.grid = v;
    }
    if let Some(v) = a.sampler {
        s.sampler = v.into();
    }
    if let Some(v) = a.top_p {
        s.top_p = v;
    }
    if let Some(v) = a.temperature {
        s.temperature = v;
    }
    if let Some(v) = a.block_size {
        s.block_size = v;
    }
    if let Some(v) = a.remdm_strategy {
        s.remdm_strategy = v.into();
    }
    if let Some(v) = a.eta {
        s.remdm_eta = v;
    }
    if let Some(v) = a.remdm_loop {
        s.remdm_loop = Some(v);
    }
    if let Some(v) = a.threshold {
        s.threshold = v;
    }
    if let Some(v) = a.seed {
        s.seed = v;
    }
    cfg.validate()?;
    let (man, _, _) = run::read_checkpoint_meta(&dir)?;
    run::with_device!(cfg, "sampling", |dev| run::with_objective!(
        man.train.objective,
        sample_on::<_>(dev, &dir, &cfg, &a)
    ))
}

fn sample_on<D: DfdxDevice<f32>, O: Objective<D>>(
    dev: D,
    dir: &Path,
    cfg: &Config,
    a: &SampleArgs,
) -> Result<()> {
    // the network and the objective's reverse process of the same parameters (EMA or raw)
    let loaded = Loaded::<D, O>::open(dir, !a.no_ema, &dev)?;
    let codec = Codec::from_identity(&loaded.extra.data)?;
    if let maskdiff_objective::ObjectiveSpec::Block { .. } = loaded.objective.spec() {
        return sample_blocks(loaded, &codec, cfg, a);
    }
    if a.length.is_some() || a.no_cache {
        return Err(CliError::Input(
            "--length and --no-cache are for block-diffusion models".into(),
        ));
    }
    if a.class.is_some() && !matches!(codec, Codec::Image(_)) {
        return Err(CliError::Input(
            "--class needs a class-conditional image model".into(),
        ));
    }
    let mut den = loaded.denoiser.clone();
    let reverse = loaded.objective.reverse_model()?;
    let req = Request {
        prompt: a.prompt.clone(),
        infill: a.infill.clone(),
        class: a.class,
        show_steps: a.show_steps,
        out: a.out.clone(),
    };
    let out = generate(
        &mut den,
        schedule_ref(&reverse),
        &cfg.sample,
        &codec,
        loaded.extra.data.seq_len,
        &req,
    )?;
    let mean_nfe = out.nfe_total as f64 / out.samples.max(1) as f64;
    eprintln!(
        "{} samples, {} sampler, T = {}, {} grid; network calls per sample: {mean_nfe:.1}",
        out.samples,
        cfg.sample.sampler,
        cfg.sample.steps,
        format!("{:?}", cfg.sample.grid).to_lowercase()
    );
    Ok(())
}

/// The schedule a sampler runs for an objective's reverse process.
fn schedule_ref(reverse: &ReverseModel) -> maskdiff_sampler::ScheduleRef<'_> {
    match reverse {
        ReverseModel::GenMd4(g) => maskdiff_sampler::ScheduleRef::genmd4(g),
        ReverseModel::Md4(s) => s.into(),
    }
}

/// Block-diffusion sampling (BD3-LM): block by block over the cached (or, with `--no-cache`,
/// recomputed) clean prefix; prints the network calls per sample and the throughput.
fn sample_blocks<D: DfdxDevice<f32>, O: Objective<D>>(
    loaded: Loaded<D, O>,
    codec: &Codec,
    cfg: &Config,
    a: &SampleArgs,
) -> Result<()> {
    let reverse = loaded.objective.reverse_model()?;
    let mode = if a.no_cache {
        CacheMode::Recompute
    } else {
        CacheMode::Cached
    };
    let len = a.length.unwrap_or(loaded.extra.data.seq_len);
    if len == 0 {
        return Err(CliError::Input("--length must be at least 1".into()));
    }
    let mut den = BlockDenoiser::new(loaded.denoiser.model.into_transformer()?, mode)?;
    // --block-size is MD4's semi-autoregressive decoding; a block-diffusion model generates in
    // the blocks it was trained with, so another size would be silently ignored
    let trained = den.model().config().block_size.unwrap_or(0);
    if let Some(b) = a.block_size.filter(|&b| b != 0 && b != trained) {
        return Err(CliError::Input(format!(
            "--block-size {b}: this block-diffusion model generates in the blocks of {trained} \
             tokens it was trained with (--block-size is semi-autoregressive decoding for MD4 \
             and GenMD4 models)"
        )));
    }
    let req = Request {
        prompt: a.prompt.clone(),
        infill: a.infill.clone(),
        class: a.class,
        show_steps: a.show_steps,
        out: a.out.clone(),
    };
    let start = std::time::Instant::now();
    let (out, tokens) = generate_blocks(
        &mut den,
        schedule_ref(&reverse),
        &cfg.sample,
        codec,
        len,
        &req,
    )?;
    let secs = start.elapsed().as_secs_f64();
    let mean_nfe = out.nfe_total as f64 / out.samples.max(1) as f64;
    eprintln!(
        "{} samples, {} sampler, T = {} per block of {}, {} grid, KV cache {}; network calls per sample: {mean_nfe:.1} (+ one per committed block); {tokens} tokens in {secs:.2} s = {:.1} tokens/s",
        out.samples,
        cfg.sample.sampler,
        cfg.sample.steps,
        den.model().config().block_size.unwrap_or(0),
        format!("{:?}", cfg.sample.grid).to_lowercase(),
        if a.no_cache { "off" } else { "on" },
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
