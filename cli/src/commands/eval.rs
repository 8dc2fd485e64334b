//! `maskdiff eval`: the negative ELBO of a checkpoint on a data split (paper §3; spec §3.4): bits
//! per character/dimension/token with a standard error over sequences from K independent
//! t-samples each, continuous time or the T-step discrete ELBO, and the perplexity bound 2^bits.
//! `--zero-shot` scores a GPT-2-tokenised model (MD4, or GenMD4 with its learned schedule) on
//! LAMBADA, WikiText-2/103, PTB and the One Billion Words subset (Table 1 protocol: SEDD's
//! detokenisers, blocks of the model length).

use crate::args::{EvalArgs, SplitArg};
use crate::config::{Config, DatasetKind};
use crate::dataset::{Codec, Data};
use crate::error::{CliError, Result};
use crate::run::{self, Loaded};
use maskdiff_data::zeroshot::{load_zero_shot, Grouping, ZeroShotSet};
use maskdiff_data::Split;
use maskdiff_network::Kernels as DfdxDevice;
use maskdiff_objective::{EvalOptions, NelboEstimate, Objective};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

pub fn run(a: EvalArgs) -> Result<()> {
    if let Some(p) = &a.json {
        crate::fsutil::ensure_output_file(p)?;
    }
    let dir = run::resolve_checkpoint(&a.run)?;
    let (_, _, mut cfg) = run::read_checkpoint_meta(&dir)?;
    super::use_precision(a.precision.unwrap_or_default());
    if let Some(d) = &a.data {
        cfg.data.path = d.clone();
    }
    let e = &mut cfg.eval;
    if let Some(v) = a.mc_samples {
        e.mc_samples = v;
    }
    if a.discrete_steps.is_some() {
        e.discrete_steps = a.discrete_steps;
    }
    if let Some(v) = a.max_sequences {
        e.max_sequences = v;
    }
    if let Some(v) = a.batch_size {
        e.batch_size = v;
    }
    if let Some(v) = a.seed {
        e.seed = v;
    }
    cfg.validate()?;
    let (man, _, _) = run::read_checkpoint_meta(&dir)?;
    run::with_device!(cfg, "evaluating", |dev| run::with_objective!(
        man.train.objective,
        eval_on::<_>(dev, &dir, &cfg, &a)
    ))
}

fn bar(total: usize, what: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{what} {{bar:30.cyan/blue}} {{pos}}/{{len}} sequences ETA {{eta}}"
            ))
            .expect("valid template"),
        );
        b
    })
}

fn opts(cfg: &Config) -> EvalOptions {
    EvalOptions {
        mc_samples: cfg.eval.mc_samples,
        discrete_steps: cfg.eval.discrete_steps,
        batch_rows: cfg.eval.batch_size,
        seed: cfg.eval.seed,
    }
}

fn elbo_name(r: &NelboEstimate) -> String {
    match r.discrete_steps {
        None => "continuous-time ELBO".into(),
        Some(t) => format!("{t}-step discrete-time ELBO"),
    }
}

/// `--block-time`: the MD4 block NELBO with the evaluation times drawn per sequence or per
/// block, whatever the run trained with.
fn block_estimate_with<
    M: maskdiff_process::Denoiser + ?Sized,
    D: DfdxDevice<f32>,
    O: Objective<D>,
>(
    den: &mut M,
    loaded: &Loaded<D, O>,
    seqs: &[Vec<u32>],
    labels: Option<&[u32]>,
    opts: EvalOptions,
    time: crate::args::BlockTimeArg,
    progress: &mut dyn FnMut(usize),
) -> Result<NelboEstimate> {
    use maskdiff_objective::{BlockTime, InnerSpec, ObjectiveSpec, ReverseModel};
    let (block_size, schedule) = match (loaded.objective.spec(), loaded.objective.reverse_model()?)
    {
        (
            ObjectiveSpec::Block {
                block_size,
                inner: InnerSpec::Md4,
                ..
            },
            ReverseModel::Md4(s),
        ) => (block_size, s),
        _ => {
            return Err(CliError::Input(
                "--block-time is for block-diffusion models with MD4 inside the blocks".into(),
            ))
        }
    };
    let time = match time {
        crate::args::BlockTimeArg::Sequence => BlockTime::Sequence,
        crate::args::BlockTimeArg::Block => BlockTime::Block,
    };
    Ok(maskdiff_objective::block_estimate(
        den, &schedule, seqs, labels, opts, block_size, time, progress,
    )?)
}

