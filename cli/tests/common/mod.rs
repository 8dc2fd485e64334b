//! Helpers for the end-to-end tests of the real `maskdiff` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_maskdiff")
}

/// A fresh, empty directory for one test.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("maskdiff-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic English-like text: words from a small vocabulary chosen by an LCG, with a
/// strong bigram structure (each word prefers a successor), so a model can learn something.
pub fn write_corpus(path: &Path, chars: usize) {
    const WORDS: [&str; 16] = [
        "the", "cat", "sat", "on", "mat", "and", "dog", "ran", "to", "a", "big", "red", "house",
        "with", "green", "door",
    ];
    let mut s = String::with_capacity(chars + 16);
    let mut x: u64 = 12345;
    let mut w = 0usize;
    while s.len() < chars {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let r = (x >> 33) % 10;
        w = if r < 7 {
            (w + 1) % WORDS.len()
        } else {
            (x >> 40) as usize % WORDS.len()
        };
        s.push_str(WORDS[w]);
        s.push(' ');
    }
    std::fs::write(path, s).unwrap();
}

/// Run the binary in `cwd` with `args`.
pub fn run(cwd: &Path, args: &[&str]) -> Output {
    run_env(cwd, args, &[])
}

/// Run the binary in `cwd` with `args` and the environment variables `env` set.
pub fn run_env(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(bin())
        .current_dir(cwd)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the maskdiff binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command succeeded; show its output otherwise.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "maskdiff failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// The command failed with exit status 1 and exactly one stderr line of the form
/// `maskdiff: error: ...` containing every `needle` (case-insensitive); no panic.
pub fn one_line_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit 1, got {:?}; stderr:\n{err}",
        o.status
    );
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("maskdiff: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    let line = lines[0].to_lowercase();
    for n in needles {
        assert!(
            line.contains(&n.to_lowercase()),
            "error line lacks {n:?}: {}",
            lines[0]
        );
    }
}

/// Flags of a tiny, fast training run on `corpus.txt` in the test directory.
pub const TINY: &[&str] = &[
    "--preset",
    "tiny",
    "--data",
    "corpus.txt",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--ema-decay",
    "0.9",
    "--eval-batches",
    "2",
    "--no-progress",
];

pub fn train(cwd: &Path, out: &str, steps: u64, extra: &[&str]) -> Output {
    train_env(cwd, out, steps, extra, &[])
}

/// [`train`] with the environment variables `env` set.
pub fn train_env(
    cwd: &Path,
    out: &str,
    steps: u64,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let steps = steps.to_string();
    let mut args = vec!["train", "--out", out, "--steps", &steps];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    run_env(cwd, &args, env)
}

/// `train --resume` of the run in `out` for `sessions` sessions that each stop at the first
/// step boundary (`--time-limit 1e-9`: one optimiser step per session), each one succeeding.
pub fn resume_step_by_step(cwd: &Path, out: &str, sessions: usize) {
    for _ in 0..sessions {
        ok(&run(
            cwd,
            &[
                "train",
                "--resume",
                "--out",
                out,
                "--no-progress",
                "--time-limit",
                "1e-9",
            ],
        ));
    }
}

/// The manifest of a run's checkpoint as JSON.
pub fn manifest(run_dir: &Path) -> serde_json::Value {
    let p = run_dir.join("checkpoint").join("manifest.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// (role, checksum) of every tensor file of a checkpoint: equal iff the saved state is equal.
pub fn checksums(run_dir: &Path) -> Vec<(String, String)> {
    manifest(run_dir)["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["role"].as_str().unwrap().to_string(),
                f["fnv1a64"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Whether test data outside the repository (here `../shared`) is at `path`; when it is not, the
/// test is skipped with a message saying why — unless `MASKDIFF_REQUIRE_SHARED=1` (set by
/// `.ci/run`), which makes the absence a failure, so CI never skips silently.
pub fn have_data(path: &Path, how: &str) -> bool {
    if path.exists() {
        return true;
    }
    if std::env::var("MASKDIFF_REQUIRE_SHARED").is_ok_and(|v| v == "1") {
        panic!(
            "test data missing at {} and MASKDIFF_REQUIRE_SHARED=1 ({how})",
            path.display()
        );
    }
    // Written to stderr directly, not with `eprintln!`: the test harness captures the macros'
    // output of passing tests, and a skip must be visible.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: test data not found at {} ({how}); set MASKDIFF_REQUIRE_SHARED=1 to fail instead",
        path.display()
    );
    false
}
