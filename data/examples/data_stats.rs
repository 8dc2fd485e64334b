//! Build the English corpus token files and load the image sets from a fetch directory, printing
//! sizes and timings: `cargo run -p maskdiff-data --release --example data_stats -- [data-cache]`
//! (run `scripts/fetch-data.sh` first).

use std::path::PathBuf;
use std::time::Instant;

use maskdiff_data::corpus::{build_english_corpus, english_corpus_path, english_documents};
use maskdiff_data::images::{load_digits, load_fashion_mnist};
use maskdiff_data::{Split, SplitRatio, TokenFile, TokenizerId};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "data-cache".into()),
    );
    let docs = english_documents(&dir)?;
    let chars: usize = docs.iter().map(|d| d.chars().count()).sum();
    println!("english: {} documents, {chars} characters", docs.len());
    for id in [TokenizerId::Text8, TokenizerId::Bytes, TokenizerId::Gpt2] {
        let t = Instant::now();
        let f = build_english_corpus(&dir, id)?;
        let build = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let g = TokenFile::open(&english_corpus_path(&dir, id))?;
        let open = t.elapsed().as_secs_f64();
        let [tr, va, te] = SplitRatio::default().ranges(g.len());
        let bytes = std::fs::metadata(english_corpus_path(&dir, id))?.len();
        println!(
            "{id}: {} tokens (V = {}), {bytes} bytes, build {build:.2} s, open+verify {open:.3} s, \
             splits {}/{}/{}",
            f.len(),
            f.vocab().size(),
            tr.len(),
            va.len(),
            te.len()
        );
    }
    let t = Instant::now();
    let fm = load_fashion_mnist(&dir.join("fashion-mnist"), Split::Train)?;
    let ft = load_fashion_mnist(&dir.join("fashion-mnist"), Split::Test)?;
    println!(
        "fashion-mnist: {} train + {} test images {}x{}, {:.2} s",
        fm.len(),
        ft.len(),
        fm.shape.height,
        fm.shape.width,
        t.elapsed().as_secs_f64()
    );
    let d = load_digits(&dir.join("digits/digits.csv.gz"))?;
    println!(
        "digits: {} images of {} tokens, V = {}",
        d.len(),
        d.shape.tokens_per_image(),
        d.shape.levels
    );
    Ok(())
}