fn eval_on<D: DfdxDevice<f32>, O: Objective<D>>(
    dev: D,
    dir: &Path,
    cfg: &Config,
    a: &EvalArgs,
) -> Result<()> {
    let loaded = Loaded::<D, O>::open(dir, !a.no_ema, &dev)?;
    let mut den = loaded.denoiser.clone();
    let params = if a.no_ema { "raw" } else { "EMA" };
    if let Some(z) = &a.zero_shot {
        return zero_shot(
            &mut den,
            cfg,
            &loaded,
            !a.no_ema,
            z.as_deref(),
            a.json.as_deref(),
        );
    }
    if let Some(f) = &a.samples {
        return judge_samples(&mut den, &loaded, cfg, f, params, a.json.as_deref());
    }
    let data = Data::open(&cfg.data)?;
    let id = data.identity(cfg.data.dataset)?;
    id.check_against(&loaded.extra.data, dir, &cfg.data.path)?;
    if a.clip_search {
        return clip_search(&mut den, &loaded, cfg, &data, a, params);
    }
    let (split, name) = match a.split {
        SplitArg::Train => (Split::Train, "train"),
        SplitArg::Val => (Split::Valid, "validation"),
        SplitArg::Test => (Split::Test, "test"),
    };
    let (seqs, labels) = data.eval_sequences(split, cfg.eval.max_sequences)?;
    // An unconditional model of labelled images ignores the labels.
    let labels = labels.filter(|_| maskdiff_process::Denoiser::num_classes(&den) > 0);
    let pb = bar(seqs.len(), "evaluating");
    let mut progress = |i: usize| {
        if let Some(b) = &pb {
            b.set_position(i as u64)
        }
    };
    let r = match a.block_time {
        None => loaded.objective.estimate(
            &mut den,
            &seqs,
            labels.as_deref(),
            opts(cfg),
            &mut progress,
        )?,
        Some(time) => block_estimate_with(
            &mut den,
            &loaded,
            &seqs,
            labels.as_deref(),
            opts(cfg),
            time,
            &mut progress,
        )?,
    };
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    let unit = cfg.data.dataset.unit();
    let total = data.eval_count(split)?;
    let subset = if r.sequences < total {
        format!(", evenly spaced subset of the {total}")
    } else {
        String::new()
    };
    println!(
        "{name} NELBO: {:.4} ± {:.4} {unit}   [{}, K = {} t-samples per sequence, {} sequences of {}{subset}; {params} parameters]",
        r.bits_per_token,
        r.stderr_bits,
        elbo_name(&r),
        r.mc_samples,
        r.sequences,
        r.seq_len
    );
    println!(
        "  per sequence: diffusion {:.4} + reconstruction {:.6} nats; with the prior KL ({:.6} nats) {:.4} {unit}",
        r.diffusion_nats, r.recon_nats, r.prior_nats, r.bits_per_token_with_prior
    );
    println!("  perplexity ≤ {:.4}", r.perplexity);
    let v = loaded.extra.data.vocab as f64;
    println!(
        "  uniform baseline: log2(V) = log2({v}) = {:.4} {unit}",
        v.log2()
    );
    if let Some(p) = &a.json {
        let v = serde_json::json!({ "split": name, "unit": unit, "result": r });
        crate::fsutil::write_atomic(
            p,
            serde_json::to_string_pretty(&v).expect("json").as_bytes(),
        )?;
    }
    Ok(())
}

