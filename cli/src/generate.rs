//! Drawing samples through the streaming sampler (paper Alg. 2/3, §6): builds the conditioning
//! (prompt prefix, infill template, class label), runs the sampler step by step with a progress
//! bar, and renders the result: text per sample (optionally with the unmasking process coloured
//! by reveal step, Figure 3) or a PNG grid of images.
//!
//! Samples are drawn [`STREAM_BATCH`] at a time and text is printed (and written) batch by
//! batch, so memory is bounded by the batch, not by `--num-samples`. The sampler's
//! counter-based RNG draws sample i from stream i whatever batch it is in, and a batch of 16 is
//! exactly one of the sampler's own denoiser chunks, so the samples are those of one run over
//! all of them, bit for bit. Images go into one PNG grid held in memory: at most
//! [`MAX_IMAGE_SAMPLES`] of them.

use crate::config::SampleConfig;
use crate::dataset::{encode_prompt, token_pieces, Codec};
use crate::error::{CliError, Result};
use crate::reveal::{coloured, legend, snapshot, RevealTrace};
use crate::template;
use maskdiff_data::AnyTokenizer;
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

/// Samples per sampler run (the sampler's denoiser batch, so the chunks are unchanged).
pub const STREAM_BATCH: usize = 16;
/// Image samples are drawn into one PNG grid in memory; more than this is refused.
pub const MAX_IMAGE_SAMPLES: usize = 4096;

/// How the class label of sample i is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelPlan {
    /// Unconditional model.
    None,
    /// `--class C` for every sample.
    Fixed(u32),
    /// A class-conditional model without `--class`: sample i gets class i mod k.
    Cycle(usize),
}

impl LabelPlan {
    /// The plan for `--class` (if given) and a model with `num_classes` labels (0 =
    /// unconditional): a class the model does not have is an error.
    pub fn of(class: Option<u32>, num_classes: usize) -> Result<Self> {
        Ok(match (class, num_classes) {
            (Some(c), k) if (c as usize) < k => LabelPlan::Fixed(c),
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
            (None, k) if k > 0 => LabelPlan::Cycle(k),
            (None, _) => LabelPlan::None,
        })
    }
    fn labels(self, range: std::ops::Range<usize>) -> Option<Vec<u32>> {
        match self {
            LabelPlan::None => None,
            LabelPlan::Fixed(c) => Some(vec![c; range.len()]),
            LabelPlan::Cycle(k) => Some(range.map(|i| (i % k) as u32).collect()),
        }
    }
}

/// Draw `cfg.num_samples` samples [`STREAM_BATCH`] at a time: sample i (0-based) uses the RNG
/// stream `cfg.first_index + i` and the label `labels` gives it, exactly as in one sampler run
/// over all of them. `sink(i0, batch)` receives each finished batch (its first sample is i0);
/// `progress(done, total)` counts steps over all batches. Memory is that of one batch.
pub fn sample_stream<D: Denoiser + ?Sized>(
    denoiser: &mut D,
    schedule: ScheduleRef<'_>,
    cfg: &SamplerConfig,
    constraints: &[Constraint],
    labels: LabelPlan,
    progress: &mut dyn FnMut(u64, u64),
    sink: &mut dyn FnMut(usize, SampleOutput) -> Result<bool>,
) -> Result<()> {
    cfg.validate()?;
    let n = cfg.num_samples;
    let batches = n.div_ceil(STREAM_BATCH) as u64;
    let mut total = 0u64;
    for (b, i0) in (0..n).step_by(STREAM_BATCH).enumerate() {
        let m = STREAM_BATCH.min(n - i0);
        let bcfg = SamplerConfig {
            num_samples: m,
            first_index: cfg.first_index.wrapping_add(i0 as u64),
            batch_size: m,
            ..cfg.clone()
        };
        let l = labels.labels(i0..i0 + m);
        let mut sampler = Sampler::new(&mut *denoiser, schedule, &bcfg, constraints, l.as_deref())?;
        let per_batch = (sampler.total_steps() * sampler.num_chunks()) as u64;
        total = per_batch * batches;
        for ev in sampler.by_ref() {
            let ev = ev?;
            progress(
                b as u64 * per_batch + (ev.chunk * ev.total_steps + ev.step) as u64,
                total,
            );
        }
        let out = sampler.snapshot();
        if !out.complete {
            return Err(CliError::Input(
                "sampling stopped before the last step".into(),
            ));
        }
        if !sink(i0, out)? {
            break;
        }
    }
    progress(total, total);
    Ok(())
}

