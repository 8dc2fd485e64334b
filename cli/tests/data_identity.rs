//! The data a run was trained on, and the config it was trained with, follow the run: labelled
//! images train unconditional models, relative data paths are stored absolute with a content
//! fingerprint (eval from another directory reads the same data; changed data is refused),
//! `--resume` uses the checkpoint's config and refuses edits to it, token files whose tokenizer
//! tag and vocabulary disagree are refused, and plain text is tokenised once into a cache.

mod common;
use common::*;
use std::path::Path;

/// A digits-format CSV (64 grey levels 0..=16, then the label 0..=9) of `n` images, plain (the
/// reader detects gzip by content): each class a different bright stripe.
fn write_digits(path: &Path, n: usize) {
    let mut s = String::new();
    for i in 0..n {
        let class = i % 10;
        for p in 0..64 {
            let v = if p / 8 == class % 8 { 16 } else { (p + i) % 3 };
            s.push_str(&format!("{v},"));
        }
        s.push_str(&format!("{class}\n"));
    }
    std::fs::write(path, s).unwrap();
}

fn image_train(d: &Path, out: &str, preset: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "train",
        "--out",
        out,
        "--dataset",
        "digits",
        "--data",
        "digits.csv",
        "--preset",
        preset,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-batches",
        "1",
        "--warmup-steps",
        "1",
        "--no-progress",
    ];
    args.extend_from_slice(extra);
    run(d, &args)
}

#[test]
fn unconditional_models_train_evaluate_and_sample_on_labelled_images() {
    train_evaluate_and_sample_images("tiny");
}

/// The same with the U-Net image denoiser (spec §7.3), which is built for the data's 8×8×1
/// shape, and the unmasking picture (`--show-steps`: `<out>-steps.png`).
#[test]
fn unet_models_train_evaluate_and_sample_on_labelled_images() {
    train_evaluate_and_sample_images("unet-tiny");
    let d = tmp("unet-steps");
    write_digits(&d.join("digits.csv"), 40);
    ok(&image_train(&d, "u", "unet-tiny", &[]));
    assert_eq!(manifest(&d.join("u"))["network"]["arch"]["height"], 8);
    ok(&run(
        &d,
        &[
            "sample",
            "u",
            "-n",
            "2",
            "--steps",
            "4",
            "--show-steps",
            "-o",
            "s.png",
        ],
    ));
    assert!(d.join("s-steps.png").is_file());
    // An image network refuses text data with one line.
    write_corpus(&d.join("corpus.txt"), 20_000);
    one_line_error(
        &run(
            &d,
            &[
                "train",
                "--out",
                "t",
                "--preset",
                "unet-tiny",
                "--data",
                "corpus.txt",
                "--steps",
                "1",
                "--warmup-steps",
                "0",
            ],
        ),
        &["image"],
    );
}

/// CIFAR-10's binary batches (`--dataset cifar10`: the user's directory of `data_batch_{1..5}.bin`
/// and `test_batch.bin`, records of one label byte and three 32×32 colour planes) train the U-Net
/// at 32×32×3 and evaluate in bits/dim; a truncated batch file is one error line.
#[test]
fn cifar10_binary_batches_train_and_evaluate_a_unet() {
    let d = tmp("cifar10");
    let dir = d.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let records = |n: usize, seed: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let label = ((i + seed) % 10) as u8;
                std::iter::once(label)
                    .chain((0..3072).map(move |p| ((p * 7 + i * 13 + seed) % 256) as u8))
            })
            .collect()
    };
    for k in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{k}.bin")), records(8, k)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), records(4, 9)).unwrap();
    let args = [
        "train",
        "--out",
        "c",
        "--dataset",
        "cifar10",
        "--data",
        "cifar-10-batches-bin",
        "--preset",
        "unet-tiny",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-batches",
        "1",
        "--warmup-steps",
        "0",
        "--no-progress",
    ];
    ok(&run(&d, &args));
    let m = manifest(&d.join("c"));
    assert_eq!(m["network"]["arch"]["height"], 32);
    assert_eq!(m["network"]["arch"]["channels"], 3);
    assert_eq!(m["network"]["vocab_size"], 256);
    let e = run(&d, &["eval", "c", "--max-sequences", "2"]);
    ok(&e);
    assert!(stdout(&e).contains("bits/dim"), "{}", stdout(&e));
    std::fs::write(dir.join("test_batch.bin"), &records(1, 0)[..100]).unwrap();
    let mut bad = args.to_vec();
    bad[2] = "c2";
    one_line_error(&run(&d, &bad), &["truncated"]);
}

