//! BD3-LM's clipped noise schedules end to end (`train --mask-rate`, `[schedule] mask_rate`):
//! the run records the clip, logs the clipped loss, resumes bit for bit, `eval` reports the
//! full-range NELBO, `eval --clip-search` prints its table and the interval of least variance,
//! and bad intervals or GenMD4 are one-line errors naming the field.

mod common;
use common::*;

#[test]
fn clipped_block_run_trains_resumes_exactly_evaluates_and_searches() {
    let d = tmp("clip");
    write_corpus(&d.join("corpus.txt"), 40_000);
    let block = [
        "--model",
        "block",
        "--block-size",
        "8",
        "--time-free",
        "--mask-rate",
        "0.3,0.8",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "6",
    ];
    let o = train(&d, "straight", 12, &block);
    ok(&o);
    assert!(
        stderr(&o).contains("clipped loss [0.3, 0.8]"),
        "{}",
        stderr(&o)
    );
    let man = manifest(&d.join("straight"));
    assert_eq!(man["train"]["mask_rate"], serde_json::json!([0.3, 0.8]));
    // 6 steps, then --resume to 12: the same state bit for bit
    let mut six: Vec<&str> = block.to_vec();
    six.extend_from_slice(&["--time-limit", "1e-9"]);
    ok(&train(&d, "pieces", 12, &six));
    ok(&run(
        &d,
        &["train", "--resume", "--out", "pieces", "--no-progress"],
    ));
    assert_eq!(manifest(&d.join("pieces"))["step"], 12);
    assert_eq!(checksums(&d.join("straight")), checksums(&d.join("pieces")));
    // eval: the full-range NELBO
    let o = run(
        &d,
        &["eval", "straight", "-k", "1", "--max-sequences", "16"],
    );
    ok(&o);
    assert!(stdout(&o).contains("test NELBO:"), "{}", stdout(&o));
    // the search: the full range plus widths 0.5 stepped by 0.25 (3), and the least variance
    let o = run(
        &d,
        &[
            "eval",
            "straight",
            "--clip-search",
            "--clip-widths",
            "0.5",
            "--clip-delta",
            "0.25",
            "-k",
            "1",
            "--max-sequences",
            "16",
        ],
    );
    ok(&o);
    let out = stdout(&o);
    for row in ["[0, 1]", "[0, 0.5]", "[0.25, 0.75]", "[0.5, 1]"] {
        assert!(out.contains(row), "{row} missing:\n{out}");
    }
    assert!(out.contains("trained on mask rates [0.3, 0.8]"), "{out}");
    assert_eq!(out.matches("<- least").count(), 1, "{out}");
    assert!(out.contains("least variance: ["), "{out}");
}

#[test]
fn bad_mask_rates_and_genmd4_are_one_line_errors() {
    let d = tmp("clip-bad");
    write_corpus(&d.join("corpus.txt"), 20_000);
    for bad in ["0.8,0.3", "0.5", "-0.1,0.5", "0.2,1.5"] {
        let flag = format!("--mask-rate={bad}");
        one_line_error(&train(&d, "x", 2, &[&flag]), &["mask-rate"]);
    }
    std::fs::write(d.join("c.toml"), "[schedule]\nmask_rate = [0.9, 0.1]\n").unwrap();
    one_line_error(
        &train(&d, "x", 2, &["--config", "c.toml"]),
        &["mask-rate", "c.toml"],
    );
    one_line_error(
        &train(&d, "x", 2, &["--model", "genmd4", "--mask-rate", "0.3,0.8"]),
        &["schedule.mask_rate", "genmd4"],
    );
}
