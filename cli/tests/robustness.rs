//! Defects a new user ran into, through the real binary: usage errors are one line with exit 1;
//! a run directory has one writer (an OS lock, released on exit and on kill -9); metrics.jsonl
//! starts fresh for a new run, keeps its lines byte for byte across resumes and gains nothing
//! when a finished run is resumed; samples stream batch by batch (bounded memory, the same
//! samples); huge infill gaps and vanishing temperatures are refused; evaluation and sampling
//! need no optimizer state; divergence names the checkpoint in force; a corrupt corpus cache
//! says so.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every file under `dir` (recursively) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A child process killed and reaped when dropped, also when an assertion fails first.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn usage_errors_are_one_line_with_exit_status_1() {
    let d = tmp("usage");
    let cases: [(&[&str], &[&str]); 6] = [
        (&["train", "--bogus"], &["--bogus", "usage: maskdiff train"]),
        (&["train", "--stepz", "3"], &["--stepz", "--steps"]),
        (&["eval"], &["<RUN>", "usage: maskdiff eval"]),
        (&["sample", "r", "--steps", "abc"], &["abc", "--steps"]),
        (&["plot"], &["command is required", "maskdiff plot"]),
        (&[], &["command is required"]),
    ];
    for (args, needles) in cases {
        let o = run(&d, args);
        one_line_error(&o, needles);
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
    }
    // --help and --version are not errors: multi-line help on stdout, exit 0.
    for args in [&["--help"][..], &["train", "--help"], &["--version"]] {
        let o = run(&d, args);
        ok(&o);
        assert!(stderr(&o).is_empty(), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains("maskdiff"), "{args:?}");
    }
    assert!(stdout(&run(&d, &["train", "--help"])).lines().count() > 20);
}

#[test]
fn huge_infill_gaps_are_refused_before_allocating() {
    let d = tmp("infill");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "r", 2, &[]));
    // A capacity-overflow panic and a 10^16-element allocation abort before the fix.
    for t in [
        "{18446744073709551615}",
        "{9999999999999999}",
        "ab{18446744073709551615}",
    ] {
        let o = run(&d, &["sample", "r", "--infill", t, "--steps", "4"]);
        one_line_error(&o, &["tokens long", "sequence length is 32"]);
    }
}

#[test]
fn temperature_zero_is_greedy_and_vanishing_ones_are_refused() {
    let d = tmp("temperature");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "r", 2, &[]));
    for t in ["1e-310", "1e-7"] {
        let o = run(&d, &["sample", "r", "--temperature", t, "--steps", "4"]);
        one_line_error(&o, &["sample.temperature", "1e-6", "greedy"]);
    }
    for t in ["0", "1e-6"] {
        let out = format!("t{t}.txt");
        ok(&run(
            &d,
            &[
                "sample",
                "r",
                "-n",
                "3",
                "--steps",
                "8",
                "--temperature",
                t,
                "-o",
                &out,
            ],
        ));
        let s = std::fs::read_to_string(d.join(&out)).unwrap();
        assert_eq!(s.lines().count(), 3);
        for l in s.lines() {
            assert_eq!(l.chars().count(), 32, "{l:?}");
            assert!(
                l.chars().all(|c| c.is_ascii_lowercase() || c == ' '),
                "{l:?}"
            );
        }
    }
}

/// Hold the run directory's lock as a `train` process would.
fn hold_lock(run_dir: &Path) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(run_dir.join(".maskdiff.lock"))
        .unwrap();
    f.lock().unwrap();
    f
}

#[test]
fn a_locked_run_directory_refuses_a_second_writer_and_touches_nothing() {
    let d = tmp("lock");
    write_corpus(&d.join("corpus.txt"), 20_000);
    // Stopped by the time limit after step 1 of 4: a checkpoint to resume from.
    ok(&train(
        &d,
        "r",
        4,
        &["--time-limit", "1e-9", "--log-every", "1"],
    ));
    let ck = d.join("r/checkpoint");
    // A temp file of an interrupted save, which a resume deletes.
    std::fs::write(ck.join(".params-000000009.safetensors.tmp-999999"), b"x").unwrap();
    let before = snapshot(&d.join("r"));
    let lock = hold_lock(&d.join("r"));
    let fresh = train(&d, "r", 4, &[]);
    let resume = run(&d, &["train", "--resume", "--out", "r", "--no-progress"]);
    for o in [&fresh, &resume] {
        one_line_error(o, &["in use", "another `maskdiff train`"]);
    }
    assert_eq!(
        snapshot(&d.join("r")),
        before,
        "a refused train changed the directory"
    );
    drop(lock);
    // Released: the run continues and cleans up.
    ok(&run(
        &d,
        &["train", "--resume", "--out", "r", "--no-progress"],
    ));
    assert_eq!(manifest(&d.join("r"))["step"], 4);
    assert!(!ck.join(".params-000000009.safetensors.tmp-999999").exists());
}