/// What [`generate`] drew.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub samples: usize,
    /// Denoiser calls summed over the samples (for the mean NFE).
    pub nfe_total: u64,
}

impl Summary {
    /// Counts one streamed batch.
    fn add(&mut self, out: &SampleOutput) {
        self.samples += out.sequences.len();
        self.nfe_total += out.nfe.iter().map(|&v| v as u64).sum::<u64>();
    }
}

/// Run the sampler and print/write the samples, batch by batch.
pub fn generate<'a, D: Denoiser + ?Sized>(
    denoiser: &'a mut D,
    schedule: ScheduleRef<'a>,
    sc: &SampleConfig,
    codec: &Codec,
    len: usize,
    req: &Request,
) -> Result<Summary> {
    let fixed = constraint_of(req, codec, len)?;
    let n = sc.num_samples;
    let labels = LabelPlan::of(req.class, denoiser.num_classes())?;
    if matches!(codec, Codec::Image(_)) && n > MAX_IMAGE_SAMPLES {
        return Err(CliError::Input(format!(
            "-n {n}: image samples are drawn into one PNG grid, at most {MAX_IMAGE_SAMPLES}"
        )));
    }
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
        batch_size: STREAM_BATCH,
        remdm: sc.remdm(),
        threshold: sc.threshold,
    };
    let constraints = if fixed.iter().all(Option::is_none) {
        vec![]
    } else {
        vec![Constraint::from_template(&fixed)]
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "sampling {bar:30.cyan/blue} step {pos}/{len} ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    let mut progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    };
    let mut summary = Summary::default();
    let result = match codec {
        Codec::Text(tok) => {
            let mut text = TextSink::new(tok, req, &fixed)?;
            let mut sink = |i0: usize, out: SampleOutput| -> Result<bool> {
                summary.add(&out);
                text.batch(i0, &out)
            };
            sample_stream(
                denoiser,
                schedule,
                &cfg,
                &constraints,
                labels,
                &mut progress,
                &mut sink,
            )
            .and_then(|()| text.finish(summary.samples))
        }
        Codec::Image(shape) => {
            let mut all = SampleOutput {
                sequences: Vec::new(),
                reveal_step: Vec::new(),
                nfe: Vec::new(),
                calls: 0,
                total_steps: cfg.steps,
                complete: true,
            };
            let mut sink = |_: usize, out: SampleOutput| -> Result<bool> {
                summary.add(&out);
                all.sequences.extend(out.sequences);
                all.reveal_step.extend(out.reveal_step);
                all.nfe.extend(out.nfe);
                all.calls += out.calls;
                all.total_steps = out.total_steps;
                Ok(true)
            };
            sample_stream(
                denoiser,
                schedule,
                &cfg,
                &constraints,
                labels,
                &mut progress,
                &mut sink,
            )
            .and_then(|()| render_images(&all, *shape, req))
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    result.map(|()| summary)
}

/// Text samples as they come: printed to stdout (plain, or the unmasking process with
/// `--show-steps`) and, with `--out`, written one per line into a file that appears complete or
/// not at all. A closed stdout (`| head`) ends the printing; without `--out` it ends sampling.
struct TextSink<'a> {
    tok: &'a AnyTokenizer,
    show_steps: bool,
    is_fixed: Vec<bool>,
    stdout: Option<std::io::Stdout>,
    file: Option<(crate::fsutil::AtomicFile, PathBuf)>,
}

impl<'a> TextSink<'a> {
    fn new(tok: &'a AnyTokenizer, req: &Request, fixed: &[Option<u32>]) -> Result<Self> {
        let file = match &req.out {
            Some(p) => Some((crate::fsutil::AtomicFile::create(p)?, p.clone())),
            None => None,
        };
        Ok(TextSink {
            tok,
            show_steps: req.show_steps,
            is_fixed: fixed.iter().map(Option::is_some).collect(),
            stdout: Some(std::io::stdout()),
            file,
        })
    }

    /// Print one text to stdout; a closed pipe stops printing, any other failure is an error.
    fn print(&mut self, text: &str) -> Result<()> {
        use std::io::Write;
        if let Some(out) = &self.stdout {
            let mut lock = out.lock();
            match lock.write_all(text.as_bytes()).and_then(|()| lock.flush()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    drop(lock);
                    self.stdout = None;
                }
                Err(e) => return Err(CliError::io("cannot write", "standard output", e)),
            }
        }
        Ok(())
    }

    /// Print and write one batch whose first sample is number `i0` (0-based). Returns whether
    /// more samples are wanted.
    fn batch(&mut self, i0: usize, out: &SampleOutput) -> Result<bool> {
        let mut printed = String::new();
        let mut lines = String::new();
        for (j, seq) in out.sequences.iter().enumerate() {
            let text = maskdiff_data::Tokenizer::decode(self.tok, seq)?;
            lines.push_str(&text.replace('\n', "\\n"));
            lines.push('\n');
            printed.push_str(&format!(
                "--- sample {} (NFE {}) ---\n",
                i0 + j + 1,
                out.nfe[j]
            ));
            if self.show_steps {
                let pieces = token_pieces(self.tok, seq)?;
                let trace = RevealTrace {
                    // Sampler steps are 1-based; 0 marks constraint-fixed positions.
                    step: out.reveal_step[j]
                        .iter()
                        .map(|&s| (s > 0 && s != u32::MAX).then(|| s as usize - 1))
                        .collect(),
                    total_steps: out.total_steps,
                };
                let frames = 6usize;
                for f in 1..frames {
                    let upto = out.total_steps * f / frames;
                    printed.push_str(&format!(
                        "[step {upto:>5}/{}] {}\n",
                        out.total_steps,
                        snapshot(&pieces, &trace, upto, &self.is_fixed)
                    ));
                }
                printed.push_str(&coloured(&pieces, &trace));
                printed.push('\n');
                printed.push_str(&legend(out.total_steps));
                printed.push('\n');
            } else {
                printed.push_str(&text);
                printed.push('\n');
            }
        }
        self.print(&printed)?;
        if let Some((f, _)) = &mut self.file {
            f.write_all(lines.as_bytes())?;
        }
        Ok(self.stdout.is_some() || self.file.is_some())
    }

    fn finish(self, samples: usize) -> Result<()> {
        let mut this = self;
        if let Some((f, p)) = this.file.take() {
            f.commit()?;
            this.print(&format!("wrote {samples} samples to {}\n", p.display()))?;
        }
        Ok(())
    }
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

/// Block-diffusion sampling (BD3-LM): `sc.num_samples` text samples drawn block by block over
/// `den` (the prefix cached or recomputed, as `den` was built) with `sc.sampler` inside each
/// block (`sc.steps` steps per block), up to `len` tokens or the tokenizer's end-of-text token
/// (GPT-2), printed and written as [`generate`] does. `--prompt` / `--infill` fix tokens
/// (`maskdiff_sampler::sample_blocks_streamed`: a prompt's whole blocks are committed without a
/// network call, a partial block is clamped inside its sampler); the progress bar and
/// `--show-steps` follow the sampler's step events (global steps: block j's are j·T + 1 ..=
/// (j + 1)·T). Returns the summary and the sampled token count.
pub fn generate_blocks<P: maskdiff_process::PrefixDenoiser + ?Sized>(
    den: &mut P,
    schedule: ScheduleRef<'_>,
    sc: &SampleConfig,
    codec: &Codec,
    len: usize,
    req: &Request,
) -> Result<(Summary, usize)> {
    let Codec::Text(tok) = codec else {
        return Err(CliError::Input(
            "block-diffusion sampling is implemented for text models".into(),
        ));
    };
    // `--class` as for the other models: a class-conditional block network gets sample i's
    // label at every block (its prefix cache is reset with it).
    let plan = LabelPlan::of(req.class, den.num_classes())?;
    let fixed = constraint_of(req, codec, len)?;
    let constraints = if fixed.iter().all(Option::is_none) {
        vec![]
    } else {
        vec![Constraint::from_template(&fixed)]
    };
    let eot = matches!(tok, AnyTokenizer::Gpt2(_)).then_some(maskdiff_data::tokenizer::GPT2_EOS);
    let cfg = SamplerConfig {
        kind: sc.sampler,
        steps: sc.steps,
        grid: sc.grid,
        num_samples: sc.num_samples,
        length: len,
        temperature: sc.temperature,
        top_p: sc.top_p,
        seed: sc.seed,
        first_index: 0,
        block_size: None,
        batch_size: 1,
        remdm: sc.remdm(),
        threshold: sc.threshold,
    };
    let total_steps = len.div_ceil(den.block_size().max(1)) * sc.steps;
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new((sc.num_samples * total_steps) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "sampling {bar:30.cyan/blue} step {pos}/{len} ETA {eta}",
            )
            .expect("valid template"),
        );
        b
    });
    let mut text = TextSink::new(tok, req, &fixed)?;
    let mut summary = Summary::default();
    let mut tokens = 0usize;
    // one sample at a time: its stream is its index, so the samples do not depend on -n
    let result = (|| -> Result<()> {
        for i in 0..sc.num_samples {
            let one = SamplerConfig {
                num_samples: 1,
                first_index: i as u64,
                ..cfg.clone()
            };
            let mut on_event = |ev: &maskdiff_sampler::StepEvent| {
                if let Some(b) = &bar {
                    b.set_position((i * total_steps + ev.step) as u64);
                }
            };
            let label = plan.labels(i..i + 1);
            let out = maskdiff_sampler::sample_blocks_streamed(
                den,
                schedule,
                &one,
                eot,
                label.as_deref(),
                &constraints,
                &mut on_event,
            )?;
            tokens += out.sequences[0].len();
            let so = SampleOutput {
                reveal_step: out.reveal_step,
                sequences: out.sequences,
                nfe: out.nfe,
                calls: 0,
                total_steps,
                complete: true,
            };
            summary.add(&so);
            if !text.batch(i, &so)? {
                break;
            }
        }
        Ok(())
    })();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    result?;
    text.finish(summary.samples)?;
    Ok((summary, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use maskdiff_process::{DenoiseBatch, LogProbs, ProcessError, Vocab};
    use maskdiff_sampler::SamplerKind;
    use maskdiff_schedule::{Linear, SamplingGrid, Shifted};

    /// A context-dependent toy denoiser: the law at a position depends on the revealed tokens
    /// around it, the position, t and the class label, so any mix-up between samples of a batch
    /// would change the draws.
    struct Toy;
    impl Denoiser for Toy {
        fn vocab(&self) -> Vocab {
            Vocab::new(5).unwrap()
        }
        fn is_time_conditioned(&self) -> bool {
            true
        }
        fn num_classes(&self) -> usize {
            3
        }
        fn log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
            let v = 5;
            let mut data = Vec::with_capacity(b.batch * b.len * v);
            for i in 0..b.batch {
                let row = &b.ids[i * b.len..(i + 1) * b.len];
                let seen: u32 = row.iter().filter(|&&x| x < 5).sum();
                let label = b.labels.map_or(0, |l| l[i]);
                for n in 0..b.len {
                    let logits: Vec<f32> = (0..v)
                        .map(|k| {
                            ((k as u32 * 7 + seen + label * 3 + n as u32) % 11) as f32 * 0.3
                                + (b.t[i] as f32) * k as f32 * 0.1
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
                vocab: v,
            })
        }
    }

    /// Streaming 16 at a time gives, bit for bit, the samples (and NFEs) of the one sampler run
    /// over all of them that `sample` did before (batch size 16).
    #[test]
    fn streamed_batches_equal_one_run_over_all_samples() {
        let schedule = Shifted::official(Linear);
        for kind in [
            SamplerKind::Ancestral,
            SamplerKind::Mean,
            SamplerKind::FirstHitting,
        ] {
            for n in [1usize, 16, 37] {
                let cfg = SamplerConfig {
                    kind,
                    steps: 6,
                    grid: SamplingGrid::Cosine,
                    num_samples: n,
                    length: 7,
                    seed: 42,
                    batch_size: STREAM_BATCH,
                    ..SamplerConfig::default()
                };
                let constraints = [Constraint::from_template(&[
                    None,
                    Some(2),
                    None,
                    None,
                    None,
                    None,
                    None,
                ])];
                let plan = LabelPlan::Cycle(3);
                let labels = plan.labels(0..n);
                let all = maskdiff_sampler::sample(
                    &mut Toy,
                    &schedule,
                    &cfg,
                    &constraints,
                    labels.as_deref(),
                )
                .unwrap();
                let mut seqs = Vec::new();
                let mut nfe = Vec::new();
                let mut firsts = Vec::new();
                sample_stream(
                    &mut Toy,
                    ScheduleRef::md4(&schedule),
                    &cfg,
                    &constraints,
                    plan,
                    &mut |_, _| {},
                    &mut |i0, out| {
                        firsts.push(i0);
                        seqs.extend(out.sequences);
                        nfe.extend(out.nfe);
                        Ok(true)
                    },
                )
                .unwrap();
                assert_eq!(seqs, all.sequences, "{kind:?} n = {n}");
                assert_eq!(nfe, all.nfe, "{kind:?} n = {n}");
                let expect: Vec<usize> = (0..n).step_by(STREAM_BATCH).collect();
                assert_eq!(firsts, expect);
            }
        }
    }

    /// A class-conditional toy block denoiser (V = 27, blocks of 4): at absolute position p it
    /// puts (almost) all mass on token (9·label + p) mod 27, and it records the label of every
    /// sequence it is reset for.
    struct ToyBlocks {
        classes: usize,
        label: Option<u32>,
        prefix: usize,
        resets: Vec<Option<u32>>,
    }
    impl maskdiff_process::PrefixDenoiser for ToyBlocks {
        fn vocab(&self) -> Vocab {
            Vocab::new(27).unwrap()
        }
        fn is_time_conditioned(&self) -> bool {
            false
        }
        fn num_classes(&self) -> usize {
            self.classes
        }
        fn block_size(&self) -> usize {
            4
        }
        fn max_len(&self) -> usize {
            64
        }
        fn prefix_len(&self) -> usize {
            self.prefix
        }
        fn reset(&mut self, label: Option<u32>) {
            self.resets.push(label);
            self.label = label;
            self.prefix = 0;
        }
        fn block_log_probs(&mut self, b: &DenoiseBatch<'_>) -> Result<LogProbs, ProcessError> {
            let c = self.label.unwrap_or(0) as usize;
            let mut data = Vec::with_capacity(b.batch * b.len * 27);
            for _ in 0..b.batch {
                for n in 0..b.len {
                    let hot = (9 * c + self.prefix + n) % 27;
                    data.extend((0..27).map(|k| if k == hot { 0.0 } else { -60.0 }));
                }
            }
            Ok(LogProbs {
                data,
                batch: b.batch,
                len: b.len,
                vocab: 27,
            })
        }
        fn commit(&mut self, block: &[u32]) -> Result<(), ProcessError> {
            self.prefix += block.len();
            Ok(())
        }
    }

    #[test]
    fn block_sampling_takes_class_labels() {
        let schedule = Shifted::official(Linear);
        let tok = AnyTokenizer::new(maskdiff_data::TokenizerId::Text8).unwrap();
        let codec = Codec::Text(tok.clone());
        let sc = SampleConfig {
            num_samples: 4,
            steps: 4,
            ..SampleConfig::default()
        };
        let dir =
            std::env::temp_dir().join(format!("maskdiff-blocks-class-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toy = |classes| ToyBlocks {
            classes,
            label: None,
            prefix: 0,
            resets: Vec::new(),
        };
        let expect = |c: usize| -> String {
            use maskdiff_data::Tokenizer;
            let ids: Vec<u32> = (0..10).map(|p| ((9 * c + p) % 27) as u32).collect();
            tok.decode(&ids).unwrap()
        };
        // `--class 1`: every sample is drawn with label 1; without it, labels cycle 0, 1, 2, 0
        for (class, labels) in [(Some(1), [1, 1, 1, 1]), (None, [0, 1, 2, 0])] {
            let out = dir.join("samples.txt");
            let req = Request {
                class,
                out: Some(out.clone()),
                ..Request::default()
            };
            let mut den = toy(3);
            let (summary, tokens) =
                generate_blocks(&mut den, ScheduleRef::md4(&schedule), &sc, &codec, 10, &req)
                    .unwrap();
            assert_eq!((summary.samples, tokens), (4, 40));
            let want: Vec<Option<u32>> = labels.iter().map(|&c| Some(c)).collect();
            assert_eq!(den.resets, want);
            let text = std::fs::read_to_string(&out).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let want: Vec<String> = labels.iter().map(|&c| expect(c as usize)).collect();
            assert_eq!(lines, want);
        }
        // a class the model does not have, and a class for an unconditional model
        let req = |c| Request {
            class: Some(c),
            out: Some(dir.join("bad.txt")),
            ..Request::default()
        };
        let e = generate_blocks(
            &mut toy(3),
            ScheduleRef::md4(&schedule),
            &sc,
            &codec,
            10,
            &req(3),
        )
        .unwrap_err();
        assert!(e.to_string().contains("3 classes"), "{e}");
        let e = generate_blocks(
            &mut toy(0),
            ScheduleRef::md4(&schedule),
            &sc,
            &codec,
            10,
            &req(0),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not class-conditional"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_sink_can_stop_the_stream() {
        let schedule = Shifted::official(Linear);
        let cfg = SamplerConfig {
            steps: 2,
            num_samples: 1_000_000_000,
            length: 4,
            ..SamplerConfig::default()
        };
        let mut batches = 0;
        sample_stream(
            &mut Toy,
            ScheduleRef::md4(&schedule),
            &cfg,
            &[],
            LabelPlan::Fixed(1),
            &mut |_, _| {},
            &mut |_, out| {
                assert_eq!(out.sequences.len(), STREAM_BATCH);
                batches += 1;
                Ok(batches < 3)
            },
        )
        .unwrap();
        assert_eq!(batches, 3);
    }
}
