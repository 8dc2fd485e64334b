//! End to end through the real binary on a small corpus the test writes: train a tiny model,
//! evaluate it, sample (unconditional, prompt, infill, unmasking picture), plot; resume exactly
//! after a time limit, after Ctrl-C and after a hard kill in the middle of writing a checkpoint.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// log2(27): the NELBO of the freshly initialised (uniform) model on text8-style data.
const UNIFORM_BITS: f64 = 4.754_887_502_163_468;

fn parse_nelbo(out: &str) -> (f64, f64) {
    let line = out
        .lines()
        .find(|l| l.starts_with("test NELBO:"))
        .expect("a test NELBO line");
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn train_evaluate_sample_and_plot() {
    let d = tmp("e2e");
    write_corpus(&d.join("corpus.txt"), 120_000);
    let o = train(
        &d,
        "r",
        150,
        &[
            "--eval-every",
            "50",
            "--checkpoint-every",
            "50",
            "--batch-size",
            "8",
        ],
    );
    ok(&o);
    // Metrics: one train record per 10 steps and validation records at 50, 100, 150.
    let m = std::fs::read_to_string(d.join("r/metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = m
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let val: Vec<u64> = recs
        .iter()
        .filter(|r| r["split"] == "val")
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(val, vec![50, 100, 150]);
    assert_eq!(recs.iter().filter(|r| r["split"] == "train").count(), 15);

    // The test NELBO is an upper bound on the data's entropy; a model that learned anything
    // beats the uniform baseline log2(27) by many standard errors.
    let o = run(&d, &["eval", "r", "-k", "2", "--json", "eval.json"]);
    ok(&o);
    let (bits, se) = parse_nelbo(&stdout(&o));
    assert!(se > 0.0 && se < 0.2, "standard error {se}");
    assert!(
        bits < UNIFORM_BITS - 0.3 && bits < UNIFORM_BITS - 5.0 * se,
        "test NELBO {bits} ± {se}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("eval.json")).unwrap()).unwrap();
    let r = &j["result"];
    assert!((r["bits_per_token"].as_f64().unwrap() - bits).abs() < 1e-4);
    // perplexity = 2^bits (spec §3.4).
    let b = r["bits_per_token"].as_f64().unwrap();
    assert!((r["perplexity"].as_f64().unwrap() - b.exp2()).abs() < 1e-9 * b.exp2());
    // The discrete-time ELBO with few steps is a looser bound (L_T ≥ L_∞); with the same draws
    // of u it cannot be lower by more than noise.
    let o = run(&d, &["eval", "r", "-k", "2", "--discrete-steps", "4"]);
    ok(&o);
    let (bits4, _) = parse_nelbo(&stdout(&o));
    assert!(bits4 > bits - 3.0 * se, "L_4 = {bits4} vs L_inf = {bits}");

    // Sampling: unconditional to a file (one line per sample, 32 characters of a–z and space).
    ok(&run(
        &d,
        &["sample", "r", "-n", "3", "--steps", "16", "-o", "s.txt"],
    ));
    let s = std::fs::read_to_string(d.join("s.txt")).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert_eq!(l.chars().count(), 32, "{l:?}");
        assert!(
            l.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
            "{l:?}"
        );
    }
    // Same seed → same samples; another sampler with the same law still gives valid text.
    ok(&run(
        &d,
        &["sample", "r", "-n", "3", "--steps", "16", "-o", "s2.txt"],
    ));
    assert_eq!(s, std::fs::read_to_string(d.join("s2.txt")).unwrap());
    ok(&run(
        &d,
        &[
            "sample",
            "r",
            "-n",
            "2",
            "--steps",
            "16",
            "--sampler",
            "first-hitting",
            "--top-p",
            "0.9",
        ],
    ));
    // Prompt: the first characters are fixed.
    let o = run(
        &d,
        &[
            "sample", "r", "-n", "2", "--steps", "16", "--prompt", "the cat", "-o", "p.txt",
        ],
    );
    ok(&o);
    for l in std::fs::read_to_string(d.join("p.txt")).unwrap().lines() {
        assert!(l.starts_with("the cat"), "{l:?}");
    }
    // Infill: fixed text around generated gaps, at the template's positions.
    ok(&run(
        &d,
        &[
            "sample",
            "r",
            "-n",
            "2",
            "--steps",
            "16",
            "--infill",
            "ab{3}cd{2}ef",
            "-o",
            "i.txt",
        ],
    ));
    for l in std::fs::read_to_string(d.join("i.txt")).unwrap().lines() {
        let c: Vec<char> = l.chars().collect();
        assert_eq!(
            (c[0], c[1], c[5], c[6], c[9], c[10]),
            ('a', 'b', 'c', 'd', 'e', 'f'),
            "{l:?}"
        );
    }
    // The unmasking picture: snapshots with masks, then ANSI colours.
    let o = run(
        &d,
        &["sample", "r", "-n", "1", "--steps", "16", "--show-steps"],
    );
    ok(&o);
    let out = stdout(&o);
    assert!(
        out.contains("[step") && out.contains("\x1b[38;5;") && out.contains("reveal step"),
        "{out}"
    );

    // Plots are PNG files.
    ok(&run(&d, &["plot", "metrics", "r", "-o", "m.png"]));
    ok(&run(
        &d,
        &[
            "plot", "schedule", "linear", "cosine", "poly3", "-o", "s.png",
        ],
    ));
    for f in ["m.png", "s.png"] {
        let b = std::fs::read(d.join(f)).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{f}");
    }
    // Dry run: parameter count of the tiny preset.
    let o = run(
        &d,
        &[
            "train",
            "--dry-run",
            "--preset",
            "tiny",
            "--data",
            "corpus.txt",
            "--seq-len",
            "32",
        ],
    );
    ok(&o);
    assert!(stdout(&o).contains("parameters:"), "{}", stdout(&o));
}

#[test]
fn stopping_at_a_time_limit_and_resuming_is_bit_exact() {
    let d = tmp("exact");
    write_corpus(&d.join("corpus.txt"), 60_000);
    ok(&train(
        &d,
        "straight",
        30,
        &["--checkpoint-every", "10", "--eval-every", "0"],
    ));
    // Stops after its first step (the limit is checked after every step), then resumes twice.
    let o = train(
        &d,
        "pieces",
        30,
        &[
            "--checkpoint-every",
            "10",
            "--eval-every",
            "0",
            "--time-limit",
            "1e-9",
        ],
    );
    ok(&o);
    assert!(stderr(&o).contains("time limit"), "{}", stderr(&o));
    assert_eq!(manifest(&d.join("pieces"))["step"], 1);
    ok(&run(
        &d,
        &[
            "train",
            "--resume",
            "--out",
            "pieces",
            "--no-progress",
            "--time-limit",
            "1e-9",
        ],
    ));
    assert_eq!(manifest(&d.join("pieces"))["step"], 2);
    ok(&run(
        &d,
        &["train", "--resume", "--out", "pieces", "--no-progress"],
    ));
    assert_eq!(manifest(&d.join("pieces"))["step"], 30);
    // Same parameters, optimiser moments and EMA, bit for bit; same data position.
    assert_eq!(checksums(&d.join("straight")), checksums(&d.join("pieces")));
    assert_eq!(
        manifest(&d.join("straight"))["extra"]["sampler"],
        manifest(&d.join("pieces"))["extra"]["sampler"]
    );
    // The training records after the first step agree exactly too.
    let train_lines = |run: &str| -> Vec<String> {
        std::fs::read_to_string(d.join(run).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["split"] == "train")
            .map(|r| format!("{} {}", r["step"], r["loss_bits"]))
            .collect()
    };
    assert_eq!(train_lines("straight"), train_lines("pieces"));
}

/// How the work is spread over threads changes no bit: the main thread as the pool's worker 0
/// (the default, `maskdiff_network::tune_threads`), rayon's own pool beside it
/// (`MASKDIFF_MAIN_WORKER=0`), and one thread (`RAYON_NUM_THREADS=1`: the main thread alone)
/// give the same parameters, optimiser moments and EMA, and the same sampled text.
#[test]
fn the_thread_layout_changes_no_bit() {
    let d = tmp("threads");
    write_corpus(&d.join("corpus.txt"), 60_000);
    let layouts: [(&str, &[(&str, &str)]); 3] = [
        ("main-worker", &[("RAYON_NUM_THREADS", "2")]),
        (
            "outside",
            &[("RAYON_NUM_THREADS", "2"), ("MASKDIFF_MAIN_WORKER", "0")],
        ),
        ("one", &[("RAYON_NUM_THREADS", "1")]),
    ];
    let mut samples = Vec::new();
    for (out, env) in layouts {
        ok(&train_env(&d, out, 6, &["--eval-every", "0"], env));
        let file = format!("{out}.txt");
        let sample = [
            "sample", out, "-n", "2", "--steps", "16", "--seed", "3", "-o", &file,
        ];
        ok(&run_env(&d, &sample, env));
        samples.push(std::fs::read_to_string(d.join(&file)).unwrap());
    }
    let sums = checksums(&d.join("main-worker"));
    assert!(!sums.is_empty());
    assert_eq!(sums, checksums(&d.join("outside")));
    assert_eq!(sums, checksums(&d.join("one")));
    assert_eq!(samples[0], samples[1]);
    assert_eq!(samples[0], samples[2]);
}

/// With its own decay horizon (`optim.decay_steps`) the learning rate does not depend on
/// `train.steps`, so a run can be extended on resume: 8 steps, then `--resume --steps 16`, equals
/// 16 steps straight, bit for bit. Without a horizon of its own `--steps` on resume is refused.
#[test]
fn a_run_with_its_own_decay_horizon_can_be_extended_exactly() {
    let d = tmp("extend");
    write_corpus(&d.join("corpus.txt"), 60_000);
    std::fs::write(d.join("h.toml"), "[optim]\ndecay_steps = 40\n").unwrap();
    let cfg = ["--config", "h.toml", "--eval-every", "0"];
    ok(&train(&d, "straight", 16, &cfg));
    ok(&train(&d, "pieces", 8, &cfg));
    ok(&run(
        &d,
        &[
            "train",
            "--resume",
            "--out",
            "pieces",
            "--steps",
            "16",
            "--no-progress",
        ],
    ));
    assert_eq!(manifest(&d.join("pieces"))["step"], 16);
    assert_eq!(
        manifest(&d.join("pieces"))["train"]["lr"]["total_steps"],
        40
    );
    assert_eq!(checksums(&d.join("straight")), checksums(&d.join("pieces")));
    ok(&train(&d, "tied", 8, &["--eval-every", "0"]));
    one_line_error(
        &run(
            &d,
            &[
                "train",
                "--resume",
                "--out",
                "tied",
                "--steps",
                "16",
                "--no-progress",
            ],
        ),
        &["--steps", "decay"],
    );
}

fn spawn_train(d: &Path, out: &str, steps: u64, extra: &[&str]) -> std::process::Child {
    let steps = steps.to_string();
    let mut args = vec!["train", "--out", out, "--steps", &steps];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    Command::new(bin())
        .current_dir(d)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Whether a checkpoint save is in progress: a temp file, or a tensor file of another step than
/// the manifest's.
fn mid_save(ckpt: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(ckpt.join("manifest.json")) else {
        return false;
    };
    let Ok(m) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    let step = format!("{:09}", m["step"].as_u64().unwrap_or(0));
    std::fs::read_dir(ckpt).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.starts_with('.') || (n.ends_with(".safetensors") && !n.contains(&step))
        })
    })
}

