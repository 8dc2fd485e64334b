//! Reliability through the real binary: every failure is one `maskdiff: error: ...` line and exit
//! status 1 — missing/corrupt data, a checkpoint from another vocabulary, an unwritable output
//! directory, bad config values (named), a prompt longer than the sequence, a diverging loss.

mod common;
use common::*;

#[test]
fn missing_data_is_a_one_line_error() {
    let d = tmp("missing");
    let o = train(&d, "r", 2, &[]); // corpus.txt was never written
    one_line_error(&o, &["not found", "corpus.txt"]);
    let o = run(&d, &["eval", "no-such-run"]);
    one_line_error(&o, &["no-such-run", "does not exist"]);
}

#[test]
fn corrupt_token_file_is_a_one_line_error() {
    let d = tmp("corrupt");
    // A token-file header followed by garbage: the reader must reject it, not panic.
    let mut bytes = b"MDTOKENS".to_vec();
    bytes.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
    std::fs::write(d.join("corpus.txt"), bytes).unwrap();
    let o = train(&d, "r", 2, &[]);
    one_line_error(&o, &["data"]);
}

#[test]
fn bad_config_values_name_the_field() {
    let d = tmp("config");
    write_corpus(&d.join("corpus.txt"), 20_000);
    std::fs::write(d.join("a.toml"), "[optim]\nlr = -0.5\n").unwrap();
    one_line_error(&run(&d, &["train", "--config", "a.toml"]), &["optim.lr"]);
    std::fs::write(d.join("b.toml"), "[train]\nbatchsize = 4\n").unwrap();
    one_line_error(&run(&d, &["train", "--config", "b.toml"]), &["batchsize"]);
    std::fs::write(d.join("c.toml"), "[schedule]\nname = \"poly-3\"\n").unwrap();
    one_line_error(
        &run(&d, &["train", "--config", "c.toml", "--dry-run"]),
        &["schedule.name"],
    );
    std::fs::write(d.join("e.toml"), "[sample]\ntop_p = 0\n").unwrap();
    one_line_error(
        &run(&d, &["train", "--config", "e.toml"]),
        &["sample.top_p"],
    );
    // A flag overrides the file, and is validated the same way.
    one_line_error(
        &run(&d, &["train", "--preset", "huge"]),
        &["model.preset", "huge"],
    );
}

#[test]
fn unwritable_output_directory_fails_before_training() {
    let d = tmp("unwritable");
    write_corpus(&d.join("corpus.txt"), 20_000);
    std::fs::write(d.join("afile"), "x").unwrap();
    // A directory below a regular file cannot be created (even by root).
    let o = train(&d, "afile/run", 2, &[]);
    one_line_error(&o, &["afile/run"]);
}

#[test]
fn diverging_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint() {
    let d = tmp("nan");
    write_corpus(&d.join("corpus.txt"), 20_000);
    let o = train(
        &d,
        "r",
        50,
        &["--lr", "1e30", "--warmup-steps", "0", "--clip-norm", "0"],
    );
    one_line_error(&o, &["diverged", "optim.lr", "no checkpoint was saved"]);
    // Nothing from the diverged step was saved.
    assert!(!d.join("r/checkpoint/manifest.json").exists());
}

