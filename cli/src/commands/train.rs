//! `maskdiff train`: resolve the config (file, then flags; or the saved one with `--resume`),
//! open the data, choose the objective once (MD4 or GenMD4, from the config), build or restore
//! the trainer generic over it, and train (paper Alg. 1) step by step with a progress bar, JSON-lines metrics, periodic validation
//! NELBO, atomic checkpoints, a wall-clock limit and graceful Ctrl-C.
//!
//! Under `mpirun -np K` (built with `--features mpi`) the K processes train one run
//! data-parallel (`maskdiff_train::collective`): each runs its share of the `grad_accum`
//! micro-batches of every step; rank 0 alone draws the progress bar, validates and writes
//! metrics and checkpoints; an error on any rank ends the whole job (MPI_Abort). A CUDA run
//! of a build with `--features nccl` started by torchrun, srun or mpirun trains over NCCL
//! instead, one GPU per rank (`maskdiff_train::launch`).

use crate::args::TrainArgs;
use crate::config::{Config, Device};
use crate::dataset::Data;
use crate::error::{CliError, Result};
use crate::metrics::{MetricsWriter, Record};
use crate::progress::Progress;
use crate::run::{self, CliExtra, LossWindow};
use maskdiff_data::Split;
use maskdiff_network::Kernels as DfdxDevice;
use maskdiff_network::Precision;
use maskdiff_objective::{EvalOptions, Objective};
use maskdiff_train::{Collective, LrKind, SingleProcess, TrainBatch, TrainError, Trainer};
use std::time::Instant;

/// Config fields that may differ between a resumed run and its checkpoint: where the run lives
/// and the cadence and wall-clock budget of one session (they change no result).
const SESSION_FIELDS: [&str; 6] = [
    "train.out_dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.checkpoint_every",
    "train.time_limit_s",
];

fn flatten(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The fields (`section.key`) in which two configs differ, session fields excepted.
pub fn config_differences(a: &Config, b: &Config) -> Vec<String> {
    let flat = |c: &Config| {
        let mut m = std::collections::BTreeMap::new();
        let v: toml::Value = toml::from_str(&c.to_toml()).expect("a config serialises to TOML");
        flatten("", &v, &mut m);
        m
    };
    let (fa, fb) = (flat(a), flat(b));
    let mut keys: Vec<&String> = fa.keys().chain(fb.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !SESSION_FIELDS.contains(&k.as_str()) && fa.get(*k) != fb.get(*k))
        .map(|k| {
            let show = |m: &std::collections::BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "(absent)".into())
            };
            format!("{k} ({} saved, {} given)", show(&fa), show(&fb))
        })
        .collect()
}

