//! Drawing samples through the streaming sampler (paper Alg. 2/3, §6): builds the conditioning
//! (prompt prefix, infill template, class label), runs the sampler step by step with a progress
//! bar, and renders the result: text per sample (optionally with the unmasking process coloured
//! by reveal step, Figure 3) or a PNG grid of images.

use crate::config::SampleConfig;
use crate::dataset::{encode_prompt, token_pieces, Codec};
use crate::error::{CliError, Result};
use crate::reveal::{coloured, legend, snapshot, RevealTrace};
use crate::template;
use maskdiff_process::Denoiser;
use maskdiff_sampler::{Constraint, SampleOutput, Sampler, SamplerConfig, ScheduleRef};
use std::io::IsTerminal;
use std::path::PathBuf;

/// What to condition on and how to show the result.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub prompt: Option<String>,
    pub infill: Option<String>,
    pub class: Option<u32>,
    pub show_steps: bool,
    pub out: Option<PathBuf>,
}

/// The per-position constraint of a request (all `None` = unconditional).
pub fn constraint_of(req: &Request, codec: &Codec, len: usize) -> Result<Vec<Option<u32>>> {
    let segs = match (&req.prompt, &req.infill) {
        (Some(p), None) => vec![template::Segment::Text(p.clone())],
        (None, Some(t)) => template::parse(t)?,
        (None, None) => return Ok(vec![None; len]),
        (Some(_), Some(_)) => {
            return Err(CliError::Input("use either --prompt or --infill".into()))
        }
    };
    let Codec::Text(tok) = codec else {
        return Err(CliError::Input(
            "--prompt/--infill need a text model".into(),
        ));
    };
    template::constraint(&segs, len, |s| encode_prompt(tok, s))
}

/// Run the sampler and print/write the samples. Returns the sampler's output.
pub fn generate<'a, D: Denoiser + ?Sized>(
    denoiser: &'a mut D,
    schedule: ScheduleRef<'a>,
    sc: &SampleConfig,
    codec: &Codec,
    len: usize,
    req: &Request,
) -> Result<SampleOutput> {
    let fixed = constraint_of(req, codec, len)?;
    let n = sc.num_samples;
    let labels: Option<Vec<u32>> = match (req.class, denoiser.num_classes()) {
        (Some(c), k) if (c as usize) < k => Some(vec![c; n]),
        (Some(c), 0) => {
            return Err(CliError::Input(format!(
                "--class {c}: this model is not class-conditional"
            )))
        }
        (Some(c), k) => {
            return Err(CliError::Input(format!(
                "--class {c}: the model has {k} classes"
            )))
        }
        // A class-conditional model needs a label: cycle through the classes.
        (None, k) if k > 0 => Some((0..n).map(|i| (i % k) as u32).collect()),
        (None, _) => None,
    };
    let cfg = SamplerConfig {
        kind: sc.sampler,
        steps: sc.steps,
        grid: sc.grid,
        num_samples: n,
        length: len,
        temperature: sc.temperature,
        top_p: sc.top_p,
        seed: sc.seed,
        first_index: 0,
        block_size: (sc.block_size > 0).then_some(sc.block_size),
        batch_size: n.clamp(1, 16),
        remdm: sc.remdm(),
        threshold: sc.threshold,
    };
    let constraints = if fixed.iter().all(Option::is_none) {
        vec![]
    } else {
        vec![Constraint::from_template(&fixed)]
    };
    let mut sampler = Sampler::new(denoiser, schedule, &cfg, &constraints, labels.as_deref())?;
    let total = (sampler.total_steps() * sampler.num_chunks()) as u64;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "sampling {bar:30.cyan/blue} step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    let mut done = 0u64;
    for ev in sampler.by_ref() {
        let ev = ev?;
        done = (ev.chunk * ev.total_steps + ev.step) as u64;
        if let Some(b) = &bar {
            b.set_position(done);
            b.set_message(format!("NFE {}", ev.calls_so_far));
        }
    }
    let _ = done;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let out = sampler.snapshot();
    if !out.complete {
        return Err(CliError::Input(
            "sampling stopped before the last step".into(),
        ));
    }
    render(&out, codec, req, &fixed)?;
    Ok(out)
}

fn render(out: &SampleOutput, codec: &Codec, req: &Request, fixed: &[Option<u32>]) -> Result<()> {
    let tok = match codec {
        Codec::Text(t) => t,
        Codec::Image(shape) => return render_images(out, *shape, req),
    };
    let is_fixed: Vec<bool> = fixed.iter().map(Option::is_some).collect();
    let mut text_out = String::new();
    for (i, seq) in out.sequences.iter().enumerate() {
        let text = maskdiff_data::Tokenizer::decode(tok, seq)?;
        text_out.push_str(&text.replace('\n', "\\n"));
        text_out.push('\n');
        println!("--- sample {} (NFE {}) ---", i + 1, out.nfe[i]);
        if req.show_steps {
            let pieces = token_pieces(tok, seq)?;
            let trace = RevealTrace {
                // Sampler steps are 1-based; 0 marks constraint-fixed positions.
                step: out.reveal_step[i]
                    .iter()
                    .map(|&s| (s > 0 && s != u32::MAX).then(|| s as usize - 1))
                    .collect(),
                total_steps: out.total_steps,
            };
            let frames = 6usize;
            for f in 1..frames {
                let upto = out.total_steps * f / frames;
                println!(
                    "[step {upto:>5}/{}] {}",
                    out.total_steps,
                    snapshot(&pieces, &trace, upto, &is_fixed)
                );
            }
            println!("{}", coloured(&pieces, &trace));
            println!("{}", legend(out.total_steps));
        } else {
            println!("{text}");
        }
    }
    if let Some(p) = &req.out {
        crate::fsutil::write_atomic(p, text_out.as_bytes())?;
        println!("wrote {} samples to {}", out.sequences.len(), p.display());
    }
    Ok(())
}

/// Images: a PNG grid of the samples; with `--show-steps` also `<out>-steps.png`, one row per
/// sample showing the state after 1/8, 2/8, … of the steps (masked pixels in magenta).
fn render_images(
    out: &SampleOutput,
    shape: maskdiff_data::ImageShape,
    req: &Request,
) -> Result<()> {
    let path = req
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("samples.png"));
    let zoom = (96 / shape.height.max(1)).max(1);
    crate::images::write_grid(&path, &out.sequences, shape, zoom, None)?;
    println!(
        "wrote {} samples to {}",
        out.sequences.len(),
        path.display()
    );
    if req.show_steps {
        let frames = 8usize;
        let mut tiles = Vec::new();
        for (seq, steps) in out.sequences.iter().zip(&out.reveal_step) {
            for f in 1..=frames {
                let upto = (out.total_steps * f / frames) as u32;
                // Reveal step 0 marks prompt-fixed positions: always shown.
                tiles.push(
                    seq.iter()
                        .zip(steps)
                        .map(|(&v, &s)| if s > upto { shape.levels } else { v })
                        .collect(),
                );
            }
        }
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let steps_path = path.with_file_name(format!("{stem}-steps.png"));
        crate::images::write_grid(&steps_path, &tiles, shape, zoom, Some(frames))?;
        println!(
            "wrote the unmasking process to {} (columns: after 1/{frames} … {frames}/{frames} of the steps; magenta = still masked)",
            steps_path.display()
        );
    }
    Ok(())
}
