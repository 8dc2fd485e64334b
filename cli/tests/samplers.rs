//! `maskdiff sample --sampler remdm | threshold` end to end on tiny trained MD4 and GenMD4
//! checkpoints: ReMDM with η = 0 writes exactly the ancestral samples; every strategy and the
//! loop schedule give valid text; the threshold sampler's network calls per sample are 32
//! (one per position) at τ = 1 and 1 at τ = 0; bad settings are one-line errors.

mod common;
use common::*;
use std::path::Path;

/// The "NFE k" of every "--- sample i (NFE k) ---" header.
fn nfes(out: &str) -> Vec<u32> {
    out.lines()
        .filter_map(|l| l.strip_prefix("--- sample "))
        .filter_map(|l| l.split("(NFE ").nth(1))
        .map(|l| l.trim_end_matches(") ---").parse().unwrap())
        .collect()
}

fn sample(d: &Path, run_dir: &str, extra: &[&str]) -> String {
    let mut args = vec!["sample", run_dir, "-n", "3", "--steps", "64"];
    args.extend_from_slice(extra);
    let o = run(d, &args);
    ok(&o);
    stdout(&o)
}

fn valid_text(out_file: &Path) {
    let s = std::fs::read_to_string(out_file).unwrap();
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(lines.len(), 3);
    for l in lines {
        assert_eq!(l.chars().count(), 32, "{l:?}");
        assert!(
            l.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
            "{l:?}"
        );
    }
}

#[test]
fn remdm_and_threshold_samplers_from_the_cli() {
    let d = tmp("samplers");
    write_corpus(&d.join("corpus.txt"), 40_000);
    ok(&train(&d, "md4", 30, &[]));
    ok(&train(&d, "gen", 30, &["--model", "genmd4"]));

    for model in ["md4", "gen"] {
        // σ ≡ 0: the ancestral samples, byte for byte.
        sample(&d, model, &["-o", "anc.txt"]);
        sample(
            &d,
            model,
            &["--sampler", "remdm", "--eta", "0", "-o", "re0.txt"],
        );
        let anc = std::fs::read_to_string(d.join("anc.txt")).unwrap();
        assert_eq!(anc, std::fs::read_to_string(d.join("re0.txt")).unwrap());
        // Remasking changes the samples and still gives valid text.
        for strategy in ["cap", "rescale", "conf"] {
            let eta = if strategy == "cap" { "0.3" } else { "0.8" };
            sample(
                &d,
                model,
                &[
                    "--sampler",
                    "remdm",
                    "--remdm-strategy",
                    strategy,
                    "--eta",
                    eta,
                    "-o",
                    "re.txt",
                ],
            );
            valid_text(&d.join("re.txt"));
            if strategy == "cap" {
                assert_ne!(anc, std::fs::read_to_string(d.join("re.txt")).unwrap());
            }
        }
        // Threshold: τ = 1 reveals one position per call, τ = 0 all of them in one call.
        let out = sample(
            &d,
            model,
            &["--sampler", "threshold", "--tau", "1", "-o", "th.txt"],
        );
        assert_eq!(nfes(&out), vec![32, 32, 32], "{out}");
        valid_text(&d.join("th.txt"));
        let out = sample(&d, model, &["--sampler", "threshold", "--threshold", "0"]);
        assert_eq!(nfes(&out), vec![1, 1, 1], "{out}");
        let out = sample(&d, model, &["--sampler", "threshold", "--tau", "0.9"]);
        assert!(nfes(&out).iter().all(|&k| (1..=32).contains(&k)), "{out}");
    }
    // The loop schedule (MD4), with the flag's short alias.
    sample(
        &d,
        "md4",
        &[
            "--sampler",
            "remdm",
            "--eta",
            "0.5",
            "--loop",
            "0.55,0.05,0.9",
            "-o",
            "loop.txt",
        ],
    );
    valid_text(&d.join("loop.txt"));

    // Bad settings: one line, exit 1.
    let bad = |args: &[&str], needles: &[&str]| {
        let mut a = vec!["sample", "md4", "-n", "1", "--steps", "8"];
        a.extend_from_slice(args);
        one_line_error(&run(&d, &a), needles);
    };
    bad(&["--sampler", "remdm", "--eta=-1"], &["eta"]);
    bad(
        &[
            "--sampler",
            "remdm",
            "--remdm-strategy",
            "rescale",
            "--eta",
            "2",
        ],
        &["eta", "[0, 1]"],
    );
    bad(
        &["--sampler", "remdm", "--remdm-loop", "0.2,0.5,0.9"],
        &["t_off < t_on"],
    );
    bad(&["--sampler", "threshold", "--tau", "1.5"], &["threshold"]);
    let o = run(
        &d,
        &[
            "sample",
            "gen",
            "--sampler",
            "remdm",
            "--remdm-loop",
            "0.55,0.05,0.9",
        ],
    );
    one_line_error(&o, &["loop", "genmd4"]);
    // A malformed loop is rejected by the argument parser (a one-line usage error, exit 1).
    let o = run(
        &d,
        &["sample", "md4", "--sampler", "remdm", "--remdm-loop", "1,2"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("T_ON,T_OFF,ALPHA_ON"), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
}