/// The config of a resumed run: the one stored in the checkpoint's manifest (the config the
/// run was trained with), with only the session flags (cadence, time limit) taken from the command
/// line. The run's `config.toml` and a `--config` file must agree with it except in those
/// fields; a difference is refused, naming the fields. `--steps` may extend a run whose
/// learning rate does not depend on `train.steps` (`optim.decay_steps` set, or a constant
/// schedule).
fn resume_config(a: &TrainArgs) -> Result<Config> {
    let given = a.config.as_ref().map(|c| Config::load(c)).transpose()?;
    let out = match (&a.overrides.out, &given) {
        (Some(o), _) => o.clone(),
        (None, Some(c)) => c.train.out_dir.clone(),
        (None, None) => Config::default().train.out_dir,
    };
    let changed = a.overrides.changes_run_identity();
    if !changed.is_empty() {
        return Err(CliError::Input(format!(
            "--resume continues the saved run exactly; these flags would change it: {} \
             (start a new run with another --out instead)",
            changed.join(", ")
        )));
    }
    if !run::has_checkpoint(&out) {
        return Err(CliError::Input(format!(
            "nothing to resume: {} holds no checkpoint",
            out.display()
        )));
    }
    let (_, _, mut cfg) = run::read_checkpoint_meta(&run::checkpoint_dir(&out))?;
    // An unset `model.embed_dim` means the embedding the run was built with, as its manifest
    // records it (a run saved before the field existed keeps its embedding: the `cpu-small`
    // preset has since moved to the official 64-wide outside embedding).
    let built = maskdiff_train::Manifest::read(&run::checkpoint_dir(&out))?
        .network
        .embed_dim
        .unwrap_or(0);
    let resolve = |mut c: Config| {
        c.model.embed_dim.get_or_insert(built);
        c
    };
    cfg = resolve(cfg);
    let path = run::config_path(&out);
    let mut sources = Vec::new();
    if path.is_file() {
        sources.push((path.clone(), resolve(Config::load(&path)?)));
    }
    if let (Some(file), Some(mut c)) = (&a.config, given) {
        // The run stored its data path absolute; a relative one in the file means the same
        // file from here.
        if cfg.data.path.is_absolute() {
            c.data.path = crate::dataset::absolute_data_path(&c.data.path)?;
        }
        sources.push((file.clone(), resolve(c)));
    }
    for (file, c) in &sources {
        let mut diff = config_differences(&cfg, c);
        if a.overrides.steps.is_some() {
            // an extension names the new length on the command line (checked below)
            diff.retain(|d| !d.starts_with("train.steps "));
        }
        if !diff.is_empty() {
            return Err(CliError::Input(format!(
                "--resume continues the run with the config saved in its checkpoint, but {} \
                 differs in {} (restore it, or start a new run with another --out)",
                file.display(),
                diff.join(", ")
            )));
        }
    }
    let o = &a.overrides;
    if let Some(steps) = o.steps {
        // The learning rate depends on train.steps only when it is the cosine's horizon.
        if cfg.optim.schedule == LrKind::Cosine && cfg.optim.decay_steps.is_none() {
            return Err(CliError::Input(
                "--resume cannot change --steps of a run whose cosine decay ends at train.steps \
                 (a run started with optim.decay_steps set, or a constant schedule, can be extended)"
                    .into(),
            ));
        }
        cfg.train.steps = steps;
        cfg.validate()?;
        crate::fsutil::write_atomic(&path, cfg.to_toml().as_bytes())?;
    }
    cfg.train.out_dir = out;
    if let Some(v) = o.log_every {
        cfg.train.log_every = v;
    }
    if let Some(v) = o.eval_every {
        cfg.train.eval_every = v;
    }
    if let Some(v) = o.eval_batches {
        cfg.train.eval_batches = v;
    }
    if let Some(v) = o.checkpoint_every {
        cfg.train.checkpoint_every = v;
    }
    // A wall-clock limit belongs to one session: a resumed run continues to the end unless
    // given a new limit.
    cfg.train.time_limit_s = o.time_limit.unwrap_or(0.0);
    Ok(cfg)
}

pub fn run(a: TrainArgs) -> Result<()> {
    let cfg = if a.resume {
        resume_config(&a)?
    } else {
        let mut cfg = match &a.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        a.overrides.apply(&mut cfg);
        cfg
    };
    cfg.validate()?;
    if a.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let mut cfg = cfg;
    if !a.resume {
        // Stored absolute: `eval` and `sample` from another directory read the same data.
        cfg.data.path = crate::dataset::absolute_data_path(&cfg.data.path)?;
    }
    if cfg.train.device == Device::Cuda && cfg.train.precision == Precision::Bf16 {
        eprintln!("maskdiff: precision bf16 applies to the CPU kernels only; CUDA runs f32");
    }
    super::use_precision(cfg.train.precision);
    let gpu_ranks = cfg!(feature = "nccl") && cfg.train.device == Device::Cuda;
    with_collective(gpu_ranks, |comm| match cfg.train.device {
        Device::Cpu => {
            refuse_lone_ranks(comm, "mpi")?;
            train_on(
                maskdiff_network::dfdx::tensor::Cpu::default(),
                cfg,
                &a,
                comm,
            )
        }
        Device::Cuda => cuda(cfg, &a, comm),
    })
}

/// Number of ranks an MPI launcher started, from its environment (1 when none).
#[cfg(not(feature = "mpi"))]
fn launched_ranks() -> usize {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
}