#[test]
fn killed_while_checkpointing_resumes_from_the_last_good_checkpoint_exactly() {
    let d = tmp("kill");
    write_corpus(&d.join("corpus.txt"), 60_000);
    let steps = 300;
    let every = [
        "--checkpoint-every",
        "1",
        "--eval-every",
        "0",
        "--log-every",
        "1000",
    ];
    let mut caught = 0;
    for attempt in 0..3 {
        let out = format!("killed{attempt}");
        let mut child = spawn_train(&d, &out, steps, &every);
        let ckpt = d.join(&out).join("checkpoint");
        let t0 = Instant::now();
        // Wait for the first complete checkpoint, then kill during a later save.
        while t0.elapsed() < Duration::from_secs(60) {
            if mid_save(&ckpt) {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::yield_now();
        }
        let was_mid = mid_save(&ckpt);
        let _ = child.kill();
        let _ = child.wait();
        if !ckpt.join("manifest.json").exists() {
            continue;
        }
        caught += was_mid as usize;
        let before = manifest(&d.join(&out))["step"].as_u64().unwrap();
        // The checkpoint in force loads and evaluates...
        ok(&run(&d, &["eval", &out, "--max-sequences", "4", "-k", "1"]));
        // ...and the run resumes from it and finishes with exactly the uninterrupted result.
        let o = run(&d, &["train", "--resume", "--out", &out, "--no-progress"]);
        ok(&o);
        assert!(
            stderr(&o).contains(&format!("resuming at step {before}")),
            "{}",
            stderr(&o)
        );
        assert_eq!(manifest(&d.join(&out))["step"], steps);
        let leftovers: Vec<String> = std::fs::read_dir(&ckpt)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
        if attempt == 0 {
            ok(&train(&d, "straight", steps, &every));
        }
        assert_eq!(checksums(&d.join("straight")), checksums(&d.join(&out)));
        if caught > 0 {
            break;
        }
    }
    assert!(
        caught > 0,
        "never caught the process in the middle of a checkpoint save"
    );
}

/// One stop request — a Ctrl-C (SIGINT), or a SIGTERM delivered twice within a few
/// milliseconds as GNU `timeout` and batch schedulers deliver it (to the process, then to its
/// process group) — saves a checkpoint of the last finished step and exits cleanly.
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let d = tmp("sigint");
    write_corpus(&d.join("corpus.txt"), 60_000);
    for (signal, times) in [("-INT", 1), ("-TERM", 2)] {
        let out = format!("r{}", &signal[1..]);
        let child = spawn_train(
            &d,
            &out,
            100_000,
            &[
                "--checkpoint-every",
                "100000",
                "--eval-every",
                "0",
                "--log-every",
                "1",
                // steps of ≈ 0.1 s or more, so that the second signal lands mid-step
                "--batch-size",
                "256",
                "--seq-len",
                "128",
            ],
        );
        let metrics = d.join(&out).join("metrics.jsonl");
        let t0 = Instant::now();
        while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < 3 {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "training did not start"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for k in 0..times {
            if k > 0 {
                // apart enough to arrive as two signals, not one pending signal
                std::thread::sleep(Duration::from_millis(30));
            }
            let st = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(st.success());
        }
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(
            o.status.success(),
            "{signal} x{times}: {:?}\n{err}",
            o.status
        );
        assert!(
            err.contains("interrupt") && err.contains("--resume") && !err.contains("aborting"),
            "{err}"
        );
        // The checkpoint is the state after the last finished step.
        let step = manifest(&d.join(&out))["step"].as_u64().unwrap();
        assert!(step >= 3, "step {step}");
        let last = std::fs::read_to_string(&metrics).unwrap();
        let last: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        assert_eq!(last["step"].as_u64().unwrap(), step);
    }
}

/// The zero-shot sets beside the workspace (`../shared/data/zeroshot`, as CI lays it out).
fn zero_shot_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/zeroshot")
}

