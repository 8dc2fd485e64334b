//! GenMD4 through the real `maskdiff` binary (paper §6; spec §5): `train --model genmd4`
//! (two-sample and `--genmd4-network-samples 1`) logs the learned exponents with every
//! validation record, saves θ in the checkpoint, and `eval`, `sample` and `plot exponents` work
//! on the result; an interrupted GenMD4 run resumes bit-exactly.

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
fn genmd4_train_eval_sample_plot() {
    let d = tmp("genmd4");
    write_corpus(&d.join("corpus.txt"), 60_000);
    for (run_dir, samples) in [("two", "2"), ("one", "1")] {
        let o = train(
            &d,
            run_dir,
            60,
            &[
                "--model",
                "genmd4",
                "--genmd4-network-samples",
                samples,
                "--eval-every",
                "30",
                "--checkpoint-every",
                "30",
            ],
        );
        ok(&o);
        let m = std::fs::read_to_string(d.join(run_dir).join("metrics.jsonl")).unwrap();
        let val: Vec<serde_json::Value> = m
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["split"] == "val")
            .collect();
        assert_eq!(val.len(), 2, "validation at steps 30 and 60");
        for r in &val {
            let w = r["exponents"].as_array().expect("exponents logged");
            assert_eq!(w.len(), 27);
            assert!(w.iter().all(|x| x.as_f64().unwrap() > 0.0));
        }
        // the exponents moved away from their initial value 1 (they are learned)
        let last = val[1]["exponents"].as_array().unwrap();
        assert!(last
            .iter()
            .any(|x| (x.as_f64().unwrap() - 1.0).abs() > 1e-3));
        let man = manifest(&d.join(run_dir));
        assert!(man["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["role"] == "objective"));
        assert_eq!(
            man["train"]["objective"]["genmd4"]["one_sample"],
            serde_json::Value::Bool(samples == "1")
        );
    }
    // The GenMD4 test NELBO beats the uniform baseline by many standard errors.
    let o = run(&d, &["eval", "two", "-k", "2"]);
    ok(&o);
    let (bits, se) = parse_nelbo(&stdout(&o));
    assert!(se > 0.0 && bits < UNIFORM_BITS - 5.0 * se, "{bits} ± {se}");
    let o = run(&d, &["eval", "two", "--discrete-steps", "4"]);
    one_line_error(&o, &["genmd4"]);
    // Samples decode to text of the sequence length.
    let o = run(&d, &["sample", "two", "-n", "2", "--steps", "16"]);
    ok(&o);
    let out = stdout(&o);
    let text: Vec<&str> = out.lines().filter(|l| !l.starts_with("---")).collect();
    assert_eq!(text.len(), 2, "{}", stdout(&o));
    assert!(text.iter().all(|l| l.chars().count() == 32));
    let o = run(&d, &["plot", "exponents", "two", "-o", "w.png"]);
    ok(&o);
    let png = std::fs::read(d.join("w.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    // The printed summary names all 27 characters by the run's tokenizer (space shown as ␣),
    // largest exponent first, with the values of the last record in metrics.jsonl.
    let out = stdout(&o);
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("exponents w_v at step 60: "))
        .unwrap_or_else(|| panic!("no summary line:\n{out}"));
    let m = std::fs::read_to_string(d.join("two/metrics.jsonl")).unwrap();
    let logged: serde_json::Value = m
        .lines()
        .rev()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r.get("exponents").is_some())
        .unwrap();
    let logged: Vec<f64> = logged["exponents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    let entries: Vec<(String, f64)> = line
        .split(", ")
        .map(|e| {
            let (name, w) = e.rsplit_once(' ').unwrap();
            (name.to_string(), w.parse().unwrap())
        })
        .collect();
    assert_eq!(entries.len(), 27, "{line}");
    assert!(entries.windows(2).all(|p| p[0].1 >= p[1].1), "{line}");
    let mut names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    names.sort();
    let mut expected: Vec<String> = ('a'..='z').map(String::from).collect();
    expected.push("␣".into());
    expected.sort();
    assert_eq!(names, expected);
    let mut printed: Vec<f64> = entries.iter().map(|e| e.1).collect();
    let mut sorted = logged;
    sorted.sort_by(|a, b| b.total_cmp(a));
    printed.sort_by(|a, b| b.total_cmp(a));
    assert!(printed
        .iter()
        .zip(&sorted)
        .all(|(p, l)| (p - l).abs() <= 5e-4));
    let _ = std::fs::remove_dir_all(&d);
}

/// A GenMD4 run stopped by a time limit after its first step and resumed ends with a checkpoint
/// (network, EMA, optimizer and θ files) bit-identical to an uninterrupted run's.
#[test]
fn genmd4_resume_is_bit_exact() {
    let d = tmp("genmd4-resume");
    write_corpus(&d.join("corpus.txt"), 40_000);
    let extra = [
        "--model",
        "genmd4",
        "--checkpoint-every",
        "10",
        "--eval-every",
        "0",
    ];
    ok(&train(&d, "full", 20, &extra));
    let mut limited = extra.to_vec();
    limited.extend(["--time-limit", "1e-9"]);
    ok(&train(&d, "part", 20, &limited));
    assert_eq!(manifest(&d.join("part"))["step"], 1);
    ok(&run(
        &d,
        &["train", "--resume", "--out", "part", "--no-progress"],
    ));
    assert_eq!(manifest(&d.join("part"))["step"], 20);
    let (a, b) = (checksums(&d.join("full")), checksums(&d.join("part")));
    assert!(a.iter().any(|(role, _)| role == "objective"));
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&d);
}
