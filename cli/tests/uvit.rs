//! The U-ViT (spec §7.4) through the command line: `--dry-run` counts its parameters (not a
//! transformer's), a class-conditional `uvit-tiny` trains on digits-format images, its manifest
//! records the U-ViT architecture, and it evaluates (bits/dim) and samples a class to a PNG; a
//! time-free U-ViT trains and samples with the cached sampler; a U-ViT preset on text is
//! refused with one line.

mod common;
use common::*;
use std::path::Path;

/// A digits-format CSV (64 grey levels 0..=16, then the label 0..=9) of `n` images, each class
/// a bright row on a faint texture.
fn write_digits(path: &Path, n: usize) {
    let mut s = String::new();
    for i in 0..n {
        let class = i % 10;
        for p in 0..64 {
            let v = if p / 8 == class % 8 {
                16
            } else {
                (p * 7 + i) % 4
            };
            s.push_str(&format!("{v},"));
        }
        s.push_str(&format!("{class}\n"));
    }
    std::fs::write(path, s).unwrap();
}

fn uvit_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--out",
        out,
        "--dataset",
        "digits",
        "--data",
        "digits.csv",
        "--preset",
        "uvit-tiny",
        "--class-conditional",
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
    args
}

#[test]
fn uvit_trains_evaluates_and_samples_from_the_command_line() {
    let d = tmp("uvit");
    write_digits(&d.join("digits.csv"), 60);
    // uvit-tiny on 8×8×1 images, 17 levels, 10 classes, layer by layer (see
    // network/tests/uvit.rs): embed 18·8, cond 16→64→16 (+ labels 10·16, 16·64), conv_in
    // 9·8·16 + 16, down 2·(16·32 + 32) + 2·(9·16·16 + 16), DiT patch 64·16 + 16, pos 16·16,
    // block (16·96 + 96) + 3·(16·16 + 16) + 16·16 + (16·64 + 64) + (64·16 + 16), final
    // (16·32 + 32) + (16·64 + 64), 2 up blocks of (16·64 + 64) + (9·32·16 + 16) + (16·32 + 32)
    // + (9·16·16 + 16) + (32·16 + 16), out (16·32 + 32) + (9·16·17 + 17).
    let embed = 18 * 8;
    let cond = 16 * 64 + 64 + 64 * 16 + 16 + 10 * 16 + 16 * 64;
    let conv_in = 9 * 8 * 16 + 16;
    let down = 2 * (16 * 32 + 32) + 2 * (9 * 16 * 16 + 16);
    let block = (16 * 96 + 96) + 3 * (16 * 16 + 16) + 16 * 16 + (16 * 64 + 64) + (64 * 16 + 16);
    let dit = 64 * 16 + 16 + 16 * 16 + block + (16 * 32 + 32) + (16 * 64 + 64);
    let up = 2
        * ((16 * 64 + 64)
            + (9 * 32 * 16 + 16)
            + (16 * 32 + 32)
            + (9 * 16 * 16 + 16)
            + (32 * 16 + 16));
    let out = (16 * 32 + 32) + (9 * 16 * 17 + 17);
    let total = embed + cond + conv_in + down + dit + up + out;
    let o = run(&d, &uvit_args("u", &["--dry-run"]));
    ok(&o);
    assert!(
        stdout(&o).contains(&format!("parameters: {total} ")),
        "{total}: {}",
        stdout(&o)
    );

    ok(&run(&d, &uvit_args("u", &[])));
    let m = manifest(&d.join("u"));
    assert_eq!(m["network"]["arch"]["kind"], "uvit");
    assert_eq!(m["network"]["arch"]["patch"], 2);
    assert_eq!(m["network"]["num_classes"], 10);
    let e = run(&d, &["eval", "u", "--max-sequences", "4"]);
    ok(&e);
    assert!(stdout(&e).contains("bits/dim"), "{}", stdout(&e));
    ok(&run(
        &d,
        &[
            "sample", "u", "--class", "3", "-n", "2", "--steps", "4", "-o", "u.png",
        ],
    ));
    assert!(d.join("u.png").is_file());

    // time-free (μ_θ(x_t), spec §4.1): plain GroupNorms and RMSNorm DiT blocks; the cached
    // sampler, which needs a time-free network, samples it
    ok(&run(&d, &uvit_args("f", &["--time-free"])));
    let m = manifest(&d.join("f"));
    assert_eq!(m["network"]["time_conditioning"], false);
    ok(&run(
        &d,
        &[
            "sample",
            "f",
            "--class",
            "1",
            "-n",
            "2",
            "--sampler",
            "cached",
            "--steps",
            "8",
            "-o",
            "f.png",
        ],
    ));
    assert!(d.join("f.png").is_file());
}

#[test]
fn a_uvit_on_text_is_refused_with_one_line() {
    let d = tmp("uvit-text");
    write_corpus(&d.join("corpus.txt"), 2_000);
    one_line_error(
        &run(
            &d,
            &[
                "train",
                "--out",
                "t",
                "--data",
                "corpus.txt",
                "--seq-len",
                "32",
                "--preset",
                "uvit-tiny",
                "--steps",
                "1",
                "--warmup-steps",
                "0",
                "--no-progress",
            ],
        ),
        &["uvit-tiny", "image"],
    );
}