#[test]
fn gpt2_model_runs_the_zero_shot_suite() {
    let zs = zero_shot_dir();
    if !have_data(
        &zs,
        "the zero-shot sets exist only in this project's ../shared/data",
    ) {
        return;
    }
    let d = tmp("zeroshot");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(
        &d,
        "g",
        2,
        &["--dataset", "gpt2", "--eval-batches", "1"],
    ));
    // GenMD4 on the same data: its learned per-token schedule drives the bound.
    ok(&train(
        &d,
        "gg",
        2,
        &[
            "--dataset",
            "gpt2",
            "--eval-batches",
            "1",
            "--model",
            "genmd4",
        ],
    ));
    for (run_name, model) in [("g", "MD4"), ("gg", "GenMD4")] {
        let json = format!("zs-{run_name}.json");
        let mut args = vec![
            "eval",
            run_name,
            "--max-sequences",
            "4",
            "-k",
            "4",
            "--json",
            &json,
            "--zero-shot",
        ];
        // MD4 as the README writes it (`eval RUN --zero-shot`: the default directory, here the
        // one beside the source tree); GenMD4 with the directory named.
        if model == "GenMD4" {
            args.push(zs.to_str().unwrap());
        }
        let o = run(&d, &args);
        ok(&o);
        let out = stdout(&o);
        assert!(out.contains(&format!("({model}, EMA")), "{out}");
        for name in ["lambada", "wikitext2", "ptb", "wikitext103", "1BW (subset"] {
            assert!(out.contains(name), "{name} missing:\n{out}");
        }
        // A model two steps from its near-uniform initialisation: by the ELBO's schedule
        // invariance (also for GenMD4's per-token schedules, which share the endpoints) the
        // bound is ≈ (1 − 2ε)·log2 50257 = 15.6 bits per token; the one-draw-per-t estimates
        // (GenMD4's especially) are noisy, so within 4 standard errors plus 1 bit of learning.
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(d.join(&json)).unwrap()).unwrap();
        assert_eq!(rows.len(), 5);
        for r in rows {
            let (bits, se) = (
                r["result"]["bits_per_token"].as_f64().unwrap(),
                r["result"]["stderr_bits"].as_f64().unwrap(),
            );
            assert!(r["result"]["perplexity"].as_f64().unwrap().is_finite());
            assert!(
                (bits - 50257f64.log2()).abs() <= 4.0 * se + 1.0,
                "{model}: {r}"
            );
        }
    }
    // A character model is refused.
    ok(&train(&d, "c", 2, &[]));
    one_line_error(
        &run(&d, &["eval", "c", "--zero-shot", zs.to_str().unwrap()]),
        &["gpt-2"],
    );
}

