//! `maskdiff sample`: load a checkpoint (EMA parameters by default), build the sampler from the
//! saved `[sample]` config and the flags, and print or write the samples (paper §6).

use crate::args::SampleArgs;
use crate::config::Config;
use crate::dataset::Codec;
use crate::error::{CliError, Result};
use crate::generate::{generate, Request};
use crate::run::{self, Loaded};
use maskdiff_network::Kernels as DfdxDevice;
use maskdiff_objective::{Objective, ReverseModel};
use std::path::Path;

pub fn run(a: SampleArgs) -> Result<()> {
    let dir = run::resolve_checkpoint(&a.run)?;
    let (_, _, mut cfg) = run::read_checkpoint_meta(&dir)?;
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
    if let maskdiff_objective::ObjectiveSpec::Block { .. } = loaded.objective.spec() {
        return Err(CliError::Input(
            "sampling a block-diffusion model is not supported by this build".into(),
        ));
    }
    let codec = Codec::from_identity(&loaded.extra.data)?;
    if a.class.is_some() && !matches!(codec, Codec::Image(_)) {
        return Err(CliError::Input(
            "--class needs a class-conditional image model".into(),
        ));
    }
    let mut den = loaded.denoiser.clone();
    let reverse = loaded.objective.reverse_model()?;
    let schedule_ref = match &reverse {
        ReverseModel::GenMd4(g) => maskdiff_sampler::ScheduleRef::genmd4(g),
        ReverseModel::Md4(s) => s.into(),
    };
    let req = Request {
        prompt: a.prompt.clone(),
        infill: a.infill.clone(),
        class: a.class,
        show_steps: a.show_steps,
        out: a.out.clone(),
    };
    let out = generate(
        &mut den,
        schedule_ref,
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