/// `--clip-search`: BD3-LM's variance of the clipped per-block loss per candidate interval on
/// the validation split, and the interval of least variance.
fn clip_search<D: DfdxDevice<f32>, O: Objective<D>>(
    den: &mut maskdiff_network::NetworkDenoiser<f32, D>,
    loaded: &Loaded<D, O>,
    cfg: &Config,
    data: &Data,
    a: &EvalArgs,
    params: &str,
) -> Result<()> {
    use maskdiff_schedule::MaskRate;
    let candidates = MaskRate::candidates(&a.clip_widths, a.clip_delta)
        .map_err(|e| CliError::Input(format!("--clip-widths / --clip-delta: {e}")))?;
    let (seqs, labels) = data.eval_sequences(Split::Valid, cfg.eval.max_sequences)?;
    let labels = labels.filter(|_| maskdiff_process::Denoiser::num_classes(den) > 0);
    let pb = bar(candidates.len(), "clip search");
    let mut rows = Vec::with_capacity(candidates.len());
    for (i, &c) in candidates.iter().enumerate() {
        rows.push(
            loaded
                .objective
                .clip_variance(den, &seqs, labels.as_deref(), opts(cfg), c)?,
        );
        if let Some(b) = &pb {
            b.set_position(i as u64 + 1);
        }
    }
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    let best = rows
        .iter()
        .min_by(|x, y| x.variance.total_cmp(&y.variance))
        .expect("at least the full range");
    let trained = match (loaded.extra.mask_rate, loaded.objective.mask_rate()) {
        (Some(m), _) => format!("trained on mask rates {m} (the adaptive search's last choice)"),
        (None, Some(m)) => format!("trained on mask rates {m}"),
        (None, None) => "trained on the NELBO (full range)".into(),
    };
    println!(
        "clipped-schedule search on the validation split: {} sequences, K = {}, {params} parameters; {trained}",
        seqs.len(),
        cfg.eval.mc_samples
    );
    println!(
        "  {:<16} {:>14} {:>16} {:>8}",
        "mask rates", "mean nats/tok", "variance", "values"
    );
    for r in &rows {
        let mark = if std::ptr::eq(r, best) {
            "  <- least"
        } else {
            ""
        };
        println!(
            "  {:<16} {:>14.5} {:>16.6} {:>8}{mark}",
            r.mask_rate.to_string(),
            r.mean_nats,
            r.variance,
            r.values
        );
    }
    println!(
        "least variance: {} (train with --mask-rate {},{})",
        best.mask_rate,
        best.mask_rate.lo(),
        best.mask_rate.hi()
    );
    if let Some(p) = &a.json {
        let v = serde_json::json!({ "split": "validation", "candidates": rows, "best": best.mask_rate });
        crate::fsutil::write_atomic(
            p,
            serde_json::to_string_pretty(&v).expect("json").as_bytes(),
        )?;
    }
    Ok(())
}

/// `--samples FILE`: this model as the judge of text samples (`crate::judge`).
fn judge_samples<D: DfdxDevice<f32>, O: Objective<D>>(
    den: &mut maskdiff_network::NetworkDenoiser<f32, D>,
    loaded: &Loaded<D, O>,
    cfg: &Config,
    file: &Path,
    params: &str,
    json: Option<&Path>,
) -> Result<()> {
    let Codec::Text(tok) = Codec::from_identity(&loaded.extra.data)? else {
        return Err(CliError::Input(
            "--samples scores text samples; this is an image model".into(),
        ));
    };
    let set = crate::judge::read_samples(file, &tok, loaded.extra.data.seq_len)?;
    let pb = bar(set.sequences.len(), "judging");
    let r = loaded
        .objective
        .estimate(den, &set.sequences, None, opts(cfg), &mut |i| {
            if let Some(b) = &pb {
                b.set_position(i as u64)
            }
        })?;
    if let Some(b) = pb {
        b.finish_and_clear();
    }
    println!(
        "generative perplexity: {:.3}   [2^({:.4} ± {:.4} bits/token) under {} ({params} parameters), {}, K = {}; \
         {} samples cut into {} sequences of {}, {} tokens left over]",
        r.perplexity,
        r.bits_per_token,
        r.stderr_bits,
        loaded.dir.display(),
        elbo_name(&r),
        r.mc_samples,
        set.samples,
        r.sequences,
        r.seq_len,
        set.dropped
    );
    println!(
        "  unigram entropy: {:.4} bits per sample (mean of {}), {:.4} bits pooled",
        set.entropy_mean, set.samples, set.entropy_pooled
    );
    if let Some(p) = json {
        let v = serde_json::json!({
            "samples_file": file.display().to_string(),
            "judge": loaded.dir.display().to_string(),
            "samples": set.samples,
            "gen_perplexity": r.perplexity,
            "unigram_entropy": set.entropy_mean,
            "unigram_entropy_pooled": set.entropy_pooled,
            "dropped_tokens": set.dropped,
            "result": r,
        });
        crate::fsutil::write_atomic(
            p,
            serde_json::to_string_pretty(&v).expect("json").as_bytes(),
        )?;
    }
    Ok(())
}