fn train_evaluate_and_sample_images(preset: &str) {
    let d = tmp(&format!("uncond-images-{preset}"));
    write_digits(&d.join("digits.csv"), 120);
    // Unconditional (the fashion-mnist config's setting): the labels are ignored.
    let o = image_train(&d, "u", preset, &[]);
    ok(&o);
    assert_eq!(manifest(&d.join("u"))["network"]["num_classes"], 0);
    let e = run(&d, &["eval", "u", "--max-sequences", "4"]);
    ok(&e);
    assert!(stdout(&e).contains("bits/dim"), "{}", stdout(&e));
    ok(&run(
        &d,
        &["sample", "u", "-n", "2", "--steps", "4", "-o", "u.png"],
    ));
    assert!(d.join("u.png").is_file());
    // --class is refused for it with one line.
    one_line_error(
        &run(&d, &["sample", "u", "--class", "3", "-o", "c.png"]),
        &["class"],
    );
    // Class-conditional on the same data gets the labels.
    ok(&image_train(&d, "c", preset, &["--class-conditional"]));
    assert_eq!(manifest(&d.join("c"))["network"]["num_classes"], 10);
    ok(&run(
        &d,
        &[
            "sample", "c", "--class", "3", "-n", "2", "--steps", "4", "-o", "c.png",
        ],
    ));
}

fn eval_line(cwd: &Path, run_dir: &str) -> String {
    let o = run(
        cwd,
        &["eval", run_dir, "--max-sequences", "8", "--seed", "1"],
    );
    ok(&o);
    stdout(&o)
        .lines()
        .find(|l| l.contains("NELBO"))
        .unwrap()
        .to_string()
}

#[test]
fn eval_from_another_directory_reads_the_same_data_and_refuses_changed_data() {
    let d = tmp("identity");
    write_corpus(&d.join("corpus.txt"), 20_000);
    ok(&train(&d, "r", 3, &[]));
    let m = manifest(&d.join("r"));
    let stored = m["extra"]["config"].as_str().unwrap().to_string();
    let abs = d.join("corpus.txt");
    assert!(
        stored.contains(&format!("path = {:?}", abs.display().to_string())),
        "{stored}"
    );
    let fp = &m["extra"]["data"]["fingerprint"];
    assert_eq!(fp["fnv1a64"].as_str().unwrap().len(), 16);
    assert!(fp["tokens"].as_u64().unwrap() >= 19_000);

    // From a directory holding another corpus.txt: the run's own data is evaluated.
    let here = eval_line(&d, "r");
    let other = d.join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("corpus.txt"), "zzz qqq ".repeat(4000)).unwrap();
    assert_eq!(eval_line(&other, "../r"), here);

    // Pointing it at other data with the same shape is refused, naming the difference.
    one_line_error(
        &run(&other, &["eval", "../r", "--data", "corpus.txt"]),
        &["not the data it was trained on", "corpus.txt"],
    );
    // So is a changed corpus at the stored path (same length, other content) ...
    let text = std::fs::read_to_string(d.join("corpus.txt")).unwrap();
    std::fs::write(d.join("corpus.txt"), text.replace("cat", "cut")).unwrap();
    one_line_error(
        &run(&d, &["eval", "r"]),
        &["not the data it was trained on"],
    );
    // ... and resuming on it.
    one_line_error(
        &run(&d, &["train", "--resume", "--out", "r", "--no-progress"]),
        &["not the data it was trained on"],
    );
    std::fs::write(d.join("corpus.txt"), &text).unwrap();
    assert_eq!(eval_line(&d, "r"), here);

    // A checkpoint of an older version (no fingerprint) still evaluates, with a warning.
    let p = d.join("r/checkpoint/manifest.json");
    let mut old = m.clone();
    old["extra"]["data"]
        .as_object_mut()
        .unwrap()
        .remove("fingerprint");
    std::fs::write(&p, serde_json::to_string(&old).unwrap()).unwrap();
    let o = run(&d, &["eval", "r", "--max-sequences", "8", "--seed", "1"]);
    ok(&o);
    assert_eq!(
        stderr(&o).matches("no data fingerprint").count(),
        1,
        "{}",
        stderr(&o)
    );
}