#[test]
fn a_live_train_holds_the_lock_until_it_is_killed() {
    let d = tmp("lock-kill");
    write_corpus(&d.join("corpus.txt"), 20_000);
    let mut args = vec!["train", "--out", "k", "--steps", "100000"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--checkpoint-every", "1", "--eval-every", "0"]);
    let mut child = Reaped(
        Command::new(bin())
            .current_dir(&d)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !d.join("k/checkpoint/manifest.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The lock is checked first: not "already holds a run", not a resume racing the writer.
    one_line_error(&train(&d, "k", 4, &[]), &["in use"]);
    one_line_error(
        &run(&d, &["train", "--resume", "--out", "k", "--no-progress"]),
        &["in use"],
    );
    // kill -9 (SIGKILL): the OS releases the lock with the process.
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let o = run(
        &d,
        &[
            "train",
            "--resume",
            "--out",
            "k",
            "--no-progress",
            "--time-limit",
            "1e-9",
        ],
    );
    ok(&o);
    assert!(stderr(&o).contains("time limit"), "{}", stderr(&o));
}

fn metrics_text(d: &Path, run_dir: &str) -> String {
    std::fs::read_to_string(d.join(run_dir).join("metrics.jsonl")).unwrap()
}

#[test]
fn metrics_start_fresh_keep_their_bytes_on_resume_and_a_finished_resume_adds_nothing() {
    let d = tmp("metrics");
    write_corpus(&d.join("corpus.txt"), 20_000);
    // (1) A directory left by a run that never reached a checkpoint: its lines are not kept.
    std::fs::create_dir_all(d.join("a")).unwrap();
    let stale = "{\"step\":999,\"split\":\"train\",\"loss_bits\":1.0}\n";
    std::fs::write(d.join("a/metrics.jsonl"), stale).unwrap();
    ok(&train(&d, "a", 2, &["--log-every", "1"]));
    let steps: Vec<u64> = metrics_text(&d, "a")
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, vec![1, 2, 2], "train 1, train 2, final val 2");
    // (2) Resuming keeps every earlier line byte for byte (no re-serialised digits).
    ok(&train(
        &d,
        "p",
        4,
        &["--log-every", "1", "--time-limit", "1e-9"],
    ));
    let first = metrics_text(&d, "p");
    assert_eq!(first.lines().count(), 1);
    let resume = ["train", "--resume", "--out", "p", "--no-progress"];
    let mut limited = resume.to_vec();
    limited.extend_from_slice(&["--time-limit", "1e-9"]);
    ok(&run(&d, &limited));
    let second = metrics_text(&d, "p");
    assert!(
        second.starts_with(&first) && second.lines().count() == 2,
        "{second}"
    );
    ok(&run(&d, &resume));
    let done = metrics_text(&d, "p");
    assert!(
        done.starts_with(&second) && done.lines().count() == 5,
        "{done}"
    );
    // (3) Resuming the finished run: nothing appended, nothing saved.
    let before = snapshot(&d.join("p"));
    let o = run(&d, &resume);
    ok(&o);
    assert!(stdout(&o).contains("already complete"), "{}", stdout(&o));
    assert_eq!(snapshot(&d.join("p")), before);
}

#[test]
fn samples_stream_in_batches_with_bounded_memory() {
    let d = tmp("stream");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "r", 2, &[]));
    // Sample i is the same whatever the total: 17 = one batch of 16 and one of 1.
    for (n, f) in [("40", "a.txt"), ("17", "b.txt")] {
        ok(&run(&d, &["sample", "r", "-n", n, "--steps", "8", "-o", f]));
    }
    let a = std::fs::read_to_string(d.join("a.txt")).unwrap();
    let b = std::fs::read_to_string(d.join("b.txt")).unwrap();
    assert_eq!(a.lines().count(), 40);
    assert_eq!(
        a.lines().take(17).collect::<Vec<_>>(),
        b.lines().collect::<Vec<_>>()
    );
    // 10^9 samples: the first ones print at once (nothing is held back), memory stays small.
    let mut child = Reaped(
        Command::new(bin())
            .current_dir(&d)
            .args(["sample", "r", "-n", "1000000000", "--steps", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut headers = 0;
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            headers += l.starts_with("--- sample ") as usize;
            if headers == 100 {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no 100 samples printed within 60 s: not streaming");
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string(format!("/proc/{}/status", child.0.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        // 10^9 samples of 32 tokens would need > 128 GB held at once.
        assert!(kb < 1_000_000, "peak resident memory {kb} kB");
    }
}

#[test]
fn evaluation_and_sampling_need_no_optimizer_state() {
    let d = tmp("no-optimizer");
    write_corpus(&d.join("corpus.txt"), 20_000);
    for (run_dir, extra) in [("m", &[][..]), ("g", &["--model", "genmd4"][..])] {
        ok(&train(&d, run_dir, 2, extra));
        let ck = d.join(run_dir).join("checkpoint");
        for e in std::fs::read_dir(&ck).unwrap().flatten() {
            if e.file_name().to_string_lossy().starts_with("optimizer-") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        ok(&run(
            &d,
            &["eval", run_dir, "--max-sequences", "2", "-k", "1"],
        ));
        ok(&run(
            &d,
            &[
                "eval",
                run_dir,
                "--max-sequences",
                "2",
                "-k",
                "1",
                "--no-ema",
            ],
        ));
        ok(&run(&d, &["sample", run_dir, "-n", "1", "--steps", "4"]));
        // Resuming needs the moments, and says which file is missing.
        one_line_error(
            &run(&d, &["train", "--resume", "--out", run_dir]),
            &["optimizer-"],
        );
    }
}

/// An output file in a missing directory is refused before evaluating or sampling (which can
/// take minutes), not after.
#[test]
fn outputs_in_a_missing_directory_fail_before_the_work() {
    let d = tmp("missing-out-dir");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "m", 2, &[]));
    let eval = |json: &str| {
        let args = [
            "eval",
            "m",
            "--max-sequences",
            "2",
            "-k",
            "1",
            "--json",
            json,
        ];
        run(&d, &args)
    };
    let sample = |out: &str| run(&d, &["sample", "m", "-n", "1", "--steps", "4", "-o", out]);
    for (o, path) in [
        (eval("nope/r.json"), "nope/r.json"),
        (sample("nope/s.txt"), "nope/s.txt"),
    ] {
        one_line_error(&o, &[path, "does not exist"]);
        assert!(stdout(&o).is_empty(), "worked first: {}", stdout(&o));
    }
    // a directory given as the output file
    one_line_error(&sample("m"), &["is a directory"]);
    // in an existing directory both write their file
    ok(&eval("m/r.json"));
    ok(&sample("s.txt"));
    assert!(d.join("m/r.json").is_file() && d.join("s.txt").is_file());
}

#[test]
fn divergence_names_the_checkpoint_in_force_and_lists_causes() {
    let d = tmp("diverge");
    write_corpus(&d.join("corpus.txt"), 20_000);
    let o = train(
        &d,
        "r",
        50,
        &[
            "--lr",
            "1e30",
            "--warmup-steps",
            "0",
            "--clip-norm",
            "0",
            "--checkpoint-every",
            "1",
        ],
    );
    let step = manifest(&d.join("r"))["step"].as_u64().unwrap();
    one_line_error(
        &o,
        &[
            &format!("the checkpoint of step {step} in r/checkpoint is intact"),
            "possible causes",
            "optim.lr = 1e30",
            "optim.clip_norm = 0",
        ],
    );
}

#[test]
fn a_corrupt_corpus_cache_is_reported_as_corrupt() {
    let d = tmp("cache");
    let cache = d.join("cache/english");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(cache.join("corpus.text8.tok"), b"MDTOKENS-truncated").unwrap();
    let args = ["--data", "cache", "--warmup-steps", "0"];
    let o = run(
        &d,
        &[
            &["train", "--out", "r", "--steps", "1", "--preset", "tiny"][..],
            &args,
        ]
        .concat(),
    );
    one_line_error(
        &o,
        &[
            "corpus.text8.tok is corrupt",
            "scripts/fetch-data.sh ",
            "/cache english",
        ],
    );
    // With the fetched sources present, the corrupt cache is rebuilt from them.
    for (sub, name) in [("shakespeare", "a_gut.txt"), ("sotu", "b.txt")] {
        std::fs::create_dir_all(cache.join(sub)).unwrap();
        write_corpus(&cache.join(sub).join(name), 20_000);
    }
    let o = run(
        &d,
        &[
            &[
                "train",
                "--out",
                "r",
                "--steps",
                "1",
                "--preset",
                "tiny",
                "--seq-len",
                "32",
            ][..],
            &args,
            &["--batch-size", "2", "--eval-batches", "1", "--no-progress"],
        ]
        .concat(),
    );
    ok(&o);
    assert!(stderr(&o).contains("rebuilding"), "{}", stderr(&o));
}