/// The zero-shot directory: the given one, else the first that exists of
/// `./shared/data/zeroshot`, `../shared/data/zeroshot` (relative to the working directory) and
/// `<workspace>/../shared/data/zeroshot` (beside the source tree this binary was built from).
fn zero_shot_dir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/zeroshot");
    let candidates = [
        PathBuf::from("shared/data/zeroshot"),
        PathBuf::from("../shared/data/zeroshot"),
        workspace,
    ];
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .ok_or_else(|| {
            let names: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            CliError::Input(format!(
                "no zero-shot data found in {}; pass --zero-shot DIR",
                names.join(", ")
            ))
        })
}

/// The zero-shot suite for an MD4 or GenMD4 checkpoint (GenMD4: its learned per-token schedule,
/// live or EMA exponents with the parameters they belong to).
fn zero_shot<M: maskdiff_process::Denoiser + ?Sized, D: DfdxDevice<f32>, O: Objective<D>>(
    den: &mut M,
    cfg: &Config,
    loaded: &Loaded<D, O>,
    use_ema: bool,
    dir: Option<&Path>,
    json: Option<&Path>,
) -> Result<()> {
    let params = if use_ema { "EMA" } else { "raw" };
    let model = match loaded.objective.spec() {
        maskdiff_objective::ObjectiveSpec::Md4 => "MD4",
        maskdiff_objective::ObjectiveSpec::GenMd4 { .. } => "GenMD4",
        maskdiff_objective::ObjectiveSpec::Block {
            inner: maskdiff_objective::InnerSpec::GenMd4 { .. },
            ..
        } => "block diffusion (GenMD4 inside)",
        maskdiff_objective::ObjectiveSpec::Block { .. } => "block diffusion",
    };
    if loaded.extra.data.dataset != DatasetKind::Gpt2 {
        return Err(CliError::Input(format!(
            "the zero-shot suite needs a GPT-2-tokenised model; this one was trained on {:?}",
            loaded.extra.data.dataset
        )));
    }
    let dir = zero_shot_dir(dir)?;
    let len = loaded.extra.data.seq_len;
    let mut rows = Vec::new();
    println!(
        "zero-shot perplexity bounds ({model}, {params} parameters, blocks of {len} GPT-2 tokens):"
    );
    for set in ZeroShotSet::ALL {
        let label = match set {
            ZeroShotSet::Lm1b => "1BW (subset of the test set)".to_string(),
            s => s.name().to_string(),
        };
        let blocks = load_zero_shot(&dir, set, len, Grouping::PerDocuments(1000))?;
        let cap = if cfg.eval.max_sequences == 0 {
            blocks.num_blocks
        } else {
            blocks.num_blocks.min(cfg.eval.max_sequences)
        };
        let seqs: Vec<Vec<u32>> = (0..cap).map(|i| blocks.block(i).to_vec()).collect();
        let pb = bar(seqs.len(), set.name());
        let mut progress = |i: usize| {
            if let Some(b) = &pb {
                b.set_position(i as u64)
            }
        };
        let r = loaded
            .objective
            .estimate(den, &seqs, None, opts(cfg), &mut progress)?;
        if let Some(b) = pb {
            b.finish_and_clear();
        }
        let (lo, hi) = (
            (r.bits_per_token - 2.0 * r.stderr_bits).exp2(),
            (r.bits_per_token + 2.0 * r.stderr_bits).exp2(),
        );
        let partial = if cap < blocks.num_blocks {
            format!(" of {}", blocks.num_blocks)
        } else {
            String::new()
        };
        println!(
            "  {label:<30} ≤ {:>10.2}  (±2 s.e.: {lo:.2}–{hi:.2}; {cap}{partial} blocks, {})",
            r.perplexity,
            elbo_name(&r)
        );
        rows.push(
            serde_json::json!({ "set": set.name(), "label": label, "blocks": cap, "result": r }),
        );
    }
    if let Some(p) = json {
        crate::fsutil::write_atomic(
            p,
            serde_json::to_string_pretty(&rows)
                .expect("json")
                .as_bytes(),
        )?;
    }
    Ok(())
}