#[test]
fn checkpoints_of_another_vocabulary_or_data_are_refused() {
    let d = tmp("mismatch");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "chars", 3, &[]));
    // A run on raw bytes (V = 256) with the character model's checkpoint dropped in.
    ok(&train(&d, "bytes", 3, &["--dataset", "bytes"]));
    std::fs::remove_dir_all(d.join("bytes/checkpoint")).unwrap();
    copy_dir(&d.join("chars/checkpoint"), &d.join("bytes/checkpoint"));
    std::fs::copy(d.join("bytes/config.toml"), d.join("keep.toml")).unwrap();
    let o = run(
        &d,
        &["train", "--resume", "--out", "bytes", "--no-progress"],
    );
    // Resuming reads the checkpoint's config (text8), which the run's config.toml (bytes)
    // contradicts: refused, naming the field.
    std::fs::copy(d.join("keep.toml"), d.join("bytes/config.toml")).unwrap();
    one_line_error(&o, &["config.toml", "data.dataset"]);
    // Evaluating the character model on a byte-tokenised token file.
    let ids: Vec<u32> = (0..5000u32).map(|i| i % 256).collect();
    maskdiff_data::TokenFile::write(
        &d.join("bytes.tok"),
        &ids,
        maskdiff_process::Vocab::new(256).unwrap(),
        maskdiff_data::TokenizerId::Bytes,
    )
    .unwrap();
    let o = run(&d, &["eval", "chars", "--data", "bytes.tok"]);
    one_line_error(&o, &["bytes", "text8"]);
    // Resuming with a flag that changes the run is refused too.
    let o = run(&d, &["train", "--resume", "--out", "chars", "--lr", "1e-2"]);
    one_line_error(&o, &["--resume", "--lr"]);
}

#[test]
fn prompt_longer_than_the_sequence_is_refused() {
    let d = tmp("prompt");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "r", 2, &[]));
    let long = "a".repeat(40); // seq-len is 32
    one_line_error(
        &run(&d, &["sample", "r", "--prompt", &long, "--steps", "4"]),
        &["40 tokens", "32"],
    );
    one_line_error(
        &run(
            &d,
            &["sample", "r", "--infill", "ab {40} cd", "--steps", "4"],
        ),
        &["46 tokens"],
    );
    one_line_error(
        &run(&d, &["sample", "r", "--infill", "ab {x} cd"]),
        &["--infill"],
    );
    one_line_error(&run(&d, &["sample", "r", "--class", "3"]), &["--class"]);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn corrupt_checkpoints_are_one_line_errors() {
    let d = tmp("corrupt-ckpt");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "r", 2, &[]));
    let ck = d.join("r/checkpoint");
    // Flip bytes in the middle of the parameter and EMA files (evaluation and sampling read the
    // EMA only, resuming reads both): their checksums no longer match.
    for prefix in ["params-", "ema-"] {
        let file = std::fs::read_dir(&ck)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
            .unwrap();
        let mut b = std::fs::read(&file).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        std::fs::write(&file, &b).unwrap();
    }
    one_line_error(&run(&d, &["eval", "r"]), &["corrupt"]);
    one_line_error(&run(&d, &["sample", "r"]), &["corrupt"]);
    one_line_error(&run(&d, &["train", "--resume", "--out", "r"]), &["corrupt"]);
    // A truncated manifest.
    std::fs::write(ck.join("manifest.json"), "{\"format\": \"maskdiff-check").unwrap();
    one_line_error(&run(&d, &["eval", "r"]), &["manifest"]);
}

/// A launcher (torchrun/srun/mpirun variables) that reports several ranks this binary cannot
/// join, or variables that make no sense, is refused before training: otherwise every rank
/// would train alone and overwrite the others' run.
#[test]
fn launcher_ranks_that_cannot_meet_are_refused() {
    let d = tmp("launcher");
    write_corpus(&d.join("corpus.txt"), 20_000);
    let launched = |vars: &[(&str, &str)]| {
        let mut c = std::process::Command::new(bin());
        c.current_dir(&d);
        for v in [
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_RANK",
            "PMI_SIZE",
            "PMIX_RANK",
            "MPI_LOCALNRANKS",
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
        ] {
            c.env_remove(v);
        }
        c.envs(vars.iter().copied())
            .args(["train", "--out", "r", "--steps", "2"])
            .args(TINY)
            .output()
            .expect("the maskdiff binary runs")
    };
    let o = launched(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]);
    one_line_error(&o, &["rank 1 of 2", "torchrun", "--features mpi"]);
    let o = launched(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
    ]);
    one_line_error(&o, &["rank 0 of 4", "slurm"]);
    let o = launched(&[("RANK", "one"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
    one_line_error(&o, &["RANK", "one"]);
    assert!(!d.join("r").exists(), "no rank may start the run");
    // One rank is one process: it trains.
    ok(&launched(&[
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
    ]));
}