/// `--precision bf16` trains (recorded as `train.precision` in the run's config), changes the
/// computed parameters when the CPU has AVX512-BF16 (and falls back to f32, saying so,
/// when it does not), cannot be changed on resume, and `eval`/`sample` take it too.
#[test]
fn bf16_precision_trains_evaluates_and_samples() {
    let d = tmp("bf16");
    write_corpus(&d.join("corpus.txt"), 60_000);
    let quiet = ["--checkpoint-every", "10", "--eval-every", "0"];
    ok(&train(&d, "f32", 6, &quiet));
    let mut extra = quiet.to_vec();
    extra.extend(["--precision", "bf16"]);
    let o = train(&d, "bf16", 6, &extra);
    ok(&o);
    let config = std::fs::read_to_string(d.join("bf16").join("config.toml")).unwrap();
    assert!(config.contains("precision = \"bf16\""), "{config}");
    let hw = maskdiff_network::precision::bf16_hardware();
    assert_eq!(
        stderr(&o).contains("using f32"),
        !hw,
        "fallback notice: {}",
        stderr(&o)
    );
    assert_eq!(checksums(&d.join("f32")) != checksums(&d.join("bf16")), hw);
    one_line_error(
        &run(
            &d,
            &["train", "--resume", "--out", "f32", "--precision", "bf16"],
        ),
        &["--precision"],
    );
    ok(&run(
        &d,
        &[
            "eval",
            "bf16",
            "-k",
            "1",
            "--max-sequences",
            "4",
            "--precision",
            "bf16",
        ],
    ));
    ok(&run(
        &d,
        &[
            "sample",
            "bf16",
            "-n",
            "2",
            "--steps",
            "8",
            "--precision",
            "bf16",
        ],
    ));
    one_line_error(
        &run(&d, &["eval", "bf16", "--precision", "fp8"]),
        &["fp8", "bf16"],
    );
}
