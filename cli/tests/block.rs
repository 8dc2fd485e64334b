//! `maskdiff train --model block --block-size B` end to end on a tiny corpus: the run records the
//! block objective and the block network, its test NELBO beats the uniform baseline by many
//! standard errors, and inconsistent settings are one-line errors naming the field.

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
    // the block NELBO is a continuous-time estimate only
    one_line_error(
        &run(&d, &["eval", "blk", "--discrete-steps", "4"]),
        &["continuous"],
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