/// Run `f` on MPI_COMM_WORLD when started by an MPI launcher, else as the one process. On an
/// error with more than one rank: print it (with the rank) and abort the whole job, since the
/// other ranks may wait in a collective forever.
#[cfg(feature = "mpi")]
fn with_collective(_gpu_ranks: bool, f: impl FnOnce(&dyn Collective) -> Result<()>) -> Result<()> {
    if !maskdiff_train::launched_by_mpi() {
        return f(&SingleProcess);
    }
    let mpi = maskdiff_train::Mpi::init()?;
    let r = f(&mpi);
    if let (Err(e), true) = (&r, mpi.size() > 1) {
        eprintln!(
            "maskdiff: error: rank {} of {}: {}",
            mpi.rank(),
            mpi.size(),
            crate::error::one_line(e)
        );
        mpi.abort(1);
    }
    r
}

/// Without MPI: the one process, unless an MPI launcher started several ranks of a CPU run
/// (refused: each would train alone). `gpu_ranks`: a CUDA run of an NCCL build, whose ranks
/// meet through NCCL instead (see `cuda`).
#[cfg(not(feature = "mpi"))]
fn with_collective(gpu_ranks: bool, f: impl FnOnce(&dyn Collective) -> Result<()>) -> Result<()> {
    let n = launched_ranks();
    if n > 1 && !gpu_ranks {
        return Err(CliError::Input(format!(
            "started as one of {n} MPI ranks, but this maskdiff was built without MPI: rebuild \
             with `cargo build --release --features mpi` (each rank would train alone)"
        )));
    }
    f(&SingleProcess)
}

/// How long a rank waits for rank 0's NCCL id in `<out_dir>/nccl-id`.
#[cfg(feature = "nccl")]
const RENDEZVOUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A CUDA run. Where a launcher (torchrun, srun, mpirun) started several ranks: one NCCL
/// communicator over them, each rank on GPU `LOCAL_RANK`, the NCCL id passed over MPI when
/// `comm` already spans the ranks, else through `<out_dir>/nccl-id`.
#[cfg(feature = "nccl")]
fn cuda(cfg: Config, a: &TrainArgs, comm: &dyn Collective) -> Result<()> {
    let launch = maskdiff_train::Launch::from_env()?;
    if launch.world == 1 {
        let dev = crate::run::cuda_device(cfg.train.seed)?;
        return train_on(dev, cfg, a, comm);
    }
    let nccl = if comm.size() == launch.world {
        maskdiff_train::Nccl::init_over(&launch, comm)?
    } else {
        maskdiff_train::Nccl::init_file(&launch, &cfg.train.out_dir, RENDEZVOUS_TIMEOUT)?
    };
    let dev = maskdiff_network::dfdx::tensor::Cuda::try_build(nccl.ordinal(), cfg.train.seed)
        .map_err(|e| {
            CliError::Input(format!("cannot open CUDA device {}: {e:?}", nccl.ordinal()))
        })?;
    let r = train_on(dev, cfg, a, &nccl);
    if let Err(e) = &r {
        // The other ranks may wait in a collective forever: end this process now, which
        // releases its GPU and NCCL resources; the launcher then ends the job.
        eprintln!(
            "maskdiff: error: rank {} of {}: {}",
            launch.rank,
            launch.world,
            crate::error::one_line(e)
        );
        std::process::exit(1);
    }
    r
}

#[cfg(all(feature = "cuda", not(feature = "nccl")))]
fn cuda(cfg: Config, a: &TrainArgs, comm: &dyn Collective) -> Result<()> {
    refuse_lone_ranks(comm, "nccl")?;
    let dev = crate::run::cuda_device(cfg.train.seed)?;
    train_on(dev, cfg, a, comm)
}