/// Replace the first line starting with `key =` in `file`'s `[section]`.
fn edit_toml(file: &Path, section: &str, key: &str, value: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    let mut done = false;
    for line in text.lines() {
        if line.starts_with('[') {
            current = line.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        if !done && current == section && line.split('=').next().unwrap().trim() == key {
            out.push(format!("{key} = {value}"));
            done = true;
        } else {
            out.push(line.to_string());
        }
    }
    assert!(done, "{section}.{key} not in {}", file.display());
    std::fs::write(file, out.join("\n") + "\n").unwrap();
}

#[test]
fn resume_uses_the_checkpoint_config_and_refuses_edits() {
    let d = tmp("resume-cfg");
    write_corpus(&d.join("corpus.txt"), 20_000);
    // Stops after one step of six.
    ok(&train(
        &d,
        "r",
        6,
        &["--time-limit", "1e-9", "--eval-every", "0"],
    ));
    let cfg = d.join("r/config.toml");
    let pristine = std::fs::read_to_string(&cfg).unwrap();
    let resume = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--resume",
            "--out",
            "r",
            "--no-progress",
            "--time-limit",
            "1e-9",
        ];
        args.extend_from_slice(extra);
        run(&d, &args)
    };
    for (section, key, value) in [
        ("train", "batch_size", "8"),
        ("train", "seed", "99"),
        ("train", "steps", "12"),
        ("optim", "lr", "0.5"),
    ] {
        edit_toml(&cfg, section, key, value);
        one_line_error(&resume(&[]), &["config.toml", &format!("{section}.{key}")]);
        std::fs::write(&cfg, &pristine).unwrap();
    }
    assert_eq!(manifest(&d.join("r"))["step"], 1);
    // A --config given with --resume must agree too (its relative data path means the same file).
    let given = d.join("given.toml");
    std::fs::write(&given, &pristine).unwrap();
    edit_toml(&given, "data", "path", "\"corpus.txt\"");
    edit_toml(&given, "train", "seed", "7");
    one_line_error(
        &resume(&["-c", "given.toml"]),
        &["given.toml", "train.seed"],
    );
    edit_toml(&given, "train", "seed", "0");
    // Session fields may differ: cadence in config.toml, a relative path in the given file.
    edit_toml(&cfg, "train", "log_every", "3");
    let o = resume(&["-c", "given.toml"]);
    ok(&o);
    assert_eq!(manifest(&d.join("r"))["step"], 2);
}

#[test]
fn a_token_file_whose_tag_and_vocabulary_disagree_is_refused_at_train_start() {
    let d = tmp("tag-vocab");
    let ids: Vec<u32> = (0..5000u32).map(|i| (i * 7) % 100).collect();
    let mut bytes = maskdiff_data::tokenfile::encode_token_file(
        &ids,
        maskdiff_process::Vocab::new(100).unwrap(),
        maskdiff_data::TokenizerId::Custom,
    )
    .unwrap();
    // Tag it text8 (header only: the payload checksum still holds).
    bytes[20..24].copy_from_slice(&maskdiff_data::TokenizerId::Text8.code().to_le_bytes());
    std::fs::write(d.join("t.tok"), bytes).unwrap();
    let o = run(
        &d,
        &[
            "train",
            "--out",
            "x",
            "--data",
            "t.tok",
            "--preset",
            "tiny",
            "--steps",
            "1",
            "--warmup-steps",
            "1",
            "--no-progress",
        ],
    );
    one_line_error(&o, &["t.tok", "text8", "27", "100"]);
    assert!(!d.join("x/checkpoint").exists());
}

#[test]
fn plain_text_is_tokenised_once_and_the_cache_gives_identical_batches() {
    let d = tmp("text-cache");
    write_corpus(&d.join("corpus.txt"), 20_000);
    let caches = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "tok"))
            .collect()
    };
    assert!(caches().is_empty());
    ok(&train(&d, "a", 4, &["--eval-every", "0"]));
    let c = caches();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".corpus.txt.text8-"));
    let mtime = std::fs::metadata(&c[0]).unwrap().modified().unwrap();
    ok(&train(&d, "b", 4, &["--eval-every", "0"]));
    assert_eq!(caches(), c);
    assert_eq!(std::fs::metadata(&c[0]).unwrap().modified().unwrap(), mtime);
    // Same batches: same parameters, moments and data position, bit for bit.
    assert_eq!(checksums(&d.join("a")), checksums(&d.join("b")));
    assert_eq!(
        manifest(&d.join("a"))["extra"]["sampler"],
        manifest(&d.join("b"))["extra"]["sampler"]
    );
}

#[test]
fn a_class_conditional_network_still_requires_labels() {
    use maskdiff_network::dfdx::prelude::{Cpu, NoneTape};
    use maskdiff_process::DenoiseBatch;
    let mut cfg = maskdiff_network::NetworkConfig::preset("tiny", 17).unwrap();
    cfg.num_classes = 10;
    let m = cfg.init::<f32, Cpu>(&Cpu::default(), 0).unwrap();
    let ids = vec![3u32; 2 * 64];
    let batch = |labels| DenoiseBatch {
        ids: &ids,
        batch: 2,
        len: 64,
        t: &[0.5, 0.5],
        labels,
    };
    let e = m.forward(&batch(None), NoneTape, None).unwrap_err();
    assert!(e.to_string().contains("labels"), "{e}");
    assert!(m.forward(&batch(Some(&[3, 9])), NoneTape, None).is_ok());
}
