//! `maskdiff train --model block --block-size B` end to end on a tiny corpus: the run records the
//! block objective and the block network, its test NELBO beats the uniform baseline by many
//! standard errors, `sample` draws block by block with the KV cache and gives the same bytes
//! with `--no-cache`, with any sampler inside a block, keeps a prompt (not block-aligned) and
//! infill text verbatim, draws the unmasking with `--show-steps`, `eval --discrete-steps T`
//! gives the T-step block NELBO, a time-free block model trains with one t per block by default
//! (`--block-time`), and inconsistent settings are one-line errors naming the field.

mod common;
use common::*;

const UNIFORM_BITS: f64 = 4.754_887_502_163_468; // log2 27

fn parse_nelbo(out: &str) -> (f64, f64) {
    let line = out
        .lines()
        .find(|l| l.contains("NELBO:"))
        .unwrap_or_else(|| panic!("no NELBO line in:\n{out}"));
    let nums: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[test]
fn block_model_trains_and_evaluates() {
    let d = tmp("block");
    write_corpus(&d.join("corpus.txt"), 40_000);
    ok(&train(
        &d,
        "blk",
        40,
        &["--model", "block", "--block-size", "8"],
    ));
    let man = manifest(&d.join("blk"));
    assert_eq!(
        man["train"]["objective"]["block"]["block_size"],
        serde_json::json!(8)
    );
    let o = run(&d, &["eval", "blk", "-k", "2"]);
    ok(&o);
    let (bits, se) = parse_nelbo(&stdout(&o));
    assert!(se > 0.0 && bits < UNIFORM_BITS - 5.0 * se, "{bits} ± {se}");
    // block-by-block sampling: with the KV cache and recomputing the prefix, the same bytes
    for (name, extra) in [
        ("cached.txt", &[][..]),
        ("recomputed.txt", &["--no-cache"][..]),
    ] {
        let mut args = vec![
            "sample", "blk", "-n", "3", "--steps", "8", "--length", "20", "-o", name,
        ];
        args.extend_from_slice(extra);
        let o = run(&d, &args);
        ok(&o);
        assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));
    }
    let cached = std::fs::read_to_string(d.join("cached.txt")).unwrap();
    assert_eq!(
        cached,
        std::fs::read_to_string(d.join("recomputed.txt")).unwrap()
    );
    let lines: Vec<&str> = cached.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l.chars().count() == 20 && l.chars().all(|c| c.is_ascii_lowercase() || c == ' ')));
    for sampler in [
        &["--sampler", "threshold"][..],
        &["--sampler", "remdm", "--eta", "0.3"][..],
    ] {
        let mut args = vec!["sample", "blk", "-n", "2", "--steps", "8"];
        args.extend_from_slice(sampler);
        ok(&run(&d, &args));
    }
    // MD4's semi-autoregressive --block-size is refused unless it is the model's own
    let sample_with = |b: &str| {
        let args = [
            "sample",
            "blk",
            "-n",
            "1",
            "--steps",
            "4",
            "--block-size",
            b,
        ];
        run(&d, &args)
    };
    one_line_error(&sample_with("4"), &["--block-size 4", "blocks of 8"]);
    ok(&sample_with("8"));
    // a prompt that ends inside a block (11 characters, B = 8) and infill text in a later
    // block are kept verbatim; --show-steps draws the block-by-block unmasking
    let o = run(
        &d,
        &[
            "sample",
            "blk",
            "-n",
            "2",
            "--steps",
            "4",
            "--length",
            "24",
            "--prompt",
            "the quick b",
            "-o",
            "prompt.txt",
        ],
    );
    ok(&o);
    let text = std::fs::read_to_string(d.join("prompt.txt")).unwrap();
    assert_eq!(text.lines().count(), 2);
    for l in text.lines() {
        assert!(
            l.starts_with("the quick b") && l.chars().count() == 24,
            "{l:?}"
        );
    }
    let o = run(
        &d,
        &[
            "sample",
            "blk",
            "-n",
            "1",
            "--steps",
            "4",
            "--infill",
            "ab{14}xyz{5}",
            "-o",
            "infill.txt",
        ],
    );
    ok(&o);
    let l = std::fs::read_to_string(d.join("infill.txt")).unwrap();
    let l: Vec<char> = l.lines().next().unwrap().chars().collect();
    assert_eq!(l[..2], ['a', 'b']);
    assert_eq!(l[16..19], ['x', 'y', 'z']);
    let o = run(
        &d,
        &[
            "sample",
            "blk",
            "-n",
            "1",
            "--steps",
            "4",
            "--show-steps",
            "--length",
            "16",
        ],
    );
    ok(&o);
    assert!(stdout(&o).contains("[step"), "{}", stdout(&o));
    one_line_error(&run(&d, &["sample", "blk", "--length", "0"]), &["length"]);
    // --class reaches block sampling; this text model has no classes
    one_line_error(
        &run(&d, &["sample", "blk", "--class", "1"]),
        &["--class 1", "not class-conditional"],
    );
    one_line_error(
        &run(&d, &["sample", "blk", "--length", "100000"]),
        &["max_len"],
    );
    // the T-step block NELBO (MD4's bound per block, summed)
    let o = run(&d, &["eval", "blk", "-k", "2", "--discrete-steps", "4"]);
    ok(&o);
    assert!(
        stdout(&o).contains("4-step discrete-time ELBO"),
        "{}",
        stdout(&o)
    );
    let (bits, se) = parse_nelbo(&stdout(&o));
    assert!(se > 0.0 && bits < UNIFORM_BITS - 5.0 * se, "{bits} ± {se}");
    // this run is time-conditioned: its default is one t per sequence (nothing recorded), and
    // per-block times are refused, in training and in evaluation
    assert!(man["train"]["objective"]["block"].get("time").is_none());
    one_line_error(
        &run(&d, &["eval", "blk", "--block-time", "block"]),
        &["time-free"],
    );
    one_line_error(
        &train(
            &d,
            "bad",
            2,
            &[
                "--model",
                "block",
                "--block-size",
                "4",
                "--block-time",
                "block",
            ],
        ),
        &["model.block_time", "time-free"],
    );
    one_line_error(
        &train(
            &d,
            "bad",
            2,
            &[
                "--model",
                "block",
                "--block-size",
                "4",
                "--time-free",
                "--block-objective",
                "genmd4",
                "--block-time",
                "block",
            ],
        ),
        &["model.block_time", "MD4"],
    );
    one_line_error(
        &train(&d, "bad", 2, &["--time-free", "--block-time", "block"]),
        &["model.block_time"],
    );
    // a block model needs a block size; only a block model takes one
    one_line_error(
        &train(&d, "bad", 2, &["--model", "block"]),
        &["model.block_size"],
    );
    one_line_error(
        &train(&d, "bad", 2, &["--block-size", "4"]),
        &["model.block_size"],
    );
    one_line_error(
        &train(&d, "bad", 2, &["--model", "block", "--block-size", "0"]),
        &["model.block_size"],
    );
}

