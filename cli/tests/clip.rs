//! BD3-LM's clipped noise schedules end to end (`train --mask-rate`, `[schedule] mask_rate`):
//! the run records the clip, logs the clipped loss, resumes bit for bit, `eval` reports the
//! full-range NELBO, `eval --clip-search` prints its table and the interval of least variance,
//! and bad intervals or GenMD4 are one-line errors naming the field; the adaptive search
//! (`--clip-search`) re-chooses the interval at every validation, records it, and a run resumed
//! one step at a time across its choices ends bit-identical to an uninterrupted one.

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
    // the train records say their loss is the clipped objective (and `plot metrics` names it)
    let metrics = std::fs::read_to_string(d.join("straight").join("metrics.jsonl")).unwrap();
    let train_records: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "train")
        .collect();
    assert!(!train_records.is_empty(), "{metrics}");
    for r in &train_records {
        assert_eq!(r["mask_rate"], serde_json::json!([0.3, 0.8]), "{r}");
    }
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

#[test]
fn adaptive_clip_search_rechooses_at_validation_and_resumes_exactly() {
    let d = tmp("clip-search");
    write_corpus(&d.join("corpus.txt"), 40_000);
    std::fs::write(
        d.join("s.toml"),
        "[schedule]\nclip_widths = [0.5]\nclip_delta = 0.25\n",
    )
    .unwrap();
    let flags = [
        "--config",
        "s.toml",
        "--model",
        "block",
        "--block-size",
        "8",
        "--time-free",
        "--clip-search",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "100",
    ];
    let o = train(&d, "straight", 9, &flags);
    ok(&o);
    let err = stderr(&o);
    assert_eq!(
        err.matches("clip search: training on mask rates").count(),
        2,
        "{err}"
    );
    // each validation record carries the interval chosen there, one of the 4 candidates
    let metrics = std::fs::read_to_string(d.join("straight").join("metrics.jsonl")).unwrap();
    let chosen: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["split"] == "val" && r.get("mask_rate").is_some())
        .map(|r| r["mask_rate"].clone())
        .collect();
    assert_eq!(chosen.len(), 2, "{metrics}");
    let allowed = [[0.0, 1.0], [0.0, 0.5], [0.25, 0.75], [0.5, 1.0]];
    for c in &chosen {
        assert!(allowed.iter().any(|a| serde_json::json!(a) == *c), "{c}");
    }
    // (a clipped choice, so the resume below would differ if it were not restored)
    assert!(
        chosen.iter().any(|c| *c != serde_json::json!([0.0, 1.0])),
        "{chosen:?}"
    );
    // the last choice is saved with the run's state (the config keeps its own, none)
    let man = manifest(&d.join("straight"));
    assert_eq!(man["extra"]["mask_rate"], chosen[1]);
    assert!(man["train"].get("mask_rate").is_none());
    // one step per session, across both searches: the same state bit for bit
    let mut first: Vec<&str> = flags.to_vec();
    first.extend_from_slice(&["--time-limit", "1e-9"]);
    ok(&train(&d, "pieces", 9, &first));
    resume_step_by_step(&d, "pieces", 8);
    assert_eq!(manifest(&d.join("pieces"))["step"], 9);
    assert_eq!(checksums(&d.join("straight")), checksums(&d.join("pieces")));
    // a clipped start whose search can only choose the full range (no widths): the choice
    // [0, 1] is saved too, so the resumed run does not fall back to the start
    std::fs::write(
        d.join("f.toml"),
        "[schedule]\nmask_rate = [0.3, 0.8]\nclip_widths = []\n",
    )
    .unwrap();
    let mut full_flags: Vec<&str> = flags.to_vec();
    full_flags[1] = "f.toml";
    let o = train(&d, "full-straight", 9, &full_flags);
    ok(&o);
    assert!(
        stderr(&o).contains("clip search: training on mask rates [0, 1]"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        manifest(&d.join("full-straight"))["extra"]["mask_rate"],
        serde_json::json!([0.0, 1.0])
    );
    full_flags.extend_from_slice(&["--time-limit", "1e-9"]);
    ok(&train(&d, "full-pieces", 9, &full_flags));
    resume_step_by_step(&d, "full-pieces", 8);
    assert_eq!(
        checksums(&d.join("full-straight")),
        checksums(&d.join("full-pieces"))
    );
    // the search is refused without validations
    one_line_error(
        &train(&d, "x", 2, &["--clip-search", "--eval-every", "0"]),
        &["schedule.clip_search", "eval_every"],
    );
}
