//! The documented surface: every command's `--help`, every example config in `configs/`, and the
//! effective config printed by `--print-config`.

mod common;
use common::*;
use std::path::PathBuf;

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn every_command_documents_its_flags() {
    let d = tmp("help");
    let top = run(&d, &["--help"]);
    ok(&top);
    for c in ["train", "eval", "sample", "plot"] {
        assert!(stdout(&top).contains(c), "{c} missing from --help");
    }
    let cases: [(&[&str], &[&str]); 5] = [
        (
            &["train"],
            &[
                "--config",
                "--resume",
                "--dry-run",
                "--preset",
                "--schedule",
                "--dataset",
                "--lr",
                "--device",
                "--seed",
                "--time-limit",
                "--precision",
            ],
        ),
        (
            &["eval"],
            &[
                "--mc-samples",
                "--discrete-steps",
                "--zero-shot",
                "--split",
                "--no-ema",
                "--precision",
            ],
        ),
        (
            &["sample"],
            &[
                "--prompt",
                "--infill",
                "--class",
                "--show-steps",
                "--sampler",
                "--top-p",
                "--temperature",
                "--steps",
                "--grid",
                "--precision",
            ],
        ),
        (&["plot", "metrics"], &["--out"]),
        (&["plot", "schedule"], &["--eps", "--out"]),
    ];
    for (cmd, flags) in cases {
        let mut args = cmd.to_vec();
        args.push("--help");
        let o = run(&d, &args);
        ok(&o);
        let help = stdout(&o);
        for f in flags {
            // The flag and a description on its line (or the next, when the flag is long).
            let i = help
                .find(&format!("{f} "))
                .or_else(|| help.find(&format!("{f}\n")));
            let i = i.unwrap_or_else(|| panic!("{cmd:?}: {f} undocumented:\n{help}"));
            let rest: String = help[i..].lines().take(2).collect::<Vec<_>>().join(" ");
            assert!(
                rest.split_whitespace().count() >= 3,
                "{cmd:?}: {f} has no description"
            );
        }
    }
}

#[test]
fn example_configs_are_valid_and_print_config_round_trips() {
    let dir = workspace().join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let cfg = maskdiff_cli::config::Config::load(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} configs in {}", dir.display());
    // Flags override the file; the printed config is a valid config with the flag's value.
    let d = tmp("print");
    let cfg = workspace().join("configs/cpu-small-english.toml");
    let o = run(
        &d,
        &[
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--lr",
            "0.0123",
            "--print-config",
        ],
    );
    ok(&o);
    let back =
        maskdiff_cli::config::Config::parse(&stdout(&o), std::path::Path::new("stdout")).unwrap();
    assert_eq!(back.optim.lr, 0.0123);
    assert_eq!(back.model.preset, "cpu-small");
}