/// An error where a launcher started several ranks that `comm` does not join (each would
/// train alone), naming the feature that would.
fn refuse_lone_ranks(comm: &dyn Collective, feature: &str) -> Result<()> {
    let launch = maskdiff_train::Launch::from_env()?;
    if launch.world > 1 && comm.size() != launch.world {
        return Err(CliError::Input(format!(
            "started as rank {} of {} ({:?} launcher), but this maskdiff cannot join the ranks \
             for this device: rebuild with `cargo build --release --features {feature}` (each \
             rank would train alone)",
            launch.rank, launch.world, launch.launcher
        )));
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(_cfg: Config, _a: &TrainArgs, _comm: &dyn Collective) -> Result<()> {
    Err(CliError::config(
        "train.device",
        "this maskdiff was built without CUDA; rebuild with `cargo build --release --features cuda`",
    ))
}

fn human_bytes(b: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

/// A rough f32 training-memory estimate: parameters, gradients, two AdamW moments and the EMA,
/// plus activations kept for the backward pass. Transformer: per layer ≈ 16·d + 3·ffn values
/// per token and 2 attention matrices per head. U-Net: per residual block (2·layers + 3 of
/// them, the up blocks on 2·ch inputs) ≈ 8·ch values per pixel plus its input, and the middle
/// attention's pixels × pixels matrices (the CPU's fused convolution keeps no 3×3
/// neighbourhood panels; dfdx's generic one on CUDA keeps 9·(inputs) more per convolution).
/// U-ViT: the same residual blocks, and its DiT middle counted as transformer layers.
fn memory_estimate(
    params: usize,
    net: &maskdiff_network::NetworkConfig,
    batch: usize,
    len: usize,
) -> f64 {
    let state = 5.0 * params as f64 * 4.0;
    let act = match net.image() {
        None => {
            let per_tok = 16.0 * net.dim as f64 + 3.0 * net.ffn_hidden_dim() as f64;
            let attn = 2.0 * net.n_heads as f64 * len as f64;
            net.n_layers as f64 * batch as f64 * len as f64 * (per_tok + attn)
        }
        Some((h, w, _)) => {
            let (ch, l, px) = (net.dim as f64, net.n_layers as f64, (h * w) as f64);
            let block = |cin: f64| 8.0 * ch + cin;
            let per_px = (l + 2.0) * block(ch) + (l + 1.0) * block(2.0 * ch);
            let middle = match net.arch {
                // U-ViT: the DiT on (h/p)·(w/p) tokens, per layer as a transformer layer with
                // a 4·d MLP
                maskdiff_network::Arch::Uvit {
                    patch,
                    dit_layers,
                    dit_heads,
                    dit_dim,
                    ..
                } => {
                    let n = ((h / patch) * (w / patch)) as f64;
                    let per_tok = 16.0 * dit_dim as f64 + 12.0 * dit_dim as f64;
                    dit_layers as f64 * n * (per_tok + 2.0 * dit_heads as f64 * n)
                }
                _ => 2.0 * px * px,
            };
            batch as f64 * (px * per_px + middle)
        }
    };
    state + act * 4.0
}

fn train_on<D: DfdxDevice<f32>>(
    dev: D,
    cfg: Config,
    a: &TrainArgs,
    comm: &dyn Collective,
) -> Result<()> {
    let spec = run::train_config(&cfg)?.objective;
    run::with_objective!(spec, train_with::<D>(dev, cfg, a, comm))
}

fn train_with<D: DfdxDevice<f32>, O: Objective<D>>(
    dev: D,
    cfg: Config,
    a: &TrainArgs,
    comm: &dyn Collective,
) -> Result<()> {
    // Data-parallel: rank 0 alone prints, validates and writes.
    let (ranks, root) = (comm.size(), comm.rank() == 0);
    if !cfg.optim.grad_accum.is_multiple_of(ranks) {
        return Err(CliError::config(
            "optim.grad_accum",
            format!(
                "{} micro-batches per step cannot be shared by {ranks} ranks: use a multiple \
                 of {ranks}",
                cfg.optim.grad_accum
            ),
        ));
    }
    let data = Data::open(&cfg.data)?;
    let net_cfg = run::network_config(&cfg, &data)?;
    let train_cfg = run::train_config(&cfg)?;
    let micro = cfg.train.batch_size;
    let batch = micro * cfg.optim.grad_accum;
    let len = data.seq_len();
    let unit = cfg.data.dataset.unit();

    if a.dry_run {
        if !root {
            return Ok(());
        }
        // any architecture (the transformer, the U-Net, the U-ViT)
        let model =
            maskdiff_network::Network::<f32, _>::new(net_cfg.clone(), &dev, cfg.train.seed)?;
        let p = model.num_params();
        println!(
            "config OK: {} {} on {:?}",
            cfg.model.preset,
            format!("{:?}", cfg.model.kind).to_lowercase(),
            cfg.data.dataset
        );
        match net_cfg.image() {
            None => println!(
                "network: {} layers, {} heads, width {}, FFN {}, vocabulary {} (+mask), length {}",
                net_cfg.n_layers,
                net_cfg.n_heads,
                net_cfg.dim,
                net_cfg.ffn_hidden_dim(),
                net_cfg.vocab_size,
                len
            ),
            Some((h, w, c)) => match net_cfg.arch {
                maskdiff_network::Arch::Uvit {
                    patch,
                    dit_layers,
                    dit_heads,
                    dit_dim,
                    ..
                } => println!(
                    "network: U-ViT, {} channels, {} residual blocks per side around a DiT of \
                     {dit_layers} layers × {dit_heads} heads × width {dit_dim} on {patch}×{patch} \
                     patches, {h}×{w}×{c} images, {} levels (+mask)",
                    net_cfg.dim, net_cfg.n_layers, net_cfg.vocab_size
                ),
                _ => println!(
                    "network: U-Net, {} channels, {} residual blocks per side, {h}×{w}×{c} \
                     images, {} levels (+mask)",
                    net_cfg.dim, net_cfg.n_layers, net_cfg.vocab_size
                ),
            },
        }
        println!("parameters: {p} ({:.2} M)", p as f64 / 1e6);
        println!(
            "memory estimate (f32, batch {micro}): {} (weights+grads+AdamW+EMA {}, activations the rest)",
            human_bytes(memory_estimate(p, &net_cfg, micro, len)),
            human_bytes(5.0 * p as f64 * 4.0)
        );
        println!("tokens per step: {}", batch * len);
        return Ok(());
    }

    let out = cfg.train.out_dir.clone();
    crate::fsutil::ensure_writable_dir(&out)?;
    // One writer per run directory (rank 0 of a data-parallel job), held until this process
    // exits (or dies).
    let _lock = if root {
        Some(crate::fsutil::RunLock::acquire(&out)?)
    } else {
        None
    };
    let ckpt = run::checkpoint_dir(&out);
    let identity = data.identity(cfg.data.dataset)?;
    let (mut trainer, mut sampler, mut train_seconds, mut window) = if a.resume {
        let (_, extra, _) = run::read_checkpoint_meta(&ckpt)?;
        identity.check_against(&extra.data, &ckpt, &cfg.data.path)?;
        let mut t = Trainer::<D, O>::resume(&ckpt, &net_cfg, &train_cfg, &dev)?;
        if let Some(m) = extra.mask_rate.filter(|_| cfg.schedule.clip_search) {
            // the adaptive search's current interval, not the one the run started with
            t.set_mask_rate(Some(m))?;
        }
        if root {
            remove_stale_temp_files(&ckpt);
        }
        if t.step_count() >= cfg.train.steps {
            // Nothing to train, validate or save: the metrics and checkpoint stay as they are.
            if root {
                println!(
                    "the run in {} is already complete ({} of {} steps); nothing to do",
                    out.display(),
                    t.step_count(),
                    cfg.train.steps
                );
            }
            return Ok(());
        }
        let s = data.resume_sampler(extra.sampler)?;
        (t, s, extra.train_seconds, extra.loss_window)
    } else {
        if run::has_checkpoint(&out) {
            return Err(CliError::Input(format!(
                "{} already holds a run; continue it with --resume or choose another --out",
                out.display()
            )));
        }
        if root {
            crate::fsutil::write_atomic(&run::config_path(&out), cfg.to_toml().as_bytes())?;
        }
        let t = Trainer::<D, O>::new(net_cfg.clone(), train_cfg.clone(), cfg.train.seed, &dev)?;
        (
            t,
            data.train_sampler(cfg.train.seed)?,
            0.0,
            LossWindow::default(),
        )
    };
    // Every rank continues from rank 0's state (the same as its own when all read the same
    // files; a different one is caught here rather than as a silent drift).
    trainer.broadcast_state(comm)?;
    let start_step = trainer.step_count();
    let mut metrics = Metrics(if root {
        Some(MetricsWriter::open(
            &run::metrics_path(&out),
            if a.resume { Some(start_step) } else { None },
        )?)
    } else {
        None
    });
    let stop = crate::interrupt::install();
    let progress = Progress::new(start_step, cfg.train.steps, unit, root && !a.no_progress);
    let log = |line: &str| {
        if root {
            progress.log(line)
        }
    };
    log(&format!(
        "maskdiff train: {} ({} params) on {} tokens/step, {} steps{}, output {}",
        cfg.model.preset,
        trainer.model().num_params(),
        batch * len,
        cfg.train.steps,
        if a.resume {
            format!(", resuming at step {start_step}")
        } else {
            String::new()
        },
        out.display()
    ));
    if ranks > 1 {
        log(&format!(
            "data-parallel over {ranks} MPI ranks: {} micro-batches of {micro} sequences each per step",
            cfg.optim.grad_accum / ranks
        ));
    }

    // The validation subset is fixed for the whole run so its curve is comparable across steps.
    let val_n = if cfg.train.eval_batches == 0 {
        0
    } else {
        cfg.train.eval_batches * micro
    };
    let (val_seqs, val_labels) = data.eval_sequences(Split::Valid, val_n)?;
    // Labels go to class-conditional models only: an unconditional model trained on labelled
    // images ignores them.
    let conditional = net_cfg.num_classes > 0;
    let val_labels = val_labels.filter(|_| conditional);

    let save = |trainer: &mut Trainer<D, O>,
                sampler: &maskdiff_data::WindowSampler,
                secs: f64,
                window: LossWindow|
     -> Result<()> {
        let extra = CliExtra {
            sampler: sampler.state().clone(),
            data: identity.clone(),
            config: cfg.to_toml(),
            train_seconds: secs,
            loss_window: window,
            // with the search, always written ([0, 1] too: the full range can be its choice
            // after a clipped start, and resuming must not fall back to the start)
            mask_rate: cfg.schedule.clip_search.then(|| {
                trainer
                    .objective()
                    .mask_rate()
                    .unwrap_or(maskdiff_schedule::MaskRate::FULL)
            }),
        };
        trainer.set_extra(serde_json::to_value(&extra).expect("CLI state serialises"));
        // Every rank checks (a collective), rank 0 writes.
        trainer.check_in_sync(comm)?;
        if root {
            trainer.save(&ckpt)?;
        }
        Ok(())
    };
    let validate = |trainer: &Trainer<D, O>| -> Result<(f64, f64)> {
        let mut den = trainer.ema_denoiser();
        let r = trainer.ema_objective().estimate(
            &mut den,
            &val_seqs,
            val_labels.as_deref(),
            EvalOptions {
                mc_samples: 1,
                discrete_steps: None,
                batch_rows: micro,
                seed: cfg.eval.seed,
            },
            &mut |_| {},
        )?;
        Ok((r.bits_per_token, r.stderr_bits))
    };

    // With BD3-LM's clip the step loss is the clipped objective, not the NELBO.
    let loss_name = |trainer: &Trainer<D, O>| match trainer.objective().mask_rate() {
        Some(m) => format!("clipped loss {m}"),
        None => "loss".to_string(),
    };
    if cfg.schedule.clip_search && ranks > 1 {
        return Err(CliError::config(
            "schedule.clip_search",
            "the adaptive clip search runs with the validation on rank 0 only: use one rank",
        ));
    }
    let candidates =
        maskdiff_schedule::MaskRate::candidates(&cfg.schedule.clip_widths, cfg.schedule.clip_delta)
            .map_err(|e| CliError::config("schedule.clip_widths", e.to_string()))?;
    // BD3-LM's search (bd3lms `_clipped_schedule_search`) on the validation subset with the EMA
    // parameters: the candidate of least per-block clipped-loss variance.
    let search = |trainer: &Trainer<D, O>| -> Result<(maskdiff_schedule::MaskRate, f64, f64)> {
        let mut den = trainer.ema_denoiser();
        let opts = EvalOptions {
            mc_samples: 1,
            discrete_steps: None,
            batch_rows: micro,
            seed: cfg.eval.seed,
        };
        let mut best: Option<(maskdiff_schedule::MaskRate, f64)> = None;
        let mut full = f64::NAN;
        for &c in &candidates {
            let v = trainer.ema_objective().clip_variance(
                &mut den,
                &val_seqs,
                val_labels.as_deref(),
                opts,
                c,
            )?;
            if c.is_full() {
                full = v.variance;
            }
            if best.is_none_or(|(_, b)| v.variance < b) {
                best = Some((c, v.variance));
            }
        }
        let (c, v) = best.expect("the full range is a candidate");
        Ok((c, v, full))
    };
    let session = Instant::now();
    let mut window_start = Instant::now();
    let mut window_tokens = 0usize;
    let mut stopped_early = None;
    while trainer.step_count() < cfg.train.steps {
        let b = data.next_batch(&mut sampler, batch)?;
        let tb = TrainBatch {
            x0: &b.ids,
            batch: b.batch,
            len: b.len,
            labels: b.labels.as_deref().filter(|_| conditional),
        };
        let stats = match trainer.step_on(&tb, comm) {
            Ok(s) => s,
            Err(TrainError::NonFinite { what, step, value }) => {
                progress.finish();
                let kept = match maskdiff_train::Manifest::read(&ckpt) {
                    Ok(m) => format!(
                        "the checkpoint of step {} in {} is intact",
                        m.step,
                        ckpt.display()
                    ),
                    Err(_) => format!("no checkpoint was saved in {}", out.display()),
                };
                return Err(CliError::Diverged {
                    what,
                    step,
                    value,
                    kept,
                    lr: cfg.optim.lr,
                    clip_norm: cfg.optim.clip_norm,
                    warmup_steps: cfg.optim.warmup_steps,
                });
            }
            Err(e) => return Err(e.into()),
        };
        let step = trainer.step_count();
        window_tokens += batch * len;
        let tps = window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
        window.sum += stats.bits_per_token;
        window.count += 1;
        progress.step(step, window.sum / window.count as f64, tps);
        let elapsed = train_seconds + session.elapsed().as_secs_f64();
        if step % cfg.train.log_every == 0 || step == cfg.train.steps {
            // The mean over the steps since the last record: single batches are too noisy.
            let mean = window.sum / window.count as f64;
            window = LossWindow::default();
            let mut r = Record::new(step, "train", mean);
            r.lr = Some(stats.lr);
            r.grad_norm = Some(stats.grad_norm);
            r.tokens_per_sec = Some(tps);
            r.elapsed_s = Some(elapsed);
            r.mask_rate = trainer.objective().mask_rate().map(|m| [m.lo(), m.hi()]);
            metrics.write(&r)?;
            if a.no_progress || progress_is_plain() {
                log(&format!(
                    "step {step}/{} {} {:.4} {unit} lr {:.2e} |g| {:.3} {:.0} tok/s ETA {:.0}s",
                    cfg.train.steps,
                    loss_name(&trainer),
                    mean,
                    stats.lr,
                    stats.grad_norm,
                    tps,
                    progress.eta_s(step)
                ));
            }
            window_start = Instant::now();
            window_tokens = 0;
        }
        if root
            && cfg.train.eval_every > 0
            && step % cfg.train.eval_every == 0
            && step < cfg.train.steps
        {
            let (bits, se) = validate(&trainer)?;
            let mut r = Record::new(step, "val", bits);
            r.stderr_bits = Some(se);
            r.elapsed_s = Some(elapsed);
            r.exponents = trainer.ema_objective().exponents();
            if cfg.schedule.clip_search {
                let (best, var, full) = search(&trainer)?;
                trainer.set_mask_rate(Some(best))?;
                r.mask_rate = Some([best.lo(), best.hi()]);
                log(&format!(
                    "step {step}: clip search: training on mask rates {best} from now on \
                     (per-block variance {var:.4}, full range {full:.4}; {} candidates)",
                    candidates.len()
                ));
            }
            metrics.write(&r)?;
            log(&format!(
                "step {step}: validation NELBO {bits:.4} ± {se:.4} {unit} (EMA)"
            ));
        }
        let limit = cfg.train.time_limit_s;
        if stop.is_set() {
            stopped_early = Some("interrupted");
        } else if limit > 0.0 && session.elapsed().as_secs_f64() >= limit {
            stopped_early = Some("time limit reached");
        }
        if ranks > 1 {
            // One decision for all ranks (rank 0's clock and any rank's Ctrl-C).
            let mut any = [stopped_early.is_some() as u8 as f32];
            comm.all_reduce_sum(&mut any)?;
            if any[0] > 0.0 && stopped_early.is_none() {
                stopped_early = Some("stopped by another rank");
            }
        }
        if stopped_early.is_some() {
            break;
        }
        if step % cfg.train.checkpoint_every == 0 && step < cfg.train.steps {
            save(&mut trainer, &sampler, elapsed, window)?;
        }
    }
    progress.finish();
    train_seconds += session.elapsed().as_secs_f64();
    let step = trainer.step_count();
    if let Some(why) = stopped_early {
        save(&mut trainer, &sampler, train_seconds, window)?;
        if !root {
            return Ok(());
        }
        eprintln!(
            "maskdiff: {why} at step {step}/{}; checkpoint saved in {} (continue with --resume)",
            cfg.train.steps,
            ckpt.display()
        );
        return Ok(());
    }
    if !root {
        // Rank 0 validates and saves; the check before its save is collective.
        trainer.check_in_sync(comm)?;
        return Ok(());
    }
    let (bits, se) = validate(&trainer)?;
    let mut r = Record::new(step, "val", bits);
    r.stderr_bits = Some(se);
    r.elapsed_s = Some(train_seconds);
    r.exponents = trainer.ema_objective().exponents();
    metrics.write(&r)?;
    save(&mut trainer, &sampler, train_seconds, window)?;
    println!(
        "trained {step} steps in {train_seconds:.0} s; validation NELBO {bits:.4} ± {se:.4} {unit} \
         ({} sequences, EMA); checkpoint in {}",
        val_seqs.len(),
        ckpt.display()
    );
    let c = comm.comm_stats();
    if ranks > 1 && c.all_reduces > 0 {
        let steps = (step - start_step).max(1) as f64;
        println!(
            "data-parallel over {ranks} ranks: gradient all-reduce {:.2} ms/step ({:.1} MiB/step, \
             {:.1}% of this session's {:.1} s)",
            1e3 * c.all_reduce_seconds / steps,
            c.all_reduce_bytes as f64 / steps / (1 << 20) as f64,
            100.0 * c.all_reduce_seconds / session.elapsed().as_secs_f64(),
            session.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The metrics file, written by rank 0 only.
struct Metrics(Option<MetricsWriter>);

impl Metrics {
    fn write(&mut self, r: &Record) -> Result<()> {
        match &mut self.0 {
            Some(m) => m.write(r),
            None => Ok(()),
        }
    }
}

/// True when no bar is drawn (stderr is not a terminal): print log lines instead.
fn progress_is_plain() -> bool {
    use std::io::IsTerminal;
    !std::io::stderr().is_terminal()
}

/// Temp files of a save that was killed (`.name.tmp-PID`) are garbage: the manifest in force
/// never names them.
fn remove_stale_temp_files(ckpt: &std::path::Path) {
    if let Ok(rd) = std::fs::read_dir(ckpt) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with('.') && n.contains(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