/// A time-free block model draws one t per block by default (BD3-LM): the manifest records it,
/// `eval` estimates the NELBO with per-block or (`--block-time sequence`) per-sequence times and
/// the T-step bound, all beating the uniform baseline.
#[test]
fn time_free_block_model_trains_with_per_block_times() {
    let d = tmp("block-time");
    write_corpus(&d.join("corpus.txt"), 40_000);
    ok(&train(
        &d,
        "pb",
        40,
        &["--model", "block", "--block-size", "8", "--time-free"],
    ));
    let man = manifest(&d.join("pb"));
    assert_eq!(
        man["train"]["objective"]["block"]["time"],
        serde_json::json!("block")
    );
    for extra in [
        &[][..],
        &["--block-time", "sequence"][..],
        &["--discrete-steps", "8"][..],
    ] {
        let mut args = vec!["eval", "pb", "-k", "2"];
        args.extend_from_slice(extra);
        let o = run(&d, &args);
        ok(&o);
        let (bits, se) = parse_nelbo(&stdout(&o));
        assert!(
            se > 0.0 && bits < UNIFORM_BITS - 5.0 * se,
            "{extra:?}: {bits} ± {se}"
        );
    }
}

/// `--block-objective genmd4`: GenMD4's learned per-token exponents inside the blocks, through
/// the real binary — the manifest records the inner objective and θ, validation logs the
/// exponents (learned: they move), `eval` beats the uniform baseline, `sample` draws block by
/// block with the learned schedule, and the settings GenMD4 refuses are refused here too.
#[test]
fn block_genmd4_model_trains_evaluates_and_samples() {
    let d = tmp("block-genmd4");
    write_corpus(&d.join("corpus.txt"), 40_000);
    ok(&train(
        &d,
        "bg",
        40,
        &[
            "--model",
            "block",
            "--block-size",
            "8",
            "--block-objective",
            "genmd4",
            "--eval-every",
            "40",
        ],
    ));
    let man = manifest(&d.join("bg"));
    let obj = &man["train"]["objective"]["block"];
    assert_eq!(obj["block_size"], serde_json::json!(8));
    assert_eq!(
        obj["inner"]["genmd4"]["one_sample"],
        serde_json::Value::Bool(false)
    );
    assert!(man["files"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["role"] == "objective"));
    let m = std::fs::read_to_string(d.join("bg/metrics.jsonl")).unwrap();
    let val: Vec<serde_json::Value> = m
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "val")
        .collect();
    let w = val
        .last()
        .expect("a validation record")
        .get("exponents")
        .and_then(|w| w.as_array())
        .expect("exponents logged");
    assert_eq!(w.len(), 27);
    assert!(w.iter().any(|x| (x.as_f64().unwrap() - 1.0).abs() > 1e-3));
    let o = run(&d, &["eval", "bg", "-k", "2"]);
    ok(&o);
    let (bits, se) = parse_nelbo(&stdout(&o));
    assert!(se > 0.0 && bits < UNIFORM_BITS - 5.0 * se, "{bits} ± {se}");
    let o = run(
        &d,
        &[
            "sample", "bg", "-n", "2", "--steps", "8", "--length", "20", "-o", "s.txt",
        ],
    );
    ok(&o);
    let text = std::fs::read_to_string(d.join("s.txt")).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text
        .lines()
        .all(|l| l.chars().count() == 20 && l.chars().all(|c| c.is_ascii_lowercase() || c == ' ')));
    // remasking and threshold decoding inside the blocks, with the learned schedule
    for sampler in [
        &["--sampler", "threshold"][..],
        &["--sampler", "remdm", "--eta", "0.3"][..],
    ] {
        let mut args = vec!["sample", "bg", "-n", "2", "--steps", "8", "--length", "20"];
        args.extend_from_slice(sampler);
        ok(&run(&d, &args));
    }
    one_line_error(
        &run(&d, &["sample", "bg", "--sampler", "first-hitting"]),
        &["sample.sampler", "GenMD4"],
    );
    // only a block model has an objective inside blocks
    one_line_error(
        &train(&d, "bad", 2, &["--block-objective", "genmd4"]),
        &["model.block_objective"],
    );
}
